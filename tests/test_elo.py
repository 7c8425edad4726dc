"""The Elo fit and the win-rate intervals, on hand-written outcomes."""

from __future__ import annotations

import pytest

from cai_lib.method.evaluation.elo import (
    bootstrap_intervals,
    elo_gap,
    elo_ratings,
    expected_score,
    wilson_interval,
)


def repeated(a: str, b: str, share: float, times: int) -> list[tuple[str, str, float]]:
    return [(a, b, share)] * times


def test_a_dominated_policy_is_ordered_last():
    outcomes = (
        repeated("rl-cai", "base", 1.0, 10)
        + repeated("sl-cai", "base", 0.9, 10)
        + repeated("rl-cai", "sl-cai", 0.7, 10)
    )
    ratings = elo_ratings(outcomes)
    assert sorted(ratings, key=ratings.get) == ["base", "sl-cai", "rl-cai"]


def test_symmetric_results_give_equal_ratings():
    outcomes = repeated("a", "b", 1.0, 5) + repeated("b", "a", 1.0, 5) + repeated("a", "c", 0.5, 4)
    ratings = elo_ratings(outcomes, prior_draws=0)
    assert ratings == pytest.approx({"a": 1000.0, "b": 1000.0, "c": 1000.0}, abs=1e-6)


def test_a_75_percent_win_rate_is_a_gap_of_191_points():
    ratings = elo_ratings(repeated("a", "b", 1.0, 75) + repeated("b", "a", 1.0, 25), prior_draws=0)
    assert ratings["a"] - ratings["b"] == pytest.approx(190.85, abs=0.01)


def test_soft_outcomes_count_as_fractional_wins():
    soft = elo_ratings(repeated("a", "b", 0.75, 4), prior_draws=0)
    hard = elo_ratings(repeated("a", "b", 1.0, 3) + repeated("a", "b", 0.0, 1), prior_draws=0)
    assert soft == pytest.approx(hard, abs=1e-6)


def test_ratings_are_anchored_at_a_mean_of_1000():
    ratings = elo_ratings(
        repeated("a", "b", 0.8, 3) + repeated("b", "c", 0.6, 3) + repeated("a", "c", 0.9, 3)
    )
    assert sum(ratings.values()) / 3 == pytest.approx(1000.0)


def test_the_fit_reproduces_pairwise_win_rates_of_a_consistent_set():
    # Win rates generated from ratings 1100, 1000, 900 are fitted back to those ratings.
    truth = {"a": 1100.0, "b": 1000.0, "c": 900.0}
    outcomes = [(x, y, expected_score(truth[x], truth[y])) for x, y in [("a", "b"), ("b", "c"), ("a", "c")]]
    assert elo_ratings(outcomes, prior_draws=0) == pytest.approx(truth, abs=1e-3)


def test_the_prior_keeps_a_clean_sweep_finite_and_shrinks_the_gap():
    ratings = elo_ratings(repeated("a", "b", 1.0, 8), prior_draws=1.0)
    # 8.5 wins of 9 games: the gap is that of a 94.4% win rate.
    assert ratings["a"] - ratings["b"] == pytest.approx(elo_gap(8.5 / 9), abs=1e-6)


def test_a_clean_sweep_without_a_prior_is_refused():
    with pytest.raises(ValueError, match="unbounded"):
        elo_ratings(repeated("a", "b", 1.0, 3), prior_draws=0)


def test_an_outcome_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="outcome 2: share 1.5"):
        elo_ratings([("a", "b", 0.5), ("a", "b", 1.5)])


def test_no_outcomes_give_no_ratings():
    assert elo_ratings([]) == {}


def test_wilson_interval_matches_the_textbook_value():
    # 8 of 10: the 95% Wilson interval is (0.490, 0.943).
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_wilson_interval_stays_inside_zero_one_at_the_extremes():
    assert wilson_interval(0, 5)[0] == 0.0
    assert wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bootstrap_intervals_of_a_clear_winner_lie_above_the_mean():
    # 20 prompts on each of which a beat b: resampling prompts cannot change who wins.
    groups = [[("a", "b", 1.0)] for _ in range(20)]
    intervals = bootstrap_intervals(groups, prior_draws=1.0, samples=50, seed=0)
    assert intervals["a"][0] > 1000.0 > intervals["b"][1]


def test_bootstrap_intervals_of_an_even_split_contain_the_mean_and_the_estimate():
    groups = [[("a", "b", float(i % 2))] for i in range(20)]
    estimate = elo_ratings([o for g in groups for o in g])["a"]
    low, high = bootstrap_intervals(groups, samples=200, seed=1)["a"]
    assert low < 1000.0 < high and low <= estimate <= high


def test_bootstrap_intervals_are_reproducible_for_a_seed():
    groups = [[("a", "b", float(i % 3 == 0)), ("b", "c", 0.5)] for i in range(12)]
    assert bootstrap_intervals(groups, samples=30, seed=4) == bootstrap_intervals(groups, samples=30, seed=4)
