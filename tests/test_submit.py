"""`submit_run` / `cai submit`: the compiled pipeline is uploaded as one version and run with the config's params.

Kubeflow Pipelines' API server cannot run here, so `KfpStandin` (tests/kfp_standin.py) stands in
for it: a real HTTP server speaking the v2beta1 REST API, in single-user or multi-user mode, that
refuses namespace-less requests and duplicate names as the real one does. Everything on our side
of that API is real: config, compilation, versioning, the `kfp.Client` SDK and its HTTP calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import warnings
import weakref
from pathlib import Path

import kfp_server_api
import pytest
import yaml
from conftest import free_port
from kfp import Client
from kfp_standin import KfpStandin

from cai_lib.core.errors import CaiError
from cai_lib.platform.kfp_client import SA_TOKEN_ENV, check_host, connect_kfp
from cai_lib.platform.run_config import load_run_config, params_as_pipeline_arguments
from pipelines.submit import PIPELINE_NAME, submit_run

HOST = "http://kfp.example:8888"
CAI = Path(sys.executable).parent / "cai"
USERS = {"alice-token": {"team-a"}, "bob-token": {"team-b"}, "admin-token": {"kubeflow", "team-a", "team-b"}}


def kfp_client(host: str, namespace: str = "kubeflow", token_path: Path | None = None) -> Client:
    """A plain `kfp.Client` (its banner and FutureWarning silenced)."""
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    credentials = ServiceAccountTokenVolumeCredentials(str(token_path)) if token_path else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        return Client(host=host, namespace=namespace, credentials=credentials)


class RecordingKfpClient:
    """A real `kfp.Client` connected to its own single-user `KfpStandin`, for tests that inject
    the client (`submit_run(..., client=...)`, `retrain(..., client=...)`).

    Every `kfp.Client` attribute is the real client's; `runs` lists the runs the stand-in created
    (run id, job name, params, experiment, pipeline and version ids), `package_of` the text of an
    uploaded version.
    """

    def __init__(self, standin: KfpStandin | None = None):
        self.standin = standin or KfpStandin().start()
        if standin is None:
            weakref.finalize(self, self.standin.stop)
        self.client = kfp_client(self.standin.url)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["client"], name)

    @property
    def runs(self) -> list[dict]:
        return [
            {
                "run_id": run["run_id"],
                "job_name": run["display_name"],
                "params": run["runtime_config"].get("parameters"),
                "experiment_id": run["experiment_id"],
                "pipeline_id": run["pipeline_version_reference"]["pipeline_id"],
                "version_id": run["pipeline_version_reference"]["pipeline_version_id"],
            }
            for run in self.standin.runs
        ]

    def package_of(self, version_id: str) -> str:
        return self.standin.package_of(version_id)


def pipeline_parameters(package: str) -> dict:
    """The root parameters of a compiled package (its first document is the pipeline spec)."""
    pipeline_spec = next(yaml.safe_load_all(package))
    return pipeline_spec["root"]["inputDefinitions"]["parameters"]


def digest_name(package: str) -> str:
    """The version name for a package: the sha256 of its YAML documents as canonical JSON."""
    content = json.dumps(list(yaml.safe_load_all(package)), sort_keys=True, default=str)
    return f"{PIPELINE_NAME}-{hashlib.sha256(content.encode()).hexdigest()[:12]}"


@pytest.fixture(autouse=True)
def no_local_kfp_settings(tmp_path, monkeypatch):
    """Neither a namespace saved in ~/.config/kfp/context.json nor a projected token on this machine."""
    monkeypatch.setattr(Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setenv(SA_TOKEN_ENV, str(tmp_path / "no-token"))


@pytest.fixture
def kfp_server():
    """A single-user KFP API server (standalone Kubeflow Pipelines)."""
    with KfpStandin() as standin:
        yield standin


@pytest.fixture
def multi_user_kfp():
    """A multi-user KFP API server: alice may use team-a, bob team-b; pipelines need a namespace."""
    with KfpStandin(multi_user=True, users=USERS) as standin:
        yield standin


@pytest.fixture
def as_user(tmp_path, monkeypatch):
    """`as_user("alice-token")`: the projected ServiceAccount token `connect_kfp` sends is that user's."""

    def use(token: str) -> Path:
        path = tmp_path / f"{token}.jwt"
        path.write_text(token)
        monkeypatch.setenv(SA_TOKEN_ENV, str(path))
        return path

    return use


