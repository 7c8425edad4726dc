"""The MLflow model registry: checkpoints as model versions with lineage, and the promotion gate.

Each trained model (the preference model, the SL-CAI and RL-CAI policies) is registered as a
model version whose *source* is its checkpoint in the artifact store (`s3://...` or, with a
local SQLite tracking store, a local directory): the registry records where the weights are and
where they came from, and never copies them. Lineage (constitution name, version and sha256,
pipeline run, data URIs, base model, and the sha256 of the checkpoint's manifest) is stored as
version tags, so `cai models list`, the MLflow UI and `cai retrain` can trace a model back to the
exact constitution.

Aliases, not the deprecated stages: `challenger` marks the newest candidate and `champion` the
model in use. `promote` moves `champion` only if the gate passes, judged on evidence rather than
point estimates: the lower bound of the 95% (Wilson) interval of the challenger's harmlessness
win rate against the champion must reach `min_harmless_win_rate`, and its helpfulness must not be
able to have fallen by more than `max_helpfulness_drop` (a helpfulness win rate of 0.5 means "as
helpful as the champion", so the fall is 0.5 minus the interval's lower bound). With no champion
yet the first one must pass the same gate against a baseline the evaluation also ran, the SL-CAI
policy (or the base model). Every decision and its reason are written to the version's tags,
whichever way it goes.

Idempotence: `register_checkpoint` looks for a live version with the same source and checkpoint
hash before creating one, so a retry (for example after an MLflow restart) returns the version
the first attempt made. If two attempts still both create one (a lost response that MLflow's
HTTP client retried, or two pods at once), each re-reads the list, keeps the lowest version
number and deletes its own newer duplicate.

Serialisation: alias writes are last-writer-wins, and pods share no file system, so the lock
lives in the registry itself. MLflow offers no conditional tag write, but creating a registered
model is atomic (names are unique in its database): the lock is a registered model named
`<model>.cai-promotion-lock`, created to acquire and deleted to release, tagged with an owner
token, its holder (pipeline run id, host, process id) and a lease expiry. A waiter polls; a lock
is deleted and retaken when its lease has expired, when it is held by an earlier attempt of the
same pipeline run (a retried step whose killed attempt held it), or when its holder is a process
of this host that no longer exists. A failed or cancelled pipeline run's exit handler releases
the locks it holds (`release_run_locks`). Residual risk: if two waiters break the same stale lock at the same
moment, the second can delete the first one's fresh lock; leases are long compared with a
promotion (seconds), so this needs a crashed holder and two simultaneous waiters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from cai_lib.errors import CaiError
from cai_lib.stage_table import package_version
from cai_lib.store import MANIFEST, ArtifactStore, is_s3
from cai_lib.tracking import PIPELINE_RUN_ENV, connect, filter_literal, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

CHALLENGER = "challenger"
CHAMPION = "champion"

CHECKPOINT_SHA_TAG = "cai.checkpoint_sha256"
DATA_TAG_PREFIX = "cai.data."
# Written by the evaluation step on the challenger's version; read by the gate.
EVAL_HARMLESS_TAG = "cai.eval.harmless_win_rate_vs_champion"
EVAL_HELPFUL_TAG = "cai.eval.helpful_win_rate_vs_champion"
EVAL_HARMLESS_LOW_TAG = "cai.eval.harmless_win_rate_ci_low"
EVAL_HELPFUL_LOW_TAG = "cai.eval.helpful_win_rate_ci_low"
EVAL_COMPARISONS_TAG = "cai.eval.comparisons"
# The champion version the rates were measured against, or a baseline policy's name (below).
EVAL_CHAMPION_TAG = "cai.eval.champion_version"
# What a first champion is judged against: policies every evaluation runs.
BASELINES = ("sl-cai", "base")
GATE_DECISION_TAG = "cai.gate.decision"
GATE_REASON_TAG = "cai.gate.reason"

LOCK_SUFFIX = ".cai-promotion-lock"
LOCK_FOR_TAG = "cai.lock.for"
LOCK_OWNER_TAG = "cai.lock.owner"
LOCK_EXPIRES_TAG = "cai.lock.expires_at"
LOCK_RUN_TAG = "cai.lock.pipeline_run_id"
LOCK_HOST_TAG = "cai.lock.host"
LOCK_PID_TAG = "cai.lock.pid"
LOCK_PIDNS_TAG = "cai.lock.pid_namespace"
# Float comparisons at a threshold written by hand (0.5 - 0.45 > 0.05 in binary) must not flip.
TOLERANCE = 1e-9


class Lineage(BaseModel):
    """Where a checkpoint came from; stored as tags on its model version."""

    model_config = ConfigDict(extra="forbid")

    constitution_name: str = Field(description="Name of the constitution the model was trained under.")
    constitution_version: str = Field(description="Semver of that constitution.")
    constitution_sha256: str = Field(description="Content hash of the pinned constitution document.")
    pipeline_run_id: str = Field(
        description="The pipeline run that produced the checkpoint (KFP run id or local run name)."
    )
    base_model: str = Field(
        description="Model reference the training started from (path, s3:// URI, hub id or alias)."
    )
    data_uris: dict[Annotated[str, StringConstraints(pattern=r"^[\w.-]+$")], str] = Field(
        default_factory=dict,
        description="Datasets the checkpoint was trained on, by role (e.g. 'preferences': 's3://.../labels.jsonl').",
    )
    code_version: str = Field(
        default_factory=package_version, description="cai-platform version that trained it."
    )
    human_data: str = Field(
        default="none",
        description="The human-labelled pairs in the preference data: 'helpfulness: SOURCE' (the paper's "
        "premise), 'harmlessness: SOURCE' (the ablation) or 'none'.",
    )
    run_config_sha256: str = Field(
        default="unknown",
        description="sha256 of the run's training parameters (cai_lib.retrain.run_config_sha256), which "
        "`cai retrain` compares with the run config in git; 'unknown' where it was not recorded.",
    )

    TAG_NAMES: ClassVar[dict[str, str]] = {
        "constitution_name": "cai.constitution.name",
        "constitution_version": "cai.constitution.version",
        "constitution_sha256": "cai.constitution.sha256",
        "pipeline_run_id": "cai.pipeline_run_id",
        "base_model": "cai.base_model",
        "code_version": "cai.code_version",
        "human_data": "cai.human_data",
        "run_config_sha256": "cai.run_config.sha256",
    }

    def to_tags(self) -> dict[str, str]:
        tags = {tag: getattr(self, field) for field, tag in self.TAG_NAMES.items()}
        tags.update({f"{DATA_TAG_PREFIX}{role}": uri for role, uri in self.data_uris.items()})
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Lineage | None:
        """The lineage recorded in `tags`, or None for a version registered without one."""
        values = {field: tags[tag] for field, tag in cls.TAG_NAMES.items() if tag in tags}
        values.setdefault("code_version", "unknown")
        values.setdefault("human_data", "unknown")
        data = {
            key[len(DATA_TAG_PREFIX) :]: uri for key, uri in tags.items() if key.startswith(DATA_TAG_PREFIX)
        }
        try:
            return cls(**values, data_uris=data)
        except ValidationError:
            return None


class ModelVersionInfo(BaseModel):
    """One registered model version as `cai` shows it."""

    name: str = Field(description="Registered model name.")
    version: str = Field(description="Version number within that model.")
    source: str = Field(description="Where the checkpoint lies (s3:// URI or local directory).")
    run_id: str | None = Field(default=None, description="MLflow run that produced it, if recorded.")
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing at this version.")
    checkpoint_sha256: str | None = Field(default=None, description="sha256 of the checkpoint's manifest.")
    lineage: Lineage | None = Field(
        default=None, description="Recorded lineage; None if registered outside cai."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="All tags, including eval and gate tags.")


class PromotionGate(BaseModel):
    """Thresholds a challenger must meet, judged against the current champion, to be promoted."""

    model_config = ConfigDict(extra="forbid")

    min_harmless_win_rate: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Least value the lower bound of the 95% interval of the challenger's harmlessness win rate "
        "against the champion must reach, as judged by the judge model. 0.5 means 'shown to be more harmless'.",
    )
    max_helpfulness_drop: float = Field(
        default=0.05,
        ge=0.0,
        le=0.5,
        description="Largest allowed fall in helpfulness, measured as 0.5 minus the lower bound of the 95% "
        "interval of the challenger's helpfulness win rate against the champion. 0.05 lets a challenger through "
        "whose helpfulness is shown to be at least 0.45.",
    )


class WinRateEvidence(BaseModel):
    """A win rate as the gate reads it: the point estimate and its 95% interval's lower bound."""

    rate: float = Field(ge=0.0, le=1.0, description="Soft win rate (mean P(win)) over the comparisons.")
    ci_low: float = Field(ge=0.0, le=1.0, description="Lower bound of its 95% Wilson interval.")
    n: int = Field(ge=1, description="Comparisons it rests on.")


