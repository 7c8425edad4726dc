"""The run config: one pydantic model that is the whole experiment.

The same fields are seen by the CLI (`cai run --config FILE --set key=value`), by `kfp.local`, by
the compiled pipeline (each top-level field of `PipelineParams` is one pipeline parameter, nested
stage sections are `dict` parameters) and by MLflow (logged as params of the parent run).
Deployment settings that cannot change per run (images, resource profiles, secrets) live in
`DeployConfig` and are applied when the pipeline is compiled; where the installation keeps its
artifacts and its MLflow server (`Platform`) reach each step through its environment.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cai_lib.constitution import Constitution
from cai_lib.critique_revise import CritiqueReviseConfig, HelpfulSamplesConfig
from cai_lib.errors import CaiError
from cai_lib.evaluate import EvaluationConfig
from cai_lib.feedback import FeedbackConfig
from cai_lib.pairs import SamplePairsConfig
from cai_lib.preference_model import PreferenceModelConfig
from cai_lib.registry import PromotionGate
from cai_lib.rl import RLConfig
from cai_lib.sft import SFTStageConfig
from cai_lib.stage_table import GPU_STAGES, NAMES

ARTIFACT_ROOT_ENV = "CAI_ARTIFACT_ROOT"
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
    "CAI_CONSTITUTION_REGISTRY",
    "CAI_KFP_UI_URL",
    "CAI_MLFLOW_UI_URL",
    "CAI_SERVING_NAMESPACE",
    "CAI_SERVING_MODELS",
)
# The stages that train, and their section of the run parameters: they can run under torchrun and
# as multi-node TrainJobs.
TRAINING_STAGES = {"sft": "sft", "train_pm": "preference_model", "rl": "rl"}

# Names that end up in MLflow search filters, registered model names and Kubernetes objects: no
# quotes, no path separators, no "..".
RUN_NAME = r"^([A-Za-z0-9][A-Za-z0-9 ._:-]*)?$"
MODEL_PREFIX = r"^[a-z][a-z0-9-]*$"


# The sections with a seed of their own.
SEEDED_SECTIONS = (
    "critique_revise",
    "helpful_samples",
    "sft",
    "pairs",
    "feedback",
    "preference_model",
    "rl",
    "evaluation",
)


def stage_seed(run_seed: int, section: str) -> int:
    """The seed a section derives from the run's seed when it pins none: a stable hash of both."""
    digest = hashlib.sha256(f"{run_seed}\0{section}".encode()).hexdigest()
    return int(digest[:8], 16) % 2**31


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineParams(Strict):
    """Everything a run can vary. Each field is one Kubeflow pipeline parameter."""

    constitution: str = Field(
        default="harmless",
        description="Constitution ref: name, name@version, s3:// or file URI, or inline YAML.",
    )
    base_model: str = Field(
        default="smollm2-135m-instruct", description="Model ref of the helpful base policy."
    )
    feedback_model: str = Field(
        default="smollm2-135m-instruct", description="Model ref of the AI feedback model that labels pairs."
    )
    judge_model: str = Field(
        default="smollm2-135m-instruct",
        description="Model ref of the judge of the evaluation (win rates, Elo, evasiveness, the promotion gate). "
        "Give a model other than feedback_model: when they are the same, the report and the MLflow run say the "
        "evaluation is not independent of the training labels.",
    )
    red_team_prompts: str = Field(default="builtin:red_team", description="Source of red-team prompts.")
    helpful_prompts: str = Field(default="builtin:helpful", description="Source of helpfulness prompts.")
    human_preferences: str = Field(
        default="",
        description="hh-rlhf-format source of human-labelled pairs mixed into PM training ('' for none). The "
        "paper's premise: human helpfulness comparisons (e.g. hh-rlhf helpful-base), with harmlessness "
        "labelled by AI.",
    )
    human_preference_kind: Literal["helpfulness", "harmlessness"] = Field(
        default="helpfulness",
        description="What the human pairs compare, recorded in each model's lineage. helpfulness follows the "
        "paper; harmlessness (e.g. hh-rlhf harmless-base) is the ablation that adds human harm labels.",
    )
    num_red_team: int = Field(default=64, ge=1, description="Red-team prompts used (before the eval split).")
    num_helpful: int = Field(
        default=64, ge=1, description="Helpfulness prompts used (before the eval split)."
    )
    num_human: int = Field(default=256, ge=0, description="Human-labelled pairs read from human_preferences.")
    eval_fraction: float = Field(
        default=0.25, gt=0.0, lt=1.0, description="Share of prompts held out for evaluation."
    )
    seed: int = Field(
        default=0,
        description="The run's seed: it splits the prompts and derives the seed of every stage section that "
        "does not pin its own (from this seed and the section's name), so one number reruns or varies the "
        "whole method.",
    )
    num_shards: int = Field(
        default=0,
        ge=0,
        le=512,
        description="Tasks each generation stage fans out to (dsl.ParallelFor; critique-revise, helpful "
        "samples, pair sampling, labelling), each on its own GPU; 0 derives it from rows_per_shard. "
        "Evaluation's answers fan out by the same rule over the held-out prompts, never to a task without one.",
    )
    rows_per_shard: int = Field(
        default=1000,
        ge=1,
        description="Red-team training prompts per generation task when num_shards is 0: the shard count "
        "is the prompts divided by this, rounded up.",
    )
    run_name: str = Field(
        default="",
        max_length=100,
        pattern=RUN_NAME,
        description="Display name of the MLflow parent run; '' takes the KFP run name. Letters, digits, "
        "spaces and . _ - : only. Runs are identified by their KFP run id, not by this name; an interrupted "
        "run resumes by running it again, since every stage output is found by its content key.",
    )
    experiment: str = Field(default="constitutional-ai", description="MLflow experiment name.")
    model_name_prefix: str = Field(
        default="cai",
        max_length=40,
        pattern=MODEL_PREFIX,
        description="Registered model names are <prefix>-<constitution>-{pm,sl-cai,rl-cai}: lowercase "
        "letters, digits and '-', starting with a letter.",
    )

    @model_validator(mode="after")
    def _derive_stage_seeds(self) -> PipelineParams:
        # A section's seed set explicitly (in YAML, --set or a pipeline parameter) is pinned; one left
        # out derives from the run's seed. It stays "not set", so a dump for the pipeline's
        # parameters leaves it out and a new run seed derives it again.
        for name in SEEDED_SECTIONS:
            section = getattr(self, name)
            if "seed" not in section.model_fields_set:
                section.seed = stage_seed(self.seed, name)
                section.model_fields_set.discard("seed")
        return self

    @field_validator("run_name")
    @classmethod
    def _no_dot_dot(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("must not contain '..'")
        return value

    critique_revise: CritiqueReviseConfig = Field(default_factory=CritiqueReviseConfig)
    helpful_samples: HelpfulSamplesConfig = Field(default_factory=HelpfulSamplesConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    pairs: SamplePairsConfig = Field(default_factory=SamplePairsConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    preference_model: PreferenceModelConfig = Field(default_factory=PreferenceModelConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    promotion: PromotionGate = Field(default_factory=PromotionGate)

    def shard_count(self, prompts: int) -> int:
        """Tasks per generation stage for `prompts` red-team training prompts: `num_shards` when
        set, else one per `rows_per_shard` prompts (at least one)."""
        return self.num_shards or max(1, -(-prompts // self.rows_per_shard))

    def eval_shard_count(self, red_team: int, helpful: int) -> int:
        """Tasks of evaluation's generation over `red_team` and `helpful` held-out prompts: the
        generation stages' rule for that many prompts, but never a shard that would get none (a
        shard takes every n-th prompt of each set), since each starts a GPU pod for nothing."""
        return max(1, min(self.shard_count(red_team + helpful), max(red_team, helpful)))

    def labelling_settings(self, constitution: Constitution) -> FeedbackConfig:
        """The feedback settings the label stage uses: `feedback`, with the evaluation judge's
        principles held out of the label pool unless `evaluation.hold_out_judge_principles` is off."""
        from cai_lib.evaluate import judging_principles

        if not self.evaluation.hold_out_judge_principles:
            return self.feedback
        judges = {p.id for p in judging_principles(constitution, self.evaluation).values()}
        held = sorted({*self.feedback.held_out_principles, *judges})
        return self.feedback.model_copy(update={"held_out_principles": held})


class Toleration(Strict):
    """A Kubernetes toleration (the fields kfp-kubernetes accepts)."""

    key: str = Field(min_length=1)
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @model_validator(mode="after")
    def _value_matches_operator(self) -> Toleration:
        if self.operator == "Equal" and not self.value:
            raise ValueError(f"toleration '{self.key}': operator Equal needs a value")
        if self.operator == "Exists" and self.value:
            raise ValueError(f"toleration '{self.key}': operator Exists takes no value")
        return self


class ResourceProfile(Strict):
    """What one stage's pod asks for and where it may run."""

    accelerator_type: str | None = Field(
        default=None, description="e.g. nvidia.com/gpu; None for a CPU stage."
    )
    accelerator_count: int = Field(default=0, ge=0, description="GPUs per pod.")
    cpu_request: str | None = Field(default=None, description="e.g. '4'.")
    cpu_limit: str | None = None
    memory_request: str | None = Field(default=None, description="e.g. '32Gi'.")
    memory_limit: str | None = None
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a GPU pod must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints of GPU nodes to tolerate."
    )
    shm_size: str | None = Field(
        default=None,
        description="Size of a memory-backed /dev/shm for a GPU stage's pod (and each TrainJob node), e.g. "
        "'16Gi': NCCL and data loaders share memory through it, and a container's own is 64 MiB. It counts "
        "against the pod's memory. None: no mount.",
    )
    num_nodes: int = Field(
        default=1,
        ge=1,
        description="Nodes to train on (training stages only). More than 1 runs the stage as a Kubeflow "
        "Trainer TrainJob of that many nodes, each with this profile's accelerators, cpu and memory; the "
        "step's own pod then only launches and watches it.",
    )
    deadline_seconds: int = Field(
        default=7 * 24 * 3600, ge=60, description="A multi-node TrainJob's activeDeadlineSeconds."
    )
    schedule_timeout_seconds: int = Field(
        default=1800,
        ge=1,
        description="How long a multi-node TrainJob's nodes may take to be all running before the step "
        "deletes it and fails.",
    )

    @property
    def wants_gpu(self) -> bool:
        return self.accelerator_count > 0 or bool(self.accelerator_type)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourceProfile:
        # Kubernetes refuses a pod whose request exceeds its limit; say so before a run starts.
        from kubernetes.utils import parse_quantity

        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if request and limit and parse_quantity(request) > parse_quantity(limit):
                raise ValueError(f"{kind}_request {request} is more than {kind}_limit {limit}")
        return self


def default_gpu_profile() -> ResourceProfile:
    return ResourceProfile(
        accelerator_type="nvidia.com/gpu",
        accelerator_count=1,
        cpu_request="4",
        memory_request="32Gi",
        memory_limit="64Gi",
        node_selector={"nvidia.com/gpu.present": "true"},
        tolerations=[Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        shm_size="16Gi",
    )


class SecretRefs(Strict):
    """Kubernetes secrets whose keys become the steps' environment (never pipeline parameters)."""

    s3_secret: str = Field(
        default="cai-s3", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
    )
    s3_keys: dict[str, str] = Field(
        default_factory=lambda: {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        },
        description="secret key -> env var.",
    )
    mlflow_secret: str = Field(default="cai-mlflow", description="Secret with MLflow credentials/URI.")
    mlflow_keys: dict[str, str] = Field(
        default_factory=lambda: {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
        },
        description="secret key -> env var.",
    )
    hf_secret: str = Field(
        default="cai-hf",
        description="Optional Secret with a Hugging Face token (HF_TOKEN) for gated or private models; every "
        "step may download a model, so every step reads it when it exists.",
    )
    hf_keys: dict[str, str] = Field(
        default_factory=lambda: {"HF_TOKEN": "HF_TOKEN"}, description="secret key -> env var."
    )
    env_configmap: str = Field(
        default="cai-env",
        description="ConfigMap of the installation's settings, passed to every step as environment: "
        f"{', '.join(PLATFORM_ENV)} (not secret; the Helm chart writes it).",
    )


class DeployConfig(Strict):
    """Compile-time settings: images, per-stage resources, secret references."""

    image_cpu: str = Field(
        default="ghcr.io/cai-platform/cai:0.1.0", description="Image of CPU stages (CAI_IMAGE_CPU)."
    )
    image_gpu: str = Field(
        default="ghcr.io/cai-platform/cai-gpu:0.1.0", description="Image of GPU stages (CAI_IMAGE_GPU)."
    )
    resources: dict[str, ResourceProfile] = Field(
        default_factory=lambda: {stage: default_gpu_profile() for stage in GPU_STAGES},
        description="Per-stage profile; stages not listed get no requests.",
    )
    constitution_registry: str = Field(
        default="",
        description="s3:// prefix of the constitution registry; the resolve step looks name@version up there "
        "before the copies bundled in the image (CAI_CONSTITUTION_REGISTRY). '' for bundled only.",
    )
    shard_parallelism: int = Field(
        default=0,
        ge=0,
        description="Critique-revision shards that run at once (0: all). On one CPU, 1 avoids processes "
        "fighting over the same cores.",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="KFP retries of every step (30 s backoff). A retry loses no work: generation and "
        "labelling resume from their finished shards, and a complete output of any stage is reused.",
    )
    secrets: SecretRefs = Field(default_factory=SecretRefs)

    @model_validator(mode="after")
    def _gpu_only_on_gpu_stages(self) -> DeployConfig:
        for stage, profile in self.resources.items():
            if stage not in NAMES:
                raise ValueError(f"resources.{stage}: unknown stage; stages are {', '.join(NAMES)}")
            if profile.wants_gpu and stage not in GPU_STAGES:
                raise ValueError(f"resources.{stage}: asks for a GPU but {stage} is a CPU-only stage")
            if profile.wants_gpu and not (profile.accelerator_type and profile.accelerator_count):
                raise ValueError(
                    f"resources.{stage}: a GPU profile needs both accelerator_type and accelerator_count"
                )
            if profile.num_nodes > 1 and stage not in TRAINING_STAGES:
                raise ValueError(
                    f"resources.{stage}: num_nodes {profile.num_nodes}, but only the training stages "
                    f"({', '.join(TRAINING_STAGES)}) run on several nodes"
                )
            if profile.num_nodes > 1 and not profile.wants_gpu:
                raise ValueError(f"resources.{stage}: num_nodes {profile.num_nodes} needs GPUs on each node")
        return self


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
        missing = [name for name in (ARTIFACT_ROOT_ENV, TRACKING_URI_ENV) if not os.environ.get(name)]
        if missing:
            raise CaiError(
                f"{' and '.join(missing)} not set: pipeline steps read the artifact root and the MLflow tracking "
                "URI from the environment (the Helm chart's ConfigMap cai-env sets both; `cai run` sets them "
                "for local runs)"
            )
        return cls(artifact_root=os.environ[ARTIFACT_ROOT_ENV], tracking_uri=os.environ[TRACKING_URI_ENV])


class RunConfig(Strict):
    """The whole experiment: run parameters plus deployment settings."""

    params: PipelineParams = Field(default_factory=PipelineParams)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="after")
    def _processes_fit_the_profiles(self) -> RunConfig:
        for stage, section in TRAINING_STAGES.items():
            profile = self.deploy.resources.get(stage)
            processes = getattr(self.params, section).processes
            if profile and profile.wants_gpu and processes > profile.accelerator_count:
                raise ValueError(
                    f"params.{section}.processes {processes}: more than the {profile.accelerator_count} "
                    f"accelerator(s) per pod of resources.{stage}"
                )
        return self


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
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CaiError(
            f"--set {item!r}: the value is not valid YAML ({problem}); quote it, e.g. key='a: b'"
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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise CaiError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise CaiError(f"{path}: YAML error: {str(err).splitlines()[0]}") from None
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


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config YAML (or the defaults) and apply `key=value` overrides; validate it all.

    A file may build on another (`base: FILE`, see `read_config_file`). A top-level key that is a `params` field may be given without the `params.` prefix.
    Unknown keys and bad values raise `CaiError` naming the file and the field.
    """
    data = read_config_file(Path(path)) if path else {}
    where = str(path) if path else "defaults"
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in RunConfig.model_fields:
            keys = ["params", *keys]
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CaiError(f"--set {item}: '{key}' is not a section")
        node[keys[-1]] = value
        where = f"{where} with --set" if "--set" not in where else where
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise CaiError(format_validation_error(err, where)) from None


def params_as_pipeline_arguments(params: PipelineParams) -> dict:
    """The pipeline's arguments: scalars as they are, sections as plain dicts (JSON-safe).

    Unset (None) section fields are left out: KFP's struct parameters cannot hold null, and
    validation gives them back their None default. Derived stage seeds are left out too, so that
    a run started with another `seed` derives them again.
    """
    arguments = json.loads(params.model_dump_json(exclude_none=True))
    for name in SEEDED_SECTIONS:
        if "seed" not in getattr(params, name).model_fields_set:
            arguments[name].pop("seed")
    return arguments
