"""`cai retrain` against a temporary git checkout, a real `mlflow server` and moto's S3 server.

Only Kubeflow Pipelines' API server is replaced: `RecordingKfpClient` (from test_submit) stands
in for it, injected as the client `submit_run` uses; the compilation inside is real. The decision
itself is tested on tables of facts in test_retrain_policy.py; here, what gathers and applies it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import typer
import yaml
from conftest import REPO_ROOT, free_port
from test_submit import RecordingKfpClient
from typer.testing import CliRunner

from cai_lib.cli.pipeline_submit import retrain_command
from cai_lib.core.constitution import load_constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import Lineage
from cai_lib.core.names import CHECKPOINT_SHA_TAG, CREATED_BY_TAG, PLATFORM
from cai_lib.core.store import ArtifactStore
from cai_lib.platform.retrain.gitops import retrain
from cai_lib.platform.retrain.identity import fingerprint, run_config_sha256
from cai_lib.platform.retrain.ledger import LEASE_SECONDS, Submission, legacy_submission_key, submission_key
from cai_lib.platform.run_config import PipelineParams, load_run_config, params_as_pipeline_arguments
from cai_lib.steps.context import RunContext
from pipelines.submit import submit_run

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


def run_retrain(repo, registry, config, kfp, dry_run=False, submit=submit_run, **kwargs):
    return retrain(submit, repo, registry, HOST, None, config, dry_run, client=kfp, **kwargs)


def set_champion(
    config,
    repo: Path,
    ref: str,
    tracking_uri: str | None = None,
    run_id: str = "run-earlier",
    **lineage_fields,
) -> None:
    """Register an RL-CAI version trained on `ref` (of the checkout) by run `run_id` and make it
    champion (`lineage_fields`: e.g. the run_config_sha256 its register step recorded)."""
    from mlflow import MlflowClient

    constitution = load_constitution(ref, repo / "constitutions")
    lineage = Lineage(
        constitution_name=constitution.name,
        constitution_version=constitution.version,
        constitution_sha256=constitution.sha256,
        pipeline_run_id=run_id,
        base_model="smollm2-135m-instruct",
        **lineage_fields,
    )
    name = f"{config.params.model_name_prefix}-{constitution.name}-rl-cai"
    uri = tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, uri)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, tags={CREATED_BY_TAG: PLATFORM})
    # The platform's creation tags: retrain reads the lineage, it loads nothing.
    tags = {**lineage.to_tags(), CREATED_BY_TAG: PLATFORM, CHECKPOINT_SHA_TAG: "0" * 64}
    version = client.create_model_version(name, "s3://checkpoints/rl-cai", tags=tags)
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
    change = fingerprint(constitution, config)
    assert plan.to_retrain[0].fingerprint == change
    record = ArtifactStore.open(registry).read_json(submission_key(constitution, change))
    assert record["run_id"] == kfp.runs[0]["run_id"] == plan.to_retrain[0].submission.run_id
    assert record["constitution_sha256"] == constitution.sha256
    assert record["revision"] == git(checkout, "rev-parse", "HEAD") == plan.revision
    assert record["host"] == HOST
    assert (record["state"], record["attempt"], record["kind"], record["lease_expires_at"]) == (
        "submitted",
        1,
        "change",
        "",
    )
    assert record["run_config_sha256"] == run_config_sha256(config.params)
    assert record["run_config"]["base_model"] == config.params.base_model
    assert (record["image_cpu"], record["image_gpu"]) == (config.deploy.image_cpu, config.deploy.image_gpu)


def test_second_call_submits_nothing(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert plan.publish == []
    assert len(kfp.runs) == 1
    assert f"run {kfp.runs[0]['run_id']} was submitted" in plan.decisions[0].reason


def test_a_submission_recorded_by_an_earlier_release_still_counts(checkout, registry, config, kfp):
    """A record of the release before fingerprints (no run config, no images, `git_sha`) stands for
    the current settings, and is recorded as such, so that a later change is still seen."""
    store = ArtifactStore.open(registry)
    constitution = load_constitution("harmless@1.0.0", checkout / "constitutions")
    store.write_json(
        legacy_submission_key(constitution),
        {
            "constitution_ref": constitution.ref,
            "constitution_sha256": constitution.sha256,
            "constitution_uri": f"{registry}/harmless/1.0.0.yaml",
            "run_id": "run-of-an-earlier-release",
            "url": "http://kfp.example:8888/#/runs/details/run-of-an-earlier-release",
            "host": HOST,
            "experiment": "constitutional-ai",
            "git_sha": "0" * 40,
            "submitted_at": "2024-01-01T00:00:00Z",
        },
    )
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert "run run-of-an-earlier-release was submitted for it" in plan.decisions[0].reason
    assert kfp.runs == []
    adopted = store.read_json(submission_key(constitution, fingerprint(constitution, config)))
    assert (adopted["state"], adopted["run_id"]) == ("adopted", "run-of-an-earlier-release")
    assert run_retrain(checkout, registry, config, kfp).to_retrain == []
    changed = with_settings(config, "params.base_model=smollm2-360m-instruct")
    plan = run_retrain(checkout, registry, changed, kfp)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.0.0"]
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
    assert "version 1 was trained on it (its run config and images not recorded" in plan.decisions[0].reason


def test_champion_on_an_older_version_triggers_a_run_naming_both(checkout, registry, config, kfp):
    set_champion(config, checkout, "harmless@1.0.0")
    bump(checkout)
    plan = run_retrain(checkout, registry, config, kfp)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.1.0"]
    assert "was trained on harmless@1.0.0" in plan.to_retrain[0].reason
    assert len(kfp.runs) == 1


def test_a_retrain_is_compared_with_the_run_that_made_the_champion(checkout, registry, config, kfp):
    set_champion(config, checkout, "harmless@1.0.0", run_id="run-of-the-champion")
    bump(checkout)
    run_retrain(checkout, registry, config, kfp)
    assert kfp.runs[0]["params"]["compare_against"] == "run-of-the-champion"


def test_a_first_run_has_no_run_to_compare_with(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    assert kfp.runs[0]["params"]["compare_against"] == ""


def test_dry_run_names_the_bumped_version_and_writes_nothing(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    bump(checkout)
    before = ArtifactStore.open(registry).list()
    plan = retrain(submit_run, checkout, registry, None, None, config, dry_run=True)
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
    """A working directory where `cai run` left its SQLite MLflow store (mlflow.db) with an
    RL-CAI champion trained on harmless@1.0.0, and no registry or host configured."""
    work = tmp_path / "work"
    (work / ".cai").mkdir(parents=True)
    set_champion(
        load_run_config(None), checkout, "harmless@1.0.0", f"sqlite:///{work / 'mlflow.db'}"
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
    record = ArtifactStore.open(registry).read_json(
        submission_key(constitution, plan.to_retrain[0].fingerprint)
    )
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
        retrain(submit_run, checkout, registry, HOST, dead, config, False, client=kfp)
    assert ArtifactStore.open(registry).list() == []


def test_unreachable_kfp_host_is_refused_before_anything_is_written(checkout, registry, config):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CaiError, match=f"Kubeflow Pipelines host {dead} .*unreachable"):
        retrain(submit_run, checkout, registry, dead, None, config, False)
    assert ArtifactStore.open(registry).list() == []


def test_a_real_run_without_host_is_refused_but_a_dry_run_needs_none(checkout, registry, config):
    with pytest.raises(CaiError, match="needs --host or KFP_HOST"):
        retrain(submit_run, checkout, registry, None, None, config, False)
    assert [d.ref for d in retrain(submit_run, checkout, registry, None, None, config, True).to_retrain] == [
        "harmless@1.0.0"
    ]


def test_only_the_named_constitutions_are_considered(checkout, registry, config, kfp):
    with pytest.raises(CaiError, match="no constitution named helpful .*known: harmless"):
        run_retrain(checkout, registry, config, kfp, names=["helpful"])
    plan = run_retrain(checkout, registry, config, kfp, names=["harmless"])
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.0.0"]


# --- changes other than a new constitution version, failed runs, concurrent retrains -------------


def with_settings(config, *overrides: str):
    """The test's run config (same model name prefix) with `overrides`, as `--set` gives them."""
    return load_run_config(None, [f"model_name_prefix={config.params.model_name_prefix}", *overrides])


