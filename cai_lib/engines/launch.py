"""Run a training stage in this process or under `torchrun`: the one entry point of every trainer.

A `TrainingJob` names the stage, its model, its datasets (JSONL files or dataset URIs) and its
config. `launch` runs it here when one process trains, or writes it to a file and starts
`torchrun --standalone` with one process per accelerator (or N gloo processes on a CPU); each rank
runs `python -m cai_lib.engines.launch JOB` and rank 0 writes the checkpoint and the metrics. A Kubeflow
TrainJob runs the same module under the runtime's `torchrun`, which reads its `PET_*` variables.

The launcher knows no trainer: `TRAINERS` names, per stage, the method module that trains it,
imported only when a job of that stage runs (as `cai_lib.engines.generation` names its backends).
Such a module defines `JOB_CONFIG`, the pydantic model of its config, and
`run_job(job, config)`, which trains and returns the metrics on the main process.

Example (what `cai stage sft --processes 2` runs):
    torchrun --standalone --nproc-per-node 2 -m cai_lib.engines.launch /tmp/cai-job/job.json
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai_lib.core.config import format_validation_error
from cai_lib.core.errors import CaiError
from cai_lib.core.names import JOB_FILE, METRICS_FILE
from cai_lib.core.records import Preference, PromptRecord, Trace
from cai_lib.core.shards import read_dataset
from cai_lib.core.store import ArtifactStore, checkpoint_location, join_uri

log = logging.getLogger(__name__)
# The method module that trains each stage (see the module docstring).
TRAINERS: dict[str, str] = {
    "sft": "cai_lib.method.sft",
    "train_pm": "cai_lib.method.preference_model",
    "rl": "cai_lib.method.rl",
}
Stage = Literal["sft", "train_pm", "rl"]
Row = TypeVar("Row", bound=BaseModel)
# What each stage reads: dataset roles, required or optional.
DATA_ROLES: dict[str, tuple[set[str], set[str]]] = {
    "sft": ({"traces"}, {"helpful"}),
    "train_pm": ({"ai"}, {"human"}),
    "rl": ({"prompts"}, {"preferences"}),
}
# The record each dataset role holds (what the trainers read with `TrainingJob.rows`).
ROW_MODELS: dict[str, type[BaseModel]] = {
    "traces": Trace,
    "helpful": Trace,
    "ai": Preference,
    "human": Preference,
    "prompts": PromptRecord,
    "preferences": Preference,
}


class TrainingJob(BaseModel):
    """Everything a training process needs, as plain locations every rank can read."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage
    model: str = Field(
        description="The model to train: the base model (sft, train_pm) or the starting policy (rl)."
    )
    out: str = Field(description="Where rank 0 writes the checkpoint (a directory or s3:// prefix).")
    data: dict[str, list[str]] = Field(
        description="Dataset role (see DATA_ROLES) -> JSONL files or dataset URIs, read in order as one."
    )
    reward: str | None = Field(default=None, description="The preference model (rl).")
    config: dict = Field(
        description="The stage's config (SFTStageConfig, PreferenceModelConfig or RLConfig)."
    )
    metrics: str | None = Field(default=None, description="Where rank 0 also writes the metrics JSON.")

    def rows(self, role: str, model: type[Row]) -> list[Row]:
        """Every row of dataset role `role` (none when the job has no such role), in order."""
        return [row for uri in self.data.get(role, []) for row in read_dataset(uri, model)]

    def checked(self) -> TrainingJob:
        """The job with its config validated by the stage's model; raises `CaiError` naming what is wrong."""
        required, optional = DATA_ROLES[self.stage]
        missing, unknown = required - self.data.keys(), self.data.keys() - required - optional
        if missing or unknown:
            raise CaiError(f"{self.stage}: datasets missing {sorted(missing)}, unknown {sorted(unknown)}")
        if self.stage == "rl" and not self.reward:
            raise CaiError("rl: needs a reward model")
        stage_config(self)
        return self


def stage_config(job: TrainingJob) -> BaseModel:
    """The job's config as the stage's own config model; `CaiError` naming the bad field."""
    trainer = importlib.import_module(TRAINERS[job.stage])
    try:
        return trainer.JOB_CONFIG.model_validate(job.config)
    except ValidationError as err:
        raise CaiError(format_validation_error(err, f"{job.stage} config")) from None


def run(job: TrainingJob) -> BaseModel | None:
    """Train `job` in this process (one rank of many under torchrun); returns the stage's metrics
    on the main process, None on the others."""
    return importlib.import_module(TRAINERS[job.stage]).run_job(job, stage_config(job))


