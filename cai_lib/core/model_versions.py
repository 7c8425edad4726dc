"""Registered model versions as the platform reads them: lineage, checkpoint hash, aliases.

Each trained model (the preference model, the SL-CAI and RL-CAI policies) is registered as an
MLflow model version whose *source* is its checkpoint in the artifact store (`s3://...` or, with a
local SQLite tracking store, a local directory): the registry records where the weights are and
where they came from, and never copies them. Lineage (constitution name, version and sha256,
pipeline run, data URIs, base model, and the sha256 of the checkpoint's manifest) is stored as
version tags, so `cai models list`, the MLflow UI and `cai retrain` can trace a model back to the
exact constitution. This module only reads; writing versions and moving aliases is
`cai_lib.platform.registry`'s.

**Registered means verified.** `verified_version` is the one check that everything which loads,
fetches, serves or promotes a version goes through (`cai models fetch`, `models:/` model
references, the pyfunc loader, `cai serve sync` and `verify`, the webhook receiver, the gate): the
registered model carries the platform's creation tag, the version carries every tag of
`VERSION_CREATION_TAGS` (creator, checkpoint sha256, pipeline run), and the sha256 of the
checkpoint's manifest is the one registered; with `every_file`, each file's sha256 is checked
against the manifest too. A version that fails is refused, named, in one line.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from cai_lib.core.errors import CaiError
from cai_lib.core.names import (
    BASE_MODEL_TAG,
    CHECKPOINT_SHA_TAG,
    CODE_VERSION_TAG,
    CONSTITUTION_NAME_TAG,
    CONSTITUTION_SHA_TAG,
    CONSTITUTION_VERSION_TAG,
    CREATED_BY_TAG,
    DATA_TAG_PREFIX,
    HUMAN_DATA_TAG,
    LOCK_FOR_TAG,
    MANIFEST,
    PARENT_VERSION_TAG,
    PIPELINE_RUN_TAG,
    PLATFORM,
    ROUND_TAG,
    RUN_CONFIG_SHA_TAG,
    VERSION_CREATION_TAGS,
)
from cai_lib.core.stage_table import package_version
from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import connect, filter_literal

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel


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
        description="sha256 of the run's training parameters (cai_lib.platform.retrain.identity.run_config_sha256), which "
        "`cai retrain` compares with the run config in git; 'unknown' where it was not recorded.",
    )

    round: int = Field(
        default=1, ge=1, description="The round of iterated CAI that trained it (1 for a run of one round)."
    )
    parent_version: str = Field(
        default="",
        description="The registered version it continues, as NAME/VERSION: the round before's RL-CAI policy (or "
        "the SL-CAI policy, for round 1's) or PM; '' where it starts from base_model.",
    )

    TAG_NAMES: ClassVar[dict[str, str]] = {
        "constitution_name": CONSTITUTION_NAME_TAG,
        "constitution_version": CONSTITUTION_VERSION_TAG,
        "constitution_sha256": CONSTITUTION_SHA_TAG,
        "pipeline_run_id": PIPELINE_RUN_TAG,
        "base_model": BASE_MODEL_TAG,
        "code_version": CODE_VERSION_TAG,
        "human_data": HUMAN_DATA_TAG,
        "run_config_sha256": RUN_CONFIG_SHA_TAG,
        "round": ROUND_TAG,
        "parent_version": PARENT_VERSION_TAG,
    }

    def to_tags(self) -> dict[str, str]:
        tags = {tag: str(getattr(self, field)) for field, tag in self.TAG_NAMES.items()}
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
    registered_source: str = Field(
        default="",
        description="The source MLflow recorded: `source` itself, or for a copy made by the promoter the "
        "candidate it copies (models:/NAME/VERSION).",
    )
    run_id: str | None = Field(default=None, description="MLflow run that produced it, if recorded.")
    aliases: list[str] = Field(default_factory=list, description="Aliases pointing at this version.")
    checkpoint_sha256: str | None = Field(default=None, description="sha256 of the checkpoint's manifest.")
    lineage: Lineage | None = Field(
        default=None, description="Recorded lineage; None if registered outside cai."
    )
    tags: dict[str, str] = Field(default_factory=dict, description="All tags, including eval and gate tags.")


def checkpoint_location(client: MlflowClient, mv: ModelVersion) -> str:
    """Where a version's checkpoint lies: its source, or for a copy (source `models:/NAME/VERSION`,
    as `copy_model_version` records it) the storage location MLflow resolved when it made it."""
    if not str(mv.source).startswith("models:/"):
        return mv.source
    return client.get_model_version_download_uri(mv.name, str(mv.version))


def version_info(client: MlflowClient, mv: ModelVersion, aliases: list[str]) -> ModelVersionInfo:
    tags = dict(mv.tags)
    return ModelVersionInfo(
        name=mv.name,
        version=str(mv.version),
        source=checkpoint_location(client, mv),
        registered_source=mv.source,
        run_id=mv.run_id or None,
        aliases=sorted(aliases),
        checkpoint_sha256=tags.get(CHECKPOINT_SHA_TAG),
        lineage=Lineage.from_tags(tags),
        tags=tags,
    )


def registered_model(client: MlflowClient, model_name: str) -> RegisteredModel:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise CaiError(f"no registered model named '{model_name}' at {client.tracking_uri}") from None


def alias_of(client: MlflowClient, model_name: str, alias: str) -> str | None:
    version = registered_model(client, model_name).aliases.get(alias)
    return None if version is None else str(version)


def aliases_by_version(client: MlflowClient, model_name: str) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in registered_model(client, model_name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def checkpoint_manifest_sha256(checkpoint_uri: str) -> str:
    """sha256 of a finished checkpoint's manifest (which lists every file's sha256)."""
    return manifest_sha256(ArtifactStore.open(checkpoint_uri))


def manifest_sha256(store: ArtifactStore) -> str:
    if not store.exists(MANIFEST):
        raise CaiError(f"{store.uri}: no finished checkpoint there (no {MANIFEST})")
    return hashlib.sha256(store.read_bytes(MANIFEST)).hexdigest()


def get_version(client: MlflowClient, model_name: str, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise CaiError(f"registered model '{model_name}' has no version {version!r}") from None


def version_with_checkpoint(tracking_uri: str | None, model_name: str, checkpoint_sha256: str) -> str | None:
    """The first version of `model_name` registered with the checkpoint `checkpoint_sha256`, if any."""
    client = connect(tracking_uri)
    found = client.search_model_versions(
        f"name = {filter_literal(model_name, 'model name')} and "
        f"tags.`{CHECKPOINT_SHA_TAG}` = {filter_literal(checkpoint_sha256, 'checkpoint sha256')}"
    )
    return str(min(int(mv.version) for mv in found)) if found else None


def ancestors(tracking_uri: str | None, info: ModelVersionInfo) -> list[ModelVersionInfo]:
    """The versions `info` continues, nearest first, following each one's `parent_version` lineage
    tag (iterated CAI: the round before's policy, back to the SL-CAI policy of round 1)."""
    client = connect(tracking_uri)
    chain: list[ModelVersionInfo] = []
    parent = info.lineage.parent_version if info.lineage else ""
    while parent and len(chain) < 100:  # bounded: a hand-edited tag could make a loop
        name, _, version = parent.rpartition("/")
        mv = get_version(client, name, version)
        chain.append(version_info(client, mv, []))
        parent = chain[-1].lineage.parent_version if chain[-1].lineage else ""
    return chain


def version_by_alias(tracking_uri: str | None, model_name: str, alias: str) -> ModelVersionInfo | None:
    """The version `alias` points at (e.g. the champion the evaluation compares against), or None
    when the alias is unset or no model of that name is registered yet.
    """
    client = connect(tracking_uri)
    try:
        aliases = aliases_by_version(client, model_name)
    except CaiError:
        return None
    version = next((v for v, names in aliases.items() if alias in names), None)
    if version is None:
        return None
    return version_info(client, get_version(client, model_name, version), aliases[version])


def created_by_platform(client: MlflowClient, model_name: str) -> RegisteredModel:
    """The registered model `model_name`, refused in one line unless the platform created it (its
    tag `cai.created_by` is `cai-platform`): a model of that name made by someone else first (a
    squatter) is never loaded, served or promoted from."""
    model = registered_model(client, model_name)
    if dict(model.tags).get(CREATED_BY_TAG) != PLATFORM:
        raise CaiError(
            f"registered model '{model_name}' was not created by {PLATFORM} (no tag {CREATED_BY_TAG}={PLATFORM}): "
            "its versions are not loaded, served or promoted; delete or rename it (an MLflow admin can), or "
            "register under another model_name_prefix"
        )
    return model


def verified_version(
    client: MlflowClient, model_name: str, version: str, every_file: bool = False
) -> ModelVersionInfo:
    """Version `version` of `model_name` if it is the platform's and its checkpoint is the one
    registered (see the module docstring); else `CaiError` naming the version and what failed.

    With `every_file`, each file the manifest lists is also read (streamed) and its sha256
    compared: what serving does before it points anything at the weights."""
    from cai_lib.core.store import ArtifactStore

    model = created_by_platform(client, model_name)
    version = str(version)
    mv = get_version(client, model_name, version)
    aliases = [alias for alias, v in model.aliases.items() if str(v) == version]
    info = version_info(client, mv, aliases)
    where = f"model '{model_name}' version {version}"
    missing = [tag for tag in VERSION_CREATION_TAGS if not info.tags.get(tag)]
    if missing or info.tags[CREATED_BY_TAG] != PLATFORM:
        raise CaiError(
            f"{where} was not registered by {PLATFORM} (missing or wrong tag {', '.join(missing or [CREATED_BY_TAG])}): "
            "it is not loaded, served or promoted"
        )
    store = ArtifactStore.open(info.source)
    if manifest_sha256(store) != info.checkpoint_sha256:
        raise CaiError(
            f"{where}: the checkpoint at {info.source} changed after it was registered "
            f"(its manifest's sha256 is not the registered {info.checkpoint_sha256[:12]}); refusing it"
        )
    if every_file:
        store.verify_dir("")
    return info


def registered_with_sha256(tracking_uri: str, checkpoint_sha256: str, where: str) -> ModelVersionInfo:
    """A version the platform registered whose checkpoint's manifest has sha256
    `checkpoint_sha256`: what a loader that was handed only a folder (MLflow's pyfunc loader)
    checks its manifest against. `CaiError` naming `where` when there is none."""
    from mlflow.exceptions import MlflowException

    client = connect(tracking_uri)
    literal = filter_literal(checkpoint_sha256, "checkpoint sha256")
    try:
        found = all_pages(client.search_model_versions, filter_string=f"tags.`{CHECKPOINT_SHA_TAG}` = {literal}")
    except MlflowException as err:
        raise CaiError(f"{where}: cannot check it against the registry {tracking_uri}: {err.message}") from None
    for mv in sorted(found, key=lambda mv: (mv.name, int(mv.version))):
        try:
            return verified_version(client, mv.name, str(mv.version))
        except CaiError:
            continue
    raise CaiError(
        f"{where}: its manifest (sha256 {checkpoint_sha256[:12]}) is not the checkpoint of any version "
        f"cai-platform registered at {tracking_uri}; refusing to load it"
    )


# MLflow's own model URI forms; `@alias` is how a deployment follows the champion.
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[0-9]+))$")


