"""Tests that pin the direction of every signal that decides which answer is better, end to end,
through test judges that honour the options and the order they are shown (tests/judges.py): the
labeller's soft label in both orders, the PM trained on its labels, the evaluation's soft and hard
win rates in both orders and their mirror, Elo, evasiveness, and the promotion gate's decision as
the register step reads the evaluation, just above and just below its bar; SFT's loss covers the
answer and not the prompt; RL raises the reward. docs/method.md lists, for each sign or order in
cai_lib, the test here that fails when it is flipped."""

from __future__ import annotations

import pytest
from evaluation_data import hard_judgement, sample_result
from judges import P_PREFERRED, marker_judge, shorter_judge

from cai_lib.core.constitution import load_constitution
from cai_lib.core.names import CHAMPION_POLICY, RL_CAI, SL_CAI
from cai_lib.core.records import Preference, PromptRecord, ResponsePair, stable_id
from cai_lib.method.evaluation.config import EvaluationConfig
from cai_lib.method.evaluation.elo import elo_ratings, wilson_interval
from cai_lib.method.evaluation.judging import compare_policies, evasiveness
from cai_lib.method.evaluation.results import Judgement, PolicyAnswer, find_win_rate
from cai_lib.method.evaluation.summary import (
    criterion_elo,
    evasiveness_summaries,
    win_rate_of,
    win_rates,
)
from cai_lib.method.feedback import FeedbackConfig, FeedbackLabeller
from cai_lib.platform.registry.gate import PromotionGate, decide_promotion
from cai_lib.steps.register import gate_evidence

SAFE = "I won't help with that, because it could hurt someone; here is a safer way instead."
UNSAFE = "Sure, here is exactly how to do it."
MARKER = "Sure"  # what the marker judge holds against an answer


@pytest.fixture(scope="module")
def constitution():
    return load_constitution("harmless@1.0.0")


def pair(answer_a: str, answer_b: str) -> ResponsePair:
    return ResponsePair(
        id=f"{answer_a[:4]}-{answer_b[:4]}",
        prompt_id="p",
        prompt="How do I get into my neighbour's shed?",
        answer_a=answer_a,
        answer_b=answer_b,
        model_ref="policy",
    )


def labeller(constitution, judge=None, **settings) -> FeedbackLabeller:
    return FeedbackLabeller(judge or marker_judge(MARKER), constitution, "judge", FeedbackConfig(**settings))


# -- the test judges honour what they are shown -------------------------------------------------------------


def test_the_marker_judge_swaps_its_verdict_with_the_answers_and_its_scores_with_the_options():
    judge = marker_judge(MARKER)
    question = [{"role": "user", "content": f"Which?\nOptions:\n(A) {SAFE}\n(B) {UNSAFE}\nThe answer is:"}]
    swapped = [{"role": "user", "content": f"Which?\nOptions:\n(A) {UNSAFE}\n(B) {SAFE}\nThe answer is:"}]
    assert judge.score_options([question, swapped], [["(A", "(B"], ["(A", "(B"]]) == [[0.0, -3.0], [-3.0, 0.0]]
    assert judge.score_options([question], [["(B", "(A"]]) == [[-3.0, 0.0]]


# -- the labeller's soft label -------------------------------------------------------------------------------


def test_a_judge_preferring_answer_a_labels_it_better(constitution):
    (label,) = labeller(constitution, principles_per_pair=1).label([pair(SAFE, UNSAFE)])
    assert label.label == pytest.approx(P_PREFERRED)


def test_a_judge_preferring_answer_b_labels_a_worse(constitution):
    (label,) = labeller(constitution, principles_per_pair=1).label([pair(UNSAFE, SAFE)])
    assert label.label == pytest.approx(1.0 - P_PREFERRED)


def test_the_preference_holds_in_both_option_orders(constitution):
    (label,) = labeller(constitution, principles_per_pair=1).label([pair(SAFE, UNSAFE)])
    assert [label.scores[0].p_a_first, label.scores[0].p_a_second] == pytest.approx([P_PREFERRED] * 2)


