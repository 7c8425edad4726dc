"""`cai serve sync` (`cai_lib.platform.serving`): InferenceServices follow the registry's champion.

Real parts: the `mlflow server` fixture (on PostgreSQL where present) and moto's S3 server (behind
a proxy that refuses every write, where a test shows that verification needs read access only);
the InferenceService is the one the Helm chart renders. The Kubernetes API is tests/kubernetes_standin.py,
a STAND-IN for the API server (namespaces, 404s, merge patches, 409 on a stale resourceVersion),
reached through the Kubernetes client's real `CustomObjectsApi`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, hand_lineage
from fault_proxy import FaultProxy
from kubernetes_standin import KubernetesStandIn
from test_helm_chart import SERVED, VARIANTS, find, render_objects

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import version_by_alias
from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import connect
from cai_lib.platform.pyfunc_model import publish
from cai_lib.platform.registry.versions import register_checkpoint
from cai_lib.platform.serving import SHA_ANNOTATION, STORAGE_ANNOTATION, VERSION_ANNOTATION, sync, verify

NAMESPACE = "ml-team"
MODEL = "cai-harmless-rl-cai"
LINEAGE = hand_lineage()


def api_of(standin: KubernetesStandIn):
    from kubernetes.client import ApiClient, Configuration, CustomObjectsApi

    configuration = Configuration()
    configuration.host = standin.url
    return CustomObjectsApi(ApiClient(configuration))


def published_version(uri: str, name: str, root: str, checkpoint_dir, key: str):
    """`checkpoint_dir` stored under `root`, published and registered as a version of `name`."""
    checkpoint = ArtifactStore.open(root).put_dir(checkpoint_dir, key)
    return register_checkpoint(uri, name, publish(checkpoint, root, "policy"), None, LINEAGE)


@pytest.fixture
def registry(mlflow_server, s3_bucket, tiny_model_dir, monkeypatch):
    """A fresh registered model name with one published version, not yet champion."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    name = f"{MODEL}-{s3_bucket[-6:]}"
    root = f"s3://{s3_bucket}/cai"
    version = published_version(mlflow_server["uri"], name, root, tiny_model_dir, "outputs/rl/k/attempt-1")
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


def crown(registry: dict, version: str | None = None) -> None:
    connect(registry["uri"]).set_registered_model_alias(
        registry["name"], "champion", version or registry["version"].version
    )


def tamper_same_size(folder: str, rel: str = "model.safetensors") -> None:
    """Rewrite one file of `folder` in S3 with other bytes of the same length."""
    store = ArtifactStore.open(folder)
    data = store.read_bytes(rel)
    store.write_bytes(rel, bytes([data[0] ^ 0xFF]) + data[1:])


def test_sync_points_the_inference_service_at_the_champions_published_folder(registry, cluster):
    crown(registry)
    result = sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    service = served(cluster, registry["name"])
    assert result.changed and result.storage_uri == registry["version"].source
    assert service["spec"]["predictor"]["model"]["storageUri"] == registry["version"].source
    assert service["spec"]["predictor"]["model"]["storageUri"].startswith(f"{registry['root']}/models/")
    assert service["metadata"]["annotations"][VERSION_ANNOTATION] == registry["version"].version
    assert service["metadata"]["resourceVersion"] == "2"


def test_sync_records_what_is_served_on_the_inference_service_and_writes_nothing_to_mlflow(registry, cluster):
    crown(registry)
    before = connect(registry["uri"]).get_registered_model(registry["name"]).tags
    sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    annotations = served(cluster, registry["name"])["metadata"]["annotations"]
    assert (annotations[SHA_ANNOTATION], annotations[STORAGE_ANNOTATION]) == (
        registry["version"].checkpoint_sha256,
        registry["version"].source,
    )
    assert connect(registry["uri"]).get_registered_model(registry["name"]).tags == before


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
    with pytest.raises(CaiError, match="model.safetensors: 9 bytes where the manifest says"):
        sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)
    assert (
        served(cluster, registry["name"])["spec"]["predictor"]["model"]["storageUri"] == SERVED["storageUri"]
    )


def test_a_new_champion_with_a_tampered_file_of_the_same_size_is_refused_and_the_last_good_one_stays(
    registry, cluster, tiny_model_dir, tmp_path
):
    crown(registry)
    sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)  # version 1, verified, served
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    (other / "generation_config.json").write_text("{}")  # another checkpoint: another published folder
    second = published_version(registry["uri"], registry["name"], registry["root"], other, "outputs/rl/k/attempt-2")
    crown(registry, second.version)
    tamper_same_size(second.source)

    with pytest.raises(CaiError, match=f"{second.source}/model.safetensors: sha256 differs from the manifest"):
        sync(api_of(cluster), registry["uri"], registry["name"], NAMESPACE)

    service = served(cluster, registry["name"])
    assert service["spec"]["predictor"]["model"]["storageUri"] == registry["version"].source
    assert service["metadata"]["annotations"][VERSION_ANNOTATION] == registry["version"].version
    assert len(cluster.patches) == 1


# -- cai serve verify: what the serving pod's init container runs ------------------------------------


@pytest.fixture
def read_only_s3(s3_server, monkeypatch):
    """S3 reached through a proxy that refuses every write with 403 AccessDenied, as a read-only
    credential does."""
    proxy = FaultProxy(s3_server)
    proxy.deny_writes()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    yield proxy
    proxy.close()


def test_verify_passes_the_champions_folder_reading_with_read_only_access(registry, read_only_s3):
    crown(registry)
    info = verify(registry["uri"], registry["name"], registry["version"].source)
    assert info.version == registry["version"].version
    assert read_only_s3.denied == 0
    with pytest.raises(CaiError, match="access denied"):
        ArtifactStore.open(registry["version"].source).write_bytes("probe", b"x")


def test_verify_refuses_a_tampered_file_of_the_same_size(registry, read_only_s3):
    crown(registry)
    with pytest.MonkeyPatch.context() as direct:  # the tampering, with a write credential
        direct.setenv("AWS_ENDPOINT_URL_S3", read_only_s3.upstream_url)
        tamper_same_size(registry["version"].source, "config.json")
    with pytest.raises(CaiError, match="config.json: sha256 differs from the manifest; refusing it"):
        verify(registry["uri"], registry["name"], registry["version"].source)


def test_verify_refuses_a_folder_that_is_not_the_champions(registry, read_only_s3):
    crown(registry)
    elsewhere = f"{registry['root']}/models/someone-elses"
    with pytest.raises(CaiError, match=f"{elsewhere}: not the folder of models:/{registry['name']}@champion"):
        verify(registry["uri"], registry["name"], elsewhere)


def test_cai_serve_verify_is_one_line_and_exit_2_for_a_tampered_champion(registry, tmp_path):
    crown(registry)
    tamper_same_size(registry["version"].source)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "cai"), "serve", "verify", registry["name"],
         "--storage-uri", registry["version"].source, "--tracking-uri", registry["uri"]],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {registry['version'].source}/model.safetensors: sha256 differs from the manifest; refusing it"
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
