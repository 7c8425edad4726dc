"""GitOps retraining: submit a pipeline run for every constitution whose newest version in git,
trained with the run config and images in force, has not been trained or submitted yet.

`retrain` reads the `constitutions/` folder of a git checkout (its own `constitutions.lock`
included) and, for each constitution name, takes the newest version by semver. A plain directory
(the Helm chart's ConfigMap of the constitutions it bundles) works too when the caller names its
revision (`--revision`, e.g. the chart version), which then stands where the commit would.

What a run trains is fingerprinted (`fingerprint`): the constitution's sha256, the sha256 of the
run config's training parameters (`run_config_sha256`: every `params` field except the names
`constitution`, `run_name`, `experiment` and `model_name_prefix`; the constitution is hashed by
content, the others only name things) and the pinned images `deploy.image_cpu` / `image_gpu`. That
change is up to date when either

- the registered RL-CAI champion (`<model_name_prefix>-<name>-rl-cai@champion` in MLflow) was
  trained on it: its lineage tags carry the constitution's sha256 and the run config's
  (`cai.run_config.sha256`, written by the pipeline's register step), and the images are those
  recorded for the champion's run. A champion whose run config or images were never recorded (one
  trained by `cai submit` or `cai run`, or registered by an earlier release) is taken to have the
  current ones, and that is recorded (an "adopted" record), so a later change is seen; or
- a run was already submitted for it. Each fingerprint has its records in the constitution
  registry under `_submissions/<name>/<version>/<fingerprint[:16]>/<attempt>.json`; the newest
  attempt decides: a run still pending or running, or one that succeeded, is up to date; a run
  that failed is resubmitted once (the resubmission is attempt n+1, kind "resubmit"), and when it
  fails too, or the run was canceled or deleted, it needs a person (fix the cause, then change the
  config or delete that folder). The run's state is read from Kubeflow Pipelines (`get_run`);
  a dry run without a host does not read it.

A run is never started twice for one change: before submitting, a retrain claims the next
attempt with a create-only write (`ArtifactStore.write_json(..., if_absent=True)`, an S3
`If-None-Match: *` PUT) of a record in state "submitting" with a lease (`LEASE_SECONDS`). A
concurrent retrain loses that write and submits nothing. The winner submits, then rewrites its
own record as "submitted" with the run id; if the submission raises, it deletes its claim. A
retrain that finds a "submitting" record whose lease has expired (its writer crashed) claims the
next attempt (kind "takeover") and submits. Records written by an earlier release
(`_submissions/<name>/<version>-<sha256[:12]>.json`, no run config or images) count as a
submission with the current settings, recorded by adoption the first time they are seen.

Every version the registry lacks is published to it (write once; same content is a no-op), and
for each change that is not up to date one run is submitted whose `constitution` parameter is the
published document's URI, which a pod can read whatever constitutions its image bundles. A version
that is not in the lock, or whose content differs from its lock entry or from its published copy,
is refused by name before anything is written. So are a checkout with uncommitted changes under
`constitutions/` (the recorded commit would not describe what was trained) and an unreachable
registry, MLflow server or KFP host (the host is not needed for a dry run).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, ValidationError

from cai_lib.config import PipelineParams, RunConfig
from cai_lib.constitution import (
    LOCK_FILE,
    REGISTRY_ENV,
    Constitution,
    is_locked,
    list_constitutions,
    parse_constitution,
    publish_constitution,
)
from cai_lib.errors import CaiError
from cai_lib.store import ArtifactStore, is_s3

SUBMISSIONS = "_submissions"
# Where dry runs on a laptop keep published versions, beside `cai run`'s .cai/artifacts and
# mlflow.db, so that `cai retrain --repo . --dry-run` needs no configuration.
LOCAL_REGISTRY = ".cai/constitutions"
# How long a claim ("submitting") holds off other retrains before one may take it over: far
# longer than compiling, uploading and creating a run takes.
LEASE_SECONDS = 15 * 60
# Params that name things rather than change what is trained: the constitution is fingerprinted by
# its content, and a new model_name_prefix is another registered model (another champion).
NAMING_PARAMS = ("constitution", "run_name", "experiment", "model_name_prefix")
# KFP run states (V2beta1RuntimeState) after which a run will not change any more by itself.
FAILED, CANCELED, SUCCEEDED = "FAILED", "CANCELED", "SUCCEEDED"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def training_params(params: PipelineParams) -> dict:
    """The run parameters that decide what is trained, as JSON: all of `params` but `NAMING_PARAMS`.

    Derived stage seeds are included (a pipeline step sees them as values), unset (None) section
    fields are not (a pipeline parameter cannot carry them), so the same config gives the same
    dict here and in a pipeline step."""
    data = json.loads(params.model_dump_json(exclude_none=True))
    for name in NAMING_PARAMS:
        data.pop(name, None)
    return data


def run_config_sha256(params: PipelineParams) -> str:
    """sha256 of `training_params`: the lineage tag `cai.run_config.sha256` of a registered model."""
    text = json.dumps(training_params(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint(constitution: Constitution, config: RunConfig) -> str:
    """sha256 of what a run for `constitution` with `config` trains: constitution content,
    training parameters and pinned images."""
    parts = {
        "constitution_sha256": constitution.sha256,
        "run_config_sha256": run_config_sha256(config.params),
        "image_cpu": config.deploy.image_cpu,
        "image_gpu": config.deploy.image_gpu,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp(moment: datetime) -> str:
    return moment.strftime(TIME_FORMAT)


def _expired(stamp: str, now: datetime) -> bool:
    """Whether the lease time `stamp` has passed (an unreadable one has)."""
    try:
        return datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=timezone.utc) <= now
    except ValueError:
        return True


class Submission(BaseModel):
    """One attempt at training one change, as recorded in the registry: a run submitted (or being
    submitted) for it, or an earlier run adopted as having trained it."""

    constitution_ref: str = Field(description="name@version trained by the run.")
    constitution_sha256: str = Field(description="Content hash of that version.")
    constitution_uri: str = Field(
        default="", description="The published document the run was given as its constitution."
    )
    fingerprint: str = Field(
        default="",
        description="sha256 of constitution, training parameters and images ('' in records of earlier releases).",
    )
    run_config_sha256: str = Field(default="", description="sha256 of the training parameters.")
    run_config: dict = Field(default_factory=dict, description="The training parameters (`training_params`).")
    image_cpu: str = Field(default="", description="deploy.image_cpu of the run.")
    image_gpu: str = Field(default="", description="deploy.image_gpu of the run.")
    attempt: int = Field(default=1, ge=1, description="Attempt number within the fingerprint.")
    kind: Literal["change", "resubmit", "takeover", "adopt"] = Field(
        default="change",
        description="change: first run for it; resubmit: after a failed run; takeover: after a claim "
        "whose lease expired; adopt: an earlier run taken as having trained it.",
    )
    state: Literal["submitting", "submitted", "adopted"] = Field(
        default="submitted", description="submitting: claimed, the run not created yet."
    )
    owner: str = Field(default="", description="The retrain that wrote it (host, pid, nonce).")
    lease_expires_at: str = Field(
        default="", description="While submitting: when another retrain may take the claim over (UTC)."
    )
    replaces: str = Field(default="", description="The failed run a resubmission replaces.")
    run_id: str = Field(default="", description="KFP run id ('' while submitting).")
    url: str = Field(default="", description="The run's page in the Kubeflow Pipelines UI.")
    host: str = Field(default="", description="The Kubeflow Pipelines host it was submitted to.")
    experiment: str = Field(default="", description="KFP experiment of the run.")
    revision: str = Field(
        default="",
        # Records written before plain directories were accepted call it git_sha.
        validation_alias=AliasChoices("revision", "git_sha"),
        description="Git commit of the checkout the constitution was read from, or the revision named for a plain directory.",
    )
    submitted_at: str = Field(description="UTC time of the claim, then of the submission (ISO 8601).")

    @property
    def has_settings(self) -> bool:
        return bool(self.run_config_sha256 and self.image_cpu and self.image_gpu)


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


class RetrainPlan(BaseModel):
    """The outcome of `retrain`: what was (or, in a dry run, would be) published and submitted."""

    repo: str = Field(description="The git checkout (or plain directory) read.")
    revision: str = Field(description="Its HEAD commit, or the revision named for a plain directory.")
    registry_uri: str = Field(description="The constitution registry.")
    dry_run: bool = Field(description="True when nothing was written or submitted.")
    uncommitted_changes: bool = Field(description="Whether constitutions/ differs from the commit.")
    publish: list[str] = Field(default_factory=list, description="Versions not yet in the registry.")
    decisions: list[Decision] = Field(default_factory=list, description="One per constitution name.")

    @property
    def to_retrain(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "retrain"]


def _run_git(repo: Path, *args: str) -> subprocess.CompletedProcess | None:
    """git's result in `repo`, or None where git is not installed (a plain directory needs none)."""
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None


