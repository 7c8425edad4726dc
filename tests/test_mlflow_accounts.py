"""`cai mlflow setup-accounts`, as the chart's MLflow admin hook Job runs it, against the real
`mlflow server` with basic auth as the chart renders it.

The hook starts beside the server on a first install, so it must wait for it; Helm runs it on every
upgrade and retries it on failure, so a second run must end in the same state. The production
model here was created by the pipeline's account before the run (as an older install, where the
pipeline was the admin, left it): afterwards the promoter may write it and the pipeline may not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from test_helm_chart import (
    FULLNAME,
    env_of,
    find,
    pod_spec,
    render_objects,
    rendered_auth,
    rendered_mlflow_server,
)

from cai_lib.core.names import CHAMPION, candidates_name
from cai_lib.core.tracking import scoped_environ

MODEL = "cai-harmless-rl-cai"
# The Secrets the hook reads, by name and key (the chart's default names).
SECRETS = {
    "cai-mlflow-admin": {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "s3cret-admin"},
    "cai-mlflow": {"MLFLOW_TRACKING_USERNAME": "cai-pipeline", "MLFLOW_TRACKING_PASSWORD": "s3cret-pipeline"},
    "cai-mlflow-promoter": {
        "MLFLOW_TRACKING_USERNAME": "cai-promoter",
        "MLFLOW_TRACKING_PASSWORD": "s3cret-promoter",
    },
    "cai-mlflow-serving": {
        "MLFLOW_TRACKING_USERNAME": "cai-serving",
        "MLFLOW_TRACKING_PASSWORD": "s3cret-serving",
    },
}
ADMIN, PIPELINE, PROMOTER, SERVING = (
    tuple(SECRETS[name].values())
    for name in ("cai-mlflow-admin", "cai-mlflow", "cai-mlflow-promoter", "cai-mlflow-serving")
)


def as_user(user: tuple[str, str]):
    return scoped_environ(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])


def refused(err: Exception) -> bool:
    return "PERMISSION_DENIED" in str(err) or "403" in str(err)


def hook_container(objects: list[dict]) -> dict:
    spec = pod_spec(find(objects, "Job", f"{FULLNAME}-mlflow-admin"))
    return next(
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "setup-accounts"
    )


def hook_env(container: dict, tracking_uri: str) -> dict[str, str]:
    """The hook container's environment with its Secrets resolved as the kubelet would, and the
    env ConfigMap's tracking URI pointing here."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    for name, source in env_of(container).items():
        if isinstance(source, str):
            continue
        ref = source["secretKeyRef"]
        env[name] = SECRETS[ref["name"]][ref["key"]]
    return env


