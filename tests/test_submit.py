"""`submit_run`: the real compiled pipeline is uploaded as a version and run with the config's params.

Kubeflow Pipelines' API server cannot run here, so `RecordingKfpClient` stands in for it: it
implements the `kfp.Client` methods `submit_run` calls, records every call and returns ids.
Everything on our side of that API (config, compilation, versioning, run parameters) is real.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import kfp_server_api
import pytest
import yaml
from conftest import free_port

from cai_lib.config import load_run_config, params_as_pipeline_arguments
from cai_lib.errors import CaiError
from pipelines.submit import PIPELINE_NAME, check_host, submit_run

HOST = "http://kfp.example:8888"


class RecordingKfpClient:
    """RecordingKfpClient — stands in for the Kubeflow Pipelines API server, which cannot run here.

    Holds pipelines, versions, experiments and runs in memory, as the server would, and keeps the
    text of every uploaded package so tests can read what was compiled.
    """

    def __init__(self):
        self.pipelines: dict[str, str] = {}
        self.versions: list[dict] = []
        self.experiments: dict[str, str] = {}
        self.runs: list[dict] = []

    def _add_version(self, pipeline_id: str, name: str, package_path: str) -> SimpleNamespace:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": f"version-{len(self.versions) + 1}",
            "display_name": name,
            "package": Path(package_path).read_text(),
        }
        self.versions.append(version)
        return SimpleNamespace(**version)

    def get_pipeline_id(self, name: str) -> str | None:
        return self.pipelines.get(name)

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
        pipeline_id = f"pipeline-{len(self.pipelines) + 1}"
        self.pipelines[pipeline_name] = pipeline_id
        # The server files the first upload as the pipeline's first version, named after it.
        self._add_version(pipeline_id, pipeline_name, pipeline_package_path)
        return SimpleNamespace(pipeline_id=pipeline_id, display_name=pipeline_name)

    def upload_pipeline_version(
        self,
        pipeline_package_path,
        pipeline_version_name,
        pipeline_id=None,
        pipeline_name=None,
        description=None,
    ):
        return self._add_version(pipeline_id, pipeline_version_name, pipeline_package_path)

    def list_pipeline_versions(self, pipeline_id, page_token="", page_size=10, sort_by="", filter=None):
        wanted = json.loads(filter)["predicates"][0]["stringValue"] if filter else None
        found = [
            SimpleNamespace(**v)
            for v in self.versions
            if v["pipeline_id"] == pipeline_id and wanted in (None, v["display_name"])
        ]
        return SimpleNamespace(pipeline_versions=found[:page_size] or None)

    def create_experiment(self, name, description=None, namespace=None):
        experiment_id = self.experiments.setdefault(name, f"experiment-{len(self.experiments) + 1}")
        return SimpleNamespace(experiment_id=experiment_id, display_name=name)

    def run_pipeline(self, experiment_id, job_name, params=None, pipeline_id=None, version_id=None, **kwargs):
        run = {
            "run_id": f"run-{len(self.runs) + 1}",
            "experiment_id": experiment_id,
            "job_name": job_name,
            "params": params,
            "pipeline_id": pipeline_id,
            "version_id": version_id,
        }
        self.runs.append(run)
        return SimpleNamespace(run_id=run["run_id"])

    def package_of(self, version_id: str) -> str:
        return next(v["package"] for v in self.versions if v["pipeline_version_id"] == version_id)


def pipeline_parameters(package: str) -> dict:
    """The root parameters of a compiled package (its first document is the pipeline spec)."""
    pipeline_spec = next(yaml.safe_load_all(package))
    return pipeline_spec["root"]["inputDefinitions"]["parameters"]


@pytest.fixture
def kfp():
    return RecordingKfpClient()


def test_uploaded_package_is_the_compiled_pipeline_with_the_config_as_defaults(kfp):
    config = load_run_config(None, ["constitution=harmless@1.0.0", "num_red_team=7"])
    run = submit_run(HOST, config, "cai-tests", client=kfp)
    parameters = pipeline_parameters(kfp.package_of(run.version_id))
    assert parameters["constitution"]["defaultValue"] == "harmless@1.0.0"
    assert parameters["constitution"]["parameterType"] == "STRING"
    assert parameters["num_red_team"]["defaultValue"] == 7
    assert set(parameters) == set(params_as_pipeline_arguments(config.params))


def test_run_parameters_are_the_config_params(kfp):
    config = load_run_config(None, ["constitution=harmless@1.0.0", "critique_revise.rounds=2", "seed=11"])
    run = submit_run(HOST, config, "cai-tests", run_name="bump rounds", client=kfp)
    recorded = kfp.runs[-1]
    assert recorded["params"] == params_as_pipeline_arguments(config.params)
    assert recorded["params"]["constitution"] == "harmless@1.0.0"
    assert recorded["params"]["critique_revise"]["rounds"] == 2
    assert recorded["params"]["seed"] == 11
    assert recorded["job_name"] == "bump rounds"
    assert recorded["experiment_id"] == kfp.experiments["cai-tests"]
    assert (recorded["pipeline_id"], recorded["version_id"]) == (run.pipeline_id, run.version_id)
    assert run.run_id == recorded["run_id"]
    assert run.url == f"{HOST}/#/runs/details/{run.run_id}"


def test_deploy_settings_are_compiled_into_the_package(kfp):
    config = load_run_config(None, ["deploy.image_cpu=registry.example/cai:test-1"])
    run = submit_run(HOST, config, "cai-tests", client=kfp)
    assert "image: registry.example/cai:test-1" in kfp.package_of(run.version_id)


def test_pipeline_is_created_once_and_the_same_config_reuses_its_version(kfp):
    config = load_run_config(None, ["num_red_team=5"])
    first = submit_run(HOST, config, "cai-tests", client=kfp)
    second = submit_run(HOST, config, "cai-tests", client=kfp)
    assert list(kfp.pipelines) == [PIPELINE_NAME]
    assert second.version_id == first.version_id
    assert second.run_id != first.run_id
    assert kfp.versions[-1]["display_name"].startswith(f"{PIPELINE_NAME}-")


def test_a_changed_config_uploads_a_new_version_of_the_same_pipeline(kfp):
    first = submit_run(HOST, load_run_config(None, ["num_red_team=5"]), "cai-tests", client=kfp)
    second = submit_run(HOST, load_run_config(None, ["num_red_team=6"]), "cai-tests", client=kfp)
    assert second.pipeline_id == first.pipeline_id
    assert second.version_id != first.version_id
    assert pipeline_parameters(kfp.package_of(second.version_id))["num_red_team"]["defaultValue"] == 6


def test_submit_without_a_host_is_refused(kfp):
    with pytest.raises(CaiError, match="cai submit needs --host or KFP_HOST"):
        submit_run(None, load_run_config(), "cai-tests", client=kfp)
    assert kfp.runs == []


def test_a_host_without_scheme_is_refused(kfp):
    with pytest.raises(CaiError, match="give the URL with its scheme, e.g. http://kfp.example:8888"):
        submit_run("kfp.example:8888", load_run_config(), "cai-tests", client=kfp)


def test_an_unreachable_host_is_named():
    host = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CaiError, match=f"Kubeflow Pipelines host {host} .*unreachable"):
        submit_run(host, load_run_config(), "cai-tests")


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


def test_an_api_error_is_a_user_error_naming_host_and_status(kfp):
    def refuse(*args, **kwargs):
        raise kfp_server_api.ApiException(status=403, reason="Forbidden")

    kfp.run_pipeline = refuse
    with pytest.raises(CaiError, match=f"{HOST} refused the submission: 403 Forbidden"):
        submit_run(HOST, load_run_config(), "cai-tests", client=kfp)
