"""RL-CAI: optimise the SL-CAI policy against the preference model (Bai et al. 2022, §4.1).

The paper trains the SL-CAI model with PPO, using the preference model's score as the reward and
a KL penalty that keeps the policy near the SL-CAI model. TRL no longer ships PPO, so the
default here is RLOO (REINFORCE with a leave-one-out baseline over `num_generations` samples per
prompt), with GRPO as an option; both subtract `beta` × KL(policy ‖ SL-CAI model) — RLOO from the
sequence reward, GRPO in the per-token loss — with the starting checkpoint as the reference.
The prompts are the red-team and helpfulness training prompts, in chat format; the reward of a
completion is the PM's score of the whole conversation (`RewardScorer`).

`algorithm="dpo"` is the cheaper path that Hugging Face's CAI recipe took: DPO on the AI-labelled
pairs themselves (chosen/rejected by the soft label's argmax, ties dropped), with `beta` as DPO's
strength of the pull towards the reference; no PM is consulted during training.

Whatever the algorithm, the mean PM score of greedy answers to the first `eval_prompts` prompts
is measured before and after training, so a run says whether it moved the reward. With
`intermediate_checkpoints` N, the policy is also saved after N evenly spaced steps (under
`steps/STEP/` of the output, each with its own manifest, uploaded before the final checkpoint's),
so that evaluation can rate it over the course of RL as the paper's Figure 8 does.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai_lib.core.config import Seed
from cai_lib.core.conversation import Conversation
from cai_lib.core.errors import CaiError
from cai_lib.core.names import METRICS_FILE, MODEL_CONFIG_FILE
from cai_lib.core.records import Preference, PromptRecord
from cai_lib.core.store import checkpoint_location
from cai_lib.engines.attention import grouped_sdpa_init_kwargs
from cai_lib.engines.generation import EngineConfig, engine_kwargs
from cai_lib.engines.launch import TrainingJob
from cai_lib.engines.training import TrainingSetup, WorldReport
from cai_lib.method.preference_model import RewardScorer, conversation_of

Algorithm = Literal["rloo", "grpo", "dpo"]


class RLConfig(TrainingSetup):
    """How to run RL-CAI."""

    algorithm: Algorithm = Field(
        default="rloo", description="rloo (default) or grpo against the PM; dpo on the AI-labelled pairs."
    )
    learning_rate: float = Field(
        default=1e-6, gt=0.0, description="Peak AdamW learning rate (linear decay to 0)."
    )
    steps: int = Field(default=100, ge=1, description="Optimiser updates.")
    batch_size: int = Field(
        default=4,
        ge=1,
        description="Prompts per device and step for rloo/grpo (each sampled num_generations "
        "times); preference pairs per device and step for dpo.",
    )
    num_generations: int = Field(
        default=4,
        ge=2,
        description="Completions sampled per prompt (rloo/grpo); the baseline of each is the "
        "mean reward of the others, so at least 2.",
    )
    max_new_tokens: int = Field(default=128, ge=1, description="Longest sampled completion, in tokens.")
    temperature: float = Field(default=1.0, gt=0.0, description="Sampling temperature during training.")
    beta: float = Field(
        default=0.05,
        ge=0.0,
        description="KL coefficient: the weight of KL(policy ‖ initial policy) (rloo/grpo), "
        "or DPO's β. 0 drops the reference model (rloo/grpo).",
    )
    max_length: int = Field(
        default=1024,
        ge=8,
        description="Longest prompt + answer in tokens, for DPO pairs and for the PM's input.",
    )
    seed: Seed = Field(default=0, description="Seed for sampling, shuffling and initialisation.")
    eval_prompts: int = Field(
        default=16,
        ge=0,
        description="How many of the prompts (the first ones) are answered greedily before and "
        "after training to measure the mean PM score; 0 skips the measurement.",
    )
    eval_batch_size: int = Field(
        default=16, ge=1, description="Sequences per batch when scoring and evaluating."
    )
    reward_device: Literal["rank", "cpu"] = Field(
        default="rank",
        description="Where the PM scores completions: rank puts a copy on each training process's own GPU (bf16, "
        "inference only); cpu offloads it to host memory (slower scoring, GPU memory left to the policy). The "
        "reference model always sits with the policy, sharded the same way under FSDP.",
    )
    intermediate_checkpoints: int = Field(
        default=0,
        ge=0,
        description="Policies saved at evenly spaced steps during training, besides the final one, so "
        "that evaluation can rate the policy over the course of RL (the paper's Fig. 8). Each is a full "
        "checkpoint under steps/STEP/ of the output.",
    )
    rollouts: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="What samples the rloo/grpo completions: the policy's own generate, or a vLLM engine "
        "colocated with each training process (TRL's use_vllm, vllm_mode colocate), given the policy's "
        "weights after every step. vllm needs a GPU and the [gpu] extra.",
    )
    engine: EngineConfig = Field(
        default_factory=lambda: EngineConfig(gpu_memory_utilization=0.3),
        description="Sizing of the colocated vLLM engine (rollouts vllm): tensor_parallel_size (0 means 1: "
        "one engine per training process), gpu_memory_utilization (the share left beside training; TRL's "
        "default 0.3) and max_model_len. dtype follows the policy and enforce_eager is TRL's to choose.",
    )

    @model_validator(mode="after")
    def _engine_fits_trl(self) -> RLConfig:
        if self.engine.dtype != "auto" or self.engine.enforce_eager:
            raise ValueError(
                "engine.dtype and engine.enforce_eager cannot be set for TRL's colocated vLLM engine"
            )
        return self

    def checkpoint_steps(self) -> list[int]:
        """The steps (1..steps-1, ascending, distinct) after which an intermediate policy is saved."""
        wanted = {
            round(self.steps * i / (self.intermediate_checkpoints + 1))
            for i in range(1, self.intermediate_checkpoints + 1)
        }
        return sorted(step for step in wanted if 0 < step < self.steps)


class RLMetrics(BaseModel):
    """What RL produced: the reward before and after, the KL to the initial policy, the curves."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Algorithm
    policy_ref: str
    reward_ref: str
    checkpoint_uri: str
    steps: int = Field(description="Optimiser updates run.")
    train_prompts: int
    train_pairs: int
    eval_prompts: int
    mean_reward_before: float | None = Field(description="Mean PM score of greedy answers before training.")
    mean_reward_after: float | None = Field(description="The same, after training.")
    kl: float | None = Field(description="Last logged mean per-token KL to the initial policy (rloo/grpo).")
    loss_curve: list[float] = Field(description="Training loss at each step.")
    reward_curve: list[float] = Field(
        description="Mean PM score of the sampled completions at each step (rloo/grpo)."
    )
    intermediate: dict[int, str] = Field(
        default_factory=dict, description="Step -> URI of the policy saved after that step (Fig. 8)."
    )
    world: WorldReport = Field(description="Processes, sharding, precision and what each rank trained on.")
    config: RLConfig


