"""Run `kfp.local`'s tasks in processes forked from a warm one, instead of a fresh Python each.

kfp.local's SubprocessRunner starts every task as `sh -ec SCRIPT SOURCE ARGS...`: a fresh
interpreter that imports torch, transformers and MLflow (seconds of CPU each time) before a step's
few seconds of work. A fork server imports those once, under the task's exact environment and
working directory, then forks one process per task that does what `component_script` does: it writes the
component's source to a file in a new temporary folder and runs `kfp.dsl.executor_main` as
`__main__`, and it ends as that interpreter would (atexit handlers run, threads are joined), with
the same exit code.

Each task is still a process of its own, with only its own environment; what it shares with the
others is the modules imported before the fork, imported under that same environment (a server
serves one environment and working directory, so a step with other settings gets a server of its
own). A fork copies only the thread that calls it, so a server forks only while it has no Python
thread but its main one (it checks before each fork, and refuses otherwise). The native pools
that the imports start (OpenBLAS's, jemalloc's) reset themselves in the child with their own
pthread_atfork handlers, as they do for PyTorch's forked DataLoader workers; the server runs no
torch operation, so torch's OpenMP pool does not exist yet when it forks. Forks are used on Linux
only; elsewhere, and for a refused task, a task runs as kfp.local runs it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

# What the steps import before their own code runs (the training steps trl and peft, the
# evaluation's report matplotlib). Not kfp.dsl.executor_main: runpy runs that one
# as __main__ in each task, and warns when it is already imported.
PRELOAD = (
    "torch",
    "transformers.modeling_utils",
    "transformers.models.auto",
    "mlflow",
    "boto3",
    "kfp.dsl.executor",
    "datasets",
    "peft",
    "trl",
    "matplotlib.pyplot",
)

EXECUTOR_MODULE = "kfp.dsl.executor_main"


def _probe() -> None:
    """A component function whose command shows kfp's script."""


@functools.cache
def component_script() -> str:
    """The script of every lightweight Python component (kfp/dsl/component_factory.py,
    _get_command_and_args_for_lightweight_component), as the installed kfp writes it: it writes $0
    to $program_path/ephemeral_component.py and runs `python3 -m kfp.dsl.executor_main` on it. A
    command with another script (a pip install first, a container component) is not a task
    `run_task` knows how to run."""
    from kfp.dsl import component_factory

    return component_factory._get_command_and_args_for_lightweight_component(_probe)[0][2]


def lightweight_task(full_command: list[str]) -> dict | None:
    """The component source and executor arguments of a lightweight Python component's command,
    or None for any other command."""
    if full_command[:2] != ["sh", "-ec"] or len(full_command) < 4:
        return None
    # kfp.local's replace_python_executable has made its `python3` this interpreter.
    if full_command[2] != component_script().replace("python3", sys.executable):
        return None
    return {"source": full_command[3], "args": full_command[4:]}


def forks_here() -> bool:
    """Whether tasks run in forks on this platform: Linux only. macOS's system libraries are not
    safe to use in a child forked without exec."""
    return sys.platform == "linux"


# -- the server process ----------------------------------------------------------------------------


def serve(listener: socket.socket) -> dict | None:
    """Answer requests until the parent closes this process's stdin. Returns None in the server
    when it stops, and a task's request in each task process forked for one."""
    # The server never waits for a child: its monitors are reaped by the kernel.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            return None
        if listener not in readable:
            continue
        conn, _ = listener.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1, 1)
        request = json.loads(b"".join(iter(lambda: conn.recv(1 << 16), b"")))
        if threading.active_count() != 1:
            conn.sendall(json.dumps({"refused": f"{threading.active_count()} Python threads"}).encode())
            conn.close()
            os.close(fds[0])
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            monitor(listener, conn, fds[0])  # returns only in the task process
            return {**request, "output": fds[0]}
        conn.close()
        os.close(fds[0])


def monitor(listener: socket.socket, conn: socket.socket, output: int) -> None:
    """In the server's child: fork the task, wait for it and send its exit code. Returns in the task
    process only; the monitor itself ends here."""
    listener.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if os.fork() == 0:
        conn.close()
        return
    os.close(output)
    _, status = os.waitpid(-1, 0)
    conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
    os._exit(0)


