"""`cai mlflow setup-accounts`: the platform's MLflow accounts, made by the MLflow admin."""

from __future__ import annotations

import typer

from cai_lib.cli.models import TRACKING_OPTION
from cai_lib.core.errors import CaiError

app = typer.Typer(
    help="The MLflow server's accounts for the platform (docs/deploy.md, docs/security.md).\n\n"
    "Example: cai mlflow setup-accounts --tracking-uri http://mlflow:5000 --constitution harmless",
    no_args_is_help=True,
)


ACCOUNT_KINDS = ("pipeline", "promoter", "serving")


def account(kind: str, username: str | None, password, variables: tuple[str, str]):
    """The account from its settings; one line naming the variables when one is missing."""
    from cai_lib.platform.mlflow_accounts import Account

    if not username or password is None:
        raise CaiError(f"${variables[0]} and ${variables[1]} must both be set: the {kind} account's")
    return Account(kind=kind, username=username, password=password)


@app.command("setup-accounts")
def setup_accounts_command(
    constitutions: list[str] = typer.Option(
        [],
        "--constitution",
        help="Grant on the production models of this constitution (every role) and their candidates "
        "models; repeatable. None: only the accounts.",
    ),
    prefix: str = typer.Option("cai", "--prefix", help="The run config's model_name_prefix."),
    wait: float = typer.Option(300.0, "--wait", help="Seconds to wait for the server to answer first."),
    tracking_uri: str | None = TRACKING_OPTION,
) -> None:
    """As the MLflow admin ($MLFLOW_TRACKING_USERNAME / _PASSWORD), create the platform's three
    accounts, none an admin: the pipeline's ($CAI_PIPELINE_TRACKING_USERNAME / _PASSWORD), the
    promoter's ($CAI_PROMOTER_TRACKING_USERNAME / _PASSWORD), and a read-only one for serving and
    retraining ($CAI_SERVING_TRACKING_USERNAME / _PASSWORD). An account that exists gets the
    password given. For each production model of --constitution: the promoter MANAGE, the others
    READ; the pipeline MANAGE on the candidates model. Safe to run again; waits up to --wait
    seconds for the server, so it can start beside it (the Helm chart's post-install hook).

    Example: cai mlflow setup-accounts --tracking-uri http://mlflow:5000 --constitution harmless
    """
    import os

    from cai_lib.core.settings import settings, variable
    from cai_lib.core.tracking import resolve_tracking_uri
    from cai_lib.platform.mlflow_accounts import production_models, setup_accounts

    uri, _ = resolve_tracking_uri(tracking_uri)
    admin_variables = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    admin = account("admin", *(os.environ.get(name) for name in admin_variables), admin_variables)
    env = settings()
    accounts = {}
    for kind in ACCOUNT_KINDS:
        fields = (f"{kind}_tracking_username", f"{kind}_tracking_password")
        accounts[kind] = account(
            kind, *(getattr(env, field) for field in fields), tuple(variable(field) for field in fields)
        )
    setup_accounts(
        uri, admin, accounts, production_models(prefix, constitutions), wait, lambda line: typer.echo(line)
    )
    typer.echo(f"MLflow accounts ready at {uri}")
