"""`cai stage train-pm | rl`: the preference model and RL-CAI from the command line.

Plain functions with typer annotations; `cai_lib.cli` registers them under `cai stage`. Option
defaults and help come from the stage configs, so the CLI and the run config cannot drift.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.cli.stage_sl import OUT_CHECKPOINT, PROMPT_SOURCES, _world_line
from cai_lib.core.errors import CaiError
from cai_lib.core.records import PromptKind, PromptRecord
from cai_lib.engines.launch import TrainingJob, launch, staged_rows
from cai_lib.engines.training import process_count, visible_gpus
from cai_lib.method.preference_model import PreferenceModelConfig, PreferenceModelMetrics
from cai_lib.method.rl import RLConfig, RLMetrics

RED_TEAM_PROMPTS = typer.Option(
    ..., "--prompts", help=f"Red-team training prompts (repeatable): {PROMPT_SOURCES}."
)
HELPFUL_PROMPTS = typer.Option(
    [], "--helpful-prompts", help="Helpfulness training prompts (repeatable), in the same formats."
)
LABELS = "AI preference labels written by `cai stage label`: a directory of shards, a JSONL file or s3://"


@config_options(PreferenceModelConfig)
def train_pm(
    ai_labels: str = typer.Option(..., "--ai-labels", help=f"{LABELS}."),
    base_model: str = typer.Option(
        ...,
        "--base-model",
        help="The model the PM starts from: a local or s3:// checkpoint, models:/NAME@ALIAS, a Hugging Face id or "
        "smollm2-135m-instruct.",
    ),
    out: str = OUT_CHECKPOINT,
    human: str | None = typer.Option(
        None,
        "--human",
        help=f"Human-labelled pairs in the hh-rlhf format: {PROMPT_SOURCES}. The paper's premise: human "
        "helpfulness pairs (hh-rlhf helpful-base); harmlessness pairs (harmless-base) are the ablation that "
        "adds human harm labels to the AI ones.",
    ),
    human_limit: int | None = typer.Option(None, "--human-limit", help="Use the first K usable human pairs."),
    *,
    config: PreferenceModelConfig,
) -> None:
    """Train the preference model (paper §4.1) on AI harmlessness labels mixed with human helpfulness pairs; print its held-out accuracy.

    With --processes N, N processes train under torchrun (gloo on a CPU, one per GPU otherwise); rank 0 writes the checkpoint.

    Example: cai stage train_pm --ai-labels runs/demo/labels --base-model smollm2-135m-instruct --epochs 1 --out runs/demo/pm
    """
    from cai_lib.method.human_preferences import read_human_preferences, read_preferences

    ai_prefs = read_preferences(ai_labels)
    human_prefs = read_human_preferences(human, limit=human_limit) if human else []
    typer.echo(f"read {len(ai_prefs)} AI-labelled pair(s) from {ai_labels} and {len(human_prefs)} human pair(s)")
    with tempfile.TemporaryDirectory(prefix="cai-train-pm-") as folder:
        job = TrainingJob(
            stage="train_pm",
            model=base_model,
            out=out,
            data={"ai": [ai_labels], "human": staged_rows(Path(folder), "human", human_prefs)},
            config=config.model_dump(mode="json"),
        )
        metrics = PreferenceModelMetrics.model_validate(launch(job, process_count(config, visible_gpus())))
    typer.echo(
        f"trained on {metrics.train_pairs} pair(s) ({metrics.train_ai_pairs} AI, {metrics.train_human_pairs} "
        f"human) in {len(metrics.loss_curve)} step(s); loss {_curve(metrics.loss_curve)}"
    )
    typer.echo(_world_line(metrics.world))
    typer.echo(f"held-out AI agreement: {_share(metrics.ai_accuracy, metrics.eval_ai_pairs)}")
    typer.echo(f"checkpoint written to {metrics.checkpoint_uri}")
    typer.echo(f"held-out human accuracy: {_share(metrics.human_accuracy, metrics.eval_human_pairs)}")


@config_options(RLConfig)
def rl(
    policy: str = typer.Option(..., "--policy", help="The policy to optimise (the SL-CAI checkpoint)."),
    reward: str = typer.Option(..., "--reward", help="The preference model written by `cai stage train_pm`."),
    prompts: list[str] = RED_TEAM_PROMPTS,
    out: str = OUT_CHECKPOINT,
    helpful_prompts: list[str] = HELPFUL_PROMPTS,
    ai_labels: str | None = typer.Option(None, "--ai-labels", help=f"{LABELS}; what --algorithm dpo trains on."),
    limit: int | None = typer.Option(
        None, "--limit", help="Use the first K distinct prompts of each source."
    ),
    *,
    config: RLConfig,
) -> None:
    """RL-CAI (paper §4.1): optimise the SL-CAI policy against the PM with a KL penalty (RLOO, GRPO), or DPO on AI labels.

    With --processes N, N processes train under torchrun (gloo on a CPU, one per GPU otherwise); rank 0 writes the checkpoint.

    Example: cai stage rl --policy runs/demo/sl-cai --reward runs/demo/pm --prompts builtin:red_team --helpful-prompts builtin:helpful --limit 4 --steps 2 --out runs/demo/rl-cai
    """
    from cai_lib.method.human_preferences import read_preferences

    if config.algorithm == "dpo" and ai_labels is None:
        raise CaiError("--algorithm dpo: needs --ai-labels (the AI-labelled pairs to train on)")
    records = _prompts(prompts, "red_team", limit) + _prompts(helpful_prompts, "helpful", limit)
    pairs = read_preferences(ai_labels) if ai_labels else None
    typer.echo(
        f"{config.algorithm}: {len(records)} prompt(s)"
        + (f", {len(pairs)} preference pair(s)" if pairs else "")
    )
    with tempfile.TemporaryDirectory(prefix="cai-rl-") as folder:
        job = TrainingJob(
            stage="rl",
            model=policy,
            reward=reward,
            out=out,
            data={
                "prompts": staged_rows(Path(folder), "prompts", records),
                **({"preferences": [ai_labels]} if ai_labels else {}),
            },
            config=config.model_dump(mode="json"),
        )
        metrics = RLMetrics.model_validate(launch(job, process_count(config, visible_gpus())))
    typer.echo(f"ran {metrics.steps} step(s); loss {_curve(metrics.loss_curve)}")
    typer.echo(_world_line(metrics.world))
    if metrics.kl is not None:
        typer.echo(f"KL to the initial policy (last step, per token): {metrics.kl:.4f}")
    typer.echo(f"checkpoint written to {metrics.checkpoint_uri}")
    typer.echo(
        f"mean PM score on {metrics.eval_prompts} prompt(s): {_number(metrics.mean_reward_before)} before -> "
        f"{_number(metrics.mean_reward_after)} after"
    )


def _prompts(sources: list[str], kind: PromptKind, limit: int | None) -> list[PromptRecord]:
    from cai_lib.core.prompts import deduplicate, read_prompts

    if limit is not None and limit < 1:
        raise CaiError(f"--limit: must be at least 1, got {limit}")
    return [record for source in sources for record in deduplicate(read_prompts(source, kind=kind))[:limit]]


def _curve(losses: list[float]) -> str:
    return f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "not logged"


def _share(value: float | None, count: int) -> str:
    return "n/a (no held-out pairs)" if value is None else f"{value:.3f} on {count} pair(s)"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