# --- what is uploaded and run --------------------------------------------------------------------


def test_uploaded_package_is_the_compiled_pipeline_with_the_config_as_defaults(kfp_server):
    config = load_run_config(None, ["constitution=harmless@1.0.0", "num_red_team=7"])
    run = submit_run(kfp_server.url, config, "cai-tests")
    parameters = pipeline_parameters(kfp_server.package_of(run.version_id))
    assert parameters["constitution"]["defaultValue"] == "harmless@1.0.0"
    assert parameters["constitution"]["parameterType"] == "STRING"
    assert parameters["num_red_team"]["defaultValue"] == 7
    assert set(parameters) == set(params_as_pipeline_arguments(config.params))


def test_run_parameters_are_the_config_params(kfp_server):
    config = load_run_config(None, ["constitution=harmless@1.0.0", "critique_revise.rounds=2", "seed=11"])
    run = submit_run(kfp_server.url, config, "cai-tests", run_name="bump rounds")
    [recorded] = kfp_server.runs
    params = recorded["runtime_config"]["parameters"]
    assert params == params_as_pipeline_arguments(config.params)
    assert params["constitution"] == "harmless@1.0.0"
    assert params["critique_revise"]["rounds"] == 2
    assert params["seed"] == 11
    assert recorded["display_name"] == "bump rounds"
    [experiment] = kfp_server.experiments
    assert experiment["display_name"] == "cai-tests"
    assert recorded["experiment_id"] == experiment["experiment_id"]
    reference = recorded["pipeline_version_reference"]
    assert (reference["pipeline_id"], reference["pipeline_version_id"]) == (run.pipeline_id, run.version_id)
    assert run.run_id == recorded["run_id"]
    assert run.url == f"{kfp_server.url}/#/runs/details/{run.run_id}"


def test_deploy_settings_are_compiled_into_the_package(kfp_server):
    config = load_run_config(None, ["deploy.image_cpu=registry.example/cai:test-1"])
    run = submit_run(kfp_server.url, config, "cai-tests")
    assert "image: registry.example/cai:test-1" in kfp_server.package_of(run.version_id)


def test_an_injected_client_is_used(kfp_server):
    kfp = RecordingKfpClient(kfp_server)
    run = submit_run(HOST, load_run_config(None, ["num_red_team=5"]), "cai-tests", client=kfp)
    assert [r["run_id"] for r in kfp.runs] == [run.run_id]
    assert run.url == f"{HOST}/#/runs/details/{run.run_id}"


# --- one pipeline, one version per package -------------------------------------------------------


def test_first_submit_creates_the_pipeline_and_exactly_one_digest_named_version(kfp_server):
    run = submit_run(kfp_server.url, load_run_config(None, ["num_red_team=5"]), "cai-tests")
    [pipeline] = kfp_server.pipelines
    [version] = kfp_server.versions
    assert pipeline["display_name"] == PIPELINE_NAME
    assert version["display_name"] == digest_name(version["package"])
    assert (run.pipeline_id, run.version_id) == (pipeline["pipeline_id"], version["pipeline_version_id"])


def test_the_same_config_twice_reuses_pipeline_and_version(kfp_server):
    config = load_run_config(None, ["num_red_team=5"])
    first = submit_run(kfp_server.url, config, "cai-tests")
    second = submit_run(kfp_server.url, config, "cai-tests")
    assert len(kfp_server.pipelines) == 1
    assert len(kfp_server.versions) == 1
    assert (second.pipeline_id, second.version_id) == (first.pipeline_id, first.version_id)
    assert second.run_id != first.run_id
    assert len(kfp_server.runs) == 2


def test_a_changed_config_uploads_exactly_one_new_version_of_the_same_pipeline(kfp_server):
    first = submit_run(kfp_server.url, load_run_config(None, ["num_red_team=5"]), "cai-tests")
    second = submit_run(kfp_server.url, load_run_config(None, ["num_red_team=6"]), "cai-tests")
    assert second.pipeline_id == first.pipeline_id
    assert second.version_id != first.version_id
    assert [v["pipeline_version_id"] for v in kfp_server.versions] == [first.version_id, second.version_id]
    assert pipeline_parameters(kfp_server.package_of(second.version_id))["num_red_team"]["defaultValue"] == 6