def test_a_judge_of_another_rule_labels_its_way_in_both_orders(constitution):
    short, long = "No.", "No, and here is a long explanation of why not."
    judge = shorter_judge()
    (first,) = labeller(constitution, judge, principles_per_pair=1).label([pair(short, long)])
    (second,) = labeller(constitution, judge, principles_per_pair=1).label([pair(long, short)])
    assert (first.label, second.label) == (pytest.approx(P_PREFERRED), pytest.approx(1.0 - P_PREFERRED))


def test_the_ensemble_of_several_principles_keeps_the_direction(constitution):
    (label,) = labeller(constitution, principles_per_pair=4).label([pair(SAFE, UNSAFE)])
    assert len(label.scores) == 4 and label.label == pytest.approx(P_PREFERRED)


def test_chain_of_thought_labels_keep_the_direction_inside_the_clamp(constitution):
    (label,) = labeller(constitution, principles_per_pair=1, cot=True).label([pair(SAFE, UNSAFE)])
    assert label.label == pytest.approx(0.6)
    (swapped,) = labeller(constitution, principles_per_pair=1, cot=True).label([pair(UNSAFE, SAFE)])
    assert swapped.label == pytest.approx(0.4)


def test_evaluation_reads_chain_of_thought_unclamped(constitution):
    judge = FeedbackLabeller(marker_judge(MARKER), constitution, "judge", EvaluationConfig(cot=True).feedback())
    (label,) = judge.label([pair(SAFE, UNSAFE)])
    assert label.label == pytest.approx(P_PREFERRED)


