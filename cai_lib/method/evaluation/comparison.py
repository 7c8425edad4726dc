"""What a comparison of two runs records (`cai compare`), and what a preview of a constitution
change records (`cai impact`): the diff, the evidence and the examples, as data that the HTML
page (`compare_report`), `--json` and the one-line summaries all read.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

from cai_lib.core.constitution import Constitution
from cai_lib.core.stage_table import package_version
from cai_lib.method.evaluation.head_to_head import HeadToHead
from cai_lib.method.evaluation.results import PMAccuracy, PrincipleEffect
from cai_lib.method.label_shift import LabelShift

StageStatus = Literal["reused", "reran", "only in A", "only in B"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunSide(BaseModel):
    """One of the runs compared (or the run a preview relabels)."""

    run_id: str
    run_name: str = ""
    root: str = Field(description="The run's folder.")
    constitution_ref: str
    constitution_sha256: str
    base_model: str = ""
    feedback_model: str = ""
    judge_model: str = ""


class StageChange(BaseModel):
    """One stage of B next to the same stage of A."""

    stage: str
    round: int = Field(default=1, description="The round of iterated CAI (1 for the stages every run runs once).")
    status: StageStatus = Field(description="reused: B has A's output (same key); reran: B's key differs.")
    changed: list[str] = Field(default_factory=list, description="What B's key hashes that A's did not, in words.")
    made_by: list[str] = Field(
        default_factory=list, description="Runs other than B that made B's outputs of a stage that reran."
    )

    @property
    def name(self) -> str:
        """The stage as `cai run`'s summary names it: `label`, or `label (round 2)` in a later round."""
        return self.stage if self.round == 1 else f"{self.stage} (round {self.round})"

    def line(self) -> str:
        why = f" ({'; '.join(self.changed)})" if self.changed else ""
        makers = f", made by run {', '.join(self.made_by)}" if self.made_by else ""
        return f"{self.name}: {self.status}{why}{makers}"


class PrincipleEdit(BaseModel):
    """A principle added, removed or changed by the constitution change, with its text."""

    principle_id: str
    section: Literal["critique_revision", "comparison"]
    change: Literal["added", "removed", "changed"]
    before: str = ""
    after: str = ""


class ConstitutionChange(BaseModel):
    """The diff of two constitutions, principle by principle."""

    before_ref: str
    after_ref: str
    before_sha256: str
    after_sha256: str
    edits: list[PrincipleEdit]
    few_shot_changed: bool

    @property
    def same(self) -> bool:
        return self.before_sha256 == self.after_sha256

    def line(self) -> str:
        if self.same:
            return f"constitution: {self.after_ref}, the same in both (sha256 {self.after_sha256[:12]})"
        edits = "; ".join(
            f"{e.change} {e.section.replace('_', '/')} principle {e.principle_id}" for e in self.edits
        )
        few_shot = "; few-shot examples changed" if self.few_shot_changed else ""
        return f"constitution: {self.before_ref} -> {self.after_ref}: {edits or 'no principle changed'}{few_shot}"


def _text(principle) -> str:
    if hasattr(principle, "question"):
        return principle.question
    return f"{principle.critique_request}\n{principle.revision_request}"


def constitution_change(before: Constitution, after: Constitution) -> ConstitutionChange:
    """Every principle `after` adds, removes or changes relative to `before`, with both texts."""
    edits = []
    for section in ("critique_revision", "comparison"):
        old = {p.id: p for p in getattr(before, section)}
        new = {p.id: p for p in getattr(after, section)}
        for i, p in old.items():
            if i not in new:
                edits.append(PrincipleEdit(principle_id=i, section=section, change="removed", before=_text(p)))
        for i, p in new.items():
            if i not in old:
                edits.append(PrincipleEdit(principle_id=i, section=section, change="added", after=_text(p)))
            elif p != old[i]:
                edits.append(
                    PrincipleEdit(
                        principle_id=i, section=section, change="changed", before=_text(old[i]), after=_text(p)
                    )
                )
    return ConstitutionChange(
        before_ref=before.ref,
        after_ref=after.ref,
        before_sha256=before.sha256,
        after_sha256=after.sha256,
        edits=edits,
        few_shot_changed=before.few_shot != after.few_shot,
    )


class PMAccuracyComparison(BaseModel):
    """Each run's PM on the same held-out human comparisons."""

    a: PMAccuracy
    b: PMAccuracy


class PrincipleEffectPair(BaseModel):
    """A critique/revision principle's effect in each run's SL-CAI revisions (None: not drawn there)."""

    principle_id: str
    a: PrincipleEffect | None
    b: PrincipleEffect | None


