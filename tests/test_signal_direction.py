"""Tests that pin the direction of every signal: a judge that prefers a known answer yields labels,
evasiveness and win rates that point its way through both option orders and the ensemble; the
statistics on hand-written judgements come out at known numbers; SFT's loss covers the answer and
not the prompt. Inverting a label, an unswap, a Yes/No or the prompt mask fails one of them."""

from __future__ import annotations

import math
import re

import pytest

from cai_lib.core.constitution import load_constitution
from cai_lib.core.records import PrincipleScore, ResponsePair
from cai_lib.method import feedback
from cai_lib.method.evaluation.config import EvaluationConfig
from cai_lib.method.evaluation.elo import elo_ratings, wilson_interval
from cai_lib.method.evaluation.judging import evasiveness
from cai_lib.method.evaluation.results import Judgement, PolicyAnswer
from cai_lib.method.evaluation.summary import criterion_elo, win_rate_of
from cai_lib.method.feedback import FeedbackConfig, FeedbackLabeller

SAFE = "I won't help with that, because it could hurt someone; here is a safer way instead."
UNSAFE = "Sure, here is exactly how to do it."
OPTION = re.compile(r"^\(([AB])\) (.*)$", re.MULTILINE)


class RiggedJudge:
    """A stand-in backend (no model) whose log-probabilities prefer the option holding `preferred`
    by 3 nats, wherever it is shown; `generate` (chain of thought) says nothing."""

    def __init__(self, preferred: str):
        self.preferred = preferred

    def generate(self, conversations, params, shared_prefix=None):
        return ["" for _ in conversations]

    def score_options(self, contexts, options, shared_prefix=None):
        scores = []
        for context in contexts:
            question = next(m["content"] for m in reversed(context) if m["role"] == "user")
            shown = dict(OPTION.findall(question))
            first_is_preferred = shown["A"].strip() == self.preferred
            scores.append([0.0, -3.0] if first_is_preferred else [-3.0, 0.0])
        return scores


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


def labeller(constitution, preferred: str = SAFE, **settings) -> FeedbackLabeller:
    return FeedbackLabeller(RiggedJudge(preferred), constitution, "rigged", FeedbackConfig(**settings))


P_PREFERRED = 1.0 / (1.0 + math.exp(-3.0))  # softmax of (0, -3): 0.9526


# -- labels ------------------------------------------------------------------------------------------


def test_a_judge_preferring_answer_a_labels_it_better(constitution):
    (label,) = labeller(constitution, principles_per_pair=1).label([pair(SAFE, UNSAFE)])
    assert label.label == pytest.approx(P_PREFERRED)


def test_a_judge_preferring_answer_b_labels_a_worse(constitution):
    (label,) = labeller(constitution, principles_per_pair=1).label([pair(UNSAFE, SAFE)])
    assert label.label == pytest.approx(1.0 - P_PREFERRED)


def test_the_preference_holds_in_both_option_orders(constitution):
    (label,) = labeller(constitution, principles_per_pair=1).label([pair(SAFE, UNSAFE)])
    assert [label.scores[0].p_a_first, label.scores[0].p_a_second] == pytest.approx([P_PREFERRED] * 2)


def test_the_ensemble_of_several_principles_keeps_the_direction(constitution):
    (label,) = labeller(constitution, principles_per_pair=4).label([pair(SAFE, UNSAFE)])
    assert len(label.scores) == 4 and label.label == pytest.approx(P_PREFERRED)


def test_an_inverted_unswap_would_leave_the_rigged_judge_undecided(constitution, monkeypatch):
    # What the tests above catch: reading the swapped order without unswapping it cancels the signal.
    monkeypatch.setattr(feedback, "unswapped", lambda p: p)
    (label,) = labeller(constitution, principles_per_pair=1).label([pair(SAFE, UNSAFE)])
    assert label.label == pytest.approx(0.5)


def test_chain_of_thought_labels_keep_the_direction_inside_the_clamp(constitution):
    (label,) = labeller(constitution, principles_per_pair=1, cot=True).label([pair(SAFE, UNSAFE)])
    assert label.label == pytest.approx(0.6)


def test_evaluation_reads_chain_of_thought_unclamped(constitution):
    judge = FeedbackLabeller(RiggedJudge(SAFE), constitution, "rigged", EvaluationConfig(cot=True).feedback())
    (label,) = judge.label([pair(SAFE, UNSAFE)])
    assert label.label == pytest.approx(P_PREFERRED)


def test_held_out_principles_are_never_drawn(constitution):
    held = [p.id for p in constitution.comparison[:8]]
    rows = [pair(SAFE, f"{UNSAFE} {i}") for i in range(10)]
    labels = labeller(constitution, principles_per_pair=2, held_out_principles=held).label(rows)
    assert {s.principle_id for label in labels for s in label.scores} == {
        p.id for p in constitution.comparison[8:]
    }


# -- evasiveness ---------------------------------------------------------------------------------------


def answers(*texts: str) -> list[PolicyAnswer]:
    return [
        PolicyAnswer(
            id=f"a{i}",
            policy="p",
            model_ref="m",
            prompt_id=f"q{i}",
            prompt="Help me.",
            kind="red_team",
            answer=t,
        )
        for i, t in enumerate(texts)
    ]


def test_a_judge_that_answers_yes_rates_every_answer_evasive(constitution):
    judge = FeedbackLabeller(RiggedJudge("Yes"), constitution, "rigged", EvaluationConfig().feedback())
    assert evasiveness(judge, answers("I can't.", "Here is how."), "Is it evasive?") == pytest.approx(
        [P_PREFERRED] * 2
    )


def test_a_judge_that_answers_no_rates_no_answer_evasive(constitution):
    judge = FeedbackLabeller(RiggedJudge("No"), constitution, "rigged", EvaluationConfig().feedback())
    assert evasiveness(judge, answers("I can't."), "Is it evasive?") == pytest.approx([1.0 - P_PREFERRED])


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
    score = PrincipleScore(principle_id="less-harmful", p_a_first=label, p_a_second=label)
    return Judgement(
        id=f"j{k}",
        criterion="harmless",
        principle_id="less-harmful",
        prompt_id=f"q{k}",
        prompt="Help me.",
        policy_a="rl-cai",
        policy_b="base",
        answer_a="x",
        answer_b="y",
        label=label,
        score=score,
    )


def test_elo_is_fitted_to_hard_outcomes():
    judgements = [judgement(0.6, k) for k in range(3)] + [judgement(0.4, 3)]
    elo = criterion_elo("harmless", judgements, ["rl-cai", "base"], EvaluationConfig())
    hard = elo_ratings([("rl-cai", "base", 1.0)] * 3 + [("rl-cai", "base", 0.0)], prior_draws=1.0)
    assert elo == pytest.approx(hard)


def test_the_policy_that_wins_gets_the_higher_elo():
    elo = criterion_elo(
        "harmless", [judgement(0.7, k) for k in range(4)], ["rl-cai", "base"], EvaluationConfig()
    )
    assert elo["rl-cai"] > elo["base"]


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
    from cai_lib.core.records import PromptRecord
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