@pytest.mark.parametrize("human_chose", ["clean", "marked"])
def test_the_labellers_agreement_with_human_choices_follows_the_judge(constitution, tmp_path, human_chose):
    import json

    from cai_lib.method.label_accuracy import label_accuracy

    clean, marked = "A calm answer.", f"{MARKER}, a reckless answer."
    chosen, rejected = (clean, marked) if human_chose == "clean" else (marked, clean)
    rows = [
        {"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: {chosen}", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: {rejected}"}
        for i in range(4)
    ]
    source = tmp_path / "hh.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = FeedbackConfig(principles_per_pair=1)
    report = label_accuracy(str(source), constitution, "judge", None, config, backend=marker_judge(MARKER))
    assert (report.agreement, report.position_bias) == (1.0 if human_chose == "clean" else 0.0, pytest.approx(0.0))


def test_held_out_principles_are_never_drawn(constitution):
    held = [p.id for p in constitution.comparison[:8]]
    rows = [pair(SAFE, f"{UNSAFE} {i}") for i in range(10)]
    labels = labeller(constitution, principles_per_pair=2, held_out_principles=held).label(rows)
    assert {s.principle_id for label in labels for s in label.scores} == {
        p.id for p in constitution.comparison[8:]
    }


# -- the PM trained on the judge's labels ------------------------------------------------------------------


def judged_pairs(constitution) -> list[Preference]:
    """The marker judge's labels of 24 pairs, the clean answer on either side."""
    rows = []
    for i in range(24):
        clean, marked = f"Fruit is good, number {i}.", f"{MARKER}, stones are good, number {i}."
        a, b = (clean, marked) if i % 2 == 0 else (marked, clean)
        rows.append(
            ResponsePair(id=f"p{i}", prompt_id=f"q{i}", prompt=f"What is good? Ask {i}.", answer_a=a, answer_b=b, model_ref="m")
        )
    return labeller(constitution, principles_per_pair=1).label(rows)


@pytest.fixture(scope="module")
def judged_pm(constitution, tiny_model_dir, tmp_path_factory):
    """A PM trained on the marker judge's labels; returns its metrics and checkpoint."""
    from cai_lib.method.preference_model import PreferenceModelConfig, train_preference_model

    out = tmp_path_factory.mktemp("judged-pm") / "pm"
    # Tiny on purpose: 24 short pairs, batches of 4 and a high learning rate separate the marker in a
    # few dozen CPU steps of the two-layer random model.
    config = PreferenceModelConfig(learning_rate=3e-3, epochs=4, batch_size=4, eval_fraction=0.25, max_length=64)
    return train_preference_model(judged_pairs(constitution), [], str(tiny_model_dir), str(out), config), out


def human_choices() -> list[Preference]:
    """Held-out human comparisons that choose the clean answer (hh-rlhf's layout: the choice is A)."""
    return [
        Preference(
            id=f"h{i}",
            prompt=f"What is good? Question {i}.",
            answer_a=f"Fruit is good, number {50 + i}.",
            answer_b=f"{MARKER}, stones are good, number {50 + i}.",
            label=1.0,
            source="human",
        )
        for i in range(8)
    ]


def test_a_pm_trained_on_the_judges_labels_scores_the_answer_the_judge_prefers_higher(judged_pm):
    from cai_lib.method.preference_model import RewardScorer

    metrics, out = judged_pm
    scorer = RewardScorer.load(str(out))
    clean, marked = scorer.score(["What is good?"] * 2, ["Fruit is good, number 99.", f"{MARKER}, stones are good, number 99."])
    assert metrics.ai_accuracy == 1.0
    assert clean > marked


def test_the_pm_benchmark_counts_a_pair_right_when_the_pm_scores_the_humans_choice_higher(judged_pm):
    from cai_lib.method.evaluation.pm_scores import benchmark_outcomes, score_with_pm

    _, out = judged_pm
    _, _, scores = score_with_pm(str(out), [], [], human_choices(), EvaluationConfig())
    assert benchmark_outcomes(scores) == [1.0] * 8
    assert benchmark_outcomes([(2.0, 1.0), (0.0, 1.0), (1.0, 1.0)]) == [1.0, 0.0, 0.5]


def test_the_calibration_predicts_a_exactly_where_the_humans_choice_was_shown_as_a(judged_pm):
    from cai_lib.method.evaluation.pm_scores import benchmark_calibration, score_with_pm

    _, out = judged_pm
    pairs = human_choices()
    _, _, scores = score_with_pm(str(out), [], [], pairs, EvaluationConfig())
    calibration = benchmark_calibration(pairs, scores, "held-out", EvaluationConfig(seed=1))
    assert {p.chosen_shown_as for p in calibration.pairs} == {"A", "B"}
    assert all((p.predicted > 0.5) == (p.chosen_shown_as == "A") for p in calibration.pairs)
    assert all(b.observed == (1.0 if b.low >= 0.5 else 0.0) for b in calibration.bins)


def test_hard_labels_round_to_the_side_the_soft_label_favours_and_leave_out_ties():
    from cai_lib.method.preference_model import hardened

    pairs = [
        Preference(id=f"p{label}", prompt="Q?", answer_a="A.", answer_b="B.", label=label, source="ai")
        for label in (0.8, 0.2, 0.5)
    ]
    assert [(p.id, p.label) for p in hardened(pairs)] == [("p0.8", 1.0), ("p0.2", 0.0)]


def test_dpo_trains_towards_the_answer_the_label_prefers():
    from cai_lib.method.rl import dpo_pairs

    prefer_a = Preference(id="a", prompt="Q?", answer_a="A.", answer_b="B.", label=0.8, source="ai")
    prefer_b = prefer_a.model_copy(update={"id": "b", "label": 0.2})
    rows = dpo_pairs([prefer_a, prefer_b])
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [("A.", "B."), ("B.", "A.")]


# -- evaluation: win rates, their mirror, Elo, evasiveness ---------------------------------------------------


def answers_of(policy: str, texts: list[str], kind: str = "red_team") -> list[PolicyAnswer]:
    return [
        PolicyAnswer(
            id=stable_id(policy, kind, str(i)),
            policy=policy,
            model_ref=f"runs/{policy}",
            prompt_id=f"q{i}",
            prompt=f"Help me with thing {i}.",
            kind=kind,
            answer=text,
        )
        for i, text in enumerate(texts)
    ]


CLEAN = [f"Here is a safe way to do thing {i}." for i in range(6)]
MARKED = [f"{MARKER}, here is the dangerous way to do thing {i}." for i in range(6)]


def judged(constitution, first: str, second: str, answers: dict[str, list[str]]) -> list[Judgement]:
    """The marker judge's harmlessness judgements of two policies, `first` listed first."""
    judge = FeedbackLabeller(marker_judge(MARKER), constitution, "judge", EvaluationConfig().feedback())
    principle = constitution.comparison_principle("less-harmful")
    shown = answers_of(first, answers[first]) + answers_of(second, answers[second])
    return compare_policies(judge, "harmless", principle, shown)


@pytest.mark.parametrize("order", [("clean", "marked"), ("marked", "clean")], ids=["clean-first", "marked-first"])
def test_the_policy_the_judge_prefers_wins_soft_and_hard_and_its_rival_mirrors_it(constitution, order):
    judgements = judged(constitution, *order, {"clean": CLEAN, "marked": MARKED})
    result = sample_result().model_copy(update={"win_rates": win_rates("harmless", judgements, list(order))})
    won, lost = find_win_rate(result, "harmless", "clean", "marked"), find_win_rate(result, "harmless", "marked", "clean")
    assert (won.win_rate, won.hard_win_rate, won.decided) == (pytest.approx(P_PREFERRED), 1.0, 6)
    assert (lost.win_rate, lost.hard_win_rate) == (pytest.approx(1.0 - P_PREFERRED), 0.0)


def test_each_judgement_reads_both_orders_the_same_way(constitution):
    (first, *_) = judged(constitution, "marked", "clean", {"clean": CLEAN, "marked": MARKED})
    assert (first.policy_a, first.score.p_a_first, first.score.p_a_second) == (
        "marked",
        pytest.approx(1.0 - P_PREFERRED),
        pytest.approx(1.0 - P_PREFERRED),
    )


@pytest.mark.parametrize("order", [("clean", "marked"), ("marked", "clean")], ids=["clean-first", "marked-first"])
def test_the_policy_the_judge_prefers_gets_the_higher_elo(constitution, order):
    judgements = judged(constitution, *order, {"clean": CLEAN, "marked": MARKED})
    elo = criterion_elo("harmless", judgements, list(order), EvaluationConfig())
    assert elo["clean"] > elo["marked"]


def test_the_policy_whose_answers_the_judge_calls_evasive_has_the_higher_evasiveness(constitution):
    judge = FeedbackLabeller(
        marker_judge(MARKER, evasive_marker="can't"), constitution, "judge", EvaluationConfig().feedback()
    )
    shown = answers_of("evasive", ["I can't help."] * 3) + answers_of("engaged", ["Here is how, safely."] * 3)
    scored = [a.model_copy(update={"p_evasive": p}) for a, p in zip(shown, evasiveness(judge, shown, "Evasive?"))]
    summary = evasiveness_summaries(scored)
    assert summary["evasive"].mean_p_evasive == pytest.approx(P_PREFERRED)
    assert summary["engaged"].mean_p_evasive == pytest.approx(1.0 - P_PREFERRED)
    assert (summary["evasive"].evasive_fraction, summary["engaged"].evasive_fraction) == (1.0, 0.0)


# -- statistics on hand-written judgements -----------------------------------------------------------------


def test_the_soft_win_rate_is_the_mean_probability():
    assert win_rate_of("harmless", "a", "b", [0.9, 0.8, 0.5, 0.3]).win_rate == pytest.approx(0.625)


def test_the_hard_win_rate_counts_decided_comparisons_only():
    rate = win_rate_of("harmless", "a", "b", [0.9, 0.8, 0.5, 0.3])
    assert (rate.hard_win_rate, rate.decided) == (pytest.approx(2 / 3), 3)


def test_a_weak_but_consistent_judge_moves_the_hard_rate_and_not_the_soft_one():
    rate = win_rate_of("harmless", "a", "b", [0.52] * 20)
    assert (rate.win_rate, rate.hard_win_rate) == (pytest.approx(0.52), 1.0)


def test_the_hard_interval_is_wilsons_on_the_decided_count():
    rate = win_rate_of("harmless", "a", "b", [0.9, 0.8, 0.5, 0.3])
    # Wilson 95% for 2 of 3: centre (2/3 + z²/6)/(1 + z²/3), half-width z·√(2/27 + z²/36)/(1 + z²/3).
    assert (rate.hard_ci_low, rate.hard_ci_high) == (
        pytest.approx(0.2077, abs=1e-4),
        pytest.approx(0.9385, abs=1e-4),
    )


def test_wilson_interval_of_hand_numbers():
    assert wilson_interval(8, 10) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))


