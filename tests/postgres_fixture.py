"""A throwaway PostgreSQL cluster for the tests, from Debian's server binaries.

`initdb` makes a cluster in a fresh temporary directory and `pg_ctl` starts it on a free port of
127.0.0.1 (trust authentication for local connections, the socket in that directory, durability
off: nothing survives the session). It is stopped with `pg_ctl stop -m fast` and removed at the end.
PostgreSQL refuses to run as root, so a root test process runs `initdb` and `pg_ctl` as the
`postgres` user (Debian's package creates it) on a directory that user owns.

Debian keeps the binaries in /usr/lib/postgresql/<version>/bin, usually not on PATH; the newest
version there wins, then PATH. `scripts/system-deps.sh` installs the `postgresql` package.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
CLUSTER_OWNER = "postgres"  # Debian's system user for the server; also the superuser's name
NEEDED = ("initdb", "pg_ctl", "createdb")


@dataclass(frozen=True)
class PostgresBinaries:
    bindir: Path
    version: str  # as `postgres --version` says it, e.g. "15.18 (Debian 15.18-0+deb12u1)"
    run_as: str | None  # the user to run the server as (root only); None: this process's user

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    def command(self, name: str, *args: str) -> list[str]:
        """argv running the server tool `name` as the cluster's owner."""
        argv = [self.tool(name), *args]
        if self.run_as is None:
            return argv
        return [runuser(), "-u", self.run_as, "--", *argv]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runuser() -> str:
    return shutil.which("runuser") or "/usr/sbin/runuser"


def _version_key(bindir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); 9.6 -> (9, 6)
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def candidate_bindirs() -> list[Path]:
    """Directories holding initdb: Debian's versioned ones, newest first, then the one on PATH."""
    found = sorted(
        (Path(p).parent for p in Path("/").glob(DEBIAN_BINDIRS.lstrip("/") + "/initdb")),
        key=_version_key,
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        resolved = Path(on_path).resolve().parent
        if resolved not in found:
            found.append(resolved)
    return found


def find_postgres() -> tuple[PostgresBinaries | None, str]:
    """The server binaries to use, or None and the reason there are none usable here."""
    bindirs = [d for d in candidate_bindirs() if all((d / name).exists() for name in NEEDED)]
    if not bindirs:
        return None, (
            f"no PostgreSQL server binaries ({', '.join(NEEDED)} in {DEBIAN_BINDIRS} or on PATH; "
            "scripts/system-deps.sh installs Debian's postgresql package)"
        )
    bindir = bindirs[0]
    run_as = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(CLUSTER_OWNER)
        except KeyError:
            return None, f"running as root and there is no '{CLUSTER_OWNER}' user to run PostgreSQL as"
        if not os.path.exists(runuser()):
            return None, "running as root and runuser (util-linux) is missing to run PostgreSQL as postgres"
        run_as = CLUSTER_OWNER
    done = subprocess.run(
        [str(bindir / "initdb"), "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    said = re.search(r"\(PostgreSQL\)\s+(.+)", done.stdout)
    version = said.group(1).strip() if said else bindir.parent.name
    return PostgresBinaries(bindir=bindir, version=version, run_as=run_as), ""


def _run(argv: list[str], what: str, cwd: Path, log: Path | None = None) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
        raise RuntimeError(
            f"{what} failed with status {done.returncode}: {' '.join(argv)}\n{done.stdout}{done.stderr}{tail}"
        )


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster on 127.0.0.1 with an empty database `mlflow`; skips without binaries.

    Yields a dict: `uri` (postgresql+psycopg2://postgres@127.0.0.1:PORT/mlflow, no password:
    trust authentication), `port`, `version`, `bindir`, `datadir`, `log` and `started_s` (seconds
    from initdb to the database being created).
    """
    binaries, reason = find_postgres()
    if binaries is None:
        pytest.skip(reason)
    began = time.monotonic()
    # Not under pytest's basetemp: root's is mode 0700, so `postgres` could not reach it. A short
    # path also keeps the Unix socket's path under its 107-byte limit.
    root = Path(tempfile.mkdtemp(prefix="cai-pg-"))
    if binaries.run_as is not None:
        owner = pwd.getpwnam(binaries.run_as)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    datadir, log = root / "data", root / "postgres.log"
    port = free_port()
    started = False
    try:
        _run(
            binaries.command(
                "initdb",
                "-D",
                str(datadir),
                "-U",
                CLUSTER_OWNER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ),
            "initdb",
            cwd=root,
        )
        with open(datadir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# cai tests: a throwaway cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {port}\n"
                f"unix_socket_directories = '{root}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
            )
        _run(
            binaries.command("pg_ctl", "-D", str(datadir), "-l", str(log), "-w", "-t", "60", "start"),
            "pg_ctl start",
            cwd=root,
            log=log,
        )
        started = True
        _run(
            [binaries.tool("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", CLUSTER_OWNER, "mlflow"],
            "createdb mlflow",
            cwd=root,
            log=log,
        )
        yield {
            # The driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, while the
            # dev extras (and the CPU image that serves MLflow) install psycopg2.
            "uri": f"postgresql+psycopg2://{CLUSTER_OWNER}@127.0.0.1:{port}/mlflow",
            "port": port,
            "version": binaries.version,
            "bindir": binaries.bindir,
            "datadir": datadir,
            "log": log,
            "started_s": time.monotonic() - began,
        }
    finally:
        try:
            if started:
                _run(
                    binaries.command("pg_ctl", "-D", str(datadir), "-m", "fast", "-w", "-t", "60", "stop"),
                    "pg_ctl stop",
                    cwd=root,
                    log=log,
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)
