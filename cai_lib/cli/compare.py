"""`cai compare` and `cai impact`: what a constitution change did, run against run, and what it
would do to the labels before anyone pays for a retrain (docs/compare.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from cai_lib.cli.models import TRACKING_OPTION

ARTIFACT_ROOT_OPTION = typer.Option(
    None,
    "--artifact-root",
    help="Where the runs' folders are: a directory or s3:// prefix (default: $CAI_ARTIFACT_ROOT, else the "
    "last `cai run` here, else .cai/artifacts).",
)
TOP_OPTION = typer.Option(5, "--top", min=0, help="Examples each section shows: pairs, prompts.")
JSON_OPTION = typer.Option(False, "--json", help="Print the whole result as JSON instead of the summary lines.")


def where_runs_are(artifact_root: str | None, tracking_uri: str | None) -> tuple[str, str | None]:
    """(artifact root, tracking URI or None): the flags, else the environment, else the last `cai
    run` here (`.cai/last-run.json`), else `cai run`'s defaults. Without a registry, runs are found
    by folder or KFP run id only, and nothing is logged to MLflow."""
    from cai_lib.core.config import LOCAL_ARTIFACT_ROOT
    from cai_lib.core.errors import CaiError
    from cai_lib.core.settings import settings
    from cai_lib.platform.registry.lookup import find_registry, read_last_run

    last = read_last_run(Path.cwd()) or {}
    root = artifact_root or settings().artifact_root or last.get("artifact_root") or str(Path(LOCAL_ARTIFACT_ROOT).resolve())
    try:
        registry = find_registry(tracking_uri).uri
    except CaiError:
        if tracking_uri:
            raise
        registry = None
    return root, registry


def compare_command(
    run_a: str = typer.Argument(..., help="The earlier run: its KFP run id, MLflow run id, or folder."),
    run_b: str = typer.Argument(..., help="The later run, in the same forms."),
    artifact_root: str | None = ARTIFACT_ROOT_OPTION,
    tracking_uri: str | None = TRACKING_OPTION,
    models: bool = typer.Option(
        True,
        "--models/--no-models",
        help="Load the judge (policies head to head) and, where B did not label A's pairs, B's labeller. "
        "--no-models compares only what the runs stored.",
    ),
    top: int = TOP_OPTION,
    as_json: bool = JSON_OPTION,
    out: Path | None = typer.Option(None, "--out", help="Also write the HTML page to this local file."),
) -> None:
    """Compare run B with run A: which stages reran and why, the constitution diff, label flips per
    principle, PM accuracy, and B's RL-CAI policy against A's, with the examples that moved most.

    The page and its JSON go into B's run folder (run-comparisons/<A's run id>/) and B's MLflow run;
    nothing else is written to either run.

    Example: cai compare 3f2a91c0-run-a 8b41d2e7-run-b --top 3
    """
    from rich.console import Console

    from cai_lib.core.runs import finished_run
    from cai_lib.core.tracking import pipeline_parent_run
    from cai_lib.method.evaluation.compare_report import comparison_html
    from cai_lib.platform.compare import compare_runs, record_comparison, refuse_same_run

    console = Console(stderr=True, soft_wrap=True)  # paths are printed whole, to be copied
    root, registry = where_runs_are(artifact_root, tracking_uri)
    a, b = (finished_run(ref, root, registry) for ref in (run_a, run_b))
    refuse_same_run(a, b)
    console.print(f"[bold]cai compare[/bold]: {a.describe()} -> {b.describe()}")
    comparison = compare_runs(a, b, use_models=models, top=top)
    experiment = b.params.get("experiment", "")
    mlflow_run = pipeline_parent_run(registry, experiment, b.run_id) if registry and experiment else None
    where = record_comparison(comparison, b.root, registry, mlflow_run)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(comparison_html(comparison), encoding="utf-8")
    if as_json:
        typer.echo(comparison.model_dump_json(indent=2))
    else:
        for line in comparison.lines():
            typer.echo(line)
    logged = f"; MLflow run {where['mlflow_run']}" if where["mlflow_run"] else "; no MLflow run found for B"
    console.print(f"report: {where['report']}{logged}" + (f"; copy at {out}" if out else ""))


def impact_command(
    constitution: str = typer.Option(
        ..., "--constitution", help="The new constitution: a file, name@version, s3:// URI or inline YAML."
    ),
    against: str = typer.Option(
        ..., "--against", help="The run whose pairs are relabelled: KFP run id, MLflow run id or folder."
    ),
    artifact_root: str | None = ARTIFACT_ROOT_OPTION,
    tracking_uri: str | None = TRACKING_OPTION,
    out: str = typer.Option(
        "impact-report", "--out", help="Directory or s3:// prefix for report.html and impact.json."
    ),
    top: int = TOP_OPTION,
    as_json: bool = JSON_OPTION,
    fail_above: float | None = typer.Option(
        None,
        "--fail-above",
        min=0.0,
        max=1.0,
        help="Exit with status 1 when more than this share of the pairs flips (for CI).",
    ),
) -> None:
    """Preview a constitution change without training: relabel the pairs of an earlier run under the
    new constitution, with that run's feedback model and label settings, and report the label flips
    and shifts per principle. A retrain with the same run config labels them the same way.

    Example: cai impact --constitution constitutions/harmless/1.0.0.yaml --against 3f2a91c0-run-a --out impact-report
    """
    from rich.console import Console

    from cai_lib.core.constitution import load_constitution
    from cai_lib.core.names import IMPACT_FILE, REPORT_FILE
    from cai_lib.core.runs import find_run
    from cai_lib.core.store import ArtifactStore
    from cai_lib.method.evaluation.compare_report import impact_html
    from cai_lib.platform.impact import impact

    console = Console(stderr=True, soft_wrap=True)  # paths are printed whole, to be copied
    new = load_constitution(constitution)
    root, registry = where_runs_are(artifact_root, tracking_uri)
    run = find_run(against, root, registry)
    console.print(f"[bold]cai impact[/bold]: {new.ref} on the pairs of {run.describe()}; each step's progress follows")
    report = impact(new, run, top)
    store = ArtifactStore.open(out)
    store.write_text(REPORT_FILE, impact_html(report))
    store.write_text(IMPACT_FILE, report.model_dump_json(indent=2) + "\n")
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        for line in report.lines():
            typer.echo(line)
    console.print(f"report: {store.uri_of(REPORT_FILE)}")
    if fail_above is not None and report.labels and report.labels.flip_rate > fail_above:
        console.print(f"flip rate {report.labels.flip_rate:.3f} is above --fail-above {fail_above:.3f}")
        raise typer.Exit(1)
