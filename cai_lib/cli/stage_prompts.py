"""`cai stage generate-prompts`: grow red-team and helpfulness prompt sets from seeds, by hand.

Option defaults and help come from `GeneratePromptsConfig`, so the CLI and the run config cannot
drift. The output folder holds every candidate with its verdict (`candidates/`, then `selected/`
after the cross-candidate `unique` filter) and the kept prompts of each kind as a prompt source
(`kept-red_team.jsonl`, `kept-helpful.jsonl`) to read before any run uses them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.cli.stage_sl import CHAT_TEMPLATE, MODEL, _read_prompts, _read_template
from cai_lib.method.generate_prompts import GeneratePromptsConfig

SEEDS_HELP = "Seed prompts of this kind: a prompt source as for --prompts elsewhere ('' for none)."


@config_options(GeneratePromptsConfig, skip=frozenset({"chat_template", "held_out"}))
def generate_prompts_command(
    red_team_seeds: str = typer.Option("", "--red-team-seeds", help=SEEDS_HELP),
    helpful_seeds: str = typer.Option("", "--helpful-seeds", help=SEEDS_HELP),
    held_out: list[str] = typer.Option(
        [],
        "--held-out",
        help="A prompt source nothing generated may nearly duplicate (e.g. an evaluation set); repeatable.",
    ),
    model: str = MODEL,
    out: str = typer.Option(..., "--out", help="Local directory or s3:// prefix; a rerun resumes there."),
    chat_template: Path | None = CHAT_TEMPLATE,
    show: int = typer.Option(5, "--show", min=0, help="Kept prompts of each kind to print."),
    *,
    config: GeneratePromptsConfig,
) -> None:
    """Model-generated prompts (paper §3.1): new prompts of each kind written few-shot from that kind's seeds, filtered.

    Prints how many candidates each filter dropped, per kind, and a few kept prompts.

    Example: cai stage generate-prompts --red-team-seeds builtin:red_team --helpful-seeds builtin:helpful --red-team-candidates 8 --helpful-candidates 4 --few-shot 3 --max-new-tokens 32 --model smollm2-135m-instruct --out runs/generated
    """
    from cai_lib.core.names import SUCCESS
    from cai_lib.core.prompts import read_prompts
    from cai_lib.core.records import GeneratedPrompt
    from cai_lib.core.shards import read_dataset
    from cai_lib.core.store import ArtifactStore, join_uri
    from cai_lib.method.generate_prompts import FILTERS, KINDS, filter_counts, generate_prompts, select_unique
    from cai_lib.steps.context import write_finished_dataset

    config = config.model_copy(update={"chat_template": _read_template(chat_template), "held_out": held_out})
    sources = {"red_team": red_team_seeds, "helpful": helpful_seeds}
    seeds = {kind: _read_prompts(source, kind, None) for kind, source in sources.items() if source}
    rejected = [row for source in held_out for row in read_prompts(source)]
    candidates, selected = join_uri(out, "candidates"), join_uri(out, "selected")
    generate_prompts(seeds, rejected, model, candidates, config)
    rows = select_unique(read_dataset(candidates, GeneratedPrompt), config)
    if not ArtifactStore.open(selected).exists(SUCCESS):
        write_finished_dataset(selected, rows)
    store = ArtifactStore.open(out)
    for kind in KINDS:
        store.write_jsonl(f"kept-{kind}.jsonl", [r for r in rows if r.kind == kind and r.kept])
    for kind, counts in filter_counts(rows).items():
        dropped = ", ".join(f"{name} {counts[f'rejected_{name}']}" for name in FILTERS)
        typer.echo(f"{kind}: {counts['candidates']} candidate(s), {counts['kept']} kept; dropped by {dropped}")
        for row in [r for r in rows if r.kind == kind and r.kept][:show]:
            typer.echo(f"  {row.id}  {' '.join(row.prompt.split())[:100]}")
    typer.echo(f"every candidate with its verdict: {selected}; kept prompts: {join_uri(out, 'kept-KIND.jsonl')}")
