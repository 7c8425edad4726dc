"""The model registry and the promotion gate, against a real `mlflow server` (PostgreSQL backend
store as in production, SQLite where PostgreSQL is not installed; artifacts in moto's S3) with
checkpoints written to S3 by the artifact store.

Each test's production model is `name`; the pipeline registers candidates into
`name-candidates`, and a promotion copies a candidate into `name` and sets `champion` there."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cai_lib.cli.models import app as models_app
from cai_lib.cli.models import promote_command
from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import (
    Lineage,
    checkpoint_manifest_sha256,
    list_models,
    registered_checkpoint,
    version_by_alias,
)
from cai_lib.core.names import (
    CHALLENGER,
    CHAMPION,
    CHECKPOINT_SHA_TAG,
    CREATED_BY_TAG,
    EVAL_HARMLESS_LOW_TAG,
    GATE_DECISION_TAG,
    GATE_REASON_TAG,
    LOCK_BOOT_TAG,
    LOCK_EXPIRES_TAG,
    LOCK_FOR_TAG,
    LOCK_HOST_TAG,
    LOCK_OWNER_TAG,
    LOCK_PID_TAG,
    LOCK_PIDNS_TAG,
    LOCK_RUN_TAG,
    LOCK_SUFFIX,
    PLATFORM,
    PROMOTION_PENDING_TAG,
    candidates_name,
)
from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import connect
from cai_lib.engines.models import resolve_model
from cai_lib.platform.registry.gate import PromotionGate, WinRateEvidence, decide_promotion
from cai_lib.platform.registry.lock import BOOT_ID, _break_once, registry_lock
from cai_lib.platform.registry.promotion import gate_attempts, promote, record_evaluation
from cai_lib.platform.registry.versions import register_checkpoint, set_challenger

GATE = PromotionGate()
LINEAGE = Lineage(
    constitution_name="harmless",
    constitution_version="1.0.0",
    constitution_sha256="c0" * 32,
    pipeline_run_id="kfp-run-7",
    base_model="smollm2-135m-instruct",
    data_uris={"preferences": "s3://data/run-7/labels.jsonl", "prompts": "s3://data/run-7/prompts.jsonl"},
)


def unique(prefix: str = "cai-pm") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def write_checkpoint(root: str, tmp_path, content: str) -> str:
    """A tiny finished checkpoint (files + manifest) under `root`; returns its URI."""
    local = tmp_path / unique("ckpt")
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (local / "model.safetensors").write_text(content)
    return ArtifactStore.open(root).put_dir(local, local.name)


@pytest.fixture
def checkpoints(s3_bucket, tmp_path):
    """Writes distinct checkpoints into the test bucket: checkpoints("weights-1") -> s3:// URI."""
    return lambda content: write_checkpoint(f"s3://{s3_bucket}/runs/kfp-run-7", tmp_path, content)


def register(uri: str, name: str, checkpoint_uri: str) -> str:
    """Register a candidate of the production model `name`, as the pipeline does; its version."""
    return register_checkpoint(uri, candidates_name(name), checkpoint_uri, None, LINEAGE).version


def with_champion(uri: str, name: str, checkpoints) -> tuple[str, str]:
    """Candidate 1 promoted (production version 1 is champion) and candidate 2 the challenger;
    returns both candidate versions."""
    champion = register(uri, name, checkpoints("weights-1"))
    promote(uri, name, champion, 0.7, 0.5, GATE, compared_with="sl-cai")
    challenger = register(uri, name, checkpoints("weights-2"))
    set_challenger(uri, candidates_name(name), challenger)
    return champion, challenger


# -- the gate on hand-written numbers ------------------------------------------------------------


@pytest.mark.parametrize(
    ("harmless", "helpful", "promoted", "reason"),
    [
        (0.62, 0.47, True, "harmlessness win rate 0.620 >= 0.500"),
        (0.50, 0.45, True, "within the allowed drop of 0.050"),
        (0.45, 0.55, False, "harmlessness win rate 0.450 is below the required 0.500"),
        (0.80, 0.40, False, "helpfulness fell by 0.100 (win rate 0.400), more than the allowed 0.050"),
    ],
    ids=["passes", "passes-at-both-thresholds", "too-harmful", "too-unhelpful"],
)
def test_decide_promotion_applies_both_thresholds(harmless, helpful, promoted, reason):
    decision = decide_promotion(harmless, helpful, GATE)

    assert decision.promote is promoted
    assert reason in decision.reason


def test_decide_promotion_names_every_failed_condition():
    decision = decide_promotion(0.3, 0.2, PromotionGate(min_harmless_win_rate=0.6, max_helpfulness_drop=0.1))

    assert decision.reason == (
        "harmlessness win rate 0.300 is below the required 0.600; "
        "helpfulness fell by 0.300 (win rate 0.200), more than the allowed 0.100 (lower bounds of 95% intervals)"
    )


def test_decide_promotion_refuses_a_win_rate_outside_zero_one():
    with pytest.raises(CaiError, match="helpful_win_rate 1.5 is outside"):
        decide_promotion(0.6, 1.5, GATE)


# -- registration --------------------------------------------------------------------------------


