"""Submit the pipeline to a Kubeflow Pipelines cluster: compile, upload as a version, create a run.

The compiled package carries the run config's params as parameter defaults and its deploy
section (images, GPU profiles, secrets) in the platform spec; the run's parameters are the same
params (`params_as_pipeline_arguments`), so the Kubeflow UI shows the exact config of each run.
A pipeline version is named after the sha256 of its compiled YAML's content (`package_digest`),
so submitting the same config twice reuses the version instead of piling up identical ones: each
submit creates at most one version, and the first one creates the pipeline with no version of its
own.

Host and auth: the API server is `--host` (or `KFP_HOST`), e.g. `http://localhost:8080` through
`kubectl port-forward svc/ml-pipeline-ui -n kubeflow 8080:80`, or
`http://ml-pipeline.kubeflow.svc.cluster.local:8888` inside the cluster. On multi-user Kubeflow,
a pod authenticates with a projected ServiceAccount token (audience `pipelines.kubeflow.org`)
read from `KF_PIPELINES_SA_TOKEN_PATH` (default `/var/run/secrets/kubeflow/pipelines/token`) when
that file exists, and `--namespace` names the profile namespace the pipeline, its versions, the
experiment and the run belong to (default: the namespace `kfp.Client` was configured with, e.g. the
pod's own namespace in the cluster). The pipeline is looked up and created in that namespace only:
`kfp.Client.get_pipeline_id` has no namespace and, on multi-user Kubeflow, sees only shared
pipelines (kubeflow/pipelines#10609), so a second submit would not find the first one's pipeline.

Before it uploads anything, `submit_run` checks that the cluster has what the run needs
(`cai_lib.platform.cluster_versions`): the KFP API server's release, from its healthz answer, and, for a
run with a multi-node training stage, a Kubeflow Trainer whose TrainJob has the fields the step
sets (read from the Kubernetes API's OpenAPI documents with the local kubeconfig or the pod's
service account; without either that check is skipped, with a note). A cluster that lacks one
fails here in one line naming the feature and the version it needs.

Run: cai submit --host http://localhost:8080 --config my-run.yaml --set constitution=harmless@1.0.0
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from cai_lib.core.errors import CaiError
from cai_lib.platform.kfp_client import connect_kfp, require_host
from cai_lib.platform.run_config import RunConfig, params_as_pipeline_arguments

PIPELINE_NAME = "constitutional-ai"
DESCRIPTION = "Constitutional AI (Bai et al. 2022): SL-CAI, AI feedback, preference model, RL-CAI."


class SubmittedRun(BaseModel):
    """A run created on a Kubeflow Pipelines server."""

    run_id: str = Field(description="KFP run id.")
    pipeline_id: str = Field(description="The pipeline the run belongs to.")
    version_id: str = Field(description="The uploaded pipeline version the run executes.")
    url: str = Field(description="The run's page in the Kubeflow Pipelines UI.")








def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _find_pipeline(client, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline named `name` in `namespace` (None: single-user mode), if any."""
    found = client.list_pipelines(filter=_name_filter(name), namespace=namespace, page_size=10)
    # The server lists only `namespace`'s pipelines; a pipeline another namespace owns is never
    # used, even from a server that ignored the parameter (single-user servers report "" for all).
    ids = [p.pipeline_id for p in found.pipelines or [] if not p.namespace or p.namespace == namespace]
    return ids[0] if ids else None


def _find_version(client, pipeline_id: str, version_name: str) -> str | None:
    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=_name_filter(version_name))
    return found.pipeline_versions[0].pipeline_version_id if found.pipeline_versions else None


def _create_pipeline(client, name: str, namespace: str | None) -> str:
    """Create the pipeline `name` in `namespace`, with no version; its id.

    Not `upload_pipeline`: the server files the uploaded package as a first version named after
    the pipeline, not after the package's digest (KFP's pipeline_upload_server.go), so the
    digest-named version uploaded next would be a second, identical one. Not
    `create_pipeline_and_version` either: it names its version, but takes the package by URL for
    the server to download, which a local package has not. The v2beta1 CreatePipeline makes an
    empty pipeline; the package's one version follows. A pipeline left empty by a failed upload
    is found and filled by the next submit.
    """
    import kfp_server_api

    pipeline = kfp_server_api.V2beta1Pipeline(display_name=name, description=DESCRIPTION, namespace=namespace)
    try:
        return client.pipelines.pipeline_service_create_pipeline(pipeline).pipeline_id
    except kfp_server_api.ApiException as err:
        # 409: another submit created it since we looked; use theirs.
        pipeline_id = _find_pipeline(client, name, namespace) if err.status == 409 else None
        if pipeline_id is None:
            raise
        return pipeline_id


def package_digest(package: Path) -> str:
    """sha256 of a compiled package's content (its YAML documents as canonical JSON), not its bytes.

    kfp's compiler writes the parameter defaults into a comment header whose dict order changes
    from one process to the next (protobuf Struct maps), so two `cai submit`s of one config give
    packages that differ in bytes, never in content.
    """
    documents = list(yaml.safe_load_all(package.read_text()))
    return hashlib.sha256(json.dumps(documents, sort_keys=True, default=str).encode()).hexdigest()


