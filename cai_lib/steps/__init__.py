"""The pipeline's steps, one module per stage: what each Kubeflow component (and each `kfp.local`
task) runs. A component calls one function of one of these modules.

Pipelines compiled before the layered layout call `steps.<function>(...)` after
`from cai_lib import steps`; those names still resolve here, with a `DeprecationWarning`, so an
uploaded pipeline version keeps running on a newer image. Each old component body reads one
such name once, before any step module of the same name is imported (a submodule, once
imported, takes the package attribute of its name).
"""

import importlib
import warnings

_MOVED = {
    "resolve": "resolve",
    "prepare_prompts": "prepare_prompts",
    "fan_out": "prepare_prompts",
    "eval_fan_out": "prepare_prompts",
    "critique_revise_shard": "critique_revise",
    "helpful_samples": "helpful_samples",
    "merge": "merge",
    "sft": "sft",
    "sample_pairs": "sample_pairs",
    "label": "label",
    "train_pm": "train_pm",
    "rl": "rl",
    "answer_eval": "answer_eval",
    "evaluate": "evaluate",
    "register": "register",
    "finish": "finish",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = f"{__name__}.{_MOVED[name]}"
    warnings.warn(
        f"cai_lib.steps.{name} moved to {module}.{name}; recompile the pipeline (cai compile)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)
