"""How a step makes its output, or reuses one: content-addressed outputs, recorded.

Every stage that makes data or a checkpoint writes it as a content-addressed output
(`cai_lib.core.outputs`): its key hashes the stage, its settings, its code, its inputs' content
hashes and the constitution sections it reads (`cai_lib.core.stage_table`). A complete output
with the same key is reused, by a retry of the same step or by any later run, without loading a
model. Each step records in the run's folder (`<artifact_root>/runs/<KFP run id>/stages/`), in
its MLflow run (tags `cai.reuse`, `cai.output_key`, `cai.made_by_run`) and so in the report
whether it ran or reused an output.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from cai_lib.core import stage_table
from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import (
    DEFERRED_ARTIFACTS,
    DEMO_DATA_TAG,
    MADE_BY_RUN_TAG,
    METRIC_SOURCE_TAG_PREFIX,
    OUTPUT_KEY_TAG,
    OUTPUT_URI_TAG,
    REUSE_TAG,
    STAGES_DIR,
    SUCCESS,
    canonical_sha256,
)
from cai_lib.core.outputs import (
    DeferredRecord,
    OutputMarker,
    StageOutput,
    StageRecord,
    record_of,
    summary_lines,
)
from cai_lib.core.prompts import demo_set_note
from cai_lib.core.runs import run_records
from cai_lib.core.shards import dataset_summary
from cai_lib.core.stage_table import NAMES, ConstitutionPart, Output, code_sha256
from cai_lib.core.store import ArtifactStore, join_uri
from cai_lib.core.tracking import StageRun, stage_run
from cai_lib.platform.run_config import PipelineParams
from cai_lib.steps.context import RunContext


def numeric(values: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (what MLflow and KFP Metrics accept)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def constitution_part(constitution: Constitution, part: ConstitutionPart, params: PipelineParams) -> str:
    """sha256 of the part of `constitution` a stage reads (see `cai_lib.core.stage_table`)."""
    from cai_lib.method.evaluation.config import evaluation_part, judging_principles

    if part == "evaluation":
        return canonical_sha256(
            evaluation_part(constitution, judging_principles(constitution, params.evaluate))
        )
    return constitution.section_sha256(part)


def write_record(ctx: RunContext, record: StageRecord) -> None:
    write_record_at(ArtifactStore.open(ctx.run_root), record)


def write_record_at(folder: ArtifactStore, record: StageRecord) -> None:
    folder.write_text(join_uri(STAGES_DIR, record.file_name), record.model_dump_json(indent=2) + "\n")


def run_summary(run_root: str) -> list[str]:
    """`stage NAME: ran` / `stage NAME: reused (...)`, one line per stage, in pipeline order."""
    return summary_lines(run_records(run_root), NAMES)


@contextmanager
def recorded(ctx: RunContext, name: str, shard: int | None = None, round_: int = 1):
    """The MLflow stage run of `name` (one per shard of a fanned-out stage, one per round of a
    stage that runs in every round)."""
    with stage_run(ctx.tracking_uri, ctx.parent_run_id, stage_label(name, shard, round_)) as run:
        yield run


def stage_label(name: str, shard: int | None, round_: int = 1) -> str:
    """The name of a stage's MLflow run: the stage, with its round of iterated CAI as
    `name@roundK` (after the first) and its shard as `name[i]`."""
    label = name if round_ == 1 else f"{name}@round{round_}"
    return label if shard is None else f"{label}[{shard}]"


class DeferredStageRun:
    """A `StageRun` whose tags, metrics and artifacts go into the run's folder, for the exit
    handler to write to MLflow (`write_deferred`); see `DeferredRecord` for why."""

    run_id = None

    def __init__(self, ctx: RunContext, label: str):
        self.folder = ArtifactStore.open(ctx.run_root)
        self.content = DeferredRecord(parent_run_id=ctx.parent_run_id, label=label)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.content.tags.update({key: str(value) for key, value in tags.items()})

    def log_stage_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.content.metrics.update(numeric(metrics))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if not path.is_file():
            raise CaiError(f"{path}: no such file to keep for the stage run {self.content.label}")
        key = join_uri(STAGES_DIR, DEFERRED_ARTIFACTS, self.content.label, artifact_path or "", path.name)
        self.folder.put_file(str(path), key)
        self.content.artifacts[key] = artifact_path or ""


def record(
    ctx: RunContext,
    run: StageRun | DeferredStageRun,
    marker: OutputMarker,
    shard: int | None = None,
    round_: int = 1,
) -> StageRecord:
    """Tag the stage run: ran or reused, key, where, made by whom; returns the run's pointer to it."""
    entry = record_of(marker, ctx.run_id, shard, round_)
    run.set_tags(
        {
            REUSE_TAG: entry.status,
            OUTPUT_KEY_TAG: marker.key,
            OUTPUT_URI_TAG: marker.uri,
            MADE_BY_RUN_TAG: marker.made_by_run,
        }
    )
    run.log_stage_metrics(marker.metrics)
    return entry


