"""The cluster a run needs: the oldest release of each part that has what the platform uses, and
the checks `cai submit` makes before it uploads anything, so that a cluster lacking one fails at
submit in one line rather than half-way through a run.

`REQUIREMENTS` is the table docs/deploy.md shows (tests/test_cluster_versions.py keeps them
equal). `cai submit` checks two things it can ask the cluster:

- the Kubeflow Pipelines API server's version: `GET /apis/v2beta1/healthz` answers
  `{"commit_sha", "tag_name", "multi_user", "pipeline_store"}` (kubeflow/pipelines,
  backend/src/apiserver/main.go `healthzResponse`, 2.14.0-2.17.0), `tag_name` being the release
  the API server image was built as (its TAG_NAME; "unknown" for a build without one);
- the custom resources the run will create, in the Kubernetes API's OpenAPI v3 documents
  (`GET /openapi/v3`, then each group-version's document; every authenticated user may read
  them): a multi-node training stage needs a TrainJob whose spec has `runtimePatches` and
  `activeDeadlineSeconds` (Kubeflow Trainer >= 2.2; 2.1 prunes both, and the job would run
  without its secrets, scheduling and deadline).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from cai_lib.core.errors import CaiError


class Requirement(NamedTuple):
    part: str
    minimum: str
    feature: str  # what needs it, in a few words (the line `cai submit` prints)
    detail: str  # why, with the upstream reference


REQUIREMENTS = (
    Requirement(
        "Kubernetes",
        "1.31",
        "the Helm chart",
        "`kubeVersion` of helm/cai-platform; the tests validate every object it renders against the 1.31 schemas",
    ),
    Requirement(
        "Kubeflow Pipelines backend",
        "2.14.0",
        "merging the fan-outs' results",
        "`dsl.Collected` of the parameters of a `dsl.ParallelFor` (kubeflow/pipelines#11725)",
    ),
    Requirement(
        "Kubeflow Pipelines backend",
        "2.15.0",
        "optional Secret and ConfigMap env",
        "MLflow's credentials, the Hugging Face token and the settings the chart writes only sometimes are "
        "optional keys (kubeflow/pipelines#12216); so are the pipeline's inputs (#12377)",
    ),
    Requirement(
        "Kubeflow Pipelines backend",
        "2.17.0",
        "the exit handler seeing how a run with fan-outs ended",
        "before it a `dsl.ExitHandler` around a `dsl.ParallelFor` stays RUNNING (kubeflow/pipelines#13321, fixed "
        "by #13322), so every run's MLflow run would be closed as FAILED",
    ),
    Requirement(
        "Kubeflow Trainer",
        "2.2.0",
        "multi-node training",
        "a stage with `num_nodes` > 1 runs as a TrainJob whose `runtimePatches` (secrets, scheduling, /dev/shm) and "
        "`activeDeadlineSeconds` 2.1 prunes",
    ),
    Requirement(
        "kubeflow SDK (in the images)",
        "0.4",
        "multi-node training",
        "the TrainJob options `RuntimePatch` and `ActiveDeadlineSeconds`; pyproject.toml pins >= 0.5",
    ),
    Requirement(
        "KServe",
        "0.17.0",
        "serving",
        "InferenceService `serving.kserve.io/v1beta1` on the Hugging Face runtime, LLMInferenceService "
        "`serving.kserve.io/v1alpha2` (`serving.policyKind: LLMInferenceService`)",
    ),
    Requirement(
        "MLflow server",
        "3.15.0",
        "the alias webhook",
        "`serving.webhook`: earlier webhook delivery has a server-side request forgery hole (CVE-2026-64849, "
        "GHSA-7gwp-5pfp-969j)",
    ),
    Requirement(
        "NVIDIA driver",
        "580.65.06",
        "GPU stages",
        "CUDA 13.0, which PyPI's torch 2.13 wheels in the GPU image are built for (base image nvidia/cuda:13.0.2)",
    ),
)
HEALTHZ = "/apis/v2beta1/healthz"
TRAINER_GROUP_VERSION = "apis/trainer.kubeflow.org/v1alpha1"
TRAINJOB_FIELDS = ("runtimePatches", "activeDeadlineSeconds")


def minimum(part: str) -> Requirement:
    """The newest minimum among `part`'s requirements: the one a cluster must meet."""
    found = [r for r in REQUIREMENTS if r.part == part]
    return max(found, key=lambda r: version_tuple(r.minimum))