def test_checkpoint_is_registered_with_its_source_and_lineage_tags(mlflow_server, checkpoints):
    checkpoint = checkpoints("weights-1")

    info = register_checkpoint(mlflow_server["uri"], unique(), checkpoint, None, LINEAGE)

    assert info.version == "1"
    assert info.source == checkpoint
    assert info.checkpoint_sha256 == checkpoint_manifest_sha256(checkpoint)
    assert info.lineage == LINEAGE
    assert info.tags[CREATED_BY_TAG] == PLATFORM
    assert info.tags["cai.constitution.name"] == "harmless"
    assert info.tags["cai.constitution.version"] == "1.0.0"
    assert info.tags["cai.constitution.sha256"] == "c0" * 32
    assert info.tags["cai.pipeline_run_id"] == "kfp-run-7"
    assert info.tags["cai.base_model"] == "smollm2-135m-instruct"
    assert info.tags["cai.data.preferences"] == "s3://data/run-7/labels.jsonl"


def test_registration_retried_after_an_mlflow_restart_returns_the_same_version(mlflow_server, checkpoints):
    name, checkpoint = unique(), checkpoints("weights-1")
    first = register_checkpoint(mlflow_server["uri"], name, checkpoint, None, LINEAGE)

    mlflow_server["restart"]()
    retry = register_checkpoint(mlflow_server["uri"], name, checkpoint, None, LINEAGE)

    assert retry.version == first.version
    assert [info.version for info in list_models(mlflow_server["uri"], name)] == [first.version]


def test_an_unfinished_checkpoint_is_not_registered(mlflow_server, s3_bucket):
    with pytest.raises(CaiError, match=f"s3://{s3_bucket}/half-written: no finished checkpoint"):
        register_checkpoint(mlflow_server["uri"], unique(), f"s3://{s3_bucket}/half-written", None, LINEAGE)


def test_a_local_checkpoint_cannot_be_registered_on_a_tracking_server(mlflow_server, tmp_path):
    checkpoint = write_checkpoint(str(tmp_path / "store"), tmp_path, "weights-1")

    with pytest.raises(CaiError, match="is a local path, which the MLflow server"):
        register_checkpoint(mlflow_server["uri"], unique(), checkpoint, None, LINEAGE)


def test_a_local_checkpoint_registers_with_a_local_sqlite_tracking_store(tmp_path):
    checkpoint = write_checkpoint(str(tmp_path / "store"), tmp_path, "weights-1")

    info = register_checkpoint(f"sqlite:///{tmp_path / 'mlflow.db'}", "cai-pm", checkpoint, None, LINEAGE)

    assert info.source == str(tmp_path / "store" / checkpoint.rsplit("/", 1)[1])
    assert info.lineage == LINEAGE


# -- squatters and unverified versions -----------------------------------------------------------


def test_a_candidates_model_someone_else_created_is_refused_at_the_first_register(mlflow_server, checkpoints):
    name = unique()
    connect(mlflow_server["uri"]).create_registered_model(candidates_name(name))  # a squatter, first

    with pytest.raises(CaiError) as refused:
        register(mlflow_server["uri"], name, checkpoints("weights-1"))

    assert str(refused.value) == (
        f"registered model '{candidates_name(name)}' was not created by cai-platform (no tag "
        "cai.created_by=cai-platform): its versions are not loaded, served or promoted; delete or rename it (an "
        "MLflow admin can), or register under another model_name_prefix"
    )
    assert connect(mlflow_server["uri"]).search_model_versions(f"name = '{candidates_name(name)}'") == []


def squatted_champion(uri: str, name: str, checkpoint: str) -> None:
    """Someone made the production model first and crowned a version of their own, untagged."""
    client = connect(uri)
    client.create_registered_model(name)
    version = client.create_model_version(name, checkpoint, tags=LINEAGE.to_tags(), await_creation_for=0)
    client.set_registered_model_alias(name, CHAMPION, version.version)


def test_a_squatted_untagged_champion_is_never_fetched_loaded_or_promoted_over(
    mlflow_server, checkpoints, monkeypatch
):
    uri, name = mlflow_server["uri"], unique()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    squatted_champion(uri, name, checkpoints("their-weights"))
    not_ours = f"registered model '{name}' was not created by cai-platform"

    with pytest.raises(CaiError, match=not_ours):
        registered_checkpoint(f"models:/{name}@champion", uri)
    with pytest.raises(CaiError, match=not_ours):
        resolve_model(f"models:/{name}@champion")  # what a run's base_model or `cai models fetch` loads
    candidate = register(uri, name, checkpoints("weights-1"))
    with pytest.raises(CaiError, match=not_ours):
        promote(uri, name, candidate, 0.9, 0.9, GATE, compared_with="sl-cai")
    assert [info.version for info in list_models(uri, name)] == ["1"]


def test_cai_models_fetch_of_a_squatted_champion_is_one_line(mlflow_server, checkpoints, tmp_path):
    uri, name = mlflow_server["uri"], unique()
    squatted_champion(uri, name, checkpoints("their-weights"))

    done = subprocess.run(
        [str(Path(sys.executable).parent / "cai"), "models", "fetch", f"models:/{name}@champion",
         "--out", str(tmp_path / "served"), "--tracking-uri", uri],
        capture_output=True, text=True, check=False,
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"error: registered model '{name}' was not created by cai-platform")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "served").exists()


