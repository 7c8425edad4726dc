"""The promotion lock: one writer at a time moves a registered model's aliases.

Alias writes are last-writer-wins, and pods share no file system, so the lock lives in the
registry itself. MLflow offers no conditional tag write, but creating a registered model is atomic
(names are unique in its database): the lock is a registered model named
`<model>.cai-promotion-lock`, created to acquire and deleted to release, tagged with an owner
token, its holder (pipeline run id, host, process id) and a lease expiry. A waiter polls; a lock
is deleted and retaken when its lease has expired, when it is held by an earlier attempt of the
same pipeline run (a retried step whose killed attempt held it), or when its holder is a process
of this host that no longer exists. A failed or cancelled pipeline run's exit handler releases
the locks it holds (`release_run_locks`). Residual risk: if two waiters break the same stale lock
at the same moment, the second can delete the first one's fresh lock; leases are long compared
with a promotion (seconds), so this needs a crashed holder and two simultaneous waiters.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import all_pages
from cai_lib.core.names import (
    LOCK_EXPIRES_TAG,
    LOCK_FOR_TAG,
    LOCK_HOST_TAG,
    LOCK_OWNER_TAG,
    LOCK_PID_TAG,
    LOCK_PIDNS_TAG,
    LOCK_RUN_TAG,
    LOCK_SUFFIX,
)
from cai_lib.core.settings import settings
from cai_lib.core.tracking import connect

if TYPE_CHECKING:
    from mlflow import MlflowClient


def _lock_tags(client: MlflowClient, lock_name: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock_name).tags)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _delete_lock(client: MlflowClient, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def _lock_holder() -> dict[str, str]:
    """Who takes a lock: the pipeline run (when inside a stage run), the host, and the process by
    its id and PID namespace (pods sharing a host name do not share PIDs)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return {
        LOCK_RUN_TAG: settings().pipeline_run_id or "",
        LOCK_HOST_TAG: socket.gethostname(),
        LOCK_PID_TAG: str(os.getpid()),
        LOCK_PIDNS_TAG: namespace,
    }


def describe_holder(tags: dict[str, str]) -> str:
    """The holder of a lock in words: pipeline run, host and process."""
    run = tags.get(LOCK_RUN_TAG) or "no pipeline run"
    return f"pipeline run {run} (host {tags.get(LOCK_HOST_TAG, '?')}, pid {tags.get(LOCK_PID_TAG, '?')})"


def _holder_is_gone(held: dict[str, str], me: dict[str, str]) -> bool:
    """True when the holder of a lock cannot be running any more: an earlier attempt of this same
    pipeline run (a retried step; the attempt that held the lock was killed), or a process that
    no longer exists in this host's (and this PID namespace's) process table."""
    if held.get(LOCK_RUN_TAG) and held.get(LOCK_RUN_TAG) == me[LOCK_RUN_TAG]:
        return True
    same_processes = (held.get(LOCK_HOST_TAG), held.get(LOCK_PIDNS_TAG)) == (
        me[LOCK_HOST_TAG],
        me[LOCK_PIDNS_TAG],
    )
    if not same_processes or not me[LOCK_PIDNS_TAG] or not held.get(LOCK_PID_TAG, "").isdigit():
        return False
    try:
        os.kill(int(held[LOCK_PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _try_acquire(client: MlflowClient, model_name: str, owner: str, lease_s: float) -> bool:
    from mlflow.exceptions import MlflowException

    lock_name = model_name + LOCK_SUFFIX
    me = _lock_holder()
    tags = {
        LOCK_FOR_TAG: model_name,
        LOCK_OWNER_TAG: owner,
        LOCK_EXPIRES_TAG: f"{time.time() + lease_s:.3f}",
        **me,
    }
    try:
        client.create_registered_model(
            lock_name,
            tags=tags,
            description=f"Transient lock held by cai while it changes aliases of '{model_name}'.",
        )
        return True
    except MlflowException as err:
        # A server that loses the insert race looks the winner up to say so; when the winner has
        # released the lock in between, that lookup answers RESOURCE_DOES_NOT_EXIST. Both mean:
        # not ours this time.
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            raise
    held = _lock_tags(client, lock_name)
    if held is None:
        return False
    if held.get(LOCK_OWNER_TAG) == owner:
        return True  # our create committed, but its response was lost and the client retried
    if float(held.get(LOCK_EXPIRES_TAG, "0")) < time.time() or _holder_is_gone(held, me):
        _delete_lock(client, lock_name)
    return False


@contextmanager
def registry_lock(
    client: MlflowClient, model_name: str, lease_s: float = 300.0, wait_s: float = 120.0, poll_s: float = 0.25
) -> Iterator[str]:
    """Hold the promotion lock of `model_name` (see the module docstring); yields the owner token.

    Waits up to `wait_s` seconds for another holder, then raises `CaiError` naming it.
    """
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    lock_name = model_name + LOCK_SUFFIX
    deadline = time.monotonic() + wait_s
    while not _try_acquire(client, model_name, owner, lease_s):
        if time.monotonic() >= deadline:
            held = _lock_tags(client, lock_name) or {}
            expires = datetime.fromtimestamp(float(held.get(LOCK_EXPIRES_TAG, "0")), timezone.utc)
            raise CaiError(
                f"registered model '{model_name}': the promotion lock '{lock_name}' is held by "
                f"{describe_holder(held)} until {expires:%Y-%m-%dT%H:%M:%SZ}; retry later"
            )
        time.sleep(poll_s)
    try:
        yield owner
    finally:
        if (_lock_tags(client, lock_name) or {}).get(LOCK_OWNER_TAG) == owner:
            _delete_lock(client, lock_name)


def release_run_locks(tracking_uri: str | None, pipeline_run_id: str) -> list[str]:
    """Delete every promotion lock held by `pipeline_run_id` (a failed or cancelled run's exit
    handler); returns the names of the models whose locks were released."""
    client = connect(tracking_uri)
    released = []
    for model in all_pages(client.search_registered_models):
        tags = dict(model.tags)
        if LOCK_FOR_TAG in tags and tags.get(LOCK_RUN_TAG) == pipeline_run_id:
            _delete_lock(client, model.name)
            released.append(tags[LOCK_FOR_TAG])
    return released
