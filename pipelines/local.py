"""Run the pipeline on this machine through `kfp.local` (SubprocessRunner): the same DAG as on
Kubeflow, each step a subprocess of the current Python environment, with local defaults for where
artifacts (a directory) and MLflow (a SQLite file) live."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import shutil
import tempfile
from pathlib import Path

from cai_lib.core.config import (
    ARTIFACT_ROOT_ENV,
    TRACKING_URI_ENV,
    Platform,
    local_platform,
    make_local_store,
)
from cai_lib.core.constitution import load_constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.tracking import scoped_environ
from cai_lib.platform.preflight import check_endpoints, check_run
from cai_lib.platform.run_config import RunConfig, params_as_pipeline_arguments
from cai_lib.steps.finish import OUTCOME_ENV
from pipelines.cai_pipeline import build_pipeline
from pipelines.fork_server import warm_tasks


def ui_command(tracking_uri: str) -> str:
    """How to open the MLflow UI on the run's tracking store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


@functools.cache
def _outcome_file() -> Path:
    """Where the exit handler writes a run's outcome: one file per process, in a folder removed at
    exit. The same path for every run of a process keeps the steps' environment the same from run
    to run, so the warm step servers of one run can serve the next (`fork_server.kept_servers`)."""
    folder = Path(tempfile.mkdtemp(prefix="cai-run-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / "outcome.json"


class RunFailed(CaiError):
    """The pipeline ran but did not succeed; `stages` says what each stage did before it stopped."""

    def __init__(self, message: str, stages: list[str]):
        super().__init__(message)
        self.stages = stages


def run_local(config: RunConfig, workdir: Path, platform: Platform | None = None, warm: bool = True) -> dict:
    """Run the whole pipeline locally after the pre-flight checks; returns the register step's
    summary (run id and root, report, registered versions, gate decision) plus `stages` (one
    line per stage saying whether it ran or reused an output) and `ui_command`. A run that does
    not succeed raises `RunFailed`, after its exit handler closed its MLflow run. `warm`: each step
    runs in a fork of a process that imported torch, transformers and MLflow once, where it can
    (`pipelines.fork_server`); otherwise each is a fresh Python, as kfp.local starts it."""
    from kfp import local

    platform = platform or local_platform(workdir)
    make_local_store(platform.tracking_uri)
    check_endpoints(platform.artifact_root, platform.tracking_uri, config.params.constitution)
    check_run(config.params, load_constitution(config.params.constitution))
    root = (workdir / ".cai" / "kfp").resolve()
    # Not raise_on_error: the exit handler runs and reports what happened either way.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=False)
    outcome_file = _outcome_file()
    outcome_file.unlink(missing_ok=True)  # an earlier run's
    # The steps are subprocesses: they read the installation's settings from the environment, as pods do.
    with (
        scoped_environ(
            **{
                ARTIFACT_ROOT_ENV: platform.artifact_root,
                TRACKING_URI_ENV: platform.tracking_uri,
                OUTCOME_ENV: str(outcome_file),
            }
        ),
        warm_tasks() if warm else contextlib.nullcontext(),
    ):
        build_pipeline(config.params, config.deploy)(**params_as_pipeline_arguments(config.params))
    if not outcome_file.is_file():
        raise RunFailed("the pipeline run failed and its exit handler did not report; see the step logs above", [])
    outcome = json.loads(outcome_file.read_text())
    outcome_file.unlink()
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
