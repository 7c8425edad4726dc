"""MLflow tracking for pipeline runs: one parent run per pipeline run, one nested run per stage.

Every pipeline step may run in its own process or pod, so nothing is kept in memory between
steps: the first step calls `start_pipeline_run` and passes the returned run id on, and each later
step opens `stage_run(tracking_uri, parent_run_id, stage_name)` to log its metrics and artifacts.
Both are idempotent by name, so a retried pod reuses its run instead of leaving a duplicate.

The tracking URI comes from the `tracking_uri` argument or else `MLFLOW_TRACKING_URI`. Before any
work, an HTTP tracking server gets one quick request with MLflow's own retries switched off;
if it does not answer, a `CaiError` says which URI and where it came from. Later requests keep
MLflow's normal retries with backoff (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`), for transient errors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cai_lib.core.errors import CaiError
from cai_lib.core.names import (
    KFP_RUN_URL_TAG,
    METRICS_FILE,
    PIPELINE_RUN_TAG,
    RUN_CONFIG_ARTIFACT,
    RUN_KIND_TAG,
    STAGE_TAG,
)
from cai_lib.core.settings import settings, variable

if TYPE_CHECKING:
    from mlflow import MlflowClient

# Browser addresses of the two UIs (the chart's kfp.uiUrl and mlflow.uiUrl): in a cluster the
# tracking URI is a Service name no browser reaches.
KFP_UI_ENV = variable("kfp_ui_url")
MLFLOW_UI_ENV = variable("mlflow_ui_url")
# Set inside a stage run's block to the KFP run id, so that what a step does (e.g. hold the
# promotion lock) can be traced to its pipeline run.
PIPELINE_RUN_ENV = variable("pipeline_run_id")
PARENT_RUN_TAG = "mlflow.parentRunId"
# MLflow refuses longer param values; the full value is kept in the config.json artifact.
MAX_PARAM_VALUE = 6000
TRUNCATED = "...[truncated; full value in config.json]"
PARAMS_PER_BATCH = 100
CHECK_TIMEOUT_S = "30"
_UNSAFE_KEY_CHARS = re.compile(r"[^\w\-. :/]")


def resolve_tracking_uri(tracking_uri: str | None) -> tuple[str, str]:
    """The tracking URI to use and where it came from (for error messages)."""
    if tracking_uri:
        return tracking_uri, "the tracking_uri argument (--tracking-uri)"
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env, "MLFLOW_TRACKING_URI"
    raise CaiError(
        "no MLflow tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI "
        "(e.g. http://mlflow.example:5000 or sqlite:///mlflow.db)"
    )


def connect(tracking_uri: str | None) -> MlflowClient:
    """An MLflow client for tracking and registry at the resolved URI, checked to answer."""
    from mlflow import MlflowClient

    uri, source = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if uri.startswith(("http://", "https://")):
        _check_reachable(client, uri, source)
    return client


@contextmanager
def scoped_environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_reachable(client: MlflowClient, uri: str, source: str) -> None:
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    # MLflow reads these at request time; without them a dead server takes minutes of retries.
    with scoped_environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=CHECK_TIMEOUT_S):
        try:
            client.search_experiments(max_results=1)
        except (MlflowException, RequestException) as err:
            detail = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise CaiError(
                f"MLflow tracking server {uri} (set by {source}) did not answer: {detail}; "
                "start it or point the tracking URI at a running server"
            ) from None


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}: strings as they are, other values as JSON."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return flat


def _param_value(value: str) -> str:
    if len(value) <= MAX_PARAM_VALUE:
        return value
    return value[: MAX_PARAM_VALUE - len(TRUNCATED)] + TRUNCATED


def _safe_key(key: str) -> str:
    return _UNSAFE_KEY_CHARS.sub("_", key)[:250]


def filter_literal(value: str, what: str) -> str:
    """`value` as an MLflow search-filter string literal; names with quotes are refused, not escaped."""
    if not value or any(char in value for char in "'\"\\"):
        raise CaiError(f"{what} {value!r}: must be non-empty and contain no quotes or backslashes")
    return f"'{value}'"


def _experiment_id(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage != "active":
        raise CaiError(f"MLflow experiment '{name}' is deleted; restore it or choose another experiment name")
    return experiment.experiment_id


def _find_or_create_run(
    client: MlflowClient, experiment_id: str, filter_string: str, run_name: str, tags: dict[str, str]
) -> str:
    """The id of the oldest active run matching `filter_string`, or of a new one with `tags`."""
    found = client.search_runs(
        [experiment_id], filter_string, max_results=1, order_by=["attributes.start_time ASC"]
    )
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def start_pipeline_run(
    tracking_uri: str | None,
    experiment: str,
    pipeline_run_id: str,
    display_name: str,
    config: Mapping[str, Any],
    constitution_ref: str,
    constitution_sha256: str,
) -> str:
    """Open (or reopen, by `pipeline_run_id`) the parent run of a pipeline run; returns its id.

    The parent run is found by the tag `cai.pipeline_run_id` (the KFP run id, unique per run),
    so a retried first step reopens it and two runs with the same display name never share one.
    Logs the whole run config flattened into params ("sft.learning_rate"), the constitution ref
    and sha256 as params `constitution.ref` / `constitution.sha256`, and the untruncated config
    as the artifact config.json (params longer than MLflow's 6000-character limit are truncated
    with a marker).
    """
    from mlflow.entities import Param, RunTag

    client = connect(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    run_tags = {PIPELINE_RUN_TAG: pipeline_run_id, RUN_KIND_TAG: "pipeline"}
    kfp_ui = settings().kfp_ui_url
    if kfp_ui:
        run_tags[KFP_RUN_URL_TAG] = f"{kfp_ui.rstrip('/')}/#/runs/details/{pipeline_run_id}"
    run_id = _find_or_create_run(
        client, experiment_id, _pipeline_filter(pipeline_run_id), display_name, run_tags
    )
    params = {
        **flatten_params(config),
        "constitution.ref": constitution_ref,
        "constitution.sha256": constitution_sha256,
    }
    logged = client.get_run(run_id).data.params
    entries = [
        Param(_safe_key(key), _param_value(value))
        for key, value in sorted(params.items())
        if _safe_key(key) not in logged  # params are immutable: a retry logs only what is missing
    ]
    for start in range(0, len(entries), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=entries[start : start + PARAMS_PER_BATCH])
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in run_tags.items()])
    client.log_dict(run_id, dict(config), RUN_CONFIG_ARTIFACT)
    return run_id


def run_url(tracking_uri: str | None, run_id: str) -> str:
    """The MLflow UI's page of `run_id`: under $CAI_MLFLOW_UI_URL, else under an http(s) tracking
    URI; "" for a local store, which has no UI until `mlflow ui` serves it."""
    base = settings().mlflow_ui_url or resolve_tracking_uri(tracking_uri)[0]
    if not base.startswith(("http://", "https://")):
        return ""
    experiment_id = connect(tracking_uri).get_run(run_id).info.experiment_id
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _pipeline_filter(pipeline_run_id: str) -> str:
    return (
        f"tags.`{RUN_KIND_TAG}` = 'pipeline' and "
        f"tags.`{PIPELINE_RUN_TAG}` = {filter_literal(pipeline_run_id, 'pipeline run id')}"
    )


def finish_pipeline_run(
    tracking_uri: str | None, experiment: str, pipeline_run_id: str, succeeded: bool
) -> str | None:
    """Close the parent run of `pipeline_run_id` as FINISHED or FAILED, and any of its stage runs
    left RUNNING (by killed pods) as FAILED: what a pipeline's exit handler does, whatever
    happened to its steps. Returns its MLflow run id, or None when the run never opened one (it
    failed before its first step finished)."""
    parent = pipeline_parent_run(tracking_uri, experiment, pipeline_run_id)
    if parent is None:
        return None
    client = connect(tracking_uri)
    # Stage runs still RUNNING belong to pods that were killed and never retried.
    orphans = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.`{PARENT_RUN_TAG}` = {filter_literal(parent, 'parent run id')} and attributes.status = 'RUNNING'",
    )
    for run in orphans:
        client.set_terminated(run.info.run_id, "FAILED")
    client.set_terminated(parent, "FINISHED" if succeeded else "FAILED")
    return parent


def pipeline_run_of(tracking_uri: str | None, run_id: str) -> str | None:
    """The KFP run id of MLflow run `run_id` (a pipeline's parent run, or one of its stage runs),
    or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    tags = run.data.tags
    if PIPELINE_RUN_TAG in tags:
        return tags[PIPELINE_RUN_TAG]
    parent = tags.get(PARENT_RUN_TAG)
    return pipeline_run_of(tracking_uri, parent) if parent else None


def pipeline_parent_run(tracking_uri: str | None, experiment: str, pipeline_run_id: str) -> str | None:
    """The MLflow parent run of pipeline run `pipeline_run_id` in `experiment`, or None."""
    client = connect(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], _pipeline_filter(pipeline_run_id), max_results=1)
    return runs[0].info.run_id if runs else None


