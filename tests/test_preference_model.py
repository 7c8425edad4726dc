"""The soft-label preference model: its loss, the data mix, training, scoring and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from cai_lib.cli.stage_rl import train_pm
from cai_lib.core.errors import CaiError
from cai_lib.core.records import Preference, stable_id
from cai_lib.core.store import ArtifactStore
from cai_lib.method.preference_model import (
    PreferenceModelConfig,
    RewardScorer,
    calibration_curve,
    human_calibration,
    mix_preferences,
    preference_accuracy,
    score_texts,
    soft_preference_loss,
    train_preference_model,
)

# -- the loss, on hand-made tensors ---------------------------------------------------------------


def test_soft_loss_at_p_1_is_the_bradley_terry_loss_of_a_over_b():
    r_a, r_b = torch.tensor([1.5, -0.3, 4.0]), torch.tensor([0.5, 0.2, -2.0])

    loss = soft_preference_loss(r_a, r_b, torch.ones(3))

    assert torch.allclose(loss, -F.logsigmoid(r_a - r_b).mean())


def test_soft_loss_at_p_0_is_the_bradley_terry_loss_of_b_over_a():
    r_a, r_b = torch.tensor([1.5, -0.3, 4.0]), torch.tensor([0.5, 0.2, -2.0])

    loss = soft_preference_loss(r_a, r_b, torch.zeros(3))

    assert torch.allclose(loss, -F.logsigmoid(r_b - r_a).mean())


def test_soft_loss_matches_a_hand_computed_value():
    # r_A − r_B = 2, p = 0.75: −[0.75·log σ(2) + 0.25·log σ(−2)]
    expected = -(0.75 * math.log(1 / (1 + math.exp(-2))) + 0.25 * math.log(1 / (1 + math.exp(2))))

    loss = soft_preference_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.75]))

    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_soft_loss_is_minimised_at_the_margin_logit_p():
    p = torch.tensor([0.7])
    margin = torch.zeros(1, requires_grad=True)

    soft_preference_loss(margin, torch.zeros(1), p).backward()
    at_zero = margin.grad.item()
    best = torch.tensor([math.log(0.7 / 0.3)], requires_grad=True)
    soft_preference_loss(best, torch.zeros(1), p).backward()

    assert at_zero < 0  # the loss still falls as the margin grows from 0 ...
    assert best.grad.item() == pytest.approx(0.0, abs=1e-6)  # ... and stops falling at logit(0.7)


def test_soft_loss_stays_finite_for_huge_margins():
    loss = soft_preference_loss(torch.tensor([500.0]), torch.tensor([-500.0]), torch.tensor([0.0]))

    assert loss.item() == pytest.approx(1000.0)


def test_accuracy_counts_agreeing_orders_and_leaves_out_label_ties():
    # pair 1 agrees, pair 2 disagrees, pair 3 agrees (label < 0.5, B scored higher), pair 4 is a tie label.
    accuracy = preference_accuracy([2.0, 0.0, -1.0, 5.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.8, 0.2, 0.5])

    assert accuracy == pytest.approx(2 / 3)


def test_accuracy_is_none_without_a_decided_pair():
    assert preference_accuracy([1.0], [0.0], [0.5]) is None


# -- the mix ------------------------------------------------------------------------------------


def prefs(source: str, n: int) -> list[Preference]:
    return [
        Preference(id=f"{source}{i}", prompt=f"Q{i}", answer_a="a", answer_b="b", label=1.0, source=source)
        for i in range(n)
    ]


def test_mix_subsamples_human_pairs_to_the_requested_share():
    mixed = mix_preferences(prefs("ai", 30), prefs("human", 100), human_fraction=0.25, seed=0)

    assert sum(p.source == "ai" for p in mixed) == 30
    assert sum(p.source == "human" for p in mixed) == 10


def test_mix_subsamples_ai_pairs_when_human_pairs_are_scarce():
    mixed = mix_preferences(prefs("ai", 30), prefs("human", 20), human_fraction=0.8, seed=0)

    assert sum(p.source == "human" for p in mixed) == 20
    assert sum(p.source == "ai" for p in mixed) == 5


def test_mix_is_the_same_for_the_same_seed_and_differs_for_another():
    ai, human = prefs("ai", 30), prefs("human", 100)

    assert mix_preferences(ai, human, 0.5, seed=1) == mix_preferences(ai, human, 0.5, seed=1)
    assert mix_preferences(ai, human, 0.5, seed=1) != mix_preferences(ai, human, 0.5, seed=2)


def test_mix_uses_ai_pairs_alone_when_no_human_pairs_are_given():
    assert sorted(p.id for p in mix_preferences(prefs("ai", 4), [], 0.5, seed=0)) == [
        "ai0",
        "ai1",
        "ai2",
        "ai3",
    ]


def test_mix_refuses_an_all_human_share_without_human_pairs():
    with pytest.raises(CaiError, match="human_fraction is 1.0 but no human"):
        mix_preferences(prefs("ai", 4), [], 1.0, seed=0)


# -- calibration against human choices (Fig. 9), on hand-made scores ----------------------------------


def test_calibration_shows_each_human_choice_as_a_or_b_by_a_seeded_draw_per_pair():
    ids = [f"pair-{i}" for i in range(200)]
    calibration = human_calibration(ids, [1.0] * 200, [0.0] * 200, "held-out", seed=3, bins=5)
    shown = [p.chosen_shown_as for p in calibration.pairs]
    assert 70 < shown.count("A") < 130
    assert human_calibration(ids[::-1], [1.0] * 200, [0.0] * 200, "held-out", 3, 5).pairs[::-1] == calibration.pairs
    assert [p.chosen_shown_as for p in human_calibration(ids, [1.0] * 200, [0.0] * 200, "", 4, 5).pairs] != shown


def test_a_pm_that_always_prefers_the_human_choice_observes_a_chosen_exactly_where_it_predicts_a():
    # r(chosen) - r(rejected) = 2: σ(2) = 0.881 when the choice is A, σ(-2) = 0.119 when it is B.
    ids = [f"pair-{i}" for i in range(50)]
    calibration = human_calibration(ids, [2.0] * 50, [0.0] * 50, "held-out", seed=0, bins=5)
    low, high = calibration.bins
    assert (low.low, low.predicted, low.observed) == (0.0, pytest.approx(0.1192, abs=1e-4), 0.0)
    assert (high.low, high.predicted, high.observed) == (0.8, pytest.approx(0.8808, abs=1e-4), 1.0)
    assert low.n + high.n == 50 and high.n == sum(p.chosen_shown_as == "A" for p in calibration.pairs)


def test_a_bins_interval_is_wilsons_on_its_count():
    (only,) = calibration_curve([0.7] * 10, [1.0] * 8 + [0.0] * 2, bins=5)
    assert (only.observed, only.n) == (0.8, 10)
    assert (only.ci_low, only.ci_high) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))


# -- training on a trivially separable set ----------------------------------------------------------


def separable_pairs() -> tuple[list[Preference], list[Preference]]:
    """Preferred answers mention apples, the others stones. AI labels are soft and put the apple
    answer on either side; human pairs put it first (label 1.0), as hh-rlhf does."""

    def pair(i: int, source: str, apple_first: bool, label: float) -> Preference:
        apple, stone = f"I like apples, number {i}.", f"I like stones, number {i}."
        a, b = (apple, stone) if apple_first else (stone, apple)
        prompt = f"What do you like? Ask {i}."
        return Preference(
            id=stable_id(source, str(i)), prompt=prompt, answer_a=a, answer_b=b, label=label, source=source
        )

    ai = [pair(i, "ai", i % 2 == 0, 0.9 if i % 2 == 0 else 0.1) for i in range(16)]
    human = [pair(100 + i, "human", True, 1.0) for i in range(16)]
    return ai, human


# Tiny on purpose: 32 short pairs, batches of 4 and a high learning rate let the two-layer random
# model separate "apples" from "stones" in a few dozen CPU steps.
TINY_PM = PreferenceModelConfig(learning_rate=3e-3, epochs=4, batch_size=4, eval_fraction=0.25, max_length=64)


@pytest.fixture(scope="module")
def trained_pm(tiny_model_dir, tmp_path_factory):
    ai, human = separable_pairs()
    out = tmp_path_factory.mktemp("pm") / "checkpoint"
    metrics = train_preference_model(ai, human, str(tiny_model_dir), str(out), TINY_PM)
    return metrics, out


def test_pm_reaches_full_accuracy_on_held_out_human_pairs(trained_pm):
    metrics, _ = trained_pm

    assert metrics.eval_human_pairs == 4
    assert metrics.human_accuracy == 1.0
    assert metrics.ai_accuracy == 1.0


def test_pm_training_mixes_the_sources_at_the_configured_share(trained_pm):
    metrics, _ = trained_pm

    assert (metrics.train_ai_pairs, metrics.train_human_pairs) == (12, 12)


def test_pm_loss_falls(trained_pm):
    metrics, _ = trained_pm

    assert len(metrics.loss_curve) == 24  # 24 training pairs in batches of 4, for 4 epochs
    assert metrics.loss_curve[-1] < 0.5 * metrics.loss_curve[0]


def test_pm_training_changes_every_base_weight(trained_pm, tiny_model_dir):
    _, out = trained_pm
    base = load_file(tiny_model_dir / "model.safetensors")
    trained = load_file(out / "model.safetensors")

    # The backbone ("model.*") is shared; the causal LM's head is replaced by the one-logit score head.
    backbone = [name for name in base if name.startswith("model.")]
    assert backbone and all(name in trained for name in backbone)
    assert [name for name in backbone if torch.equal(base[name], trained[name])] == []
    assert "score.weight" in trained


def test_pm_checkpoint_loads_back_and_prefers_the_separable_answer(trained_pm):
    _, out = trained_pm

    scorer = RewardScorer.load(str(out))
    apple, stone = scorer.score(
        ["What do you like?"] * 2, ["I like apples, number 7.", "I like stones, number 7."]
    )

    assert apple > stone


def test_pm_calibration_is_measured_on_the_held_out_human_pairs_only(trained_pm):
    metrics, _ = trained_pm
    calibration = metrics.calibration
    assert len(calibration.pairs) == metrics.eval_human_pairs == sum(b.n for b in calibration.bins)
    assert {p.id for p in calibration.pairs} <= {pair.id for pair in separable_pairs()[1]}
    # Every held-out human pair is right (accuracy 1.0): wherever A was the choice, A is predicted.
    assert all((p.predicted > 0.5) == (p.chosen_shown_as == "A") for p in calibration.pairs)


def test_pm_writes_its_metrics_inside_the_checkpoint(trained_pm):
    metrics, out = trained_pm

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["human_accuracy"] == metrics.human_accuracy
    assert saved["config"]["human_fraction"] == 0.5
    assert ArtifactStore.open(out.parent).dir_exists(out.name)


def test_pm_refuses_an_output_that_holds_a_finished_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "pm"
    out.mkdir()
    (out / "_MANIFEST.json").write_text('{"files": {}}')
    ai, human = separable_pairs()

    with pytest.raises(CaiError, match="already holds a finished checkpoint"):
        train_preference_model(ai, human, str(tiny_model_dir), str(out), TINY_PM)
    assert sorted(p.name for p in out.iterdir()) == ["_MANIFEST.json"]


def test_pm_trains_to_s3_and_loads_from_there(tiny_model_dir, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    ai, _ = separable_pairs()
    # One epoch of AI pairs only: this test is about where the checkpoint goes, not its quality.
    config = TINY_PM.model_copy(update={"epochs": 1})

    metrics = train_preference_model(ai, [], str(tiny_model_dir), f"s3://{s3_bucket}/runs/pm", config)

    assert metrics.checkpoint_uri == f"s3://{s3_bucket}/runs/pm"
    assert metrics.human_accuracy is None and metrics.train_human_pairs == 0
    assert len(RewardScorer.load(metrics.checkpoint_uri).score(["Q"], ["A"])) == 1


# -- scoring --------------------------------------------------------------------------------------


def test_a_causal_lm_is_refused_as_a_reward_model(tiny_model_dir):
    with pytest.raises(CaiError, match="LlamaForCausalLM .*not a sequence classifier"):
        RewardScorer.load(str(tiny_model_dir))


def test_score_texts_gives_one_score_per_answer_independent_of_batching(tiny_reward_model_dir):
    prompts = ["Hi", "\n\nHuman: Hello\n\nAssistant: Hey\n\nHuman: How are you?", "Bye"]
    answers = ["Hello there.", "Fine, thanks.", "Goodbye, and take care of yourself."]

    batched = score_texts(str(tiny_reward_model_dir), prompts, answers, batch_size=3)
    one_by_one = score_texts(str(tiny_reward_model_dir), prompts, answers, batch_size=1)

    assert len(batched) == 3 and len(set(batched)) == 3
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_scorer_reads_a_transcript_prompt_as_its_turns(tiny_reward_model_dir):
    scorer = RewardScorer.load(str(tiny_reward_model_dir))
    turns = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Fine."},
    ]

    from_transcript = scorer.score(["\n\nHuman: Hello\n\nAssistant: Hey\n\nHuman: How are you?"], ["Fine."])

    assert from_transcript == pytest.approx(scorer.score_conversations([turns]))


# -- the command line ------------------------------------------------------------------------------


def test_train_pm_command_prints_the_held_out_human_accuracy_last(tiny_model_dir, tmp_path):
    ai, human = separable_pairs()
    ArtifactStore.open(tmp_path).write_jsonl("ai.jsonl", ai)
    (tmp_path / "human.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "chosen": f"\n\nHuman: {p.prompt}\n\nAssistant: {p.answer_a}",
                    "rejected": f"\n\nHuman: {p.prompt}\n\nAssistant: {p.answer_b}",
                }
            )
            + "\n"
            for p in human
        )
    )
    app = typer.Typer()
    app.command()(train_pm)

    # One epoch with a batch of 8: the command's wiring is under test, not the PM's quality.
    result = CliRunner().invoke(
        app,
        [
            "--ai-labels",
            str(tmp_path / "ai.jsonl"),
            "--human",
            str(tmp_path / "human.jsonl"),
            "--base-model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "pm"),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--learning-rate",
            "1e-3",
            "--eval-fraction",
            "0.25",
        ],
    )

    assert result.exit_code == 0, result.output
    assert "read 16 AI-labelled pair(s)" in result.output and "16 human pair(s)" in result.output
    assert result.output.strip().splitlines()[-1].startswith("held-out human accuracy: ")
    assert "on 4 pair(s)" in result.output.strip().splitlines()[-1]
    assert Path(tmp_path / "pm" / "model.safetensors").is_file()


def test_train_pm_command_help_shows_an_example():
    app = typer.Typer()
    app.command()(train_pm)

    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "100"})

    assert result.exit_code == 0, result.output
    assert "Example: cai stage train_pm" in result.output and "--human-fraction" in result.output