def parse_models_uri(ref: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    match = MODELS_URI.match(ref)
    if not match:
        raise CaiError(f"model '{ref}': expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def registered_checkpoint(
    ref: str, tracking_uri: str | None = None, every_file: bool = False
) -> ModelVersionInfo:
    """The verified version (`verified_version`) that `models:/NAME@ALIAS` or
    `models:/NAME/VERSION` names, whose `source` is its checkpoint."""
    name, alias, version = parse_models_uri(ref)
    client = connect(tracking_uri)
    if alias:
        version = alias_of(client, name, alias)
        if version is None:
            raise CaiError(f"model '{ref}': no version of registered model '{name}' has the alias '{alias}'")
    return verified_version(client, name, version, every_file=every_file)


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
            for model in all_pages(client.search_registered_models)
            if LOCK_FOR_TAG not in model.tags
        )
    infos = []
    for name in names:
        aliases = aliases_by_version(client, name)
        versions = all_pages(
            client.search_model_versions, filter_string=f"name = {filter_literal(name, 'model name')}"
        )
        for mv in sorted(versions, key=lambda mv: int(mv.version)):
            infos.append(version_info(client, mv, aliases.get(str(mv.version), [])))
    return infos


def all_pages(search, **kwargs) -> list:
    results, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        results.extend(page)
        token = page.token
        if not token:
            return results
