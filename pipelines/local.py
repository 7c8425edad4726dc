"""Run the pipeline on this machine through `kfp.local` (SubprocessRunner): the same DAG as on
Kubeflow, each step a subprocess of the current Python environment, with local defaults for the
artifact store (a directory) and MLflow (a SQLite file)."""

from __future__ import annotations

import json
from pathlib import Path

from cai_lib.config import RunConfig, params_as_pipeline_arguments
from cai_lib.preflight import check_endpoints
from pipelines.cai_pipeline import build_pipeline


def localise(config: RunConfig, workdir: Path) -> RunConfig:
    """Make relative local paths absolute (steps run as subprocesses), keeping URIs as they are."""
    params = config.params
    updates = {}
    if "://" not in params.artifact_root:
        updates["artifact_root"] = str((workdir / params.artifact_root).resolve())
    sqlite = "sqlite:///"
    if params.mlflow_tracking_uri.startswith(sqlite) and not params.mlflow_tracking_uri.startswith(
        sqlite + "/"
    ):
        db = (workdir / params.mlflow_tracking_uri.removeprefix(sqlite)).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        updates["mlflow_tracking_uri"] = f"{sqlite}{db}"
    return config.model_copy(update={"params": params.model_copy(update=updates)})


def ui_command(tracking_uri: str) -> str:
    """How to open the MLflow UI on the run's tracking store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def run_local(config: RunConfig, workdir: Path) -> dict:
    """Run the whole pipeline locally after the pre-flight checks; returns the register step's
    summary (run root, report, registered versions, gate decision) plus `ui_command`."""
    from kfp import local

    config = localise(config, workdir)
    check_endpoints(config.params)
    root = (workdir / ".cai" / "kfp").resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    task = build_pipeline(config.params, config.deploy)(**params_as_pipeline_arguments(config.params))
    summary = json.loads(task.output)
    summary["ui_command"] = ui_command(config.params.mlflow_tracking_uri)
    return summary