def label_lines(labels: LabelShift) -> list[str]:
    """The label shift in a few lines: overall, then per principle."""
    relabelled = f" ({labels.relabelled} labelled for this report, not stored)" if labels.relabelled else ""
    lines = [
        f"labels: {labels.n} pairs labelled by both{relabelled}: {labels.flips} flipped "
        f"({labels.flip_rate:.1%} [{labels.flip_ci_low:.1%}, {labels.flip_ci_high:.1%}]), mean shift "
        f"{labels.mean_shift:+.4f}, mean |shift| {labels.mean_abs_shift:.4f}"
    ]
    for p in labels.per_principle:
        status = "" if p.status == "unchanged" else f" ({p.status})"
        if p.n:
            lines.append(
                f"  principle {p.principle_id}{status}: {p.flips} of {p.n} flipped ({p.flip_rate:.1%}), "
                f"mean shift {p.mean_shift:+.4f}"
            )
        else:
            lines.append(
                f"  principle {p.principle_id}{status}: asked on {p.asked_a} pair(s) in A and {p.asked_b} in B, "
                "none in both"
            )
    return lines


class RunComparison(BaseModel):
    """Run B against run A: stages, constitution, settings, labels, preference model, policies."""

    a: RunSide
    b: RunSide
    stages: list[StageChange]
    constitution: ConstitutionChange
    settings: list[str] = Field(description="Run parameters that differ, as 'field: A -> B'.")
    labels: LabelShift | None = None
    pm_accuracy: PMAccuracyComparison | None = None
    policies: HeadToHead | None = None
    principle_effects: list[PrincipleEffectPair] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="What qualifies the comparison, one line each.")
    not_compared: list[str] = Field(default_factory=list, description="What could not be compared, one line each.")
    code_version: str = Field(default_factory=package_version)
    created_at: str = Field(default_factory=_now)

    def stage_line(self) -> str:
        """Which stages reran, from where, and which B reused from A."""
        reran = [s.name for s in self.stages if s.status == "reran"]
        reused = [s.name for s in self.stages if s.status == "reused"]
        parts = []
        if reran:
            parts.append(f"reran from {reran[0]} onward ({', '.join(reran)})")
        if reused:
            parts.append(f"reused {', '.join(reused)}")
        only = [s.line() for s in self.stages if s.status.startswith("only")]
        return "stages: " + "; ".join(parts + only or ["none recorded"])

    def lines(self) -> list[str]:
        """The comparison as lines of text for a terminal or a log."""
        lines = [
            f"compare: run A {self.a.run_id} ({self.a.constitution_ref}) -> run B {self.b.run_id} "
            f"({self.b.constitution_ref})",
            self.stage_line(),
            *(f"  {s.line()}" for s in self.stages if s.status == "reran"),
            self.constitution.line(),
        ]
        if self.settings:
            lines.append(f"settings: {'; '.join(self.settings)}")
        if self.labels:
            lines += label_lines(self.labels)
        if self.pm_accuracy:
            a, b = self.pm_accuracy.a, self.pm_accuracy.b
            lines.append(
                f"PM accuracy on {a.source} ({a.n} human comparisons): A {a.accuracy:.3f} [{a.ci_low:.3f}, "
                f"{a.ci_high:.3f}], B {b.accuracy:.3f} [{b.ci_low:.3f}, {b.ci_high:.3f}]"
            )
        if self.policies:
            for rate in self.policies.win_rates:
                lines.append(
                    f"policies: B's {self.policies.policy} vs A's, {rate.criterion} ({rate.n} prompts): soft "
                    f"{rate.win_rate:.3f} [{rate.ci_low:.3f}, {rate.ci_high:.3f}], hard {rate.hard_win_rate:.3f} "
                    f"[{rate.hard_ci_low:.3f}, {rate.hard_ci_high:.3f}] of {rate.decided} decided"
                )
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"not compared: {n}" for n in self.not_compared]
        return lines


class ImpactReport(BaseModel):
    """A constitution change previewed on an earlier run's pairs: relabelled, nothing trained."""

    run: RunSide = Field(description="The run whose pairs were relabelled.")
    constitution: ConstitutionChange = Field(description="From the run's constitution to the new one.")
    feedback_model: str = Field(description="The feedback model that labelled both times.")
    labels: LabelShift | None
    notes: list[str] = Field(default_factory=list)
    code_version: str = Field(default_factory=package_version)
    created_at: str = Field(default_factory=_now)

    def lines(self) -> list[str]:
        lines = [
            f"impact: {self.constitution.after_ref} on the pairs of run {self.run.run_id} "
            f"(labelled under {self.constitution.before_ref} by {self.feedback_model})",
            self.constitution.line(),
        ]
        lines += label_lines(self.labels) if self.labels else ["labels: no pair to compare"]
        return lines + [f"note: {n}" for n in self.notes]
