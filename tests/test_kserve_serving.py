"""The chart's serving objects as KServe and Kubernetes see them.

Each serving object the chart renders is merged with what KServe puts under it (the
kserve-huggingfaceserver ClusterServingRuntime's container for an InferenceService, the
kserve-config-llm-template LLMInferenceServiceConfig for an LLMInferenceService; both vendored
from KServe v0.17.0 in tests/upstream) the way KServe's controller merges them
(tests/kserve_merge.py), and the merged container must pass the API server's resource rules, in
every values preset. Then `cai serve sync` follows the champion on an LLMInferenceService too.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT, hand_lineage
from crd_schema import crd_errors
from kserve_merge import (
    STORAGE_INITIALIZER,
    merge_runtime_container,
    predictor_container,
    predictor_pod,
    resource_errors,
    strategic_merge,
)
from kubernetes_standin import KubernetesStandIn
from test_helm_chart import SERVED, find, render_objects
from test_kustomize import values_of

UPSTREAM = REPO_ROOT / "tests" / "upstream"
RUNTIME = yaml.safe_load((UPSTREAM / "kserve-huggingfaceserver.yaml").read_text())
LLM_TEMPLATE = yaml.safe_load((UPSTREAM / "kserve-config-llm-template.yaml").read_text())
K8S = REPO_ROOT / "k8s"
PM = {**SERVED, "role": "pm", "storageUri": "s3://cai-platform/artifacts/models/4567cdef"}
# Every set of values the project ships (the chart's, and each kustomize build's), serving on.
PRESETS = {
    "chart": {},
    "k8s/base": values_of(K8S / "base" / "values.yaml"),
    "k8s/overlays/dev": values_of(K8S / "base" / "values.yaml", K8S / "overlays" / "dev" / "values.yaml"),
    "k8s/overlays/gitops": values_of(
        K8S / "base" / "values.yaml", K8S / "overlays" / "gitops" / "values.yaml"
    ),
}
KINDS = ("InferenceService", "LLMInferenceService")
SERVED_NAME = f"cai-{SERVED['constitution']}-{SERVED['role']}"


def serving_objects(preset: str, policy_kind: str) -> list[dict]:
    values = yaml.safe_load(yaml.safe_dump(PRESETS[preset]))
    values.setdefault("serving", {}).update(enabled=True, policyKind=policy_kind, models=[SERVED, PM])
    return [o for o in render_objects(values) if o["kind"] in KINDS]


def merged_containers(obj: dict) -> list[dict]:
    """The containers Kubernetes gets for `obj`, after KServe's merge."""
    if obj["kind"] == "InferenceService":
        return [merge_runtime_container(RUNTIME["spec"]["containers"][0], predictor_container(obj))]
    spec = strategic_merge(LLM_TEMPLATE["spec"], obj["spec"])
    return spec["template"]["containers"]


@pytest.mark.parametrize("policy_kind", KINDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_merged_serving_container_requests_no_more_than_its_limits(preset, policy_kind):
    objects = serving_objects(preset, policy_kind)
    assert len(objects) == 2
    assert [error for obj in objects for c in merged_containers(obj) for error in resource_errors(c)] == []


def test_a_predictor_that_requests_cpu_but_sets_no_cpu_limit_inherits_the_runtimes_and_is_refused():
    # the chart's values before KServe's merge was considered: the runtime's cpu limit of 1 stays
    obj = serving_objects("chart", "InferenceService")[0]
    del obj["spec"]["predictor"]["model"]["resources"]["limits"]["cpu"]
    (container,) = merged_containers(obj)
    assert container["resources"]["limits"]["cpu"] == "1"
    assert resource_errors(container) == [
        "kserve-container: resources.requests[cpu] 4: must be less than or equal to cpu limit 1"
    ]


def test_the_merge_keeps_the_runtimes_args_then_the_predictors_and_its_shm_mount():
    (container,) = merged_containers(serving_objects("chart", "InferenceService")[0])
    assert container["args"] == [
        "--model_name={{.Name}}",
        "--model_name=cai-harmless-rl-cai",
        "--backend=vllm",
    ]
    assert container["volumeMounts"] == [{"name": "devshm", "mountPath": "/dev/shm"}]
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "24Gi", "nvidia.com/gpu": "1"}


