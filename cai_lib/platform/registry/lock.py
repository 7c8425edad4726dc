"""The promotion lock: one writer at a time moves a registered model's aliases.

Alias writes are last-writer-wins, and pods share no file system, so the lock lives in the
registry itself. MLflow offers no conditional tag write, but creating a registered model is atomic
(names are unique in its database): the lock is a registered model named
`<model>.cai-promotion-lock`, created to acquire and deleted to release, tagged with an owner
token, its holder (pipeline run id, host, process id, PID namespace and boot id) and a lease
expiry.

- **Lease.** While the block runs, a thread renews the expiry every third of the lease; a holder
  that stops (killed, paused) stops renewing, and its lock becomes stale when the lease runs out.
- **Fencing.** Every write made under the lock first calls `Lease.check()`, which reads the lock
  back and raises `CaiError` when it is no longer this holder's (broken after a pause longer than
  the lease): a holder that lost its lock writes nothing more. (MLflow cannot make the check and
  the write one atomic step; the lease is long compared with a promotion's few requests.)
- **Stale locks.** A lock is stale when its lease has expired, when it is held by an earlier
  attempt of the same pipeline run (a retried step whose killed attempt held it), or when its
  holder is a process of this host (same PID namespace and boot) that no longer exists, or a
  process of an earlier boot of this host. A lock whose expiry is missing or not a time (`nan`,
  `inf`, garbage), or that lacks the platform's tags, reads as expired, with a warning naming it.
- **Breaking one stale lock once.** A waiter that finds a stale lock first creates the marker
  model `<lock>.break.<token of that lock>`; only the one that creates it deletes the stale lock,
  so two waiters cannot both delete (the second would delete the first one's fresh lock).
  Markers are kept (tagged like locks, so `cai models list` hides them).
- **Who may create locks.** The platform's identities create them; MLflow's permission model
  lets any user with create rights make a model of any name, which the permission setup in
  docs/security.md closes. What the code can do, it does: a lock without the platform's tags is
  stale, and is broken (or, where MLflow refuses the platform's identity that delete, reported in
  one line naming it).

A failed or cancelled pipeline run's exit handler releases the locks it holds
(`release_run_locks`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import all_pages
from cai_lib.core.names import (
    CANDIDATES_SUFFIX,
    CREATED_BY_TAG,
    LOCK_BOOT_TAG,
    LOCK_BREAK_INFIX,
    LOCK_EXPIRES_TAG,
    LOCK_FOR_TAG,
    LOCK_HOST_TAG,
    LOCK_OWNER_TAG,
    LOCK_PID_TAG,
    LOCK_PIDNS_TAG,
    LOCK_RUN_TAG,
    LOCK_SUFFIX,
    PLATFORM,
)
from cai_lib.core.settings import settings
from cai_lib.core.tracking import connect
from cai_lib.platform.registry.promoter import as_promoter

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import RegisteredModel

log = logging.getLogger(__name__)
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def lock_name_of(model_name: str) -> str:
    return model_name + LOCK_SUFFIX


def _lock_model(client: MlflowClient, lock_name: str) -> RegisteredModel | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lock_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _delete_lock(client: MlflowClient, lock_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock_name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        if err.error_code == "PERMISSION_DENIED":
            raise CaiError(
                f"promotion lock '{lock_name}' was not made by this platform identity, which may not delete it: "
                "an MLflow admin deletes it (and docs/security.md says how to keep others from making such names)"
            ) from None
        raise


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _lock_holder() -> dict[str, str]:
    """Who takes a lock: the pipeline run (when inside a stage run), the host, and the process by
    its id, PID namespace (pods sharing a host name do not share PIDs) and boot id (a PID of an
    earlier boot is another process)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return {
        LOCK_RUN_TAG: settings().pipeline_run_id or "",
        LOCK_HOST_TAG: socket.gethostname(),
        LOCK_PID_TAG: str(os.getpid()),
        LOCK_PIDNS_TAG: namespace,
        LOCK_BOOT_TAG: _boot_id(),
    }


def describe_holder(tags: dict[str, str]) -> str:
    """The holder of a lock in words: pipeline run, host and process."""
    run = tags.get(LOCK_RUN_TAG) or "no pipeline run"
    return f"pipeline run {run} (host {tags.get(LOCK_HOST_TAG, '?')}, pid {tags.get(LOCK_PID_TAG, '?')})"


