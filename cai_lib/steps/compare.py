"""The compare step: this run against the finished run `compare_against` names (`cai retrain` names
the run that made the champion this run challenges), once this run's last round of iterated CAI
has evaluated its final policy and before that round registers it.

The comparison (`cai_lib.platform.compare`) goes into this run's folder, its MLflow run and the
step's KFP HTML visualisation, and a pointer to it to the register step, which records it on the
new model versions and in the gate's reason. A comparison that cannot be made (the run named is
unknown here, or unfinished) is said in the pointer and the page, and the run goes on: the
comparison explains a retrain, it does not gate it. With no run named, the step writes a page
that says so and loads nothing.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from cai_lib.core.errors import CaiError
from cai_lib.core.outputs import StageRecord, round_of
from cai_lib.core.runs import PipelineRun, finished_run
from cai_lib.core.store import ArtifactStore
from cai_lib.method.evaluation.comparison import RunComparison
from cai_lib.steps.context import RunContext, one_line_errors
from cai_lib.steps.stage_runs import recorded, write_record


@one_line_errors
def compare(context: dict, report_path: str, pointer_path: str, round_: int = 1) -> dict:
    """Compare this run with `compare_against`; write the page to `report_path` (the KFP HTML
    artifact) and to `pointer_path` what the register step records: {"against", "report",
    "summary"} or {"against", "error"}, {} when no run was named. `round_`: the round it runs in
    (the run's last), which names its MLflow run and record. Returns the pointer."""
    from cai_lib.method.evaluation.compare_report import comparison_html
    from cai_lib.platform.compare import compare_runs, record_comparison, refuse_same_run

    ctx = RunContext.model_validate(context)
    against = ctx.params.compare_against
    pointer: dict = {}
    page = "<p>No run to compare with: the pipeline parameter <code>compare_against</code> is empty.</p>"
    if against:
        with recorded(ctx, "compare", round_=round_) as run:
            try:
                a, b = finished_run(against, ctx.artifact_root, ctx.tracking_uri), PipelineRun(ArtifactStore.open(ctx.run_root))
                refuse_same_run(a, b)
                comparison = compare_runs(a, b)
            except CaiError as err:
                pointer = {"against": against, "error": str(err)}
                page = f"<p>No comparison with run {escape(against)}: {escape(str(err))}</p>"
            else:
                where = record_comparison(comparison, ctx.run_root, ctx.tracking_uri, ctx.parent_run_id)
                pointer = {"against": a.run_id, "report": where["report"], "summary": summary_of(comparison)}
                page = comparison_html(comparison)
                if comparison.labels:
                    run.log_stage_metrics({"label_flip_rate": comparison.labels.flip_rate})
        write_record(
            ctx,
            StageRecord(
                stage="compare", round=round_of(round_), status="ran", made_by_run=ctx.run_id, run_id=ctx.run_id
            ),
        )
    for path, text in ((report_path, page), (pointer_path, json.dumps(pointer))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    return pointer


def summary_of(comparison: RunComparison) -> str:
    """The comparison in one clause, for the gate's reason: where the runs part, what flipped, how
    this run's final policy fared against the other run's."""
    reran = [s.name for s in comparison.stages if s.status == "reran"]
    parts = [f"reran from {reran[0]}" if reran else "every stage reused"]
    if comparison.labels:
        parts.append(f"{comparison.labels.flips} of {comparison.labels.n} AI labels flipped")
    if comparison.policies:
        parts += [
            f"{r.criterion} win rate {r.win_rate:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] against its {comparison.policies.policy}"
            for r in comparison.policies.win_rates
        ]
    return ", ".join(parts)