def set_run_state(kfp, run_id: str, state: str | None) -> None:
    """Make the stand-in report run `run_id` in `state` (None: the run is gone)."""
    run = next(r for r in kfp.standin.runs if r["run_id"] == run_id)
    if state is None:
        kfp.standin.runs.remove(run)
    else:
        run["state"] = state


def harmless(repo: Path):
    return load_constitution("harmless@1.0.0", repo / "constitutions")


def stamp(seconds_from_now: float) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds_from_now)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_run_config_hash_is_the_one_a_pipeline_step_records():
    """register computes it from the params the pipeline gave it; retrain from the config in git."""
    config = load_run_config(REPO_ROOT / "pipelines" / "configs" / "quick.yaml")
    arguments = params_as_pipeline_arguments(config.params)
    arguments["constitution"] = "s3://registry/harmless/1.0.0.yaml"
    ctx = RunContext(
        params=PipelineParams.model_validate(arguments),
        run_id="run-1",
        run_name="run",
        artifact_root="/artifacts",
        tracking_uri="http://mlflow",
        parent_run_id="parent",
    )
    in_step = RunContext.model_validate(ctx.model_dump(mode="json", exclude_none=True)).params
    expected = run_config_sha256(config.params)
    assert run_config_sha256(in_step) == expected
    renamed = config.params.model_copy(update={"run_name": "nightly", "experiment": "other"})
    assert run_config_sha256(renamed) == expected
    assert run_config_sha256(with_settings(config, "params.seed=7").params) != expected
    lineage = Lineage(
        constitution_name="harmless",
        constitution_version="1.0.0",
        constitution_sha256="0" * 64,
        pipeline_run_id="run-1",
        base_model="tiny",
        run_config_sha256=expected,
    )
    tags = lineage.to_tags()
    assert tags["cai.run_config.sha256"] == expected
    assert Lineage.from_tags(tags).run_config_sha256 == expected
    del tags["cai.run_config.sha256"]
    assert Lineage.from_tags(tags).run_config_sha256 == "unknown"