def _git(repo: Path, problem: str, *args: str) -> str:
    result = _run_git(repo, *args)
    if result is None:
        raise CaiError("cai retrain needs the git command, which is not installed")
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or [f"git exited with status {result.returncode}"])[-1]
        raise CaiError(f"{repo}: {problem} ({detail})")
    return result.stdout.strip()


def _is_git_work_tree(repo: Path) -> bool:
    result = _run_git(repo, "rev-parse", "--is-inside-work-tree")
    return result is not None and result.returncode == 0 and result.stdout.strip() == "true"


def read_checkout(repo: Path, revision: str | None = None) -> tuple[Path, str, bool]:
    """(constitutions dir, revision, whether constitutions/ has uncommitted changes) of `repo`.

    A git work tree's revision is its HEAD commit; a plain directory has no history, so it is
    accepted only with a `revision` naming where its files came from (and is never "dirty")."""
    repo = Path(repo).expanduser().resolve()
    if not repo.is_dir():
        raise CaiError(f"{repo}: no such directory (--repo)")
    root = repo / "constitutions"
    git_tree = _is_git_work_tree(repo)
    if git_tree and revision:
        raise CaiError(
            f"{repo}: --revision is for plain directories; a git checkout is named by its HEAD commit"
        )
    if not git_tree and not revision:
        raise CaiError(
            f"{repo}: not a git work tree; give --revision to name the source of a plain directory "
            "(runs record it where they would record the commit)"
        )
    if not root.is_dir():
        raise CaiError(f"{repo}: no constitutions/ directory")
    if not git_tree:
        return root, revision, False
    head = _git(repo, "the checkout has no commit", "rev-parse", "HEAD")
    dirty = bool(_git(repo, "git status failed", "status", "--porcelain", "--", "constitutions"))
    return root, head, dirty


