"""`cai retrain` against a temporary git checkout, a real `mlflow server` and moto's S3 server.

Only Kubeflow Pipelines' API server is replaced: `RecordingKfpClient` (from test_submit) stands
in for it, injected as the client `submit_run` uses; the compilation inside is real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import typer
import yaml
from conftest import REPO_ROOT, free_port
from test_submit import RecordingKfpClient
from typer.testing import CliRunner

from cai_lib.cli.pipeline_submit import retrain_command
from cai_lib.config import load_run_config
from cai_lib.constitution import load_constitution
from cai_lib.errors import CaiError
from cai_lib.registry import Lineage
from cai_lib.retrain import retrain, submission_key
from cai_lib.store import ArtifactStore

HOST = "http://kfp.example:8888"
SHIPPED = REPO_ROOT / "constitutions"
CAI = Path(sys.executable).parent / "cai"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=cai tests", "-c", "user.email=tests@cai.invalid", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def commit_all(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A git repository holding harmless@1.0.0 and its lock, committed."""
    repo = tmp_path / "repo"
    (repo / "constitutions" / "harmless").mkdir(parents=True)
    shutil.copy(SHIPPED / "harmless" / "1.0.0.yaml", repo / "constitutions" / "harmless" / "1.0.0.yaml")
    shutil.copy(SHIPPED / "constitutions.lock", repo / "constitutions" / "constitutions.lock")
    git(repo, "init", "-q")
    commit_all(repo, "harmless 1.0.0")
    return repo


def write_version(repo: Path, version: str, revision_request: str) -> Path:
    """Copy harmless@1.0.0 to a new version whose first principle has another revision request."""
    doc = yaml.safe_load((repo / "constitutions" / "harmless" / "1.0.0.yaml").read_text())
    doc["version"] = version
    doc["critique_revision"][0]["revision_request"] = revision_request
    path = repo / "constitutions" / "harmless" / f"{version}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def bump(repo: Path, version: str = "1.1.0") -> None:
    """Add a new version with a changed principle, lock it with the CLI and commit, as a user would."""
    write_version(
        repo, version, "Rewrite the response so that it is harmless and still helps as much as it safely can."
    )
    locked = subprocess.run(
        [str(CAI), "constitution", "lock", "--dir", str(repo / "constitutions")],
        check=False,
        capture_output=True,
        text=True,
    )
    assert locked.returncode == 0, locked.stderr
    commit_all(repo, f"harmless {version}")


@pytest.fixture
def registry(s3_bucket) -> str:
    return f"s3://{s3_bucket}/constitutions"


@pytest.fixture
def config(mlflow_server, monkeypatch):
    # A fresh model name prefix per test: the MLflow server is shared by the whole session.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    return load_run_config(None, [f"model_name_prefix=t{uuid.uuid4().hex[:8]}"])


@pytest.fixture
def kfp():
    return RecordingKfpClient()


def run_retrain(repo, registry, config, kfp, dry_run=False, **kwargs):
    return retrain(repo, registry, HOST, None, config, dry_run, client=kfp, **kwargs)


def set_champion(config, repo: Path, ref: str, tracking_uri: str | None = None) -> None:
    """Register an RL-CAI version trained on `ref` (of the checkout) and make it champion."""
    from mlflow import MlflowClient

    constitution = load_constitution(ref, repo / "constitutions")
    lineage = Lineage(
        constitution_name=constitution.name,
        constitution_version=constitution.version,
        constitution_sha256=constitution.sha256,
        pipeline_run_id="run-earlier",
        base_model="smollm2-135m-instruct",
    )
    name = f"{config.params.model_name_prefix}-{constitution.name}-rl-cai"
    uri = tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    client.create_registered_model(name)
    version = client.create_model_version(name, "s3://checkpoints/rl-cai", tags=lineage.to_tags())
    client.set_registered_model_alias(name, "champion", version.version)


