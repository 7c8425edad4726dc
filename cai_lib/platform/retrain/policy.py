"""Whether a change needs a run: the retrain decision.

A change is up to date when either

- the registered RL-CAI champion (`<model_name_prefix>-<name>-rl-cai@champion` in MLflow) was
  trained on it: its lineage tags carry the constitution's sha256 and the run config's
  (`cai.run_config.sha256`, written by the pipeline's register step), and the images are those
  recorded for the champion's run. A champion whose run config or images were never recorded (one
  trained by `cai submit` or `cai run`, or registered by an earlier release) is taken to have the
  current ones, and that is recorded (an "adopted" record), so a later change is seen; or
- a run was already submitted for it: the newest attempt in the ledger decides. A run still
  pending or running, or one that succeeded, is up to date; a run that failed is resubmitted once
  (the resubmission is attempt n+1, kind "resubmit"), and when it fails too, or the run was
  canceled or deleted, it needs a person (fix the cause, then change the config or delete that
  folder). The run's state is read from Kubeflow Pipelines (`get_run`); a dry run without a host
  does not read it. A retrain that finds a "submitting" record whose lease has expired (its writer
  crashed) claims the next attempt (kind "takeover").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import RL_CAI, model_name
from cai_lib.core.store import ArtifactStore
from cai_lib.platform.retrain.identity import fingerprint, run_config_sha256, training_params
from cai_lib.platform.retrain.ledger import (
    Submission,
    attempts_prefix,
    expired,
    legacy_submission_key,
    read_record,
    records_of,
    utc_now,
)
from cai_lib.platform.run_config import RunConfig

# KFP run states (V2beta1RuntimeState) after which a run will not change any more by itself.
FAILED, CANCELED, SUCCEEDED = "FAILED", "CANCELED", "SUCCEEDED"


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
    submission: Submission | None = Field(default=None, description="The run submitted (after a real run).")


def _flat(data: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes(before: Submission, config: RunConfig) -> list[str]:
    """What differs between the settings recorded in `before` and `config`, for people."""
    changes = []
    now_sha = run_config_sha256(config.params)
    if before.run_config_sha256 and before.run_config_sha256 != now_sha:
        if before.run_config:
            old, new = _flat(before.run_config), _flat(training_params(config.params))
            missing = "(unset)"
            keys = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
            shown = [f"params.{k} {old.get(k, missing)} -> {new.get(k, missing)}" for k in keys[:3]]
            changes += shown + ([f"{len(keys) - 3} more params"] if len(keys) > 3 else [])
        if not changes:
            changes.append(f"run config sha256 {before.run_config_sha256[:12]} -> {now_sha[:12]}")
    for field in ("image_cpu", "image_gpu"):
        old_image, new_image = getattr(before, field), getattr(config.deploy, field)
        if old_image and old_image != new_image:
            changes.append(f"deploy.{field} {old_image} -> {new_image}")
    return changes


def _champion_status(
    name: str,
    champion,
    constitution: Constitution,
    config: RunConfig,
    records: dict[str, dict[int, Submission]],
) -> tuple[Literal["current", "adopt", "differs"], str, str]:
    """(whether the champion was trained on this change, why, the run to adopt when its settings
    were not recorded)."""
    from cai_lib.core.names import CHAMPION

    if champion is None:
        return "differs", f"no {CHAMPION} registered for {name}", ""
    who = f"champion {name} version {champion.version}"
    lineage = champion.lineage
    if lineage is None:
        return "differs", f"{who} has no constitution lineage", ""
    if lineage.constitution_sha256 != constitution.sha256:
        trained = f"{lineage.constitution_name}@{lineage.constitution_version}"
        return (
            "differs",
            (
                f"{who} was trained on {trained} "
                f"(sha256 {lineage.constitution_sha256[:12]}, this one {constitution.sha256[:12]})"
            ),
            "",
        )
    runs = [
        record
        for attempts in records.values()
        for record in attempts.values()
        if record.run_id == lineage.pipeline_run_id and record.has_settings
    ]
    baseline = max(runs, key=lambda r: r.submitted_at) if runs else None
    baseline = baseline or Submission(
        constitution_ref=constitution.ref, constitution_sha256=constitution.sha256, submitted_at=""
    )
    # The lineage tag is what the register step itself saw; it wins over a record.
    trained_config = getattr(lineage, "run_config_sha256", "")
    if trained_config not in ("", "unknown") and trained_config != baseline.run_config_sha256:
        baseline = baseline.model_copy(update={"run_config_sha256": trained_config, "run_config": {}})
    changes = _changes(baseline, config)
    if changes:
        return "differs", f"{who} was trained on it with other settings: {'; '.join(changes)}", ""
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


def run_state(client, run_id: str, host: str | None) -> str | None:
    """The KFP state of run `run_id` (e.g. RUNNING, FAILED), or None when the host has no such run."""
    import kfp_server_api
    import urllib3

    try:
        run = client.get_run(run_id)
    except kfp_server_api.ApiException as err:
        if err.status == 404:
            return None
        raise CaiError(
            f"Kubeflow Pipelines host {host}: reading run {run_id} failed ({err.status} {err.reason})"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise CaiError(f"Kubeflow Pipelines host {host}: reading run {run_id} failed ({err})") from None
    return str(getattr(run.state, "value", run.state) or "RUNTIME_STATE_UNSPECIFIED")


def _from_attempts(
    attempts: dict[int, Submission], folder: str, client, host: str | None, decision
) -> Decision:
    """The decision the newest attempt at this change calls for (see the module's docstring)."""
    n = max(attempts)
    latest = attempts[n]
    if latest.state == "adopted":
        return decision(
            "up-to-date", f"run {latest.run_id} was recorded at {latest.submitted_at} as having trained it"
        )
    if latest.state == "submitting":
        if not expired(latest.lease_expires_at, utc_now()):
            return decision(
                "in-progress",
                f"{latest.owner} claimed it at {latest.submitted_at} and is submitting its run "
                f"(lease until {latest.lease_expires_at})",
            )
        return decision(
            "retrain",
            f"{latest.owner} claimed it at {latest.submitted_at} but recorded no run before its lease expired "
            f"at {latest.lease_expires_at}; submitting it again",
            kind="takeover",
            attempt=n + 1,
        )
    submitted = f"run {latest.run_id} was submitted for it at {latest.submitted_at}"
    if client is None:
        return decision("up-to-date", f"{submitted} (its state is not read without a KFP host that answers)")
    state = run_state(client, latest.run_id, host)
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


def decide(
    constitution: Constitution,
    store: ArtifactStore,
    tracking_uri: str | None,
    config: RunConfig,
    client=None,
    host: str | None = None,
) -> Decision:
    """Whether the newest version, trained with `config`, needs a run: not if the champion was
    trained on it or a run for it was submitted (and has not failed, or was resubmitted once).

    `client` (a `kfp.Client`) reads the state of the last run submitted; without one it is not read.
    Without a `tracking_uri` there is no model registry yet, so no champion."""
    from cai_lib.core.model_versions import version_by_alias
    from cai_lib.core.names import CHAMPION

    change = fingerprint(constitution, config)

    def decision(action: str, reason: str, **fields) -> Decision:
        return Decision(
            ref=constitution.ref,
            sha256=constitution.sha256,
            fingerprint=change,
            action=action,
            reason=reason,
            **fields,
        )

    name = model_name(config.params.model_name_prefix, constitution.name, RL_CAI)
    champion = version_by_alias(tracking_uri, name, CHAMPION) if tracking_uri else None
    records = records_of(store, constitution)
    attempts = records.get(change[:16], {})
    status, reason, adopt = _champion_status(name, champion, constitution, config, records)
    if status == "current":
        return decision("up-to-date", reason)
    if status == "adopt":
        return decision("up-to-date", reason, adopt_run_id=adopt, attempt=max(attempts, default=0) + 1)
    if attempts:
        folder = store.uri_of(attempts_prefix(constitution, change))
        return _from_attempts(attempts, folder, client, host, decision)
    legacy_key = legacy_submission_key(constitution)
    if not records and store.exists(legacy_key):
        legacy = read_record(store, legacy_key)
        return decision(
            "up-to-date",
            f"run {legacy.run_id} was submitted for it at {legacy.submitted_at} by an earlier release "
            "(its run config and images not recorded: taken to be the current ones)",
            adopt_run_id=legacy.run_id,
        )
    recorded = [r for attempts in records.values() for r in attempts.values() if r.has_settings]
    if recorded:
        last = max(recorded, key=lambda r: r.submitted_at)
        changes = _changes(last, config)
        if changes:
            reason += (
                f"; the last run submitted for it ({last.run_id or 'unfinished'}) had {'; '.join(changes)}"
            )
    return decision("retrain", reason)