def test_only_ties_give_an_undecided_hard_rate():
    rate = win_rate_of("harmless", "a", "b", [0.5, 0.5])
    assert (rate.hard_win_rate, rate.decided, rate.hard_ci_low, rate.hard_ci_high) == (0.5, 0, 0.0, 1.0)


def judgement(label: float, k: int) -> Judgement:
    return hard_judgement(k, "rl-cai", "base", label)


def test_elo_is_fitted_to_hard_outcomes():
    judgements = [judgement(0.6, k) for k in range(3)] + [judgement(0.4, 3)]
    elo = criterion_elo("harmless", judgements, ["rl-cai", "base"], EvaluationConfig())
    hard = elo_ratings([("rl-cai", "base", 1.0)] * 3 + [("rl-cai", "base", 0.0)], prior_draws=1.0)
    assert elo == pytest.approx(hard)


# -- the promotion gate, as the register step reads the evaluation ----------------------------------------------

GATE = PromotionGate(min_harmless_win_rate=0.5, max_helpfulness_drop=0.05)
EPSILON = 1e-6


@pytest.mark.parametrize(
    ("harmless", "helpful", "promoted"),
    [
        (0.5 + EPSILON, 0.45 + EPSILON, True),
        (0.5 - EPSILON, 0.45 + EPSILON, False),
        (0.5 + EPSILON, 0.45 - EPSILON, False),
    ],
    ids=["just-above-both-bars", "just-below-the-harmlessness-bar", "just-below-the-helpfulness-bar"],
)
def test_the_gate_decides_at_its_bars(harmless, helpful, promoted):
    assert decide_promotion(harmless, helpful, GATE).promote is promoted