@pytest.mark.parametrize(
    "extended",
    [
        {"requests": {"nvidia.com/gpu": "1"}},
        {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "2"}},
    ],
)
def test_a_gpu_request_needs_an_equal_limit(extended):
    errors = resource_errors({"name": "c", "resources": extended})
    assert len(errors) == 1 and (
        "Limit must be set" in errors[0] or "must be equal to nvidia.com/gpu limit" in errors[0]
    )


# -- policies on LLMInferenceServices ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_objects() -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in serving_objects("chart", "LLMInferenceService")}


def test_with_llm_serving_the_policy_is_an_llm_inference_service_and_the_pm_an_inference_service(llm_objects):
    assert {name: o["kind"] for name, o in llm_objects.items()} == {
        "cai-harmless-rl-cai": "LLMInferenceService",
        "cai-harmless-pm": "InferenceService",
    }


def test_the_llm_inference_service_reads_the_champions_s3_folder_with_the_serving_account(llm_objects):
    spec = llm_objects["cai-harmless-rl-cai"]["spec"]
    assert spec["model"] == {"uri": SERVED["storageUri"], "name": "cai-harmless-rl-cai"}
    assert spec["template"]["serviceAccountName"] == "cai-cai-platform-serving"
    assert spec["template"]["containers"][0]["name"] == "main"  # the vLLM container of KServe's template


def test_the_pm_is_served_as_a_sequence_classifier_by_the_hugging_face_runtime(llm_objects):
    model = llm_objects["cai-harmless-pm"]["spec"]["predictor"]["model"]
    assert model["args"] == [
        "--model_name=cai-harmless-pm",
        "--backend=huggingface",
        "--task=sequence_classification",
    ]
    assert model["storageUri"] == PM["storageUri"]


def test_every_serving_object_validates_against_its_kserve_crd(llm_objects):
    assert [error for obj in llm_objects.values() for error in crd_errors(obj)] == []


def test_the_llm_template_mounts_dev_shm_in_memory_for_vllm():
    spec = strategic_merge(LLM_TEMPLATE["spec"], {})
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in spec["template"][
        "volumes"
    ]


@pytest.mark.integration
def test_sync_points_an_llm_inference_service_at_the_champions_folder(
    tmp_path, mlflow_server, s3_bucket, tiny_model_dir, monkeypatch, llm_objects
):
    from test_serving import api_of

    from cai_lib.core.store import ArtifactStore
    from cai_lib.core.tracking import connect
    from cai_lib.platform.pyfunc_model import publish
    from cai_lib.platform.registry.versions import register_checkpoint
    from cai_lib.platform.serving import sync

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    name = f"cai-harmless-rl-cai-{s3_bucket[-6:]}"
    root = f"s3://{s3_bucket}/cai"
    checkpoint = ArtifactStore.open(root).put_dir(tiny_model_dir, "outputs/rl/k/attempt-1")
    version = register_checkpoint(
        mlflow_server["uri"], name, publish(checkpoint, root, "policy"), None, hand_lineage()
    )
    connect(mlflow_server["uri"]).set_registered_model_alias(name, "champion", version.version)
    with KubernetesStandIn(tmp_path) as cluster:
        llm = yaml.safe_load(yaml.safe_dump(llm_objects["cai-harmless-rl-cai"]))
        llm["metadata"]["name"] = name
        cluster.create_inference_service("ml-team", llm, "llminferenceservices")
        result = sync(api_of(cluster), mlflow_server["uri"], name, "ml-team")
        served = cluster.llm_inference_services[("ml-team", name)]
    assert (result.changed, served["spec"]["model"]["uri"]) == (True, version.source)
    assert crd_errors(served) == []


def test_the_verify_init_container_survives_the_merge_and_runs_before_the_download():
    service = find(serving_objects("chart", "InferenceService"), "InferenceService", SERVED_NAME)
    pod = predictor_pod(service, RUNTIME)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["cai-verify", STORAGE_INITIALIZER]
    # merged by name with the runtime's own volume
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["devshm", "cai-verify-tmp"]
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_the_pod_carries_the_storage_annotation_the_init_container_reads():
    from cai_lib.platform.serving import STORAGE_ANNOTATION

    service = find(serving_objects("chart", "InferenceService"), "InferenceService", SERVED_NAME)
    pod = predictor_pod(service, RUNTIME)
    field = pod["spec"]["initContainers"][0]["env"][0]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == f"metadata.annotations['{STORAGE_ANNOTATION}']"
    assert pod["metadata"]["annotations"][STORAGE_ANNOTATION] == SERVED["storageUri"]
