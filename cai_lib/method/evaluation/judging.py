"""The judge: pairwise comparisons of the policies' answers, in both A/B orders, and evasiveness.

The judge compares two answers under one comparison principle with the labeller of
`cai_lib.method.feedback` (chain-of-thought judgements are not clamped here). Evasiveness (§4.4)
is a Yes/No multiple-choice question per answer, scored from the option log-probabilities in
both orders (no text is generated). Judgements between identical answers are exactly a draw by
construction (both orders are averaged).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations

from cai_lib.core.constitution import ComparisonPrinciple, Constitution
from cai_lib.core.records import PrincipleScore, stable_id
from cai_lib.core.transcripts import render_transcript
from cai_lib.engines.generation import load_backend
from cai_lib.method.evaluation.answers import in_chunks
from cai_lib.method.evaluation.config import CRITERIA, VLLM_CHUNK_ROWS, Criterion, EvaluationConfig
from cai_lib.method.evaluation.results import Judgement, PolicyAnswer
from cai_lib.method.feedback import (
    FeedbackLabeller,
    as_transcript,
    comparison_question,
    order_debiased,
    unswapped,
)


def judge(
    judge_ref: str,
    constitution: Constitution,
    principles: dict[Criterion, ComparisonPrinciple],
    answers: list[PolicyAnswer],
    config: EvaluationConfig,
) -> tuple[list[PolicyAnswer], list[Judgement]]:
    """With the feedback model: P(evasive) of every answer, and a judgement of every two policies'
    answers to every prompt under the criterion's principle."""
    model = load_backend(judge_ref, config.backend, batch_size=config.batch_size, engine=config.engine)
    # Shown only the examples of its own principles, which training labels never saw.
    own = [p.id for p in principles.values()]
    labeller = FeedbackLabeller(model, constitution, judge_ref, config.feedback(own))
    evasive = evasiveness(labeller, answers, config.evasiveness_question)
    judged = [a.model_copy(update={"p_evasive": p}) for a, p in zip(answers, evasive)]
    judgements: list[Judgement] = []
    for criterion, principle in principles.items():
        judgements += compare_policies(labeller, criterion, principle, judged)
    return judged, judgements


def evasiveness(labeller: FeedbackLabeller, answers: Sequence[PolicyAnswer], question: str) -> list[float]:
    """P(evasive) of each answer: the feedback model's P(Yes) to `question`, mean of both option orders."""
    return yes_probabilities(labeller, [(a.prompt, a.answer) for a in answers], question, "evasiveness")


def yes_probabilities(
    labeller: FeedbackLabeller, exchanges: Sequence[tuple[str, str]], question: str, description: str
) -> list[float]:
    """The feedback model's P(Yes) to the Yes/No `question` about each (prompt, answer) exchange,
    read from the option log-probabilities with Yes shown first and then second, and averaged."""
    labels = labeller.config.option_labels
    questions = []
    for prompt, answer in exchanges:
        conversation = as_transcript(prompt) + render_transcript([{"role": "assistant", "content": answer}])
        for options in (("Yes", "No"), ("No", "Yes")):
            questions.append(
                comparison_question(conversation, question, *options, labels, labeller.config.cot)
            )
    probabilities, _ = first_option_probabilities(labeller, questions, description)
    return [
        order_debiased(probabilities[k], unswapped(probabilities[k + 1]))
        for k in range(0, len(probabilities), 2)
    ]


def compare_policies(
    labeller: FeedbackLabeller,
    criterion: Criterion,
    principle: ComparisonPrinciple,
    answers: list[PolicyAnswer],
) -> list[Judgement]:
    """One judgement per prompt of the criterion's set and per two policies (in evaluation order)."""
    labels, cot = labeller.config.option_labels, labeller.config.cot
    by_prompt: dict[str, dict[str, PolicyAnswer]] = defaultdict(dict)
    for answer in answers:
        if answer.kind == CRITERIA[criterion]:
            by_prompt[answer.prompt_id][answer.policy] = answer
    names = list(dict.fromkeys(a.policy for a in answers))
    rows = [(by_prompt[pid][a], by_prompt[pid][b]) for pid in by_prompt for a, b in combinations(names, 2)]
    questions = [
        comparison_question(x.prompt, principle.question, first, second, labels, cot)
        for x, y in rows
        for first, second in ((x.answer, y.answer), (y.answer, x.answer))
    ]
    probabilities, reasonings = first_option_probabilities(labeller, questions, f"{criterion} judgements")
    judgements = []
    for k, (x, y) in enumerate(rows):
        score = PrincipleScore(
            principle_id=principle.id,
            p_a_first=probabilities[2 * k],
            p_a_second=unswapped(probabilities[2 * k + 1]),
            reasoning=[r for r in reasonings[2 * k : 2 * k + 2] if r is not None],
        )
        judgements.append(
            Judgement(
                id=stable_id(criterion, principle.id, x.prompt_id, x.policy, y.policy),
                criterion=criterion,
                principle_id=principle.id,
                prompt_id=x.prompt_id,
                prompt=x.prompt,
                policy_a=x.policy,
                policy_b=y.policy,
                answer_a=x.answer,
                answer_b=y.answer,
                label=order_debiased(score.p_a_first, score.p_a_second),
                score=score,
            )
        )
    return judgements


def first_option_probabilities(
    labeller: FeedbackLabeller, questions: list[str], description: str
) -> tuple[list[float], list[str | None]]:
    """The labeller's P(first option) for each question and its chain of thought (None without
    cot), asked a chunk at a time under a progress bar."""
    pairs = in_chunks(
        questions,
        VLLM_CHUNK_ROWS if labeller.config.backend == "vllm" else 4 * labeller.config.batch_size,
        lambda chunk: list(zip(*labeller.first_option_probabilities(chunk))),
        description,
    )
    return [p for p, _ in pairs], [r for _, r in pairs]
