"""The whole pipeline end to end through kfp.local, with tiny models, against a real `mlflow
server` and moto's S3 server: artifacts land in S3, models are registered with lineage, the
promotion gate moves (or keeps) the champion, and a run killed mid-generation resumes without
losing or duplicating a row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cai_lib.config import load_run_config
from cai_lib.constitution import constitutions_dir, load_constitution
from cai_lib.records import PromptRecord, Trace
from cai_lib.registry import list_models, version_by_alias
from cai_lib.shards import read_dataset
from cai_lib.store import ArtifactStore
from pipelines.local import run_local

pytestmark = pytest.mark.integration

ROLES = ("pm", "sl-cai", "rl-cai")


def tiny_run_config(
    path: Path,
    model: Path,
    bucket: str,
    tracking_uri: str,
    run_name: str,
    constitution: str = "harmless",
    **promotion,
) -> Path:
    """Every size cut to the bone: each stage runs for real on a handful of rows in seconds."""
    params = {
        "constitution": constitution,
        "base_model": str(model),
        "feedback_model": str(model),
        "num_red_team": 24,  # 18 train (9 per shard) / 6 eval
        "num_helpful": 4,
        "num_shards": 2,
        "run_name": run_name,
        "artifact_root": f"s3://{bucket}/runs",
        "mlflow_tracking_uri": tracking_uri,
        "experiment": "e2e",
        # One prompt per output shard and 32 tokens a turn: shard-000 takes seconds to finish, a
        # window wide enough to kill the run between its first and last part.
        "critique_revise": {"rounds": 1, "max_new_tokens": 32, "shard_size": 1, "batch_size": 4},
        "sft": {"max_steps": 1, "batch_size": 2, "max_length": 96},
        "pairs": {"max_new_tokens": 4, "batch_size": 4},
        "feedback": {"principles_per_pair": 1, "batch_size": 4},
        "preference_model": {"batch_size": 2, "max_length": 96, "eval_fraction": 0.2},
        "rl": {
            "steps": 1,
            "batch_size": 2,
            "num_generations": 2,
            "max_new_tokens": 4,
            "eval_prompts": 2,
            "max_length": 96,
        },
        "evaluation": {"max_new_tokens": 4, "batch_size": 4, "num_samples_in_report": 1},
        "promotion": promotion,
    }
    path.write_text(
        yaml.safe_dump(
            {"params": params, "deploy": {"resources": {}, "generation_retries": 0, "shard_parallelism": 1}}
        )
    )
    return path


def edited_constitution(path: Path):
    """harmless@1.0.0 with a new version number and a changed revision request, as a team edits it."""
    doc = yaml.safe_load((constitutions_dir() / "harmless" / "1.0.0.yaml").read_text())
    doc["version"] = "1.1.0"
    doc["critique_revision"][0]["revision_request"] = "Rewrite the response so that it is harmless and kind."
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_constitution(str(path))


@pytest.fixture
def e2e_env(s3_bucket, mlflow_server, tmp_path, monkeypatch):
    # kfp.local runs each step as a subprocess that inherits this environment.
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return {"bucket": s3_bucket, "tracking_uri": mlflow_server["uri"], "workdir": tmp_path}


def test_pipeline_runs_end_to_end_registers_gates_and_resumes_after_a_kill(e2e_env, tiny_model_dir, tmp_path):
    bucket, uri, workdir = e2e_env["bucket"], e2e_env["tracking_uri"], e2e_env["workdir"]
    harmless = load_constitution("harmless")

    # Run 1: no champion yet, so the gate promotes the RL-CAI policy.
    first = run_local(
        load_run_config(tiny_run_config(tmp_path / "r1.yaml", tiny_model_dir, bucket, uri, "r1")), workdir
    )
    run_root = ArtifactStore.open(f"s3://{bucket}/runs/r1")
    keys = run_root.list()
    for expected in (
        "constitution.yaml",
        "prompts/red_team-train/_SUCCESS.json",
        "traces/_SUCCESS.json",
        "helpful-samples/_SUCCESS.json",
        "checkpoints/sl-cai/_MANIFEST.json",
        "pairs/_SUCCESS.json",
        "labels/_SUCCESS.json",
        "checkpoints/pm/_MANIFEST.json",
        "checkpoints/rl-cai/_MANIFEST.json",
        "eval/metrics.json",
        "eval/report.html",
    ):
        assert expected in keys, expected
    assert first["promoted"] is True
    assert first["report"] == f"s3://{bucket}/runs/r1/eval/report.html"
    for role in ROLES:
        name = f"cai-harmless-{role}"
        version = list_models(uri, name)[0]
        assert version.tags["cai.constitution.sha256"] == harmless.sha256
        assert version.tags["cai.constitution.version"] == harmless.version
        assert version.tags["cai.pipeline_run_id"]
        assert version.source == f"s3://{bucket}/runs/r1/checkpoints/{role}"
        assert version_by_alias(uri, name, "champion").version == version.version

    # Run 2 trains an edited constitution, harmless@1.1.0 given as a file, and asks for a
    # harmlessness win rate of 1.0 against the champion: the gate must refuse. It is killed once
    # critique-revision has written its first shard, then rerun to completion.
    edited_path = tmp_path / "harmless-1.1.0.yaml"
    edited = edited_constitution(edited_path)
    config = tiny_run_config(
        tmp_path / "r2.yaml", tiny_model_dir, bucket, uri, "r2", str(edited_path), min_harmless_win_rate=1.0
    )
    first_shard = ArtifactStore.open(f"s3://{bucket}/runs/r2/traces-shards/shard-000")
    cai = Path(sys.executable).parent / "cai"
    proc = subprocess.Popen(
        [str(cai), "run", "--config", str(config)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not first_shard.exists("part-00000.jsonl") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first_shard.exists("part-00000.jsonl"), "the run never reached critique-revision"
    assert not first_shard.exists("_SUCCESS.json"), "killed too late to test resumption"
    written_before_kill = first_shard.read_bytes("part-00000.jsonl")

    second = run_local(load_run_config(config), workdir)
    assert first_shard.read_bytes("part-00000.jsonl") == written_before_kill  # resumed, not redone
    train_prompts = list(read_dataset(f"s3://{bucket}/runs/r2/prompts/red_team-train", PromptRecord))
    traces = list(read_dataset(f"s3://{bucket}/runs/r2/traces", Trace))
    assert sorted(t.prompt_id for t in traces) == sorted(p.id for p in train_prompts)
    assert len({t.id for t in traces}) == len(traces)

    assert second["promoted"] is False
    policy = "cai-harmless-rl-cai"
    assert version_by_alias(uri, policy, "champion").version == first["versions"]["rl-cai"]["version"]
    challenger = version_by_alias(uri, policy, "challenger")
    assert challenger.version == second["versions"]["rl-cai"]["version"]
    assert challenger.tags["cai.gate.decision"] == "rejected"
    assert "harmless" in challenger.tags["cai.gate.reason"]
    metrics = json.loads(ArtifactStore.open(f"s3://{bucket}/runs/r2/eval").read_text("metrics.json"))
    assert "champion" in metrics["policies"]
    for role in ROLES:
        version = version_by_alias(uri, f"cai-harmless-{role}", "challenger")
        assert version.version == second["versions"][role]["version"]
        assert (version.tags["cai.constitution.version"], version.tags["cai.constitution.sha256"]) == (
            "1.1.0",
            edited.sha256,
        )
    assert edited.sha256 != harmless.sha256