def lease_expiry(tags: dict[str, str], lock_name: str) -> float:
    """The lease expiry (Unix time) of a lock; one that is missing or not a finite number
    (`nan`, `inf`, garbage), or a lock without the platform's tags, reads as expired (0) with a
    warning naming the lock."""
    raw = tags.get(LOCK_EXPIRES_TAG)
    try:
        expires = float(raw) if raw is not None else math.nan
    except ValueError:
        expires = math.nan
    if not math.isfinite(expires) or tags.get(CREATED_BY_TAG) != PLATFORM or not tags.get(LOCK_OWNER_TAG):
        log.warning(
            "promotion lock %s: expiry %r, owner %r, %s=%r: not a lease the platform wrote; taken as expired",
            lock_name, raw, tags.get(LOCK_OWNER_TAG), CREATED_BY_TAG, tags.get(CREATED_BY_TAG),
        )  # fmt: skip
        return 0.0
    return expires


def _holder_is_gone(held: dict[str, str], me: dict[str, str]) -> bool:
    """True when the holder of a lock cannot be running any more: an earlier attempt of this same
    pipeline run (a retried step; the attempt that held the lock was killed), a process of an
    earlier boot of this host, or one that no longer exists in this host's (and this PID
    namespace's) process table."""
    if held.get(LOCK_RUN_TAG) and held.get(LOCK_RUN_TAG) == me[LOCK_RUN_TAG]:
        return True
    same_processes = (held.get(LOCK_HOST_TAG), held.get(LOCK_PIDNS_TAG)) == (
        me[LOCK_HOST_TAG],
        me[LOCK_PIDNS_TAG],
    )
    if not same_processes or not me[LOCK_PIDNS_TAG] or not held.get(LOCK_PID_TAG, "").isdigit():
        return False
    if me[LOCK_BOOT_TAG] and held.get(LOCK_BOOT_TAG) and held[LOCK_BOOT_TAG] != me[LOCK_BOOT_TAG]:
        return True  # no process outlives a reboot
    try:
        os.kill(int(held[LOCK_PID_TAG]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


def _break_once(client: MlflowClient, lock_name: str, stale: RegisteredModel, owner: str) -> None:
    """Delete the stale lock `stale`, if this waiter is the first to claim it (see the module
    docstring) and it is still the lock there."""
    from mlflow.exceptions import MlflowException

    stale_tags = dict(stale.tags)
    token = hashlib.sha256(
        f"{stale_tags.get(LOCK_OWNER_TAG)}|{stale.creation_timestamp}".encode()
    ).hexdigest()
    try:
        client.create_registered_model(
            f"{lock_name}{LOCK_BREAK_INFIX}{token[:16]}",
            tags={
                LOCK_FOR_TAG: stale_tags.get(LOCK_FOR_TAG, lock_name),
                LOCK_OWNER_TAG: owner,
                CREATED_BY_TAG: PLATFORM,
            },
            description=f"Marks that cai broke the stale lock held by {describe_holder(stale_tags)}.",
        )
    except MlflowException as err:
        if err.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            return  # another waiter breaks it
        raise
    now = _lock_model(client, lock_name)
    if now is not None and now.creation_timestamp == stale.creation_timestamp:
        log.warning(
            "promotion lock %s: breaking the stale lock of %s", lock_name, describe_holder(stale_tags)
        )
        _delete_lock(client, lock_name)


def _try_acquire(client: MlflowClient, model_name: str, owner: str, lease_s: float) -> bool:
    from mlflow.exceptions import MlflowException

    lock_name = lock_name_of(model_name)
    me = _lock_holder()
    tags = {
        LOCK_FOR_TAG: model_name,
        LOCK_OWNER_TAG: owner,
        LOCK_EXPIRES_TAG: f"{time.time() + lease_s:.3f}",
        CREATED_BY_TAG: PLATFORM,
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
    held = _lock_model(client, lock_name)
    if held is None:
        return False
    held_tags = dict(held.tags)
    if held_tags.get(LOCK_OWNER_TAG) == owner:
        return True  # our create committed, but its response was lost and the client retried
    if lease_expiry(held_tags, lock_name) < time.time() or _holder_is_gone(held_tags, me):
        _break_once(client, lock_name, held, owner)
    return False


class Lease:
    """A held promotion lock: its owner token, renewed in the background, checked before writes."""

    def __init__(self, client: MlflowClient, model_name: str, owner: str, lease_s: float):
        self.client, self.model_name, self.owner, self.lease_s = client, model_name, owner, lease_s
        self.lock_name = lock_name_of(model_name)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._renewer = threading.Thread(
            target=self._renew_until_stopped, daemon=True, name=f"lease {self.lock_name}"
        )

    def check(self) -> None:
        """Raise `CaiError` unless the lock is still this holder's and its lease runs: the fence
        every write under the lock passes first."""
        if self.lost is None:
            held = _lock_model(self.client, self.lock_name)
            tags = dict(held.tags) if held is not None else {}
            if tags.get(LOCK_OWNER_TAG) != self.owner:
                self.lost = "it was broken and is now " + (
                    f"held by {describe_holder(tags)}" if held is not None else "free"
                )
            elif lease_expiry(tags, self.lock_name) < time.time():
                self.lost = "its lease ran out"
        if self.lost is not None:
            raise CaiError(
                f"registered model '{self.model_name}': lost the promotion lock '{self.lock_name}' ({self.lost}); "
                "nothing more was written, retry"
            )

    def renew(self) -> None:
        """Push the expiry a lease ahead, if the lock is still ours."""
        held = _lock_model(self.client, self.lock_name)
        if held is None or dict(held.tags).get(LOCK_OWNER_TAG) != self.owner:
            self.lost = self.lost or "it was broken while held"
            return
        self.client.set_registered_model_tag(
            self.lock_name, LOCK_EXPIRES_TAG, f"{time.time() + self.lease_s:.3f}"
        )

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception as err:  # noqa: BLE001 - a missed renewal is retried; `check` fences writes
                log.warning("promotion lock %s: renewal failed (%s); retrying", self.lock_name, err)

    def start(self) -> Lease:
        self._renewer.start()
        return self

    def release(self) -> None:
        self._stop.set()
        self._renewer.join()
        held = _lock_model(self.client, self.lock_name)
        if held is not None and dict(held.tags).get(LOCK_OWNER_TAG) == self.owner:
            _delete_lock(self.client, self.lock_name)


@contextmanager
def registry_lock(
    client: MlflowClient, model_name: str, lease_s: float = 300.0, wait_s: float = 120.0, poll_s: float = 0.25
) -> Iterator[Lease]:
    """Hold the promotion lock of `model_name` (see the module docstring); yields the `Lease`,
    whose `check()` fences each write.

    Waits up to `wait_s` seconds for another holder, then raises `CaiError` naming it.
    """
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    lock_name = lock_name_of(model_name)
    deadline = time.monotonic() + wait_s
    while not _try_acquire(client, model_name, owner, lease_s):
        if time.monotonic() >= deadline:
            held = _lock_model(client, lock_name)
            tags = dict(held.tags) if held is not None else {}
            expires = datetime.fromtimestamp(lease_expiry(tags, lock_name), timezone.utc)
            raise CaiError(
                f"registered model '{model_name}': the promotion lock '{lock_name}' is held by "
                f"{describe_holder(tags)} until {expires:%Y-%m-%dT%H:%M:%SZ}; retry later"
            )
        time.sleep(poll_s)
    lease = Lease(client, model_name, owner, lease_s).start()
    try:
        yield lease
    finally:
        lease.release()


def release_run_locks(tracking_uri: str | None, pipeline_run_id: str) -> list[str]:
    """Delete every promotion lock held by `pipeline_run_id` (a failed or cancelled run's exit
    handler), each as the identity that made it: a candidates model's lock as the pipeline's, a
    production model's as the promoter's. Returns the names of the models whose locks were released."""
    client = connect(tracking_uri)
    released = []
    for model in all_pages(client.search_registered_models):
        tags = dict(model.tags)
        if (
            LOCK_FOR_TAG in tags
            and model.name == lock_name_of(tags[LOCK_FOR_TAG])
            and tags.get(LOCK_RUN_TAG) == pipeline_run_id
        ):
            candidates = tags[LOCK_FOR_TAG].endswith(CANDIDATES_SUFFIX)
            with nullcontext() if candidates else as_promoter():
                _delete_lock(client, model.name)
            released.append(tags[LOCK_FOR_TAG])
    return released