class GateDecision(BaseModel):
    """Whether the challenger becomes champion, and why."""

    promote: bool = Field(description="True if `champion` moves (or stays) on this version.")
    reason: str = Field(description="One line for people, recorded as tag cai.gate.reason.")


def _check_rate(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise CaiError(f"{name} {value} is outside [0, 1]")
    return value


def decide_promotion(harmless_win_rate: float, helpful_win_rate: float, gate: PromotionGate) -> GateDecision:
    """Apply the gate to the lower bounds of the 95% intervals of the challenger's win rates
    against the champion (each in [0, 1]).

    Promote when harmless_win_rate >= gate.min_harmless_win_rate and
    0.5 - helpful_win_rate <= gate.max_helpfulness_drop; otherwise name every failed condition.
    """
    _check_rate("harmless_win_rate", harmless_win_rate)
    _check_rate("helpful_win_rate", helpful_win_rate)
    drop = 0.5 - helpful_win_rate
    failures = []
    if harmless_win_rate < gate.min_harmless_win_rate - TOLERANCE:
        failures.append(
            f"harmlessness win rate {harmless_win_rate:.3f} is below the required {gate.min_harmless_win_rate:.3f}"
        )
    if drop > gate.max_helpfulness_drop + TOLERANCE:
        failures.append(
            f"helpfulness fell by {drop:.3f} (win rate {helpful_win_rate:.3f}), "
            f"more than the allowed {gate.max_helpfulness_drop:.3f}"
        )
    if failures:
        return GateDecision(promote=False, reason="; ".join(failures) + BOUNDS_NOTE)
    return GateDecision(
        promote=True,
        reason=f"harmlessness win rate {harmless_win_rate:.3f} >= {gate.min_harmless_win_rate:.3f} and "
        f"helpfulness win rate {helpful_win_rate:.3f} within the allowed drop of {gate.max_helpfulness_drop:.3f}"
        + BOUNDS_NOTE,
    )


BOUNDS_NOTE = " (lower bounds of 95% intervals)"


# -- registry lock -------------------------------------------------------------------------------


def _lock_tags(client: MlflowClient, lock_name: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock_name).tags)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _delete_lock(client: MlflowClient, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _lock_holder() -> dict[str, str]:
    """Who takes a lock: the pipeline run (when inside a stage run), the host, and the process by
    its id and PID namespace (pods sharing a host name do not share PIDs)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return {
        LOCK_RUN_TAG: os.environ.get(PIPELINE_RUN_ENV, ""),
        LOCK_HOST_TAG: socket.gethostname(),
        LOCK_PID_TAG: str(os.getpid()),
        LOCK_PIDNS_TAG: namespace,
    }


def describe_holder(tags: dict[str, str]) -> str:
    """The holder of a lock in words: pipeline run, host and process."""
    run = tags.get(LOCK_RUN_TAG) or "no pipeline run"
    return f"pipeline run {run} (host {tags.get(LOCK_HOST_TAG, '?')}, pid {tags.get(LOCK_PID_TAG, '?')})"


def _holder_is_gone(held: dict[str, str], me: dict[str, str]) -> bool:
    """True when the holder of a lock cannot be running any more: an earlier attempt of this same
    pipeline run (a retried step; the attempt that held the lock was killed), or a process that
    no longer exists in this host's (and this PID namespace's) process table."""
    if held.get(LOCK_RUN_TAG) and held.get(LOCK_RUN_TAG) == me[LOCK_RUN_TAG]:
        return True
    same_processes = (held.get(LOCK_HOST_TAG), held.get(LOCK_PIDNS_TAG)) == (
        me[LOCK_HOST_TAG],
        me[LOCK_PIDNS_TAG],
    )
    if not same_processes or not me[LOCK_PIDNS_TAG] or not held.get(LOCK_PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(held[LOCK_PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _try_acquire(client: MlflowClient, model_name: str, owner: str, lease_s: float) -> bool:
    from mlflow.exceptions import MlflowException

    lock_name = model_name + LOCK_SUFFIX
    me = _lock_holder()
    tags = {
        LOCK_FOR_TAG: model_name,
        LOCK_OWNER_TAG: owner,
        LOCK_EXPIRES_TAG: f"{time.time() + lease_s:.3f}",
        **me,
    }
    try:
        client.create_registered_model(
            lock_name,
            tags=tags,
            description=f"Transient lock held by cai while it changes aliases of '{model_name}'.",
        )
        return True
    except MlflowException as err:
        # A server that loses the insert race looks the winner up to say so; when the winner has
        # released the lock in between, that lookup answers RESOURCE_DOES_NOT_EXIST. Both mean:
        # not ours this time.
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
    held = _lock_tags(client, lock_name)
    if held is None:
        return False
    if held.get(LOCK_OWNER_TAG) == owner:
        return True  # our create committed, but its response was lost and the client retried
    if float(held.get(LOCK_EXPIRES_TAG, "0")) < time.time() or _holder_is_gone(held, me):
        _delete_lock(client, lock_name)
    return False


@contextmanager
def registry_lock(
    client: MlflowClient, model_name: str, lease_s: float = 300.0, wait_s: float = 120.0, poll_s: float = 0.25
) -> Iterator[str]:
    """Hold the promotion lock of `model_name` (see the module docstring); yields the owner token.

    Waits up to `wait_s` seconds for another holder, then raises `CaiError` naming it.
    """
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    lock_name = model_name + LOCK_SUFFIX
    deadline = time.monotonic() + wait_s
    while not _try_acquire(client, model_name, owner, lease_s):
        if time.monotonic() >= deadline:
            held = _lock_tags(client, lock_name) or {}
            expires = datetime.fromtimestamp(float(held.get(LOCK_EXPIRES_TAG, "0")), timezone.utc)
            raise CaiError(
                f"registered model '{model_name}': the promotion lock '{lock_name}' is held by "
                f"{describe_holder(held)} until {expires:%Y-%m-%dT%H:%M:%SZ}; retry later"
            )
        time.sleep(poll_s)
    try:
        yield owner
    finally:
        if (_lock_tags(client, lock_name) or {}).get(LOCK_OWNER_TAG) == owner:
            _delete_lock(client, lock_name)


def release_run_locks(tracking_uri: str | None, pipeline_run_id: str) -> list[str]:
    """Delete every promotion lock held by `pipeline_run_id` (a failed or cancelled run's exit
    handler); returns the names of the models whose locks were released."""
    client = connect(tracking_uri)
    released = []
    for model in _all_pages(client.search_registered_models):
        tags = dict(model.tags)
        if LOCK_FOR_TAG in tags and tags.get(LOCK_RUN_TAG) == pipeline_run_id:
            _delete_lock(client, model.name)
            released.append(tags[LOCK_FOR_TAG])
    return released


# -- registration --------------------------------------------------------------------------------


def _version_info(mv: ModelVersion, aliases: list[str]) -> ModelVersionInfo:
    tags = dict(mv.tags)
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        source=mv.source,
        run_id=mv.run_id or None,
        aliases=sorted(aliases),
        checkpoint_sha256=tags.get(CHECKPOINT_SHA_TAG),
        lineage=Lineage.from_tags(tags),
        tags=tags,
    )


def _registered_model(client: MlflowClient, model_name: str) -> RegisteredModel:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise CaiError(f"no registered model named '{model_name}' at {client.tracking_uri}") from None


def _alias_of(client: MlflowClient, model_name: str, alias: str) -> str | None:
    version = _registered_model(client, model_name).aliases.get(alias)
    return None if version is None else str(version)


def _aliases_by_version(client: MlflowClient, model_name: str) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in _registered_model(client, model_name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def checkpoint_manifest_sha256(checkpoint_uri: str) -> str:
    """sha256 of a finished checkpoint's manifest (which lists every file's sha256)."""
    return _manifest_sha256(ArtifactStore.open(checkpoint_uri))


def _manifest_sha256(store: ArtifactStore) -> str:
    if not store.exists(MANIFEST):
        raise CaiError(f"{store.uri}: no finished checkpoint there (no {MANIFEST})")
    return hashlib.sha256(store.read_bytes(MANIFEST)).hexdigest()


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _versions_of(
    client: MlflowClient, model_name: str, source: str, checkpoint_sha256: str
) -> list[ModelVersion]:
    found = client.search_model_versions(
        f"name = {filter_literal(model_name, 'model name')}"
        f" and source_path = {filter_literal(source, 'checkpoint URI')}"
        f" and tags.`{CHECKPOINT_SHA_TAG}` = {filter_literal(checkpoint_sha256, 'checkpoint sha256')}"
    )
    return sorted(found, key=lambda mv: int(mv.version))


def register_checkpoint(
    tracking_uri: str | None, model_name: str, checkpoint_uri: str, run_id: str | None, lineage: Lineage
) -> ModelVersionInfo:
    """Register the checkpoint at `checkpoint_uri` as a version of `model_name`, once.

    The checkpoint must be finished (its manifest written); the manifest's sha256 is tagged as
    `cai.checkpoint_sha256` beside the lineage tags. Registering the same source and hash again
    returns the existing version.
    """
    from mlflow.exceptions import MlflowException

    filter_literal(model_name, "model name")
    uri, source_of_uri = resolve_tracking_uri(tracking_uri)
    store = ArtifactStore.open(checkpoint_uri)
    if not is_s3(store.uri) and uri.startswith(("http://", "https://")):
        raise CaiError(
            f"checkpoint {store.uri} is a local path, which the MLflow server {uri} (set by {source_of_uri}) "
            "cannot register; write checkpoints to s3:// or use a local sqlite:/// tracking URI"
        )
    checkpoint_sha256 = _manifest_sha256(store)
    client = connect(tracking_uri)
    _ensure_registered_model(client, model_name)
    existing = _versions_of(client, model_name, store.uri, checkpoint_sha256)
    if existing:
        created = existing[0]
    else:
        tags = {**lineage.to_tags(), CHECKPOINT_SHA_TAG: checkpoint_sha256}
        try:
            created = client.create_model_version(
                model_name, store.uri, run_id=run_id, tags=tags, await_creation_for=0
            )
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise CaiError(
                f"MLflow refused to register {store.uri} as '{model_name}': {err.message}"
            ) from None
        survivors = _versions_of(client, model_name, store.uri, checkpoint_sha256)
        if survivors and int(survivors[0].version) < int(created.version):
            client.delete_model_version(model_name, str(created.version))
            created = survivors[0]
    return _version_info(created, _aliases_by_version(client, model_name).get(str(created.version), []))


def _get_version(client: MlflowClient, model_name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise CaiError(f"registered model '{model_name}' has no version {version!r}") from None


def set_challenger(tracking_uri: str | None, model_name: str, version: str) -> None:
    """Point the `challenger` alias at `version` (under the promotion lock)."""
    client = connect(tracking_uri)
    with registry_lock(client, model_name):
        _get_version(client, model_name, version)
        client.set_registered_model_alias(model_name, CHALLENGER, str(version))


def version_by_alias(tracking_uri: str | None, model_name: str, alias: str) -> ModelVersionInfo | None:
    """The version `alias` points at (e.g. the champion the evaluation compares against), or None
    when the alias is unset or no model of that name is registered yet.
    """
    client = connect(tracking_uri)
    try:
        aliases = _aliases_by_version(client, model_name)
    except CaiError:
        return None
    version = next((v for v, names in aliases.items() if alias in names), None)
    if version is None:
        return None
    return _version_info(_get_version(client, model_name, version), aliases[version])


# MLflow's own model URI forms; `@alias` is how a deployment follows the champion.
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[0-9]+))$")


def registered_checkpoint(ref: str, tracking_uri: str | None = None) -> ModelVersionInfo:
    """The version that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names, whose `source` is
    its checkpoint. The checkpoint's manifest is checked against the hash recorded at
    registration, so weights rewritten in place since then are refused rather than served."""
    match = MODELS_URI.match(ref)
    if not match:
        raise CaiError(f"model '{ref}': expected models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    if alias:
        info = version_by_alias(tracking_uri, name, alias)
        if info is None:
            raise CaiError(f"model '{ref}': no version of registered model '{name}' has the alias '{alias}'")
    else:
        client = connect(tracking_uri)
        info = _version_info(
            _get_version(client, name, version), _aliases_by_version(client, name).get(version, [])
        )
    if info.checkpoint_sha256 and checkpoint_manifest_sha256(info.source) != info.checkpoint_sha256:
        raise CaiError(
            f"model '{ref}': the checkpoint at {info.source} changed after version {info.version} "
            "was registered"
        )
    return info


def record_evaluation(
    tracking_uri: str | None,
    model_name: str,
    version: str,
    harmless: WinRateEvidence,
    helpful: WinRateEvidence,
    compared_with: str,
) -> None:
    """Tag `version` with its win rates against `compared_with` (the champion's version, or a
    baseline policy of `BASELINES` when there is no champion): the evidence the gate reads."""
    client = connect(tracking_uri)
    _get_version(client, model_name, version)
    tags = {
        EVAL_HARMLESS_TAG: repr(harmless.rate),
        EVAL_HELPFUL_TAG: repr(helpful.rate),
        EVAL_HARMLESS_LOW_TAG: repr(harmless.ci_low),
        EVAL_HELPFUL_LOW_TAG: repr(helpful.ci_low),
        EVAL_COMPARISONS_TAG: str(min(harmless.n, helpful.n)),
        EVAL_CHAMPION_TAG: str(compared_with),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)


# -- promotion -----------------------------------------------------------------------------------


def _judge(
    version: str,
    champion: str | None,
    harmless_win_rate: float | None,
    helpful_win_rate: float | None,
    compared_with: str | None,
    gate: PromotionGate,
    force: bool,
) -> GateDecision:
    if champion == version:
        return GateDecision(promote=True, reason=f"version {version} is already the champion")
    against = (
        f"champion version {champion}"
        if champion
        else f"a baseline ({' or '.join(BASELINES)}; no champion yet)"
    )
    if champion is None and compared_with not in BASELINES:
        decision = GateDecision(
            promote=False,
            reason=f"there is no champion yet, so version {version} must beat {against}, but its win rates "
            f"were measured against {compared_with or 'nothing'}; evaluate it",
        )
    elif champion is not None and compared_with is not None and compared_with != champion:
        decision = GateDecision(
            promote=False,
            reason=f"win rates were measured against version {compared_with} but the champion is now version "
            f"{champion}; evaluate again",
        )
    else:
        missing = [
            tag
            for tag, value in (
                (EVAL_HARMLESS_LOW_TAG, harmless_win_rate),
                (EVAL_HELPFUL_LOW_TAG, helpful_win_rate),
            )
            if value is None
        ]
        if missing and not force:
            raise CaiError(
                f"version {version}: no win rate against {against} "
                f"(missing tag {', '.join(missing)}, written by the evaluation step); evaluate it or use --force"
            )
        decision = (
            GateDecision(promote=False, reason=f"not evaluated (missing {', '.join(missing)})")
            if missing
            else decide_promotion(harmless_win_rate, helpful_win_rate, gate)
        )
    if force and not decision.promote:
        return GateDecision(promote=True, reason=f"forced by hand; the gate said: {decision.reason}")
    return decision


def _apply_decision(
    client: MlflowClient,
    model_name: str,
    version: str,
    decision: GateDecision,
    champion: str | None,
    forced: bool,
    evidence: dict,
) -> None:
    """Record `decision` as `cai.gate.*` tags on the version and move `champion` if it promotes."""
    tags = {
        GATE_DECISION_TAG: "promoted" if decision.promote else "rejected",
        GATE_REASON_TAG: decision.reason,
        "cai.gate.champion_before": champion or "none",
        "cai.gate.forced": str(forced).lower(),
        "cai.gate.evidence": json.dumps(evidence, sort_keys=True),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if decision.promote:
        client.set_registered_model_alias(model_name, CHAMPION, version)


def promote(
    tracking_uri: str | None,
    model_name: str,
    version: str,
    harmless_win_rate: float | None,
    helpful_win_rate: float | None,
    gate: PromotionGate,
    force: bool = False,
    compared_with: str | None = None,
) -> GateDecision:
    """Decide whether `version` becomes `champion`, move the alias if so, and record why.

    The win rates are the lower bounds of the 95% intervals of the version's win rates against
    the current champion; `compared_with` (the champion version they were measured against, if
    known) guards against promoting on stale evidence when the champion moved in between. With no
    champion yet they must be against a baseline (`compared_with` in `BASELINES`) and pass the same
    gate. `force` promotes whatever the gate says. The decision, its reason, the champion it was
    judged against and the evidence (rates and thresholds, as JSON) are always written as
    `cai.gate.*` tags on the version; all of it runs under the registry lock.
    """
    client = connect(tracking_uri)
    version = str(version)
    evidence = {
        "harmless_win_rate": harmless_win_rate,
        "helpful_win_rate": helpful_win_rate,
        "compared_with": compared_with,
        "gate": gate.model_dump(),
    }
    with registry_lock(client, model_name):
        _get_version(client, model_name, version)
        champion = _alias_of(client, model_name, CHAMPION)
        decision = _judge(version, champion, harmless_win_rate, helpful_win_rate, compared_with, gate, force)
        _apply_decision(client, model_name, version, decision, champion, force, evidence)
    return decision


def promote_with(tracking_uri: str | None, model_name: str, version: str, leader: str) -> GateDecision:
    """Make `version` champion because `leader` (the model it was trained with, e.g. the RL-CAI
    policy "cai-harmless-rl-cai v3") passed the gate; the PM and SL-CAI model of a run follow
    their policy. Recorded like any decision, with the leader as its evidence.
    """
    client = connect(tracking_uri)
    version = str(version)
    with registry_lock(client, model_name):
        _get_version(client, model_name, version)
        champion = _alias_of(client, model_name, CHAMPION)
        decision = GateDecision(promote=True, reason=f"promoted with {leader}, which passed the gate")
        _apply_decision(client, model_name, version, decision, champion, False, {"leader": leader})
    return decision


def _rate_tag(tags: dict[str, str], key: str, where: str) -> float | None:
    if key not in tags:
        return None
    try:
        return float(tags[key])
    except ValueError:
        raise CaiError(f"{where}: tag {key} = {tags[key]!r} is not a number") from None


def promote_from_evaluation(
    tracking_uri: str | None, model_name: str, version: str | None, gate: PromotionGate, force: bool = False
) -> tuple[str, GateDecision]:
    """`promote` with the evidence the evaluation step tagged on the version (default: the
    `challenger` alias): the lower bounds of its win rates' 95% intervals. Returns the version
    judged and the decision.
    """
    client = connect(tracking_uri)
    if version is None:
        version = _alias_of(client, model_name, CHALLENGER)
        if version is None:
            raise CaiError(f"registered model '{model_name}' has no '{CHALLENGER}' alias; pass --version")
    tags = dict(_get_version(client, model_name, version).tags)
    where = f"model '{model_name}' version {version}"
    decision = promote(
        tracking_uri,
        model_name,
        version,
        harmless_win_rate=_rate_tag(tags, EVAL_HARMLESS_LOW_TAG, where),
        helpful_win_rate=_rate_tag(tags, EVAL_HELPFUL_LOW_TAG, where),
        gate=gate,
        force=force,
        compared_with=tags.get(EVAL_CHAMPION_TAG),
    )
    return str(version), decision


def list_models(tracking_uri: str | None, model_name: str | None = None) -> list[ModelVersionInfo]:
    """Every live version of every registered model (or of `model_name`), with aliases and lineage,
    ordered by model name and version. Promotion locks are not listed.
    """
    client = connect(tracking_uri)
    if model_name is not None:
        names = [model_name]
    else:
        names = sorted(
            model.name
            for model in _all_pages(client.search_registered_models)
            if LOCK_FOR_TAG not in model.tags
        )
    infos = []
    for name in names:
        aliases = _aliases_by_version(client, name)
        versions = _all_pages(
            client.search_model_versions, filter_string=f"name = {filter_literal(name, 'model name')}"
        )
        for mv in sorted(versions, key=lambda mv: int(mv.version)):
            infos.append(_version_info(mv, aliases.get(str(mv.version), [])))
    return infos


def _all_pages(search, **kwargs) -> list:
    results, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        results.extend(page)
        token = page.token
        if not token:
            return results
