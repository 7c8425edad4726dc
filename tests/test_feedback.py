"""The AI feedback labeller (paper §4.1): label maths on hand numbers, the prompt's form, and
labels read from tiny random models with real scoring."""

from __future__ import annotations

import json
import math
import re

import pytest
import typer
from typer.testing import CliRunner

from cai_lib.core.constitution import load_constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.records import Preference, PrincipleScore, ResponsePair
from cai_lib.core.shards import read_dataset
from cai_lib.method.feedback import (
    COT_CLAMP,
    FeedbackConfig,
    FeedbackLabeller,
    clamp,
    comparison_question,
    conversation_text,
    cut_reasoning,
    draw_principles,
    ensemble,
    few_shot_messages,
    label_preferences,
    option_probability,
    option_split_problem,
    order_debiased,
    pair_label,
    unswapped,
)


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("harmless@1.0.0")


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir):
    from cai_lib.engines.generation import load_backend

    return load_backend(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its final norm scaled up 300x: its logits, and so its option
    probabilities, become extreme, the way a confident model's are after a chain of thought."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(300.0)
    out = tmp_path_factory.mktemp("sharp-llama")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def pair(
    index: int, answer_a: str, answer_b: str, prompt: str = "How do I get into my neighbour's shed?"
) -> ResponsePair:
    return ResponsePair(
        id=f"pair-{index}",
        prompt_id=f"prompt-{index}",
        prompt=prompt,
        answer_a=answer_a,
        answer_b=answer_b,
        model_ref="policy",
    )


PAIRS = [
    pair(0, "Ask your neighbour for the key.", "Break the padlock with bolt cutters at night."),
    pair(
        1,
        "I can't help with that.",
        "Explain to them why you need it and ask first.",
        "Can I borrow my friend's car?",
    ),
]


def swapped(row: ResponsePair) -> ResponsePair:
    return row.model_copy(
        update={"id": row.id + "-swapped", "answer_a": row.answer_b, "answer_b": row.answer_a}
    )


class RecordingBackend:
    """Passes every call to a real backend and records which methods were called, with what."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[str] = []
        self.conversations: list[list] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, conversations, *args, **kwargs):
        self.calls.append("generate")
        self.conversations.append(conversations)
        return self.inner.generate(conversations, *args, **kwargs)

    def score_options(self, contexts, *args, **kwargs):
        self.calls.append("score_options")
        self.conversations.append(contexts)
        return self.inner.score_options(contexts, *args, **kwargs)


class PerOptionBackend(RecordingBackend):
    """Scores each option of a context on its own row: the per-option scoring that one-pass
    labelling replaces."""

    def score_options(self, contexts, options, shared_prefix=None):
        self.last_one_pass = [False] * len(contexts)
        return [
            [self.inner.score_options([c], [[o]], shared_prefix=shared_prefix)[0][0] for o in opts]
            for c, opts in zip(contexts, options)
        ]


# -- label maths on hand-written numbers -----------------------------------------------------------


def test_option_probability_is_the_softmax_of_the_two_log_probs():
    assert option_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert option_probability(-2.0, -2.0) == 0.5


def test_option_probability_survives_extreme_log_probs():
    assert option_probability(0.0, -5000.0) == 1.0
    assert option_probability(-5000.0, 0.0) == 0.0


def test_a_probability_read_with_a_shown_second_is_unswapped():
    assert unswapped(0.3) == pytest.approx(0.7)


def test_order_debiasing_averages_the_two_orders():
    assert order_debiased(0.8, 0.6) == pytest.approx(0.7)


def test_a_model_that_always_answers_the_first_option_gets_one_half():
    always_first = 0.9
    assert order_debiased(always_first, unswapped(always_first)) == pytest.approx(0.5)


def test_ensemble_is_the_mean_over_principles():
    assert ensemble([0.7, 0.5, 0.9]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        ensemble([])


def test_clamp_limits_to_the_papers_forty_to_sixty_percent():
    assert COT_CLAMP == (0.4, 0.6)
    assert (clamp(0.95), clamp(0.02), clamp(0.55)) == (0.6, 0.4, 0.55)


def test_pair_label_debiases_each_principle_then_averages():
    scores = [
        PrincipleScore(principle_id="x", p_a_first=0.9, p_a_second=0.7),
        PrincipleScore(principle_id="y", p_a_first=0.4, p_a_second=0.2),
    ]
    assert pair_label(scores) == pytest.approx((0.8 + 0.3) / 2)


def test_options_sharing_a_prefix_and_differing_in_the_last_token_are_readable():
    assert option_split_problem(["(", "A"], ["(", "B"]) is None
    assert option_split_problem(["A"], ["B"]) is None


def test_an_option_that_tokenises_to_nothing_is_refused():
    assert option_split_problem([], ["(", "B"]) == "an option has no tokens"


def test_options_split_into_different_shapes_or_the_same_token_are_ambiguous():
    assert "same leading tokens" in option_split_problem(["(", "A"], ["(", "A", "ard"])
    assert "same leading tokens" in option_split_problem(["(A"], ["(", "B"])
    assert "same token" in option_split_problem(["(", "A"], ["(", "A"])


# -- the question put to the feedback model ------------------------------------------------------


def test_the_question_has_the_papers_form():
    text = comparison_question("What is 2+2?", "Which answer is more honest?", "4", "5")
    assert text == (
        "Consider the following conversation between a human and an assistant:\n\n"
        "Human: What is 2+2?\n\n"
        "Which answer is more honest?\n"
        "Options:\n(A) 4\n(B) 5\n"
        "The answer is:"
    )


def test_the_chain_of_thought_question_leaves_the_answer_to_the_reasoning():
    assert comparison_question("Hi", "Which?", "a", "b", cot=True).endswith("Options:\n(A) a\n(B) b")


def test_a_multi_turn_transcript_is_shown_turn_by_turn():
    transcript = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me cheat."
    assert conversation_text(transcript) == "Human: Hi\n\nAssistant: Hello!\n\nHuman: Help me cheat."
    assert conversation_text("Human: Hi") == "Human: Hi"


def test_few_shot_examples_answer_with_the_preferred_option(constitution):
    messages = few_shot_messages(constitution, cot=False)
    examples = constitution.few_shot.comparison
    assert len(messages) == 2 * len(examples)
    assert [m["content"] for m in messages[1::2]] == [f"({e.preferred})" for e in examples]
    assert messages[0]["content"].startswith("Consider the following conversation")


def test_chain_of_thought_few_shot_examples_reason_before_answering(constitution):
    examples = [e for e in constitution.few_shot.comparison if e.reasoning.strip()]
    replies = few_shot_messages(constitution, cot=True)[1::2]
    assert len(replies) == len(examples)
    first = examples[0]
    assert replies[0]["content"] == (
        f"Let's think step by step: {first.reasoning.strip()}\nTherefore, the answer is: ({first.preferred})"
    )


def test_reasoning_is_cut_where_the_model_concludes_by_itself():
    assert cut_reasoning(" B is kinder. Therefore, the answer is: (B)") == "B is kinder."
    assert cut_reasoning("B is kinder.") == "B is kinder."


def test_principle_draws_are_seeded_distinct_and_ignore_answer_order(constitution):
    drawn = draw_principles(constitution.comparison, 4, 0, PAIRS[0])
    assert len({p.id for p in drawn}) == 4
    assert drawn == draw_principles(constitution.comparison, 4, 0, PAIRS[0])
    assert drawn == draw_principles(constitution.comparison, 4, 0, swapped(PAIRS[0]))
    assert [p.id for p in drawn] != [p.id for p in draw_principles(constitution.comparison, 4, 1, PAIRS[0])]


# -- labels from a tiny model, real scoring ------------------------------------------------------


def test_soft_labels_lie_in_zero_one_and_sum_with_their_swap_to_one(
    tiny_backend, constitution, tiny_model_dir
):
    labeller = FeedbackLabeller(
        tiny_backend, constitution, str(tiny_model_dir), FeedbackConfig(principles_per_pair=3)
    )
    labels = labeller.label(PAIRS + [swapped(p) for p in PAIRS])
    assert all(0.0 <= p.label <= 1.0 for p in labels)
    assert labels[0].label + labels[2].label == pytest.approx(1.0, abs=1e-6)
    assert labels[1].label + labels[3].label == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("cot", [False, True], ids=["direct", "chain-of-thought"])
def test_one_pass_labels_equal_per_option_labels(tiny_backend, constitution, tiny_model_dir, cot):
    config = FeedbackConfig(principles_per_pair=2, cot=cot, max_reasoning_tokens=8)
    one_pass = FeedbackLabeller(tiny_backend, constitution, str(tiny_model_dir), config).label(PAIRS)
    assert all(tiny_backend.last_one_pass)
    per_option = FeedbackLabeller(
        PerOptionBackend(tiny_backend), constitution, str(tiny_model_dir), config
    ).label(PAIRS)
    for a, b in zip(one_pass, per_option):
        assert (a.scores[0].scoring, b.scores[0].scoring) == ("one-pass", "per-option")
        assert a.label == pytest.approx(b.label, abs=1e-5)
        for x, y in zip(a.scores, b.scores):
            assert (x.p_a_first, x.p_a_second) == pytest.approx((y.p_a_first, y.p_a_second), abs=1e-5)


def test_a_label_is_the_ensemble_mean_over_k_distinct_principles(tiny_backend, constitution, tiny_model_dir):
    labeller = FeedbackLabeller(
        tiny_backend, constitution, str(tiny_model_dir), FeedbackConfig(principles_per_pair=3)
    )
    (preference,) = labeller.label(PAIRS[:1])
    assert len(set(preference.principle_ids)) == 3
    assert [s.principle_id for s in preference.scores] == preference.principle_ids
    per_principle = [(s.p_a_first + s.p_a_second) / 2 for s in preference.scores]
    assert preference.label == pytest.approx(sum(per_principle) / 3)
    assert preference.source == "ai" and preference.constitution_ref == "harmless@1.0.0"


def test_without_chain_of_thought_no_text_is_generated(tiny_backend, constitution, tiny_model_dir, tmp_path):
    recording = RecordingBackend(tiny_backend)
    label_preferences(
        PAIRS, constitution, str(tiny_model_dir), str(tmp_path / "labels"), FeedbackConfig(), recording
    )
    assert "score_options" in recording.calls
    assert "generate" not in recording.calls


def test_chain_of_thought_reasons_first_then_reads_the_option_after_the_reasoning(
    tiny_backend, constitution, tiny_model_dir
):
    recording = RecordingBackend(tiny_backend)
    config = FeedbackConfig(principles_per_pair=1, cot=True, max_reasoning_tokens=4)
    (preference,) = FeedbackLabeller(recording, constitution, str(tiny_model_dir), config).label(PAIRS[:1])
    assert recording.calls == ["generate", "score_options"]
    openings, contexts = recording.conversations
    assert [c[-1] for c in openings] == [{"role": "assistant", "content": "Let's think step by step:"}] * 2
    expected = [
        " ".join(filter(None, ["Let's think step by step:", r])) for r in preference.scores[0].reasoning
    ]
    assert [c[-1]["content"] for c in contexts] == [f"{e}\nTherefore, the answer is: (" for e in expected]


def test_confident_probabilities_stay_unclamped_without_chain_of_thought(sharp_model_dir, constitution):
    from cai_lib.engines.generation import load_backend

    labeller = FeedbackLabeller(
        load_backend(str(sharp_model_dir)), constitution, "sharp", FeedbackConfig(principles_per_pair=2)
    )
    probabilities = [
        p for pref in labeller.label(PAIRS) for s in pref.scores for p in (s.p_a_first, s.p_a_second)
    ]
    assert any(p < 0.4 or p > 0.6 for p in probabilities)


def test_chain_of_thought_labels_are_clamped_to_forty_sixty_and_keep_their_reasoning(
    sharp_model_dir, constitution
):
    from cai_lib.engines.generation import load_backend

    config = FeedbackConfig(principles_per_pair=2, cot=True, max_reasoning_tokens=6)
    labeller = FeedbackLabeller(load_backend(str(sharp_model_dir)), constitution, "sharp", config)
    labels = labeller.label(PAIRS)
    probabilities = [p for pref in labels for s in pref.scores for p in (s.p_a_first, s.p_a_second)]
    assert all(0.4 <= p.label <= 0.6 for p in labels)
    assert all(0.4 <= p <= 0.6 for p in probabilities)
    assert {0.4, 0.6} & set(probabilities)
    assert all(len(s.reasoning) == 2 for pref in labels for s in pref.scores)


def test_a_comparison_longer_than_max_model_len_is_refused_before_anything_is_written(
    tiny_backend, constitution, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(tiny_backend, "max_model_len", 64, raising=False)
    out = tmp_path / "labels"
    with pytest.raises(CaiError, match=f"label: row {PAIRS[0].id}: its prompt is \\d+ tokens, more than"):
        label_preferences(PAIRS, constitution, str(tiny_model_dir), str(out), FeedbackConfig(), tiny_backend)
    assert not out.exists()


def test_labels_are_written_in_shards_and_a_rerun_reproduces_them(
    tiny_backend, constitution, tiny_model_dir, tmp_path
):
    out = str(tmp_path / "labels")
    config = FeedbackConfig(principles_per_pair=2, shard_size=1)
    assert label_preferences(PAIRS, constitution, str(tiny_model_dir), out, config, tiny_backend) == 2
    first = list(read_dataset(out, Preference))
    (tmp_path / "labels" / "part-00001.jsonl").unlink()
    (tmp_path / "labels" / "_SUCCESS.json").unlink()
    recording = RecordingBackend(tiny_backend)
    assert label_preferences(PAIRS, constitution, str(tiny_model_dir), out, config, recording) == 2
    assert recording.calls == ["score_options"]
    again = list(read_dataset(out, Preference))
    assert [p.id for p in again] == [p.id for p in first]
    assert [p.label for p in again] == pytest.approx([p.label for p in first], abs=1e-6)


# -- bad input -------------------------------------------------------------------------------------


def test_an_ambiguous_option_split_is_refused_and_named(tiny_backend, constitution, tiny_model_dir):
    config = FeedbackConfig(option_labels=("A", "Aardvark"))
    with pytest.raises(CaiError, match=r"'\(A' -> \['\(', 'A'\] and '\(Aardvark' -> \['\(', 'A', 'ard'"):
        FeedbackLabeller(tiny_backend, constitution, str(tiny_model_dir), config)


def test_more_principles_than_the_constitution_has_is_refused(tiny_backend, constitution, tmp_path):
    config = FeedbackConfig(principles_per_pair=len(constitution.comparison) + 1)
    with pytest.raises(CaiError, match=r"principles per pair: 11 is more than the 10 comparison principles"):
        label_preferences(PAIRS, constitution, "unused", str(tmp_path / "out"), config, tiny_backend)
    assert not (tmp_path / "out").exists()


def test_a_constitution_without_comparison_principles_is_refused(tiny_backend, constitution, tmp_path):
    bare = constitution.model_copy(update={"comparison": []})
    with pytest.raises(CaiError, match="has no comparison principles"):
        label_preferences(PAIRS, bare, "unused", str(tmp_path / "out"), FeedbackConfig(), tiny_backend)
    assert not (tmp_path / "out").exists()


def test_a_pair_with_a_blank_answer_is_refused_by_row(tiny_backend, constitution, tmp_path):
    blank = pair(7, "Sure.", "   ")
    with pytest.raises(CaiError, match=r"pair 3 \(id pair-7\): field 'answer_b' is missing or empty"):
        label_preferences(
            PAIRS + [blank], constitution, "unused", str(tmp_path / "out"), FeedbackConfig(), tiny_backend
        )
    assert not (tmp_path / "out").exists()


def test_the_label_command_refuses_a_pairs_file_with_a_missing_answer(tmp_path):
    from cai_lib.cli.stage_feedback import label_command

    rows = [PAIRS[0].model_dump(), {k: v for k, v in PAIRS[1].model_dump().items() if k != "answer_b"}]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    app = typer.Typer()
    app.command()(label_command)
    args = [
        "--pairs",
        str(pairs_file),
        "--constitution",
        "harmless@1.0.0",
        "--feedback-model",
        "unused",
        "--out",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, CaiError)
    assert re.search(r"pairs.jsonl.*line 2.*answer_b", str(result.exception))
    assert not (tmp_path / "out").exists()


# -- the embedded model ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.model  # the embedded SmolLM2, by its alias
def test_the_embedded_model_labels_shared_hh_rlhf_pairs(hh_rlhf_path, constitution, tmp_path):
    from cai_lib.engines.generation import load_backend
    from cai_lib.method.human_preferences import read_human_preferences

    human = read_human_preferences(str(hh_rlhf_path), limit=4)
    rows = [pair(i, p.answer_a, p.answer_b, p.prompt) for i, p in enumerate(human)]
    # One principle per pair: each costs two forward passes per order on a CPU, and the
    # ensemble maths is covered on the tiny model.
    config = FeedbackConfig(principles_per_pair=1)
    out = str(tmp_path / "labels")
    backend = load_backend("smollm2-135m-instruct")
    assert label_preferences(rows, constitution, "smollm2-135m-instruct", out, config, backend) == 4
    labels = list(read_dataset(out, Preference))
    assert [p.answer_a for p in labels] == [p.answer_a for p in human]
    assert all(0.0 < p.label < 1.0 and len(p.principle_ids) == 1 for p in labels)
    assert len({round(p.label, 6) for p in labels}) > 1  # a trained model tells pairs apart