def test_a_pipeline_created_by_a_concurrent_submit_is_used(kfp_server, monkeypatch):
    """Another submit creates pipeline and version between our lookups and our creates (409s)."""
    config = load_run_config(None, ["num_red_team=5"])
    other = submit_run(kfp_server.url, config, "cai-tests")
    client = connect_kfp(kfp_server.url)
    for method, empty in [
        ("list_pipelines", kfp_server_api.V2beta1ListPipelinesResponse()),
        ("list_pipeline_versions", kfp_server_api.V2beta1ListPipelineVersionsResponse()),
    ]:
        real = getattr(client, method)
        calls = []

        def first_finds_nothing(*args, _real=real, _calls=calls, _empty=empty, **kwargs):
            _calls.append(1)
            return _empty if len(_calls) == 1 else _real(*args, **kwargs)

        monkeypatch.setattr(client, method, first_finds_nothing)
    run = submit_run(kfp_server.url, config, "cai-tests", client=client)
    assert (run.pipeline_id, run.version_id) == (other.pipeline_id, other.version_id)
    assert (len(kfp_server.pipelines), len(kfp_server.versions)) == (1, 1)
    assert [
        r["status"] for r in kfp_server.requests if r["method"] == "POST" and "pipelines" in r["path"]
    ] == [200, 200, 409, 409]


# --- multi-user Kubeflow: the user's namespace -----------------------------------------------------


def cai_submit(host: str, namespace: str, *overrides: str) -> subprocess.CompletedProcess:
    """`cai submit` as a user runs it, with the token `as_user` chose in the environment."""
    args = [str(CAI), "submit", "--host", host, "--namespace", namespace, "--experiment", "cai-tests"]
    # An independent judge: `cai submit` refuses a run whose judge is its base or feedback model.
    for override in ("judge_model=Qwen/Qwen2.5-7B-Instruct", *overrides):
        args += ["--set", override]
    return subprocess.run(args, capture_output=True, text=True, check=False, env=os.environ.copy())


def test_cai_submit_twice_in_a_namespace_makes_one_pipeline_one_version_two_runs(multi_user_kfp, as_user):
    as_user("alice-token")
    for _ in range(2):
        submitted = cai_submit(multi_user_kfp.url, "team-a", "num_red_team=5")
        assert submitted.returncode == 0, submitted.stderr
        assert "run id: " in submitted.stdout
    [pipeline] = multi_user_kfp.pipelines
    assert (pipeline["display_name"], pipeline["namespace"]) == (PIPELINE_NAME, "team-a")
    [version] = multi_user_kfp.versions
    assert version["display_name"] == digest_name(version["package"])
    assert [r["namespace"] for r in multi_user_kfp.runs] == ["team-a", "team-a"]
    assert {r["pipeline_version_reference"]["pipeline_version_id"] for r in multi_user_kfp.runs} == {
        version["pipeline_version_id"]
    }
    assert [e["namespace"] for e in multi_user_kfp.experiments] == ["team-a"]
    # Every pipeline and experiment list asked for team-a (creates carry it in the body, stored
    # above); nothing was refused.
    lists = [
        r
        for r in multi_user_kfp.requests
        if r["method"] == "GET" and r["path"].endswith(("/pipelines", "/experiments"))
    ]
    assert lists and all(r["query"].get("namespace") == "team-a" for r in lists)
    assert all(r["status"] == 200 for r in multi_user_kfp.requests)
    assert {r["token"] for r in multi_user_kfp.requests if r["path"] != "/apis/v2beta1/healthz"} == {
        "alice-token"
    }


def test_a_second_user_in_another_namespace_gets_their_own_pipeline(multi_user_kfp, as_user):
    config = load_run_config(None, ["num_red_team=5"])
    as_user("alice-token")
    alice = submit_run(multi_user_kfp.url, config, "cai-tests", namespace="team-a")
    as_user("bob-token")
    bob = submit_run(multi_user_kfp.url, config, "cai-tests", namespace="team-b")
    assert bob.pipeline_id != alice.pipeline_id
    assert bob.version_id != alice.version_id
    for namespace, run in [("team-a", alice), ("team-b", bob)]:
        [pipeline] = multi_user_kfp.pipelines_in(namespace)
        assert pipeline["pipeline_id"] == run.pipeline_id
        assert [v["pipeline_version_id"] for v in multi_user_kfp.versions_of(run.pipeline_id)] == [
            run.version_id
        ]
        [recorded] = multi_user_kfp.runs_in(namespace)
        assert recorded["run_id"] == run.run_id
        assert multi_user_kfp.pipeline_of_version(run.version_id)["namespace"] == namespace