@pytest.mark.parametrize(
    "setting, named",
    [
        (
            "params.base_model=smollm2-360m-instruct",
            "params.base_model smollm2-135m-instruct -> smollm2-360m-instruct",
        ),
        ("params.sft.learning_rate=0.0001", "params.sft.learning_rate 2e-05 -> 0.0001"),
        (
            "params.helpful_prompts=s3://prompts/helpful.jsonl",
            "params.helpful_prompts builtin:helpful -> s3://",
        ),
    ],
)
def test_a_run_config_change_submits_one_run_naming_it(checkout, registry, config, kfp, setting, named):
    run_retrain(checkout, registry, config, kfp)
    changed = with_settings(config, setting)
    plan = run_retrain(checkout, registry, changed, kfp)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.0.0"]
    assert named in plan.to_retrain[0].reason
    assert len(kfp.runs) == 2
    value = setting.split("=", 1)[1]
    assert str(yaml.safe_load(value)) in json.dumps(kfp.runs[1]["params"])
    assert run_retrain(checkout, registry, changed, kfp).to_retrain == []
    assert len(kfp.runs) == 2


def test_a_change_of_names_only_submits_nothing(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    renamed = with_settings(config, "run_name=nightly", "experiment=other")
    plan = run_retrain(checkout, registry, renamed, kfp)
    assert plan.to_retrain == []
    assert len(kfp.runs) == 1


def test_an_image_change_submits_one_run_naming_it(checkout, registry, config, kfp):
    run_retrain(checkout, registry, config, kfp)
    changed = with_settings(config, "deploy.image_gpu=ghcr.io/cai-platform/cai-gpu:0.2.0")
    plan = run_retrain(checkout, registry, changed, kfp)
    assert [d.ref for d in plan.to_retrain] == ["harmless@1.0.0"]
    assert (
        "deploy.image_gpu ghcr.io/cai-platform/cai-gpu:0.1.0 -> ghcr.io/cai-platform/cai-gpu:0.2.0"
        in plan.to_retrain[0].reason
    )
    assert len(kfp.runs) == 2
    assert "ghcr.io/cai-platform/cai-gpu:0.2.0" in kfp.package_of(kfp.runs[1]["version_id"])
    assert run_retrain(checkout, registry, changed, kfp).to_retrain == []
    assert len(kfp.runs) == 2


def test_a_champion_trained_by_a_submitted_run_is_compared_with_that_runs_record(
    checkout, registry, config, kfp
):
    run_id = run_retrain(checkout, registry, config, kfp).to_retrain[0].submission.run_id
    set_run_state(kfp, run_id, "SUCCEEDED")
    set_champion(
        config, checkout, "harmless@1.0.0", run_id=run_id, run_config_sha256=run_config_sha256(config.params)
    )
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert plan.decisions[0].reason.endswith("version 1 was trained on it")
    changed = with_settings(config, "deploy.image_cpu=ghcr.io/cai-platform/cai:0.2.0")
    plan = run_retrain(checkout, registry, changed, kfp)
    assert (
        "version 1 was trained on it with other settings: "
        "deploy.image_cpu ghcr.io/cai-platform/cai:0.1.0 -> ghcr.io/cai-platform/cai:0.2.0"
    ) in plan.to_retrain[0].reason
    assert len(kfp.runs) == 2


def test_a_champion_trained_with_another_run_config_triggers_a_run(checkout, registry, config, kfp):
    other = with_settings(config, "params.seed=7")
    set_champion(config, checkout, "harmless@1.0.0", run_config_sha256=run_config_sha256(other.params))
    plan = run_retrain(checkout, registry, config, kfp)
    assert "version 1 was trained on it with other settings: run config sha256" in plan.to_retrain[0].reason
    assert len(kfp.runs) == 1


def test_a_champion_with_unrecorded_images_is_adopted_and_an_image_change_then_submits(
    checkout, registry, config, kfp
):
    set_champion(config, checkout, "harmless@1.0.0", run_config_sha256=run_config_sha256(config.params))
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert "(its images not recorded: taken to be the current ones)" in plan.decisions[0].reason
    assert kfp.runs == []
    changed = with_settings(config, "deploy.image_gpu=ghcr.io/cai-platform/cai-gpu:0.2.0")
    plan = run_retrain(checkout, registry, changed, kfp)
    assert "version 1 was trained on it with other settings: deploy.image_gpu" in plan.to_retrain[0].reason
    assert len(kfp.runs) == 1


def test_a_failed_run_is_resubmitted_once_and_only_once(checkout, registry, config, kfp):
    store = ArtifactStore.open(registry)
    first = run_retrain(checkout, registry, config, kfp).to_retrain[0].submission
    set_run_state(kfp, first.run_id, "FAILED")
    plan = run_retrain(checkout, registry, config, kfp)
    [item] = plan.to_retrain
    assert (item.kind, item.attempt, item.replaces) == ("resubmit", 2, first.run_id)
    assert (
        f"run {first.run_id} was submitted for it at {first.submitted_at} and failed; resubmitting"
        in item.reason
    )
    assert len(kfp.runs) == 2
    assert "attempt 2" in kfp.runs[1]["job_name"]
    second = item.submission
    record = store.read_json(submission_key(harmless(checkout), item.fingerprint, 2))
    assert (record["kind"], record["replaces"], record["run_id"]) == ("resubmit", first.run_id, second.run_id)

    running = run_retrain(checkout, registry, config, kfp)
    assert running.to_retrain == []
    assert running.decisions[0].action == "in-progress"
    assert f"run {second.run_id} was submitted for it" in running.decisions[0].reason
    assert running.decisions[0].reason.endswith("and is PENDING")

    set_run_state(kfp, second.run_id, "FAILED")
    for _ in range(2):
        plan = run_retrain(checkout, registry, config, kfp)
        assert plan.to_retrain == []
        assert plan.decisions[0].action == "needs-attention"
        assert f"already resubmitted once (after run {first.run_id} failed)" in plan.decisions[0].reason
    assert len(kfp.runs) == 2


@pytest.mark.parametrize(
    "state, action, words",
    [
        ("SUCCEEDED", "up-to-date", "and succeeded"),
        ("RUNNING", "in-progress", "and is RUNNING"),
        ("CANCELED", "needs-attention", "and was canceled; delete "),
        (None, "needs-attention", f"but {HOST} has no such run; delete "),
    ],
)
def test_the_last_runs_state_decides_and_only_a_failure_is_resubmitted(
    checkout, registry, config, kfp, state, action, words
):
    run_id = run_retrain(checkout, registry, config, kfp).to_retrain[0].submission.run_id
    set_run_state(kfp, run_id, state)
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.decisions[0].action == action
    assert words in plan.decisions[0].reason
    assert len(kfp.standin.runs) == (1 if state else 0)


def test_a_dry_run_with_a_host_names_the_resubmission(checkout, registry, config, kfp):
    first = run_retrain(checkout, registry, config, kfp).to_retrain[0].submission
    set_run_state(kfp, first.run_id, "FAILED")
    app = typer.Typer()
    app.command()(retrain_command)
    args = ["--repo", str(checkout), "--registry", registry, "--dry-run", "--host", kfp.standin.url]
    result = CliRunner().invoke(app, [*args, "--config", str(write_config(checkout, config))])
    assert result.exit_code == 0, result.output
    assert f"would retrain harmless@1.0.0: run {first.run_id} was submitted for it" in result.output
    assert "and failed; resubmitting it once" in result.output
    assert len(kfp.runs) == 1


def write_config(repo: Path, config, **params) -> Path:
    path = repo.parent / "run-config.yaml"
    path.write_text(yaml.safe_dump({"params": {"model_name_prefix": config.params.model_name_prefix, **params}}))
    return path


def test_two_retrain_processes_started_together_on_one_change_submit_one_run(checkout, registry, config, kfp):
    """Two controllers (two `cai retrain` processes, as two CronJob pods) against one change."""
    env = {**os.environ, "KFP_HOST": "", "CAI_CONSTITUTION_REGISTRY": ""}
    args = [str(CAI), "retrain", "--repo", str(checkout), "--registry", registry, "--host", kfp.standin.url,
            # An independent judge: a `cai retrain` that submits refuses a run judged by its own base model.
            "--config", str(write_config(checkout, config, judge_model="Qwen/Qwen2.5-7B-Instruct")),
            "--tracking-uri", os.environ["MLFLOW_TRACKING_URI"]]  # fmt: skip
    controllers = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outcomes = [proc.communicate(timeout=600) for proc in controllers]

    assert [proc.returncode for proc in controllers] == [0, 0], outcomes
    assert len(kfp.runs) == 1
    assert sum(f"submitted harmless@1.0.0: run {kfp.runs[0]['run_id']}" in out for out, _ in outcomes) == 1


def test_two_concurrent_retrains_for_one_change_submit_one_run(checkout, registry, config, kfp, monkeypatch):
    """Both decide to retrain, then race on the create-only write of the claim: one run."""
    import cai_lib.platform.retrain.gitops as retrain_module

    barrier = threading.Barrier(2, timeout=120)
    claim = retrain_module.claim_attempt

    def racing_claim(*args, **kwargs):
        barrier.wait()  # both have decided to retrain; now both write
        return claim(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "claim_attempt", racing_claim)
    plans, errors = [], []

    def one_retrain():
        try:
            plans.append(run_retrain(checkout, registry, config, kfp))
        except Exception as err:  # noqa: BLE001 - surfaced below; the other thread must not wait
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=one_retrain) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    assert len(kfp.runs) == 1
    assert sorted(p.decisions[0].action for p in plans) == ["in-progress", "retrain"]
    loser = next(p for p in plans if p.decisions[0].action == "in-progress")
    assert "another retrain claimed it first" in loser.decisions[0].reason
    winner = next(p for p in plans if p.decisions[0].action == "retrain")
    assert winner.decisions[0].submission.run_id == kfp.runs[0]["run_id"]
    assert run_retrain(checkout, registry, config, kfp).to_retrain == []
    assert len(kfp.runs) == 1


