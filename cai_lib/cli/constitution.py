"""`cai constitution ...`: validate, list, show, diff, import, publish and lock constitutions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_lib.core.constitution import (
    Constitution,
    constitutions_dir,
    diff_constitutions,
    dump_constitution,
    import_paper_format,
    is_locked,
    list_constitutions,
    load_constitution,
    lock_constitutions,
    publish_constitution,
)

app = typer.Typer(
    help="Versioned constitutions: constitutions/<name>/<version>.yaml, locked by content hash.\n\n"
    "Example: cai constitution show harmless@1.0.0",
    no_args_is_help=True,
)

REF_HELP = "name@version, name (newest version), a YAML path, an s3:// URI or inline YAML."
Ref = Annotated[str, typer.Argument(help=REF_HELP)]
RootDir = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Constitutions directory (default: $CAI_CONSTITUTIONS_DIR or the repo's constitutions/).",
    ),
]


def _counts(constitution: Constitution) -> str:
    few_shot = constitution.few_shot
    return (
        f"{len(constitution.critique_revision)} critique/revision, {len(constitution.comparison)} comparison, "
        f"few-shot {len(few_shot.critique_revision)} critique/revision + {len(few_shot.comparison)} comparison"
    )


@app.command()
def validate(ref: Ref, root: RootDir = None) -> None:
    """Check a constitution (schema, semver, unique ids, lock hash); print its identity and counts.

    Example: cai constitution validate constitutions/harmless/1.0.0.yaml
    """
    constitution = load_constitution(ref, root)
    locked = "recorded" if is_locked(constitution, root) else "not recorded (run `cai constitution lock`)"
    typer.echo(f"name: {constitution.name}")
    typer.echo(f"version: {constitution.version}")
    typer.echo(f"sha256: {constitution.sha256}")
    typer.echo(f"critique_revision principles: {len(constitution.critique_revision)}")
    typer.echo(f"comparison principles: {len(constitution.comparison)}")
    typer.echo(f"few-shot critique_revision examples: {len(constitution.few_shot.critique_revision)}")
    typer.echo(f"few-shot comparison examples: {len(constitution.few_shot.comparison)}")
    typer.echo(f"lock: {locked}")


@app.command("list")
def list_(root: RootDir = None) -> None:
    """List every constitution version with its hash and principle counts.

    Example: cai constitution list
    """
    constitutions = list_constitutions(root)
    if not constitutions:
        typer.echo(f"no constitutions in {root or constitutions_dir()}")
    for constitution in constitutions:
        typer.echo(f"{constitution.ref:<24} {constitution.sha256[:12]}  {_counts(constitution)}")


@app.command()
def show(ref: Ref, root: RootDir = None) -> None:
    """Print a constitution as YAML, headed by its ref and sha256 as comments.

    Example: cai constitution show harmless@1.0.0
    """
    constitution = load_constitution(ref, root)
    typer.echo(f"# {constitution.ref}\n# sha256: {constitution.sha256}")
    typer.echo(dump_constitution(constitution), nl=False)


@app.command()
def diff(
    old: Annotated[str, typer.Argument(help="The first constitution: " + REF_HELP)],
    new: Annotated[str, typer.Argument(help="The second constitution: " + REF_HELP)],
    root: RootDir = None,
) -> None:
    """List principle ids added, removed and changed between two constitutions.

    Example: cai constitution diff harmless@1.0.0 constitutions/harmless/1.0.0.yaml
    """
    result = diff_constitutions(load_constitution(old, root), load_constitution(new, root))
    typer.echo(f"{result.old_ref} -> {result.new_ref}")
    for label, ids in (("added", result.added), ("removed", result.removed), ("changed", result.changed)):
        typer.echo(f"{label}: {', '.join(ids) if ids else '-'}")
    typer.echo(f"few-shot: {'changed' if result.few_shot_changed else 'unchanged'}")


@app.command("import")
def import_(
    critiques: Annotated[
        Path, typer.Option("--critiques", help="CritiqueRevisionInstructions.json of the paper.")
    ],
    name: Annotated[str, typer.Option("--name", help="Name of the new constitution.")],
    version: Annotated[str, typer.Option("--version", help="Semantic version of the new constitution.")],
    out: Annotated[
        str, typer.Option("--out", help="Constitutions directory (or s3:// prefix) to write into.")
    ],
    comparisons: Annotated[
        Path | None,
        typer.Option("--comparisons", help="RLMadisonInstructions.json of the paper."),
    ] = None,
) -> None:
    """Convert the paper authors' published JSON principles into OUT/<name>/<version>.yaml.

    Ids are kept (harmful0, ...); comparison questions get ids comparison0, comparison1, ...
    An existing file with other content is never overwritten.

    Example: cai constitution import --critiques tests/data/paper_format/CritiqueRevisionInstructions.json --comparisons tests/data/paper_format/RLMadisonInstructions.json --name paper --version 1.0.0 --out runs/constitutions
    """
    constitution = import_paper_format(critiques, comparisons, name, version)
    uri = publish_constitution(constitution, out)
    typer.echo(f"wrote {uri}: {constitution.ref} sha256 {constitution.sha256} ({_counts(constitution)})")


@app.command()
def publish(
    ref: Ref,
    registry: Annotated[
        str, typer.Option("--registry", help="Registry root, e.g. s3://bucket/constitutions.")
    ],
    root: RootDir = None,
) -> None:
    """Write a constitution to a registry as <name>/<version>.yaml, once.

    Publishing identical content again does nothing; other content under an existing version
    is refused.

    Example: cai constitution publish harmless@1.0.0 --registry s3://my-bucket/constitutions
    """
    constitution = load_constitution(ref, root)
    uri = publish_constitution(constitution, registry)
    typer.echo(f"published {constitution.ref} sha256 {constitution.sha256} at {uri}")


@app.command()
def lock(root: RootDir = None) -> None:
    """Record the sha256 of new versions in constitutions.lock; existing entries never change.

    Example: cai constitution lock
    """
    added = lock_constitutions(root)
    typer.echo(f"locked {', '.join(added)}" if added else "lock is up to date")