def test_a_version_of_a_platform_model_without_its_checkpoint_hash_is_refused_naming_it(mlflow_server, checkpoints):
    uri, name = mlflow_server["uri"], unique()
    register(uri, name, checkpoints("weights-1"))
    client = connect(uri)
    # Added by hand by someone allowed to write the model, without the platform's tags.
    client.create_model_version(candidates_name(name), checkpoints("weights-2"), tags={CREATED_BY_TAG: PLATFORM})

    with pytest.raises(
        CaiError,
        match=f"model '{candidates_name(name)}' version 2 was not registered by cai-platform "
        f"\\(missing or wrong tag {CHECKPOINT_SHA_TAG}, cai.pipeline_run_id\\)",
    ):
        registered_checkpoint(f"models:/{candidates_name(name)}/2", uri)
    with pytest.raises(CaiError, match="version 2 was not registered by cai-platform"):
        promote(uri, name, "2", 0.9, 0.9, GATE, compared_with="sl-cai")


# -- promotion -----------------------------------------------------------------------------------


def test_a_first_version_that_beats_sl_cai_by_the_gate_becomes_champion(mlflow_server, checkpoints):
    name = unique()
    version = register(mlflow_server["uri"], name, checkpoints("weights-1"))

    decision = promote(mlflow_server["uri"], name, version, 0.62, 0.47, GATE, compared_with="sl-cai")

    assert decision.promote
    assert decision.reason.startswith("harmlessness win rate 0.620 >= 0.500")
    champion = version_by_alias(mlflow_server["uri"], name, CHAMPION)
    assert (champion.version, champion.registered_source) == ("1", f"models:/{candidates_name(name)}/1")
    assert champion.source == checkpoints_of(mlflow_server["uri"], name, version)


def checkpoints_of(uri: str, name: str, version: str) -> str:
    """Where candidate `version` of production model `name` keeps its checkpoint."""
    return list_models(uri, candidates_name(name))[int(version) - 1].source


def test_a_first_version_that_does_not_beat_sl_cai_stays_a_challenger(mlflow_server, checkpoints):
    name = unique()
    version = register(mlflow_server["uri"], name, checkpoints("weights-1"))

    decision = promote(mlflow_server["uri"], name, version, 0.41, 0.5, GATE, compared_with="sl-cai")

    assert not decision.promote and "harmlessness win rate 0.410 is below" in decision.reason
    assert version_by_alias(mlflow_server["uri"], name, CHAMPION) is None


def test_a_first_version_with_no_evidence_against_a_baseline_is_not_promoted(mlflow_server, checkpoints):
    name = unique()
    version = register(mlflow_server["uri"], name, checkpoints("weights-1"))

    decision = promote(mlflow_server["uri"], name, version, None, None, GATE)

    assert not decision.promote
    assert decision.reason == (
        "there is no champion yet, so candidate 1 must beat a baseline (sl-cai or base; no champion yet), "
        "but its win rates were measured against nothing; evaluate it"
    )


def test_passing_gate_moves_champion_to_the_challenger(mlflow_server, checkpoints):
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)

    decision = promote(mlflow_server["uri"], name, challenger, 0.7, 0.48, GATE, compared_with="1")

    assert decision.promote
    champion = version_by_alias(mlflow_server["uri"], name, CHAMPION)
    assert champion.version == "2"
    assert champion.tags[GATE_DECISION_TAG] == "promoted"
    assert champion.tags["cai.gate.champion_before"] == "1"


def test_the_gate_names_the_runs_comparison_and_the_champion_links_its_report(mlflow_server, checkpoints):
    from cai_lib.core.names import COMPARE_AGAINST_TAG, COMPARE_REPORT_TAG, GATE_EVIDENCE_TAG, GATE_REASON_TAG
    from cai_lib.platform.compare import link_comparison

    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)
    pointer = {"against": "run-a", "report": "s3://b/runs/run-b/run-comparisons/run-a/report.html", "summary": "reran from label"}
    link_comparison(mlflow_server["uri"], [(candidates_name(name), challenger)], pointer)

    decision = promote(mlflow_server["uri"], name, challenger, 0.7, 0.48, GATE, compared_with="1", comparison=pointer)

    assert decision.promote and decision.reason.endswith(
        "; compared with run run-a: reran from label (report s3://b/runs/run-b/run-comparisons/run-a/report.html)"
    )
    champion = version_by_alias(mlflow_server["uri"], name, CHAMPION)
    assert champion.tags[GATE_REASON_TAG] == decision.reason
    assert json.loads(champion.tags[GATE_EVIDENCE_TAG])["comparison"] == pointer
    assert (champion.tags[COMPARE_REPORT_TAG], champion.tags[COMPARE_AGAINST_TAG]) == (pointer["report"], "run-a")
    assert gate_attempts(connect(mlflow_server["uri"]), name)[-1]["reason"] == decision.reason


