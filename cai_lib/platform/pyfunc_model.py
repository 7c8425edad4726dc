"""Registered checkpoints as MLflow models: a pyfunc flavor over the project's own loaders.

A registered version's source is a folder that MLflow's own tools load as they load any model
(`mlflow.pyfunc.load_model("models:/NAME@champion")`, `mlflow models serve`): the checkpoint's
files and manifest, plus an `MLmodel` file naming this module as the pyfunc loader. A policy's
`predict` answers prompts; a preference model's scores (prompt, response) pairs.

Why a pyfunc over `cai_lib` rather than MLflow's transformers flavor: the transformers flavor
logs a copy of the weights into MLflow's artifact store (it cannot point at a folder that is
already there), it crashes on a checkpoint folder with transformers 5, and a preference model
(a one-logit sequence classifier) is no transformers pipeline task. The pyfunc answers with the
same chat template, decoding and scoring as the pipeline's evaluation, so a served champion
behaves as it was judged. It needs `cai-platform` installed where it loads (the images have it;
`mlflow models serve --env-manager local`).

Where the folder lies (`publish`): `<artifact root>/models/<manifest sha256>/`, outside the
content-addressed stage outputs (`outputs/`, a cache a lifecycle rule may expire) and outside
any run's folder (`runs/`). A version's source cannot change once MLflow made it, and
`models:/` URIs resolve through it, so the copy is made when a version is registered, not when
it is promoted: every version stays loadable whatever expires. The copy is server-side in S3
(hard links on a local disk), keyed by the manifest's hash, so registering the same weights
again copies nothing; the folder is complete once `MLmodel` exists, written last.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_lib.core.errors import CaiError
from cai_lib.core.names import MANIFEST, PM, RL_CAI, SL_CAI
from cai_lib.core.store import ArtifactStore, join_uri
from cai_lib.engines.generation import SamplingParams

MLMODEL = "MLmodel"
MODELS_DIR = "models"
Kind = Literal["policy", "preference_model"]
ROLE_KINDS: dict[str, Kind] = {PM: "preference_model", SL_CAI: "policy", RL_CAI: "policy"}


class ServedModelConfig(BaseModel):
    """The pyfunc flavor's `model_config`: what kind of model the folder holds and how a policy
    decodes by default (each request may override `max_new_tokens` and `temperature`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind = Field(
        description="policy: predict answers prompts; preference_model: predict scores answers."
    )
    max_new_tokens: int = Field(default=256, ge=1, description="Default cap on an answer's tokens.")
    temperature: float = Field(default=0.0, ge=0.0, description="Default temperature; 0 decodes greedily.")
    batch_size: int = Field(default=8, ge=1, description="Prompts or pairs run through the model at once.")


def models_root(artifact_root: str) -> str:
    """Where registered versions' folders lie, beside `outputs/` and `runs/`."""
    return join_uri(artifact_root, MODELS_DIR)


def signature(kind: Kind):
    """The model signature MLflow checks requests against: prompts in, answers out (policy), or
    (prompt, response) pairs in, scores out (preference model)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if kind == "preference_model":
        return ModelSignature(
            inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
            outputs=Schema([ColSpec("double")]),
        )
    defaults = ServedModelConfig(kind=kind)
    return ModelSignature(
        # Unnamed, so a plain list of prompts is a valid request (a named column would need dicts).
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", defaults.max_new_tokens),
                ParamSpec("temperature", "double", defaults.temperature),
            ]
        ),
    )


def write_mlmodel(folder: Path, kind: Kind) -> Path:
    """Write the `MLmodel` file that makes `folder` (a checkpoint) a pyfunc model of `kind`."""
    import mlflow.pyfunc
    from mlflow.models import Model

    model = Model(signature=signature(kind), metadata={"cai_kind": kind})
    mlflow.pyfunc.add_to_model(
        model,
        loader_module=__name__,
        model_config=ServedModelConfig(kind=kind).model_dump(),
    )
    model.save(str(folder / MLMODEL))
    return folder / MLMODEL


def publish(checkpoint_uri: str, artifact_root: str, kind: Kind) -> str:
    """The loadable folder of the checkpoint at `checkpoint_uri`: copied (once, keyed by its
    manifest's sha256) under `models_root(artifact_root)` with an `MLmodel` file. Returns its URI."""
    from cai_lib.core.model_versions import checkpoint_manifest_sha256

    digest = checkpoint_manifest_sha256(checkpoint_uri)
    target = ArtifactStore.open(join_uri(models_root(artifact_root), digest[:32]))
    if target.exists(MLMODEL):
        return target.uri
    target.copy_dir(ArtifactStore.open(checkpoint_uri), "", "")
    with tempfile.TemporaryDirectory(prefix="cai-mlmodel-") as tmp:
        target.put_file(write_mlmodel(Path(tmp), kind), MLMODEL)
    return target.uri


# -- loading (what mlflow.pyfunc.load_model calls) -------------------------------------------------


def _bad_input(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _rows(model_input, columns: Sequence[str]) -> list[dict]:
    """The request as rows holding `columns`: a DataFrame, a list of strings, a list of dicts or a
    dict of lists. Unnamed columns (MLflow passes a plain list as column 0) are taken in order."""
    import pandas as pd

    if isinstance(model_input, str):
        model_input = [model_input]
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if not set(columns) <= set(frame.columns):
        if len(frame.columns) != len(columns):
            raise _bad_input(
                f"expected columns {list(columns)} (or {len(columns)} unnamed), got {list(frame.columns)}"
            )
        frame = frame.set_axis(list(columns), axis=1)
    rows = frame[list(columns)].to_dict(orient="records")
    for i, row in enumerate(rows):
        bad = [c for c in columns if not isinstance(row[c], str)]
        if bad:
            raise _bad_input(f"row {i}: {', '.join(bad)} must be a string, got {row!r}")
    return rows


class PolicyModel:
    """A policy as MLflow serves it: `predict` returns one answer per prompt."""

    def __init__(self, folder: str, config: ServedModelConfig):
        from cai_lib.engines.transformers_backend import TransformersBackend

        self.config = config
        self.backend = TransformersBackend(folder, batch_size=config.batch_size, keep_history=False)

    def predict(self, model_input, params: dict | None = None) -> list[str]:
        from cai_lib.method.preference_model import conversation_of

        params = params or {}
        sampling = SamplingParams(
            max_new_tokens=int(params.get("max_new_tokens", self.config.max_new_tokens)),
            temperature=float(params.get("temperature", self.config.temperature)),
        )
        prompts = [row["prompt"] for row in _rows(model_input, ["prompt"])]
        return self.backend.generate([conversation_of(p) for p in prompts], sampling)


class PreferenceModelScorer:
    """A preference model as MLflow serves it: `predict` returns one score per (prompt, response)."""

    def __init__(self, folder: str, config: ServedModelConfig):
        from cai_lib.method.preference_model import RewardScorer

        self.scorer = RewardScorer.load(folder, batch_size=config.batch_size)

    def predict(self, model_input, params: dict | None = None) -> list[float]:
        rows = _rows(model_input, ["prompt", "response"])
        return self.scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])


def check_registered(folder: Path) -> None:
    """Refuse a downloaded folder unless every file matches its manifest and the manifest is the
    one registered for a version of the platform's (`registered_with_sha256`), in the registry
    MLflow loaded it from (`mlflow.get_registry_uri()`). MLflow hands the loader a folder, not
    the version, so the manifest's sha256 is what names the version."""
    import mlflow

    from cai_lib.core.model_versions import registered_with_sha256
    from cai_lib.core.store import verify_dir

    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CaiError(f"{folder}: not a cai checkpoint (no {MANIFEST})")
    raw = manifest.read_bytes()
    verify_dir(folder, json.loads(raw), str(folder))
    registry = mlflow.get_registry_uri()
    if registry.startswith("sqlite:///") and not Path(registry.removeprefix("sqlite:///").split("?")[0]).is_file():
        raise CaiError(
            f"{folder}: no registry to check it against ({registry} does not exist); set MLFLOW_TRACKING_URI "
            "to the registry that holds it"
        )
    registered_with_sha256(registry, hashlib.sha256(raw).hexdigest(), str(folder))


def _load_pyfunc(path: str, model_config: dict | None = None):
    """MLflow's entry point: the model in the downloaded folder `path`, once `check_registered`
    has passed it."""
    check_registered(Path(path))
    config = ServedModelConfig.model_validate(model_config or {"kind": "policy"})
    if config.kind == "preference_model":
        return PreferenceModelScorer(path, config)
    return PolicyModel(path, config)
