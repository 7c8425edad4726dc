"""`cai models list|fetch` and `cai promote`: registered model versions, aliases, lineage, the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cai_lib.platform.registry.gate import PromotionGate

GATE_FIELDS = PromotionGate.model_fields
app = typer.Typer(
    help="Registered models in MLflow: versions, aliases and lineage. Run where `cai run` ran, they find "
    "its registry.\n\nExample: cai models list",
    no_args_is_help=True,
)

TRACKING_OPTION = typer.Option(
    None,
    "--tracking-uri",
    help="MLflow tracking URI, e.g. http://mlflow:5000 (default: $MLFLOW_TRACKING_URI, else the store "
    "of the last `cai run` in this directory, recorded in .cai/last-run.json).",
)


def registry_uri(tracking_uri: str | None) -> str:
    """The registry by the one rule of `cai_lib.platform.registry.lookup.find_registry`; says on stderr, in
    one line, where it was found (not for --tracking-uri, which the user just typed)."""
    from cai_lib.platform.registry.lookup import find_registry

    found = find_registry(tracking_uri)
    if not found.from_flag:
        typer.echo(f"registry: {found.uri} (from {found.source})", err=True)
    return found.uri


@app.command("list")
def list_command(
    model: str = typer.Option(None, "--model", help="Only this registered model (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per version instead of a table."),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """List registered versions with their aliases (champion, challenger), lineage and gate decision.

    Example: cai models list

    Example: cai models list --model cai-harmless-rl-cai --json
    """
    from rich.console import Console
    from rich.table import Table

    from cai_lib.core.model_versions import list_models
    from cai_lib.core.names import GATE_DECISION_TAG

    versions = list_models(registry_uri(tracking_uri), model)
    if as_json:
        for info in versions:
            typer.echo(info.model_dump_json())
        return
    if not versions:
        typer.echo("no registered model versions")
        return
    table = Table(
        "model",
        "version",
        "aliases",
        "constitution",
        "sha256",
        "base model",
        "pipeline run",
        "gate",
        "source",
    )
    for info in versions:
        lineage = info.lineage
        table.add_row(
            info.name,
            info.version,
            ",".join(info.aliases),
            f"{lineage.constitution_name}@{lineage.constitution_version}" if lineage else "-",
            lineage.constitution_sha256[:12] if lineage else "-",
            lineage.base_model if lineage else "-",
            lineage.pipeline_run_id if lineage else "-",
            info.tags.get(GATE_DECISION_TAG, "-"),
            info.source,
        )
    Console(soft_wrap=True).print(table)


@app.command("fetch")
def fetch_command(
    ref: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Copy the checkpoint into this new or empty directory (default: print the cache path).",
        ),
    ] = None,
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Download the checkpoint of a registered version, e.g. the champion a deployment serves.

    The checkpoint's manifest must still match the hash recorded at registration. The last line
    printed is the local checkpoint directory, which transformers or vLLM load as it is.

    Example: cai models fetch models:/cai-harmless-rl-cai@champion --out served/
    """
    import shutil

    from cai_lib.core.errors import CaiError
    from cai_lib.core.model_versions import registered_checkpoint
    from cai_lib.engines.models import resolve_model

    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CaiError(f"--out {out}: exists and is not an empty directory")
    info = registered_checkpoint(ref, registry_uri(tracking_uri))
    path = resolve_model(info.source)
    if out is not None:
        shutil.copytree(path, out, dirs_exist_ok=True)
        path = out
    aliases = f" ({', '.join(info.aliases)})" if info.aliases else ""
    typer.echo(f"{info.name} version {info.version}{aliases} from {info.source}")
    typer.echo(str(path))


def promote_command(
    model: str = typer.Option(..., "--model", help="Production model name (candidates are in MODEL-candidates)."),
    version: str = typer.Option(
        None, "--version", help="Candidate version to judge (default: the 'challenger' alias of MODEL-candidates)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Make it champion even if the gate says no (recorded)."
    ),
    min_harmless_win_rate: float = typer.Option(
        GATE_FIELDS["min_harmless_win_rate"].default, help=GATE_FIELDS["min_harmless_win_rate"].description
    ),
    max_helpfulness_drop: float = typer.Option(
        GATE_FIELDS["max_helpfulness_drop"].default, help=GATE_FIELDS["max_helpfulness_drop"].description
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON."),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Run the promotion gate on a candidate and, if it passes, copy it into the production model
    and move that model's 'champion' alias to the copy.

    The gate reads the lower bounds of the 95% intervals of the candidate's win rates, from its
    tags cai.eval.harmless_win_rate_ci_low and cai.eval.helpful_win_rate_ci_low, written by the
    register step against the champion it was evaluated with; with no champion yet, against the
    SL-CAI policy, by the same gate. Every decision is appended to the production model's tags
    (cai.gate.attempt.NNNNNN). It runs as the promoter identity ($CAI_PROMOTER_TRACKING_USERNAME,
    else $MLFLOW_TRACKING_USERNAME): only that identity may write the production model.

    Example: cai promote --model cai-harmless-rl-cai

    Example: cai promote --model cai-harmless-rl-cai --version 1 --force
    """
    from pydantic import ValidationError

    from cai_lib.core.errors import CaiError
    from cai_lib.platform.registry.promotion import promote_from_evaluation

    try:
        gate = PromotionGate(
            min_harmless_win_rate=min_harmless_win_rate, max_helpfulness_drop=max_helpfulness_drop
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise CaiError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    judged, decision = promote_from_evaluation(registry_uri(tracking_uri), model, version, gate, force=force)
    if as_json:
        typer.echo(json.dumps({"model": model, "version": judged, **decision.model_dump()}))
    elif decision.promote:
        typer.echo(
            f"promoted: {model} candidate {judged} is champion as version {decision.production_version} "
            f"({decision.reason})"
        )
    else:
        typer.echo(f"not promoted: {model} candidate {judged} stays challenger ({decision.reason})")
