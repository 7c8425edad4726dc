"""Every environment setting the platform reads, parsed in one place by `pydantic-settings`.

A `CAI_*` variable (and the S3 endpoint, which the platform hands to botocore) is read through
`settings()`, never from `os.environ` directly, so that a bad value is one line naming the
variable (`$CAI_S3_MAX_ATTEMPTS: 'eight' is not a whole number`) wherever it is first needed,
instead of a `ValueError` deep in a library. An empty variable counts as unset.

The settings are read afresh on every call: tests and `cai run` set variables for a block of
work (`core.tracking.scoped_environ`), and the steps of a pipeline run in their own processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cai_lib.core.errors import CaiError
from cai_lib.core.uris import check_endpoint, is_s3

PREFIX = "CAI_"
# botocore's own variables for the S3 endpoint, the specific one first (as botocore reads them).
S3_ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class Settings(BaseSettings):
    """The platform's environment. Each field is the variable `CAI_<FIELD>` unless it says otherwise."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    artifact_root: str | None = Field(
        default=None, description="Local directory or s3:// prefix where stage outputs and run folders go."
    )
    cache_dir: Path = Field(
        default=Path("~/.cache/cai"), description="Local cache of converted and downloaded models."
    )
    constitutions_dir: Path | None = Field(
        default=None, description="The constitutions directory (default: the repository's constitutions/)."
    )
    constitution_registry: str | None = Field(
        default=None, description="s3:// prefix of published constitutions, read before the bundled ones."
    )
    s3_max_attempts: int = Field(
        default=8, ge=1, le=100, description="Attempts per S3 request (botocore's standard retry mode)."
    )
    s3_endpoint: str | None = Field(
        default=None,
        validation_alias=AliasChoices(*S3_ENDPOINT_VARIABLES),
        description="The S3 endpoint (botocore's AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL); none: AWS.",
    )
    serving_namespace: str | None = Field(default=None, description="Namespace of the InferenceServices.")
    serving_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated registered model names the serving pod syncs."
    )
    trainjob: str | None = Field(
        default=None, description="The TrainJob plan (JSON) the compiled pipeline gives a multi-node step."
    )
    run_outcome: Path | None = Field(
        default=None, description="File where the last step of a local run writes its outcome."
    )
    kfp_ui_url: str | None = Field(default=None, description="Base URL of the Kubeflow Pipelines UI.")
    mlflow_ui_url: str | None = Field(default=None, description="Base URL of the MLflow UI.")
    pipeline_run_id: str | None = Field(default=None, description="The KFP run a step belongs to.")
    promoter_tracking_username: str | None = Field(
        default=None,
        description="The promoter's MLflow account, the one identity that writes production models.",
    )
    promoter_tracking_password: SecretStr | None = Field(
        default=None, description="The promoter's MLflow password."
    )
    pipeline_tracking_username: str | None = Field(
        default=None, description="The pipeline's MLflow account, made by `cai mlflow setup-accounts`."
    )
    pipeline_tracking_password: SecretStr | None = Field(
        default=None, description="The pipeline's MLflow password."
    )
    serving_tracking_username: str | None = Field(
        default=None,
        description="The read-only MLflow account of serving and retraining, made by `cai mlflow setup-accounts`.",
    )
    serving_tracking_password: SecretStr | None = Field(
        default=None, description="The read-only account's MLflow password."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Secret the MLflow webhook signs its deliveries with."
    )

    @field_validator("serving_models", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return (
            [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value
        )

    @field_validator("artifact_root", "constitution_registry")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        # A malformed s3: URI is refused here, before anything is written under it.
        return _as_value_error(is_s3, value) and value if value is not None else None

    @field_validator("s3_endpoint", "kfp_ui_url", "mlflow_ui_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _as_value_error(check_endpoint, value)


def _as_value_error(check, value: str):
    """`check(value)`, its `CaiError` raised as the `ValueError` pydantic reports with the field."""
    try:
        check(value)
    except CaiError as err:
        raise ValueError(str(err)) from None
    return value


def variable(field: str) -> str:
    """The environment variable of a settings field (the first, where there are several)."""
    alias = Settings.model_fields[field].validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else PREFIX + field.upper()


def settings() -> Settings:
    """The settings as the environment gives them now; a bad value is a `CaiError` naming its variable."""
    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0])
        name = _set_variable(field) if field.isupper() else variable(field)
        if first["type"] == "value_error":
            message = first["msg"].removeprefix("Value error, ")
        else:
            message = f"{first['input']!r}: {first['msg']}"
        raise CaiError(f"${name}: {message}") from None


def _set_variable(alias: str) -> str:
    """The variable that was set, of the field whose first variable is `alias` (pydantic names the first)."""
    for field in Settings.model_fields.values():
        choices = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else []
        if alias in choices:
            return next((name for name in choices if os.environ.get(name)), alias)
    return alias