def version_tuple(text: str) -> tuple[int, ...] | None:
    """(2, 17, 0) for "2.17.0", "v2.17.0" or "2.17.0-rc.1"; None when it is no version."""
    match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+].*)?", text.strip())
    return tuple(int(part or 0) for part in match.groups()) if match else None


def kfp_problem(healthz: dict, host: str) -> str | None:
    """One line saying what the KFP API server at `host` lacks, from its healthz answer; None
    when it is new enough. A build that does not say its release ("unknown") is let through."""
    tag = str(healthz.get("tag_name") or "")
    found = version_tuple(tag)
    if found is None:
        return None
    for requirement in sorted(
        (r for r in REQUIREMENTS if r.part == "Kubeflow Pipelines backend"),
        key=lambda r: version_tuple(r.minimum),
        reverse=True,
    ):
        if found < version_tuple(requirement.minimum):
            return (
                f"Kubeflow Pipelines {tag} at {host} is too old: {requirement.feature} needs Kubeflow Pipelines "
                f">= {requirement.minimum}"
            )
    return None


def _schemas_of_kind(document: dict, kind: str) -> list[dict]:
    """The component schemas of an OpenAPI v3 document that describe `kind`."""
    return [
        schema
        for schema in document.get("components", {}).get("schemas", {}).values()
        if any(gvk.get("kind") == kind for gvk in schema.get("x-kubernetes-group-version-kind", []))
    ]


def trainjob_problem(get: Callable[[str], dict | None]) -> str | None:
    """One line saying why this cluster cannot run a multi-node training stage; None when it can.
    `get(path)` returns the JSON at an API server path, None for a 404."""
    requirement = minimum("Kubeflow Trainer")
    discovery = get("/openapi/v3") or {}
    entry = discovery.get("paths", {}).get(TRAINER_GROUP_VERSION)
    if entry is None:
        return (
            "multi-node training (num_nodes > 1) runs as a Kubeflow Trainer TrainJob, and this cluster has no "
            f"trainer.kubeflow.org/v1alpha1 API: install Kubeflow Trainer >= {requirement.minimum}"
        )
    document = get(entry["serverRelativeURL"]) or {}
    schemas = _schemas_of_kind(document, "TrainJob")
    spec = schemas[0].get("properties", {}).get("spec", {}).get("properties", {}) if schemas else {}
    missing = [name for name in TRAINJOB_FIELDS if name not in spec]
    if missing:
        return (
            f"multi-node training (num_nodes > 1): this cluster's TrainJob has no spec.{missing[0]}, which "
            f"Kubeflow Trainer >= {requirement.minimum} adds (older ones prune it)"
        )
    return None


def check_cluster(
    healthz: dict | None, host: str, get: Callable[[str], dict | None] | None, multi_node: bool
) -> None:
    """Raise `CaiError` with one line when the cluster lacks what the run needs. `healthz` is the
    KFP API server's answer (None: not asked); `get` reads the Kubernetes API (None when no
    Kubernetes credentials are at hand: the TrainJob check is then left to the run)."""
    problem = kfp_problem(healthz, host) if healthz is not None else None
    if problem is None and multi_node and get is not None:
        problem = trainjob_problem(get)
    if problem:
        raise CaiError(problem)


def kubernetes_getter():
    """`get(path)` on the Kubernetes API of this pod's service account or the local kubeconfig;
    None when there is neither."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError):
            return None
    return api_getter(client.ApiClient())


def api_getter(api) -> Callable[[str], dict | None]:
    """`get(path)` through a `kubernetes.client.ApiClient`: its JSON, None for a 404."""
    from kubernetes.client.exceptions import ApiException

    def get(path: str) -> dict | None:
        url, _, query = path.partition("?")
        params = [tuple(pair.split("=", 1)) for pair in query.split("&") if "=" in pair]
        try:
            return api.call_api(
                url,
                "GET",
                query_params=params,
                response_type="object",
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise CaiError(f"the Kubernetes API answered {err.status} {err.reason} for {url}") from None

    return get
