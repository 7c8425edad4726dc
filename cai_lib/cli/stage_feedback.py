"""`cai stage sample_pairs | label | label_accuracy | validate_labels`: response pairs and AI feedback
(paper §4.1), and the labeller's agreement with human labels (Fig. 4).

Plain functions with typer annotations; `cai_lib.cli` registers them under `cai stage`. Option
defaults and help come from the stage configs, so the CLI and the run config cannot drift.
"""

from __future__ import annotations

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.cli.pipeline import ConfigOption, SetOption
from cai_lib.cli.stage_sl import CONSTITUTION, LIMIT, OUT_DATASET, PROMPTS, _read_prompts
from cai_lib.method.feedback import FeedbackConfig
from cai_lib.method.pairs import SamplePairsConfig

FEEDBACK_MODEL = typer.Option(
    ...,
    "--feedback-model",
    help="The feedback model that labels: a local or s3:// checkpoint, models:/NAME@ALIAS, a Hugging Face id or "
    "smollm2-135m-instruct.",
)
HUMAN = typer.Option(
    ...,
    "--human",
    help="Human-labelled comparisons: an hh-rlhf .jsonl(.gz) file ({chosen, rejected}), a multiple-choice "
    ".jsonl file ({prompt, corrects, incorrects}) as the paper's authors published, an s3:// URI of one, "
    "or an hf:ORG/NAME dataset (hh-rlhf).",
)
# Set by the run config only: the option letters and the principles held out for the evaluation judge.
RUN_CONFIG_ONLY = frozenset({"option_labels", "held_out_principles", "few_shot_principles"})
SHORT_FLAGS = {"principles_per_pair": "--principles"}


@config_options(SamplePairsConfig)
def sample_pairs_command(
    prompts: str = PROMPTS,
    policy: str = typer.Option(
        ..., "--policy", help="The policy (the SL-CAI checkpoint) that samples both answers."
    ),
    out: str = OUT_DATASET,
    limit: int | None = LIMIT,
    *,
    config: SamplePairsConfig,
) -> None:
    """Response pairs (paper §4.1): the policy samples two answers to each red-team prompt.

    Example: cai stage sample_pairs --prompts builtin:red_team --policy runs/demo/sl-cai --limit 4 --out runs/demo/pairs
    """
    from cai_lib.method.pairs import sample_pairs

    records = _read_prompts(prompts, "red_team", limit)
    rows = sample_pairs(records, policy, out, config)
    dropped = len(records) - rows
    typer.echo(
        f"wrote {rows} pair(s) to {out}" + (f" ({dropped} dropped for an empty answer)" if dropped else "")
    )


@config_options(FeedbackConfig, skip=RUN_CONFIG_ONLY, aliases=SHORT_FLAGS)
def label_command(
    pairs: str = typer.Option(
        ..., "--pairs", help="Response pairs written by `cai stage sample_pairs` (a directory, a file or s3://)."
    ),
    constitution: str = CONSTITUTION,
    feedback_model: str = FEEDBACK_MODEL,
    out: str = OUT_DATASET,
    *,
    config: FeedbackConfig,
) -> None:
    """AI feedback (paper §4.1): soft labels P(A better) from option log-probs, over K principles and both orders.

    Example: cai stage label --pairs runs/demo/pairs --constitution harmless@1.0.0 --feedback-model smollm2-135m-instruct --principles 2 --out runs/demo/labels
    """
    from cai_lib.core.constitution import load_constitution
    from cai_lib.core.records import Preference, ResponsePair
    from cai_lib.core.shards import read_dataset
    from cai_lib.method.feedback import label_preferences

    loaded = load_constitution(constitution)
    rows = list(read_dataset(pairs, ResponsePair))
    written = label_preferences(rows, loaded, feedback_model, out, config)
    labels = [p.label for p in read_dataset(out, Preference)]
    prefer_a = sum(label > 0.5 for label in labels)
    typer.echo(
        f"wrote {written} label(s) to {out} under {loaded.ref} ({loaded.sha256[:12]}); mean P(A better) "
        f"{sum(labels) / len(labels):.3f}, A preferred in {prefer_a} of {len(labels)}"
    )


