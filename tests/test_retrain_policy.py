"""The retrain decision as a pure function (`cai_lib.platform.retrain.policy.decide`): a table of
facts, hand-written, and the decision each calls for. No server, no store, no clock."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cai_lib.core.model_versions import Lineage
from cai_lib.platform.retrain.ledger import Submission
from cai_lib.platform.retrain.policy import ChampionFacts, Change, Facts, decide, plan, reads_needed

NOW = datetime(2026, 1, 10, 12, 0, 0, tzinfo=timezone.utc)
BEFORE, AFTER = "2026-01-10T11:00:00Z", "2026-01-10T13:00:00Z"  # a lease that ran out, one that runs
SHA, OTHER_SHA = "a" * 64, "b" * 64
FINGERPRINT = "f" * 64
CONFIG_SHA = "c" * 64
PARAMS = {"base_model": "smollm2-135m-instruct", "seed": 0}
IMAGES = {"image_cpu": "ghcr.io/cai-platform/cai:0.1.0", "image_gpu": "ghcr.io/cai-platform/cai-gpu:0.1.0"}
CHANGE = Change(
    ref="harmless@1.1.0",
    sha256=SHA,
    fingerprint=FINGERPRINT,
    run_config_sha256=CONFIG_SHA,
    training_params=PARAMS,
    model="cai-harmless-rl-cai",
    **IMAGES,
)


def lineage(constitution_sha: str = SHA, run: str = "run-7", run_config: str = CONFIG_SHA) -> Lineage:
    return Lineage(
        constitution_name="harmless",
        constitution_version="1.1.0" if constitution_sha == SHA else "1.0.0",
        constitution_sha256=constitution_sha,
        pipeline_run_id=run,
        base_model="smollm2-135m-instruct",
        run_config_sha256=run_config,
    )


def record(attempt: int = 1, **fields) -> Submission:
    values = {
        "constitution_ref": CHANGE.ref,
        "constitution_sha256": SHA,
        "fingerprint": FINGERPRINT,
        "run_config_sha256": CONFIG_SHA,
        "run_config": PARAMS,
        **IMAGES,
        "attempt": attempt,
        "owner": "retrain on pod-a pid 1 (0000)",
        "run_id": f"run-{attempt}",
        "run_name": f"retrain harmless@1.1.0 ffffffffffff attempt {attempt} [0000]",
        "submitted_at": "2026-01-10T10:00:00Z",
    }
    return Submission(**{**values, **fields})


def facts(
    *records: Submission, champion: ChampionFacts | None = None, states=None, found=None, legacy=None
) -> Facts:
    return Facts(
        change=CHANGE,
        champion=champion,
        records={FINGERPRINT[:16]: {r.attempt: r for r in records}} if records else {},
        legacy=legacy,
        run_states=states,
        found_runs=found or {},
        now=NOW,
        folder="s3://registry/_submissions/harmless/1.1.0/ffffffffffffffff",
        host="http://kfp:8888",
    )


CASES = {
    "no champion, nothing submitted": (
        facts(states={}),
        ("retrain", "change", 1),
        "no champion registered for cai-harmless-rl-cai",
    ),
    "champion trained on it, settings recorded": (
        facts(record(state="adopted", run_id="run-7"), champion=ChampionFacts(version="3", lineage=lineage()), states={}),
        ("up-to-date", "change", 1),
        "champion cai-harmless-rl-cai version 3 was trained on it",
    ),
    "champion trained on it, settings never recorded": (
        facts(champion=ChampionFacts(version="3", lineage=lineage(run_config="unknown")), states={}),
        ("up-to-date", "change", 1),
        "(its run config and images not recorded: taken to be the current ones)",
    ),
    "champion trained on an older version": (
        facts(champion=ChampionFacts(version="3", lineage=lineage(OTHER_SHA)), states={}),
        ("retrain", "change", 1),
        "was trained on harmless@1.0.0 (sha256 bbbbbbbbbbbb, this one aaaaaaaaaaaa)",
    ),
    "champion trained with another run config": (
        facts(champion=ChampionFacts(version="3", lineage=lineage(run_config="d" * 64)), states={}),
        ("retrain", "change", 1),
        "was trained on it with other settings: run config sha256 dddddddddddd -> cccccccccccc",
    ),
    "champion not registered by the platform": (
        facts(champion=ChampionFacts(version="3", lineage=lineage(), platform=False), states={}),
        ("retrain", "change", 1),
        "was not registered by cai-platform (no creation tags), so it counts as none",
    ),
    "submitted and running": (
        facts(record(), states={"run-1": "RUNNING"}),
        ("in-progress", "change", 1),
        "and is RUNNING",
    ),
    "submitted and succeeded": (
        facts(record(), states={"run-1": "SUCCEEDED"}),
        ("up-to-date", "change", 1),
        "and succeeded",
    ),
    "submitted and failed: resubmitted once": (
        facts(record(), states={"run-1": "FAILED"}),
        ("retrain", "resubmit", 2),
        "and failed; resubmitting it once",
    ),
    "the resubmission failed too": (
        facts(record(), record(2, kind="resubmit", replaces="run-1"), states={"run-2": "FAILED"}),
        ("needs-attention", "change", 1),
        "already resubmitted once (after run run-1 failed)",
    ),
    "submitted and canceled": (
        facts(record(), states={"run-1": "CANCELED"}),
        ("needs-attention", "change", 1),
        "and was canceled",
    ),
    "submitted, but the host has no such run": (
        facts(record(), states={"run-1": None}),
        ("needs-attention", "change", 1),
        "but http://kfp:8888 has no such run",
    ),
    "submitted, states not read (no KFP host)": (
        facts(record(), states=None),
        ("up-to-date", "change", 1),
        "(its state is not read without a KFP host that answers)",
    ),
    "claimed, lease running": (
        facts(record(state="submitting", run_id="", lease_expires_at=AFTER), states={}),
        ("in-progress", "change", 1),
        f"is submitting its run (lease until {AFTER})",
    ),
    "claimed, lease expired, its run found by name": (
        facts(
            record(state="submitting", run_id="", lease_expires_at=BEFORE),
            states={},
            found={"retrain harmless@1.1.0 ffffffffffff attempt 1 [0000]": "run-found"},
        ),
        ("in-progress", "change", 1),
        "its run run-found exists (found by its name), so that is recorded as its run",
    ),
    "claimed, lease expired, no run of its name": (
        facts(record(state="submitting", run_id="", lease_expires_at=BEFORE), states={}),
        ("retrain", "takeover", 2),
        f"no run of its name exists and its lease expired at {BEFORE}",
    ),
    "claimed, lease expired, no KFP host to look it up": (
        facts(record(state="submitting", run_id="", lease_expires_at=BEFORE), states=None),
        ("in-progress", "change", 1),
        "it is not known whether its run exists",
    ),
    "claim abandoned by a takeover that did not claim next": (
        facts(record(state="abandoned", run_id=""), states={}),
        ("retrain", "takeover", 2),
        "claim was abandoned",
    ),
    "an earlier run adopted": (
        facts(record(state="adopted", run_id="run-0"), states={}),
        ("up-to-date", "change", 1),
        "run run-0 was recorded at",
    ),
    "a record of the release before fingerprints": (
        facts(states={}, legacy=Submission(constitution_ref=CHANGE.ref, constitution_sha256=SHA, run_id="run-old", submitted_at="2024-01-01T00:00:00Z")),
        ("up-to-date", "change", 1),
        "by an earlier release",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_the_decision_each_set_of_facts_calls_for(name):
    given, (action, kind, attempt), words = CASES[name]
    decision = decide(given)
    assert (decision.action, decision.kind, decision.attempt) == (action, kind, attempt)
    assert words in decision.reason


def test_a_takeover_fences_the_expired_claim_it_replaces_and_a_found_run_resolves_it():
    expired = record(state="submitting", run_id="", lease_expires_at=BEFORE)
    takeover = decide(facts(expired, states={}))
    resolved = decide(facts(expired, states={}, found={expired.run_name: "run-found"}))
    assert (takeover.abandon_attempt, takeover.resolve_run_id) == (1, "")
    assert (resolved.abandon_attempt, resolved.resolve_run_id) == (0, "run-found")


def test_an_adoption_records_the_next_attempt():
    decision = decide(
        facts(
            record(),
            champion=ChampionFacts(version="3", lineage=lineage(run="run-9", run_config="unknown")),
            states={},
        )
    )
    assert (decision.action, decision.adopt_run_id, decision.attempt) == ("up-to-date", "run-9", 2)


def test_a_resubmission_names_the_failed_run_it_replaces():
    assert decide(facts(record(), states={"run-1": "FAILED"})).replaces == "run-1"


def test_a_new_change_names_what_differs_from_the_last_run_submitted_for_the_version():
    earlier = record(fingerprint="e" * 64, run_config_sha256="d" * 64, run_config={**PARAMS, "seed": 7})
    given = facts(states={})
    given.records = {"e" * 16: {1: earlier}}
    decision = decide(given)
    assert decision.action == "retrain"
    assert "the last run submitted for it (run-1) had params.seed 7 -> 0" in decision.reason


@pytest.mark.parametrize(
    ("latest", "reads"),
    [
        (record(), (["run-1"], [])),
        (record(state="submitting", run_id="", lease_expires_at=BEFORE), ([], ["retrain harmless@1.1.0 ffffffffffff attempt 1 [0000]"])),
        (record(state="submitting", run_id="", lease_expires_at=AFTER), ([], [])),
        (record(state="adopted"), ([], [])),
    ],
    ids=["submitted", "claim-expired", "claim-under-lease", "adopted"],
)  # fmt: skip
def test_what_gitops_must_ask_kubeflow_pipelines_before_deciding(latest, reads):
    assert reads_needed(facts(latest, states={})) == reads


def test_the_runs_to_submit_are_the_changes_that_call_for_one():
    decisions = plan([facts(states={}), facts(record(), states={"run-1": "SUCCEEDED"})])
    assert [d.action for d in decisions] == ["retrain", "up-to-date"]
