"""Fixtures that start the real parts tests need: moto's S3 server, an `mlflow server` and the
PostgreSQL cluster it stores its runs and registry in (tests/postgres_fixture.py).

All run as separate processes on 127.0.0.1 with free ports, for the whole test session (under
pytest-xdist, for each worker's session: each worker has its own servers, ports and temporary
directories).

It also sorts the tests into tiers (see "Test tiers" below): a test that starts a server, makes or
loads a model, or runs a pipeline is marked `server`, `model` or `pipeline` from the fixtures it
uses; `make test-fast` runs the tests that have none of these marks, `make test` runs them all.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from model_fixtures import smollm2_tokenizer_dir, tiny_model_dir, tiny_reward_model_dir  # noqa: F401
from postgres_fixture import postgres_server  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base-test-dev.jsonl.gz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def wait_for_api(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until the MLflow REST API answers: its first request also opens the backend store."""
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited early with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server on 127.0.0.1:{port} did not answer its REST API within {timeout}s")


def shared_file(path: Path) -> Path:
    """`path` under ../shared/data; the test is skipped with a reason where a clone has none."""
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (only CI and developer machines have it)")
    return path


@pytest.fixture(scope="session")
def hh_rlhf_path() -> Path:
    """The shared hh-rlhf rows."""
    return shared_file(HH_RLHF)


@pytest.fixture(scope="session")
def xstest_prompts_path() -> Path:
    """XSTest's 450 prompts as its authors publish them (xstest_prompts.csv)."""
    return shared_file(SHARED_DATA / "xstest" / "xstest_prompts.csv")


@pytest.fixture(scope="session")
def mistral_completions_path() -> Path:
    """XSTest's human-labelled Mistral-7B-Instruct completions."""
    return shared_file(SHARED_DATA / "xstest" / "xstest_v2_completions_mistralinstruct.csv")


@pytest.fixture
def hub_offline(tmp_path, monkeypatch) -> Path:
    """The Hugging Face hub offline, with an empty cache in `tmp_path` (returned: HF_HOME), as on a
    machine without a network or a copy. huggingface_hub and datasets read these variables when
    they are imported, which an earlier test in the process may have done, so their constants are
    set too; otherwise a download is tried, and fails only when the network's timeout runs out."""
    import datasets.config
    import huggingface_hub.constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in (huggingface_hub.constants, datasets.config):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return home


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server as a subprocess; yields its endpoint URL."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
    )
    try:
        wait_for_port(port, proc, "moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 at the moto server with test credentials; yields the endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "2")
    return s3_server


@pytest.fixture
def s3_bucket(s3_env) -> str:
    """A fresh, empty bucket on the moto server; yields its name."""
    from cai_lib.core.store import s3_client

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


# Lines for the end of the test log, e.g. which backend store the mlflow server ran on.
SESSION_NOTES: list[str] = []


def say(config: pytest.Config, line: str) -> None:
    """Write `line` to the terminal now, past output capture, and again in the final summary."""
    SESSION_NOTES.append(line)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    capture = config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 0):
            reporter.write("\n")  # after -q's progress dots
        reporter.write_line(line)


def pytest_terminal_summary(terminalreporter):
    for line in SESSION_NOTES:
        terminalreporter.write_line(line)