@config_options(FeedbackConfig, skip=RUN_CONFIG_ONLY | {"shard_size"}, aliases=SHORT_FLAGS)
def label_accuracy_command(
    human: str = HUMAN,
    constitution: str = CONSTITUTION,
    feedback_model: str = FEEDBACK_MODEL,
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

    Example: cai stage label_accuracy --human hf:Anthropic/hh-rlhf/harmless-base:test --constitution harmless@1.0.0 --feedback-model smollm2-135m-instruct --limit 20
    """
    from cai_lib.core.constitution import load_constitution
    from cai_lib.core.prompts import demo_set_note
    from cai_lib.method.label_accuracy import label_accuracy

    report = label_accuracy(human, load_constitution(constitution), feedback_model, limit, config)
    typer.echo(
        f"{report.format} comparisons from {report.source}, scored {'by the training labeller' if report.scoring == 'labeller' else 'as published'}; "
        f"feedback model {report.model_ref}, {report.constitution_ref}"
    )
    if demo_set_note(report.source):
        typer.echo(demo_set_note(report.source))
    if report.mean_p_human_choice is not None:
        typer.echo(f"mean P(human's choice better) {report.mean_p_human_choice:.3f}")
    for line in report.lines():
        typer.echo(line)
    if as_json:
        typer.echo(report.model_dump_json())
    typer.echo(report.summary())


def validate_labels_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    out: str | None = typer.Option(
        None, "--out", help="Also write label_validation.json to this directory or s3:// prefix."
    ),
) -> None:
    """The pipeline's validate_labels stage on this machine: a run config's feedback labeller, with
    exactly the settings its label stage uses, scored on its validate_labels sources; then its gate.

    Prints each labeller's accuracy on each source with a 95% interval, the always-(A)/(B)
    baselines and the position bias. Pairs the preference model trains on (human_preferences) are
    left out. Exits with one line (code 2) when gates.min_label_accuracy is set and not met.

    Example: cai stage validate_labels --config pipelines/configs/quick.yaml --set validate_labels.limit=8
    """
    from cai_lib.cli.pipeline import load_config
    from cai_lib.core.constitution import load_constitution
    from cai_lib.core.errors import CaiError
    from cai_lib.core.names import LABEL_VALIDATION_FILE
    from cai_lib.core.prompts import demo_set_note
    from cai_lib.core.store import ArtifactStore
    from cai_lib.method.label_validation import (
        gate_failure,
        labeller_names,
        validate_labels,
        validation_comparisons,
    )

    p = load_config(config, set_).params
    constitution = load_constitution(p.constitution)
    settings = p.labelling_settings(constitution)
    comparisons = validation_comparisons(p.validate_labels, p.human_preferences, p.num_human)
    names = labeller_names(p.feedback_model, p.validate_labels)
    result = validate_labels(comparisons, constitution, {n: n for n in names}, p.feedback_model, settings)
    for labeller in result.labellers:
        for source in labeller.sources:
            left_out = f", {source.excluded_training_pairs} left out (PM training pairs)" if source.excluded_training_pairs else ""
            typer.echo(f"{labeller.model_ref} on {source.source}{left_out}:")
            if demo_set_note(source.source):
                typer.echo(f"  {demo_set_note(source.source)}")
            for line in source.lines():
                typer.echo(f"  {line}")
            typer.echo(f"  {source.summary()}")
    if out:
        store = ArtifactStore.open(out)
        store.write_text(LABEL_VALIDATION_FILE, result.model_dump_json(indent=2) + "\n")
        typer.echo(f"wrote {store.uri_of(LABEL_VALIDATION_FILE)}")
    failure = gate_failure(result, p.gates)
    if failure:
        raise CaiError(failure)
    bar = p.gates.min_label_accuracy
    typer.echo("gate: off (gates.min_label_accuracy unset)" if bar is None else f"gate: passed ({bar:.3f})")
