"""`cai serve sync` (`cai_lib.platform.serving`): InferenceServices follow the registry's champion.

Real parts: the `mlflow server` fixture (on PostgreSQL where present) and moto's S3 server; the
InferenceService is the one the Helm chart renders. The Kubernetes API is tests/kubernetes_standin.py,
a STAND-IN for the API server (namespaces, 404s, merge patches, 409 on a stale resourceVersion),
reached through the Kubernetes client's real `CustomObjectsApi`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_port, hand_lineage
from kubernetes_standin import KubernetesStandIn
from test_helm_chart import SERVED, VARIANTS, find, render_objects

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import version_by_alias
from cai_lib.core.names import SERVED_VERSION_TAG
from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import connect
from cai_lib.platform.pyfunc_model import publish
from cai_lib.platform.registry.versions import register_checkpoint
from cai_lib.platform.serving import VERSION_ANNOTATION, sync

NAMESPACE = "ml-team"
MODEL = "cai-harmless-rl-cai"
LINEAGE = hand_lineage()


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
    from cai_lib.platform import serving

    crown(registry)
    monkeypatch.setenv("CAI_SERVING_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("CAI_SERVING_MODELS", f"other,{registry['name']}")
    monkeypatch.setattr(serving, "custom_objects_api", lambda: api_of(cluster))
    results = serving.sync_served(registry["uri"], [registry["name"], "cai-harmless-pm"])
    assert [r.inference_service for r in results] == [f"{NAMESPACE}/{registry['name']}"]
    assert version_by_alias(registry["uri"], registry["name"], "champion").version == results[0].version


# -- the webhook receiver: a real alias event from the real server ---------------------------------


@pytest.fixture
def receiving(registry, cluster):
    """`cai serve webhook`'s receiver on 127.0.0.1, registered on the MLflow server with a secret."""
    import threading

    from cai_lib.platform.webhook import receiver, register_webhook

    api = api_of(cluster)
    server = receiver(
        free_port(), "s3cret", [registry["name"]],
        lambda model: sync(api, registry["uri"], model, NAMESPACE).model_dump(), host="127.0.0.1",
    )  # fmt: skip
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    webhook = register_webhook(registry["uri"], url, "s3cret")
    try:
        yield {"url": url}
    finally:
        connect(registry["uri"]).delete_webhook(webhook)
        server.shutdown()


def test_a_champion_alias_set_on_the_server_reaches_the_inference_service_through_the_webhook(
    registry, cluster, receiving
):
    crown(registry)
    deadline = time.monotonic() + 60
    while not cluster.patches and time.monotonic() < deadline:
        time.sleep(0.5)
    model = served(cluster, registry["name"])["spec"]["predictor"]["model"]
    assert model["storageUri"] == registry["version"].source


def test_a_delivery_without_a_valid_signature_is_refused_and_changes_nothing(registry, cluster, receiving):
    from cai_lib.platform.webhook import signature

    body = json.dumps(
        {"entity": "model_version_alias", "action": "created",
         "data": {"name": registry["name"], "alias": "champion", "version": "1"}}
    ).encode()  # fmt: skip
    stamp = str(int(time.time()))
    forged = {
        "X-MLflow-Delivery-Id": "d1",
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature("wrong-secret", "d1", stamp, body),
    }
    statuses = [post(receiving["url"], body, headers) for headers in ({}, forged)]
    assert statuses == [401, 401] and cluster.patches == []


def test_a_replayed_delivery_is_refused(registry, cluster, receiving):
    from cai_lib.platform.webhook import signature

    body = b'{"entity": "model_version_alias", "action": "created", "data": {}}'
    old = str(int(time.time()) - 3600)
    headers = {"X-MLflow-Delivery-Id": "d2", "X-MLflow-Timestamp": old,
               "X-MLflow-Signature": signature("s3cret", "d2", old, body)}  # fmt: skip
    assert post(receiving["url"], body, headers) == 401


def post(url: str, body: bytes, headers: dict) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
