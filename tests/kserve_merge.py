"""A STAND-IN for what KServe's controller does to a serving object's container before Kubernetes
sees it, and for the API server's check of the result.

KServe 0.17.0 (kserve/kserve, tag v0.17.0):
- InferenceService: pkg/controller/v1beta1/inferenceservice/utils/utils.go `MergeRuntimeContainers`
  applies the predictor's container (`spec.predictor.model` minus the model's own fields) to the
  ServingRuntime's container as a Kubernetes strategic merge patch, then sets `args` to the
  runtime's args followed by the predictor's (a patch alone would replace them).
- LLMInferenceService: pkg/controller/v1alpha2/llmisvc/config_merge.go `mergeSpecs` applies the
  service's spec to its base LLMInferenceServiceConfig (kserve-config-llm-template) as a strategic
  merge patch of the whole spec: the pod template's containers merge by name.

The strategic merge follows the patch strategies of k8s.io/api/core/v1 (types.go): `env` merges
by `name`, `volumeMounts` by `mountPath`, `volumeDevices` by `devicePath`, `ports` by
`containerPort`, a PodSpec's `containers`, `initContainers` and `volumes` by `name`,
`tolerations` are replaced; maps (`resources.requests`, `resources.limits`, labels) merge key by
key; any other list or value is replaced.

The predictor's pod (pkg/controller/v1beta1/inferenceservice/components/predictor.go): `buildPodSpec`
strategic-merges the predictor's PodSpec (its `initContainers` and `volumes` included) into the
runtime's, then sets `containers` to the merged model container; `buildObjectMeta` gives the pod
template the InferenceService's annotations less `ServiceAnnotationDisallowedList`
(pkg/constants/constants.go), and the Deployment's pod template takes that metadata
(reconcilers/deployment/deployment_reconciler.go `createRawDefaultDeployment`). The pod mutator
(pkg/webhook/admission/pod/storage_initializer_injector.go) then appends its storage-initializer
after the pod's own init containers.

The API server (kubernetes/kubernetes v1.31, pkg/apis/core/validation/validation.go
`ValidateResourceRequirements`) then refuses a container whose request of a resource exceeds its
limit ("must be less than or equal to R limit"); for a resource that cannot be overcommitted (an
extended resource such as nvidia.com/gpu, or hugepages) a request must equal its limit ("must be
equal to R limit") and needs one ("Limit must be set for non overcommitable resources").
"""

from __future__ import annotations

import copy

from kubernetes.utils import parse_quantity

# list field -> merge key, for the lists that merge rather than replace (k8s.io/api/core/v1)
MERGE_KEYS = {
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
}
# The predictor's ModelSpec fields that are not a container's (pkg/apis/serving/v1beta1/predictor_model.go).
MODEL_FIELDS = ("modelFormat", "runtime", "storageUri", "protocolVersion", "storage")


def strategic_merge(base: object, patch: object, field: str = "") -> object:
    """`patch` applied to `base` as a strategic merge patch of core/v1 objects."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base.get(key), value, key) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if at is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[at] = strategic_merge(merged[at], item, field)
        return merged
    return copy.deepcopy(patch)


def merge_runtime_container(runtime_container: dict, isvc_container: dict) -> dict:
    """MergeRuntimeContainers: the predictor's container over the runtime's, args concatenated."""
    merged = strategic_merge(runtime_container, isvc_container)
    merged["name"] = merged.get("name") or runtime_container["name"]
    merged["args"] = [*runtime_container.get("args", []), *isvc_container.get("args", [])]
    return merged


def predictor_container(inference_service: dict) -> dict:
    """The container part of an InferenceService's `spec.predictor.model`."""
    model = inference_service["spec"]["predictor"]["model"]
    return {key: value for key, value in model.items() if key not in MODEL_FIELDS}


def overcommit_allowed(resource: str) -> bool:
    """k8s helper.IsOvercommitAllowed: native resources (no domain, or *.kubernetes.io/) that are not hugepages."""
    native = "/" not in resource or resource.split("/")[0].endswith("kubernetes.io")
    return native and not resource.startswith("hugepages-")


def resource_errors(container: dict) -> list[str]:
    """What ValidateResourceRequirements says about `container`'s resources ([] when valid)."""
    resources = container.get("resources") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    errors = []
    for resource, request in requests.items():
        where = f"{container.get('name', '?')}: resources.requests[{resource}] {request}"
        if resource in limits:
            request_q, limit_q = parse_quantity(str(request)), parse_quantity(str(limits[resource]))
            if request_q != limit_q and not overcommit_allowed(resource):
                errors.append(f"{where}: must be equal to {resource} limit {limits[resource]}")
            elif request_q > limit_q:
                errors.append(f"{where}: must be less than or equal to {resource} limit {limits[resource]}")
        elif not overcommit_allowed(resource):
            errors.append(f"{where}: Limit must be set for non overcommitable resources")
    return errors


# pkg/constants/constants.go ServiceAnnotationDisallowedList (the defaults; the inferenceservice
# ConfigMap may add to it).
ANNOTATION_DISALLOWED = (
    "autoscaling.knative.dev/min-scale",
    "autoscaling.knative.dev/max-scale",
    "internal.serving.kserve.io/storage-initializer-sourceuri",
    "kubectl.kubernetes.io/last-applied-configuration",
    "serving.kserve.io/model-format",
)
STORAGE_INITIALIZER = "storage-initializer"


def predictor_pod(inference_service: dict, runtime: dict) -> dict:
    """The pod KServe makes for an InferenceService's predictor on `runtime` (a ServingRuntime):
    metadata annotations and spec, the storage initializer injected."""
    predictor = {
        key: value
        for key, value in inference_service["spec"]["predictor"].items()
        if key not in ("model", "minReplicas", "maxReplicas")
    }
    runtime_pod = {
        key: value
        for key, value in runtime["spec"].items()
        if key not in ("containers", "supportedModelFormats", "protocolVersions", "annotations", "labels")
    }
    spec = strategic_merge(runtime_pod, predictor)
    spec["containers"] = [
        merge_runtime_container(runtime["spec"]["containers"][0], predictor_container(inference_service))
    ]
    spec["initContainers"] = [*spec.get("initContainers", []), {"name": STORAGE_INITIALIZER}]
    annotations = {
        key: value
        for key, value in inference_service["metadata"].get("annotations", {}).items()
        if key not in ANNOTATION_DISALLOWED
    }
    return {"metadata": {"annotations": annotations}, "spec": spec}
