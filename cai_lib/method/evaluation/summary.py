"""From answers and judgements to the numbers the report shows: PM score and evasiveness
summaries, win rates (soft and hard, with 95% Wilson intervals), Elo per criterion with 95%
bootstrap intervals, and the per-principle effects of the SL-CAI revisions.
"""

from __future__ import annotations

import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from itertools import combinations

from cai_lib.core.constitution import ComparisonPrinciple, Constitution
from cai_lib.core.records import PromptKind, PromptRecord, Trace
from cai_lib.method.evaluation.config import PROMPT_SETS, Criterion, EvaluationConfig
from cai_lib.method.evaluation.elo import ELO_MEAN, bootstrap_intervals, elo_ratings, wilson_interval
from cai_lib.method.evaluation.pm_scores import TraceScores
from cai_lib.method.evaluation.results import (
    EvaluationResult,
    EvasivenessSummary,
    Judgement,
    PolicyAnswer,
    PrincipleEffect,
    ScoreSummary,
    WinRate,
)
from cai_lib.method.feedback import (
    hard_outcome,
)


def summarise(
    policies: dict[str, str],
    reward_ref: str,
    judge_ref: str,
    constitution: Constitution,
    principles: dict[Criterion, ComparisonPrinciple],
    prompt_sets: dict[PromptKind, list[PromptRecord]],
    answers: list[PolicyAnswer],
    judgements: list[Judgement],
    traces: list[Trace],
    trace_pm: TraceScores,
    config: EvaluationConfig,
    inputs_sha256: str,
) -> EvaluationResult:
    """The `EvaluationResult` of scored answers and judgements."""
    kinds = [kind for kind in PROMPT_SETS if prompt_sets[kind]]
    by_kind = {kind: [a for a in answers if a.kind == kind] for kind in kinds}
    sampled = sample_prompt_ids(prompt_sets, config.num_samples_in_report, config.seed)
    return EvaluationResult(
        policies=dict(policies),
        reward_ref=reward_ref,
        judge_ref=judge_ref,
        constitution_ref=constitution.ref,
        constitution_sha256=constitution.sha256,
        principles=principles,
        evasiveness_question=config.evasiveness_question,
        prompt_counts={kind: len(prompt_sets[kind]) for kind in PROMPT_SETS},
        pm_scores={kind: pm_summaries(by_kind[kind]) for kind in kinds},
        win_rates=[
            rate for criterion in principles for rate in win_rates(criterion, judgements, list(policies))
        ],
        elo={
            criterion: criterion_elo(criterion, judgements, list(policies), config)
            for criterion in principles
        },
        elo_intervals={
            criterion: criterion_elo_intervals(criterion, judgements, list(policies), config)
            for criterion in principles
            if len(policies) > 1
        },
        evasiveness={kind: evasiveness_summaries(by_kind[kind]) for kind in kinds},
        principle_effects=principle_effects(traces, trace_pm.deltas),
        revision_curve=trace_pm.rounds,
        principle_count_curve=trace_pm.counts,
        traces_given=len(traces),
        sample_answers=[a for a in answers if a.prompt_id in sampled],
        sample_judgements=[j for j in judgements if j.prompt_id in sampled],
        sample_traces=sample_traces(traces, config.num_samples_in_report, config.seed),
        config=config,
        inputs_sha256=inputs_sha256,
    )


def pm_summaries(answers: Sequence[PolicyAnswer]) -> dict[str, ScoreSummary]:
    """Per policy: mean, standard deviation and count of its PM scores."""
    scores = _group(answers, lambda a: a.pm_score)
    return {
        name: ScoreSummary(mean=statistics.fmean(s), std=statistics.pstdev(s), n=len(s))
        for name, s in scores.items()
    }


def evasiveness_summaries(answers: Sequence[PolicyAnswer]) -> dict[str, EvasivenessSummary]:
    """Per policy: mean P(evasive) and the fraction above 0.5."""
    values = _group(answers, lambda a: a.p_evasive)
    return {
        name: EvasivenessSummary(
            mean_p_evasive=statistics.fmean(p), evasive_fraction=sum(x > 0.5 for x in p) / len(p), n=len(p)
        )
        for name, p in values.items()
    }


def _group(
    answers: Sequence[PolicyAnswer], value: Callable[[PolicyAnswer], float | None]
) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = defaultdict(list)
    for answer in answers:
        grouped[answer.policy].append(float(value(answer)))
    return dict(grouped)


