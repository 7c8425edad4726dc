"""`cai stage critique-revise | helpful-samples | sft`: the SL-CAI stages from the command line.

Plain functions with typer annotations; `cai_lib.cli` registers them under `cai stage`. Option
defaults and help come from the stage configs, so the CLI and the run config cannot drift.
"""

from __future__ import annotations

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.core.errors import CaiError
from cai_lib.core.records import PromptKind, PromptRecord
from cai_lib.engines.training import WorldReport
from cai_lib.method.critique_revise import CritiqueReviseConfig, HelpfulSamplesConfig
from cai_lib.method.sft import SFTMetrics, SFTStageConfig

PROMPT_SOURCES = (
    "a JSONL or hh-rlhf .jsonl/.jsonl.gz file, an s3:// URI of one, a Hugging Face dataset (hf:ORG/NAME, "
    "optionally hf:ORG/NAME/DATA_DIR:SPLIT), or builtin:NAME"
)
# The flags every stage spells the same way: --prompts (red-team prompts), --helpful-prompts,
# --policy (the model that answers and is trained), --constitution, --out, --limit.
PROMPTS = typer.Option(..., "--prompts", help=f"Red-team prompts: {PROMPT_SOURCES} (builtin:red_team).")
HELPFUL_PROMPTS = typer.Option(
    ..., "--helpful-prompts", help=f"Helpfulness prompts: {PROMPT_SOURCES} (builtin:helpful)."
)
POLICY = typer.Option(
    ...,
    "--policy",
    help="The policy: a local or s3:// checkpoint, models:/NAME@ALIAS, a Hugging Face id or smollm2-135m-instruct.",
)
CONSTITUTION = typer.Option(
    ..., "--constitution", help="name@version, name (newest), a YAML path, an s3:// URI or inline YAML."
)
OUT_DATASET = typer.Option(
    ..., "--out", help="Local directory or s3:// prefix for the JSONL shards; a rerun resumes there."
)
LIMIT = typer.Option(None, "--limit", help="Use the first K distinct prompts.")
OUT_CHECKPOINT = typer.Option(
    ..., "--out", help="Local directory or s3:// prefix for the checkpoint; must be empty."
)
TRACES = typer.Option(
    ..., "--traces", help="SL-CAI traces written by `cai stage critique_revise` (a directory, a file or s3://)."
)


@config_options(CritiqueReviseConfig)
def critique_revise_command(
    prompts: str = PROMPTS,
    constitution: str = CONSTITUTION,
    policy: str = POLICY,
    out: str = OUT_DATASET,
    limit: int | None = LIMIT,
    *,
    config: CritiqueReviseConfig,
) -> None:
    """SL-CAI data (paper §3.1): the policy answers red-team prompts, then critiques and revises each answer N times.

    Example: cai stage critique_revise --prompts builtin:red_team --constitution harmless@1.0.0 --policy smollm2-135m-instruct --rounds 2 --limit 4 --out runs/demo/traces
    """
    from cai_lib.core.constitution import load_constitution
    from cai_lib.method.critique_revise import critique_revise

    loaded = load_constitution(constitution)
    records = _read_prompts(prompts, "red_team", limit)
    rows = critique_revise(records, loaded, policy, out, config)
    typer.echo(
        f"{_summary(out, rows)}; {config.rounds} round(s) each under {loaded.ref} ({loaded.sha256[:12]})"
    )


@config_options(HelpfulSamplesConfig)
def helpful_samples_command(
    helpful_prompts: str = HELPFUL_PROMPTS,
    policy: str = POLICY,
    out: str = OUT_DATASET,
    limit: int | None = LIMIT,
    *,
    config: HelpfulSamplesConfig,
) -> None:
    """The policy's own answers to helpfulness prompts (paper §3.1), mixed into SFT to keep it helpful.

    Example: cai stage helpful_samples --helpful-prompts builtin:helpful --policy smollm2-135m-instruct --samples-per-prompt 2 --temperature 1 --limit 4 --out runs/demo/helpful
    """
    from cai_lib.method.critique_revise import sample_helpful

    rows = sample_helpful(_read_prompts(helpful_prompts, "helpful", limit), policy, out, config)
    typer.echo(_summary(out, rows))


@config_options(SFTStageConfig)
def sft_command(
    traces: str = TRACES,
    policy: str = typer.Option(..., "--policy", help="The policy to fine-tune (the helpful base model)."),
    out: str = OUT_CHECKPOINT,
    helpful_samples: str | None = typer.Option(
        None, "--helpful-samples", help="Helpfulness samples written by `cai stage helpful_samples`."
    ),
    *,
    config: SFTStageConfig,
) -> None:
    """SL-CAI fine-tuning (paper §3.1): train on (prompt, revision) pairs mixed with helpfulness samples.

    With --processes N, N processes train under torchrun (gloo on a CPU, one per GPU otherwise); rank 0 writes the checkpoint.

    Example: cai stage sft --traces runs/demo/traces --helpful-samples runs/demo/helpful --policy smollm2-135m-instruct --max-steps 4 --out runs/demo/sl-cai
    """
    from cai_lib.engines.launch import TrainingJob, launch
    from cai_lib.engines.training import process_count, visible_gpus

    job = TrainingJob(
        stage="sft",
        model=policy,
        out=out,
        data={"traces": [traces], **({"helpful": [helpful_samples]} if helpful_samples else {})},
        config=config.model_dump(mode="json"),
    )
    metrics = SFTMetrics.model_validate(launch(job, process_count(config, visible_gpus())))
    typer.echo(
        f"trained {metrics.steps} step(s) on {metrics.examples} examples ({metrics.revision_examples} revisions, "
        f"{metrics.helpful_examples} helpful); loss {metrics.train_loss_first:.4f} -> {metrics.train_loss_last:.4f}"
    )
    typer.echo(_world_line(metrics.world))
    typer.echo(f"checkpoint written to {metrics.checkpoint_uri}")


def _world_line(world: WorldReport) -> str:
    return (
        f"world size {world.world_size} ({world.sharding}, bf16 {str(world.bf16).lower()}), effective batch "
        f"{world.effective_batch}, rows per rank {[rank.rows for rank in world.ranks]}"
    )


def _read_prompts(source: str, kind: PromptKind, limit: int | None) -> list[PromptRecord]:
    """The first `limit` distinct prompts of `source` (deduplicated before the limit applies)."""
    from cai_lib.core.prompts import deduplicate, read_prompts

    if limit is not None and limit < 1:
        raise CaiError(f"--limit: must be at least 1, got {limit}")
    return deduplicate(read_prompts(source, kind=kind))[:limit]


def _summary(out: str, rows: int) -> str:
    from cai_lib.core.records import Trace
    from cai_lib.core.shards import read_dataset
    from cai_lib.method.critique_revise import empty_generations

    empty = sum(empty_generations(trace) for trace in read_dataset(out, Trace))
    return f"wrote {rows} record(s) to {out} ({empty} empty generation(s))"