def test_a_changed_package_in_a_namespace_adds_exactly_one_version(multi_user_kfp, as_user):
    as_user("alice-token")
    first = submit_run(
        multi_user_kfp.url, load_run_config(None, ["num_red_team=5"]), "cai-tests", namespace="team-a"
    )
    again = submit_run(
        multi_user_kfp.url, load_run_config(None, ["num_red_team=5"]), "cai-tests", namespace="team-a"
    )
    changed = submit_run(
        multi_user_kfp.url, load_run_config(None, ["num_red_team=6"]), "cai-tests", namespace="team-a"
    )
    assert first.pipeline_id == again.pipeline_id == changed.pipeline_id
    assert again.version_id == first.version_id != changed.version_id
    assert [v["pipeline_version_id"] for v in multi_user_kfp.versions] == [
        first.version_id,
        changed.version_id,
    ]
    assert len(multi_user_kfp.runs_in("team-a")) == 3


@pytest.mark.server  # its own KfpStandin
def test_a_shared_pipeline_of_the_same_name_is_not_used(as_user):
    """KFP's default multi-user config allows shared (namespace-less) pipelines, which is all
    `kfp.Client.get_pipeline_id` sees; a submit in team-a uses team-a's own pipeline."""
    with KfpStandin(multi_user=True, require_namespace_for_pipelines=False, users=USERS) as standin:
        package = Path(as_user("admin-token")).with_name("shared.yaml")
        package.write_text(yaml.safe_dump({"pipelineInfo": {"name": "shared"}, "root": {}}))
        admin = kfp_client(standin.url, token_path=Path(os.environ[SA_TOKEN_ENV]))
        with contextlib.redirect_stdout(io.StringIO()):
            shared = admin.upload_pipeline(str(package), pipeline_name=PIPELINE_NAME)
        assert admin.get_pipeline_id(PIPELINE_NAME) == shared.pipeline_id  # what the old lookup found

        as_user("alice-token")
        config = load_run_config(None, ["num_red_team=5"])
        first = submit_run(standin.url, config, "cai-tests", namespace="team-a")
        second = submit_run(standin.url, config, "cai-tests", namespace="team-a")
        assert first.pipeline_id == second.pipeline_id != shared.pipeline_id
        assert standin.pipeline_of_version(first.version_id)["namespace"] == "team-a"
        assert len(standin.versions_of(shared.pipeline_id)) == 1  # only the upload's own
        assert len(standin.versions_of(first.pipeline_id)) == 1


def test_submit_to_another_users_namespace_is_refused_naming_host_and_status(multi_user_kfp, as_user):
    as_user("alice-token")
    with pytest.raises(
        CaiError, match=f"{multi_user_kfp.url} refused the submission: 403 Forbidden: .*team-b"
    ):
        submit_run(multi_user_kfp.url, load_run_config(), "cai-tests", namespace="team-b")
    assert (multi_user_kfp.pipelines, multi_user_kfp.versions, multi_user_kfp.runs) == ([], [], [])


def test_submit_without_a_namespace_on_multi_user_kubeflow_is_refused(multi_user_kfp, as_user):
    as_user("alice-token")
    with pytest.raises(CaiError, match="is multi-user: pass --namespace"):
        submit_run(multi_user_kfp.url, load_run_config(), "cai-tests")
    assert multi_user_kfp.pipelines == []


def test_the_client_namespace_is_the_default(multi_user_kfp, as_user):
    """A client configured with a namespace (as kfp.Client is in a pod) files the pipeline there too."""
    token = as_user("alice-token")
    client = kfp_client(multi_user_kfp.url, namespace="team-a", token_path=token)
    run = submit_run(multi_user_kfp.url, load_run_config(), "cai-tests", client=client)
    assert multi_user_kfp.pipeline_of_version(run.version_id)["namespace"] == "team-a"
    assert [r["run_id"] for r in multi_user_kfp.runs_in("team-a")] == [run.run_id]


