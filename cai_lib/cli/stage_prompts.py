"""`cai stage generate_prompts`: grow red-team and helpfulness prompt sets from seeds, by hand.

Option defaults and help come from `GeneratePromptsConfig`, so the CLI and the run config cannot
drift. The output folder holds every candidate with its verdict (`candidates/`, then `selected/`
after the cross-candidate `unique` filter) and the kept prompts of each kind as a prompt source
(`kept-red_team.jsonl`, `kept-helpful.jsonl`) to read before any run uses them.
"""

from __future__ import annotations

import typer

from cai_lib.cli.config_options import config_options
from cai_lib.cli.stage_sl import PROMPT_SOURCES, _read_prompts
from cai_lib.method.generate_prompts import GeneratePromptsConfig


@config_options(GeneratePromptsConfig, skip=frozenset({"held_out"}))
def generate_prompts_command(
    prompts: str = typer.Option(
        "", "--prompts", help=f"Red-team seed prompts: {PROMPT_SOURCES} ('' for none of this kind)."
    ),
    helpful_prompts: str = typer.Option(
        "", "--helpful-prompts", help=f"Helpfulness seed prompts: {PROMPT_SOURCES} ('' for none of this kind)."
    ),
    held_out: list[str] = typer.Option(
        [],
        "--held-out",
        help="A prompt source nothing generated may nearly duplicate (e.g. an evaluation set); repeatable.",
    ),
    prompt_model: str = typer.Option(
        ...,
        "--prompt-model",
        help="The model that writes the prompts: a local or s3:// checkpoint, models:/NAME@ALIAS, a Hugging "
        "Face id or smollm2-135m-instruct (a run's prompt_model, else its base_model).",
    ),
    out: str = typer.Option(..., "--out", help="Local directory or s3:// prefix; a rerun resumes there."),
    show: int = typer.Option(5, "--show", min=0, help="Kept prompts of each kind to print."),
    *,
    config: GeneratePromptsConfig,
) -> None:
    """Model-generated prompts (paper §3.1): new prompts of each kind written few-shot from that kind's seeds, filtered.

    Prints how many candidates each filter dropped, per kind, and a few kept prompts.

    Example: cai stage generate_prompts --prompts builtin:red_team --helpful-prompts builtin:helpful --red-team-candidates 8 --helpful-candidates 4 --few-shot 3 --max-new-tokens 32 --prompt-model smollm2-135m-instruct --out runs/demo/generated
    """
    from cai_lib.core.names import SUCCESS
    from cai_lib.core.prompts import read_prompts
    from cai_lib.core.records import GeneratedPrompt
    from cai_lib.core.shards import read_dataset
    from cai_lib.core.store import ArtifactStore, join_uri
    from cai_lib.method.generate_prompts import FILTERS, KINDS, filter_counts, generate_prompts, select_unique
    from cai_lib.steps.context import write_finished_dataset

    config = config.model_copy(update={"held_out": held_out})
    sources = {"red_team": prompts, "helpful": helpful_prompts}
    seeds = {kind: _read_prompts(source, kind, None) for kind, source in sources.items() if source}
    rejected = [row for source in held_out for row in read_prompts(source)]
    candidates, selected = join_uri(out, "candidates"), join_uri(out, "selected")
    generate_prompts(seeds, rejected, prompt_model, candidates, config)
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
