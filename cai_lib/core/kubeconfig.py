"""Credentials for the Kubernetes API: the pod's service account in a cluster, else the local
kubeconfig. Commands that talk to a cluster (`cai serve sync`, the serving webhook, a multi-node
training step) start here, so that a machine with neither is told so in one line instead of the
Kubernetes client's traceback."""

from __future__ import annotations

import os

from cai_lib.core.errors import CaiError


def no_cluster(err: Exception) -> CaiError:
    """The one-line error for credentials that could not be loaded (`err` says why)."""
    kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CaiError(
        f"no Kubernetes cluster to talk to: not in a pod, and no usable kubeconfig at {kubeconfig} ({reason}); "
        "run this in the cluster or point KUBECONFIG at a kubeconfig for it"
    )


def load_kubernetes_config() -> None:
    """Load the pod's in-cluster credentials, else the local kubeconfig; `CaiError` with neither."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise no_cluster(err) from None
