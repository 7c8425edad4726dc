"""Label flips and shifts between two labellings of the same pairs, on labels written by hand."""

from __future__ import annotations

import pytest

from cai_lib.core.constitution import load_constitution
from cai_lib.core.records import Preference, PrincipleScore
from cai_lib.method.label_shift import is_flip, label_shift, principle_statuses


def label(answers: tuple[str, str], value: float, scores: dict[str, tuple[float, float]] | None = None, prompt="\n\nHuman: hi") -> Preference:
    """A label of P(first answer better) = `value`, with per-principle probabilities in both orders."""
    scores = scores or {"p": (value, value)}
    return Preference(
        id=f"{answers}-{value}",
        prompt=prompt,
        answer_a=answers[0],
        answer_b=answers[1],
        label=value,
        source="ai",
        principle_ids=list(scores),
        scores=[PrincipleScore(principle_id=p, p_a_first=x, p_a_second=y) for p, (x, y) in scores.items()],
    )


@pytest.mark.parametrize(
    ("before", "after", "flipped"),
    [(0.7, 0.3, True), (0.3, 0.7, True), (0.7, 0.6, False), (0.5, 0.9, False), (0.9, 0.5, False), (0.2, 0.1, False)],
)
def test_a_flip_is_a_preference_that_changed_sides_and_a_tie_is_no_preference(before, after, flipped):
    assert is_flip(before, after) is flipped


def test_the_flip_rate_counts_pairs_whose_preferred_answer_changed_sides():
    a = [label(("x", "y"), 0.7), label(("u", "v"), 0.4), label(("s", "t"), 0.6)]
    b = [label(("x", "y"), 0.3), label(("u", "v"), 0.45), label(("s", "t"), 0.8)]

    shift = label_shift(a, b, {})

    assert (shift.n, shift.flips, shift.flip_rate) == (3, 1, pytest.approx(1 / 3))


def test_the_shift_is_the_later_label_minus_the_earlier():
    shift = label_shift([label(("x", "y"), 0.7), label(("u", "v"), 0.4)], [label(("x", "y"), 0.5), label(("u", "v"), 0.5)], {})

    assert shift.mean_shift == pytest.approx((-0.2 + 0.1) / 2)
    assert shift.mean_abs_shift == pytest.approx((0.2 + 0.1) / 2)


def test_a_pair_labelled_the_other_way_round_is_read_from_its_other_side():
    # B asked with the answers swapped: P(y better) = 0.2 is P(x better) = 0.8, no flip from 0.7.
    shift = label_shift([label(("x", "y"), 0.7)], [label(("y", "x"), 0.2)], {})

    assert (shift.n, shift.flips) == (1, 0)
    assert shift.most_moved[0].label_b == pytest.approx(0.8)


def test_a_principles_label_on_a_pair_labelled_the_other_way_round_is_read_from_its_other_side():
    # B asked "p" with the answers swapped: P(y better) = 0.2 under it is P(x better) = 0.8.
    shift = label_shift([label(("x", "y"), 0.7, {"p": (0.7, 0.7)})], [label(("y", "x"), 0.2, {"p": (0.2, 0.2)})], {})

    (principle,) = shift.per_principle
    assert (principle.n, principle.flips, principle.mean_shift) == (1, 0, pytest.approx(0.1))


def test_each_principle_is_compared_on_its_own_label_where_both_asked_it():
    a = [label(("x", "y"), 0.6, {"kept": (0.6, 0.6), "edited": (0.7, 0.5)})]
    # "edited" now prefers the second answer in both orders: its own label flips, the pair's does not.
    b = [label(("x", "y"), 0.5, {"kept": (0.6, 0.6), "edited": (0.4, 0.4), "new": (0.9, 0.9)})]

    shift = label_shift(a, b, {"edited": "changed", "new": "added"})

    by_id = {p.principle_id: p for p in shift.per_principle}
    assert (by_id["edited"].n, by_id["edited"].flips, by_id["edited"].mean_shift) == (1, 1, pytest.approx(-0.2))
    assert (by_id["kept"].flips, by_id["kept"].mean_shift) == (0, 0.0)
    assert (by_id["new"].asked_a, by_id["new"].asked_b, by_id["new"].n, by_id["new"].flip_rate) == (0, 1, 0, None)
    assert shift.flips == 0


def test_what_the_change_touched_comes_first():
    a = [label(("x", "y"), 0.6, {"a": (0.6, 0.6), "z": (0.6, 0.6)})]

    shift = label_shift(a, a, {"z": "changed"})

    assert [p.principle_id for p in shift.per_principle] == ["z", "a"]


def test_the_pairs_that_moved_most_come_first_and_unmoved_ones_are_left_out():
    a = [label(("x", "y"), 0.5), label(("u", "v"), 0.6), label(("s", "t"), 0.6)]
    b = [label(("x", "y"), 0.55), label(("u", "v"), 0.3), label(("s", "t"), 0.6)]

    moved = label_shift(a, b, {}, top=5).most_moved

    assert [(m.answer_a, round(m.shift, 2), m.flipped) for m in moved] == [("u", -0.3, True), ("x", 0.05, False)]


def test_pairs_only_one_labelling_has_are_left_out_and_none_shared_is_nothing_to_compare():
    shift = label_shift([label(("x", "y"), 0.7), label(("u", "v"), 0.7)], [label(("x", "y"), 0.2)], {})

    assert (shift.labels_a, shift.labels_b, shift.n, shift.flips) == (2, 1, 1, 1)
    assert label_shift([label(("x", "y"), 0.7)], [label(("u", "v"), 0.7)], {}) is None


def test_a_flip_rate_has_its_wilson_interval():
    shift = label_shift([label((str(i), "y"), 0.7) for i in range(10)], [label((str(i), "y"), 0.3 if i < 5 else 0.8) for i in range(10)], {})

    assert (shift.flip_rate, round(shift.flip_ci_low, 3), round(shift.flip_ci_high, 3)) == (0.5, 0.237, 0.763)


def test_principle_statuses_name_what_a_new_version_added_removed_and_changed(tmp_path):
    before = load_constitution("harmless@1.0.0")
    document = before.model_dump(mode="json")
    document["version"] = "1.1.0"
    document["comparison"][1]["question"] = "Which response is kinder?"
    document["comparison"].append({"id": "kind", "question": "Which is kinder still?"})
    del document["comparison"][2]
    after = type(before).model_validate(document)

    statuses = principle_statuses(before, after)

    assert {k: v for k, v in statuses.items() if v != "unchanged"} == {
        "ethical-not-preachy": "changed",
        "non-evasive": "removed",
        "kind": "added",
    }
