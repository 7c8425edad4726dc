"""`cai stage sample-pairs | label | label-accuracy`: response pairs and AI feedback (paper §4.1).

Plain functions with typer annotations; `cai_lib.cli` registers them under `cai stage`. Option
defaults and help come from the stage configs, so the CLI and the run config cannot drift.
"""

from __future__ import annotations

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.cli.stage_sl import LIMIT, OUT_DATASET, PROMPTS, _read_prompts
from cai_lib.method.feedback import FeedbackConfig
from cai_lib.method.pairs import SamplePairsConfig

CONSTITUTION = typer.Option(
    ..., "--constitution", help="name@version, name (newest), a YAML path, an s3:// URI or inline YAML."
)
FEEDBACK_MODEL = typer.Option(
    ...,
    "--model",
    help="Feedback model ref: local checkpoint, s3:// checkpoint, models:/NAME@ALIAS, HF id or smollm2-135m-instruct.",
)
# Set by the run config only: the option letters and the principles held out for the evaluation judge.
RUN_CONFIG_ONLY = frozenset({"option_labels", "held_out_principles", "few_shot_principles"})
SHORT_FLAGS = {"principles_per_pair": "--principles"}


@config_options(SamplePairsConfig)
def sample_pairs_command(
    prompts: str = PROMPTS,
    model: str = typer.Option(
        ..., "--model", help="Policy model ref (the SL-CAI checkpoint) that samples both answers."
    ),
    out: str = OUT_DATASET,
    limit: int | None = LIMIT,
    *,
    config: SamplePairsConfig,
) -> None:
    """Response pairs (paper §4.1): the policy samples two answers to each red-team prompt.

    Example: cai stage sample-pairs --prompts builtin:red_team --model runs/sl-cai --limit 8 --out runs/pairs
    """
    from cai_lib.method.pairs import sample_pairs

    records = _read_prompts(prompts, "red_team", limit)
    rows = sample_pairs(records, model, out, config)
    dropped = len(records) - rows
    typer.echo(
        f"wrote {rows} pair(s) to {out}" + (f" ({dropped} dropped for an empty answer)" if dropped else "")
    )


@config_options(FeedbackConfig, skip=RUN_CONFIG_ONLY, aliases=SHORT_FLAGS)
def label_command(
    pairs: str = typer.Option(
        ..., "--pairs", help="Response pairs written by `cai stage sample-pairs` (dir, file or s3://)."
    ),
    constitution: str = CONSTITUTION,
    model: str = FEEDBACK_MODEL,
    out: str = OUT_DATASET,
    *,
    config: FeedbackConfig,
) -> None:
    """AI feedback (paper §4.1): soft labels P(A better) from option log-probs, over K principles and both orders.

    Example: cai stage label --pairs runs/pairs --constitution harmless@1.0.0 --model smollm2-135m-instruct --principles 4 --out runs/labels
    """
    from cai_lib.core.constitution import load_constitution
    from cai_lib.core.records import Preference, ResponsePair
    from cai_lib.core.shards import read_dataset
    from cai_lib.method.feedback import label_preferences

    loaded = load_constitution(constitution)
    rows = list(read_dataset(pairs, ResponsePair))
    written = label_preferences(rows, loaded, model, out, config)
    labels = [p.label for p in read_dataset(out, Preference)]
    prefer_a = sum(label > 0.5 for label in labels)
    typer.echo(
        f"wrote {written} label(s) to {out} under {loaded.ref} ({loaded.sha256[:12]}); mean P(A better) "
        f"{sum(labels) / len(labels):.3f}, A preferred in {prefer_a} of {len(labels)}"
    )


@config_options(FeedbackConfig, skip=RUN_CONFIG_ONLY | {"shard_size"}, aliases=SHORT_FLAGS)
def label_accuracy_command(
    human: str = typer.Option(
        ...,
        "--human",
        help="Human-labelled comparisons: an hh-rlhf .jsonl(.gz) file ({chosen, rejected}), a multiple-choice "
        ".jsonl file ({prompt, corrects, incorrects}) as the paper's authors published, an s3:// URI of one, "
        "or an hf:ORG/NAME dataset (hh-rlhf).",
    ),
    constitution: str = CONSTITUTION,
    model: str = FEEDBACK_MODEL,
    limit: int | None = typer.Option(None, "--limit", help="Use the first K comparisons (default: all)."),
    as_json: bool = typer.Option(
        False, "--json", help="Also print the full report as one JSON line before the summary."
    ),
    *,
    config: FeedbackConfig,
) -> None:
    """Agreement of the AI feedback labeller with human labels, with a Wilson 95% interval; printed last.

    Every comparison goes through the labeller that labels training pairs (K principles, both
    option orders, chain of thought with --cot). Also printed: the always-(A) and always-(B)
    baselines of a multiple-choice file and the labeller's position bias.

    Example: cai stage label-accuracy --human data/hh-rlhf/harmless-base/test.jsonl.gz --constitution harmless@1.0.0 --model smollm2-135m-instruct --limit 100
    """
    from cai_lib.core.constitution import load_constitution
    from cai_lib.method.label_accuracy import label_accuracy

    report = label_accuracy(human, load_constitution(constitution), model, limit, config)
    typer.echo(
        f"{report.format} comparisons from {report.source}, scored {'by the training labeller' if report.scoring == 'labeller' else 'as published'}; "
        f"feedback model {report.model_ref}, {report.constitution_ref}"
    )
    if report.mean_p_human_choice is not None:
        typer.echo(f"mean P(human's choice better) {report.mean_p_human_choice:.3f}")
    for line in report.lines():
        typer.echo(line)
    if as_json:
        typer.echo(report.model_dump_json())
    typer.echo(report.summary())
