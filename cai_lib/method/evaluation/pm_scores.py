"""PM scores: the preference model's score of every answer and of every revision in the SL-CAI
traces (the paper's "PM score" axis, Figure 5), its accuracy on human comparisons, and its
calibration against human choices (Figure 9): on the PM benchmark when one is set, else the one its
training recorded on its held-out human pairs.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

from cai_lib.core.names import METRICS_FILE
from cai_lib.core.records import Preference, Trace
from cai_lib.method.evaluation.answers import in_chunks
from cai_lib.method.evaluation.config import EvaluationConfig
from cai_lib.method.evaluation.elo import agreement
from cai_lib.method.evaluation.results import CountScore, PMAccuracy, PolicyAnswer, RoundScore
from cai_lib.method.preference_model import Calibration, human_calibration


def pm_calibration(reward_ref: str) -> Calibration | None:
    """The calibration against human choices the PM stage recorded in its checkpoint's metrics.json, if any."""
    from cai_lib.engines.models import resolve_model
    from cai_lib.method.preference_model import PreferenceModelMetrics

    path = resolve_model(reward_ref) / METRICS_FILE
    if not path.is_file():
        return None
    return PreferenceModelMetrics.model_validate_json(path.read_text()).calibration


def benchmark_outcomes(scores: Sequence[tuple[float, float]]) -> list[float]:
    """Per human pair (the PM's scores of the human's choice and of the other answer): 1 when the PM
    scores the choice higher, 0 when lower, 0.5 on a tie."""
    return [1.0 if chosen > other else 0.0 if chosen < other else 0.5 for chosen, other in scores]


def benchmark_calibration(
    benchmark: Sequence[Preference], scores: Sequence[tuple[float, float]], source: str, config: EvaluationConfig
) -> Calibration:
    """The PM's calibration against the human choices of the PM benchmark (held out of all training)."""
    return human_calibration(
        [pair.id for pair in benchmark],
        [chosen for chosen, _ in scores],
        [other for _, other in scores],
        source,
        config.seed,
        config.calibration_bins,
    )


class TraceScores(NamedTuple):
    """What the PM makes of the SL-CAI traces' revisions."""

    deltas: dict[str, list[float]]  # principle id -> PM(revision) - PM(answer it revised)
    rounds: list[RoundScore]  # mean PM score after each round; round 0 is the initial answer
    counts: list[CountScore]  # mean PM score of final revisions by distinct principles drawn


def score_with_pm(
    reward_ref: str,
    answers: list[PolicyAnswer],
    traces: Sequence[Trace],
    benchmark: Sequence[Preference],
    config: EvaluationConfig,
) -> tuple[list[PolicyAnswer], TraceScores, list[tuple[float, float]]]:
    """The answers with their PM scores; the PM's view of the traces: per principle the change
    each revision made, per round the mean score (the paper's Fig. 5), per number of distinct
    principles the mean score of the final revision; and per human `benchmark` pair the PM's
    scores of the human's choice and of the other answer."""
    from cai_lib.method.preference_model import RewardScorer

    scorer = RewardScorer.load(reward_ref, batch_size=config.batch_size)
    texts = (
        [(a.prompt, a.answer) for a in answers]
        + [(trace.prompt, text) for trace in traces for text in trace_answers(trace)]
        + [(pair.prompt, answer) for pair in benchmark for answer in (pair.chosen, pair.rejected)]
    )
    scores = in_chunks(
        texts,
        4 * config.batch_size,
        lambda chunk: scorer.score([p for p, _ in chunk], [a for _, a in chunk]),
        "PM scores",
    )
    scored = [a.model_copy(update={"pm_score": s}) for a, s in zip(answers, scores)]
    on_traces = len(texts) - 2 * len(benchmark)
    pairs = scores[on_traces:]
    return scored, trace_scores(traces, scores[len(answers) : on_traces]), list(zip(pairs[::2], pairs[1::2]))


def pm_accuracy(source: str, outcomes: Sequence[float]) -> PMAccuracy:
    """Accuracy and its Wilson 95% interval from per-pair outcomes (1 right, 0 wrong, 0.5 tie)."""
    a = agreement(outcomes)
    return PMAccuracy(
        source=source, n=a.n, agreed=a.agreed, accuracy=a.rate, ci_low=a.ci_low, ci_high=a.ci_high
    )


def trace_answers(trace: Trace) -> list[str]:
    """The initial answer, then the revision of each round."""
    return [trace.initial_answer, *(round_.revision for round_ in trace.rounds)]


def trace_scores(traces: Sequence[Trace], scores: Sequence[float]) -> TraceScores:
    """Group the PM scores of `trace_answers` of each trace (in order) by principle, round and count."""
    deltas: dict[str, list[float]] = defaultdict(list)
    by_round: dict[int, list[float]] = defaultdict(list)
    by_count: dict[int, list[float]] = defaultdict(list)
    position = 0
    for trace in traces:
        mine = scores[position : position + 1 + len(trace.rounds)]
        position += len(mine)
        for index, score in enumerate(mine):
            by_round[index].append(score)
        for round_, before, after in zip(trace.rounds, mine, mine[1:]):
            deltas[round_.principle_id].append(after - before)
        if trace.rounds:
            by_count[len({r.principle_id for r in trace.rounds})].append(mine[-1])
    return TraceScores(
        dict(deltas),
        [RoundScore(round=k, mean=statistics.fmean(v), n=len(v)) for k, v in sorted(by_round.items())],
        [CountScore(principles=k, mean=statistics.fmean(v), n=len(v)) for k, v in sorted(by_count.items())],
    )