def _pipeline_version(client, package: Path, pipeline_name: str, namespace: str | None) -> tuple[str, str]:
    """(pipeline id, version id) of `package` in `namespace`: the pipeline is created if missing,
    the version (named by `package_digest`) uploaded if missing, and nothing else."""
    import kfp_server_api

    version_name = f"{pipeline_name}-{package_digest(package)[:12]}"
    pipeline_id = _find_pipeline(client, pipeline_name, namespace) or _create_pipeline(
        client, pipeline_name, namespace
    )
    version_id = _find_version(client, pipeline_id, version_name)
    if version_id is None:
        try:
            version_id = client.upload_pipeline_version(
                str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id
            ).pipeline_version_id
        except kfp_server_api.ApiException as err:
            # 409: another submit uploaded the same package since we looked; use theirs.
            version_id = _find_version(client, pipeline_id, version_name) if err.status == 409 else None
            if version_id is None:
                raise
    return pipeline_id, version_id


def _is_multi_user(client, host: str) -> bool:
    """Whether the KFP server behind `client` runs in multi-user mode (its healthz says)."""
    try:
        return bool(client.get_kfp_healthz().multi_user)
    except TimeoutError:
        raise CaiError(f"Kubeflow Pipelines host {host} answered but its healthz API refused us") from None


def _healthz(client, host: str) -> dict:
    """The KFP API server's healthz answer as JSON, with the release (`tag_name`) the SDK's model
    of it drops."""
    try:
        response = client._healthz_api.healthz_service_get_healthz(_preload_content=False)
        return json.loads(response.data or b"{}")
    except (TimeoutError, ValueError):
        raise CaiError(f"Kubeflow Pipelines host {host} answered but its healthz API refused us") from None


def check_cluster(client, host: str, config: RunConfig, kubernetes=None) -> None:
    """`CaiError` in one line when the cluster lacks what `config`'s run needs (`cluster_versions`).
    `kubernetes` is a `get(path)` on the Kubernetes API (default: the local kubeconfig's, or the
    pod's service account's)."""
    import kfp_server_api

    from cai_lib.core.stage_table import TRAINING_STAGES
    from cai_lib.engines.trainjob import plan_of
    from cai_lib.platform.cluster_versions import check_cluster as check
    from cai_lib.platform.cluster_versions import kubernetes_getter

    try:
        healthz = _healthz(client, host)
    except kfp_server_api.ApiException:
        healthz = None  # an API server that does not say: the run will tell
    multi_node = any(plan_of(stage, config.deploy) for stage in TRAINING_STAGES)
    if multi_node and kubernetes is None:
        kubernetes = kubernetes_getter()
        if kubernetes is None:
            print(
                "note: no Kubernetes credentials here (kubeconfig or service account): the TrainJob API the "
                "multi-node training needs was not checked",
                file=sys.stderr,
            )
    check(healthz, host, kubernetes, multi_node)


def _server_message(err) -> str:
    """The KFP server's own explanation in an `ApiException`'s body, if it gave one."""
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        return ""
    return str(body.get("message") or body.get("error_message") or "") if isinstance(body, dict) else ""


def submit_run(
    host: str | None,
    config: RunConfig,
    experiment: str,
    run_name: str | None = None,
    pipeline_name: str = PIPELINE_NAME,
    namespace: str | None = None,
    client=None,
    kubernetes=None,
) -> SubmittedRun:
    """Compile the pipeline for `config`, upload it as a version and start a run of it.

    The run's parameters are `config.params`; the experiment is created if missing. `client` is
    a `kfp.Client` (default: `connect_kfp(host, namespace)`), `kubernetes` a `get(path)` on the
    cluster's Kubernetes API for `check_cluster`. A missing or unreachable host, a cluster that
    lacks what the run needs, or an API error (e.g. 403), is a `CaiError` naming the host.
    """
    import kfp_server_api

    from pipelines.cai_pipeline import compile_pipeline

    host = require_host(host)
    client = client or connect_kfp(host, namespace)
    check_cluster(client, host, config, kubernetes)
    # The client's own namespace (from its context, or the pod's on multi-user Kubeflow) is the
    # one kfp.Client files experiments under; the pipeline goes to the same one.
    namespace = namespace or client.get_user_namespace() or None
    if namespace is None and _is_multi_user(client, host):
        raise CaiError(
            f"Kubeflow Pipelines host {host} is multi-user: pass --namespace with your profile namespace"
        )
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
            message = _server_message(err)
            raise CaiError(
                f"Kubeflow Pipelines host {host} refused the submission: {err.status} {err.reason}"
                + (f": {message}" if message else "")
            ) from None
    return SubmittedRun(
        run_id=run.run_id,
        pipeline_id=pipeline_id,
        version_id=version_id,
        url=f"{host}/#/runs/details/{run.run_id}",
    )
