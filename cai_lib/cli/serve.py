"""`cai serve sync`: point each KServe InferenceService at its registered model's champion."""

from __future__ import annotations

from typing import Annotated

import typer

from cai_lib.cli.models import TRACKING_OPTION

app = typer.Typer(
    help="Serving: KServe InferenceServices that follow the registry's champion.", no_args_is_help=True
)


@app.command("sync")
def sync_command(
    models: Annotated[
        list[str], typer.Argument(help="Registered model names; each is also its InferenceService's name.")
    ],
    namespace: str = typer.Option(
        ..., "--namespace", "-n", envvar="CAI_SERVING_NAMESPACE", help="Namespace of the InferenceServices."
    ),
    alias: str = typer.Option("champion", "--alias", help="The alias each InferenceService follows."),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Patch each InferenceService's storageUri to the folder of the version its alias names, when
    that changed; record the served version on the InferenceService and the registered model.

    Nothing changes for a model whose alias is unset, whose weights fail their manifest check, or
    whose InferenceService does not exist: the command says which, and fails.

    Example: cai serve sync cai-harmless-rl-cai --namespace ml-team
    """
    from cai_lib.serving import custom_objects_api, sync

    api = custom_objects_api()
    for model in models:
        result = sync(api, tracking_uri, model, namespace, alias)
        verb = "now serves" if result.changed else "already serves"
        typer.echo(
            f"{result.inference_service} {verb} {result.model} (version {result.version}, {result.storage_uri})"
        )
