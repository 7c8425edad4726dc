"""Content-addressed stage outputs: found by what made them, reused by any run, never half-read.

A stage's output lives at `<artifact_root>/outputs/<stage>/<key>/`, where the key is a hash of
everything that determines it (`StageOutput.identity`: the stage, its settings, its code
version, its inputs' content hashes and the constitution sections it reads; see
`cai_lib.core.stage_table`). Outputs are outside any run's folder, so every run with the same key
finds them; a run's folder (`<artifact_root>/runs/<run id>/`) keeps only pointers to them
(`StageRecord`s), which `cai run` and the report read to say what ran and what was reused.

**Complete means the marker exists.** `_COMPLETE.json` (an `OutputMarker`: where the data lies,
its row count and sha256, the stage's metrics, the run that made it) is written last, after the
data and its manifest. Without it an output is incomplete: a dataset is resumed from its
finished shards (`data/`, `cai_lib.core.shards`), a checkpoint is written again.

**Concurrent writers.** Two pods can work on one key at once (a KFP retry racing a slow
original, two runs started together). Both mechanisms are used, each where it fits:

- datasets are written shard by shard with S3 conditional writes (`If-None-Match: *`, a hard
  link on a local disk): the first writer of a shard wins and the shard never changes, so the
  second writer resumes the first one's work instead of redoing it, and no shard can mix rows;
- checkpoints and evaluation directories are many files, which no single conditional write can
  cover, so each attempt writes under its own prefix (`attempt-<time>-<random>/`) and commits by
  writing the marker conditionally. The first commit wins and the marker never changes once
  written, so a pointer a downstream step has read stays valid; a losing attempt deletes itself,
  and the winner deletes attempts abandoned by killed pods.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

from cai_lib.core.errors import CaiError
from cai_lib.core.names import MARKER, canonical_sha256
from cai_lib.core.store import ArtifactStore, join_uri

DATA = "data"
ATTEMPT_PREFIX = "attempt-"
KEY_LENGTH = 32

Status = Literal["ran", "reused"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class OutputMarker(BaseModel):
    """The commit record of a complete output, written last."""

    stage: str = Field(description="The stage that made it.")
    key: str = Field(description="The output key: a hash of `identity`.")
    kind: Literal["dataset", "checkpoint", "directory"]
    uri: str = Field(description="Where the data lies: the dataset prefix or the committed attempt.")
    rows: int | None = Field(default=None, description="Rows of a dataset.")
    sha256: str | None = Field(
        default=None, description="Content hash: a dataset's rows, or a checkpoint's manifest."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="The stage's numeric metrics.")
    made_by_run: str = Field(description="The pipeline run (KFP run id) that made it.")
    made_by_mlflow_run: str | None = Field(
        default=None, description="The MLflow stage run that made it (None in markers older than the field)."
    )
    created_at: str = Field(default_factory=_now)
    identity: dict = Field(description="What the key hashes, for people reading the store.")


class StageOutput:
    """The output of one stage for one key, under `<root>/<stage>/<key>`."""

    def __init__(self, root: str, stage: str, identity: dict):
        self.stage = stage
        self.identity = {"stage": stage, **identity}
        self.key = canonical_sha256(self.identity)[:KEY_LENGTH]
        self.store = ArtifactStore.open(join_uri(root, stage, self.key))

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def rows_key(self) -> str:
        """The key without its `part` (which fan-out shard of the stage's work this output is): what
        the output's row ids derive from, so a row has the same id in whichever shard, and at
        whichever shard count, it was made."""
        return canonical_sha256({k: v for k, v in self.identity.items() if k != "part"})[:KEY_LENGTH]

    def complete(self) -> OutputMarker | None:
        """The marker of the complete output, or None while there is none."""
        if not self.store.exists(MARKER):
            return None
        marker = OutputMarker.model_validate_json(self.store.read_text(MARKER))
        if marker.key != self.key:
            raise CaiError(
                f"{self.store.uri_of(MARKER)}: records key {marker.key}, not {self.key}; refusing it"
            )
        return marker

    def data_uri(self) -> str:
        """Where a dataset is written (and resumed) shard by shard."""
        return self.store.uri_of(DATA)

    def new_attempt(self) -> str:
        """A fresh prefix for one attempt at a multi-file output (a checkpoint)."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        return self.store.uri_of(f"{ATTEMPT_PREFIX}{stamp}-{uuid.uuid4().hex[:8]}")

    def commit(
        self,
        uri: str,
        kind: Literal["dataset", "checkpoint", "directory"],
        run_id: str,
        rows: int | None = None,
        sha256: str | None = None,
        metrics: dict[str, float] | None = None,
        mlflow_run_id: str | None = None,
    ) -> OutputMarker:
        """Write the marker for the data at `uri` unless another writer committed first; returns
        the marker that stands. Attempts other than the committed one are deleted."""
        marker = OutputMarker(
            stage=self.stage,
            key=self.key,
            kind=kind,
            uri=uri,
            rows=rows,
            sha256=sha256,
            metrics=metrics or {},
            made_by_run=run_id,
            made_by_mlflow_run=mlflow_run_id,
            identity=self.identity,
        )
        self.store.write_text(MARKER, marker.model_dump_json(indent=2) + "\n", if_absent=True)
        standing = self.complete()
        if standing is None:
            raise CaiError(
                f"{self.store.uri_of(MARKER)}: written, but not there when read back; retry the step"
            )
        for attempt in self._attempts():
            if self.store.uri_of(attempt) != standing.uri:
                self.store.delete(attempt)
        return standing

    def _attempts(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.store.list("") if k.startswith(ATTEMPT_PREFIX)})


