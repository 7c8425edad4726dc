"""`cai trainjob render`: the Kubeflow Trainer TrainJob a multi-node training step would create."""

from __future__ import annotations

from typing import Annotated

import typer

from cai_lib.cli.pipeline import ConfigOption, SetOption, load_config
from cai_lib.core.errors import CaiError
from cai_lib.core.stage_table import TRAINING_STAGES, canonical

app = typer.Typer(
    help="Multi-node training through Kubeflow Trainer v2.\n\n"
    "Example: cai trainjob render --stage train_pm --config pipelines/configs/llama-8b-two-nodes.yaml",
    no_args_is_help=True,
)


@app.command("render")
def render_command(
    stage: Annotated[
        str, typer.Option("--stage", help=f"The training stage: {', '.join(TRAINING_STAGES)} (train-pm works too).")
    ],
    config: ConfigOption = None,
    set_: SetOption = None,
    artifact_root: Annotated[
        str,
        typer.Option(
            "--artifact-root",
            help="The installation's artifact root, for the job's location in the printed command.",
        ),
    ] = "s3://BUCKET/artifacts",
    namespace: Annotated[
        str, typer.Option("--namespace", help="The namespace the pipeline runs in.")
    ] = "default",
) -> None:
    """Print, as YAML, the TrainJob the stage's pipeline step creates when its profile has num_nodes > 1.

    The output attempt is a placeholder (ATTEMPT); the step fills in its own.

    Example: cai trainjob render --stage sft --config pipelines/configs/llama-8b-two-nodes.yaml
    """
    from cai_lib.engines.trainjob import manifest_yaml, plan_of, render

    name = canonical(stage)
    if name not in TRAINING_STAGES:
        raise CaiError(f"--stage {stage}: not a training stage; one of {', '.join(TRAINING_STAGES)}")
    deploy = load_config(config, set_).deploy
    plan = plan_of(name, deploy)
    if plan is None:
        nodes = deploy.resources[name].num_nodes if name in deploy.resources else 1
        raise CaiError(
            f"--stage {name}: its resource profile has num_nodes {nodes}; the step trains in its own pod "
            "and creates no TrainJob"
        )
    out = f"{artifact_root.rstrip('/')}/outputs/{name}/KEY/ATTEMPT"
    typer.echo(manifest_yaml(render(plan, f"{out}.trainjob/job.json", out, namespace)), nl=False)
