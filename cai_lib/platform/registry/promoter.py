"""The promoter: the one MLflow identity that writes production models.

Its account is a Secret of its own, given only to the steps that promote (the register step and
the exit handler); unset, promotions go as `$MLFLOW_TRACKING_USERNAME`. Only the registry's
promotion and lock code use it, so only the steps that promote read its variables.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cai_lib.core.settings import settings, variable
from cai_lib.core.tracking import scoped_environ

PROMOTER_USERNAME_ENV = variable("promoter_tracking_username")
PROMOTER_PASSWORD_ENV = variable("promoter_tracking_password")


@contextmanager
def as_promoter() -> Iterator[None]:
    """MLflow requests made in the block authenticate as the promoter
    (`$CAI_PROMOTER_TRACKING_USERNAME` / `_PASSWORD`) when that account is configured, else as
    the process's own identity. MLflow reads its credentials from the environment at each
    request, so the block must not share the process with requests made as another identity."""
    promoter = settings()
    if promoter.promoter_tracking_username is None:
        yield
        return
    password = promoter.promoter_tracking_password
    with scoped_environ(
        MLFLOW_TRACKING_USERNAME=promoter.promoter_tracking_username,
        MLFLOW_TRACKING_PASSWORD=password.get_secret_value() if password else "",
    ):
        yield