def source_tags(sources: dict[str, str]) -> dict[str, str]:
    """Tags that name the data set behind each group of a stage run's metrics (`cai.source.<group>`),
    and, where some are the project's demo sets, `cai.demo_data` saying so (`demo_set_note`)."""
    tags = {f"{METRIC_SOURCE_TAG_PREFIX}{group}": source for group, source in sources.items()}
    notes = [note for note in map(demo_set_note, dict.fromkeys(sources.values())) if note]
    if notes:
        tags[DEMO_DATA_TAG] = " ".join(notes)
    return tags


Write = Callable[[str, str], dict | None]


def produce(
    ctx: RunContext,
    name: str,
    identity: dict,
    write: Write,
    constitution: Constitution | None = None,
    shard: int | None = None,
    then: Callable[[StageRun | DeferredStageRun, OutputMarker], None] | None = None,
    round_: int = 1,
) -> OutputMarker:
    """The output of stage `name` for `identity`: the complete one if any run made it, else the
    one `write(uri, rows_key)` makes now (`StageOutput.rows_key`: what row ids derive from). The
    key adds to `identity` the stage's code hash and the constitution parts the stage table says
    it reads. Either way the run's folder records what happened, and the stage's MLflow run: at
    once when the stage runs, by the exit handler when it reuses an output (`DeferredStageRun`).
    `then` runs last, with the stage run (e.g. to log a report). `round_` names the round of
    iterated CAI in the records; it is not part of the key, which is all content: a later round's
    stage differs from round 1's by its inputs."""
    stage = stage_table.stage(name)
    parts = {part: constitution_part(constitution, part, ctx.params) for part in stage.reads}
    output = StageOutput(
        ctx.outputs_root, name, {"code": code_sha256(name), **identity, "constitution": parts}
    )
    marker = output.complete()
    if marker is not None:
        deferred = DeferredStageRun(ctx, stage_label(name, shard, round_))
        entry = record(ctx, deferred, marker, shard, round_)
        if then:
            then(deferred, marker)
        write_record(ctx, entry.model_copy(update={"deferred": deferred.content}))
        return marker
    with recorded(ctx, name, shard, round_) as run:
        marker = output.complete() or make(ctx, stage.output, output, write, run.run_id)
        entry = record(ctx, run, marker, shard, round_)
        if then:
            then(run, marker)
    write_record(ctx, entry)
    return marker


def write_deferred(tracking_uri: str, run_root: str) -> list[str]:
    """Write to MLflow the stage runs the stages of the run at `run_root` left for later (they
    reused their outputs), and mark them written; returns their labels. Idempotent: a retried exit
    handler finds each stage run by its parent and name and sets the same values again."""
    import tempfile

    folder = ArtifactStore.open(run_root)
    written = []
    for entry in run_records(run_root):
        if entry.deferred is None:
            continue
        content = entry.deferred
        with stage_run(tracking_uri, content.parent_run_id, content.label) as run:
            run.set_tags(content.tags)
            if content.metrics:
                run.log_stage_metrics(content.metrics)
            with tempfile.TemporaryDirectory(prefix="cai-deferred-") as scratch:
                for key, artifact_path in content.artifacts.items():
                    local = Path(scratch) / key.rsplit("/", 1)[-1]
                    folder.get_file(key, str(local))
                    run.log_artifact(local, artifact_path or None)
        write_record_at(folder, entry.model_copy(update={"deferred": None}))
        written.append(content.label)
    return written


def make(
    ctx: RunContext, kind: Output, output: StageOutput, write: Write, mlflow_run_id: str
) -> OutputMarker:
    """Write and commit a stage's output, made in the MLflow stage run `mlflow_run_id`. A dataset
    fills (or resumes) `<key>/data`, unless it was finished before the commit was interrupted; a
    checkpoint or results directory goes to a fresh attempt prefix, committed by the output's
    marker."""
    from cai_lib.core.model_versions import checkpoint_manifest_sha256

    if kind == "dataset":
        uri = output.data_uri()
        if not ArtifactStore.open(uri).exists(SUCCESS):
            write(uri, output.rows_key)
        summary = dataset_summary(uri)
        rows = summary["rows"]
        return output.commit(
            uri,
            "dataset",
            ctx.run_id,
            rows=rows,
            sha256=summary["sha256"],
            metrics={"rows": rows},
            mlflow_run_id=mlflow_run_id,
        )
    uri = output.new_attempt()
    metrics = numeric(write(uri, output.key) or {})
    sha256 = checkpoint_manifest_sha256(uri) if kind == "checkpoint" else None
    return output.commit(uri, kind, ctx.run_id, sha256=sha256, metrics=metrics, mlflow_run_id=mlflow_run_id)
