"""The retrain ledger: one record per attempt at training one change, in the constitution registry.

Each fingerprint has its records under `_submissions/<name>/<version>/<fingerprint[:16]>/<attempt>.json`.
A run is never started twice for one change: before submitting, a retrain claims the next
attempt with a create-only write (`ArtifactStore.write_json(..., if_absent=True)`, an S3
`If-None-Match: *` PUT) of a record in state "submitting" with a lease (`LEASE_SECONDS`). A
concurrent retrain loses that write and submits nothing. Records written by an earlier release
(`_submissions/<name>/<version>-<sha256[:12]>.json`, no run config or images) count as a
submission with the current settings.
"""

from __future__ import annotations

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


def claim_attempt(store: ArtifactStore, key: str, record: Submission) -> bool:
    """Write `record` at `key` unless something is there: the create-only write (S3 If-None-Match)
    concurrent retrains race on. True for the one that wrote it."""
    return store.write_json(key, record.model_dump(), if_absent=True)