def run_hook(args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
    cai = str(Path(sys.executable).parent / "cai")
    return subprocess.Popen(
        [cai, *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.fixture(scope="module")
def setup_runs(tmp_path_factory):
    """The chart's server with auth; the hook started before it (run 1), the production model then
    created by the pipeline's account, and the hook run twice more (runs 2 and 3). Yields the
    server's URI and each run's (exit code, output)."""
    from mlflow import MlflowClient

    work, port = tmp_path_factory.mktemp("accounts"), free_port()
    uri = f"http://127.0.0.1:{port}"
    objects = render_objects({"mlflow": {"server": {"port": port, "workers": 1}}})
    server = pod_spec(find(objects, "Deployment", f"{FULLNAME}-mlflow"))
    server_env = rendered_auth(server, work, ADMIN)
    hook = hook_container(objects)
    env = hook_env(hook, uri)
    runs = []
    first = run_hook(hook["args"], env)  # before the server listens: it must wait
    with rendered_mlflow_server(server["containers"][0]["args"], port, work, server_env):
        output, _ = first.communicate(timeout=300)
        runs.append((first.returncode, output))
        with as_user(PIPELINE):
            MlflowClient(uri, uri).create_registered_model(MODEL)
        for _ in range(2):
            again = run_hook(hook["args"], env)
            output, _ = again.communicate(timeout=300)
            runs.append((again.returncode, output))
        yield uri, runs


def test_the_hook_runs_setup_accounts_as_the_admin_with_each_accounts_secret():
    container = hook_container(render_objects({"retrain": {"constitutions": ["helpful"]}}))
    assert container["args"] == [
        "mlflow", "setup-accounts", "--prefix", "cai", "--constitution", "harmless", "--constitution", "helpful"
    ]  # fmt: skip
    secrets = {
        name: source["secretKeyRef"]["name"] for name, source in env_of(container).items() if name != "HOME"
    }
    assert secrets == {
        "MLFLOW_TRACKING_USERNAME": "cai-mlflow-admin",
        "MLFLOW_TRACKING_PASSWORD": "cai-mlflow-admin",
        "CAI_PIPELINE_TRACKING_USERNAME": "cai-mlflow",
        "CAI_PIPELINE_TRACKING_PASSWORD": "cai-mlflow",
        "CAI_PROMOTER_TRACKING_USERNAME": "cai-mlflow-promoter",
        "CAI_PROMOTER_TRACKING_PASSWORD": "cai-mlflow-promoter",
        "CAI_SERVING_TRACKING_USERNAME": "cai-mlflow-serving",
        "CAI_SERVING_TRACKING_PASSWORD": "cai-mlflow-serving",
    }


def test_the_hook_waits_for_a_server_that_starts_after_it(setup_runs):
    _, runs = setup_runs
    code, output = runs[0]
    assert code == 0, output
    assert "waiting for MLflow" in output
    assert "pipeline account cai-pipeline: created" in output
    # grants need no model yet: the promoter holds MANAGE on the names before anyone creates them
    assert f"cai-promoter: MANAGE on {MODEL}\n" in output


def test_a_second_and_third_run_succeed_and_leave_every_grant_as_it_was(setup_runs):
    _, runs = setup_runs
    (code2, second), (code3, third) = runs[1:]
    assert code2 == 0 and code3 == 0, second + third
    assert "serving account cai-serving: exists, password set" in second
    # run 2 found the pipeline's MANAGE from creating the model and made it READ; run 3 changed nothing
    assert f"cai-pipeline: READ on {MODEL} (replaced)" in second
    assert f"cai-promoter: MANAGE on {MODEL} (already)" in second
    assert "(replaced)" not in third
    assert f"cai-pipeline: READ on {MODEL} (already)" in third


def test_no_platform_account_is_an_admin(setup_runs):
    from mlflow.server.auth.client import AuthServiceClient

    uri, _ = setup_runs
    with as_user(ADMIN):
        admins = {
            user[0]: AuthServiceClient(uri).get_user(user[0]).is_admin
            for user in (PIPELINE, PROMOTER, SERVING)
        }
    assert admins == {"cai-pipeline": False, "cai-promoter": False, "cai-serving": False}


def test_the_promoter_may_write_the_production_model(setup_runs):
    from mlflow import MlflowClient

    uri, _ = setup_runs
    with as_user(PROMOTER):
        client = MlflowClient(uri, uri)
        version = client.create_model_version(MODEL, "s3://bucket/models/abc")
        client.set_registered_model_alias(MODEL, CHAMPION, version.version)
        assert client.get_model_version_by_alias(MODEL, CHAMPION).version == version.version


def test_the_pipeline_may_not_write_the_production_model_but_writes_its_candidates(setup_runs):
    from mlflow import MlflowClient

    uri, _ = setup_runs
    with as_user(PIPELINE):
        client = MlflowClient(uri, uri)
        with pytest.raises(Exception) as alias:
            client.set_registered_model_alias(MODEL, CHAMPION, "1")
        with pytest.raises(Exception) as version:
            client.create_model_version(MODEL, "s3://elsewhere/weights")
        client.create_registered_model(candidates_name(MODEL))
        candidate = client.create_model_version(candidates_name(MODEL), "s3://bucket/models/abc")
    assert refused(alias.value) and refused(version.value)
    assert candidate.version == "1"


def test_the_serving_account_reads_and_writes_nothing(setup_runs):
    from mlflow import MlflowClient

    uri, _ = setup_runs
    with as_user(SERVING):
        client = MlflowClient(uri, uri)
        assert client.get_registered_model(MODEL).name == MODEL
        with pytest.raises(Exception) as alias:
            client.set_registered_model_alias(MODEL, CHAMPION, "1")
        with pytest.raises(Exception) as tag:
            client.set_registered_model_tag(MODEL, "cai.note", "x")
        with pytest.raises(Exception) as version:
            client.create_model_version(MODEL, "s3://elsewhere/weights")
    assert refused(alias.value) and refused(tag.value) and refused(version.value)


def test_an_account_named_like_the_admin_is_refused_in_one_line():
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "cai"),
            "mlflow",
            "setup-accounts",
            "--tracking-uri",
            "http://127.0.0.1:9",
        ],
        env={
            **os.environ,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": "a",
            "CAI_PIPELINE_TRACKING_USERNAME": "admin",
            "CAI_PIPELINE_TRACKING_PASSWORD": "b",
            "CAI_PROMOTER_TRACKING_USERNAME": "p",
            "CAI_PROMOTER_TRACKING_PASSWORD": "c",
            "CAI_SERVING_TRACKING_USERNAME": "s",
            "CAI_SERVING_TRACKING_PASSWORD": "d",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: the pipeline account is named 'admin' like the admin account: give each its own user name "
        "(the split between them is the point)\n"
    )


def test_a_server_that_never_answers_fails_after_the_wait_in_one_line():
    env = {
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": "a",
        **{
            f"CAI_{kind}_TRACKING_{field}": f"{kind.lower()}-{field.lower()}"
            for kind in ("PIPELINE", "PROMOTER", "SERVING")
            for field in ("USERNAME", "PASSWORD")
        },
    }
    port = free_port()
    process = run_hook(
        ["mlflow", "setup-accounts", "--tracking-uri", f"http://127.0.0.1:{port}", "--wait", "3"], env
    )
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert output.splitlines()[-1].startswith(
        f"error: MLflow at http://127.0.0.1:{port} did not answer within 3s"
    )
