"""What a constitution change did to the AI labels: the same pairs labelled twice (by run A's
labeller and by run B's, or before and after an edit), compared pair by pair and principle by
principle.

A pair's label is P(answer_a better) (`cai_lib.method.feedback`). Its preference **flips** when
one labelling prefers answer_a and the other answer_b, each as `hard_outcome` reads a label: one
within 1e-9 of 0.5 is a tie, no preference, and so never half of a flip. A pair's **shift** is
label_B - label_A, positive when B's labelling likes answer_a more.

Per comparison principle the same is measured on that principle's own label (the mean of its two
option orders), over the pairs both labellings asked it on. Which principles a pair is asked under
is drawn from the pool of comparison principles (`draw_principles`), so an edited principle keeps
its pairs, while an added or removed one changes the pool and so the draws: a principle is
compared only where both sides asked it, and the counts say on how many pairs each side did.

Pairs are matched by content (conversation and both answers), not by row id: a label's id hashes
the key of the labelling that made it, which the change itself alters. A pair labelled with its
answers the other way round is matched too, its labels read from the other side (1 - label).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from cai_lib.core.constitution import Constitution
from cai_lib.core.records import Preference
from cai_lib.method.evaluation.elo import wilson_interval
from cai_lib.method.feedback import hard_outcome, order_debiased

PrincipleStatus = Literal["changed", "added", "removed", "unchanged"]
# How the per-principle table is ordered: what the change touched first.
STATUS_ORDER: tuple[PrincipleStatus, ...] = ("changed", "added", "removed", "unchanged")


class PairChange(BaseModel):
    """One pair's label in both labellings."""

    prompt: str
    answer_a: str
    answer_b: str
    label_a: float = Field(description="P(answer_a better) in labelling A.")
    label_b: float = Field(description="P(answer_a better) in labelling B.")
    shift: float = Field(description="label_b - label_a.")
    flipped: bool = Field(description="One labelling prefers answer_a, the other answer_b.")
    principles_a: list[str] = Field(description="The comparison principles labelling A asked.")
    principles_b: list[str] = Field(description="The comparison principles labelling B asked.")


class PrincipleShift(BaseModel):
    """Flips and shift of one comparison principle's own label."""

    principle_id: str
    status: PrincipleStatus = Field(description="What the constitution change did to this principle.")
    asked_a: int = Field(description="Matched pairs labelling A asked this principle on.")
    asked_b: int = Field(description="Matched pairs labelling B asked this principle on.")
    n: int = Field(description="Matched pairs both asked it on: what flips and shift are measured over.")
    flips: int
    flip_rate: float | None = Field(description="flips / n; None when n is 0.")
    mean_shift: float | None = Field(description="Mean of the principle's label B - label A; None when n is 0.")


class LabelShift(BaseModel):
    """What changed between two labellings of the same pairs."""

    labels_a: int = Field(description="Pairs labelling A labelled.")
    labels_b: int = Field(description="Pairs labelling B labelled.")
    n: int = Field(description="Pairs both labelled: what every rate here is over.")
    flips: int = Field(description="Pairs whose preferred answer changed sides.")
    flip_rate: float
    flip_ci_low: float = Field(description="95% Wilson interval of the flip rate, lower end.")
    flip_ci_high: float = Field(description="95% Wilson interval of the flip rate, upper end.")
    mean_shift: float = Field(description="Mean of label_b - label_a.")
    mean_abs_shift: float = Field(description="Mean of |label_b - label_a|.")
    per_principle: list[PrincipleShift]
    most_moved: list[PairChange] = Field(description="The pairs whose label moved most, largest first.")
    relabelled: int = Field(
        default=0, description="Of the n pairs, how many labelling B scored for this comparison (not stored)."
    )


def is_flip(label_a: float, label_b: float) -> bool:
    """One label prefers answer_a and the other answer_b (a tie prefers neither)."""
    return {hard_outcome(label_a), hard_outcome(label_b)} == {0.0, 1.0}


def pair_key(prompt: str, answer_a: str, answer_b: str) -> tuple[str, str, str]:
    return (prompt, answer_a, answer_b)


def principle_labels(preference: Preference, swapped: bool = False) -> dict[str, float]:
    """Each principle's P(answer_a better), from both option orders; read for the other answer
    when the pair was labelled the other way round."""
    labels = {s.principle_id: order_debiased(s.p_a_first, s.p_a_second) for s in preference.scores}
    return {p: 1.0 - label for p, label in labels.items()} if swapped else labels


