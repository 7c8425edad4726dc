"""MLflow tracking against a real `mlflow server` (SQLite backend, artifacts in moto's S3):
one parent run per pipeline run with the config as params, one nested run per stage."""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path

import pytest

from cai_lib.core.errors import CaiError
from cai_lib.core.store import s3_client
from cai_lib.core.tracking import (
    MAX_PARAM_VALUE,
    TRUNCATED,
    connect,
    finish_pipeline_run,
    run_url,
    stage_run,
    start_pipeline_run,
)

CONSTITUTION_SHA = "ab" * 32
CONFIG = {
    "base_model": "smollm2-135m-instruct",
    "sft": {"learning_rate": 2e-05, "epochs": 1, "lora": {"r": 8}},
    "seeds": [1, 2],
    "rl": {"algorithm": "rloo", "use_vllm": False},
}


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def start(
    uri: str,
    config: dict = CONFIG,
    pipeline_run_id: str = "kfp-123",
    name: str = "run-1",
    experiment: str | None = None,
) -> str:
    return start_pipeline_run(
        uri, experiment or unique("exp"), pipeline_run_id, name, config, "harmless@1.0.0", CONSTITUTION_SHA
    )


def test_parent_run_logs_the_config_flattened_and_the_constitution_as_params(mlflow_server):
    run = connect(mlflow_server["uri"]).get_run(start(mlflow_server["uri"]))

    params = run.data.params
    assert params["base_model"] == "smollm2-135m-instruct"
    assert params["sft.learning_rate"] == "2e-05"
    assert params["sft.lora.r"] == "8"
    assert params["seeds"] == "[1, 2]"
    assert params["rl.use_vllm"] == "false"
    assert params["constitution.ref"] == "harmless@1.0.0"
    assert params["constitution.sha256"] == CONSTITUTION_SHA
    assert run.data.tags["cai.pipeline_run_id"] == "kfp-123"


def test_the_parent_run_is_tagged_with_its_kfp_runs_page_when_the_kfp_ui_is_named(mlflow_server, monkeypatch):
    monkeypatch.setenv("CAI_KFP_UI_URL", "https://kubeflow.example.com/pipelines/")
    run = connect(mlflow_server["uri"]).get_run(start(mlflow_server["uri"], pipeline_run_id="kfp-run-7"))

    assert (
        run.data.tags["cai.kfp.run_url"] == "https://kubeflow.example.com/pipelines/#/runs/details/kfp-run-7"
    )


def test_the_parent_runs_page_is_under_the_mlflow_ui_or_else_the_tracking_server(mlflow_server, monkeypatch):
    parent = start(mlflow_server["uri"])
    experiment = connect(mlflow_server["uri"]).get_run(parent).info.experiment_id
    direct = run_url(mlflow_server["uri"], parent)
    monkeypatch.setenv("CAI_MLFLOW_UI_URL", "https://mlflow.example.com")

    assert direct == f"{mlflow_server['uri']}/#/experiments/{experiment}/runs/{parent}"
    assert (
        run_url(mlflow_server["uri"], parent)
        == f"https://mlflow.example.com/#/experiments/{experiment}/runs/{parent}"
    )


def test_long_config_value_is_truncated_in_params_and_kept_whole_in_config_json(mlflow_server, tmp_path):
    inline_constitution = "name: inline\n" + "principle: be kind\n" * 500
    config = {**CONFIG, "constitution": inline_constitution}
    client = connect(mlflow_server["uri"])
    run_id = start(mlflow_server["uri"], config)

    logged = client.get_run(run_id).data.params["constitution"]
    assert len(logged) == MAX_PARAM_VALUE and logged.endswith(TRUNCATED)
    config_json = client.download_artifacts(run_id, "config.json", str(tmp_path))
    assert json.loads(Path(config_json).read_text()) == config


def test_reopening_a_pipeline_run_by_its_kfp_run_id_returns_the_same_parent_run(mlflow_server):
    experiment = unique("exp")

    first = start(mlflow_server["uri"], experiment=experiment)
    second = start(mlflow_server["uri"], experiment=experiment)

    assert first == second


def test_two_pipeline_runs_with_the_same_name_get_parent_runs_of_their_own(mlflow_server):
    experiment = unique("exp")

    first = start(mlflow_server["uri"], pipeline_run_id="kfp-1", name="nightly", experiment=experiment)
    second = start(mlflow_server["uri"], pipeline_run_id="kfp-2", name="nightly", experiment=experiment)

    assert first != second


def test_the_run_name_is_the_parent_runs_display_name(mlflow_server):
    run_id = start(mlflow_server["uri"], name="nightly retrain")
    assert connect(mlflow_server["uri"]).get_run(run_id).info.run_name == "nightly retrain"