def claimed(repo: Path, registry: str, config, lease_from_now: float) -> str:
    """A claim of attempt 1 by a retrain that crashed before it created a run; its key."""
    constitution = harmless(repo)
    change = fingerprint(constitution, config)
    record = Submission(
        constitution_ref=constitution.ref,
        constitution_sha256=constitution.sha256,
        fingerprint=change,
        state="submitting",
        owner="retrain on crashed-pod pid 1 (0000)",
        lease_expires_at=stamp(lease_from_now),
        submitted_at=stamp(-60),
    )
    key = submission_key(constitution, change, 1)
    ArtifactStore.open(registry).write_json(key, record.model_dump())
    return key


def test_a_claim_still_under_lease_holds_other_retrains_off(checkout, registry, config, kfp):
    claimed(checkout, registry, config, LEASE_SECONDS)
    plan = run_retrain(checkout, registry, config, kfp)
    assert plan.to_retrain == []
    assert plan.decisions[0].action == "in-progress"
    assert "retrain on crashed-pod pid 1 (0000) claimed it" in plan.decisions[0].reason
    assert kfp.runs == []


def test_a_claim_whose_lease_expired_is_taken_over_once(checkout, registry, config, kfp):
    claimed(checkout, registry, config, -1)
    plan = run_retrain(checkout, registry, config, kfp)
    [item] = plan.to_retrain
    assert (item.kind, item.attempt) == ("takeover", 2)
    assert "but no run of its name exists and its lease expired" in item.reason
    assert len(kfp.runs) == 1
    record = ArtifactStore.open(registry).read_json(submission_key(harmless(checkout), item.fingerprint, 2))
    assert (record["state"], record["run_id"]) == ("submitted", kfp.runs[0]["run_id"])
    assert run_retrain(checkout, registry, config, kfp).to_retrain == []
    assert len(kfp.runs) == 1


