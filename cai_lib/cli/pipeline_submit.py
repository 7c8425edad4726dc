"""`cai submit` and `cai retrain`: runs on a Kubeflow Pipelines cluster, by hand or from git."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cai_lib.cli.pipeline import ConfigOption, SetOption, load_config

HostOption = Annotated[
    str | None,
    typer.Option(
        "--host",
        envvar="KFP_HOST",
        help="Kubeflow Pipelines API URL, e.g. http://localhost:8080 (a port-forward) or "
        "http://ml-pipeline.kubeflow.svc.cluster.local:8888 in the cluster.",
    ),
]
ExperimentOption = Annotated[
    str, typer.Option("--experiment", help="KFP experiment to file the run under (created if missing).")
]
NamespaceOption = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        help="Profile namespace on multi-user Kubeflow, where the pipeline, experiment and run go "
        "(default: the pod's namespace in the cluster; none on single-user KFP).",
    ),
]


def submit_command(
    host: HostOption = None,
    experiment: ExperimentOption = "constitutional-ai",
    config: ConfigOption = None,
    set_: SetOption = None,
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="Run name (default: constitution and time).")
    ] = None,
    namespace: NamespaceOption = None,
) -> None:
    """Compile the pipeline, upload it to Kubeflow Pipelines as a version and start a run.

    The run's parameters are the run config's params; its deploy section sets images, GPU
    profiles and secrets. In a pod, a projected ServiceAccount token at
    KF_PIPELINES_SA_TOKEN_PATH authenticates against multi-user Kubeflow.

    Example: cai submit --host http://localhost:8080 --config pipelines/configs/paper.yaml --set constitution=harmless@1.0.0
    """
    from pipelines.submit import submit_run

    run = submit_run(host, load_config(config, set_), experiment, run_name=run_name, namespace=namespace)
    typer.echo(f"run id: {run.run_id}")
    typer.echo(f"url:    {run.url}")


def retrain_command(
    repo: Annotated[
        Path,
        typer.Option(
            "--repo",
            help="A git checkout with a constitutions/ folder and its lock (or a plain directory, with --revision).",
        ),
    ],
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            help="Constitution registry, e.g. s3://bucket/constitutions (default: $CAI_CONSTITUTION_REGISTRY, "
            "else the config's deploy.constitution_registry, else .cai/constitutions, which only a --dry-run "
            "accepts).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would happen; write and submit nothing.")
    ] = False,
    host: HostOption = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow server holding the champions (default: $MLFLOW_TRACKING_URI, else the last `cai run` here).",
        ),
    ] = None,
    config: ConfigOption = None,
    constitution: Annotated[
        list[str] | None, typer.Option("--constitution", help="Only this constitution name (repeatable).")
    ] = None,
    experiment: ExperimentOption = "constitutional-ai",
    namespace: NamespaceOption = None,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision",
            help="For a --repo that is not a git checkout: the source it came from (recorded in place of the commit).",
        ),
    ] = None,
) -> None:
    """Publish new constitution versions from git and submit a run for each change not yet trained.

    A change is the newest version of a constitution together with the run config's training
    params (base model, prompt sources, stage settings; not the names constitution, run_name,
    experiment, model_name_prefix) and the images deploy.image_cpu / image_gpu. It is up to date
    when the RL-CAI champion was trained on it (its lineage tags and the record of its run) or a
    run was already submitted for it (recorded in the registry under _submissions/). A submitted
    run that failed is resubmitted once; one that fails again is reported as needing attention.
    Concurrent retrains submit one run per change: each claims it with a create-only write first,
    and a submission that fails keeps its claim until, after its lease, a retrain looks the run up
    by name (recording it if it exists, submitting again if not).
    A dry run reads run states only when --host or KFP_HOST answers. Exits with status 2 and one
    line if the registry, MLflow or the KFP host is unreachable, or if a published version's
    content changed.

    Example: cai retrain --repo . --dry-run

    Example: cai retrain --repo . --config pipelines/configs/paper.yaml --dry-run

    Example: cai retrain --repo . --registry s3://my-bucket/constitutions --host http://localhost:8080
    """
    from cai_lib.platform.retrain.gitops import retrain
    from pipelines.submit import submit_run

    plan = retrain(
        submit_run,
        repo,
        registry,
        host,
        tracking_uri,
        load_config(config, None, to_run=not dry_run),
        dry_run,
        names=constitution or None,
        experiment=experiment,
        namespace=namespace,
        revision=revision,
    )
    would = "would " if dry_run else ""
    typer.echo(f"{plan.repo} at {plan.revision}{' (dry run)' if dry_run else ''}")
    if plan.uncommitted_changes:
        typer.echo("warning: constitutions/ has uncommitted changes")
    for ref in plan.publish:
        typer.echo(f"{would}publish {ref} to {plan.registry_uri}")
    labels = {"up-to-date": "up to date", "in-progress": "in progress", "needs-attention": "needs attention"}
    for decision in plan.decisions:
        if decision.action in labels:
            typer.echo(f"{labels[decision.action]}: {decision.ref}: {decision.reason}")
        elif decision.submission is None:
            typer.echo(f"{would}retrain {decision.ref}: {decision.reason}")
        else:
            typer.echo(
                f"submitted {decision.ref}: run {decision.submission.run_id} {decision.submission.url} "
                f"({decision.reason})"
            )
    if not plan.to_retrain:
        typer.echo("nothing to retrain")
