"""`cai serve sync` (`cai_lib.serving`): InferenceServices follow the registry's champion.

Real parts: the `mlflow server` fixture (on PostgreSQL where present) and moto's S3 server; the
InferenceService is the one the Helm chart renders. The Kubernetes API is tests/kubernetes_standin.py,
a STAND-IN for the API server (namespaces, 404s, merge patches, 409 on a stale resourceVersion),
reached through the Kubernetes client's real `CustomObjectsApi`.
"""

from __future__ import annotations

import pytest
from kubernetes_standin import KubernetesStandIn
from test_helm_chart import SERVED, VARIANTS, find, render_objects

from cai_lib.errors import CaiError
from cai_lib.pyfunc_model import publish
from cai_lib.registry import Lineage, register_checkpoint, version_by_alias
from cai_lib.serving import SERVED_VERSION_TAG, VERSION_ANNOTATION, sync
from cai_lib.store import ArtifactStore
from cai_lib.tracking import connect

NAMESPACE = "ml-team"
MODEL = "cai-harmless-rl-cai"
LINEAGE = Lineage(
    constitution_name="harmless",
    constitution_version="1.0.0",
    constitution_sha256="0" * 64,
    pipeline_run_id="run-1",
    base_model="tiny",
)


def api_of(standin: KubernetesStandIn):
    from kubernetes.client import ApiClient, Configuration, CustomObjectsApi

    configuration = Configuration()
    configuration.host = standin.url
    return CustomObjectsApi(ApiClient(configuration))


@pytest.fixture
def registry(mlflow_server, s3_bucket, tiny_model_dir, monkeypatch):
    """A fresh registered model name with one published version, not yet champion."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    name = f"{MODEL}-{s3_bucket[-6:]}"
    root = f"s3://{s3_bucket}/cai"
    checkpoint = ArtifactStore.open(root).put_dir(tiny_model_dir, "outputs/rl/k/attempt-1")
    version = register_checkpoint(
        mlflow_server["uri"], name, publish(checkpoint, root, "policy"), None, LINEAGE
    )
    return {"uri": mlflow_server["uri"], "name": name, "version": version, "root": root}


@pytest.fixture
def cluster(tmp_path, registry):
    """The stand-in API server holding the InferenceService the chart renders for `registry`'s model."""
    with KubernetesStandIn(tmp_path) as standin:
        service = find(render_objects(VARIANTS["serving"]), "InferenceService", MODEL)
        service["metadata"]["name"] = registry["name"]
        standin.create_inference_service(NAMESPACE, service)
        yield standin


def served(standin: KubernetesStandIn, name: str) -> dict:
    return standin.inference_services[(NAMESPACE, name)]


def crown(registry: dict) -> None:
    connect(registry["uri"]).set_registered_model_alias(
        registry["name"], "champion", registry["version"].version
    )


def test_sync_points_the_inference_service_at_the_champions_published_folder(registry, cluster):
    crown(registry)
    result = sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    service = served(cluster, registry["name"])
    assert result.changed and result.storage_uri == registry["version"].source
    assert service["spec"]["predictor"]["model"]["storageUri"] == registry["version"].source
    assert service["spec"]["predictor"]["model"]["storageUri"].startswith(f"{registry['root']}/models/")
    assert service["metadata"]["annotations"][VERSION_ANNOTATION] == registry["version"].version
    assert service["metadata"]["resourceVersion"] == "2"


def test_sync_records_the_served_version_on_the_registered_model(registry, cluster):
    crown(registry)
    sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    tags = connect(registry["uri"]).get_registered_model(registry["name"]).tags
    assert tags[SERVED_VERSION_TAG] == registry["version"].version


def test_a_second_sync_with_the_same_champion_patches_nothing(registry, cluster):
    crown(registry)
    sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    again = sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    assert not again.changed and len(cluster.patches) == 1


def test_a_role_with_no_champion_is_refused_and_nothing_changes(registry, cluster):
    before = dict(served(cluster, registry["name"]))
    with pytest.raises(CaiError, match="has the alias 'champion'"):
        sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    assert served(cluster, registry["name"]) == before and cluster.patches == []


def test_a_champion_whose_weights_fail_the_manifest_check_is_refused_and_nothing_changes(registry, cluster):
    crown(registry)
    ArtifactStore.open(registry["version"].source).write_bytes("model.safetensors", b"truncated")
    with pytest.raises(CaiError, match="model.safetensors: 9 bytes, the manifest says"):
        sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    assert (
        served(cluster, registry["name"])["spec"]["predictor"]["model"]["storageUri"] == SERVED["storageUri"]
    )


def test_an_inference_service_in_another_namespace_is_not_found(registry, cluster):
    crown(registry)
    with pytest.raises(CaiError, match=f"InferenceService team-b/{registry['name']} does not exist"):
        sync(api_of(cluster), registry["uri"], registry["name"], "team-b")


def test_a_patch_on_a_stale_resource_version_is_refused_by_the_stand_in(registry, cluster):
    service = served(cluster, registry["name"])
    code, _ = cluster.patch_inference_service(
        NAMESPACE, registry["name"], {"metadata": {"resourceVersion": "0"}}
    )
    assert code == 409 and served(cluster, registry["name"]) == service


def test_the_register_step_syncs_the_models_the_installation_serves(registry, cluster, monkeypatch):
    from cai_lib import serving

    crown(registry)
    monkeypatch.setenv("CAI_SERVING_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("CAI_SERVING_MODELS", f"other,{registry['name']}")
    monkeypatch.setattr(serving, "custom_objects_api", lambda: api_of(cluster))
    results = serving.sync_served(registry["uri"], [registry["name"], "cai-harmless-pm"])
    assert [r.inference_service for r in results] == [f"{NAMESPACE}/{registry['name']}"]
    assert version_by_alias(registry["uri"], registry["name"], "champion").version == results[0].version
