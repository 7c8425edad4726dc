"""What a run trains, as one fingerprint: the change `cai retrain` looks for.

What a run trains is fingerprinted (`fingerprint`): the constitution's sha256, the sha256 of the
run config's training parameters (`run_config_sha256`: every `params` field except the names
`constitution`, `run_name`, `experiment`, `model_name_prefix` and `compare_against`; the
constitution is hashed by content, the others only name things) and the pinned images `deploy.image_cpu` / `image_gpu`.
"""

from __future__ import annotations

import json

from cai_lib.core.constitution import Constitution
from cai_lib.core.names import canonical_sha256
from cai_lib.platform.run_config import PipelineParams, RunConfig

# Params that name things rather than change what is trained: the constitution is fingerprinted by
# its content, and a new model_name_prefix is another registered model (another champion).
NAMING_PARAMS = ("constitution", "run_name", "experiment", "model_name_prefix", "compare_against")


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
    return canonical_sha256(training_params(params))


def fingerprint(constitution: Constitution, config: RunConfig) -> str:
    """sha256 of what a run for `constitution` with `config` trains: constitution content,
    training parameters and pinned images."""
    parts = {
        "constitution_sha256": constitution.sha256,
        "run_config_sha256": run_config_sha256(config.params),
        "image_cpu": config.deploy.image_cpu,
        "image_gpu": config.deploy.image_gpu,
    }
    return canonical_sha256(parts)
