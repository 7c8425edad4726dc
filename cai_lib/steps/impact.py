"""The impact preview as a pipeline step: `cai impact` (`cai_lib.platform.impact`) in a pod of the
small pipeline `pipelines/impact_pipeline.py`, reading where runs are from the installation's
settings, as every step does.

The page goes to the step's KFP HTML visualisation and the JSON to its artifact; nothing is
written where any run keeps its outputs.
"""

from __future__ import annotations

from pathlib import Path

from cai_lib.core.config import Platform
from cai_lib.core.constitution import load_constitution
from cai_lib.core.runs import find_run
from cai_lib.steps.context import one_line_errors


@one_line_errors
def preview(constitution: str, against: str, top: int, report_path: str, result_path: str) -> dict:
    """Relabel the pairs of run `against` under `constitution`; write the page to `report_path`
    and the preview as JSON to `result_path`. Returns the overall flips: {"n", "flips", "flip_rate"}
    (all 0 when no pair could be compared)."""
    from cai_lib.method.evaluation.compare_report import impact_html
    from cai_lib.platform.impact import impact

    platform = Platform.from_environment()
    run = find_run(against, platform.artifact_root, platform.tracking_uri)
    report = impact(load_constitution(constitution), run, top)
    for path, text in ((report_path, impact_html(report)), (result_path, report.model_dump_json(indent=2) + "\n")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    labels = report.labels
    return {"n": labels.n, "flips": labels.flips, "flip_rate": labels.flip_rate} if labels else {"n": 0, "flips": 0, "flip_rate": 0.0}
