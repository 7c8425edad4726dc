"""The SL-CAI supervised stage (Bai et al. 2022, §3.1 and §3.3): fine-tune on revisions.

The base model is fine-tuned on (red-team prompt, revised answer) pairs from the critique→
revision traces, mixed with helpfulness samples (the model's own answers to helpfulness prompts)
so that it stays helpful. The paper trains on the revisions of every step, not only the last;
`include_intermediate_revisions` does that, and the default trains on the final revision only.

Training uses TRL's `SFTTrainer` on a conversational prompt-completion dataset, so the loss
covers only the assistant's answer (TRL's completion-only loss), as in the paper where the
model learns the revision given the prompt. Full fine-tuning or LoRA (peft); a LoRA adapter is
merged into the weights before saving, so the checkpoint is a plain causal LM that
`cai_lib.engines.models.load_causal_lm` and every backend can open.

Departures: the paper fine-tuned a pre-trained LM at a learning rate relative to pre-training;
here the learning rate is absolute. Empty answers are left out: they would teach the model to
stop at once.
"""

from __future__ import annotations

import logging
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from cai_lib.core.config import Seed
from cai_lib.core.errors import CaiError
from cai_lib.core.names import SFT_PROVENANCE_FILE
from cai_lib.core.records import Trace
from cai_lib.core.store import ArtifactStore, checkpoint_location
from cai_lib.engines.launch import TrainingJob
from cai_lib.engines.training import TrainingSetup, WorldReport

log = logging.getLogger(__name__)


