"""What every step shares: the run context the first step makes, the pointers steps pass each
other (`DataRef`), and one-line errors.

A step takes plain values (strings, dicts, paths of small KFP artifacts), calls one stage of
`cai_lib`, records it in MLflow as a nested run of the pipeline run, and returns a `DataRef`: a
pointer to what it wrote in the artifact store. Big things (datasets, checkpoints) never travel as
KFP artifacts (the launcher would copy every multi-GB checkpoint into every step); only these
pointers do, with row count and sha256 in the artifact metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

from cai_lib.core.constitution import Constitution, parse_constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import OUTPUTS_DIR, RUNS_DIR
from cai_lib.core.outputs import OutputMarker
from cai_lib.core.shards import dataset_summary, read_dataset
from cai_lib.core.store import join_uri
from cai_lib.platform.run_config import PipelineParams


class DataRef(BaseModel):
    """A pointer to a dataset or checkpoint in the artifact store."""

    uri: str = Field(description="Where it lies: an s3:// prefix or a local directory.")
    kind: str = Field(description="dataset, checkpoint or directory.")
    rows: int | None = Field(default=None, description="Row count of a dataset.")
    sha256: str | None = Field(
        default=None, description="Content hash (dataset rows or checkpoint manifest)."
    )
    mlflow_run_id: str | None = Field(default=None, description="The MLflow stage run that made it.")
    earlier: list[DataRef] = Field(
        default_factory=list,
        description="An RL-CAI policy's pointer only: the RL-CAI policies of the run's earlier rounds of iterated "
        "CAI, round 1 first (the chain this policy continues).",
    )

    def write(self, path: str) -> dict:
        """Write the pointer to a KFP artifact file; returns the metadata to attach to it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.model_dump_json(exclude_defaults=True))
        return self.model_dump(exclude_none=True, exclude_defaults=True)

    def continued(self, start: DataRef, round_: int) -> DataRef:
        """This RL-CAI policy's pointer as round `round_`'s, trained from `start`: in a later round
        `start` is the round before's policy, which joins the chain of earlier rounds."""
        if round_ == 1:
            return self
        return self.model_copy(update={"earlier": [*start.earlier, start.model_copy(update={"earlier": []})]})

    @classmethod
    def read(cls, path: str) -> DataRef:
        return cls.model_validate_json(Path(path).read_text())

    @classmethod
    def of(cls, marker: OutputMarker) -> DataRef:
        return cls(
            uri=marker.uri,
            kind=marker.kind,
            rows=marker.rows,
            sha256=marker.sha256,
            mlflow_run_id=marker.made_by_mlflow_run,
        )


class PinnedModel(BaseModel):
    """A model reference fixed for the whole run: every stage loads the same checkpoint even if an
    alias (`models:/NAME@champion`) moves while the run goes on."""

    load: str = Field(description="The reference stages load: an alias becomes models:/NAME/VERSION.")
    content: str = Field(description="Content identity of the checkpoint (see cai_lib.engines.models.pin_model).")


class RunContext(BaseModel):
    """What every step after the first knows about the pipeline run."""

    params: PipelineParams
    run_id: str = Field(description="The KFP run id: unique per run, the run's identity.")
    run_name: str = Field(description="Display name of the run (MLflow run name).")
    artifact_root: str
    tracking_uri: str
    parent_run_id: str = Field(description="MLflow parent run id.")
    mlflow_run_url: str = Field(
        default="", description="The parent run's page in the MLflow UI (empty for a local store)."
    )
    models: dict[str, PinnedModel] = Field(
        default_factory=dict, description="Each model reference of the run, pinned once by the first step."
    )

    def model(self, ref: str) -> PinnedModel:
        """The pin of `ref`: what to load and its content identity (for output keys)."""
        if ref not in self.models:
            raise CaiError(f"model '{ref}': not pinned by the run's first step")
        return self.models[ref]

    @property
    def run_root(self) -> str:
        """The run's folder: pointers to the outputs it used, its pinned constitution, its report."""
        return join_uri(self.artifact_root, RUNS_DIR, self.run_id)

    @property
    def outputs_root(self) -> str:
        """Where content-addressed stage outputs lie, shared by every run."""
        return join_uri(self.artifact_root, OUTPUTS_DIR)


def one_line_errors(step: Callable) -> Callable:
    """A user's mistake (`CaiError`) ends the step's process with one line, not a traceback."""
    import functools

    @functools.wraps(step)
    def run(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except CaiError as err:
            raise SystemExit(f"error: {err}") from None

    return run


def pinned_constitution(path: str) -> Constitution:
    return parse_constitution(Path(path).read_text(), path)


def dataset_ref(uri: str) -> DataRef:
    summary = dataset_summary(uri)
    return DataRef(uri=uri, kind="dataset", rows=summary["rows"], sha256=summary["sha256"])


def work_items(context: dict, shards: int) -> list[dict]:
    return [{"context": context, "shard": shard, "shards": shards} for shard in range(shards)]


def write_finished_dataset(uri: str, rows: list[BaseModel]) -> None:
    """A one-shard dataset (the same layout the sharded stages write)."""
    from cai_lib.core.shards import ShardedOutput

    ShardedOutput(uri, {"rows": [r.id for r in rows]}).run(rows, max(len(rows), 1), lambda chunk: list(chunk))


def slice_of(uri: str, model: type[BaseModel], shard: int, shards: int) -> list:
    """Shard `shard` of `shards` of a dataset: every `shards`-th row from row `shard` (interleaved,
    so shards stay even when rows are ordered by length or source)."""
    return list(read_dataset(uri, model))[shard::shards]