def test_first_call_publishes_and_submits_the_newest_version(checkout, registry, config, kfp):
    plan = run_retrain(checkout, registry, config, kfp)
    store = ArtifactStore.open(registry)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.0.0"]
    assert "no champion registered" in plan.to_retrain[0].reason
    assert plan.publish == ["harmless@1.0.0"]
    assert store.exists("harmless/1.0.0.yaml")
    assert len(kfp.runs) == 1
    assert kfp.runs[0]["params"]["constitution"] == f"{registry}/harmless/1.0.0.yaml"
    assert "mlflow_tracking_uri" not in kfp.runs[0]["params"]  # the installation's setting, not a parameter


def test_submission_is_recorded_in_the_registry(checkout, registry, config, kfp):
    plan = run_retrain(checkout, registry, config, kfp)
    constitution = load_constitution("harmless@1.0.0", checkout / "constitutions")
    record = ArtifactStore.open(registry).read_json(submission_key(constitution))
    assert record["run_id"] == kfp.runs[0]["run_id"] == plan.to_retrain[0].submission.run_id
    assert record["constitution_sha256"] == constitution.sha256
    assert record["revision"] == git(checkout, "rev-parse", "HEAD") == plan.revision
    assert record["host"] == HOST


def test_second_call_submits_nothing(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert plan.publish == []
    assert len(kfp.runs) == 1
    assert f"run {kfp.runs[0]['run_id']} was submitted" in plan.decisions[0].reason


def test_a_submission_recorded_by_an_earlier_release_still_counts(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    store = ArtifactStore.open(registry)
    key = submission_key(load_constitution("harmless@1.0.0", checkout / "constitutions"))
    record = store.read_json(key)
    record["git_sha"] = record.pop("revision")
    store.write_json(key, record)
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert len(kfp.runs) == 1


def test_version_bump_submits_again_naming_the_new_version(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    bump(checkout)
    plan = run_retrain(checkout, registry, config, kfp)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.1.0"]
    assert plan.publish == ["harmless@1.1.0"]
    assert len(kfp.runs) == 2
    assert kfp.runs[1]["params"]["constitution"] == f"{registry}/harmless/1.1.0.yaml"
    assert "harmless@1.1.0" in kfp.runs[1]["job_name"]
    assert run_retrain(checkout, registry, config, kfp).to_retrain == []


def test_champion_trained_on_the_newest_version_means_up_to_date(checkout, registry, config, kfp):
    set_champion(config, checkout, "harmless@1.0.0")
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert kfp.runs == []
    assert plan.decisions[0].reason.endswith("version 1 was trained on it")


def test_champion_on_an_older_version_triggers_a_run_naming_both(checkout, registry, config, kfp):
    set_champion(config, checkout, "harmless@1.0.0")
    bump(checkout)
    plan = run_retrain(checkout, registry, config, kfp)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.1.0"]
    assert "was trained on harmless@1.0.0" in plan.to_retrain[0].reason
    assert len(kfp.runs) == 1


def test_dry_run_names_the_bumped_version_and_writes_nothing(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    bump(checkout)
    before = ArtifactStore.open(registry).list()
    plan = retrain(checkout, registry, None, None, config, dry_run=True)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.1.0"]
    assert plan.publish == ["harmless@1.1.0"]
    assert ArtifactStore.open(registry).list() == before
    assert len(kfp.runs) == 1


def cli_dry_run(repo: Path, registry: str, config) -> str:
    app = typer.Typer()
    app.command()(retrain_command)
    result = CliRunner().invoke(
        app,
        [
            "--repo",
            str(repo),
            "--registry",
            registry,
            "--dry-run",
            "--tracking-uri",
            os.environ["MLFLOW_TRACKING_URI"],
        ],
        env={"KFP_HOST": ""},
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_dry_run_names_the_bumped_version(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    bump(checkout)
    output = cli_dry_run(checkout, registry, config)
    assert "would publish harmless@1.1.0" in output
    assert "would retrain harmless@1.1.0" in output
    assert "nothing to retrain" not in output


def test_cli_dry_run_names_nothing_when_nothing_changed(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    output = cli_dry_run(checkout, registry, config)
    assert "would retrain" not in output
    assert "nothing to retrain" in output


@pytest.fixture
def laptop(tmp_path, checkout) -> Path:
    """A working directory where `cai run` left its SQLite MLflow store (.cai/mlflow.db) with an
    RL-CAI champion trained on harmless@1.0.0, and no registry or host configured."""
    work = tmp_path / "work"
    (work / ".cai").mkdir(parents=True)
    set_champion(
        load_run_config(None), checkout, "harmless@1.0.0", f"sqlite:///{work / '.cai' / 'mlflow.db'}"
    )
    return work


def laptop_dry_run(repo: Path, work: Path) -> str:
    """`cai retrain --repo REPO --dry-run` exactly as written, with nothing configured."""
    unset = ("CAI_CONSTITUTION_REGISTRY", "KFP_HOST", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    result = subprocess.run(
        [str(CAI), "retrain", "--repo", str(repo), "--dry-run"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dry_run_with_no_configuration_names_nothing_when_the_champion_is_current(checkout, laptop):
    output = laptop_dry_run(checkout, laptop)
    assert f"would publish harmless@1.0.0 to {laptop / '.cai' / 'constitutions'}" in output
    assert "up to date: harmless@1.0.0: champion cai-harmless-rl-cai version 1" in output
    assert "nothing to retrain" in output


def test_dry_run_with_no_configuration_names_the_bumped_version(checkout, laptop):
    bump(checkout)
    output = laptop_dry_run(checkout, laptop)
    assert (
        "would retrain harmless@1.1.0: champion cai-harmless-rl-cai version 1 was trained on harmless@1.0.0"
        in output
    )
    assert not (laptop / ".cai" / "constitutions").exists()


def test_a_real_run_refuses_a_registry_that_is_not_s3(checkout, config, kfp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CAI_CONSTITUTION_REGISTRY", raising=False)
    with pytest.raises(CaiError, match=r"\.cai/constitutions \(the local default .*\) is not an s3:// URI"):
        run_retrain(checkout, None, config, kfp)
    assert kfp.runs == []


def test_the_registry_in_the_environment_comes_before_the_run_configs(
    checkout, config, kfp, monkeypatch, tmp_path
):
    deploy = config.deploy.model_copy(update={"constitution_registry": "s3://from-config/constitutions"})
    monkeypatch.setenv("CAI_CONSTITUTION_REGISTRY", str(tmp_path / "from-env"))
    with pytest.raises(CaiError, match=r"from-env \(\$CAI_CONSTITUTION_REGISTRY\) is not an s3:// URI"):
        run_retrain(checkout, None, config.model_copy(update={"deploy": deploy}), kfp)
    assert kfp.runs == []


def test_published_version_edited_in_git_is_refused_naming_it(checkout, registry, config, kfp):
    write_version(checkout, "1.0.0", "Rewrite the response any way you like.")
    commit_all(checkout, "edit a published version")
    with pytest.raises(CaiError, match="content of published version harmless@1.0.0 changed"):
        run_retrain(checkout, registry, config, kfp)
    assert kfp.runs == []
    assert ArtifactStore.open(registry).list() == []


def test_registry_copy_with_other_content_is_refused_naming_it(checkout, registry, config, kfp):
    store = ArtifactStore.open(registry)
    published = yaml.safe_load((checkout / "constitutions" / "harmless" / "1.0.0.yaml").read_text())
    published["description"] = "Someone else's harmless@1.0.0."
    store.write_text("harmless/1.0.0.yaml", yaml.safe_dump(published))
    with pytest.raises(
        CaiError, match=f"{registry}/harmless/1.0.0.yaml: harmless@1.0.0 is already published"
    ):
        run_retrain(checkout, registry, config, kfp)
    assert kfp.runs == []
    assert store.list() == ["harmless/1.0.0.yaml"]


def test_unlocked_version_is_refused(checkout, registry, config, kfp):
    write_version(checkout, "1.1.0", "Rewrite the response to be harmless.")
    commit_all(checkout, "forgot to lock")
    with pytest.raises(
        CaiError, match="harmless@1.1.0 is not in .*constitutions.lock; run `cai constitution lock"
    ):
        run_retrain(checkout, registry, config, kfp)
    assert kfp.runs == []


def test_uncommitted_changes_are_refused_outside_a_dry_run(checkout, registry, config, kfp):
    write_version(checkout, "1.1.0", "Rewrite the response to be harmless.")
    with pytest.raises(CaiError, match="uncommitted changes; commit them first"):
        run_retrain(checkout, registry, config, kfp)
    assert ArtifactStore.open(registry).list() == []


@pytest.fixture
def plain_dir(tmp_path) -> Path:
    """The shipped constitutions in a directory with no git history, as the chart's ConfigMap mounts them."""
    shutil.copytree(SHIPPED, tmp_path / "plain" / "constitutions")
    return tmp_path / "plain"


def test_a_plain_directory_without_a_revision_is_refused(plain_dir, registry, config, kfp):
    with pytest.raises(CaiError, match="not a git work tree; give --revision"):
        run_retrain(plain_dir, registry, config, kfp)
    assert ArtifactStore.open(registry).list() == []


def test_a_plain_directory_with_a_revision_submits_once_recording_it(plain_dir, registry, config, kfp):
    plan = run_retrain(plain_dir, registry, config, kfp, revision="cai-platform-0.1.0")
    again = run_retrain(plain_dir, registry, config, kfp, revision="cai-platform-0.1.0")
    constitution = load_constitution("harmless@1.0.0", plain_dir / "constitutions")
    record = ArtifactStore.open(registry).read_json(submission_key(constitution))
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.0.0"]
    assert again.to_retrain == []
    assert len(kfp.runs) == 1
    assert record["revision"] == plan.revision == "cai-platform-0.1.0"


def test_a_revision_given_for_a_git_checkout_is_refused(checkout, registry, config, kfp):
    with pytest.raises(CaiError, match="--revision is for plain directories"):
        run_retrain(checkout, registry, config, kfp, revision="v1")


def test_missing_registry_bucket_is_refused(checkout, s3_env, config, kfp):
    with pytest.raises(CaiError, match="constitution registry .*bucket 'no-such-bucket' does not exist"):
        run_retrain(checkout, "s3://no-such-bucket/constitutions", config, kfp)
    assert kfp.runs == []


def test_unreachable_s3_endpoint_is_refused(checkout, registry, config, kfp, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    with pytest.raises(CaiError, match=f"constitution registry .*{dead}"):
        run_retrain(checkout, registry, config, kfp)


def test_unreachable_mlflow_is_refused(checkout, registry, config, kfp):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CaiError, match=f"MLflow tracking server {dead} .*did not answer"):
        retrain(checkout, registry, HOST, dead, config, False, client=kfp)
    assert ArtifactStore.open(registry).list() == []


def test_unreachable_kfp_host_is_refused_before_anything_is_written(checkout, registry, config):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CaiError, match=f"Kubeflow Pipelines host {dead} .*unreachable"):
        retrain(checkout, registry, dead, None, config, False)
    assert ArtifactStore.open(registry).list() == []


def test_a_real_run_without_host_is_refused_but_a_dry_run_needs_none(checkout, registry, config):
    with pytest.raises(CaiError, match="needs --host or KFP_HOST"):
        retrain(checkout, registry, None, None, config, False)
    assert [d.ref for d in retrain(checkout, registry, None, None, config, True).to_retrain] == [
        "harmless@1.0.0"
    ]


def test_only_the_named_constitutions_are_considered(checkout, registry, config, kfp):
    with pytest.raises(CaiError, match="no constitution named helpful .*known: harmless"):
        run_retrain(checkout, registry, config, kfp, names=["helpful"])
    plan = run_retrain(checkout, registry, config, kfp, names=["harmless"])
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.0.0"]