class DeferredRecord(BaseModel):
    """What a stage that reused its output would have written to its MLflow stage run: a reused
    stage loads no model and does no work, so opening MLflow (seconds of imports and a store
    connection, most of such a step's time) is left to the exit handler, which writes these for
    every stage of the run at once."""

    parent_run_id: str = Field(description="The pipeline's MLflow parent run.")
    label: str = Field(description="The stage run's name: the stage, with its shard as `name[i]`.")
    tags: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(
        default_factory=dict,
        description="Key in the run's folder -> artifact path in the stage run (files to upload).",
    )


class StageRecord(BaseModel):
    """What one stage did in one run: the pointer a run's folder keeps."""

    stage: str
    shard: int | None = Field(default=None, description="Shard index of a fanned-out stage.")
    round: int | None = Field(
        default=None, description="Round of iterated CAI of a stage that runs once per round (None: round 1)."
    )
    status: Status
    key: str | None = Field(default=None, description="Output key; None for stages that are never reused.")
    uri: str | None = Field(default=None, description="Where the output lies.")
    made_by_run: str = Field(description="The run that made the output (this run when it ran).")
    run_id: str
    deferred: DeferredRecord | None = Field(
        default=None,
        description="The MLflow record of a stage that reused its output, left for the exit handler "
        "to write; None once written, or for a stage that recorded itself in MLflow.",
    )

    @property
    def file_name(self) -> str:
        stage = self.stage if self.round is None else f"{self.stage}@round{self.round}"
        return f"{stage}.json" if self.shard is None else f"{stage}-{self.shard:03d}.json"


def round_of(round_: int) -> int | None:
    """How a record names round `round_`: round 1 is every run's only round and is not named."""
    return None if round_ == 1 else round_


def record_of(marker: OutputMarker, run_id: str, shard: int | None = None, round_: int = 1) -> StageRecord:
    """This run's record of `marker`: reused when another run made it, ran when this one did (a
    retried step finds its own earlier attempt's output)."""
    return StageRecord(
        stage=marker.stage,
        shard=shard,
        round=round_of(round_),
        status="ran" if marker.made_by_run == run_id else "reused",
        key=marker.key,
        uri=marker.uri,
        made_by_run=marker.made_by_run,
        run_id=run_id,
    )


def summary_lines(records: list[StageRecord], order: tuple[str, ...]) -> list[str]:
    """One line per stage in `order` (and per round, for the stages of later rounds): `stage NAME: ran`,
    or `stage NAME: reused (KEY, first made by run ID)` when every record of the stage (every shard)
    was reused; a later round's stage reads `stage NAME (round K): ...`."""
    lines = []
    rounds = sorted({r.round or 1 for r in records})
    for round_, name in ((k, n) for k in rounds for n in order):
        mine = [r for r in records if r.stage == name and (r.round or 1) == round_]
        if not mine:
            continue
        name = name if round_ == 1 else f"{name} (round {round_})"
        if all(r.status == "reused" for r in mine):
            keys = ", ".join(r.key[:12] for r in mine if r.key)
            makers = ", ".join(sorted({r.made_by_run for r in mine}))
            lines.append(f"stage {name}: reused ({keys}, first made by run {makers})")
        else:
            reused = sum(r.status == "reused" for r in mine)
            detail = f" ({reused} of {len(mine)} shards reused)" if reused else ""
            lines.append(f"stage {name}: ran{detail}")
    return lines