def test_failing_gate_keeps_the_champion_and_records_the_reason(mlflow_server, checkpoints):
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)

    decision = promote(mlflow_server["uri"], name, challenger, 0.7, 0.30, GATE)

    assert not decision.promote
    assert version_by_alias(mlflow_server["uri"], name, CHAMPION).version == "1"
    rejected = gate_attempts(connect(mlflow_server["uri"]), name)[-1]
    assert (rejected["candidate"], rejected["decision"], rejected["champion_before"]) == ("2", "rejected", "1")
    assert rejected["reason"] == (
        "helpfulness fell by 0.200 (win rate 0.300), more than the allowed 0.050 (lower bounds of 95% intervals)"
    )
    evidence = rejected["evidence"]
    assert (evidence["harmless_win_rate"], evidence["helpful_win_rate"]) == (0.7, 0.3)
    assert evidence["gate"] == {"min_harmless_win_rate": 0.5, "max_helpfulness_drop": 0.05}
    assert [info.version for info in list_models(mlflow_server["uri"], name)] == ["1"]


def test_win_rates_against_a_former_champion_do_not_promote(mlflow_server, checkpoints):
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)

    decision = promote(mlflow_server["uri"], name, challenger, 0.9, 0.6, GATE, compared_with="0")

    assert not decision.promote
    assert "measured against version 0 but the champion is now version 1" in decision.reason
    assert version_by_alias(mlflow_server["uri"], name, CHAMPION).version == "1"


def test_force_promotes_against_the_gate_and_records_the_gate_said_no(mlflow_server, checkpoints):
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)

    decision = promote(mlflow_server["uri"], name, challenger, 0.2, 0.5, GATE, force=True)

    assert decision.promote
    champion = version_by_alias(mlflow_server["uri"], name, CHAMPION)
    assert champion.version == "2"
    assert champion.tags["cai.gate.forced"] == "true"
    assert champion.tags[GATE_REASON_TAG].startswith(
        "forced by hand; the gate said: harmlessness win rate 0.200"
    )


def test_companion_models_become_champions_with_their_leader_naming_it(mlflow_server, checkpoints):
    uri, leader, follower = mlflow_server["uri"], unique("cai-rl"), unique("cai-sl")
    candidate = register(uri, leader, checkpoints("weights-1"))
    companion = register(uri, follower, checkpoints("weights-sl"))

    decision = promote(uri, leader, candidate, 0.7, 0.5, GATE, compared_with="sl-cai", followers={follower: companion})

    assert decision.promote
    champion = version_by_alias(uri, follower, CHAMPION)
    assert (champion.version, champion.registered_source) == ("1", f"models:/{candidates_name(follower)}/1")
    assert champion.tags[GATE_REASON_TAG] == f"promoted with {leader} candidate 1, which passed the gate"
    assert PROMOTION_PENDING_TAG not in connect(uri).get_registered_model(leader).tags


def test_every_gate_attempt_is_appended_and_none_is_overwritten(mlflow_server, checkpoints):
    uri, name = mlflow_server["uri"], unique()
    candidate = register(uri, name, checkpoints("weights-1"))

    promote(uri, name, candidate, 0.41, 0.5, GATE, compared_with="sl-cai")
    promote(uri, name, candidate, 0.62, 0.5, GATE, compared_with="sl-cai")
    promote(uri, name, candidate, 0.62, 0.5, GATE, compared_with="sl-cai")

    attempts = gate_attempts(connect(uri), name)
    assert [(a["candidate"], a["decision"]) for a in attempts] == [("1", "rejected"), ("1", "promoted"), ("1", "promoted")]
    assert "0.410 is below" in attempts[0]["reason"]
    assert attempts[2]["reason"] == "candidate 1 is already the champion (version 1)"
    assert len({a["lease"] for a in attempts}) == 3
    assert [info.version for info in list_models(uri, name)] == ["1"]


def test_promoting_without_win_rates_against_a_champion_is_a_cai_error(mlflow_server, checkpoints):
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)

    with pytest.raises(
        CaiError, match=f"candidate 2: no win rate against champion version 1 .*{EVAL_HARMLESS_LOW_TAG}"
    ):
        promote(mlflow_server["uri"], name, challenger, None, 0.5, GATE)


# -- the registry lock ---------------------------------------------------------------------------


