"""A kfp.local task run in a fork of a warm server (pipelines/fork_server.py) does what the fresh
process kfp.local would start does: the same result and exit code, only its own environment, and
an end like an interpreter's. Each server here imports only small modules; the pipeline runs of
tests/test_pipeline_e2e.py use the real list."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipelines.fork_server import (
    ForkServers,
    component_script,
    kept_servers,
    lightweight_task,
    run_command,
    warm_tasks,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADER = "import kfp\nfrom kfp import dsl\nfrom kfp.dsl import *\nfrom typing import *\n\n"


def task_command(folder: Path, body: str, x: int = 1) -> tuple[list[str], Path]:
    """The command kfp.local runs for a component `def task(x: int) -> str` with `body`, and the
    executor output file its returned value goes to (read it with `returned`)."""
    source = HEADER + "def task(x: int) -> str:\n" + textwrap.indent(textwrap.dedent(body), "    ")
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / "executor_output.json"
    executor_input = {
        "inputs": {"parameterValues": {"x": x}},
        "outputs": {
            "parameters": {"Output": {"outputFile": str(folder / "Output")}},
            "outputFile": str(output),
        },
    }
    script = component_script().replace("python3", sys.executable)
    args = ["--executor_input", json.dumps(executor_input), "--function_to_execute", "task"]
    return ["sh", "-ec", script, source, *args], output


def returned(output: Path) -> str:
    return json.loads(output.read_text())["parameterValues"]["Output"]


def env_with(tmp_path: Path, **variables: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path), **variables}


@pytest.fixture
def servers(tmp_path):
    """Fork servers that import json and this test's `fork_probe`, which records at import the
    setting a server started with."""
    (tmp_path / "fork_probe.py").write_text("import os\nSEEN = os.environ.get('STEP_SETTING')\n")
    pool = ForkServers(preload=("json", "fork_probe"))
    yield pool
    pool.close()


def test_a_task_in_a_fork_returns_what_it_returns_in_a_fresh_process(servers, tmp_path):
    body = "import os\nreturn f\"{x + 1} {os.environ['STEP_SETTING']}\"\n"
    forked, forked_output = task_command(tmp_path / "forked", body)
    fresh, fresh_output = task_command(tmp_path / "fresh", body)
    env = env_with(tmp_path, STEP_SETTING="a")
    assert servers.run(lightweight_task(forked), env) == 0
    assert subprocess.run(fresh, env=env, capture_output=True).returncode == 0
    assert returned(forked_output) == returned(fresh_output) == "2 a"


def test_a_task_sees_only_the_environment_it_is_given(servers, tmp_path, monkeypatch):
    monkeypatch.setenv("NOT_FOR_STEPS", "1")
    command, output = task_command(
        tmp_path / "t", "import os\nreturn os.environ.get('NOT_FOR_STEPS', 'absent')\n"
    )
    assert servers.run(lightweight_task(command), env_with(tmp_path)) == 0
    assert returned(output) == "absent"


def test_what_was_imported_before_the_fork_saw_the_environment_of_the_task(servers, tmp_path):
    body = "import fork_probe\nreturn fork_probe.SEEN\n"
    seen = []
    for setting in ("first", "second"):
        command, output = task_command(tmp_path / setting, body)
        assert servers.run(lightweight_task(command), env_with(tmp_path, STEP_SETTING=setting)) == 0
        seen.append(returned(output))
    assert seen == ["first", "second"]


def test_a_failing_task_exits_1_and_prints_its_traceback(servers, tmp_path, capsys):
    command, _ = task_command(tmp_path / "t", "raise ValueError(f'boom {x}')\n")
    assert servers.run(lightweight_task(command), env_with(tmp_path)) == 1
    assert "ValueError: boom 1" in capsys.readouterr().out


def test_a_task_killed_by_a_signal_returns_minus_the_signal_as_popen_does(servers, tmp_path):
    command, _ = task_command(tmp_path / "t", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert servers.run(lightweight_task(command), env_with(tmp_path)) == -signal.SIGKILL


def test_a_task_ends_as_an_interpreter_does_running_atexit_and_joining_its_threads(servers, tmp_path):
    body = f"""\
    import atexit, pathlib, threading, time
    atexit.register(pathlib.Path({str(tmp_path / "atexit")!r}).write_text, "ran")
    def late():
        time.sleep(0.5)
        pathlib.Path({str(tmp_path / "thread")!r}).write_text("ran")
    threading.Thread(target=late).start()
    return "returned"
    """
    command, _ = task_command(tmp_path / "t", body)
    assert servers.run(lightweight_task(command), env_with(tmp_path)) == 0
    assert ((tmp_path / "atexit").read_text(), (tmp_path / "thread").read_text()) == ("ran", "ran")


def test_a_server_that_has_a_python_thread_refuses_and_the_task_runs_in_a_fresh_process(tmp_path, servers):
    (tmp_path / "threaded.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    )
    # A fork of that server would have `threaded` imported already; a fresh Python has not.
    command, output = task_command(tmp_path / "t", "import sys\nreturn str('threaded' in sys.modules)\n")
    with warm_tasks(preload=("threaded",)):
        assert run_command(command, env_with(tmp_path)) == 0
    assert returned(output) == "False"


def test_the_script_it_recognises_is_the_one_in_every_step_of_the_committed_pipeline():
    pipeline_spec = next(yaml.safe_load_all((REPO_ROOT / "pipelines" / "cai_pipeline.yaml").read_text()))
    commands = [e["container"]["command"] for e in pipeline_spec["deploymentSpec"]["executors"].values()]
    assert {command[2] for command in commands} == {component_script()}


def test_a_command_that_installs_packages_first_is_not_one_it_runs():
    from kfp.dsl import component_factory

    def with_packages() -> None:
        pass

    command, args = component_factory._get_command_and_args_for_lightweight_component(with_packages)
    pip_first = ["sh", "-c", 'python3 -m pip install six && "$0" "$@"', *command, *args]
    assert lightweight_task(pip_first) is None


def server_of_a_task(tmp_path: Path, name: str) -> int:
    """Through `run_command`, a task that returns the pid of the process that imported
    `server_probe`: its server, since a fork has the module already (checked: not the task)."""
    body = "import os, server_probe\nreturn f'{server_probe.PID} {os.getpid()}'\n"
    command, output = task_command(tmp_path / name, body)
    assert run_command(command, env_with(tmp_path)) == 0
    server, task = map(int, returned(output).split())
    assert server != task, "the task ran in a fresh process, not in a fork of a server"
    return server


@pytest.fixture
def server_probe(tmp_path):
    """Preload for fork servers: `server_probe`, which records the pid of the process importing it."""
    (tmp_path / "server_probe.py").write_text("import os\nPID = os.getpid()\n")
    return ("server_probe",)


def test_kept_servers_serve_the_tasks_of_a_later_run_and_close_when_the_block_ends(tmp_path, server_probe):
    with kept_servers(preload=server_probe):
        with warm_tasks(preload=server_probe):
            first = server_of_a_task(tmp_path, "first")
        with warm_tasks(preload=server_probe):
            second = server_of_a_task(tmp_path, "second")
        assert first == second != os.getpid()
        os.kill(first, 0)  # still running between the runs
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)


def test_without_kept_servers_each_run_starts_its_own(tmp_path, server_probe):
    with warm_tasks(preload=server_probe):
        first = server_of_a_task(tmp_path, "first")
    with warm_tasks(preload=server_probe):
        second = server_of_a_task(tmp_path, "second")
    assert first != second
