"""`cai serve sync|verify|webhook|register-webhook`: KServe InferenceServices that follow the
registry's champion, and the checks that keep unverified bytes from being served."""

from __future__ import annotations

from typing import Annotated

import typer

from cai_lib.cli.models import TRACKING_OPTION
from cai_lib.core.errors import CaiError
from cai_lib.core.names import CHAMPION

app = typer.Typer(
    help="Serving: KServe InferenceServices that follow the registry's champion (docs/deploy.md).\n\n"
    "Example: cai serve sync cai-harmless-rl-cai --namespace ml-team",
    no_args_is_help=True,
)
Models = Annotated[
    list[str], typer.Argument(help="Registered model names; each is also its InferenceService's name.")
]
NAMESPACE_OPTION = typer.Option(
    None, "--namespace", "-n", help="Namespace of the InferenceServices (default: $CAI_SERVING_NAMESPACE)."
)


def serving_namespace(namespace: str | None) -> str:
    """--namespace, else $CAI_SERVING_NAMESPACE; one line when neither is given."""
    from cai_lib.core.settings import settings
    from cai_lib.platform.serving import SERVING_NAMESPACE_ENV

    chosen = namespace or settings().serving_namespace
    if not chosen:
        raise CaiError(f"--namespace: not given and ${SERVING_NAMESPACE_ENV} is not set")
    return chosen


def webhook_secret(why: str) -> str:
    """$CAI_WEBHOOK_SECRET; one line naming it when it is empty."""
    from cai_lib.core.settings import settings
    from cai_lib.platform.webhook import SECRET_ENV

    secret = settings().webhook_secret
    if secret is None:
        raise CaiError(f"${SECRET_ENV} is empty: {why}")
    return secret.get_secret_value()


@app.command("sync")
def sync_command(
    models: Models,
    namespace: str | None = NAMESPACE_OPTION,
    alias: str = typer.Option(CHAMPION, "--alias", help="The alias each InferenceService follows."),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Patch each InferenceService's storageUri to the folder of the version its alias names, when
    that changed; record the served version as annotations on the InferenceService.

    Every file of the version is read back and checked against the registered manifest first.
    Nothing changes for a model whose alias is unset, whose weights fail that check, or whose
    InferenceService does not exist: the command says which, fails, and the pods keep serving
    the last good champion.

    Example: cai serve sync cai-harmless-rl-cai --namespace ml-team
    """
    from cai_lib.platform.serving import custom_objects_api, sync

    namespace = serving_namespace(namespace)
    api = custom_objects_api()
    for model in models:
        result = sync(api, tracking_uri, model, namespace, alias)
        verb = "now serves" if result.changed else "already serves"
        typer.echo(
            f"{result.inference_service} {verb} {result.model} (version {result.version}, {result.storage_uri})"
        )


@app.command("verify")
def verify_command(
    model: Annotated[str, typer.Argument(help="Registered (production) model name.")],
    storage_uri: str = typer.Option(
        ...,
        "--storage-uri",
        envvar="CAI_STORAGE_URI",
        help="The s3:// folder the serving pod is about to load (its InferenceService's storageUri).",
    ),
    alias: str = typer.Option(CHAMPION, "--alias", help="The alias the InferenceService follows."),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Check, before a serving pod loads anything, that --storage-uri is the folder of the version
    the alias names and that every file in it matches that version's registered manifest (sha256
    of every byte). Exits 2 with one line naming what differs; reads only, so it runs with a
    read-only S3 credential (the serving pod's init container).

    Example: cai serve verify cai-harmless-rl-cai --storage-uri s3://cai/models/0f3a...
    """
    from cai_lib.platform.serving import verify

    info = verify(tracking_uri, model, storage_uri, alias)
    typer.echo(f"verified: {model} version {info.version} ({alias}) at {info.source}")


@app.command("webhook")
def webhook_command(
    models: Models,
    namespace: str | None = NAMESPACE_OPTION,
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Receive MLflow's model_version_alias.created webhooks and run `cai serve sync` for a
    champion alias set on a served model. Deliveries are verified with the secret in
    $CAI_WEBHOOK_SECRET (the webhook's, see `cai serve register-webhook`): unsigned or forged ones
    get 401, malformed ones another 4xx at once, replayed ones 409.

    Example: CAI_WEBHOOK_SECRET=... cai serve webhook cai-harmless-rl-cai --namespace ml-team
    """
    import logging

    from cai_lib.platform.serving import custom_objects_api, sync
    from cai_lib.platform.webhook import receiver

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    secret = webhook_secret("the receiver verifies every delivery with the webhook's secret")
    namespace = serving_namespace(namespace)
    api = custom_objects_api()
    server = receiver(
        port, secret, models, lambda model: sync(api, tracking_uri, model, namespace).model_dump()
    )
    typer.echo(f"listening on :{port} for champion aliases of {', '.join(models)}", err=True)
    server.serve_forever()


@app.command("register-webhook")
def register_webhook_command(
    url: Annotated[str, typer.Argument(help="The receiver's URL, as the MLflow server reaches it.")],
    tracking_uri: str = TRACKING_OPTION,
) -> None:
    """Create (or update) the MLflow webhook that posts alias changes to `cai serve webhook`,
    signed with $CAI_WEBHOOK_SECRET.

    Example: CAI_WEBHOOK_SECRET=... cai serve register-webhook http://cai-cai-platform-serve-webhook:8080/
    """
    from cai_lib.platform.webhook import register_webhook

    secret = webhook_secret("the webhook's deliveries must be signed")
    typer.echo(f"webhook {register_webhook(tracking_uri, url, secret)} posts alias changes to {url}")
