"""The pipeline's stages, described once.

Each row says what a stage is: its name (the one used in run configs, MLflow, `cai run`'s
summary and the report), the KFP component that runs it, whether it needs a GPU, whether it
resumes from finished shards after a kill, whether its output is content-addressed and reused
across runs, which sections of the constitution it reads, which run-config section holds its
settings, and which `cai_lib` modules implement it. The config (resource profiles), the pipeline
(images, retries, display names), the steps (output keys), the CLI and the tests all read this
table, so a stage is never named in two places.

What a stage's output key covers (`cai_lib.core.outputs`): the stage, its settings, the source of
the modules named here (`code_version`), the content hashes of its inputs, and only the
constitution sections it reads. Editing one comparison principle therefore changes the keys of
`label` and of everything downstream of it (through their inputs' hashes), and of nothing
upstream.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from cai_lib.core.errors import CaiError

ConstitutionPart = Literal["critique_revision", "comparison", "evaluation"]
# A dataset (JSONL shards, resumable), a checkpoint (files and a manifest) or a directory of results.
Output = Literal["dataset", "checkpoint", "directory"]

# Core modules that move bytes, record runs or build keys, and never shape what a stage writes:
# left out of every stage's code hash, so that a change to them does not invalidate stored
# outputs. The layers above the method (platform, steps, cli) cannot be reached from a stage's
# modules at all: the import contract in pyproject.toml forbids it.
INFRASTRUCTURE = frozenset(
    {"core.config", "core.errors", "core.names", "core.outputs", "core.stage_table", "core.store", "core.tracking"}
)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage."""

    name: str
    component: str  # function of components.stages
    gpu: bool  # runs on an accelerator when a profile gives it one
    output: Output | None  # what it writes as a content-addressed output; None: nothing reusable
    reads: tuple[ConstitutionPart, ...] = ()  # constitution sections in its key
    settings: str | None = None  # the PipelineParams section holding its settings
    modules: tuple[str, ...] = ()  # the cai_lib modules that implement it (their imports count too)

    @property
    def display_name(self) -> str:
        return self.name.replace("_", " ")

    @property
    def reusable(self) -> bool:
        """Its output is content-addressed: any run with the same key reuses it."""
        return self.output is not None

    @property
    def resumable(self) -> bool:
        """It writes a dataset shard by shard; a rerun continues from the last finished shard."""
        return self.output == "dataset"


STAGES: tuple[Stage, ...] = (
    Stage("resolve", "resolve_run", gpu=False, output=None),
    Stage("prepare_prompts", "prepare_prompts", gpu=False, output=None),
    Stage(
        "generate_prompts",
        "generate_prompts_shard",
        gpu=True,
        output="dataset",
        settings="generate_prompts",
        modules=("method.generate_prompts",),
    ),
    Stage("merge_candidates", "merge_shards", gpu=False, output="dataset", modules=("core.shards",)),
    Stage(
        "select_prompts",
        "select_prompts",
        gpu=False,
        output="dataset",
        settings="generate_prompts",
        modules=("method.generate_prompts",),
    ),
    Stage(
        "critique_revise",
        "critique_revise_shard",
        gpu=True,
        output="dataset",
        reads=("critique_revision",),
        settings="critique_revise",
        modules=("method.critique_revise",),
    ),
    Stage(
        "helpful_samples",
        "helpful_samples_shard",
        gpu=True,
        output="dataset",
        settings="helpful_samples",
        modules=("method.critique_revise",),
    ),
    Stage("merge_traces", "merge_shards", gpu=False, output="dataset", modules=("core.shards",)),
    Stage("merge_helpful", "merge_shards", gpu=False, output="dataset", modules=("core.shards",)),
    Stage(
        "sft",
        "sft",
        gpu=True,
        output="checkpoint",
        settings="sft",
        modules=("method.sft",),
    ),
    Stage(
        "sample_pairs",
        "sample_pairs_shard",
        gpu=True,
        output="dataset",
        settings="sample_pairs",
        modules=("method.pairs",),
    ),
    Stage(
        "label",
        "label_shard",
        gpu=True,
        output="dataset",
        reads=("comparison",),
        settings="label",
        modules=("method.feedback",),
    ),
    Stage("merge_labels", "merge_shards", gpu=False, output="dataset", modules=("core.shards",)),
    Stage(
        "validate_labels",
        "validate_labels",
        gpu=True,
        output="directory",
        reads=("comparison",),
        settings="validate_labels",
        modules=("method.label_validation",),
    ),
    Stage(
        "train_pm",
        "train_pm",
        gpu=True,
        output="checkpoint",
        settings="train_pm",
        modules=("method.preference_model", "method.human_preferences"),
    ),
    Stage(
        "rl",
        "rl",
        gpu=True,
        output="checkpoint",
        settings="rl",
        modules=("method.rl",),
    ),
    Stage(
        "train_reference_pm",
        "train_reference_pm",
        gpu=True,
        output="checkpoint",
        settings="references",
        modules=("method.references", "method.preference_model", "method.human_preferences"),
    ),
    Stage(
        "rl_reference",
        "rl_reference",
        gpu=True,
        output="checkpoint",
        settings="references",
        modules=("method.references", "method.rl"),
    ),
    Stage(
        "answer_eval",
        "answer_eval_shard",
        gpu=True,
        output="dataset",
        settings="evaluate",
        modules=("method.evaluation.answers",),
    ),
    Stage("merge_answers", "merge_shards", gpu=False, output="dataset", modules=("core.shards",)),
    Stage(
        "evaluate",
        "evaluate",
        gpu=True,
        output="directory",
        reads=("evaluation",),
        settings="evaluate",
        modules=("method.evaluation.evaluate",),
    ),
    # Runs in every run, loading the judge only when compare_against names a run: nothing to reuse.
    Stage("compare", "compare_runs", gpu=True, output=None),
    Stage("register", "register", gpu=False, output=None, settings="promotion"),
)