def matched(
    labels_a: Sequence[Preference], labels_b: Sequence[Preference]
) -> list[tuple[Preference, Preference, bool]]:
    """(A's label, B's label, whether B labelled the pair with its answers swapped) for every pair
    both labelled, in A's order."""
    by_key = {pair_key(p.prompt, p.answer_a, p.answer_b): (p, False) for p in labels_b}
    for p in labels_b:
        by_key.setdefault(pair_key(p.prompt, p.answer_b, p.answer_a), (p, True))
    found = []
    for a in labels_a:
        hit = by_key.get(pair_key(a.prompt, a.answer_a, a.answer_b))
        if hit is not None:
            found.append((a, hit[0], hit[1]))
    return found


def label_shift(
    labels_a: Sequence[Preference],
    labels_b: Sequence[Preference],
    statuses: dict[str, PrincipleStatus],
    top: int = 5,
    relabelled: int = 0,
) -> LabelShift | None:
    """Flips and shifts between two labellings, overall and per principle (`statuses`: what the
    change did to each comparison principle id; ids not given are unchanged; an unchanged one that
    neither labelling asked is left out), with the `top` pairs that moved most. None when no pair
    was labelled by both."""
    pairs = matched(labels_a, labels_b)
    if not pairs:
        return None
    changes = []
    asked: dict[str, list[int]] = {}
    shifts: dict[str, list[tuple[float, float]]] = {}
    for a, b, swapped in pairs:
        label_b = 1.0 - b.label if swapped else b.label
        changes.append(
            PairChange(
                prompt=a.prompt,
                answer_a=a.answer_a,
                answer_b=a.answer_b,
                label_a=a.label,
                label_b=label_b,
                shift=label_b - a.label,
                flipped=is_flip(a.label, label_b),
                principles_a=list(a.principle_ids),
                principles_b=list(b.principle_ids),
            )
        )
        on_a, on_b = principle_labels(a), principle_labels(b, swapped)
        for principle in on_a.keys() | on_b.keys():
            counts = asked.setdefault(principle, [0, 0])
            counts[0] += principle in on_a
            counts[1] += principle in on_b
            if principle in on_a and principle in on_b:
                shifts.setdefault(principle, []).append((on_a[principle], on_b[principle]))
    flips = sum(c.flipped for c in changes)
    low, high = wilson_interval(flips, len(changes))
    # A principle neither labelling asked is shown only when the change touched it.
    touched = {p for p, status in statuses.items() if status != "unchanged"}
    per_principle = [
        _principle_shift(p, statuses.get(p, "unchanged"), asked.get(p, [0, 0]), shifts.get(p, []))
        for p in sorted(asked.keys() | touched)
    ]
    per_principle.sort(key=lambda s: STATUS_ORDER.index(s.status))
    moved = sorted((c for c in changes if c.shift), key=lambda c: (-abs(c.shift), not c.flipped))
    return LabelShift(
        labels_a=len(labels_a),
        labels_b=len(labels_b),
        n=len(changes),
        flips=flips,
        flip_rate=flips / len(changes),
        flip_ci_low=low,
        flip_ci_high=high,
        mean_shift=statistics.fmean(c.shift for c in changes),
        mean_abs_shift=statistics.fmean(abs(c.shift) for c in changes),
        per_principle=per_principle,
        most_moved=moved[:top],
        relabelled=relabelled,
    )


def _principle_shift(
    principle: str, status: PrincipleStatus, asked: list[int], both: list[tuple[float, float]]
) -> PrincipleShift:
    flips = sum(is_flip(a, b) for a, b in both)
    return PrincipleShift(
        principle_id=principle,
        status=status,
        asked_a=asked[0],
        asked_b=asked[1],
        n=len(both),
        flips=flips,
        flip_rate=flips / len(both) if both else None,
        mean_shift=statistics.fmean(b - a for a, b in both) if both else None,
    )


def principle_statuses(before: Constitution, after: Constitution) -> dict[str, PrincipleStatus]:
    """What going from `before` to `after` did to each comparison principle id."""
    old = {p.id: p for p in before.comparison}
    new = {p.id: p for p in after.comparison}
    statuses: dict[str, PrincipleStatus] = {i: "removed" for i in old if i not in new}
    for i, principle in new.items():
        statuses[i] = "added" if i not in old else "changed" if principle != old[i] else "unchanged"
    return statuses
