"""Run the pipeline on this machine through `kfp.local` (SubprocessRunner): the same DAG as on
Kubeflow, each step a subprocess of the current Python environment, with local defaults for where
artifacts (a directory) and MLflow (a SQLite file) live."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from cai_lib.config import (
    ARTIFACT_ROOT_ENV,
    TRACKING_URI_ENV,
    Platform,
    RunConfig,
    params_as_pipeline_arguments,
)
from cai_lib.constitution import load_constitution
from cai_lib.errors import CaiError
from cai_lib.preflight import check_endpoints, check_run
from cai_lib.steps import OUTCOME_ENV
from cai_lib.tracking import scoped_environ
from pipelines.cai_pipeline import build_pipeline

LOCAL_ARTIFACT_ROOT = ".cai/artifacts"
# MLflow's own default store: `mlflow ui`, `mlflow models serve` and `mlflow.pyfunc.load_model`
# run in this directory find the run's registry with nothing set.
LOCAL_TRACKING_URI = "sqlite:///mlflow.db"


def local_platform(
    workdir: Path, artifact_root: str | None = None, tracking_uri: str | None = None
) -> Platform:
    """Where a local run keeps things: the argument, else `$CAI_ARTIFACT_ROOT` / `$MLFLOW_TRACKING_URI`,
    else `.cai/artifacts` and `sqlite:///mlflow.db` under `workdir`. Relative local paths are made
    absolute, since steps run as subprocesses."""
    root = artifact_root or os.environ.get(ARTIFACT_ROOT_ENV) or LOCAL_ARTIFACT_ROOT
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV) or LOCAL_TRACKING_URI
    if "://" not in root:
        root = str((workdir / root).resolve())
    sqlite = "sqlite:///"
    if uri.startswith(sqlite) and not uri.startswith(sqlite + "/"):
        db = (workdir / uri.removeprefix(sqlite)).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = f"{sqlite}{db}"
    return Platform(artifact_root=root, tracking_uri=uri)


def ui_command(tracking_uri: str) -> str:
    """How to open the MLflow UI on the run's tracking store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


class RunFailed(CaiError):
    """The pipeline ran but did not succeed; `stages` says what each stage did before it stopped."""

    def __init__(self, message: str, stages: list[str]):
        super().__init__(message)
        self.stages = stages


def run_local(config: RunConfig, workdir: Path, platform: Platform | None = None) -> dict:
    """Run the whole pipeline locally after the pre-flight checks; returns the register step's
    summary (run id and root, report, registered versions, gate decision) plus `stages` (one
    line per stage saying whether it ran or reused an output) and `ui_command`. A run that does
    not succeed raises `RunFailed`, after its exit handler closed its MLflow run."""
    from kfp import local

    platform = platform or local_platform(workdir)
    check_endpoints(platform.artifact_root, platform.tracking_uri, config.params.constitution)
    check_run(config.params, load_constitution(config.params.constitution))
    root = (workdir / ".cai" / "kfp").resolve()
    # Not raise_on_error: the exit handler runs and reports what happened either way.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=False)
    with tempfile.TemporaryDirectory(prefix="cai-run-") as tmp:
        outcome_file = Path(tmp) / "outcome.json"
        # The steps are subprocesses: they read the installation's settings from the environment, as pods do.
        with scoped_environ(
            **{
                ARTIFACT_ROOT_ENV: platform.artifact_root,
                TRACKING_URI_ENV: platform.tracking_uri,
                OUTCOME_ENV: str(outcome_file),
            }
        ):
            build_pipeline(config.params, config.deploy)(**params_as_pipeline_arguments(config.params))
        if not outcome_file.is_file():
            raise RunFailed(
                "the pipeline run failed and its exit handler did not report; see the step logs above", []
            )
        outcome = json.loads(outcome_file.read_text())
    if outcome["state"] != "SUCCEEDED" or outcome["summary"] is None:
        raise RunFailed(
            f"pipeline run {outcome['run_id']} {outcome['state'].lower()} ({outcome['error']}); the failed step's "
            "log above says why",
            outcome["stages"],
        )
    return {
        **outcome["summary"],
        "stages": outcome["stages"],
        "ui_command": ui_command(platform.tracking_uri),
    }
