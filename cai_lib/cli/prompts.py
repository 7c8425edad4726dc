"""`cai prompts`: look at a prompt source before a run uses it."""

from __future__ import annotations

import enum
from typing import Annotated

import typer

app = typer.Typer(
    help="Prompt sources: JSONL, hh-rlhf transcripts, s3:// URIs, hf: datasets, built-in sets.\n\n"
    "Example: cai prompts show builtin:helpful",
    no_args_is_help=True,
)

LINE_WIDTH = 100


class Kind(str, enum.Enum):
    red_team = "red_team"
    helpful = "helpful"


@app.command()
def show(
    src: Annotated[
        str,
        typer.Argument(
            help="A JSONL or hh-rlhf .jsonl/.jsonl.gz file, an s3:// URI of one, a Hugging Face dataset "
            "(hf:ORG/NAME, optionally hf:ORG/NAME/DATA_DIR:SPLIT), or a built-in set: builtin:red_team, "
            "builtin:helpful, or the demo sets builtin:comparisons / builtin:refusal_contrast.",
        ),
    ],
    limit: Annotated[int, typer.Option("--limit", "-n", min=0, help="How many prompts to print.")] = 5,
    kind: Annotated[
        Kind, typer.Option(help="The prompt set the rows belong to (part of each id).")
    ] = Kind.red_team,
) -> None:
    """Print how many prompts SRC holds (and how many are unique), then the first ones, one line each.

    Example: cai prompts show builtin:red_team --limit 3
    """
    from cai_lib.core.prompts import deduplicate, read_prompts

    records = read_prompts(src, kind=kind.value)
    unique = len(deduplicate(records))
    typer.echo(f"{len(records)} prompts ({unique} unique) in {src}")
    for number, record in enumerate(records[:limit], start=1):
        typer.echo(f"{number:>4}  {record.id}  {one_line(record.prompt, LINE_WIDTH)}")


def one_line(text: str, width: int) -> str:
    """`text` with its whitespace collapsed, cut to `width` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