BY_NAME = {stage.name: stage for stage in STAGES}
NAMES = tuple(BY_NAME)
GPU_STAGES = tuple(s.name for s in STAGES if s.gpu)
# The stages that train: they can run under torchrun and as multi-node TrainJobs.
TRAINING_STAGES = ("sft", "train_pm", "rl")



def stage(name: str) -> Stage:
    """The stage called `name` (see `canonical`); `CaiError` naming the known ones otherwise."""
    try:
        return BY_NAME[canonical(name)]
    except KeyError:
        raise CaiError(f"unknown stage '{name}'; stages are {', '.join(NAMES)}") from None


def canonical(name: str) -> str:
    """A stage's name as this table spells it: a user may write `train-pm` or `train_pm` anywhere a
    stage is named (`cai stage`, `--stage`, `--set`, a run config's `resources`), and every output
    shows `train_pm`."""
    return name.replace("-", "_")


@cache
def code_sha256(name: str) -> str:
    """sha256 of the package version and the source of every module stage `name` runs: its own
    modules and, transitively, the `cai_lib` modules they import (at module level or inside a
    function), infrastructure aside. A change to code that shapes a stage's output changes its
    key; a change elsewhere does not. (Not the package version alone, which registered models
    record as their `code_version`.)"""
    digest = hashlib.sha256(package_version().encode())
    for module in sorted(stage_modules(name)):
        digest.update(module.encode() + b"\0" + _source(module).read_bytes())
    return digest.hexdigest()


def stage_modules(name: str) -> set[str]:
    """The `cai_lib` modules (dotted names below `cai_lib.`) stage `name` runs, infrastructure aside."""
    found: set[str] = set()
    todo = list(stage(name).modules)
    while todo:
        module = todo.pop()
        if module in found or module in INFRASTRUCTURE:
            continue
        found.add(module)
        todo += _imports(module)
    return found


def _is_module(module: str) -> bool:
    parent, _, _ = module.rpartition(".")
    if parent and _source(parent).name != "__init__.py":
        return False  # a name defined in module `parent`
    return importlib.util.find_spec(f"cai_lib.{module}") is not None


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(f"cai_lib.{module}")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"stage table: module cai_lib.{module} does not exist")
    return Path(spec.origin)


def _imports(module: str) -> list[str]:
    """The `cai_lib` modules `module` imports anywhere in its source (`from cai_lib.core import
    records` names the module `core.records`; `from cai_lib.core.records import Trace` too)."""
    names = []
    for node in ast.walk(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cai_lib."):
            parent = node.module.removeprefix("cai_lib.")
            for alias in node.names:
                child = f"{parent}.{alias.name}"
                names.append(child if _is_module(child) else parent)
        elif isinstance(node, ast.Import):
            names += [a.name.removeprefix("cai_lib.") for a in node.names if a.name.startswith("cai_lib.")]
    return [n for n in names if _source(n).name != "__init__.py"]


def package_version() -> str:
    """The installed cai-platform version ("unknown" when run from an uninstalled tree)."""
    try:
        return version("cai-platform")
    except PackageNotFoundError:
        return "unknown"