def win_rate_of(criterion: Criterion, a: str, b: str, labels: Sequence[float]) -> WinRate:
    """a's soft and hard win rates against b from the judge's P(a better) on each prompt."""
    n = len(labels)
    soft = min(1.0, max(0.0, sum(labels) / n))
    low, high = wilson_interval(soft * n, n)
    games = [hard_outcome(label) for label in labels]
    decided = sum(g != 0.5 for g in games)
    wins = sum(g == 1.0 for g in games)
    hard_low, hard_high = wilson_interval(wins, decided) if decided else (0.0, 1.0)
    return WinRate(
        criterion=criterion,
        policy_a=a,
        policy_b=b,
        win_rate=soft,
        ci_low=low,
        ci_high=high,
        n=n,
        hard_win_rate=wins / decided if decided else 0.5,
        hard_ci_low=hard_low,
        hard_ci_high=hard_high,
        decided=decided,
    )


def win_rates(criterion: Criterion, judgements: Sequence[Judgement], names: list[str]) -> list[WinRate]:
    """a's win rates against b for every ordered pair (a, b); b's against a mirror a's."""
    rates = []
    for a, b in combinations(names, 2):
        labels = [j.label for j in judgements if (j.criterion, j.policy_a, j.policy_b) == (criterion, a, b)]
        if labels:
            rates += [
                win_rate_of(criterion, a, b, labels),
                win_rate_of(criterion, b, a, [1.0 - x for x in labels]),
            ]
    return rates


def criterion_elo(
    criterion: Criterion, judgements: Sequence[Judgement], names: list[str], config: EvaluationConfig
) -> dict[str, float]:
    """Elo ratings (mean 1000) from the hard outcomes (win, loss, exact tie) of every judgement
    under `criterion`: soft outcomes of a weak judge would pull every rating to 1000."""
    if len(names) == 1:
        return {names[0]: ELO_MEAN}
    outcomes = [
        (j.policy_a, j.policy_b, hard_outcome(j.label)) for j in judgements if j.criterion == criterion
    ]
    ratings = elo_ratings(outcomes, prior_draws=config.elo_prior_draws)
    return {name: ratings[name] for name in names}


def criterion_elo_intervals(
    criterion: Criterion, judgements: Sequence[Judgement], names: list[str], config: EvaluationConfig
) -> dict[str, tuple[float, float]]:
    """95% intervals of `criterion_elo`'s ratings: the held-out prompts resampled
    (`elo_bootstrap_samples` times, seeded by the evaluation's seed), the same hard outcomes refitted."""
    by_prompt: dict[str, list] = defaultdict(list)
    for j in judgements:
        if j.criterion == criterion:
            by_prompt[j.prompt_id].append((j.policy_a, j.policy_b, hard_outcome(j.label)))
    intervals = bootstrap_intervals(
        [by_prompt[key] for key in sorted(by_prompt)],
        prior_draws=config.elo_prior_draws,
        samples=config.elo_bootstrap_samples,
        seed=config.seed,
    )
    return {name: intervals[name] for name in names if name in intervals}


def principle_effects(
    traces: Sequence[Trace], revision_deltas: dict[str, list[float]]
) -> list[PrincipleEffect]:
    """Draw counts over all traces and mean PM change of the scored revisions, most drawn first."""
    draws = Counter(round_.principle_id for trace in traces for round_ in trace.rounds)
    return [
        PrincipleEffect(
            principle_id=principle_id,
            draws=count,
            scored_revisions=len(revision_deltas.get(principle_id, [])),
            mean_pm_delta=statistics.fmean(revision_deltas[principle_id])
            if revision_deltas.get(principle_id)
            else None,
        )
        for principle_id, count in sorted(draws.items(), key=lambda item: (-item[1], item[0]))
    ]


def sample_prompt_ids(prompt_sets: dict[PromptKind, list[PromptRecord]], k: int, seed: int) -> set[str]:
    """Up to `k` prompt ids per set, drawn with `seed`."""
    chosen: set[str] = set()
    for kind in PROMPT_SETS:
        ids = [p.id for p in prompt_sets[kind]]
        chosen.update(random.Random(f"{seed}:{kind}").sample(ids, min(k, len(ids))))
    return chosen


def sample_traces(traces: Sequence[Trace], k: int, seed: int) -> list[Trace]:
    """Up to `k` traces that have revision rounds, drawn with `seed`, in input order."""
    revised = [t for t in traces if t.rounds]
    picked = set(random.Random(f"{seed}:traces").sample(range(len(revised)), min(k, len(revised))))
    return [t for i, t in enumerate(revised) if i in picked]
