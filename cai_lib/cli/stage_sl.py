"""`cai stage critique-revise | helpful-samples | sft`: the SL-CAI stages from the command line.

Plain functions with typer annotations; `cai_lib.cli` registers them under `cai stage`. Option
defaults and help come from the stage configs, so the CLI and the run config cannot drift.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.core.errors import CaiError
from cai_lib.core.records import PromptKind, PromptRecord
from cai_lib.engines.training import WorldReport
from cai_lib.method.critique_revise import CritiqueReviseConfig, HelpfulSamplesConfig
from cai_lib.method.sft import SFTMetrics, SFTStageConfig

PROMPTS = typer.Option(
    ...,
    "--prompts",
    help="A JSONL or hh-rlhf .jsonl/.jsonl.gz file, an s3:// URI of one, a Hugging Face dataset (hf:ORG/NAME, "
    "optionally hf:ORG/NAME/DATA_DIR:SPLIT), or builtin:red_team / builtin:helpful.",
)
MODEL = typer.Option(
    ...,
    "--model",
    help="Model ref: local checkpoint, s3:// checkpoint, models:/NAME@ALIAS, HF id or smollm2-135m-instruct.",
)
OUT_DATASET = typer.Option(
    ..., "--out", help="Local directory or s3:// prefix for the JSONL shards; a rerun resumes there."
)
LIMIT = typer.Option(None, "--limit", help="Use the first K distinct prompts.")
CHAT_TEMPLATE = typer.Option(
    None,
    "--chat-template",
    help="A Jinja file replacing the model's chat template (needed when it has none).",
)


@config_options(CritiqueReviseConfig, skip=frozenset({"chat_template"}))
def critique_revise_command(
    prompts: str = PROMPTS,
    constitution: str = typer.Option(
        ..., "--constitution", help="name@version, name (newest), a YAML path, an s3:// URI or inline YAML."
    ),
    model: str = MODEL,
    out: str = OUT_DATASET,
    limit: int | None = LIMIT,
    chat_template: Path | None = CHAT_TEMPLATE,
    *,
    config: CritiqueReviseConfig,
) -> None:
    """SL-CAI data (paper §3.1): answer red-team prompts, then critique and revise each answer N times.

    Example: cai stage critique-revise --prompts builtin:red_team --constitution harmless@1.0.0 --model smollm2-135m-instruct --rounds 2 --limit 4 --out runs/traces
    """
    from cai_lib.core.constitution import load_constitution
    from cai_lib.method.critique_revise import critique_revise

    config = config.model_copy(update={"chat_template": _read_template(chat_template)})
    loaded = load_constitution(constitution)
    records = _read_prompts(prompts, "red_team", limit)
    rows = critique_revise(records, loaded, model, out, config)
    typer.echo(
        f"{_summary(out, rows)}; {config.rounds} round(s) each under {loaded.ref} ({loaded.sha256[:12]})"
    )


@config_options(HelpfulSamplesConfig, skip=frozenset({"chat_template"}))
def helpful_samples_command(
    prompts: str = PROMPTS,
    model: str = MODEL,
    out: str = OUT_DATASET,
    limit: int | None = LIMIT,
    chat_template: Path | None = CHAT_TEMPLATE,
    *,
    config: HelpfulSamplesConfig,
) -> None:
    """The model's own answers to helpfulness prompts (paper §3.1), mixed into SFT to keep it helpful.

    Example: cai stage helpful-samples --prompts builtin:helpful --model smollm2-135m-instruct --samples-per-prompt 2 --temperature 1 --limit 4 --out runs/helpful
    """
    from cai_lib.method.critique_revise import sample_helpful

    config = config.model_copy(update={"chat_template": _read_template(chat_template)})
    rows = sample_helpful(_read_prompts(prompts, "helpful", limit), model, out, config)
    typer.echo(_summary(out, rows))


@config_options(SFTStageConfig, skip=frozenset({"chat_template"}))
def sft_command(
    data: str = typer.Option(..., "--data", help="SL-CAI traces written by `cai stage critique-revise`."),
    model: str = typer.Option(..., "--model", help="Base model ref to fine-tune."),
    out: str = typer.Option(
        ..., "--out", help="Local directory or s3:// prefix for the checkpoint; must be empty."
    ),
    helpful: str | None = typer.Option(
        None, "--helpful", help="Helpfulness samples from `cai stage helpful-samples`."
    ),
    chat_template: Path | None = CHAT_TEMPLATE,
    *,
    config: SFTStageConfig,
) -> None:
    """SL-CAI fine-tuning (paper §3.1): train on (prompt, revision) pairs mixed with helpfulness samples.

    With --processes N, N processes train under torchrun (gloo on a CPU, one per GPU otherwise); rank 0 writes the checkpoint.

    Example: cai stage sft --data runs/traces --helpful runs/helpful --model smollm2-135m-instruct --max-steps 20 --processes 2 --out runs/sl-cai
    """
    from cai_lib.engines.launch import TrainingJob, launch
    from cai_lib.engines.training import process_count, visible_gpus

    config = config.model_copy(update={"chat_template": _read_template(chat_template)})
    job = TrainingJob(
        stage="sft",
        model=model,
        out=out,
        data={"traces": [data], **({"helpful": [helpful]} if helpful else {})},
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


def _read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise CaiError(f"--chat-template: {path} is not a file")
    return path.read_text(encoding="utf-8")


def _summary(out: str, rows: int) -> str:
    from cai_lib.core.records import Trace
    from cai_lib.core.shards import read_dataset
    from cai_lib.method.critique_revise import empty_generations

    empty = sum(empty_generations(trace) for trace in read_dataset(out, Trace))
    return f"wrote {rows} record(s) to {out} ({empty} empty generation(s))"