class PreferenceModelReward:
    """A TRL reward function: the PM's score of each prompt + completion conversation.

    TRL calls it with `prompts` and `completions` as lists of chat messages (conversational
    datasets), plus the dataset's other columns and trainer hooks as keyword arguments.
    """

    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

    def __call__(self, prompts: list[Conversation], completions: list[Conversation], **kwargs) -> list[float]:
        return self.scorer.score_conversations([p + c for p, c in zip(prompts, completions, strict=True)])


def save_at_steps(trainer, steps: Sequence[int], folder: Path, tokenizer):
    """A `TrainerCallback` that saves the policy and tokenizer to `folder/STEP` after each of `steps`
    (written by the main process; every rank takes part, as gathering FSDP shards needs)."""
    from transformers import TrainerCallback

    from cai_lib.engines.training import save_trained

    class SaveAtSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in steps:
                save_trained(trainer, tokenizer, folder / str(state.global_step))

    return SaveAtSteps()


def dpo_pairs(preferences: Sequence[Preference]) -> list[dict]:
    """TRL's conversational preference rows; pairs labelled exactly 0.5 prefer nothing and are dropped."""
    return [
        {
            "prompt": conversation_of(p.prompt),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in preferences
        if p.label != 0.5
    ]


def train_rl(
    policy_ref: str,
    reward_ref: str,
    prompts: Sequence[PromptRecord],
    out_uri: str,
    config: RLConfig | None = None,
    preferences: Sequence[Preference] | None = None,
) -> RLMetrics | None:
    """Optimise `policy_ref` (the SL-CAI model) and save the policy at `out_uri`.

    rloo/grpo sample answers to `prompts` and reward them with the PM at `reward_ref`; dpo
    trains on `preferences` (required then). The checkpoint (safetensors + tokenizer) and
    `metrics.json` are written together; `out_uri` must not hold a finished checkpoint. Input mistakes
    (no prompts, no usable pairs, a reward model that is not a PM) raise `CaiError` before any
    training. Returns the metrics on the main process (rank 0), None on the other ranks.
    """
    from cai_lib.engines.models import load_causal_lm, load_tokenizer, resolve_model
    from cai_lib.engines.training import (
        current_world,
        device_of,
        inference_dtype,
        log_world,
        record_rows,
        save_trained,
        world_report,
    )

    config = config or RLConfig()
    store, key = checkpoint_location(out_uri)
    pairs = dpo_pairs(preferences or []) if config.algorithm == "dpo" else []
    if config.algorithm == "dpo" and not pairs:
        raise CaiError("--algorithm dpo needs --ai-labels with at least one pair whose label is not 0.5")
    if config.algorithm != "dpo" and not prompts:
        raise CaiError(f"--algorithm {config.algorithm} needs at least one training prompt")
    world = current_world()
    reward_device = device_of(world, config.use_cpu or config.reward_device == "cpu")
    scorer = RewardScorer.load(reward_ref, config.eval_batch_size, config.max_length, reward_device)
    policy_path = resolve_model(policy_ref)
    tokenizer = load_tokenizer(policy_path, policy_ref)
    eval_conversations = (
        [conversation_of(p.prompt) for p in prompts[: config.eval_prompts]] if world.is_main else []
    )

    with tempfile.TemporaryDirectory(prefix="cai-rl-") as scratch:
        trainer = _trainer(config, policy_path, tokenizer, scorer, prompts, pairs, Path(scratch) / "trainer")
        saved = Path(scratch) / "steps"
        trainer.add_callback(save_at_steps(trainer, config.checkpoint_steps(), saved, tokenizer))
        before = _mean_reward(trainer.model, tokenizer, scorer, eval_conversations, config)
        rows = record_rows(trainer)
        trainer.train()
        per_device = config.batch_size * (1 if config.algorithm == "dpo" else config.num_generations)
        report = world_report(trainer, rows, per_device, config.gradient_accumulation_steps)
        checkpoint = Path(scratch) / "checkpoint"
        save_trained(trainer, tokenizer, checkpoint)
        if not world.is_main:
            return None
        log_world(report)
        device = device_of(world, config.use_cpu)
        trained, _ = load_causal_lm(str(checkpoint), device=device, dtype=inference_dtype(device))
        after = _mean_reward(trained, tokenizer, scorer, eval_conversations, config)
        history = trainer.state.log_history
        kls = [entry["kl"] for entry in history if "kl" in entry]
        metrics = RLMetrics(
            algorithm=config.algorithm,
            policy_ref=policy_ref,
            reward_ref=reward_ref,
            checkpoint_uri=store.uri_of(key),
            steps=trainer.state.global_step,
            train_prompts=0 if config.algorithm == "dpo" else len(prompts),
            train_pairs=len(pairs),
            eval_prompts=len(eval_conversations),
            mean_reward_before=before,
            mean_reward_after=after,
            kl=kls[-1] if kls else None,
            loss_curve=[entry["loss"] for entry in history if "loss" in entry],
            reward_curve=[entry["reward"] for entry in history if "reward" in entry],
            # Uploaded before the final checkpoint, whose manifest (written last) finishes the output.
            intermediate={
                int(path.name): store.put_dir(path, f"{key}/steps/{int(path.name):06d}")
                for path in sorted(saved.iterdir(), key=lambda p: int(p.name))
            }
            if saved.is_dir()
            else {},
            world=report,
            config=config,
        )
        (checkpoint / METRICS_FILE).write_text(metrics.model_dump_json(indent=2) + "\n")
        store.put_dir(checkpoint, key)
    return metrics


def rollout_kwargs(config: RLConfig, model_config: dict, visible_gpus: int) -> dict:
    """TRL's rloo/grpo config fields for `config.rollouts`: none for the policy's own generate;
    for vllm, a colocated engine sized by `config.engine` (checked like any engine, against the
    policy's `config.json` and the GPUs the pod sees)."""
    if config.rollouts == "transformers":
        return {}
    engine = config.engine.model_copy(
        update={"tensor_parallel_size": config.engine.tensor_parallel_size or 1}
    )
    sized = engine_kwargs(engine, model_config, visible_gpus)
    return {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_tensor_parallel_size": sized["tensor_parallel_size"],
        "vllm_gpu_memory_utilization": sized["gpu_memory_utilization"],
        "vllm_max_model_length": engine.max_model_len,
    }


def _trainer(config: RLConfig, policy_path: Path, tokenizer, scorer, prompts, pairs, scratch: Path):
    """The TRL trainer for `config.algorithm`, set up for the policy at `policy_path`."""
    from datasets import Dataset

    from cai_lib.engines.training import common_arguments

    common = {
        "output_dir": str(scratch),
        "learning_rate": config.learning_rate,
        "max_steps": config.steps,
        "beta": config.beta,
        "seed": config.seed,
        **common_arguments(config),
        # Dropout makes the policy's and the reference's log-probs differ on identical weights.
        "disable_dropout": True,
        # TRL loads the policy (and its reference) itself; dtype stays TRL's default, float32.
        "model_init_kwargs": grouped_sdpa_init_kwargs() or None,
    }
    if config.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            per_device_train_batch_size=config.batch_size, max_length=config.max_length, **common
        )
        return DPOTrainer(
            model=str(policy_path),
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
        )
    import json

    import torch
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    model_config = json.loads((policy_path / MODEL_CONFIG_FILE).read_text())
    rollouts = rollout_kwargs(config, model_config, torch.cuda.device_count())
    config_class, trainer_class = (
        (RLOOConfig, RLOOTrainer) if config.algorithm == "rloo" else (GRPOConfig, GRPOTrainer)
    )
    args = config_class(
        # TRL counts completions per device batch: batch_size prompts × num_generations samples.
        per_device_train_batch_size=config.batch_size * config.num_generations,
        num_generations=config.num_generations,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        **rollouts,
        **common,
    )
    return trainer_class(
        model=str(policy_path),
        reward_funcs=PreferenceModelReward(scorer),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": conversation_of(p.prompt)} for p in prompts]),
        processing_class=tokenizer,
    )