def mlflow_backend_store(request, work: Path) -> tuple[str, str, str]:
    """(backend, --backend-store-uri, what it is) for the mlflow server: PostgreSQL as in
    production where its server binaries and psycopg2 are here, else SQLite. The environment
    variable CAI_TEST_MLFLOW_BACKEND=postgresql makes a missing PostgreSQL an error (for CI),
    =sqlite forces SQLite.
    """
    from postgres_fixture import find_postgres

    wanted = os.environ.get("CAI_TEST_MLFLOW_BACKEND", "")
    if wanted not in ("", "postgresql", "sqlite"):
        raise RuntimeError(f"CAI_TEST_MLFLOW_BACKEND={wanted!r}: expected postgresql or sqlite")
    if wanted == "sqlite":
        reason = "CAI_TEST_MLFLOW_BACKEND=sqlite"
    else:
        binaries, reason = find_postgres()
        if binaries is not None and importlib.util.find_spec("psycopg2") is None:
            binaries, reason = None, "psycopg2 is not installed (the dev extras install psycopg2-binary)"
        if binaries is not None:
            pg = request.getfixturevalue("postgres_server")
            return (
                "postgresql",
                pg["uri"],
                f"PostgreSQL {pg['version']} on 127.0.0.1:{pg['port']}, cluster up in {pg['started_s']:.1f}s",
            )
        if wanted == "postgresql":
            raise RuntimeError(f"CAI_TEST_MLFLOW_BACKEND=postgresql but {reason}")
    return "sqlite", f"sqlite:///{work / 'mlflow.db'}", f"not PostgreSQL: {reason}"


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory, s3_server):
    """A real `mlflow server` (PostgreSQL backend store, else SQLite; artifacts in a bucket on the
    moto server).

    Yields a dict with `uri` (tracking URI), `port`, `restart()` to bounce the process, `env`,
    `backend` ("postgresql" or "sqlite"), `backend_store_uri` and `backend_note` (which server, or
    why not PostgreSQL).
    """
    from cai_lib.core.store import s3_client

    work = tmp_path_factory.mktemp("mlflow")
    backend, backend_store_uri, backend_note = mlflow_backend_store(request, work)
    env = dict(
        os.environ,
        AWS_ENDPOINT_URL_S3=s3_server,
        MLFLOW_S3_ENDPOINT_URL=s3_server,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        # Without this, `mlflow server` also starts a job runner and seven huey consumers, each
        # importing mlflow: minutes of CPU on a 2-core machine, for jobs no test runs.
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        # Webhooks to a receiver on 127.0.0.1 over http, with secrets the restarted server can still read.
        MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
        MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
        MLFLOW_WEBHOOK_CACHE_TTL="1",  # a webhook registered by one test is used by the next at once
        MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=base64.urlsafe_b64encode(
            b"cai-test-webhook-key-32-bytes!!!"
        ).decode(),
    )
    saved = {
        k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    os.environ.update({k: env[k] for k in saved})
    s3_client().create_bucket(Bucket="mlflow-artifacts")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        "s3://mlflow-artifacts/mlflow",
        "--workers",
        "1",
    ]
    log = open(work / "mlflow.log", "a")  # noqa: SIM115 - open while the server runs
    state = {"proc": None}

    def start():
        # A session of its own, so stop() can signal uvicorn (a child of `mlflow server`) too.
        state["proc"] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
        wait_for_port(port, state["proc"], f"mlflow server (log: {work / 'mlflow.log'})", timeout=120)
        wait_for_api(port, state["proc"], timeout=120)

    def stop():
        os.killpg(state["proc"].pid, signal.SIGTERM)
        try:
            state["proc"].wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(state["proc"].pid, signal.SIGKILL)
            state["proc"].wait(timeout=20)

    def restart():
        stop()
        start()

    began = time.monotonic()
    start()
    say(
        request.config,
        f"mlflow server: backend store {backend} ({backend_note}); "
        f"server answered in {time.monotonic() - began:.1f}s",
    )
    try:
        yield {
            "uri": f"http://127.0.0.1:{port}",
            "port": port,
            "restart": restart,
            "env": env,
            "backend": backend,
            "backend_store_uri": backend_store_uri,
            "backend_note": backend_note,
        }
    finally:
        stop()
        log.close()


def hand_lineage(**changes):
    """A `Lineage` for checkpoints registered by hand in tests (constitution harmless@1.0.0)."""
    from cai_lib.core.model_versions import Lineage

    values = {
        "constitution_name": "harmless",
        "constitution_version": "1.0.0",
        "constitution_sha256": "0" * 64,
        "pipeline_run_id": "run-1",
        "base_model": "tiny",
    }
    return Lineage(**{**values, **changes})


# -- Test tiers -----------------------------------------------------------------------------------------
#
# The fixtures that start a server (a process, or a stand-in API on a thread of this process), make or
# load a model, or run a pipeline, named by the module that defines them. A test gets the tier's marker
# when one of these is anywhere in its fixture closure, so nobody marks such tests by hand; a fixture
# that only builds on one of them (s3_bucket on s3_server, tiny_backend on tiny_model_dir) needs no
# entry. The few tests that start such a thing in their own body carry the marker by hand.
TIER_FIXTURES: dict[str, tuple[str, ...]] = {
    "server": (
        "conftest.s3_server",  # moto's S3 server
        "conftest.mlflow_server",
        "postgres_fixture.postgres_server",
        "test_pyfunc_model.served_champion",  # `mlflow models serve`
        "test_retrain.kfp",  # the KFP API stand-in behind a real kfp.Client
        "test_submit.kfp_server",
        "test_submit.multi_user_kfp",
        "test_serving.cluster",  # the Kubernetes API stand-in
        "test_serving.receiving",  # `cai serve webhook`'s receiver
        "test_webhook.receiver",  # a live `cai serve webhook` process
        "test_cluster_versions.old_kfp",  # the KFP API stand-in of an older backend
        "test_step_retries.proxies",  # fault-injecting proxies
        "test_store.unavailable_s3",
        "test_store.proxied_s3",
        "test_mlflow_accounts.setup_runs",  # `mlflow server` with auth, and `cai mlflow setup-accounts`
        "test_fork_server.servers",  # warm processes that fork kfp.local tasks
        "test_fork_server.server_probe",  # a module whose import records the warm process that made it
    ),
    "model": (
        # Every model fixture builds on the tokenizer read from the embedded GGUF file.
        "model_fixtures.smollm2_tokenizer_dir",
        "model_fixtures.tiny_model_dir",
        "model_fixtures.tiny_reward_model_dir",
    ),
    "pipeline": tuple(
        f"test_pipeline_e2e.{run}"
        for run in ("first_run", "second_run", "one_shard_run", "third_run", "failed_run")
    )
    + tuple(f"test_iterated_e2e.{run}" for run in ("first_run", "second_run", "gated_run")),
}
# What `make test-fast` leaves out: these tiers, the real SmolLM2 and several real servers
# (`integration`, by hand) and vLLM on a GPU (`gpu`, by hand).
SLOW_TIERS = ("server", "model", "pipeline", "integration", "gpu")
_TIER_OF = {key: tier for tier, keys in TIER_FIXTURES.items() for key in keys}


