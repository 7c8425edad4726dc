"""A pipeline run, read from its folder: what `cai compare` and `cai impact` read, and never write.

A run's folder `<artifact_root>/runs/<KFP run id>/` (docs/runs.md) holds `run.json` (its
parameters and the models its first step pinned), `constitution.yaml` (the pinned constitution),
one `stages/<stage>.json` record per stage, shard and round of iterated CAI (ran or reused, the
output key, where the output lies) and `summary.json`, which each round's register step rewrites:
the run has finished once its last round (the last it was compiled with, or one the gate refused)
has registered. The records point into the
content-addressed outputs, whose markers (`outputs/<stage>/<key>/_COMPLETE.json`) say what each
key hashes: so two runs' records say which stages differ, and their markers say why.

A run is named by its folder (a local directory or an `s3://` URI), by its KFP run id (looked up
under the artifact root), or by the id of its MLflow parent run or of one of its stage runs (whose
tag `cai.pipeline_run_id` names the KFP run).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from cai_lib.core.constitution import Constitution, parse_constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import MARKER, PINNED_CONSTITUTION_FILE, RUN_FILE, RUNS_DIR, STAGES_DIR, SUMMARY_FILE
from cai_lib.core.outputs import OutputMarker, StageRecord
from cai_lib.core.store import ArtifactStore, is_s3, join_uri


def run_records(run_root: str) -> list[StageRecord]:
    """The stage records in a run's folder."""
    store = ArtifactStore.open(run_root)
    keys = [key for key in store.list(STAGES_DIR) if "/" not in key.removeprefix(STAGES_DIR + "/")]
    return [StageRecord.model_validate_json(store.read_text(key)) for key in keys]


class PipelineRun:
    """One pipeline run's folder, read only."""

    def __init__(self, folder: ArtifactStore):
        if not folder.exists(RUN_FILE):
            raise CaiError(f"{folder.uri}: not a pipeline run's folder (no {RUN_FILE} there)")
        info = folder.read_json(RUN_FILE)
        self.folder = folder
        self.run_id: str = info["run_id"]
        self.run_name: str = info.get("run_name", "")
        self.params: dict = info.get("params", {})
        # {ref: {"load": ..., "content": ...}}; absent in folders written before runs recorded them.
        self.models: dict[str, dict] = info.get("models", {})

    @property
    def root(self) -> str:
        return self.folder.uri

    @cached_property
    def constitution(self) -> Constitution:
        return parse_constitution(
            self.folder.read_text(PINNED_CONSTITUTION_FILE), self.folder.uri_of(PINNED_CONSTITUTION_FILE)
        )

    @cached_property
    def records(self) -> list[StageRecord]:
        return run_records(self.root)

    @property
    def summary(self) -> dict | None:
        return self.folder.read_json(SUMMARY_FILE) if self.folder.exists(SUMMARY_FILE) else None

    @property
    def finished(self) -> bool:
        """The register step of the run's last round wrote its summary: each round's register step
        rewrites it, and a round the gate refused is the last (later rounds do not run)."""
        summary = self.summary
        if summary is None:
            return False
        rounds = int(self.params.get("rounds", 1))
        return not summary.get("passed", True) or int(summary.get("round", 1)) >= rounds

    @property
    def rounds(self) -> list[int]:
        """The rounds of iterated CAI the run recorded a stage in (1 for a run of one round)."""
        return sorted({r.round or 1 for r in self.records}) or [1]

    def last_round(self, stage: str) -> int:
        """The last round in which `stage` recorded an output (1 when it recorded none)."""
        return max((r.round or 1 for r in self.records if r.stage == stage and r.uri), default=1)

    def records_of(self, stage: str, round_: int = 1) -> list[StageRecord]:
        """The records of `stage` in round `round_`, one per shard in shard order (one for a stage
        that is not fanned out)."""
        found = (r for r in self.records if r.stage == stage and (r.round or 1) == round_)
        return sorted(found, key=lambda r: r.shard or 0)

    def output(self, stage: str, round_: int = 1) -> StageRecord | None:
        """The record of a stage that is not fanned out (a merge, a training stage, the evaluation)."""
        found = self.records_of(stage, round_)
        return found[0] if found and found[0].uri else None

    def marker(self, record: StageRecord) -> OutputMarker | None:
        """The marker of the output a record points at, or None when it is not there (an output
        deleted since, or a stage that keeps none). An output's data lies one level under its key."""
        if not record.key or not record.uri:
            return None
        store = ArtifactStore.open(record.uri.rstrip("/").rsplit("/", 1)[0])
        if not store.uri.endswith(record.key) or not store.exists(MARKER):
            return None
        return OutputMarker.model_validate_json(store.read_text(MARKER))

    def pinned(self, ref: str) -> str:
        """What the run loaded for model reference `ref` (an alias as the version it named then)."""
        return self.models.get(ref, {}).get("load", ref)

    def describe(self) -> str:
        return f"run {self.run_id}" + (f" ({self.run_name})" if self.run_name and self.run_name != self.run_id else "")


def find_run(ref: str, artifact_root: str, tracking_uri: str | None = None) -> PipelineRun:
    """The run `ref` names: a run folder (a path or `s3://` URI holding run.json), a KFP run id
    with a folder under `artifact_root`, or an MLflow run id of the run (its parent run or one of
    its stage runs) in the store at `tracking_uri`. A ref that names none is a `CaiError` saying
    where it looked."""
    from cai_lib.core.tracking import pipeline_run_of

    if is_s3(ref) or "/" in ref or Path(ref).is_dir():
        return PipelineRun(ArtifactStore.open(ref))
    folder = ArtifactStore.open(join_uri(artifact_root, RUNS_DIR, ref))
    if folder.exists(RUN_FILE):
        return PipelineRun(folder)
    tried = f"no run folder {folder.uri}"
    if tracking_uri:
        pipeline_run = pipeline_run_of(tracking_uri, ref)
        if pipeline_run:
            found = ArtifactStore.open(join_uri(artifact_root, RUNS_DIR, pipeline_run))
            if found.exists(RUN_FILE):
                return PipelineRun(found)
            raise CaiError(
                f"run '{ref}': the MLflow run of pipeline run {pipeline_run}, which has no folder {found.uri}; "
                "give the artifact root the run wrote to (--artifact-root)"
            )
        tried += f", no MLflow run with that id at {tracking_uri}"
    raise CaiError(f"run '{ref}': unknown ({tried})")


def finished_run(ref: str, artifact_root: str, tracking_uri: str | None = None) -> PipelineRun:
    """`find_run`, refusing a run that has not finished (still running, or failed before its end)."""
    run = find_run(ref, artifact_root, tracking_uri)
    if not run.finished:
        raise CaiError(
            f"{run.describe()} did not finish: {run.folder.uri_of(SUMMARY_FILE)} "
            + ("is missing" if run.summary is None else f"says round {run.summary.get('round', 1)} of {run.params.get('rounds', 1)}")
            + " (its last round's register step writes it); compare it once it has finished, or compare another run"
        )
    return run

