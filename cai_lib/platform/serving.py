"""Serving that follows the registry: a KServe InferenceService per role points at its alias.

The chart creates each role's InferenceService (the Hugging Face runtime with vLLM, the GPU
resources, the service account whose Secret reaches S3). `sync` owns one field of it, the
predictor's `storageUri`: it resolves `models:/NAME@champion` to its version's published folder
(`cai_lib.platform.pyfunc_model.publish`, an `s3://` prefix outside any run's folder), verifies
the version (`verified_version` with `every_file`: the platform's tags, the registered manifest
hash, and every file's sha256 read back from S3), and patches the InferenceService when the
version changed. The patch carries the object's `resourceVersion`, so of two syncs racing on one
object the second is refused (409) rather than undoing the first; it is then read again and
retried. What is served is recorded as annotations on the InferenceService (version, model,
manifest sha256, storage URI); sync writes nothing to MLflow, so it needs only read access there.

Nothing deployed changes when the alias is unset, when the version fails verification (a file
of the same size with other bytes included), or when the InferenceService does not exist (the
chart makes it; see docs/deploy.md): the pods keep serving the last good champion.

`verify` is the same check for the serving pod's init container (`cai serve verify`), which reads
with a read-only S3 credential: the storage URI the pod is about to load must be the folder of the
version the alias names now, and every file in it must match the registered manifest.
The manifest is built as a plain dict and sent through the Kubernetes client's
`CustomObjectsApi`: KServe's own SDK pins versions of pandas and psutil this project cannot use.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from cai_lib.core.errors import CaiError
from cai_lib.core.kubeconfig import load_kubernetes_config
from cai_lib.core.model_versions import ModelVersionInfo, registered_checkpoint
from cai_lib.core.names import CHAMPION
from cai_lib.core.settings import settings, variable
from cai_lib.core.store import is_s3

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# The serving objects `sync` follows, tried in this order, with the field holding the weights' URI.
# A policy may be served by an LLMInferenceService (KServe >= 0.17; v1alpha2 is its storage version
# there and since), the chart's `serving.policyKind`; the PM always by an InferenceService.
KINDS = {
    "InferenceService": (VERSION, PLURAL, ("spec", "predictor", "model", "storageUri")),
    "LLMInferenceService": ("v1alpha2", "llminferenceservices", ("spec", "model", "uri")),
}
VERSION_ANNOTATION = "cai-platform.io/model-version"
MODEL_ANNOTATION = "cai-platform.io/registered-model"
SHA_ANNOTATION = "cai-platform.io/checkpoint-sha256"
# The storageUri as an annotation too, for the pod's verify init container (downward API).
STORAGE_ANNOTATION = "cai-platform.io/storage-uri"
CONFLICT_RETRIES = 3
# Set by the chart's env ConfigMap when serving is on: the InferenceServices the register step syncs.
SERVING_NAMESPACE_ENV = variable("serving_namespace")
SERVING_MODELS_ENV = variable("serving_models")


class SyncResult(BaseModel):
    """What one `sync` found and did."""

    inference_service: str = Field(description="namespace/name of the InferenceService.")
    model: str = Field(
        description="The registered model URI followed, e.g. models:/cai-harmless-rl-cai@champion."
    )
    version: str = Field(description="The version the alias points at.")
    storage_uri: str = Field(description="Its published folder, now the predictor's storageUri.")
    changed: bool = Field(
        description="True when the InferenceService was patched; False when it already served it."
    )


def verify(tracking_uri: str | None, model_name: str, storage_uri: str, alias: str = CHAMPION) -> ModelVersionInfo:
    """The version `alias` of `model_name` names, verified file by file, if `storage_uri` is its
    folder; else `CaiError` saying what differs (what the serving pod's init container runs)."""
    info = registered_checkpoint(f"models:/{model_name}@{alias}", tracking_uri, every_file=True)
    if info.source.rstrip("/") != storage_uri.rstrip("/"):
        raise CaiError(
            f"{storage_uri}: not the folder of models:/{model_name}@{alias} (version {info.version} at "
            f"{info.source}); refusing to serve it"
        )
    return info


def storage_patch(
    version: str,
    model_name: str,
    sha256: str,
    storage_uri: str,
    resource_version: str,
    kind: str = "InferenceService",
) -> dict:
    """The merge patch that points a serving object of `kind` at `storage_uri`."""
    spec: dict = {}
    *parents, field = KINDS[kind][2][1:]
    leaf = spec
    for key in parents:
        leaf = leaf.setdefault(key, {})
    leaf[field] = storage_uri
    return {
        "metadata": {
            "resourceVersion": resource_version,
            "annotations": {
                VERSION_ANNOTATION: version,
                MODEL_ANNOTATION: model_name,
                SHA_ANNOTATION: sha256,
                STORAGE_ANNOTATION: storage_uri,
            },
        },
        "spec": spec,
    }


def _get(api, namespace: str, name: str) -> tuple[str, dict]:
    """(kind, object) of the serving object `name`: an InferenceService, else an LLMInferenceService."""
    from kubernetes.client.exceptions import ApiException

    for kind, (version, plural, _) in KINDS.items():
        try:
            return kind, api.get_namespaced_custom_object(GROUP, version, namespace, plural, name)
        except ApiException as err:
            if err.status != 404:
                raise CaiError(
                    f"{kind} {namespace}/{name}: the Kubernetes API answered {err.status} {err.reason}"
                ) from None
    raise CaiError(
        f"InferenceService {namespace}/{name} does not exist (nor an LLMInferenceService of that name): install "
        "the chart with serving.enabled (its serving.models entry for this role names the first storageUri)"
    )


def _served_uri(obj: dict, kind: str) -> str | None:
    for key in KINDS[kind][2]:
        obj = obj.get(key) or {}
    return obj or None


def sync(api, tracking_uri: str | None, model_name: str, namespace: str, alias: str = CHAMPION) -> SyncResult:
    """Point the InferenceService named `model_name` in `namespace` at the version `alias` names.

    `api` is a `kubernetes.client.CustomObjectsApi`. Raises `CaiError`, changing nothing, when the
    alias is unset, the version's folder is not in S3 or fails verification, or the
    InferenceService is missing.
    """
    from kubernetes.client.exceptions import ApiException

    ref = f"models:/{model_name}@{alias}"
    info = registered_checkpoint(ref, tracking_uri, every_file=True)
    if not is_s3(info.source):
        raise CaiError(
            f"{ref} is version {info.version} at {info.source}, which KServe cannot read: register from s3://"
        )
    for attempt in range(CONFLICT_RETRIES):
        kind, current = _get(api, namespace, model_name)
        served = _served_uri(current, kind)
        annotations = current["metadata"].get("annotations") or {}
        if served == info.source and annotations.get(VERSION_ANNOTATION) == info.version:
            changed = False
            break
        patch = storage_patch(
            info.version,
            model_name,
            info.checkpoint_sha256,
            info.source,
            current["metadata"]["resourceVersion"],
            kind,
        )
        try:
            version, plural, _ = KINDS[kind]
            api.patch_namespaced_custom_object(GROUP, version, namespace, plural, model_name, patch)
        except ApiException as err:
            if err.status == 409 and attempt < CONFLICT_RETRIES - 1:
                continue  # another sync patched it in between: read it again
            raise CaiError(
                f"{kind} {namespace}/{model_name}: the Kubernetes API refused the patch: {err.status} {err.reason}"
            ) from None
        changed = True
        break
    return SyncResult(
        inference_service=f"{namespace}/{model_name}",
        model=ref,
        version=info.version,
        storage_uri=info.source,
        changed=changed,
    )


def custom_objects_api():
    """A `CustomObjectsApi` from the pod's service account, or else the local kubeconfig."""
    from kubernetes import client

    load_kubernetes_config()
    return client.CustomObjectsApi()


def sync_served(tracking_uri: str | None, model_names: list[str]) -> list[SyncResult]:
    """Sync the InferenceServices the installation serves (`CAI_SERVING_MODELS` in
    `CAI_SERVING_NAMESPACE`) among `model_names`; nothing when serving is off."""
    environment = settings()
    wanted = [name for name in model_names if name in environment.serving_models]
    if not wanted:
        return []
    if not environment.serving_namespace:
        raise CaiError(f"${SERVING_MODELS_ENV} names models to serve but ${SERVING_NAMESPACE_ENV} is not set")
    api = custom_objects_api()
    return [sync(api, tracking_uri, name, environment.serving_namespace) for name in wanted]