def fixture_key(fixturedef) -> str:
    """`module.name` of a fixture definition, e.g. conftest.s3_server."""
    return f"{fixturedef.func.__module__}.{fixturedef.argname}"


def tiers_of(item: pytest.Item) -> set[str]:
    """The tiers of the fixtures in `item`'s closure (every fixture it uses, directly or not)."""
    definitions = getattr(item, "_fixtureinfo", None)
    if definitions is None:  # not a test function (e.g. a doctest)
        return set()
    return {
        _TIER_OF[fixture_key(fixturedef)]
        for name in item.fixturenames
        for fixturedef in definitions.name2fixturedefs.get(name, ())
        if fixture_key(fixturedef) in _TIER_OF
    }


# The order modules start in: under `pytest -n 2 --dist loadscope` each module goes to one worker as a
# whole (its module fixtures are built once), in this order, so the longest modules start first and the
# short ones fill in beside them.
_TIER_WEIGHT = {"pipeline": 8, "integration": 4, "server": 2, "model": 1}


# pytest-timeout's default (`timeout` in pyproject.toml) ends a test that hangs. A test's time includes
# the setup of the fixtures it is the first to use, and the first test to use each of the pipeline
# module's runs waits for a whole kfp.local pipeline run (minutes on 2 cores); those tests get longer,
# unless the command line sets a timeout of its own (`--timeout=0`: none, on a heavily shared machine).
PIPELINE_TIMEOUT_S = 1800


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = tiers_of(item)
        for tier in sorted(tiers):
            item.add_marker(tier)
        explicit = config.getoption("timeout", None) is not None or item.get_closest_marker("timeout")
        if "pipeline" in tiers and not explicit:
            item.add_marker(pytest.mark.timeout(PIPELINE_TIMEOUT_S))
    weight: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        marks = {mark.name for mark in item.iter_markers()}
        weight[module] = max(weight.get(module, 0), sum(_TIER_WEIGHT.get(mark, 0) for mark in marks))
    items.sort(key=lambda item: -weight[item.nodeid.split("::", 1)[0]])  # stable: modules stay whole


# Checks at run time that the tiers hold: a fast-tier test that starts one of the fixtures above (by
# request.getfixturevalue, which the closure cannot see) or listens on a socket fails, naming the marker
# it lacks.
_RUNNING: list[pytest.Item] = []


def _missing_tier(tier: str) -> str | None:
    """None, or why the running test must carry `tier`'s marker."""
    if not _RUNNING:
        return None
    item = _RUNNING[-1]
    if any(item.get_closest_marker(name) for name in SLOW_TIERS):
        return None
    return f"{item.nodeid} starts a {tier} but has no `{tier}` marker (tests/conftest.py, Test tiers)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING.append(item)
    try:
        return (yield)
    finally:
        _RUNNING.pop()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    tier = _TIER_OF.get(fixture_key(fixturedef))
    problem = tier and _missing_tier(tier)
    if problem:
        pytest.fail(f"{problem}: it uses the fixture {fixture_key(fixturedef)}", pytrace=False)
    return (yield)


_listen = socket.socket.listen


def _listen_if_marked(self, *args):
    problem = _missing_tier("server")
    if problem:
        pytest.fail(f"{problem}: it listens on {self.getsockname()}", pytrace=False)
    return _listen(self, *args)


def pytest_configure(config: pytest.Config) -> None:
    socket.socket.listen = _listen_if_marked
    # Under pytest-xdist the workers share the cores. By default torch runs one thread per core in
    # every process, so on 2 cores two workers run four threads that wait on each other: 24 tests of
    # tests/test_sft.py and tests/test_rl.py took 66% more CPU time and 54% more wall time with two
    # threads than with one, on a busy 2-core machine. The variable also reaches the steps, servers and
    # torchrun processes the tests start.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


def pytest_unconfigure(config: pytest.Config) -> None:
    socket.socket.listen = _listen
