"""Two runs' RL-CAI policies head to head, by the judge.

Each run's evaluation kept every policy's answers to its held-out prompts (`answers.jsonl`). On
the prompts both runs held out and both policies answered, the judge compares run B's answer with
run A's exactly as the evaluation compares two policies (`judging.compare_policies`: the
criterion's judging principle, both option orders averaged), and B's win rates against A are the
evaluation's soft and hard rates with their 95% Wilson intervals (`summary.win_rates`). No policy
is loaded: only the judge.

The prompts where the two answers differ most are those where the judge's preference is
strongest, |P(B better) - 0.5|, among the prompts whose two answers are not the same text.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from cai_lib.core.constitution import Constitution
from cai_lib.core.records import PromptKind
from cai_lib.engines.generation import load_backend
from cai_lib.method.evaluation.answers import in_own_process, in_this_process
from cai_lib.method.evaluation.config import CRITERIA, Criterion, EvaluationConfig, judging_principles
from cai_lib.method.evaluation.judging import compare_policies
from cai_lib.method.evaluation.results import Judgement, PolicyAnswer, WinRate
from cai_lib.method.evaluation.summary import win_rates
from cai_lib.method.feedback import FeedbackLabeller

# The two sides, as policy names in the judgements: the later run first, so P(a better) is P(B better).
RUN_B, RUN_A = "B", "A"


class HeadToHead(BaseModel):
    """Run B's policy against run A's on the held-out prompts both answered."""

    policy: str = Field(description="The policy compared, as both evaluations name it (e.g. rl-cai).")
    judge_ref: str
    principles: dict[Criterion, str] = Field(description="The judging principle id of each criterion.")
    prompts: dict[PromptKind, int] = Field(description="Prompts compared per set.")
    win_rates: list[WinRate] = Field(description="B's win rate against A, per criterion.")
    most_different: list[Judgement] = Field(
        description="The judgements where the judge preferred one answer most strongly (policy_a is B)."
    )


def shared_answers(
    answers_b: Sequence[PolicyAnswer], answers_a: Sequence[PolicyAnswer], policy: str
) -> tuple[list[PolicyAnswer], list[PolicyAnswer]]:
    """`policy`'s answers in each run to the judged prompts both runs answered, renamed B and A."""
    judged = set(CRITERIA.values())

    def own(answers: Sequence[PolicyAnswer]) -> dict[tuple[str, str], PolicyAnswer]:
        return {(a.kind, a.prompt_id): a for a in answers if a.policy == policy and a.kind in judged}

    mine, theirs = own(answers_b), own(answers_a)
    both = [key for key in mine if key in theirs]
    return (
        [mine[key].model_copy(update={"policy": RUN_B}) for key in both],
        [theirs[key].model_copy(update={"policy": RUN_A}) for key in both],
    )


def head_to_head(
    judge_ref: str,
    constitution: Constitution,
    config: EvaluationConfig,
    answers_b: Sequence[PolicyAnswer],
    answers_a: Sequence[PolicyAnswer],
    policy: str,
    top: int = 5,
) -> HeadToHead | None:
    """Judge run B's `policy` against run A's on the prompts both answered; None when there are none.
    The judge is loaded in a process of its own with vLLM (as the evaluation does)."""
    mine, theirs = shared_answers(answers_b, answers_a, policy)
    if not mine:
        return None
    kinds = {a.kind for a in mine}
    principles = judging_principles(constitution, config, [c for c, kind in CRITERIA.items() if kind in kinds])
    run = in_own_process if config.backend == "vllm" else in_this_process
    judgements = run(_judge, judge_ref, constitution, config, principles, mine + theirs)
    differing = [j for j in judgements if j.answer_a != j.answer_b]
    return HeadToHead(
        policy=policy,
        judge_ref=judge_ref,
        principles={c: p.id for c, p in principles.items()},
        prompts={kind: sum(a.kind == kind for a in mine) for kind in sorted(kinds)},
        win_rates=[
            rate
            for criterion in principles
            for rate in win_rates(criterion, judgements, [RUN_B, RUN_A])
            if rate.policy_a == RUN_B
        ],
        most_different=sorted(differing, key=lambda j: -abs(j.label - 0.5))[:top],
    )


def _judge(judge_ref, constitution, config, principles, answers) -> list[Judgement]:
    model = load_backend(judge_ref, config.backend, batch_size=config.batch_size, engine=config.engine)
    labeller = FeedbackLabeller(model, constitution, judge_ref, config.feedback())
    return [j for criterion, p in principles.items() for j in compare_policies(labeller, criterion, p, answers)]