def expire_claim(registry: str, key: str) -> None:
    """Move the claim at `key` past its lease, as time would."""
    store = ArtifactStore.open(registry)
    store.write_json(key, {**store.read_json(key), "lease_expires_at": stamp(-1)})


def test_a_submission_that_fails_keeps_its_claim_until_a_look_up_finds_no_run(checkout, registry, config, kfp):
    def refused(*args, **kwargs):
        raise CaiError(f"Kubeflow Pipelines host {HOST}: 403 Forbidden")

    with pytest.raises(CaiError, match="403 Forbidden.*its claim .* is kept"):
        run_retrain(checkout, registry, config, kfp, submit=refused)
    key = submission_key(harmless(checkout), fingerprint(harmless(checkout), config), 1)
    assert ArtifactStore.open(registry).read_json(key)["state"] == "submitting"
    assert run_retrain(checkout, registry, config, kfp).decisions[0].action == "in-progress"  # under its lease

    expire_claim(registry, key)
    plan = run_retrain(checkout, registry, config, kfp)
    assert (plan.decisions[0].kind, plan.decisions[0].attempt) == ("takeover", 2)
    assert len(kfp.runs) == 1
    assert ArtifactStore.open(registry).read_json(key)["state"] == "abandoned"


def test_a_run_created_before_its_submission_failed_is_found_by_name_and_not_submitted_again(
    checkout, registry, config, kfp
):
    """The answer to the run's creation was lost: the run exists though the submission raised."""

    def created_then_lost(*args, **kwargs):
        submit_run(*args, **kwargs)
        raise CaiError(f"Kubeflow Pipelines host {HOST}: connection reset")

    with pytest.raises(CaiError, match="connection reset"):
        run_retrain(checkout, registry, config, kfp, submit=created_then_lost)
    key = submission_key(harmless(checkout), fingerprint(harmless(checkout), config), 1)
    expire_claim(registry, key)

    plan = run_retrain(checkout, registry, config, kfp)

    assert plan.decisions[0].action == "in-progress"
    assert "(found by its name), so that is recorded as its run" in plan.decisions[0].reason
    record = ArtifactStore.open(registry).read_json(key)
    assert (record["state"], record["run_id"]) == ("submitted", kfp.runs[0]["run_id"])
    assert run_retrain(checkout, registry, config, kfp).to_retrain == []
    assert len(kfp.runs) == 1