def evaluation_with(harmless_low: float, helpful_low: float, rival: str):
    """A result whose RL-CAI beats `rival` with these lower bounds; the mirror rows hold other numbers."""
    from cai_lib.method.evaluation.results import WinRate

    def rows(criterion: str, low: float) -> list[WinRate]:
        rate = {"criterion": criterion, "n": 40, "decided": 40, "hard_ci_low": 0.0, "hard_ci_high": 1.0}
        return [
            WinRate(policy_a=RL_CAI, policy_b=rival, win_rate=low + 0.1, ci_low=low, ci_high=1.0, hard_win_rate=low + 0.1, **rate),
            WinRate(policy_a=rival, policy_b=RL_CAI, win_rate=0.9 - low, ci_low=0.8 - low, ci_high=1.0, hard_win_rate=0.9 - low, **rate),
        ]

    return sample_result().model_copy(update={"win_rates": rows("harmless", harmless_low) + rows("helpful", helpful_low)})


@pytest.mark.parametrize(
    ("harmless_low", "helpful_low", "promoted"),
    [(0.5 + EPSILON, 0.45 + EPSILON, True), (0.5 - EPSILON, 0.45 + EPSILON, False), (0.5 + EPSILON, 0.45 - EPSILON, False)],
    ids=["just-above-both-bars", "just-below-the-harmlessness-bar", "just-below-the-helpfulness-bar"],
)
@pytest.mark.parametrize("champion", [None, "3"], ids=["against-sl-cai", "against-the-champion"])
def test_the_gate_reads_the_challengers_lower_bounds_against_its_rival(harmless_low, helpful_low, promoted, champion):
    rival = CHAMPION_POLICY if champion else SL_CAI
    harmless, helpful, against = gate_evidence(evaluation_with(harmless_low, helpful_low, rival), champion)
    assert (harmless.ci_low, helpful.ci_low, against) == (harmless_low, helpful_low, champion or SL_CAI)
    assert decide_promotion(harmless.ci_low, helpful.ci_low, GATE).promote is promoted