def test_stage_run_is_nested_and_holds_metrics_report_and_constitution_in_s3(mlflow_server, s3_env, tmp_path):
    report = tmp_path / "report.html"
    report.write_text("<html><body>win rate 0.75</body></html>")
    pinned = tmp_path / "constitution.yaml"
    pinned.write_text("name: harmless\nversion: 1.0.0\n")
    client = connect(mlflow_server["uri"])
    parent_id = start(mlflow_server["uri"])

    with stage_run(mlflow_server["uri"], parent_id, "evaluate") as stage:
        stage.log_stage_metrics({"harmless_win_rate": 0.75, "elo": 1012.5})
        stage.log_artifact(report)
        stage.log_artifact(pinned)

    run = client.get_run(stage.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"harmless_win_rate": 0.75, "elo": 1012.5}
    assert client.get_run(parent_id).data.metrics["evaluate.harmless_win_rate"] == 0.75
    assert {a.path for a in client.list_artifacts(stage.run_id)} == {
        "report.html",
        "constitution.yaml",
        "metrics.json",
    }
    metrics_json = client.download_artifacts(stage.run_id, "metrics.json", str(tmp_path / "dl"))
    assert json.loads(Path(metrics_json).read_text()) == {"harmless_win_rate": 0.75, "elo": 1012.5}
    keys = [obj["Key"] for obj in s3_client().list_objects_v2(Bucket="mlflow-artifacts")["Contents"]]
    assert any(key.endswith(f"{stage.run_id}/artifacts/report.html") for key in keys)


def test_retried_stage_reopens_its_nested_run_instead_of_adding_one(mlflow_server):
    client = connect(mlflow_server["uri"])
    parent_id = start(mlflow_server["uri"])

    with (
        pytest.raises(RuntimeError, match="evicted"),
        stage_run(mlflow_server["uri"], parent_id, "critique_revise") as first,
    ):
        raise RuntimeError("pod evicted")
    assert client.get_run(first.run_id).info.status == "FAILED"
    with stage_run(mlflow_server["uri"], parent_id, "critique_revise") as retry:
        retry.log_stage_metrics({"rows": 16})

    assert retry.run_id == first.run_id
    assert client.get_run(retry.run_id).info.status == "FINISHED"
    experiment_id = client.get_run(parent_id).info.experiment_id
    nested = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert [run.info.run_id for run in nested] == [first.run_id]


def test_inside_a_stage_run_models_uris_resolve_against_its_tracking_store(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset below; restored after the test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    parent_id = start(mlflow_server["uri"])
    with stage_run(mlflow_server["uri"], parent_id, "sft"):
        assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server["uri"]
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_finishing_a_pipeline_run_records_whether_it_succeeded(mlflow_server):
    experiment = unique("exp")
    finished = start(mlflow_server["uri"], pipeline_run_id="kfp-ok", experiment=experiment)
    failed = start(mlflow_server["uri"], pipeline_run_id="kfp-bad", experiment=experiment)

    finish_pipeline_run(mlflow_server["uri"], experiment, "kfp-ok", succeeded=True)
    finish_pipeline_run(mlflow_server["uri"], experiment, "kfp-bad", succeeded=False)

    client = connect(mlflow_server["uri"])
    assert [client.get_run(run).info.status for run in (finished, failed)] == ["FINISHED", "FAILED"]


def test_finishing_a_run_that_never_opened_one_does_nothing(mlflow_server):
    experiment = unique("exp")
    start(mlflow_server["uri"], experiment=experiment)
    assert finish_pipeline_run(mlflow_server["uri"], experiment, "kfp-never-started", succeeded=False) is None


def test_inside_a_stage_run_the_pipeline_run_id_is_in_the_environment(mlflow_server):
    parent_id = start(mlflow_server["uri"], pipeline_run_id="kfp-77")
    with stage_run(mlflow_server["uri"], parent_id, "register"):
        assert os.environ["CAI_PIPELINE_RUN_ID"] == "kfp-77"
    assert "CAI_PIPELINE_RUN_ID" not in os.environ


def test_unknown_parent_run_is_a_cai_error(mlflow_server):
    with (
        pytest.raises(CaiError, match="parent MLflow run 'f00d' not found"),
        stage_run(mlflow_server["uri"], "f00d", "sft"),
    ):
        pass


def test_unreachable_server_from_the_environment_names_the_uri_and_the_variable(monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    with pytest.raises(CaiError, match=f"{uri} \\(set by MLFLOW_TRACKING_URI\\) did not answer"):
        start_pipeline_run(None, "exp", "kfp-1", "run-1", CONFIG, "harmless@1.0.0", CONSTITUTION_SHA)


def test_unreachable_server_from_the_argument_says_so(monkeypatch):
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    with pytest.raises(CaiError, match=f"{uri} \\(set by the tracking_uri argument"):
        connect(uri)


def test_missing_tracking_uri_is_a_cai_error(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    with pytest.raises(CaiError, match="no MLflow tracking URI"):
        connect(None)
