"""The pipeline's stages, described once.

Each row says what a stage is: its name (the one used in run configs, MLflow, `cai run`'s
summary and the report), the KFP component that runs it, whether it needs a GPU, whether it
resumes from finished shards after a kill, whether its output is content-addressed and reused
across runs, which sections of the constitution it reads, which run-config section holds its
settings, and which `cai_lib` modules implement it. The config (resource profiles), the pipeline
(images, retries, display names), the steps (output keys), the CLI and the tests all read this
table, so a stage is never named in two places.

What a stage's output key covers (`cai_lib.outputs`): the stage, its settings, the source of
the modules named here (`code_version`), the content hashes of its inputs, and only the
constitution sections it reads. Editing one comparison principle therefore changes the keys of
`label` and of everything downstream of it (through their inputs' hashes), and of nothing
upstream.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from cai_lib.errors import CaiError

ConstitutionPart = Literal["critique_revision", "comparison", "evaluation"]

# Modules every generation stage runs through.
GENERATION = ("generation", "transformers_backend", "vllm_backend", "models", "records", "shards")


@dataclass(frozen=True)
class Stage:
    """One pipeline stage."""

    name: str
    component: str  # function of components.stages
    gpu: bool  # runs on an accelerator when a profile gives it one
    resumable: bool  # writes shards; a rerun continues from the last finished one
    reusable: bool  # output is content-addressed: any run with the same key reuses it
    reads: tuple[ConstitutionPart, ...] = ()  # constitution sections in its key
    settings: str | None = None  # the PipelineParams section holding its settings
    modules: tuple[str, ...] = ()  # cai_lib modules whose source is part of its key

    @property
    def display_name(self) -> str:
        return self.name.replace("_", " ")


STAGES: tuple[Stage, ...] = (
    Stage("resolve", "resolve_run", gpu=False, resumable=False, reusable=False),
    Stage("prepare_prompts", "prepare_prompts", gpu=False, resumable=False, reusable=False),
    Stage(
        "critique_revise",
        "critique_revise_shard",
        gpu=True,
        resumable=True,
        reusable=True,
        reads=("critique_revision",),
        settings="critique_revise",
        modules=("critique_revise", *GENERATION),
    ),
    Stage("merge", "merge_traces", gpu=False, resumable=True, reusable=True, modules=("shards",)),
    Stage(
        "helpful_samples",
        "helpful_samples",
        gpu=True,
        resumable=True,
        reusable=True,
        settings="critique_revise",
        modules=("critique_revise", *GENERATION),
    ),
    Stage(
        "sft",
        "sft",
        gpu=True,
        resumable=False,
        reusable=True,
        settings="sft",
        modules=("sft", "models", "records"),
    ),
    Stage(
        "sample_pairs",
        "sample_pairs",
        gpu=True,
        resumable=True,
        reusable=True,
        settings="pairs",
        modules=("pairs", *GENERATION),
    ),
    Stage(
        "label",
        "label",
        gpu=True,
        resumable=True,
        reusable=True,
        reads=("comparison",),
        settings="feedback",
        modules=("feedback", *GENERATION),
    ),
    Stage(
        "train_pm",
        "train_pm",
        gpu=True,
        resumable=False,
        reusable=True,
        settings="preference_model",
        modules=("preference_model", "human_preferences", "prompts", "models", "records"),
    ),
    Stage(
        "rl",
        "rl",
        gpu=True,
        resumable=False,
        reusable=True,
        settings="rl",
        modules=("rl", "preference_model", "models", "records"),
    ),
    Stage(
        "evaluate",
        "evaluate",
        gpu=True,
        resumable=False,
        reusable=True,
        reads=("evaluation",),
        settings="evaluation",
        modules=("evaluate", "feedback", "elo", "report", "preference_model", *GENERATION),
    ),
    Stage("register", "register", gpu=False, resumable=False, reusable=False, settings="promotion"),
)

BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
GPU_STAGES = tuple(s.name for s in STAGES if s.gpu)
CPU_STAGES = tuple(s.name for s in STAGES if not s.gpu)


def stage(name: str) -> Stage:
    """The stage called `name`; `CaiError` naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise CaiError(f"unknown stage '{name}'; stages are {', '.join(NAMES)}") from None


@cache
def code_version(name: str) -> str:
    """sha256 of the package version and the source of the stage's modules: a change to the code
    that makes a stage's output changes its key, and a change elsewhere does not."""
    digest = hashlib.sha256(package_version().encode())
    for module in sorted(stage(name).modules):
        spec = importlib.util.find_spec(f"cai_lib.{module}")
        if spec is None or spec.origin is None:
            raise RuntimeError(
                f"stage table: stage {name} names module cai_lib.{module}, which does not exist"
            )
        digest.update(module.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()


def package_version() -> str:
    """The installed cai-platform version ("unknown" when run from an uninstalled tree)."""
    try:
        return version("cai-platform")
    except PackageNotFoundError:
        return "unknown"