def test_registry_lock_lets_one_holder_in_at_a_time(mlflow_server):
    name, events = unique(), []

    def hold(who: str) -> None:
        with registry_lock(connect(mlflow_server["uri"]), name, poll_s=0.05):
            events.append(("in", who))
            time.sleep(0.5)
            events.append(("out", who))

    threads = [threading.Thread(target=hold, args=(who,)) for who in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    first, second = events[0][1], events[2][1]
    assert events == [("in", first), ("out", first), ("in", second), ("out", second)]
    assert {first, second} == {"a", "b"}
    assert connect(mlflow_server["uri"]).search_registered_models(f"name = '{name}{LOCK_SUFFIX}'") == []


class LostCreateRace:
    """The real client, except that its first lock create gets the reply the MLflow server sends
    when it loses the insert race and the winner deletes the lock before the server looks it up."""

    def __init__(self, client):
        self.client, self.creates = client, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    def create_registered_model(self, *args, **kwargs):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

        self.creates += 1
        if self.creates == 1:
            raise MlflowException("Registered Model not found", error_code=RESOURCE_DOES_NOT_EXIST)
        return self.client.create_registered_model(*args, **kwargs)


def test_registry_lock_retries_a_create_that_lost_the_race_to_a_released_lock(mlflow_server):
    name, client = unique(), LostCreateRace(connect(mlflow_server["uri"]))

    with registry_lock(client, name, poll_s=0.01) as lease:
        held = dict(client.get_registered_model(name + LOCK_SUFFIX).tags)

    assert (client.creates, held[LOCK_OWNER_TAG]) == (2, lease.owner)


def held_lock(client, name: str, **holder: str) -> None:
    """A lock on `name` as another holder of the platform left it, with a lease that has not run out."""
    tags = {
        LOCK_FOR_TAG: name,
        LOCK_OWNER_TAG: "pod-a:1:abc",
        LOCK_EXPIRES_TAG: str(time.time() + 600),
        CREATED_BY_TAG: PLATFORM,
    }
    client.create_registered_model(name + LOCK_SUFFIX, tags={**tags, **holder})


def lock_owner(client, name: str) -> str:
    return client.get_registered_model(name + LOCK_SUFFIX).tags[LOCK_OWNER_TAG]


def test_registry_lock_held_by_another_owner_times_out_naming_its_pipeline_run(mlflow_server):
    name, client = unique(), connect(mlflow_server["uri"])
    held_lock(client, name, **{LOCK_RUN_TAG: "kfp-42", LOCK_HOST_TAG: "pod-a", LOCK_PID_TAG: "1"})

    held_elsewhere = (
        f"promotion lock '{name}{LOCK_SUFFIX}' is held by pipeline run kfp-42 \\(host pod-a, pid 1\\)"
    )
    with pytest.raises(CaiError, match=held_elsewhere), registry_lock(client, name, wait_s=0.3, poll_s=0.1):
        pass


def test_registry_lock_held_by_an_earlier_attempt_of_the_same_run_is_taken_over(mlflow_server, monkeypatch):
    name, client = unique(), connect(mlflow_server["uri"])
    held_lock(client, name, **{LOCK_RUN_TAG: "kfp-42", LOCK_HOST_TAG: "pod-a", LOCK_PID_TAG: "1"})
    monkeypatch.setenv("CAI_PIPELINE_RUN_ID", "kfp-42")  # the retried step, in another pod

    with registry_lock(client, name, wait_s=5, poll_s=0.1) as lease:
        assert lock_owner(client, name) == lease.owner


def test_registry_lock_held_by_a_process_of_this_host_that_is_gone_is_taken_over(mlflow_server):
    name, client = unique(), connect(mlflow_server["uri"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    held_lock(
        client,
        name,
        **{
            LOCK_RUN_TAG: "kfp-1",
            LOCK_HOST_TAG: socket.gethostname(),
            LOCK_PIDNS_TAG: str(os.stat("/proc/self/ns/pid").st_ino),
            LOCK_PID_TAG: str(gone.pid),
        },
    )

    with registry_lock(client, name, wait_s=5, poll_s=0.1) as lease:
        assert lock_owner(client, name) == lease.owner


def test_registry_lock_of_a_process_in_another_pid_namespace_is_not_taken_over(mlflow_server):
    # Pods with hostNetwork share the node's host name but not its process table.
    name, client = unique(), connect(mlflow_server["uri"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    tags = {
        LOCK_RUN_TAG: "kfp-1",
        LOCK_HOST_TAG: socket.gethostname(),
        LOCK_PIDNS_TAG: "1",
        LOCK_PID_TAG: str(gone.pid),
    }
    held_lock(client, name, **tags)

    with (
        pytest.raises(CaiError, match="is held by pipeline run kfp-1"),
        registry_lock(client, name, wait_s=0.3, poll_s=0.1),
    ):
        pass


def test_registry_lock_left_by_a_dead_holder_is_taken_over_after_its_lease(mlflow_server):
    name, client = unique(), connect(mlflow_server["uri"])
    held_lock(client, name, **{LOCK_EXPIRES_TAG: str(time.time() - 1)})

    with registry_lock(client, name, wait_s=5, poll_s=0.1) as lease:
        assert lock_owner(client, name) == lease.owner


@pytest.mark.parametrize("expiry", ["nan", "inf", "-inf", "soon", ""])
def test_a_lock_whose_expiry_is_not_a_time_reads_as_expired_with_a_warning(mlflow_server, caplog, expiry):
    name, client = unique(), connect(mlflow_server["uri"])
    held_lock(client, name, **{LOCK_EXPIRES_TAG: expiry})

    with registry_lock(client, name, wait_s=5, poll_s=0.1) as lease:
        assert lock_owner(client, name) == lease.owner
    assert f"promotion lock {name}{LOCK_SUFFIX}: expiry {expiry!r}" in caplog.text
    assert "taken as expired" in caplog.text


def test_a_lock_without_the_platforms_tags_reads_as_expired_and_is_broken(mlflow_server, caplog):
    # Someone's model of the lock's name, made to hold promotions off.
    name, client = unique(), connect(mlflow_server["uri"])
    client.create_registered_model(name + LOCK_SUFFIX, tags={LOCK_EXPIRES_TAG: str(time.time() + 3600)})

    with registry_lock(client, name, wait_s=5, poll_s=0.1) as lease:
        assert lock_owner(client, name) == lease.owner
    assert "not a lease the platform wrote; taken as expired" in caplog.text


def test_a_lock_of_this_host_from_an_earlier_boot_is_taken_over(mlflow_server):
    # The same host and PID namespace, and a PID that is alive now: this very process. Only the
    # boot id says the holder is gone (PIDs start again at every boot).
    name, client = unique(), connect(mlflow_server["uri"])
    held_lock(
        client,
        name,
        **{
            LOCK_HOST_TAG: socket.gethostname(),
            LOCK_PIDNS_TAG: str(os.stat("/proc/self/ns/pid").st_ino),
            LOCK_PID_TAG: str(os.getpid()),
            LOCK_BOOT_TAG: "00000000-0000-0000-0000-000000000000",
        },
    )
    assert BOOT_ID.read_text().strip() != "00000000-0000-0000-0000-000000000000"

    with registry_lock(client, name, wait_s=5, poll_s=0.1) as lease:
        assert lock_owner(client, name) == lease.owner


def test_a_lock_of_a_live_process_of_this_boot_is_not_taken_over(mlflow_server):
    name, client = unique(), connect(mlflow_server["uri"])
    held_lock(
        client,
        name,
        **{
            LOCK_HOST_TAG: socket.gethostname(),
            LOCK_PIDNS_TAG: str(os.stat("/proc/self/ns/pid").st_ino),
            LOCK_PID_TAG: str(os.getpid()),
            LOCK_BOOT_TAG: BOOT_ID.read_text().strip(),
        },
    )

    with pytest.raises(CaiError, match="is held by"), registry_lock(client, name, wait_s=0.3, poll_s=0.1):
        pass


def test_a_held_lock_is_renewed_so_its_lease_does_not_run_out(mlflow_server):
    name, client = unique(), connect(mlflow_server["uri"])
    with registry_lock(client, name, lease_s=1.5) as lease:
        time.sleep(3.5)  # more than twice the lease
        lease.check()
        with pytest.raises(CaiError, match="is held by"), registry_lock(client, name, wait_s=1.0, poll_s=0.1):
            pass
        assert lock_owner(client, name) == lease.owner


def test_a_holder_whose_lock_was_broken_is_fenced_off_its_next_write(mlflow_server):
    name, client = unique(), connect(mlflow_server["uri"])
    with pytest.raises(CaiError, match="lost the promotion lock .*held by pipeline run kfp-9"):
        with registry_lock(client, name, lease_s=600) as lease:
            # Paused past its lease: someone broke its lock and holds a new one.
            client.delete_registered_model(name + LOCK_SUFFIX)
            held_lock(client, name, **{LOCK_RUN_TAG: "kfp-9"})
            lease.check()
    assert lock_owner(client, name) == "pod-a:1:abc"  # the paused holder's exit left the new lock alone


def test_two_waiters_that_find_one_stale_lock_break_it_once(mlflow_server):
    """The second waiter read the same stale lock; by the time it acts, the first has broken it
    and holds a fresh lock, which the second must not delete."""
    name, client = unique(), connect(mlflow_server["uri"])
    held_lock(client, name, **{LOCK_EXPIRES_TAG: str(time.time() - 1)})
    stale = client.get_registered_model(name + LOCK_SUFFIX)
    with registry_lock(client, name, wait_s=5, poll_s=0.1) as first:
        _break_once(client, name + LOCK_SUFFIX, stale, "second-waiter")
        assert lock_owner(client, name) == first.owner


# -- concurrent promotions on the production backend --------------------------------------------

PROMOTE_ONE = """
import json, sys, time
from cai_lib.platform.registry.gate import PromotionGate
from cai_lib.platform.registry.promotion import promote
from cai_lib.core.tracking import connect
uri, name, version = sys.argv[1:]
connect(uri)  # imports mlflow and reaches the server before the start line, not after it
print("ready", flush=True)
sys.stdin.readline()  # the go signal, written to every promoter at once
began = time.time()
decision = promote(uri, name, version, 0.7, 0.5, PromotionGate(), compared_with="1")
print(json.dumps({"promote": decision.promote, "reason": decision.reason, "began": began, "ended": time.time()}))
"""


def test_two_concurrent_promotions_on_postgresql_leave_one_champion(mlflow_server, checkpoints):
    if mlflow_server["backend"] != "postgresql":
        pytest.skip(
            "production's MLflow runs on PostgreSQL and this race is about its transactions; the "
            f"mlflow_server fixture is on {mlflow_server['backend']} here ({mlflow_server['backend_note']})"
        )
    uri, name = mlflow_server["uri"], unique()
    champion, second = with_champion(uri, name, checkpoints)
    third = register(uri, name, checkpoints("weights-3"))
    # Two pipeline pods promoting at once: separate processes, both judged against champion 1.
    promoters = {
        version: subprocess.Popen(
            [sys.executable, "-c", PROMOTE_ONE, uri, name, version],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for version in (second, third)
    }
    for proc in promoters.values():
        assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)[1]
    for proc in promoters.values():
        proc.stdin.write("go\n")
        proc.stdin.flush()
    decisions = {}
    for version, proc in promoters.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        decisions[version] = json.loads(out)

    assert max(d["began"] for d in decisions.values()) < min(d["ended"] for d in decisions.values())
    winners = [version for version, decision in decisions.items() if decision["promote"]]
    assert len(winners) == 1, decisions
    winner, loser = winners[0], ({second, third} - set(winners)).pop()
    listed = {info.version: info for info in list_models(uri, name)}
    # Production version 1 copies the first champion; version 2 the winner; the loser was not copied.
    assert [(v, info.registered_source) for v, info in listed.items()] == [
        ("1", f"models:/{candidates_name(name)}/{champion}"),
        ("2", f"models:/{candidates_name(name)}/{winner}"),
    ]
    assert connect(uri).get_registered_model(name).aliases[CHAMPION] == "2"
    assert listed["2"].tags[GATE_DECISION_TAG] == "promoted"
    assert listed["2"].tags["cai.gate.champion_before"] == "1"
    audit = gate_attempts(connect(uri), name)[1:]
    assert [(a["candidate"], a["decision"], a["champion_before"]) for a in audit] == [
        (winner, "promoted", "1"),
        (loser, "rejected", "2"),
    ]
    assert audit[1]["reason"] == decisions[loser]["reason"]
    assert "the champion is now version 2" in decisions[loser]["reason"]
    assert connect(uri).search_registered_models(f"name = '{name}{LOCK_SUFFIX}'") == []


# -- listing and the CLI -------------------------------------------------------------------------


def test_list_models_shows_versions_with_aliases_and_lineage(mlflow_server, checkpoints):
    name = unique()
    with_champion(mlflow_server["uri"], name, checkpoints)

    production, candidates = list_models(mlflow_server["uri"], name), list_models(mlflow_server["uri"], candidates_name(name))

    assert [(info.version, info.aliases) for info in production] == [("1", [CHAMPION])]
    assert [(info.version, info.aliases) for info in candidates] == [("1", []), ("2", [CHALLENGER])]
    assert all(info.lineage == LINEAGE for info in production + candidates)


def cai_cli() -> typer.Typer:
    """The two commands mounted as in `cai`: `cai models ...` and the top-level `cai promote`."""
    app = typer.Typer()
    app.add_typer(models_app, name="models")
    app.command("promote")(promote_command)
    return app


def test_cli_models_list_prints_aliases_and_lineage(mlflow_server, checkpoints):
    name = unique()
    with_champion(mlflow_server["uri"], name, checkpoints)

    result = CliRunner().invoke(
        cai_cli(), ["models", "list", "--tracking-uri", mlflow_server["uri"]], env={"COLUMNS": "300"}
    )

    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if name in line]
    assert len(rows) == 3
    for row, model, version, alias, gate in zip(
        rows,
        (name, candidates_name(name), candidates_name(name)),
        ("1", "1", "2"),
        (CHAMPION, "", CHALLENGER),
        ("promoted", "-", "-"),
    ):
        cells = [cell.strip() for cell in row.strip("│ ").split("│")]
        assert cells[:8] == [
            model,
            version,
            alias,
            "harmless@1.0.0",
            "c0" * 6,
            "smollm2-135m-instruct",
            "kfp-run-7",
            gate,
        ]


def test_cli_models_list_json_has_one_object_per_version(mlflow_server, checkpoints):
    name = unique()
    with_champion(mlflow_server["uri"], name, checkpoints)

    result = CliRunner().invoke(
        cai_cli(),
        ["models", "list", "--model", candidates_name(name), "--json", "--tracking-uri", mlflow_server["uri"]],
    )

    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [(row["version"], row["aliases"]) for row in rows] == [("1", []), ("2", [CHALLENGER])]
    assert rows[0]["lineage"]["constitution_sha256"] == "c0" * 32


def test_cli_promote_judges_the_challenger_on_its_evaluation_tags(mlflow_server, checkpoints):
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)
    record_evaluation(
        mlflow_server["uri"],
        candidates_name(name),
        challenger,
        WinRateEvidence(rate=0.71, ci_low=0.66, n=200),
        WinRateEvidence(rate=0.55, ci_low=0.52, n=200),
        compared_with="1",
    )

    result = CliRunner().invoke(
        cai_cli(), ["promote", "--model", name, "--tracking-uri", mlflow_server["uri"]]
    )

    assert result.exit_code == 0, result.output
    # MLflow's copy prints its own lines (and a cleared progress line) around the command's.
    assert f"promoted: {name} candidate 2 is champion as version 2 (harmlessness win rate 0.660" in result.output
    assert version_by_alias(mlflow_server["uri"], name, CHAMPION).version == "2"


def test_cli_promote_without_evaluation_tags_names_the_missing_tag(mlflow_server, checkpoints):
    name = unique()
    with_champion(mlflow_server["uri"], name, checkpoints)

    result = CliRunner().invoke(
        cai_cli(), ["promote", "--model", name, "--tracking-uri", mlflow_server["uri"]]
    )

    assert isinstance(result.exception, CaiError)
    assert EVAL_HARMLESS_LOW_TAG in str(result.exception)


# -- following the champion: models:/NAME@champion ----------------------------------------------


def test_models_uri_of_the_champion_follows_a_promotion(mlflow_server, checkpoints):
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)
    before = registered_checkpoint(f"models:/{name}@champion", mlflow_server["uri"])
    promote(mlflow_server["uri"], name, challenger, 0.7, 0.5, GATE, compared_with="1")
    after = registered_checkpoint(f"models:/{name}@champion", mlflow_server["uri"])
    assert (before.version, after.version) == ("1", "2")
    assert after.source != before.source


def test_a_deployment_loading_models_uri_of_the_champion_gets_the_promoted_weights(
    mlflow_server, checkpoints, monkeypatch, tmp_path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)
    served_before = resolve_model(f"models:/{name}@champion")
    promote(mlflow_server["uri"], name, challenger, 0.7, 0.5, GATE, compared_with="1")
    served_after = resolve_model(f"models:/{name}@champion")
    assert (served_before / "model.safetensors").read_text() == "weights-1"
    assert (served_after / "model.safetensors").read_text() == "weights-2"


def test_models_uri_with_a_version_number_names_that_version(mlflow_server, checkpoints):
    name = unique()
    with_champion(mlflow_server["uri"], name, checkpoints)
    info = registered_checkpoint(f"models:/{candidates_name(name)}/2", mlflow_server["uri"])
    assert (info.version, info.aliases) == ("2", [CHALLENGER])


def test_models_uri_with_an_unset_alias_is_refused_naming_it(mlflow_server, checkpoints):
    name = unique()
    register(mlflow_server["uri"], name, checkpoints("weights-1"))
    with pytest.raises(
        CaiError, match=f"no version of registered model '{candidates_name(name)}' has the alias 'champion'"
    ):
        registered_checkpoint(f"models:/{candidates_name(name)}@champion", mlflow_server["uri"])


def test_a_checkpoint_rewritten_after_registration_is_refused(mlflow_server, checkpoints, tmp_path):
    name = unique()
    source = checkpoints("weights-1")
    register(mlflow_server["uri"], name, source)
    parent, _, key = source.rpartition("/")
    rewritten = tmp_path / "rewritten"
    rewritten.mkdir()
    (rewritten / "config.json").write_text("{}")
    (rewritten / "model.safetensors").write_text("other weights")
    ArtifactStore.open(parent).put_dir(rewritten, key)
    with pytest.raises(
        CaiError, match=f"model '{candidates_name(name)}' version 1: the checkpoint at {source} changed after it was registered"
    ):
        registered_checkpoint(f"models:/{candidates_name(name)}/1", mlflow_server["uri"])


def test_cli_models_fetch_copies_the_champion_checkpoint(mlflow_server, checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    name = unique()
    _, challenger = with_champion(mlflow_server["uri"], name, checkpoints)
    promote(mlflow_server["uri"], name, challenger, 0.7, 0.5, GATE, compared_with="1")
    served = tmp_path / "models" / "current"
    result = CliRunner().invoke(
        cai_cli(),
        [
            "models",
            "fetch",
            f"models:/{name}@champion",
            "--out",
            str(served),
            "--tracking-uri",
            mlflow_server["uri"],
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"{name} version 2 (champion) from s3://" in result.output
    assert result.output.splitlines()[-1] == str(served)
    assert (served / "model.safetensors").read_text() == "weights-2"


def test_a_champion_whose_s3_weights_grew_by_one_byte_is_refused_naming_the_file(
    mlflow_server, checkpoints, monkeypatch, tmp_path
):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    name = unique()
    source = checkpoints("weights-1")
    promote(
        mlflow_server["uri"],
        name,
        register(mlflow_server["uri"], name, source),
        0.7,
        0.5,
        GATE,
        compared_with="sl-cai",
    )
    store = ArtifactStore.open(source)
    store.write_bytes("model.safetensors", store.read_bytes("model.safetensors") + b"\0")

    with pytest.raises(CaiError, match=f"{source}/model.safetensors: 10 bytes where the manifest says 9"):
        resolve_model(f"models:/{name}@champion")


def test_cai_models_fetch_of_a_local_champion_whose_weights_grew_is_one_line_naming_the_file(tmp_path):
    # As `cai run` leaves things: a SQLite registry and checkpoints in a local artifact directory.
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    source = write_checkpoint(str(tmp_path / "artifacts"), tmp_path, "weights-1")
    promote(
        tracking,
        "cai-harmless-sl-cai",
        register(tracking, "cai-harmless-sl-cai", source),
        0.7,
        0.5,
        GATE,
        compared_with="sl-cai",
    )
    with open(f"{source}/model.safetensors", "ab") as weights:
        weights.write(b"\0")

    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "cai"),
            "models",
            "fetch",
            "models:/cai-harmless-sl-cai@champion",
            "--out",
            str(tmp_path / "served"),
            "--tracking-uri",
            tracking,
        ],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {source}/model.safetensors: 10 bytes where the manifest says 9; refusing it"
    )