def staged_rows(folder: Path, name: str, rows: Sequence[BaseModel]) -> list[str]:
    """Write `rows` to `folder/name.jsonl` for a job's ranks to read (rows read from sources that
    are not datasets: prompt files, hub datasets, human comparisons); returns the job's data entry."""
    path = folder / f"{name}.jsonl"
    path.write_text("".join(row.model_dump_json() + "\n" for row in rows), encoding="utf-8")
    return [str(path)]


def launch(job: TrainingJob, processes: int) -> dict:
    """Train `job` with `processes` processes on this machine; returns rank 0's metrics as a dict.

    One process runs here. More start under `torchrun --standalone` (a free local rendezvous);
    their output goes to this process's stdout and stderr. Raises `CaiError` when a rank fails.
    """
    job.checked()
    if processes == 1:
        return run(job).model_dump(mode="json")
    check_inputs(job)
    with tempfile.TemporaryDirectory(prefix="cai-job-") as folder:
        metrics = Path(folder) / METRICS_FILE
        path = Path(folder) / JOB_FILE
        path.write_text(job.model_copy(update={"metrics": str(metrics)}).model_dump_json())
        log.info("%s: starting %d training processes under torchrun", job.stage, processes)
        status = subprocess.run(torchrun_command(processes, str(path)), check=False).returncode
        if status != 0:
            raise CaiError(
                f"{job.stage}: training under torchrun with {processes} processes failed (exit status {status}); "
                "the ranks' errors are above"
            )
        return read_metrics(str(metrics))


def check_inputs(job: TrainingJob) -> None:
    """Read everything the ranks will read, once, before torchrun starts them: a bad dataset row,
    an unfinished dataset, a model ref that names nothing or an output that is not empty is one
    line here rather than one traceback per rank. Resolving the models also fills the model cache
    that the ranks then share."""
    from cai_lib.engines.models import resolve_model

    checkpoint_location(job.out)
    for role, uris in job.data.items():
        for uri in uris:
            for _ in read_dataset(uri, ROW_MODELS[role]):
                pass
    for ref in filter(None, (job.model, job.reward)):
        resolve_model(ref)


def torchrun_command(processes: int | None, job_uri: str) -> list[str]:
    """The command that trains the job at `job_uri` under torchrun: `processes` local ranks on one
    machine, or (None) the world the environment describes (`PET_*`, as a TrainJob's runtime sets)."""
    if processes is None:
        return ["torchrun", "-m", "cai_lib.engines.launch", job_uri]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
        "-m", "cai_lib.engines.launch", job_uri,
    ]  # fmt: skip


def file_at(uri: str) -> tuple[ArtifactStore, str]:
    """(the store of the folder holding the file at `uri`, the file's name): a local path or s3://."""
    parent, _, name = uri.rpartition("/")
    return ArtifactStore.open(parent or "."), name


def read_job(uri: str) -> TrainingJob:
    """The job at `uri` (a local file or an s3:// object)."""
    store, name = file_at(uri)
    return TrainingJob.model_validate(store.read_json(name)).checked()


def write_job(job: TrainingJob, folder_uri: str) -> str:
    """Write `job` under `folder_uri` (where every node of a TrainJob can read it); returns its URI."""
    ArtifactStore.open(folder_uri).write_json(JOB_FILE, job.model_dump(mode="json"))
    return join_uri(folder_uri, JOB_FILE)


def read_metrics(uri: str) -> dict:
    """The metrics rank 0 wrote at `uri`; `CaiError` when there are none (the job did not finish)."""
    store, name = file_at(uri)
    if not store.exists(name):
        raise CaiError(f"{uri}: no metrics; the training job ended without rank 0 writing them")
    return store.read_json(name)


def main(argv: list[str] | None = None) -> None:
    """`python -m cai_lib.engines.launch JOB_URI`: one rank of a training job; rank 0 writes the metrics."""
    from cai_lib.engines.training import current_world

    args = sys.argv[1:] if argv is None else argv
    world = current_world()
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {world.rank}/{world.size}] %(levelname)s %(name)s: %(message)s"
    )
    try:
        job = read_job(args[0])
        metrics = run(job)
    except CaiError as err:
        print(f"error: [rank {world.rank}] {err}", file=sys.stderr)
        sys.exit(2)
    if world.is_main and job.metrics:
        store, name = file_at(job.metrics)
        store.write_json(name, metrics.model_dump(mode="json"))


if __name__ == "__main__":
    main()