class SFTStageConfig(TrainingSetup):
    """Settings of the SL-CAI fine-tuning stage (mapped onto TRL's `SFTConfig`)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(
        default=2e-5, gt=0.0, description="Peak learning rate (linear decay). LoRA usually wants ~10x more."
    )
    epochs: float = Field(
        default=1.0, gt=0.0, description="Passes over the mixed dataset (paper: one epoch)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimiser steps; overrides `epochs` when set."
    )
    batch_size: int = Field(default=8, ge=1, description="Examples per device and optimiser step.")
    max_length: int = Field(
        default=1024,
        ge=8,
        description="Tokens per example (prompt + answer); longer ones are cut at the end.",
    )
    include_intermediate_revisions: bool = Field(
        default=False,
        description="Train on the revision of every round, one example each, as the paper did; otherwise only "
        "on the final revision of each trace.",
    )
    helpful_ratio: float = Field(
        default=1.0,
        ge=0.0,
        description="Helpfulness samples per revision example: the mix takes round(helpful_ratio x revision "
        "examples) of them, drawn without repeats by `seed`, or all of them when fewer exist; 0 leaves them "
        "out. (The paper's mix was about 0.37: 2 samples for each of 135k helpfulness prompts against 4 "
        "revisions for each of 183k red-team prompts.)",
    )
    lora: bool = Field(default=False, description="Train a LoRA adapter (merged into the weights at save).")
    lora_r: int = Field(default=16, ge=1, description="LoRA rank (with `lora`).")
    lora_alpha: int = Field(
        default=32, ge=1, description="LoRA scaling numerator; the update is scaled by alpha/r."
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template replacing the base model's own (needed when it has none); the "
        "checkpoint keeps it.",
    )
    seed: Seed = Field(
        default=0, description="Seeds the helpfulness draw, data order and initialisation of LoRA."
    )


class SFTMetrics(BaseModel):
    """What one SFT run did."""

    checkpoint_uri: str = Field(description="Where the trained checkpoint was written.")
    steps: int = Field(description="Optimiser steps taken.")
    examples: int = Field(description="Training examples in the mix.")
    revision_examples: int = Field(description="Of those, (prompt, revision) pairs from SL-CAI traces.")
    helpful_examples: int = Field(description="Of those, helpfulness samples.")
    skipped_empty: int = Field(description="Pairs left out because the answer was empty.")
    train_loss_first: float = Field(description="Training loss at the first logged step.")
    train_loss_last: float = Field(description="Training loss at the last logged step.")
    world: WorldReport = Field(description="Processes, sharding, precision and what each rank trained on.")


def revision_examples(traces: Sequence[Trace], include_intermediate: bool) -> list[dict]:
    """(prompt, revision) chat examples from SL-CAI traces: the final revision of each, or every one.

    Raises `CaiError` for a trace with no rounds (helpfulness samples belong in `helpful`).
    """
    examples = []
    for trace in traces:
        if not trace.rounds:
            raise CaiError(
                f"trace {trace.id}: has no critique→revision rounds; is this a helpfulness-samples dataset? "
                "(pass those with --helpful)"
            )
        answers = [r.revision for r in trace.rounds] if include_intermediate else [trace.final_answer]
        examples += [chat_example(trace.prompt, answer) for answer in answers]
    return examples


def helpful_examples(helpful: Sequence[Trace], n_revision: int, ratio: float, seed: int) -> list[dict]:
    """round(ratio x n_revision) helpfulness samples as chat examples (all when fewer exist), drawn by seed."""
    wanted = round(ratio * n_revision)
    chosen = random.Random(seed).sample(list(helpful), min(wanted, len(helpful)))
    if wanted > len(helpful):
        log.warning(
            "helpful_ratio %.2f asks for %d helpfulness samples; only %d exist", ratio, wanted, len(helpful)
        )
    return [chat_example(t.prompt, t.final_answer) for t in chosen]


def chat_example(prompt: str, answer: str) -> dict:
    """One conversational prompt-completion row, the format TRL's SFTTrainer masks to the answer."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def train_sft(
    traces: list[Trace],
    helpful: list[Trace],
    base_model_ref: str,
    out_uri: str,
    config: SFTStageConfig,
) -> SFTMetrics:
    """Fine-tune `base_model_ref` on the revisions of `traces` mixed with `helpful` samples.

    Writes a safetensors checkpoint with its tokenizer (and `cai_sft.json`: base model,
    constitutions of the traces, config, metrics) to `out_uri`, a directory or `s3://` prefix,
    where an unfinished upload is discarded and a finished checkpoint refused. Raises `CaiError`
    before training for no usable examples, a trace without rounds, or a finished checkpoint at
    `out_uri`.
    """
    if not traces:
        raise CaiError("sft: no SL-CAI traces given; check --data")
    all_revisions = revision_examples(traces, config.include_intermediate_revisions)
    revisions = _with_answer(all_revisions)
    if not revisions:
        raise CaiError("sft: every revision in the data is empty; nothing to train on")
    drawn = helpful_examples(helpful, len(revisions), config.helpful_ratio, config.seed)
    helpfuls = _with_answer(drawn)
    usable = [*revisions, *helpfuls]
    parent, name = checkpoint_location(out_uri)

    import torch

    from cai_lib.engines.models import load_causal_lm
    from cai_lib.engines.training import current_world, log_world, record_rows, save_trained, world_report

    # float32 master weights whatever the checkpoint holds; bf16 is autocast (TrainingSetup).
    model, tokenizer = load_causal_lm(
        base_model_ref, chat_template=config.chat_template, dtype=torch.float32, device="cpu"
    )
    with tempfile.TemporaryDirectory(prefix="cai-sft-") as work:
        trainer = _trainer(model, tokenizer, usable, config, Path(work) / "trainer")
        rows = record_rows(trainer)
        trainer.train()
        world = world_report(trainer, rows, config.batch_size, config.gradient_accumulation_steps)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        metrics = SFTMetrics(
            checkpoint_uri=out_uri,
            steps=trainer.state.global_step,
            examples=len(usable),
            revision_examples=len(revisions),
            helpful_examples=len(helpfuls),
            skipped_empty=len(all_revisions) + len(drawn) - len(usable),
            train_loss_first=losses[0],
            train_loss_last=losses[-1],
            world=world,
        )
        checkpoint = Path(work) / "checkpoint"
        save_trained(trainer, tokenizer, checkpoint)
        if not current_world().is_main:
            return metrics
        log_world(world)
        provenance = {
            "base_model_ref": base_model_ref,
            "constitutions": sorted({f"{t.constitution_ref} {t.constitution_sha256}" for t in traces}),
            "data_model_refs": sorted({t.model_ref for t in [*traces, *helpful]}),
            "config": config.model_dump(),
            "metrics": metrics.model_dump(),
        }
        ArtifactStore.open(checkpoint).write_json(SFT_PROVENANCE_FILE, provenance)
        parent.put_dir(checkpoint, name)
    return metrics


def _with_answer(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["completion"][0]["content"]]


def _trainer(model, tokenizer, rows: list[dict], config: SFTStageConfig, output_dir: Path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from cai_lib.engines.training import common_arguments

    args = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        max_length=config.max_length,
        seed=config.seed,
        data_seed=config.seed,
        **common_arguments(config, lora=config.lora),
    )
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


# The launcher's interface (`cai_lib.engines.launch.TRAINERS`): how a `TrainingJob` of this stage trains.
JOB_CONFIG = SFTStageConfig


def run_job(job: TrainingJob, config: SFTStageConfig) -> SFTMetrics:
    """Train `job` (its datasets read by role) with `config`; the metrics on the main process."""
    return train_sft(job.rows("traces", Trace), job.rows("helpful", Trace), job.model, job.out, config)
