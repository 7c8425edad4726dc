"""Deployment settings that cannot change per run: images, per-stage resource profiles (GPUs,
node selectors, tolerations, nodes), the Kubernetes secrets that carry credentials. Applied when
the pipeline is compiled (`pipelines/`), and by the TrainJob builder."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cai_lib.core.config import PLATFORM_ENV, Strict
from cai_lib.core.settings import variable
from cai_lib.core.stage_table import GPU_STAGES, NAMES, TRAINING_STAGES, canonical


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
    promoter_secret: str = Field(
        default="cai-mlflow-promoter",
        description="Secret with the promoter's MLflow credentials, the one identity that writes production "
        "models; given only to the register step and the exit handler (optional: without it they promote as "
        "the pipeline's identity, which an authenticated MLflow refuses).",
    )
    promoter_keys: dict[str, str] = Field(
        default_factory=lambda: {
            "MLFLOW_TRACKING_USERNAME": variable("promoter_tracking_username"),
            "MLFLOW_TRACKING_PASSWORD": variable("promoter_tracking_password"),
        },
        description="secret key -> env var.",
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

    @field_validator("resources", mode="before")
    @classmethod
    def _stage_names(cls, resources: object) -> object:
        return {canonical(str(k)): v for k, v in resources.items()} if isinstance(resources, dict) else resources

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