def registry_of(registry_uri: str | None, config: RunConfig, dry_run: bool) -> tuple[str, str]:
    """(registry URI, where it was configured): --registry, else `$CAI_CONSTITUTION_REGISTRY`,
    else the run config's deploy.constitution_registry, else the local `LOCAL_REGISTRY` beside
    `cai run`'s artifacts.

    A real submission needs an S3 registry: the run on the cluster reads its constitution from it."""
    if registry_uri:
        uri, source = registry_uri, "--registry"
    elif os.environ.get(REGISTRY_ENV):
        uri, source = os.environ[REGISTRY_ENV], f"${REGISTRY_ENV}"
    elif config.deploy.constitution_registry:
        uri, source = config.deploy.constitution_registry, "deploy.constitution_registry of the run config"
    else:
        uri, source = LOCAL_REGISTRY, f"the local default {LOCAL_REGISTRY}"
    if not dry_run and not is_s3(uri):
        raise CaiError(
            f"constitution registry {uri} ({source}) is not an s3:// URI: the submitted run could not read "
            "its constitution from it; give --registry s3://BUCKET/PREFIX or use --dry-run"
        )
    return uri, source


def check_registry(registry_uri: str, source: str) -> ArtifactStore:
    """The registry store, its bucket checked to exist and answer (an S3 registry)."""
    from cai_lib.preflight import check_s3

    if is_s3(registry_uri):
        check_s3(registry_uri, f"constitution registry ({source})")
    return ArtifactStore.open(registry_uri)


def newest_versions(root: Path, names: list[str] | None) -> tuple[list[Constitution], list[Constitution]]:
    """(every version of the chosen constitutions, the newest of each), all checked against the lock."""
    versions = list_constitutions(root)
    known = sorted({c.name for c in versions})
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise CaiError(
            f"{root}: no constitution named {', '.join(unknown)} (known: {', '.join(known) or 'none'})"
        )
    chosen = [c for c in versions if not names or c.name in names]
    for constitution in chosen:
        if not is_locked(constitution, root):
            raise CaiError(
                f"{root / constitution.name / constitution.version}.yaml: {constitution.ref} is not in "
                f"{root / LOCK_FILE}; run `cai constitution lock --dir {root}` and commit the lock"
            )
    newest = {c.name: c for c in chosen}  # list_constitutions orders by name, then semver
    return chosen, list(newest.values())


def unpublished(store: ArtifactStore, versions: list[Constitution]) -> list[Constitution]:
    """The versions not yet in the registry; a published one with other content is a `CaiError`."""
    missing = []
    for constitution in versions:
        key = f"{constitution.name}/{constitution.version}.yaml"
        if not store.exists(key):
            missing.append(constitution)
            continue
        stored = parse_constitution(store.read_text(key), store.uri_of(key))
        if stored.sha256 != constitution.sha256:
            raise CaiError(
                f"{store.uri_of(key)}: {constitution.ref} is already published with other content (sha256 "
                f"{stored.sha256[:12]}, git has {constitution.sha256[:12]}); publish the change as a new version"
            )
    return missing


