"""The retrain ledger: one record per attempt at training one change, in the constitution registry.

Each fingerprint has its records under `_submissions/<name>/<version>/<fingerprint[:16]>/<attempt>.json`.
A run is never started twice for one change:

- **Claim.** Before submitting, a retrain claims the next attempt with a create-only write
  (`write_versioned`, an S3 `If-None-Match: *` PUT) of a record in state "submitting" with a lease
  (`LEASE_SECONDS`), a fencing token and the exact name its run will have. A concurrent retrain
  loses that write and submits nothing.
- **Fenced writes.** Every later write of the claim (checking it just before submitting, recording
  the run) is conditional on the version (ETag) the owner last wrote (`If-Match`). A retrain that
  takes over an expired claim first rewrites it as "abandoned" the same way, so the late owner's
  next write fails and it learns that it lost, instead of overwriting.
- **Ambiguous errors keep the claim.** A conditional write whose answer was lost is resolved by
  reading the record back (is it the one this owner wrote?); a submission that fails keeps the
  claim, and whoever finds it after its lease reads back first: a run of the claim's name in
  Kubeflow Pipelines is recorded as its run, and only when there is none is the attempt taken over.
  Nothing is ever deleted.

Records written by an earlier release (`_submissions/<name>/<version>-<sha256[:12]>.json`, no run
config or images) count as a submission with the current settings.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, ValidationError

from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.store import ArtifactStore
from cai_lib.platform.retrain.identity import run_config_sha256, training_params
from cai_lib.platform.run_config import RunConfig

SUBMISSIONS = "_submissions"


# How long a claim ("submitting") holds off other retrains before one may take it over: far
# longer than compiling, uploading and creating a run takes.
LEASE_SECONDS = 15 * 60


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def stamp(moment: datetime) -> str:
    return moment.strftime(TIME_FORMAT)


def expired(stamp: str, now: datetime) -> bool:
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
    state: Literal["submitting", "submitted", "adopted", "abandoned"] = Field(
        default="submitted",
        description="submitting: claimed, the run not created yet; abandoned: the claim's lease expired with no "
        "run of its name, and another retrain took the attempt after it over.",
    )
    owner: str = Field(default="", description="The retrain that wrote it (host, pid, nonce).")
    token: str = Field(default="", description="The claim's fencing token: its owner's, in every write it makes.")
    fence: int = Field(default=0, ge=0, description="How many times the record was written (each write differs).")
    run_name: str = Field(
        default="", description="The name the claim's run is submitted under, by which a later retrain finds it."
    )
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


def read_record(store: ArtifactStore, key: str) -> Submission:
    from cai_lib.core.config import format_validation_error

    where = store.uri_of(key)
    try:
        return Submission.model_validate(store.read_json(key))
    except ValidationError as err:
        raise CaiError(f"{format_validation_error(err, where)}; not a submission record, delete it") from None
    except ValueError as err:
        raise CaiError(f"{where}: not a submission record ({err}); delete it") from None


def records_of(store: ArtifactStore, constitution: Constitution) -> dict[str, dict[int, Submission]]:
    """The records of `constitution`'s version: fingerprint prefix -> attempt number -> record."""
    prefix = version_prefix(constitution)
    found: dict[str, dict[int, Submission]] = {}
    for key in store.list(prefix):
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) != 2 or not parts[1].endswith(".json") or not parts[1][: -len(".json")].isdigit():
            continue
        found.setdefault(parts[0], {})[int(parts[1][: -len(".json")])] = read_record(store, key)
    return found


def new_record(
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


def _encoded(record: Submission) -> bytes:
    return (json.dumps(record.model_dump(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def read_versioned_record(store: ArtifactStore, key: str) -> tuple[Submission, str]:
    """The record at `key` and its version token (ETag), for a fenced write."""
    data, version = store.read_versioned(key)
    try:
        return Submission.model_validate_json(data), version
    except ValueError as err:
        raise CaiError(f"{store.uri_of(key)}: not a submission record ({err}); delete it") from None


def _written(store: ArtifactStore, key: str, record: Submission, version: str | None) -> str | None:
    """`version` when the conditional write succeeded; else, reading the record back, its version
    if it is the one just written (the write's answer was lost and the retry found it done)."""
    if version is not None:
        return version
    current, current_version = read_versioned_record(store, key)
    mine = (current.token, current.fence, current.state) == (record.token, record.fence, record.state)
    return current_version if mine else None


def claim_attempt(store: ArtifactStore, key: str, record: Submission) -> str | None:
    """Write `record` at `key` unless something is there: the create-only write (S3 If-None-Match)
    concurrent retrains race on. Returns its version token for the one that wrote it, else None."""
    return _written(store, key, record, store.write_versioned(key, _encoded(record)))


def replace_record(
    store: ArtifactStore, key: str, record: Submission, if_version: str
) -> tuple[Submission, str] | None:
    """Write `record` (its `fence` one higher) at `key` only if the record there is still at
    version `if_version`: the fenced write. Returns the record written and its version, or None
    when someone else wrote it in between (the lease was taken over)."""
    record = record.model_copy(update={"fence": record.fence + 1})
    version = _written(store, key, record, store.write_versioned(key, _encoded(record), if_match=if_version))
    return None if version is None else (record, version)