def test_an_owner_whose_claim_was_taken_over_is_fenced_off_recording_its_run(
    checkout, registry, config, kfp, monkeypatch
):
    """A retrain paused past its lease in the middle of submitting: another one looked its run up,
    found none, fenced the claim as abandoned and took over. The late owner's write is refused."""
    import cai_lib.platform.retrain.gitops as gitops

    monkeypatch.setattr(gitops, "LEASE_SECONDS", 0)  # every claim's lease has run out at once
    taken_over = []

    def paused(*args, **kwargs):
        taken_over.append(run_retrain(checkout, registry, config, kfp))  # runs while this one is paused
        return submit_run(*args, **kwargs)

    with pytest.raises(CaiError, match="was submitted, but its claim .* was taken over meanwhile"):
        run_retrain(checkout, registry, config, kfp, submit=paused)

    (other,) = taken_over
    assert (other.decisions[0].kind, other.decisions[0].attempt) == ("takeover", 2)
    constitution = harmless(checkout)
    first = ArtifactStore.open(registry).read_json(submission_key(constitution, fingerprint(constitution, config), 1))
    assert (first["state"], first["run_id"]) == ("abandoned", "")


def test_a_damaged_record_is_refused_in_one_line_naming_it(checkout, registry, config, kfp):
    key = claimed(checkout, registry, config, -1)
    ArtifactStore.open(registry).write_text(key, "{not json")
    with pytest.raises(CaiError, match=rf"{registry}/{key}: not a submission record .*; delete it$"):
        run_retrain(checkout, registry, config, kfp)
    assert kfp.runs == []


def test_a_dry_run_with_a_host_that_does_not_answer_reads_no_run_state(checkout, registry, config, kfp):
    """The chart's job passes --host; a dry run of it elsewhere still works, leaving states unread."""
    run_id = run_retrain(checkout, registry, config, kfp).to_retrain[0].submission.run_id
    set_run_state(kfp, run_id, "FAILED")
    plan = retrain(submit_run, checkout, registry, f"http://127.0.0.1:{free_port()}", None, config, dry_run=True)
    assert plan.to_retrain == []
    assert plan.decisions[0].reason.endswith("(its state is not read without a KFP host that answers)")
