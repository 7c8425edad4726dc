"""Registered checkpoints load and serve with MLflow's own tools (`cai_lib.platform.pyfunc_model`).

Real parts: MLflow's `pyfunc.load_model` on `models:/NAME@ALIAS` URIs (a local SQLite registry,
and the real `mlflow server` fixture with its artifacts on moto's S3 server), and a real
`mlflow models serve` process answering HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, hand_lineage, wait_for_port

from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import connect
from cai_lib.method.preference_model import RewardScorer, conversation_of
from cai_lib.platform.pyfunc_model import MLMODEL, publish
from cai_lib.platform.registry.versions import register_checkpoint

PROMPTS = ["How do I pick a lock?", "What is the capital of France?"]
LINEAGE = hand_lineage()


def registered(tracking_uri: str, artifact_root: str, checkpoint, kind: str, name: str) -> str:
    """Store `checkpoint`, publish it, register it as `name` and make it champion; its folder URI."""
    uri = ArtifactStore.open(artifact_root).put_dir(checkpoint, "outputs/ck")
    source = publish(uri, artifact_root, kind)
    info = register_checkpoint(tracking_uri, name, source, None, LINEAGE)
    connect(tracking_uri).set_registered_model_alias(name, "champion", info.version)
    return source


@pytest.fixture
def local_registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return {"uri": uri, "root": str(tmp_path / "store")}


@pytest.fixture
def policy_champion(local_registry, tiny_model_dir) -> str:
    return registered(local_registry["uri"], local_registry["root"], tiny_model_dir, "policy", "cai-h-rl-cai")


def test_a_policy_champion_loads_by_alias_and_answers_as_the_backend_does(policy_champion):
    import mlflow.pyfunc

    from cai_lib.engines.generation import SamplingParams
    from cai_lib.engines.transformers_backend import TransformersBackend

    model = mlflow.pyfunc.load_model("models:/cai-h-rl-cai@champion")
    answers = model.predict(PROMPTS, params={"max_new_tokens": 6})
    expected = TransformersBackend(policy_champion).generate(
        [conversation_of(p) for p in PROMPTS], SamplingParams(max_new_tokens=6)
    )
    assert answers == expected and all(answers)


def test_a_policy_takes_a_dataframe_with_a_prompt_column(policy_champion):
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/cai-h-rl-cai@champion")
    frame = pd.DataFrame({"prompt": PROMPTS[:1]})
    assert model.predict(frame, params={"max_new_tokens": 3}) == model.predict(
        PROMPTS[:1], params={"max_new_tokens": 3}
    )


def test_a_preference_model_champion_scores_prompt_response_pairs(local_registry, tiny_reward_model_dir):
    import mlflow.pyfunc
    import pandas as pd

    source = registered(
        local_registry["uri"], local_registry["root"], tiny_reward_model_dir, "preference_model", "cai-h-pm"
    )
    pairs = pd.DataFrame({"prompt": PROMPTS, "response": ["I can't help with that.", "Paris."]})
    scores = mlflow.pyfunc.load_model("models:/cai-h-pm@champion").predict(pairs)
    assert scores == pytest.approx(RewardScorer.load(source).score(list(pairs.prompt), list(pairs.response)))


def test_publishing_the_same_checkpoint_again_copies_nothing(tmp_path, tiny_model_dir):
    root = str(tmp_path / "store")
    uri = ArtifactStore.open(root).put_dir(tiny_model_dir, "outputs/ck")
    first = publish(uri, root, "policy")
    mlmodel = ArtifactStore.open(first).read_bytes(MLMODEL)
    assert publish(uri, root, "policy") == first
    assert ArtifactStore.open(first).read_bytes(MLMODEL) == mlmodel


def test_a_local_published_folder_hard_links_the_weights(tmp_path, tiny_model_dir):
    root = tmp_path / "store"
    uri = ArtifactStore.open(root).put_dir(tiny_model_dir, "outputs/ck")
    folder = publish(uri, str(root), "policy")
    assert os.stat(f"{folder}/model.safetensors").st_ino == os.stat(f"{uri}/model.safetensors").st_ino


def test_weights_changed_after_registration_are_refused_when_loading(policy_champion):
    import mlflow.pyfunc

    weights = f"{policy_champion}/model.safetensors"
    os.unlink(weights)  # a hard link: replace it rather than write through it into the original
    with open(weights, "wb") as handle:
        handle.write(b"tampered")
    with pytest.raises(Exception, match="model.safetensors"):
        mlflow.pyfunc.load_model("models:/cai-h-rl-cai@champion")


def test_a_folder_rewritten_whole_with_a_matching_manifest_is_refused_by_the_registered_hash(policy_champion):
    """Every file agrees with the folder's own manifest; only the registry says it is not what was
    registered."""
    import mlflow.pyfunc

    from cai_lib.core.store import file_entry

    folder = Path(policy_champion)
    config = folder / "config.json"
    changed = {**json.loads(config.read_text()), "cai_rewritten": True}
    config.unlink()  # a hard link: replace it rather than write through it into the original
    config.write_text(json.dumps(changed))
    manifest = json.loads((folder / "_MANIFEST.json").read_text())
    manifest["files"]["config.json"] = file_entry(config)
    (folder / "_MANIFEST.json").unlink()
    (folder / "_MANIFEST.json").write_text(json.dumps(manifest))

    with pytest.raises(Exception, match="is not the checkpoint of any version cai-platform registered"):
        mlflow.pyfunc.load_model("models:/cai-h-rl-cai@champion")


def test_a_champion_registered_on_a_server_loads_from_s3(
    mlflow_server, s3_bucket, tiny_model_dir, monkeypatch
):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    source = registered(
        mlflow_server["uri"], f"s3://{s3_bucket}/cai", tiny_model_dir, "policy", "cai-s3-rl-cai"
    )
    assert source.startswith(f"s3://{s3_bucket}/cai/models/")
    answers = mlflow.pyfunc.load_model("models:/cai-s3-rl-cai@champion").predict(
        PROMPTS[:1], params={"max_new_tokens": 3}
    )
    assert len(answers) == 1 and answers[0]


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


@pytest.fixture(scope="module")
def served_champion(tmp_path_factory, tiny_model_dir):
    """`mlflow models serve` on a champion's alias, on a free port of 127.0.0.1."""
    work = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    registered(uri, str(work / "store"), tiny_model_dir, "policy", "cai-served-rl-cai")
    port = free_port()
    log = open(work / "serve.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/cai-served-rl-cai@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        # It starts `uvicorn` by name: the virtual environment's bin must be on PATH.
        env=dict(
            os.environ,
            MLFLOW_TRACKING_URI=uri,
            PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
        ),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc, f"mlflow models serve (log: {work / 'serve.log'})", timeout=180)
        yield {"url": f"http://127.0.0.1:{port}", "tracking_uri": uri}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        log.close()


def test_mlflow_models_serve_answers_invocations_with_the_champions_answers(served_champion, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_champion["tracking_uri"])
    status, body = post_json(
        f"{served_champion['url']}/invocations", {"inputs": PROMPTS[:1], "params": {"max_new_tokens": 5}}
    )
    expected = mlflow.pyfunc.load_model("models:/cai-served-rl-cai@champion").predict(
        PROMPTS[:1], params={"max_new_tokens": 5}
    )
    assert (status, body) == (200, {"predictions": expected})


def test_mlflow_models_serve_answers_a_malformed_request_with_400_naming_the_columns(served_champion):
    status, body = post_json(f"{served_champion['url']}/invocations", {"inputs": [{"question": "hi"}]})
    assert status == 400 and "prompt" in body["message"]