def _mean_reward(
    policy, tokenizer, scorer: RewardScorer, conversations: list[Conversation], config: RLConfig
):
    """Mean PM score of the policy's greedy answers to `conversations`; None when there are none."""
    if not conversations:
        return None
    answers = greedy_answers(policy, tokenizer, conversations, config.max_new_tokens, config.eval_batch_size)
    scored = [c + [{"role": "assistant", "content": a}] for c, a in zip(conversations, answers)]
    return statistics.fmean(scorer.score_conversations(scored))


def greedy_answers(model, tokenizer, conversations: list[Conversation], max_new_tokens: int, batch_size: int):
    """The model's greedy reply to each conversation, batched with left padding."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(conversations), batch_size):
        texts = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations[start : start + batch_size]
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers.extend(
            tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    model.train(was_training)
    return [answer.strip() for answer in answers]


# The launcher's interface (`cai_lib.engines.launch.TRAINERS`): how a `TrainingJob` of this stage trains.
JOB_CONFIG = RLConfig


def run_job(job: TrainingJob, config: RLConfig) -> RLMetrics | None:
    """Train `job` (its datasets read by role) with `config`; the metrics on the main process."""
    preferences = job.rows("preferences", Preference) if "preferences" in job.data else None
    return train_rl(job.model, job.reward, job.rows("prompts", PromptRecord), job.out, config, preferences)
