"""Whether a change needs a run: the retrain decision, a pure function of the facts.

`decide(facts)` reads nothing and writes nothing: `gitops` gathers the facts (the change from git
and the run config, the registered champion, the ledger's records, the states of the runs they
name, the runs found by name for expired claims) and applies the decision. So every case is a row
of a table in the tests, with no server.

A change is up to date when either

- the registered RL-CAI champion (`<model_name_prefix>-<name>-rl-cai@champion` in MLflow) was
  trained on it: its lineage tags carry the constitution's sha256 and the run config's
  (`cai.run_config.sha256`, written by the pipeline's register step), and the images are those
  recorded for the champion's run. A champion whose run config or images were never recorded (one
  trained by `cai submit` or `cai run`, or registered by an earlier release) is taken to have the
  current ones, and that is recorded (an "adopted" record), so a later change is seen. A champion
  the platform did not register (no creation tags) counts as none; or
- a run was already submitted for it: the newest attempt in the ledger decides. A run still
  pending or running, or one that succeeded, is up to date; a run that failed is resubmitted once
  (the resubmission is attempt n+1, kind "resubmit"), and when it fails too, or the run was
  canceled or deleted, it needs a person (fix the cause, then change the config or delete that
  folder). Without a KFP host that answers (a dry run) run states are not read.

A claim ("submitting") under its lease holds others off. Once its lease has expired, the run of
the claim's name is looked up: found, it is recorded as the claim's run (`resolve_run_id`); not
found, the claim is fenced as abandoned and the next attempt taken over (kind "takeover"). A
claim is never taken over without that look-up.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from cai_lib.core.model_versions import Lineage
from cai_lib.core.names import CHAMPION
from cai_lib.platform.retrain.ledger import Submission, expired

# KFP run states (V2beta1RuntimeState) after which a run will not change any more by itself.
FAILED, CANCELED, SUCCEEDED = "FAILED", "CANCELED", "SUCCEEDED"


class Change(BaseModel):
    """One constitution's newest version with the run config and images in force: what a run
    would train."""

    ref: str = Field(description="name@version of the newest version in git.")
    sha256: str = Field(description="Its content hash.")
    fingerprint: str = Field(description="sha256 of constitution, training parameters and images.")
    run_config_sha256: str = Field(description="sha256 of the training parameters.")
    training_params: dict = Field(description="The training parameters, for naming what changed.")
    image_cpu: str
    image_gpu: str
    model: str = Field(description="The production RL-CAI model whose champion may have trained it.")


class ChampionFacts(BaseModel):
    """The production RL-CAI champion as the registry records it."""

    version: str
    lineage: Lineage | None = Field(default=None, description="None where no lineage was recorded.")
    platform: bool = Field(default=True, description="Whether it carries the platform's creation tags.")


class Facts(BaseModel):
    """Everything `decide` reads, gathered by `gitops`."""

    change: Change
    champion: ChampionFacts | None = None
    records: dict[str, dict[int, Submission]] = Field(
        default_factory=dict,
        description="The ledger of this constitution version: fingerprint[:16] -> attempt -> record.",
    )
    legacy: Submission | None = Field(
        default=None, description="A record of the release before fingerprints."
    )
    run_states: dict[str, str | None] | None = Field(
        default=None,
        description="KFP state of each run the ledger names that was read (None: no such run); None when no "
        "KFP host answers.",
    )
    found_runs: dict[str, str] = Field(
        default_factory=dict,
        description="Run name -> run id, for the expired claims' run names found in KFP.",
    )
    now: datetime
    folder: str = Field(description="Where this fingerprint's attempts lie (for messages).")
    host: str | None = None


class Decision(BaseModel):
    """What `retrain` does with the newest version of one constitution, and why."""

    ref: str = Field(description="name@version of the newest version in git.")
    sha256: str = Field(description="Its content hash.")
    fingerprint: str = Field(
        default="", description="sha256 of constitution, training parameters and images."
    )
    action: Literal["retrain", "up-to-date", "in-progress", "needs-attention"] = Field(
        description="Submit a run; nothing to do; a run is on its way; a run failed (again) or vanished."
    )
    reason: str = Field(description="Why, for people: the champion's lineage or an earlier submission.")
    kind: Literal["change", "resubmit", "takeover"] = Field(
        default="change", description="For a retrain: why this attempt (see `Submission.kind`)."
    )
    attempt: int = Field(default=1, description="The attempt a retrain (or an adoption) records.")
    replaces: str = Field(default="", description="For a resubmission: the failed run.")
    adopt_run_id: str = Field(
        default="", description="An earlier run whose unrecorded settings are recorded as the current ones."
    )
    abandon_attempt: int = Field(
        default=0, description="For a takeover: the expired claim to fence as abandoned first."
    )
    resolve_run_id: str = Field(
        default="", description="For an expired claim whose run was found by name: the run to record as its."
    )
    submission: Submission | None = Field(default=None, description="The run submitted (after a real run).")


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes(before: Submission, change: Change) -> list[str]:
    """What differs between the settings recorded in `before` and `change`, for people."""
    found = []
    if before.run_config_sha256 and before.run_config_sha256 != change.run_config_sha256:
        if before.run_config:
            old, new = _flat(before.run_config), _flat(change.training_params)
            missing = "(unset)"
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
            shown = [f"params.{k} {old.get(k, missing)} -> {new.get(k, missing)}" for k in keys[:3]]
            found += shown + ([f"{len(keys) - 3} more params"] if len(keys) > 3 else [])
        if not found:
            found.append(
                f"run config sha256 {before.run_config_sha256[:12]} -> {change.run_config_sha256[:12]}"
            )
    for field in ("image_cpu", "image_gpu"):
        old_image, new_image = getattr(before, field), getattr(change, field)
        if old_image and old_image != new_image:
            found.append(f"deploy.{field} {old_image} -> {new_image}")
    return found


def _champion_status(facts: Facts) -> tuple[Literal["current", "adopt", "differs"], str, str]:
    """(whether the champion was trained on this change, why, the run to adopt when its settings
    were not recorded)."""
    change, champion = facts.change, facts.champion
    if champion is None:
        return "differs", f"no {CHAMPION} registered for {change.model}", ""
    who = f"champion {change.model} version {champion.version}"
    if not champion.platform:
        return (
            "differs",
            f"{who} was not registered by cai-platform (no creation tags), so it counts as none",
            "",
        )
    lineage = champion.lineage
    if lineage is None:
        return "differs", f"{who} has no constitution lineage", ""
    if lineage.constitution_sha256 != change.sha256:
        trained = f"{lineage.constitution_name}@{lineage.constitution_version}"
        return (
            "differs",
            f"{who} was trained on {trained} (sha256 {lineage.constitution_sha256[:12]}, this one {change.sha256[:12]})",
            "",
        )
    runs = [
        record
        for attempts in facts.records.values()
        for record in attempts.values()
        if record.run_id == lineage.pipeline_run_id and record.has_settings
    ]
    baseline = max(runs, key=lambda r: r.submitted_at) if runs else None
    baseline = baseline or Submission(
        constitution_ref=change.ref, constitution_sha256=change.sha256, submitted_at=""
    )
    # The lineage tag is what the register step itself saw; it wins over a record.
    trained_config = lineage.run_config_sha256
    if trained_config not in ("", "unknown") and trained_config != baseline.run_config_sha256:
        baseline = baseline.model_copy(update={"run_config_sha256": trained_config, "run_config": {}})
    differences = changes(baseline, change)
    if differences:
        return "differs", f"{who} was trained on it with other settings: {'; '.join(differences)}", ""
    unknown = [
        what
        for what, known in (("run config", baseline.run_config_sha256), ("images", baseline.image_cpu))
        if not known
    ]
    if unknown:
        return (
            "adopt",
            f"{who} was trained on it (its {' and '.join(unknown)} not recorded: taken to be the current ones)",
            lineage.pipeline_run_id,
        )
    return "current", f"{who} was trained on it", ""


def _latest(facts: Facts) -> tuple[int, Submission] | None:
    attempts = facts.records.get(facts.change.fingerprint[:16], {})
    return (max(attempts), attempts[max(attempts)]) if attempts else None


def reads_needed(facts: Facts) -> tuple[list[str], list[str]]:
    """(run ids whose KFP state `decide` needs, run names to look up in KFP): what `gitops` asks
    Kubeflow Pipelines before deciding."""
    latest = _latest(facts)
    if latest is None:
        return [], []
    _, record = latest
    if record.state == "submitted" and record.run_id:
        return [record.run_id], []
    if record.state == "submitting" and expired(record.lease_expires_at, facts.now) and record.run_name:
        return [], [record.run_name]
    return [], []


def _from_attempts(facts: Facts, decision) -> Decision:
    """The decision the newest attempt at this change calls for (see the module docstring)."""
    attempts = facts.records[facts.change.fingerprint[:16]]
    n, latest = _latest(facts)
    folder, host = facts.folder, facts.host
    if latest.state == "adopted":
        return decision(
            "up-to-date", f"run {latest.run_id} was recorded at {latest.submitted_at} as having trained it"
        )
    if latest.state == "abandoned":
        return decision(
            "retrain",
            f"{latest.owner}'s claim was abandoned (no run of its name before its lease expired); submitting it again",
            kind="takeover",
            attempt=n + 1,
        )
    if latest.state == "submitting":
        claimed = f"{latest.owner} claimed it at {latest.submitted_at}"
        if not expired(latest.lease_expires_at, facts.now):
            return decision(
                "in-progress", f"{claimed} and is submitting its run (lease until {latest.lease_expires_at})"
            )
        if latest.run_name and latest.run_name in facts.found_runs:
            run_id = facts.found_runs[latest.run_name]
            return decision(
                "in-progress",
                f"{claimed}; its lease expired, but its run {run_id} exists (found by its name), so that is "
                "recorded as its run",
                attempt=n,
                resolve_run_id=run_id,
            )
        if facts.run_states is None:
            return decision(
                "in-progress",
                f"{claimed}; its lease expired at {latest.lease_expires_at}, and without a KFP host that answers "
                "it is not known whether its run exists",
            )
        return decision(
            "retrain",
            f"{claimed} but no run of its name exists and its lease expired at {latest.lease_expires_at}; "
            "submitting it again",
            kind="takeover",
            attempt=n + 1,
            abandon_attempt=n,
        )
    submitted = f"run {latest.run_id} was submitted for it at {latest.submitted_at}"
    if facts.run_states is None or latest.run_id not in facts.run_states:
        return decision("up-to-date", f"{submitted} (its state is not read without a KFP host that answers)")
    state = facts.run_states[latest.run_id]
    if state is None:
        return decision(
            "needs-attention", f"{submitted} but {host} has no such run; delete {folder}/ to submit it again"
        )
    if state == FAILED:
        earlier = next((a for a in attempts.values() if a.kind == "resubmit"), None)
        if earlier is not None:
            return decision(
                "needs-attention",
                f"{submitted} and failed, and it was already resubmitted once (after run {earlier.replaces} "
                f"failed); fix the cause, then change the run config or delete {folder}/ to submit it again",
            )
        return decision(
            "retrain",
            f"{submitted} and failed; resubmitting it once",
            kind="resubmit",
            attempt=n + 1,
            replaces=latest.run_id,
        )
    if state == CANCELED:
        return decision(
            "needs-attention", f"{submitted} and was canceled; delete {folder}/ to submit it again"
        )
    if state == SUCCEEDED:
        return decision("up-to-date", f"{submitted} and succeeded")
    return decision("in-progress", f"{submitted} and is {state}")


def decide(facts: Facts) -> Decision:
    """Whether the change in `facts` needs a run: not if the champion was trained on it or a run
    for it was submitted (and has not failed, or was resubmitted once). Pure: see the module
    docstring."""
    change = facts.change

    def decision(action: str, reason: str, **fields) -> Decision:
        return Decision(
            ref=change.ref,
            sha256=change.sha256,
            fingerprint=change.fingerprint,
            action=action,
            reason=reason,
            **fields,
        )

    attempts = facts.records.get(change.fingerprint[:16], {})
    status, reason, adopt = _champion_status(facts)
    if status == "current":
        return decision("up-to-date", reason)
    if status == "adopt":
        return decision("up-to-date", reason, adopt_run_id=adopt, attempt=max(attempts, default=0) + 1)
    if attempts:
        return _from_attempts(facts, decision)
    if not facts.records and facts.legacy is not None:
        return decision(
            "up-to-date",
            f"run {facts.legacy.run_id} was submitted for it at {facts.legacy.submitted_at} by an earlier release "
            "(its run config and images not recorded: taken to be the current ones)",
            adopt_run_id=facts.legacy.run_id,
        )
    recorded = [r for attempts in facts.records.values() for r in attempts.values() if r.has_settings]
    if recorded:
        last = max(recorded, key=lambda r: r.submitted_at)
        differences = changes(last, change)
        if differences:
            reason += f"; the last run submitted for it ({last.run_id or 'unfinished'}) had {'; '.join(differences)}"
    return decision("retrain", reason)


def plan(facts: list[Facts]) -> list[Decision]:
    """The decision for each change: the runs to submit are those whose action is "retrain"."""
    return [decide(one) for one in facts]