def log_files(tracking_uri: str | None, run_id: str, paths: list[Path], artifact_path: str) -> None:
    """Upload local files as artifacts of an existing run, under `artifact_path`."""
    client = connect(tracking_uri)
    for path in paths:
        client.log_artifact(run_id, str(path), artifact_path)


class StageRun:
    """The nested run of one stage: metrics and artifacts go here (and metrics also to the parent)."""

    def __init__(self, client: MlflowClient, run_id: str, parent_run_id: str, stage_name: str):
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.stage_name = stage_name
        self._metrics: dict[str, float] = {}

    def log_stage_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics on the stage run, as `<stage>.<key>` on the parent run (so pipeline runs
        can be compared side by side in the MLflow UI), and all metrics so far as metrics.json.
        """
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        values = {_safe_key(key): float(value) for key, value in metrics.items()}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step or 0) for k, v in values.items()])
        self.client.log_batch(
            self.parent_run_id,
            metrics=[
                Metric(_safe_key(f"{self.stage_name}.{k}"), v, now, step or 0) for k, v in values.items()
            ],
        )
        self._metrics.update(values)
        self.client.log_dict(self.run_id, self._metrics, METRICS_FILE)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tag the stage run (e.g. `cai.reuse`: ran or reused)."""
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (the HTML report, the pinned constitution YAML) or a directory."""
        path = Path(local_path)
        if not path.exists():
            raise CaiError(f"{path}: no such file to log to MLflow run {self.run_id}")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


@contextmanager
def stage_run(tracking_uri: str | None, parent_run_id: str, stage_name: str) -> Iterator[StageRun]:
    """The nested run of `stage_name` under the parent run, created once per (parent, stage).

    A retried step finds and reopens the run its earlier attempt made instead of adding a
    duplicate. The run ends FINISHED when the block exits normally and FAILED when it raises.
    Inside the block `$MLFLOW_TRACKING_URI` names this store (unless it is already set), so that
    model references such as `models:/NAME@champion` resolve against the run's registry, and
    `$CAI_PIPELINE_RUN_ID` names the pipeline run (so a promotion lock names its holder).
    """
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise CaiError(f"parent MLflow run {parent_run_id!r} not found at {client.tracking_uri}") from None
    run_filter = (
        f"tags.`{PARENT_RUN_TAG}` = {filter_literal(parent_run_id, 'parent run id')} "
        f"and tags.`{STAGE_TAG}` = {filter_literal(stage_name, 'stage name')}"
    )
    tags = {PARENT_RUN_TAG: parent_run_id, RUN_KIND_TAG: "stage", STAGE_TAG: stage_name}
    run_id = _find_or_create_run(client, parent.info.experiment_id, run_filter, stage_name, tags)
    scope = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or client.tracking_uri}
    if PIPELINE_RUN_TAG in parent.data.tags:
        scope[PIPELINE_RUN_ENV] = parent.data.tags[PIPELINE_RUN_TAG]
    try:
        with scoped_environ(**scope):
            yield StageRun(client, run_id, parent_run_id, stage_name)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