def run_task(task: dict) -> None:
    """In the task process: what `component_script` does, with stdout and stderr on the requester's pipe."""
    os.dup2(task["output"], 1)
    os.dup2(task["output"], 2)
    os.close(task["output"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    program_path = Path(tempfile.mkdtemp())
    (program_path / "ephemeral_component.py").write_text(task["source"])
    os.environ["_KFP_RUNTIME"] = "true"
    # As `python -m` sets them: the working directory first on the path, the module's argv.
    sys.path[0] = os.getcwd()
    sys.argv = [
        EXECUTOR_MODULE,
        "--component_module_path",
        str(program_path / "ephemeral_component.py"),
        *task["args"],
    ]
    global _exit_code
    try:
        runpy.run_module(EXECUTOR_MODULE, run_name="__main__", alter_sys=True)
        _exit_code = 0
    except SystemExit as end:
        _exit_code = end.code if isinstance(end.code, int) else int(end.code is not None)
        raise
    except BaseException:
        _exit_code = 1
        raise  # the interpreter prints it, as a fresh one would


_exit_code: int | None = None  # set in a task process when its task has ended


def end_without_teardown() -> None:
    """In a task process, the last atexit handler (the server registers it before it imports
    anything): after the task's threads were joined and every other handler ran, flush the output
    and end with the task's exit code, skipping the teardown of the modules the server imported
    (what a fresh interpreter would tear down it never imported; about 0.4 s a task). What that
    skips is what CPython does not promise either: `__del__` of objects still alive at exit."""
    if _exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code)


def main() -> None:
    atexit.register(end_without_teardown)
    listener = socket.socket(fileno=int(sys.argv[1]))
    for module in sys.argv[2:]:
        __import__(module)
    # What the imports made is never collected here, so a task's garbage collections do not touch
    # (and copy) those pages.
    gc.freeze()
    task = serve(listener)
    if task is not None:
        run_task(task)  # and the interpreter ends as the task's would


# -- the requester -----------------------------------------------------------------------------------


class ForkServer:
    """One warm server process for tasks that run with `env` in `cwd`."""

    def __init__(self, env: dict[str, str], cwd: str, preload: tuple[str, ...] = PRELOAD):
        self._folder = tempfile.mkdtemp(prefix="cai-forks-")
        self.address = os.path.join(self._folder, "socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(self.address)
            # Requests queue here while the server imports: no handshake is needed.
            listener.listen(64)
            self._process = subprocess.Popen(
                [sys.executable, __file__, str(listener.fileno()), *preload],
                env=env,
                cwd=cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                pass_fds=[listener.fileno()],
            )

    def run(self, task: dict) -> int | None:
        """Run `task` (from `lightweight_task`) in a fork, printing its output as it comes; its exit
        code, or None if the server refused it."""
        read, write = os.pipe()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.address)
            socket.send_fds(conn, [b"T"], [write])
            os.close(write)
            conn.sendall(json.dumps({"source": task["source"], "args": task["args"]}).encode())
            conn.shutdown(socket.SHUT_WR)
            with open(read, encoding="utf-8", errors="replace") as output:
                for line in output:
                    print(line, end="")
            reply = b"".join(iter(lambda: conn.recv(1 << 16), b""))
        if not reply:
            raise RuntimeError(f"the fork server (pid {self._process.pid}) stopped; its error is above")
        answer = json.loads(reply)
        return answer.get("returncode")

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()
        shutil.rmtree(self._folder, ignore_errors=True)


class ForkServers:
    """A server per environment and working directory, started by the first task that needs it."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self.preload = preload
        self._servers: dict[tuple, ForkServer | None] = {}
        self._lock = threading.Lock()

    def run(self, task: dict, env: dict[str, str]) -> int | None:
        key = (tuple(sorted(env.items())), os.getcwd())
        with self._lock:
            if key not in self._servers:
                self._servers[key] = ForkServer(env, os.getcwd(), self.preload)
            server = self._servers[key]
        if server is None:
            return None
        code = server.run(task)
        if code is None:
            with self._lock:
                self._servers[key] = None
            server.close()
        return code

    def close(self) -> None:
        for server in self._servers.values():
            if server is not None:
                server.close()
        self._servers.clear()


_active: ForkServers | None = None
_kept: ForkServers | None = None


def run_command(full_command: list[str], env: dict[str, str] | None) -> int:
    """kfp.local's run_local_subprocess (kfp/local/subprocess_task_handler.py, kfp 2.17): run a
    task's command with `env` (None: this process's), printing its output, and return its exit
    code; in a fork of a warm server while `warm_tasks` is active and the command is a lightweight
    component's."""
    env = dict(os.environ) if env is None else env
    task = lightweight_task(full_command)
    code = _active.run(task, env) if _active is not None and task is not None else None
    if code is None:
        with subprocess.Popen(
            full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        ) as process:
            for line in iter(process.stdout.readline, ""):
                print(line, end="")
            code = process.wait()
    # kfp.local's separation after each task's log
    print("\n")
    return code


@contextlib.contextmanager
def warm_tasks(preload: tuple[str, ...] = PRELOAD) -> Iterator[None]:
    """While the block runs, kfp.local's tasks run in forks of warm servers (on Linux). A caller
    that has already replaced kfp.local's run_local_subprocess keeps its own, which calls
    `run_command` to get the same."""
    global _active
    from kfp.local import subprocess_task_handler

    own = subprocess_task_handler.run_local_subprocess
    replace = own.__module__ == subprocess_task_handler.__name__ and forks_here()
    _active = _kept or (ForkServers(preload) if forks_here() else None)
    if replace:
        subprocess_task_handler.run_local_subprocess = lambda full_command, env_vars=None: run_command(
            full_command, {**os.environ, **env_vars} if env_vars else None
        )
    try:
        yield
    finally:
        if replace:
            subprocess_task_handler.run_local_subprocess = own
        if _active is not None and _active is not _kept:
            _active.close()
        _active = None


@contextlib.contextmanager
def kept_servers(preload: tuple[str, ...] = PRELOAD) -> Iterator[None]:
    """Within the block, the servers that `warm_tasks` starts outlive it and serve the tasks of
    later `warm_tasks` blocks with the same environment and working directory; they close when
    this block ends. Several runs in one process (a test module's) then import the steps' modules
    once per environment, not once per run."""
    global _kept
    _kept = ForkServers(preload) if forks_here() else None
    try:
        yield
    finally:
        if _kept is not None:
            _kept.close()
        _kept = None


if __name__ == "__main__":
    main()
