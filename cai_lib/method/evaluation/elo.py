"""Elo ratings from pairwise comparisons, and confidence intervals for win rates.

The paper (Bai et al. 2022, §4.4 and Figure 3) reports harmlessness and helpfulness as Elo
scores fitted to pairwise comparisons between models. Here the comparisons are the feedback
model's soft judgements: an outcome is P(a better than b) in [0, 1], counted as that fraction of
a win for `a` and the rest for `b` (a hard win is 1, a draw 0.5).

Ratings are the maximum-likelihood strengths of the Bradley-Terry model on the Elo scale,

    P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400)),

so a 75% win rate is a gap of 400·log10(3) ≈ 191 points. They are anchored so that their mean
is 1000. The fit is Hunter's (2004) minorisation-maximisation iteration, which accepts
fractional wins unchanged.

A policy that wins (or loses) every comparison has an infinite maximum-likelihood rating. To
keep small evaluations finite, `prior_draws` virtual drawn games are added between every two
policies (a symmetric prior that shrinks gaps a little toward 0; with 100 real games at 75% and
one virtual draw the gap is 189 points instead of 191). With `prior_draws=0` the fit is the
plain maximum-likelihood estimate and data for which it does not exist is refused.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import NamedTuple

ELO_SCALE = 400.0 / math.log(10.0)  # rating points per unit of natural-log strength
ELO_MEAN = 1000.0

Outcome = tuple[str, str, float]


def elo_ratings(
    outcomes: Sequence[Outcome],
    prior_draws: float = 1.0,
    max_iterations: int = 10_000,
    tolerance: float = 1e-10,
) -> dict[str, float]:
    """Elo ratings (mean 1000) fitted by maximum likelihood to `outcomes`.

    Each outcome is `(a, b, s)` with `s` = the share of the game won by `a` (1 win, 0 loss,
    0.5 draw, anything between for a soft judgement). Policies are returned in order of first
    appearance. Raises `ValueError` for an outcome outside [0, 1], a policy compared with
    itself, or (only with `prior_draws=0`) data where some ratings would be infinite.
    """
    names = _names(outcomes)
    if len(names) < 2:
        return {name: ELO_MEAN for name in names}
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    wins = [[0.0] * n for _ in range(n)]
    for a, b, share in outcomes:
        i, j = index[a], index[b]
        wins[i][j] += share
        wins[j][i] += 1.0 - share
    if prior_draws > 0:
        for i in range(n):
            for j in range(n):
                if i != j:
                    wins[i][j] += prior_draws / 2.0
    elif not _strongly_connected(wins):
        raise ValueError(
            "ratings are unbounded: some policies won (or lost) every comparison against the rest; "
            "use prior_draws > 0"
        )
    strengths = _fit_strengths(wins, max_iterations, tolerance)
    logs = [math.log(s) for s in strengths]
    mean_log = sum(logs) / n
    return {name: ELO_MEAN + ELO_SCALE * (log - mean_log) for name, log in zip(names, logs)}


def bootstrap_intervals(
    groups: Sequence[Sequence[Outcome]],
    prior_draws: float = 1.0,
    samples: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the Elo ratings: `groups` are the outcomes of each prompt
    (every comparison made on it), resampled with replacement `samples` times, the ratings refitted
    each time, and the (1 - level) / 2 and (1 + level) / 2 quantiles of each policy's ratings taken.
    Prompts, not single comparisons, are resampled because the comparisons on one prompt share its
    answers. Seeded, so an evaluation's intervals are reproducible."""
    groups = [list(group) for group in groups if group]
    if not groups:
        return {}
    rng = random.Random(seed)
    draws: dict[str, list[float]] = {name: [] for name in _names([o for g in groups for o in g])}
    for _ in range(samples):
        chosen = [outcome for _ in groups for outcome in groups[rng.randrange(len(groups))]]
        ratings = elo_ratings(chosen, prior_draws=prior_draws)
        for name, values in draws.items():
            values.append(ratings.get(name, ELO_MEAN))
    low, high = (1.0 - level) / 2.0, (1.0 + level) / 2.0
    return {name: (_quantile(values, low), _quantile(values, high)) for name, values in draws.items()}


def _quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values` by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def expected_score(rating_a: float, rating_b: float) -> float:
    """P(a beats b) under the Elo model for the two ratings."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def elo_gap(win_rate: float) -> float:
    """The rating difference R_a - R_b at which a wins with probability `win_rate` (0 < win_rate < 1)."""
    return 400.0 * math.log10(win_rate / (1.0 - win_rate))


class Agreement(NamedTuple):
    """How often a judge agreed over `n` comparisons, with the Wilson 95% interval of the rate."""

    n: int
    agreed: float
    rate: float
    ci_low: float
    ci_high: float


def agreement(outcomes: Sequence[float]) -> Agreement:
    """The agreement of per-comparison outcomes (1 agreed, 0 not, 0.5 a tie counted half)."""
    agreed = sum(outcomes)
    low, high = wilson_interval(agreed, len(outcomes))
    return Agreement(len(outcomes), agreed, agreed / len(outcomes), low, high)


def wilson_interval(successes: float, trials: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (default 95%): `successes` of `trials`.

    Soft successes are allowed (a sum of probabilities); the interval then treats the mean as
    an observed proportion over `trials` comparisons. With no trials it is the whole [0, 1].
    """
    if trials <= 0:
        return 0.0, 1.0
    if not 0.0 <= successes <= trials:
        raise ValueError(f"successes {successes} outside [0, {trials}]")
    p = successes / trials
    z2 = z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def _names(outcomes: Sequence[Outcome]) -> list[str]:
    names: dict[str, None] = {}
    for number, (a, b, share) in enumerate(outcomes, start=1):
        if a == b:
            raise ValueError(f"outcome {number}: '{a}' compared with itself")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"outcome {number}: share {share} outside [0, 1]")
        names.setdefault(a)
        names.setdefault(b)
    return list(names)


def _fit_strengths(wins: list[list[float]], max_iterations: int, tolerance: float) -> list[float]:
    """Bradley-Terry strengths by minorisation-maximisation: π_i ← W_i / Σ_j n_ij / (π_i + π_j)."""
    n = len(wins)
    games = [[wins[i][j] + wins[j][i] for j in range(n)] for i in range(n)]
    total_wins = [sum(row) for row in wins]
    strengths = [1.0] * n
    for _ in range(max_iterations):
        updated = [
            total_wins[i]
            / sum(games[i][j] / (strengths[i] + strengths[j]) for j in range(n) if j != i and games[i][j])
            for i in range(n)
        ]
        # Strengths are defined up to a common factor; fix their geometric mean at 1.
        scale = math.exp(sum(math.log(s) for s in updated) / n)
        updated = [s / scale for s in updated]
        change = max(abs(math.log(u) - math.log(s)) for u, s in zip(updated, strengths))
        strengths = updated
        if change < tolerance:
            break
    return strengths


def _strongly_connected(wins: list[list[float]]) -> bool:
    """Whether every policy beat, directly or through a chain of wins, every other (the condition
    under which the maximum-likelihood ratings exist and are finite)."""
    n = len(wins)

    def reachable(edge) -> set[int]:
        seen, frontier = {0}, [0]
        while frontier:
            i = frontier.pop()
            for j in range(n):
                if j not in seen and edge(i, j):
                    seen.add(j)
                    frontier.append(j)
        return seen

    return (
        len(reachable(lambda i, j: wins[i][j] > 0)) == n and len(reachable(lambda i, j: wins[j][i] > 0)) == n
    )
