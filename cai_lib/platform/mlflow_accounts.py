"""The platform's MLflow accounts, made by the MLflow admin: one identity per kind of work.

MLflow's basic-auth app (`mlflow.server.auth`) gives whoever creates a registered model MANAGE on
it, and lets anyone with UPDATE on a model both add versions and move its aliases. So the
platform uses three accounts, none of them an admin:

- the pipeline's (`cai-pipeline`): creates and writes the candidates models;
- the promoter's (`cai-promoter`): the only one that writes the production models (copies a
  candidate there and moves `champion`);
- a read-only one (`cai-serving`): serving, the webhook receiver and `cai retrain`, which only read.

`setup_accounts` runs as the admin (the Helm chart's post-install hook Job, the only pod that holds
the admin's password). It creates each account, or sets its password to the one given where it
exists, so a second run, a retry after a failure half-way or a rotated Secret all end in the same
state. For each production model named it also grants, through MLflow's per-user grants
(`/api/3.0/mlflow/users/permissions/grant`): the promoter MANAGE, the pipeline and the read-only
account READ (explicit, so a `default_permission` above READ gives them nothing more), and the
pipeline MANAGE on the candidates model. Grants are needed where a production model already
exists (made by an earlier admin-run pipeline); a model the promoter creates is its own anyway.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydantic import BaseModel, SecretStr

from cai_lib.core.errors import CaiError
from cai_lib.core.names import ROLES, candidates_name, model_name
from cai_lib.core.tracking import scoped_environ

# MLflow's resource type and permission names (mlflow/server/auth/permissions.py).
REGISTERED_MODEL = "registered_model"
READ = "READ"
MANAGE = "MANAGE"
HEALTH_PATH = "/health"
POLL_SECONDS = 2.0


class Account(BaseModel):
    """One MLflow account: `kind` says what it is for (pipeline, promoter, serving)."""

    kind: str
    username: str
    password: SecretStr


def production_models(prefix: str, constitutions: list[str]) -> list[str]:
    """The production model of every role of each constitution."""
    return [model_name(prefix, constitution, role) for constitution in constitutions for role in ROLES]


def grants(accounts: dict[str, Account], models: list[str]) -> list[tuple[str, str, str]]:
    """(username, registered model, permission) for each production model: promoter MANAGE,
    pipeline and read-only READ; on its candidates model pipeline MANAGE, read-only READ."""
    pipeline, promoter, serving = (accounts[kind].username for kind in ("pipeline", "promoter", "serving"))
    rows = []
    for model in models:
        rows += [(promoter, model, MANAGE), (pipeline, model, READ), (serving, model, READ)]
        rows += [(pipeline, candidates_name(model), MANAGE), (serving, candidates_name(model), READ)]
    return rows


def wait_for_server(tracking_uri: str, wait_seconds: float, say: Callable[[str], None]) -> None:
    """Poll the server's health endpoint until it answers 200; a CaiError after `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + HEALTH_PATH, timeout=10) as response:
                if response.status == 200:
                    return
                problem = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as err:
            problem = str(getattr(err, "reason", err))
        if time.monotonic() >= deadline:
            raise CaiError(f"MLflow at {tracking_uri} did not answer within {wait_seconds:g}s ({problem})")
        say(f"waiting for MLflow at {tracking_uri} ({problem})")
        time.sleep(POLL_SECONDS)


@contextmanager
def as_admin(admin: Account) -> Iterator[None]:
    with scoped_environ(
        MLFLOW_TRACKING_USERNAME=admin.username, MLFLOW_TRACKING_PASSWORD=admin.password.get_secret_value()
    ):
        yield


def _error_code(err: Exception) -> str:
    return getattr(err, "error_code", "")


def ensure_user(client, account: Account) -> str:
    """Create the account, or set its password where it exists; never an admin. Says which."""
    from mlflow.exceptions import MlflowException

    password = account.password.get_secret_value()
    try:
        client.create_user(account.username, password)
        done = "created"
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
            raise
        client.update_user_password(account.username, password)
        done = "exists, password set"
    client.update_user_admin(account.username, False)
    return f"{account.kind} account {account.username}: {done}"


def ensure_grant(client, username: str, model: str, permission: str) -> str:
    """Grant `permission` on `model`; a grant that exists with another permission is replaced."""
    from mlflow.exceptions import MlflowException

    try:
        client.grant_user_permission(username, REGISTERED_MODEL, model, permission)
        return f"{username}: {permission} on {model}"
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
            raise
    if client.get_user_permission(username, REGISTERED_MODEL, model).permission == permission:
        return f"{username}: {permission} on {model} (already)"
    client.revoke_user_permission(username, REGISTERED_MODEL, model)
    client.grant_user_permission(username, REGISTERED_MODEL, model, permission)
    return f"{username}: {permission} on {model} (replaced)"


def check_distinct(admin: Account, accounts: dict[str, Account]) -> None:
    """One identity per kind of work, none of them the admin: a shared account undoes the split."""
    seen = {admin.username: "admin"}
    for account in accounts.values():
        if account.username in seen:
            raise CaiError(
                f"the {account.kind} account is named {account.username!r} like the {seen[account.username]} "
                "account: give each its own user name (the split between them is the point)"
            )
        seen[account.username] = account.kind


def setup_accounts(
    tracking_uri: str,
    admin: Account,
    accounts: dict[str, Account],
    models: list[str],
    wait_seconds: float,
    say: Callable[[str], None],
) -> None:
    """As `admin`: wait for the server, make each account, then grant on each of `models`."""
    check_distinct(admin, accounts)
    wait_for_server(tracking_uri, wait_seconds, say)
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(tracking_uri)
    with as_admin(admin):
        try:
            for account in accounts.values():
                say(ensure_user(client, account))
            for username, model, permission in grants(accounts, models):
                say(ensure_grant(client, username, model, permission))
        except MlflowException as err:
            raise CaiError(
                f"MLflow at {tracking_uri}, as the admin {admin.username!r}: {err.message}"
            ) from None
