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

from cai_lib.errors import CaiError

if TYPE_CHECKING:
    from mlflow import MlflowClient

RUN_KIND_TAG = "cai.run_kind"
STAGE_TAG = "cai.stage"
PARENT_RUN_TAG = "mlflow.parentRunId"
CONFIG_ARTIFACT = "config.json"
METRICS_ARTIFACT = "metrics.json"
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
def _environ(**values: str) -> Iterator[None]:
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
    with _environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=CHECK_TIMEOUT_S):
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
    run_name: str,
    config: Mapping[str, Any],
    constitution_ref: str,
    constitution_sha256: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Open (or reopen, by `run_name`) the parent run of a pipeline run and return its id.

    Logs the whole run config flattened into params ("sft.learning_rate"), the constitution ref
    and sha256 as params `constitution.ref` / `constitution.sha256`, and the untruncated config
    as the artifact config.json (params longer than MLflow's 6000-character limit are truncated
    with a marker). Reopening a run with a different config is a `CaiError`, since params are
    immutable.
    """
    from mlflow.entities import Param, RunTag
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri)
    experiment_id = _experiment_id(client, experiment)
    run_tags = {**(tags or {}), RUN_KIND_TAG: "pipeline"}
    run_filter = (
        f"tags.`{RUN_KIND_TAG}` = 'pipeline' and attributes.run_name = {filter_literal(run_name, 'run name')}"
    )
    run_id = _find_or_create_run(client, experiment_id, run_filter, run_name, run_tags)
    params = {
        **flatten_params(config),
        "constitution.ref": constitution_ref,
        "constitution.sha256": constitution_sha256,
    }
    entries = [Param(_safe_key(key), _param_value(value)) for key, value in sorted(params.items())]
    try:
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=entries[start : start + PARAMS_PER_BATCH])
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise CaiError(
            f"MLflow run '{run_name}' in experiment '{experiment}' was started with a different config "
            f"({str(err).splitlines()[0][:200]}); use a new run name"
        ) from None
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in run_tags.items()])
    client.log_dict(run_id, dict(config), CONFIG_ARTIFACT)
    return run_id


def end_pipeline_run(tracking_uri: str | None, run_id: str, succeeded: bool) -> None:
    """Mark the parent run FINISHED or FAILED; stage runs end themselves."""
    connect(tracking_uri).set_terminated(run_id, "FINISHED" if succeeded else "FAILED")


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
        self.client.log_dict(self.run_id, self._metrics, METRICS_ARTIFACT)

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
    model references such as `models:/NAME@champion` resolve against the run's registry.
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
    try:
        with _environ(MLFLOW_TRACKING_URI=os.environ.get("MLFLOW_TRACKING_URI") or client.tracking_uri):
            yield StageRun(client, run_id, parent_run_id, stage_name)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
