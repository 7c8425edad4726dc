"""Reaching the Kubeflow Pipelines API: the host, a liveness check, and an authenticated client.

Host and auth: the API server is `--host` (or `KFP_HOST`), e.g. `http://localhost:8080` through
`kubectl port-forward svc/ml-pipeline-ui -n kubeflow 8080:80`, or
`http://ml-pipeline.kubeflow.svc.cluster.local:8888` inside the cluster. On multi-user Kubeflow,
a pod authenticates with a projected ServiceAccount token (audience `pipelines.kubeflow.org`)
read from `KF_PIPELINES_SA_TOKEN_PATH` (default `/var/run/secrets/kubeflow/pipelines/token`) when
that file exists.
"""

from __future__ import annotations

import contextlib
import os
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from cai_lib.core.errors import CaiError

SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
HEALTHZ = "/apis/v2beta1/healthz"
CHECK_TIMEOUT_S = 10


def require_host(host: str | None) -> str:
    """The KFP host URL, with its scheme; a `CaiError` when none was given."""
    if not host:
        raise CaiError(
            "cai submit needs --host or KFP_HOST (the Kubeflow Pipelines API URL, e.g. http://localhost:8080)"
        )
    if not host.startswith(("http://", "https://")):
        raise CaiError(f"KFP host {host!r}: give the URL with its scheme, e.g. http://{host}")
    return host.rstrip("/")


def check_host(host: str) -> None:
    """The KFP API server at `host` answers HTTP (any status: auth is the client's business)."""
    try:
        urllib.request.urlopen(host + HEALTHZ, timeout=CHECK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise CaiError(
            f"Kubeflow Pipelines host {host} (from --host / KFP_HOST) is unreachable: {reason}; "
            "check the URL or the port-forward"
        ) from None


def connect_kfp(host: str | None, namespace: str | None = None):
    """A `kfp.Client` for `host`, checked to answer first (a dead host fails in seconds, not minutes).

    Uses the projected ServiceAccount token at `KF_PIPELINES_SA_TOKEN_PATH` when that file exists
    (kfp.Client ignores it whenever a host is given).
    """
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    host = require_host(host)
    check_host(host)
    token_path = os.environ.get(SA_TOKEN_ENV, SA_TOKEN_PATH)
    credentials = ServiceAccountTokenVolumeCredentials(token_path) if Path(token_path).is_file() else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return kfp.Client(host=host, namespace=namespace or "kubeflow", credentials=credentials)
        except TimeoutError:
            raise CaiError(
                f"Kubeflow Pipelines host {host} answered but its healthz API refused us; "
                f"check authentication ({SA_TOKEN_ENV}) or pass --namespace"
            ) from None
