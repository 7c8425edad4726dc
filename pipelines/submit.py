"""Submit the pipeline to a Kubeflow Pipelines cluster: compile, upload as a version, create a run.

The compiled package carries the run config's params as parameter defaults and its deploy
section (images, GPU profiles, secrets) in the platform spec; the run's parameters are the same
params (`params_as_pipeline_arguments`), so the Kubeflow UI shows the exact config of each run.
A pipeline version is named after the sha256 of its compiled YAML, so submitting the same
config twice reuses the version instead of piling up identical ones.

Host and auth: the API server is `--host` (or `KFP_HOST`), e.g. `http://localhost:8080` through
`kubectl port-forward svc/ml-pipeline-ui -n kubeflow 8080:80`, or
`http://ml-pipeline.kubeflow.svc.cluster.local:8888` inside the cluster. On multi-user Kubeflow,
a pod authenticates with a projected ServiceAccount token (audience `pipelines.kubeflow.org`)
read from `KF_PIPELINES_SA_TOKEN_PATH` (default `/var/run/secrets/kubeflow/pipelines/token`) when
that file exists, and `--namespace` names the profile namespace the experiment and pipeline
belong to.

Run: cai submit --host http://localhost:8080 --config my-run.yaml --set constitution=harmless@1.0.0
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field

from cai_lib.config import RunConfig, params_as_pipeline_arguments
from cai_lib.errors import CaiError

PIPELINE_NAME = "constitutional-ai"
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
HEALTHZ = "/apis/v2beta1/healthz"
CHECK_TIMEOUT_S = 10


class SubmittedRun(BaseModel):
    """A run created on a Kubeflow Pipelines server."""

    run_id: str = Field(description="KFP run id.")
    pipeline_id: str = Field(description="The pipeline the run belongs to.")
    version_id: str = Field(description="The uploaded pipeline version the run executes.")
    url: str = Field(description="The run's page in the Kubeflow Pipelines UI.")


def require_host(host: str | None) -> str:
    """The KFP host URL, with its scheme; a `CaiError` when none was given."""
    if not host:
        raise CaiError(
            "cai submit needs --host or KFP_HOST (the Kubeflow Pipelines API URL, e.g. http://localhost:8080)"
        )
    if not host.startswith(("http://", "https://")):
        raise CaiError(f"KFP host {host!r}: give the URL with its scheme, e.g. http://{host}")
    return host.rstrip("/")


def check_host(host: str) -> None:
    """The KFP API server at `host` answers HTTP (any status: auth is the client's business)."""
    try:
        urllib.request.urlopen(host + HEALTHZ, timeout=CHECK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise CaiError(
            f"Kubeflow Pipelines host {host} (from --host / KFP_HOST) is unreachable: {reason}; "
            "check the URL or the port-forward"
        ) from None


def connect_kfp(host: str | None, namespace: str | None = None):
    """A `kfp.Client` for `host`, checked to answer first (a dead host fails in seconds, not minutes).

    Uses the projected ServiceAccount token at `KF_PIPELINES_SA_TOKEN_PATH` when that file exists
    (kfp.Client ignores it whenever a host is given).
    """
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    host = require_host(host)
    check_host(host)
    token_path = os.environ.get(SA_TOKEN_ENV, SA_TOKEN_PATH)
    credentials = ServiceAccountTokenVolumeCredentials(token_path) if Path(token_path).is_file() else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return kfp.Client(host=host, namespace=namespace or "kubeflow", credentials=credentials)
        except TimeoutError:
            raise CaiError(
                f"Kubeflow Pipelines host {host} answered but its healthz API refused us; "
                f"check authentication ({SA_TOKEN_ENV}) or pass --namespace"
            ) from None


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _pipeline_version(client, package: Path, pipeline_name: str, namespace: str | None) -> tuple[str, str]:
    """(pipeline id, version id) of `package`: the pipeline is created if missing, the version
    (named by the package's sha256) uploaded if missing."""
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:12]
    version_name = f"{pipeline_name}-{digest}"
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        description = "Constitutional AI (Bai et al. 2022): SL-CAI, AI feedback, preference model, RL-CAI."
        pipeline_id = client.upload_pipeline(
            str(package), pipeline_name=pipeline_name, description=description, namespace=namespace
        ).pipeline_id
    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=_name_filter(version_name))
    if found.pipeline_versions:
        return pipeline_id, found.pipeline_versions[0].pipeline_version_id
    version = client.upload_pipeline_version(
        str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id
    )
    return pipeline_id, version.pipeline_version_id


def submit_run(
    host: str | None,
    config: RunConfig,
    experiment: str,
    run_name: str | None = None,
    pipeline_name: str = PIPELINE_NAME,
    namespace: str | None = None,
    client=None,
) -> SubmittedRun:
    """Compile the pipeline for `config`, upload it as a version and start a run of it.

    The run's parameters are `config.params`; the experiment is created if missing. `client` is
    a `kfp.Client` (default: `connect_kfp(host, namespace)`). A missing or unreachable host, or
    an API error (e.g. 403), is a `CaiError` naming the host.
    """
    import kfp_server_api

    from pipelines.cai_pipeline import compile_pipeline

    host = require_host(host)
    client = client or connect_kfp(host, namespace)
    arguments = params_as_pipeline_arguments(config.params)
    run_name = run_name or f"{config.params.constitution} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}"
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        package = Path(compile_pipeline(str(Path(tmp) / "pipeline.yaml"), config.params, config.deploy))
        try:
            pipeline_id, version_id = _pipeline_version(client, package, pipeline_name, namespace)
            experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
            run = client.run_pipeline(
                experiment_id, run_name, params=arguments, pipeline_id=pipeline_id, version_id=version_id
            )
        except kfp_server_api.ApiException as err:
            raise CaiError(
                f"Kubeflow Pipelines host {host} refused the submission: {err.status} {err.reason}"
            ) from None
    return SubmittedRun(
        run_id=run.run_id,
        pipeline_id=pipeline_id,
        version_id=version_id,
        url=f"{host}/#/runs/details/{run.run_id}",
    )