def version_prefix(constitution: Constitution) -> str:
    """Folder of every record of one constitution version (all its fingerprints)."""
    return f"{SUBMISSIONS}/{constitution.name}/{constitution.version}"


def attempts_prefix(constitution: Constitution, change: str) -> str:
    """Folder of the attempts at one fingerprint of `constitution`."""
    return f"{version_prefix(constitution)}/{change[:16]}"


def submission_key(constitution: Constitution, change: str, attempt: int = 1) -> str:
    """Key of attempt `attempt` at fingerprint `change` of `constitution`."""
    return f"{attempts_prefix(constitution, change)}/{attempt}.json"


def legacy_submission_key(constitution: Constitution) -> str:
    """Where releases before fingerprints recorded the one submission of a constitution version."""
    return f"{SUBMISSIONS}/{constitution.name}/{constitution.version}-{constitution.sha256[:12]}.json"


def _read_record(store: ArtifactStore, key: str) -> Submission:
    from cai_lib.config import format_validation_error

    where = store.uri_of(key)
    try:
        return Submission.model_validate(store.read_json(key))
    except ValidationError as err:
        raise CaiError(f"{format_validation_error(err, where)}; not a submission record, delete it") from None
    except ValueError as err:
        raise CaiError(f"{where}: not a submission record ({err}); delete it") from None


def _records(store: ArtifactStore, constitution: Constitution) -> dict[str, dict[int, Submission]]:
    """The records of `constitution`'s version: fingerprint prefix -> attempt number -> record."""
    prefix = version_prefix(constitution)
    found: dict[str, dict[int, Submission]] = {}
    for key in store.list(prefix):
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) != 2 or not parts[1].endswith(".json") or not parts[1][: -len(".json")].isdigit():
            continue
        found.setdefault(parts[0], {})[int(parts[1][: -len(".json")])] = _read_record(store, key)
    return found


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
    from cai_lib.registry import CHAMPION

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