# --- the stand-in refuses what the real multi-user server refuses ---------------------------------


def test_standin_refuses_namespace_less_requests_in_multi_user_mode(multi_user_kfp, as_user):
    """Had `submit_run` dropped the namespace anywhere, these are the answers it would have got."""
    client = kfp_client(multi_user_kfp.url, token_path=as_user("alice-token"))
    package = Path(os.environ[SA_TOKEN_ENV]).with_name("p.yaml")
    package.write_text(yaml.safe_dump({"pipelineInfo": {"name": "p"}, "root": {}}))
    attempts = {
        "get_pipeline_id": lambda: client.get_pipeline_id(PIPELINE_NAME),
        "list_pipelines": lambda: client.list_pipelines(),
        "upload_pipeline": lambda: client.upload_pipeline(str(package), pipeline_name=PIPELINE_NAME),
        "create_pipeline": lambda: client.pipelines.pipeline_service_create_pipeline(
            kfp_server_api.V2beta1Pipeline(display_name=PIPELINE_NAME)
        ),
        "list_experiments": lambda: client.list_experiments(),
        "create_experiment": lambda: client.create_experiment("cai-tests"),
        "create_run": lambda: client.run_pipeline("", "r", pipeline_id="p", version_id="v"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(kfp_server_api.ApiException) as refused, contextlib.redirect_stdout(io.StringIO()):
            attempt()
        assert refused.value.status == 400, what
    assert (multi_user_kfp.pipelines, multi_user_kfp.experiments, multi_user_kfp.runs) == ([], [], [])


def test_standin_keeps_namespaces_apart_and_names_unique(multi_user_kfp, as_user):
    admin = kfp_client(multi_user_kfp.url, token_path=as_user("admin-token"))
    package = Path(os.environ[SA_TOKEN_ENV]).with_name("p.yaml")
    package.write_text(yaml.safe_dump({"pipelineInfo": {"name": "p"}, "root": {}}))
    with contextlib.redirect_stdout(io.StringIO()):
        in_a = admin.upload_pipeline(str(package), pipeline_name="p", namespace="team-a")
        in_b = admin.upload_pipeline(
            str(package), pipeline_name="p", namespace="team-b"
        )  # same name, other namespace
        assert [p.pipeline_id for p in admin.list_pipelines(namespace="team-b").pipelines] == [
            in_b.pipeline_id
        ]
        with pytest.raises(kfp_server_api.ApiException) as duplicate:
            admin.upload_pipeline(str(package), pipeline_name="p", namespace="team-a")
        assert duplicate.value.status == 409
        admin.upload_pipeline_version(str(package), pipeline_version_name="p-2", pipeline_id=in_a.pipeline_id)
        with pytest.raises(kfp_server_api.ApiException) as duplicate:
            admin.upload_pipeline_version(
                str(package), pipeline_version_name="p-2", pipeline_id=in_a.pipeline_id
            )
        assert duplicate.value.status == 409
    # The upload made each pipeline a first version named after it, then p-2 in team-a.
    assert [v["display_name"] for v in multi_user_kfp.versions] == ["p", "p", "p-2"]
    bob = kfp_client(multi_user_kfp.url, token_path=as_user("bob-token"))
    with pytest.raises(kfp_server_api.ApiException) as forbidden:
        bob.list_pipeline_versions(in_a.pipeline_id)
    assert forbidden.value.status == 403


# --- hosts ------------------------------------------------------------------------------------------


def test_submit_without_a_host_is_refused(kfp_server):
    with pytest.raises(CaiError, match="cai submit needs --host or KFP_HOST"):
        submit_run(None, load_run_config(), "cai-tests", client=RecordingKfpClient(kfp_server))
    assert kfp_server.runs == []


def test_a_host_without_scheme_is_refused():
    with pytest.raises(CaiError, match="give the URL with its scheme, e.g. http://kfp.example:8888"):
        submit_run("kfp.example:8888", load_run_config(), "cai-tests")


def test_an_unreachable_host_is_named():
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CaiError, match=f"Kubeflow Pipelines host {host} .*unreachable"):
        submit_run(host, load_run_config(), "cai-tests")


@pytest.mark.server  # an HTTP server of its own
def test_a_host_that_answers_with_an_error_status_counts_as_reachable():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_host(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
