"""Registering checkpoints as model versions, once, into models the platform created.

The pipeline registers into the candidates model of each role (`candidates_name`), never into
the production model that serving follows: in MLflow's permission model whoever may add a
version to a model may also move its aliases, so only the promoter's identity writes the
production model (`cai_lib.platform.registry.promotion`).

Ownership: a model the platform creates carries the tag `cai.created_by=cai-platform`, and every
version it registers carries `VERSION_CREATION_TAGS`. A model of the same name that exists without
the tag (someone created it first, to squat on the name) is refused, with what to do.

Idempotence: `register_checkpoint` looks for a live version with the same source and checkpoint
hash before creating one, so a retry (for example after an MLflow restart) returns the version
the first attempt made. If two attempts still both create one (a lost response that MLflow's
HTTP client retried, or two pods at once), each re-reads the list, keeps the lowest version
number and deletes its own newer duplicate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import (
    Lineage,
    ModelVersionInfo,
    aliases_by_version,
    created_by_platform,
    get_version,
    manifest_sha256,
    version_info,
)
from cai_lib.core.names import CHALLENGER, CHECKPOINT_SHA_TAG, CREATED_BY_TAG, PLATFORM
from cai_lib.core.store import ArtifactStore, is_s3
from cai_lib.core.tracking import connect, filter_literal, resolve_tracking_uri
from cai_lib.platform.registry.lock import registry_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


def ensure_platform_model(client: MlflowClient, model_name: str, description: str = "") -> None:
    """Create `model_name` with the platform's creation tag, or check that the existing one has it
    (`CaiError` saying what to do when someone else created it)."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, tags={CREATED_BY_TAG: PLATFORM}, description=description)
        return
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    created_by_platform(client, model_name)


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
    `cai.checkpoint_sha256` beside the lineage tags and `cai.created_by`. Registering the same
    source and hash again returns the existing version. The model is created with the platform's
    creation tag; an existing one without it is refused.
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
    checkpoint_sha256 = manifest_sha256(store)
    client = connect(tracking_uri)
    ensure_platform_model(
        client, model_name, "Candidates registered by cai-platform's pipeline; the gate copies the ones it "
        "promotes into the production model.",
    )
    existing = _versions_of(client, model_name, store.uri, checkpoint_sha256)
    if existing:
        created = existing[0]
    else:
        tags = {**lineage.to_tags(), CHECKPOINT_SHA_TAG: checkpoint_sha256, CREATED_BY_TAG: PLATFORM}
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
    return version_info(client, created, aliases_by_version(client, model_name).get(str(created.version), []))


def set_challenger(tracking_uri: str | None, model_name: str, version: str) -> None:
    """Point the `challenger` alias at `version` (under the promotion lock)."""
    client = connect(tracking_uri)
    with registry_lock(client, model_name) as lease:
        get_version(client, model_name, version)
        lease.check()
        client.set_registered_model_alias(model_name, CHALLENGER, str(version))