def _run_state(client, run_id: str, host: str | None) -> str | None:
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
        if not _expired(latest.lease_expires_at, _now()):
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
    state = _run_state(client, latest.run_id, host)
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

    `client` (a `kfp.Client`) reads the state of the last run submitted; without one it is not read."""
    from cai_lib.registry import CHAMPION, version_by_alias
    from cai_lib.steps import model_name

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

    name = model_name(config.params, constitution, "rl-cai")
    champion = version_by_alias(tracking_uri, name, CHAMPION)
    records = _records(store, constitution)
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
        legacy = _read_record(store, legacy_key)
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


def retrain(
    repo: Path,
    registry_uri: str | None,
    host: str | None,
    tracking_uri: str | None,
    config: RunConfig,
    dry_run: bool,
    names: list[str] | None = None,
    experiment: str = "constitutional-ai",
    namespace: str | None = None,
    client=None,
    revision: str | None = None,
) -> RetrainPlan:
    """Publish new constitution versions from the checkout at `repo` and submit a run for each
    constitution whose newest version, with `config`'s training parameters and images, is neither
    the champion's nor already submitted (a failed run is resubmitted once).

    `registry_uri` is the constitution registry (default: see `registry_of`).
    `tracking_uri` is where champions are looked up (default: the rule of
    `cai_lib.registry_lookup`: `$MLFLOW_TRACKING_URI`, else the store of the last `cai run` here). `names` limits
    the constitutions considered.
    `client` is the `kfp.Client` to submit with and read run states from (default: one connected
    to `host`; a dry run connects only when `host` is given, and reads no run state when it does
    not answer). `revision` names the source of a `repo` that is a plain directory rather than a
    git checkout. With `dry_run`, nothing is published, submitted or recorded. Unreachable
    endpoints, unlocked or changed published versions and uncommitted changes are `CaiError`s
    raised before any write.
    """
    from cai_lib.registry_lookup import first_set
    from cai_lib.tracking import connect
    from pipelines.local import local_platform
    from pipelines.submit import connect_kfp, require_host

    root, revision, dirty = read_checkout(repo, revision)
    if dirty and not dry_run:
        raise CaiError(f"{root}: uncommitted changes; commit them first (runs record commit {revision[:12]})")
    store = check_registry(*registry_of(registry_uri, config, dry_run))
    # The registry rule of `cai models` (flag, environment, the last `cai run` here); where it names
    # none, the store `cai run` would make here, empty: no champion yet.
    found = first_set(tracking_uri, Path.cwd())
    tracking_uri = found.uri if found else local_platform(Path.cwd()).tracking_uri
    connect(tracking_uri)
    if not dry_run:
        host = require_host(host)
        client = client or connect_kfp(host, namespace)
    elif client is None and host:
        try:  # a dry run needs no host: one that does not answer only leaves run states unread
            client = connect_kfp(host, namespace)
        except CaiError:
            client = None
    versions, newest = newest_versions(root, names)
    missing = unpublished(store, versions)
    plan = RetrainPlan(
        repo=str(root.parent),
        revision=revision,
        registry_uri=store.uri,
        dry_run=dry_run,
        uncommitted_changes=dirty,
        publish=[c.ref for c in missing],
        decisions=[decide(c, store, tracking_uri, config, client, host) for c in newest],
    )
    if dry_run:
        return plan
    for constitution in missing:
        publish_constitution(constitution, store.uri)
    by_ref = {c.ref: c for c in newest}
    for item in plan.decisions:
        constitution = by_ref[item.ref]
        if item.adopt_run_id:
            _adopt(item, constitution, store, config, host, revision)
        if item.action != "retrain":
            continue
        item.submission = _submit(
            item, constitution, store, host, config, experiment, namespace, revision, client
        )
        if item.submission is None:
            key = submission_key(constitution, item.fingerprint, item.attempt)
            item.action = "in-progress"
            item.reason = f"another retrain claimed it first ({store.uri_of(key)}); it submits the run"
    return plan


def _record(
    constitution: Constitution, store: ArtifactStore, config: RunConfig, change: str, **fields
) -> Submission:
    """A record of an attempt at fingerprint `change`, with the settings it trains."""
    return Submission(
        constitution_ref=constitution.ref,
        constitution_sha256=constitution.sha256,
        constitution_uri=store.uri_of(f"{constitution.name}/{constitution.version}.yaml"),
        fingerprint=change,
        run_config_sha256=run_config_sha256(config.params),
        run_config=training_params(config.params),
        image_cpu=config.deploy.image_cpu,
        image_gpu=config.deploy.image_gpu,
        **fields,
    )


def claim_attempt(store: ArtifactStore, key: str, record: Submission) -> bool:
    """Write `record` at `key` unless something is there: the create-only write (S3 If-None-Match)
    concurrent retrains race on. True for the one that wrote it."""
    return store.write_json(key, record.model_dump(), if_absent=True)


def _adopt(
    item: Decision,
    constitution: Constitution,
    store: ArtifactStore,
    config: RunConfig,
    host: str,
    revision: str,
) -> None:
    """Record that run `item.adopt_run_id`, whose settings were never recorded, trained this change."""
    record = _record(
        constitution,
        store,
        config,
        item.fingerprint,
        attempt=item.attempt,
        kind="adopt",
        state="adopted",
        run_id=item.adopt_run_id,
        host=host,
        revision=revision,
        submitted_at=_stamp(_now()),
    )
    # Lost to another retrain: it recorded this attempt, which says the same or more.
    claim_attempt(store, submission_key(constitution, item.fingerprint, item.attempt), record)


def _submit(
    item: Decision,
    constitution: Constitution,
    store: ArtifactStore,
    host: str,
    config: RunConfig,
    experiment: str,
    namespace: str | None,
    revision: str,
    client,
) -> Submission | None:
    """Claim the attempt, submit its run and record it; None when another retrain claimed it first."""
    from pipelines.submit import submit_run

    now = _now()
    key = submission_key(constitution, item.fingerprint, item.attempt)
    claim = _record(
        constitution,
        store,
        config,
        item.fingerprint,
        attempt=item.attempt,
        kind=item.kind,
        state="submitting",
        owner=f"retrain on {socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})",
        lease_expires_at=_stamp(now + timedelta(seconds=LEASE_SECONDS)),
        replaces=item.replaces,
        host=host,
        experiment=experiment,
        revision=revision,
        submitted_at=_stamp(now),
    )
    if not claim_attempt(store, key, claim):
        return None
    params = config.params.model_copy(update={"constitution": claim.constitution_uri})
    attempt = f" attempt {item.attempt}" if item.attempt > 1 else ""
    try:
        run = submit_run(
            host,
            config.model_copy(update={"params": params}),
            experiment,
            run_name=f"retrain {constitution.ref} {item.fingerprint[:12]}{attempt} ({revision[:40]})",
            namespace=namespace,
            client=client,
        )
    except Exception:
        store.delete(key)  # nothing was submitted (as far as we know): the next retrain may try at once
        raise
    submission = claim.model_copy(
        update={
            "state": "submitted",
            "lease_expires_at": "",
            "run_id": run.run_id,
            "url": run.url,
            "submitted_at": _stamp(_now()),
        }
    )
    store.write_json(key, submission.model_dump())
    return submission
