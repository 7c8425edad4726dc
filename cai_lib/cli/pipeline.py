"""`cai run` and `cai compile`: the whole pipeline locally, or its IR YAML for Kubeflow."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_lib.core.errors import CaiError

QUICK_CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "quick.yaml"

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="Run config YAML (see pipelines/configs/).")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one field, e.g. --set critique_revise.rounds=2 (repeatable)."),
]


def load_config(config: Path | None, overrides: list[str] | None, quick: bool = False, to_run: bool = True):
    """The run config of `--config`/`--set` (or `--quick`). `to_run`: the config is about to start a
    run, so a judge that is not independent is refused now (compiling a pipeline starts none: its
    runs are checked by their first step)."""
    from cai_lib.platform.run_config import load_run_config

    if quick and config:
        raise CaiError(
            "--quick and --config are exclusive: --quick is the config pipelines/configs/quick.yaml"
        )
    loaded = load_run_config(QUICK_CONFIG if quick else config, overrides or [])
    if to_run:
        loaded.params.check_independent_judge()
    return loaded


def run_command(
    config: ConfigOption = None,
    set_: SetOption = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="Small sizes: the whole method in ~7 min on 2 CPU cores.")
    ] = False,
    artifact_root: Annotated[
        str | None,
        typer.Option(
            "--artifact-root",
            help="Where outputs and run folders go: a directory or s3:// prefix "
            "(default: $CAI_ARTIFACT_ROOT, else .cai/artifacts).",
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db, MLflow's own default).",
        ),
    ] = None,
    warm_steps: Annotated[
        bool,
        typer.Option(
            "--warm-steps/--no-warm-steps",
            help="On Linux, start each step as a fork of a process that imported torch, transformers and "
            "MLflow once, seconds sooner; --no-warm-steps starts a fresh Python for each, as kfp.local does.",
        ),
    ] = True,
) -> None:
    """Run the whole pipeline on this machine through kfp.local, with embedded defaults.

    Defaults: artifacts in .cai/artifacts, MLflow in ./mlflow.db (SQLite, MLflow's default store), the model
    smollm2-135m-instruct, the constitution harmless and the built-in prompt sets. Every stage's
    output is kept by a key of what made it: running again reuses what did not change, and a run
    that was interrupted continues where it stopped. The last lines say, per stage, whether it
    ran or reused an earlier run's output. Where its MLflow store and artifacts are is recorded in
    .cai/last-run.json, where `cai models list`, `cai promote` and `cai models fetch` run in the same
    directory find them.

    Example: cai run --quick --set constitution=harmless@1.0.0
    """
    from rich.console import Console

    from cai_lib.core.config import local_platform
    from cai_lib.platform.registry.lookup import LAST_RUN, record_last_run
    from pipelines.local import RunFailed, run_local

    console = Console(stderr=True)
    run_config = load_config(config, set_, quick)
    platform = local_platform(Path.cwd(), artifact_root, tracking_uri)
    console.print(
        f"[bold]cai run[/bold]: constitution {run_config.params.constitution}, "
        f"model {run_config.params.base_model}; each step's progress follows"
    )
    try:
        summary = run_local(run_config, Path.cwd(), platform, warm=warm_steps)
    except RunFailed as err:
        record_last_run(Path.cwd(), platform.tracking_uri, platform.artifact_root)
        for line in err.stages:
            print(line)
        raise
    # Where `cai models list`, `cai promote` and `cai models fetch` in this directory find the registry.
    record_last_run(Path.cwd(), platform.tracking_uri, platform.artifact_root, summary["run_id"])
    print(f"run:          {summary['run_id']} ({summary['run_root']})")
    print(f"report:       {summary['report']}")
    rounds = summary.get("rounds") or {"1": summary}
    for number, outcome in rounds.items():
        label = f" (round {number})" if len(rounds) > 1 else ""
        for role, version in outcome["versions"].items():
            print(f"registered:   {version['name']} version {version['version']} ({role}){label}")
        decision = "promoted to champion" if outcome["promoted"] else "not promoted"
        print(f"promotion:    {decision}{label}: {outcome['reason']}")
    print(
        f"MLflow:       {summary['mlflow_tracking_uri']} (experiment {summary['experiment']!r}; "
        f"recorded in {LAST_RUN} for `cai models` and `cai promote` here)"
    )
    print(f"open the UI:  {summary['ui_command']}")
    for line in summary["stages"]:
        print(line)


def compile_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the pipeline YAML.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    impact: Annotated[
        bool,
        typer.Option(
            "--impact",
            help="Compile the impact preview pipeline instead (`cai impact` as one step; its deploy settings "
            "from the run config).",
        ),
    ] = False,
) -> None:
    """Compile the pipeline to IR YAML for upload in the Kubeflow UI.

    The run config's params become the pipeline parameters' defaults; its deploy section sets
    images, per-stage GPU resources, node selectors, tolerations and secrets.

    Example: cai compile --out pipeline.yaml --config pipelines/configs/paper.yaml
    """
    from pipelines.cai_pipeline import compile_pipeline
    from pipelines.impact_pipeline import compile_impact_pipeline

    run_config = load_config(config, set_, to_run=False)
    if impact:
        compile_impact_pipeline(str(out), run_config.deploy)
    else:
        compile_pipeline(str(out), run_config.params, run_config.deploy)
    print(f"wrote {out}")
