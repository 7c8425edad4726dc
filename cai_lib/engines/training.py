"""How a training stage uses its pod: processes, sharding, precision, and what each rank did.

Every training stage (SFT, the preference model, RL) takes these settings beside its own, and
turns them into Hugging Face `TrainingArguments` fields with `trainer_arguments`. The stages run
under `torchrun` (`cai_lib.engines.launch`) when more than one process trains, with one process per
accelerator; the Trainer (through accelerate) then splits each batch's rows across the ranks and
averages gradients, so the effective batch is per-device batch × accumulation × processes.

Sharding: on accelerators, full fine-tuning shards parameters, gradients and optimiser state with
FSDP (version 2, a full state dict gathered for saving); LoRA replicates the frozen base and
trains the adapters with DDP, which is simpler and as fast when the base fits. On CPU, accelerate
runs DDP whatever is asked (its FSDP support covers accelerators only), so CPU runs with
`--processes N` exercise the distributed data path and gradient averaging, not sharding.

Precision: on a GPU with bfloat16 the default is bf16 autocast over float32 master weights (the
model is loaded in float32 and the optimiser steps float32 weights), so that small updates are
not rounded away as they are when the weights themselves are bf16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cai_lib.core.errors import CaiError
from cai_lib.core.names import TRAINING_ARGS_FILE

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp32"]
Sharding = Literal["auto", "fsdp", "ddp"]
Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "adamw_8bit", "sgd"]


class TrainingSetup(BaseModel):
    """The hardware side of a training stage: processes, sharding, precision, memory savers.

    Stage configs inherit these fields, so each appears in the run config under the stage's
    section and as a `cai stage` flag.
    """

    model_config = ConfigDict(extra="forbid")

    processes: int = Field(
        default=0,
        ge=0,
        description="Training processes in the pod (torchrun, one per accelerator); 0 means one per visible "
        "GPU, or 1 on a CPU. More than 1 on a CPU runs that many gloo processes.",
    )
    precision: Precision = Field(
        default="auto",
        description="bf16: bfloat16 autocast over float32 master weights; fp32: float32 throughout; auto: bf16 "
        "on a GPU that supports it, else fp32.",
    )
    sharding: Sharding = Field(
        default="auto",
        description="With more than one process: fsdp shards weights, gradients and optimiser state (full "
        "fine-tuning on accelerators); ddp replicates the model; auto picks fsdp for full fine-tuning on "
        "GPUs and ddp for LoRA and on CPUs.",
    )
    optimizer: Optimizer = Field(
        default="adamw_torch",
        description="Optimiser (Hugging Face `optim` names): adamw_torch_fused is faster on GPUs, adafactor "
        "and adamw_8bit (bitsandbytes) keep less state.",
    )
    activation_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, ~20% slower.",
    )
    gradient_accumulation_steps: int = Field(
        default=1,
        ge=1,
        description="Steps whose gradients are summed before one optimiser update; the effective batch is "
        "batch_size x gradient_accumulation_steps x processes.",
    )
    use_cpu: bool = Field(default=False, description="Train on the CPU even when a GPU is visible.")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (torchrun's environment)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """The world torchrun (or a TrainJob's node) set up; a single process when it set none."""
    return World(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def process_count(setup: TrainingSetup, gpus: int) -> int:
    """How many processes to start for `setup` in a pod that sees `gpus` GPUs.

    Raises `CaiError` when more processes are asked for than there are GPUs (on a GPU pod).
    """
    if setup.use_cpu or gpus == 0:
        return setup.processes or 1
    if setup.processes > gpus:
        raise CaiError(
            f"processes {setup.processes}: the pod sees {gpus} GPU(s); ask for at most {gpus}, or 0 for one per GPU"
        )
    return setup.processes or gpus


def device_of(world: World, use_cpu: bool = False) -> str:
    """The device this rank computes on: its own GPU (by local rank) or the CPU."""
    import torch

    if use_cpu or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{world.local_rank}"


def inference_dtype(device: str):
    """The dtype to score or generate with on `device`: bf16 on a GPU that has it (checkpoints hold
    float32 master weights, twice what inference needs), float32 elsewhere."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolved_sharding(setup: TrainingSetup, lora: bool, on_gpu: bool) -> Literal["fsdp", "ddp"]:
    """The sharding a run gets: `setup.sharding`, or for auto fsdp for full fine-tuning on GPUs,
    ddp otherwise. Raises `CaiError` for FSDP with LoRA (the adapters are small; use ddp)."""
    if setup.sharding == "fsdp" and lora:
        raise CaiError("sharding fsdp with lora: LoRA trains with ddp here (the frozen base is replicated)")
    if setup.sharding != "auto":
        return setup.sharding
    return "fsdp" if on_gpu and not lora else "ddp"


def uses_bf16(setup: TrainingSetup, on_gpu: bool, bf16_supported: bool) -> bool:
    """Whether the run trains in bf16 autocast. Raises `CaiError` for bf16 where it cannot run."""
    if setup.precision == "bf16" and not (on_gpu and bf16_supported):
        raise CaiError("precision bf16: needs a GPU with bfloat16 support; use fp32 or auto here")
    return setup.precision == "bf16" or (setup.precision == "auto" and on_gpu and bf16_supported)


def trainer_arguments(
    setup: TrainingSetup, world: World, lora: bool, on_gpu: bool, bf16_supported: bool
) -> dict:
    """The `TrainingArguments` fields `setup` decides, for this world and hardware."""
    sharded = world.size > 1 and resolved_sharding(setup, lora, on_gpu) == "fsdp" and on_gpu
    arguments = {
        "use_cpu": setup.use_cpu or not on_gpu,
        "bf16": uses_bf16(setup, on_gpu, bf16_supported),
        "optim": setup.optimizer,
        # Under FSDP, activation checkpointing is FSDP's own (transformers refuses both).
        "gradient_checkpointing": setup.activation_checkpointing and not sharded,
        # Every parameter gets a gradient in these models; looking for unused ones costs a graph walk.
        "ddp_find_unused_parameters": False,
    }
    if sharded:
        arguments["fsdp"] = True
        arguments["fsdp_config"] = {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": setup.activation_checkpointing,
        }
    return arguments


def common_arguments(setup: TrainingSetup, lora: bool = False) -> dict:
    """The `TrainingArguments` fields every training stage shares: `trainer_arguments` for this
    process's world and hardware, gradient accumulation, a log entry per step, and no Trainer
    checkpoints or trackers (the stage saves its own checkpoint and the pipeline records it)."""
    import torch

    on_gpu = torch.cuda.is_available() and not setup.use_cpu
    return {
        **trainer_arguments(setup, current_world(), lora, on_gpu, on_gpu and torch.cuda.is_bf16_supported()),
        "gradient_accumulation_steps": setup.gradient_accumulation_steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
    }


class RankReport(BaseModel):
    """What one training process did."""

    rank: int
    rows: int = Field(description="Training rows this rank's data loader gave it.")
    distinct_rows: int = Field(description="Of those, distinct rows.")
    weights_sha256: str | None = Field(
        description="Digest of the trainable weights this rank ended with (None when FSDP shards them)."
    )


class WorldReport(BaseModel):
    """How a training run was spread over processes, gathered from every rank by rank 0."""

    world_size: int
    sharding: Literal["fsdp", "ddp", "none"]
    bf16: bool
    effective_batch: int = Field(
        description="Rows per optimiser update: per-device batch × accumulation × processes."
    )
    rows_on_several_ranks: int = Field(
        description="Distinct rows that more than one rank trained on (the sampler pads the last batch "
        "with repeats when the rows do not divide evenly)."
    )
    ranks: list[RankReport]


class RowRecorder:
    """Wraps a data collator and remembers a digest of every row it collates on this rank."""

    def __init__(self, collator):
        self.collator = collator
        self.digests: list[str] = []

    def __call__(self, features):
        self.digests += [_row_digest(feature) for feature in features]
        return self.collator(features)


def record_rows(trainer) -> RowRecorder:
    """Put a `RowRecorder` in front of the trainer's collator (before `train()`)."""
    recorder = RowRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    return recorder


def world_report(trainer, recorder: RowRecorder, per_device_rows: int, accumulation: int) -> WorldReport:
    """Every rank's `RankReport`, gathered (a collective: all ranks must call it after training)."""
    world = current_world()
    sharded = trainer.is_fsdp_enabled
    mine = RankReport(
        rank=world.rank,
        rows=len(recorder.digests),
        distinct_rows=len(set(recorder.digests)),
        weights_sha256=None if sharded else _weights_sha256(trainer.accelerator.unwrap_model(trainer.model)),
    )
    gathered = _gather((mine.model_dump(), sorted(set(recorder.digests))), world)
    seen: dict[str, int] = {}
    for _, digests in gathered:
        for digest in digests:
            seen[digest] = seen.get(digest, 0) + 1
    return WorldReport(
        world_size=world.size,
        sharding="none" if world.size == 1 else ("fsdp" if sharded else "ddp"),
        bf16=bool(trainer.args.bf16),
        effective_batch=per_device_rows * accumulation * world.size,
        rows_on_several_ranks=sum(count > 1 for count in seen.values()),
        ranks=[RankReport.model_validate(report) for report, _ in gathered],
    )


def save_trained(trainer, tokenizer, directory: Path) -> None:
    """Save the trained model and tokenizer as a plain checkpoint in `directory`, on the main
    process only. Every rank must call it: under FSDP, gathering the full weights is a collective.
    A LoRA model is merged into its base weights first (DDP keeps the whole model on every rank)."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(model, PeftModel):
        if trainer.is_world_process_zero():
            model.merge_and_unload().save_pretrained(directory)
    else:
        trainer.save_model(str(directory))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(directory)
        # The Trainer pickles its arguments beside the weights; loading never needs them, and we ship no pickles.
        (directory / TRAINING_ARGS_FILE).unlink(missing_ok=True)


def log_world(report: WorldReport) -> None:
    log.info(
        "trained on %d process(es), %s, bf16 %s, effective batch %d",
        report.world_size,
        report.sharding,
        report.bf16,
        report.effective_batch,
    )


def _gather(value, world: World) -> list:
    if world.size == 1:
        return [value]
    import torch.distributed as dist

    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, value)
    return gathered


def _weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _row_digest(feature) -> str:
    text = json.dumps(
        feature, sort_keys=True, default=lambda value: getattr(value, "tolist", lambda: str(value))()
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]