def test_a_policy_the_judge_prefers_passes_the_gate_and_one_it_does_not_fails(constitution):
    many = {"clean": CLEAN * 8, "marked": MARKED * 8}  # 48 prompts: intervals narrow enough to clear the bar
    decisions = {}
    for challenger, rival in (("clean", "marked"), ("marked", "clean")):
        answers = {RL_CAI: many[challenger], SL_CAI: many[rival]}
        judgements = judged(constitution, SL_CAI, RL_CAI, answers)
        rates = [
            rate.model_copy(update={"criterion": criterion})
            for criterion in ("harmless", "helpful")
            for rate in win_rates("harmless", judgements, [SL_CAI, RL_CAI])
        ]
        harmless, helpful, _ = gate_evidence(sample_result().model_copy(update={"win_rates": rates}), None)
        decisions[challenger] = decide_promotion(harmless.ci_low, helpful.ci_low, GATE).promote
    assert decisions == {"clean": True, "marked": False}


# -- SFT's loss mask -------------------------------------------------------------------------------------


def test_sft_trains_on_the_answer_tokens_and_not_the_prompt(tiny_model_dir, tmp_path):
    from cai_lib.engines.models import load_causal_lm
    from cai_lib.method.sft import SFTStageConfig, _trainer, chat_example

    model, tokenizer = load_causal_lm(str(tiny_model_dir))
    prompt, answer = "How do I pick a lock?", "I can't help with breaking into places."
    trainer = _trainer(
        model, tokenizer, [chat_example(prompt, answer)], SFTStageConfig(max_steps=1), tmp_path
    )
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    masked = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert answer in trained and prompt not in trained
    assert prompt in masked and answer not in masked


# -- RL against a reward that prefers a token ------------------------------------------------------------


class TokenReward:
    """A stand-in preference model (no model): reward 1 for a completion that is the word `target`."""

    def __init__(self, target: str):
        self.target = target

    def score_conversations(self, conversations):
        return [float(c[-1]["content"].strip() == self.target) for c in conversations]


def first_token_distribution(model, tokenizer, conversation):
    import torch

    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    with torch.no_grad():
        return torch.softmax(model(ids).logits[0, -1].float(), dim=-1)


@pytest.fixture(scope="module")
def peaked_policy_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its output layer scaled ×30: a random model's next-token distribution is
    nearly uniform over 49k tokens (nothing for RL to find); scaled, a few tokens carry most of it."""
    import torch

    from cai_lib.engines.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    out = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_rl_against_a_reward_that_prefers_a_token_raises_its_probability_and_the_reward(
    peaked_policy_dir, tmp_path
):
    from cai_lib.engines.models import load_tokenizer
    from cai_lib.method.rl import RLConfig, _trainer

    tokenizer = load_tokenizer(peaked_policy_dir, "peaked")
    conversation = [{"role": "user", "content": "Say one word."}]
    prompts = [PromptRecord(id=f"p{i}", prompt="Say one word.") for i in range(8)]
    # Small on purpose: one-token completions, 8 samples per prompt and no KL penalty, so that four
    # steps move the first token's distribution visibly.
    config = RLConfig(
        steps=4, batch_size=2, num_generations=8, max_new_tokens=1, learning_rate=1e-3, beta=0.0, use_cpu=True
    )
    trainer = _trainer(config, peaked_policy_dir, tokenizer, None, prompts, [], tmp_path)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    before = first_token_distribution(policy, tokenizer, conversation)
    # The target: the word the policy says about half the time, so that a few steps of 16 samples
    # see it often enough to learn from (a rarer word gives most steps no signal at all).
    target = tokenizer.decode([int(before.argmax())]).strip()
    trainer.reward_funcs[0].scorer = TokenReward(target)

    trainer.train()

    after = first_token_distribution(policy, tokenizer, conversation)
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    # Every token that is the word (with or without a leading space) earns the reward.
    word = [t for t in range(len(tokenizer)) if tokenizer.decode([t]).strip() == target]
    assert after[word].sum() > before[word].sum() + 0.2
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3
