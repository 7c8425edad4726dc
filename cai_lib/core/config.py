"""Config machinery every layer shares: strict pydantic models, YAML config files, `--set`
overrides, one-line validation errors, and where the installation keeps things (`Platform`).

The run config itself (`cai_lib.platform.run_config`) composes the stage configs that live beside
each stage; the deployment settings live in `cai_lib.core.deploy`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai_lib.core.errors import CaiError
from cai_lib.core.settings import settings, variable
from cai_lib.core.text import read_text_file
from cai_lib.core.uris import is_s3
from cai_lib.core.yaml_text import UniqueKeyLoader, load_yaml, yaml_problem

ARTIFACT_ROOT_ENV = variable("artifact_root")
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# What the installation's ConfigMap gives every step, besides the secrets: every key the Helm
# chart writes into it (tests/test_step_env.py checks both ways). The UI addresses and the served
# models are set only by some installations; a key the ConfigMap lacks leaves its variable unset.
PLATFORM_ENV = (
    ARTIFACT_ROOT_ENV,
    TRACKING_URI_ENV,
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_S3_ADDRESSING_STYLE",
    "MLFLOW_S3_ENDPOINT_URL",
    variable("constitution_registry"),
    variable("kfp_ui_url"),
    variable("mlflow_ui_url"),
    variable("serving_namespace"),
    variable("serving_models"),
)
LOCAL_ARTIFACT_ROOT = ".cai/artifacts"
# MLflow's own default store: `mlflow ui`, `mlflow models serve` and `mlflow.pyfunc.load_model`
# run in this directory find the run's registry with nothing set.
LOCAL_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE = "sqlite:///"


def local_platform(
    workdir: Path, artifact_root: str | None = None, tracking_uri: str | None = None
) -> Platform:
    """Where a local run keeps things: the argument, else `$CAI_ARTIFACT_ROOT` / `$MLFLOW_TRACKING_URI`,
    else `.cai/artifacts` and `sqlite:///mlflow.db` under `workdir`. Relative local paths are made
    absolute, since steps run as subprocesses. Nothing is created: `make_local_store` makes the
    SQLite file's folder when a run starts."""
    root = artifact_root or settings().artifact_root or LOCAL_ARTIFACT_ROOT
    uri = tracking_uri or os.environ.get(TRACKING_URI_ENV) or LOCAL_TRACKING_URI
    if not is_s3(root) and "://" not in root:
        root = str((workdir / root).resolve())
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        uri = f"{SQLITE}{(workdir / uri.removeprefix(SQLITE)).resolve()}"
    return Platform(artifact_root=root, tracking_uri=uri)


def make_local_store(tracking_uri: str) -> None:
    """Make the folder of a SQLite tracking store, which MLflow creates the file in but not its folder."""
    if tracking_uri.startswith(SQLITE):
        Path(tracking_uri.removeprefix(SQLITE).split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)


# A seed is non-negative and fits a signed 32-bit integer, which every random generator the
# stages hand it to accepts; the seeds a run derives for its stages (`stage_seed`) lie in it too.
MAX_SEED = 2**31 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Platform(Strict):
    """Where this installation keeps things. Not run parameters: the pipeline a user uploads runs
    as uploaded, and every pod reads these from its environment (the chart's ConfigMap sets them;
    `cai run` sets them for its local steps)."""

    artifact_root: str = Field(
        description=f"${ARTIFACT_ROOT_ENV}: local directory or s3:// prefix; stage outputs lie under "
        "<root>/outputs, each run's pointers under <root>/runs/<KFP run id>."
    )
    tracking_uri: str = Field(
        description="$MLFLOW_TRACKING_URI: the MLflow tracking server (or a sqlite:// file)."
    )

    @classmethod
    def from_environment(cls) -> Platform:
        """The settings from `$CAI_ARTIFACT_ROOT` and `$MLFLOW_TRACKING_URI`; `CaiError` naming what is unset."""
        artifact_root, tracking_uri = settings().artifact_root, os.environ.get(TRACKING_URI_ENV)
        given = {ARTIFACT_ROOT_ENV: artifact_root, TRACKING_URI_ENV: tracking_uri}
        missing = [name for name, value in given.items() if not value]
        if missing:
            raise CaiError(
                f"{' and '.join(missing)} not set: pipeline steps read the artifact root and the MLflow tracking "
                "URI from the environment (the Helm chart's ConfigMap cai-env sets both; `cai run` sets them "
                "for local runs)"
            )
        return cls(artifact_root=artifact_root, tracking_uri=tracking_uri)


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line naming `where`, the first bad field and what is wrong with it."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: field '{field}': {message}"


def parse_override(item: str) -> tuple[list[str], object]:
    """`a.b=value` -> (["a", "b"], value), the value parsed as YAML (so 3 is int, true is bool)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise CaiError(f"--set {item!r}: expected key=value, e.g. params.critique_revise.rounds=2")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise CaiError(
            f"--set {item!r}: the value is not valid YAML ({yaml_problem(err)}); quote it, e.g. key='a: b'"
        ) from None
    return key.strip().split("."), value


def read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A run config file as a mapping. A file may name another as its `base` (relative to itself):
    it is read first and this file's settings are laid over it, section by section."""
    if path.is_dir():
        raise CaiError(
            f"{path}: is a directory; --config takes a run config YAML file (see pipelines/configs/)"
        )
    if path.resolve() in chain:
        raise CaiError(f"{path}: its base chain comes back to itself")
    data = load_yaml(read_text_file(path, "config file"), str(path)) or {}
    if not isinstance(data, dict):
        raise CaiError(f"{path}: a run config must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    return _laid_over(read_config_file(path.parent / str(base), (*chain, path.resolve())), data)


def _laid_over(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _laid_over(merged[key], value) if both_sections else value
    return merged


