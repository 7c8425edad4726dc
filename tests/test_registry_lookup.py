"""One rule for finding the model registry: `cai models list`, `cai promote` and `cai models fetch`
take --tracking-uri, else $MLFLOW_TRACKING_URI, else the store the last `cai run` in the working
directory recorded in .cai/last-run.json, else mlflow.db there. Local SQLite stores with a
tiny checkpoint registered directly; no training."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hand_lineage
from typer.testing import CliRunner

from cai_lib.cli import app
from cai_lib.core.errors import CaiError
from cai_lib.core.names import candidates_name
from cai_lib.core.store import ArtifactStore
from cai_lib.platform.registry.gate import PromotionGate
from cai_lib.platform.registry.lookup import LAST_RUN, find_registry, record_last_run
from cai_lib.platform.registry.promotion import promote
from cai_lib.platform.registry.versions import register_checkpoint, set_challenger

CAI = Path(sys.executable).parent / "cai"
MODEL = "cai-harmless-rl-cai"
LINEAGE = hand_lineage(
    constitution_sha256="c0" * 32, pipeline_run_id="cai-run-1", base_model="smollm2-135m-instruct"
)


@pytest.fixture(scope="session")
def blank_store(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made once: copies skip MLflow's migrations."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture
def champion_store(blank_store):
    """champion_store(db, artifacts, name): a SQLite registry at `db` whose model `name` has
    version 1, a tiny checkpoint under `artifacts`, as its challenger and champion (what a first
    `cai run` leaves); returns its tracking URI."""

    def make(db: Path, artifacts: Path, name: str = MODEL) -> str:
        uri = f"sqlite:///{db}"
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blank_store, db)
        local = artifacts.parent / f"ckpt-{name}"
        local.mkdir(parents=True)
        (local / "config.json").write_text(json.dumps({"hidden_size": 8}))
        (local / "model.safetensors").write_text(f"weights of {name}")
        checkpoint = ArtifactStore.open(str(artifacts)).put_dir(local, f"runs/cai-run-1/{name}")
        version = register_checkpoint(uri, candidates_name(name), checkpoint, None, LINEAGE).version
        set_challenger(uri, candidates_name(name), version)
        promote(uri, name, version, 0.7, 0.5, PromotionGate(), compared_with="sl-cai")
        return uri

    return make


@pytest.fixture
def nothing_set(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def after_cai_run(tmp_path, monkeypatch, nothing_set, champion_store) -> tuple[Path, str]:
    """A working directory as `cai run --quick` leaves it: mlflow.db with a champion, the
    checkpoint under .cai/artifacts and .cai/last-run.json; the current directory for the test."""
    work = tmp_path / "work"
    (work / ".cai").mkdir(parents=True)
    uri = champion_store(work / "mlflow.db", work / ".cai" / "artifacts")
    record_last_run(work, uri, str(work / ".cai" / "artifacts"), "cai-run-1")
    monkeypatch.chdir(work)
    return work, uri


def models_listed(*args: str) -> tuple[list[str], str]:
    """(the models whose champion `cai models list --json` prints, its stderr)."""
    result = CliRunner().invoke(app, ["models", "list", "--json", *args])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return [row["name"] for row in rows if "champion" in row["aliases"]], result.stderr


def test_after_cai_run_models_list_finds_its_store_with_no_environment_variable(after_cai_run):
    work, uri = after_cai_run

    names, stderr = models_listed()

    assert names == [MODEL]
    assert stderr == f"registry: {uri} (from the last `cai run` here ({work / LAST_RUN}, run cai-run-1))\n"


def test_a_run_given_its_own_tracking_uri_is_found_through_its_record(
    tmp_path, monkeypatch, nothing_set, champion_store
):
    # As `cai run --tracking-uri sqlite:///elsewhere/runs.db` leaves it: no mlflow.db here.
    work = tmp_path / "work"
    uri = champion_store(tmp_path / "runs.db", tmp_path / "artifacts")
    record_last_run(work, uri, str(tmp_path / "artifacts"), "cai-run-1")
    monkeypatch.chdir(work)

    names, _ = models_listed()

    assert names == [MODEL]
    assert not (work / "mlflow.db").exists()


def test_without_a_record_the_default_store_of_cai_run_here_is_used(after_cai_run):
    work, uri = after_cai_run
    (work / LAST_RUN).unlink()

    names, stderr = models_listed()

    assert names == [MODEL]
    assert stderr == f"registry: {uri} (from `cai run`'s default store here ({work / 'mlflow.db'}))\n"


def test_the_environment_beats_the_last_run(after_cai_run, tmp_path, monkeypatch, champion_store):
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", champion_store(tmp_path / "env.db", tmp_path / "env", "from-env")
    )

    names, stderr = models_listed()

    assert names == ["from-env"]
    assert stderr.endswith("(from $MLFLOW_TRACKING_URI)\n")


def test_the_flag_beats_the_environment(after_cai_run, tmp_path, monkeypatch, champion_store):
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", champion_store(tmp_path / "env.db", tmp_path / "env", "from-env")
    )
    flag = champion_store(tmp_path / "flag.db", tmp_path / "flag", "from-flag")

    names, stderr = models_listed("--tracking-uri", flag)

    assert names == ["from-flag"]
    assert stderr == ""  # the user typed it


def test_no_store_anywhere_is_one_line_naming_what_was_tried(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    done = subprocess.run(
        [str(CAI), "models", "list"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )

    assert done.returncode == 2
    assert done.stderr == (
        "error: no model registry found: --tracking-uri not given, $MLFLOW_TRACKING_URI not set, "
        f"no .cai/last-run.json or mlflow.db in {tmp_path} (`cai run` writes them); pass "
        "--tracking-uri, set MLFLOW_TRACKING_URI, or run this where `cai run` ran\n"
    )
    assert not (tmp_path / ".cai").exists()


def test_a_recorded_store_that_is_gone_is_refused_not_created_empty(after_cai_run):
    work, uri = after_cai_run
    db = work / "mlflow.db"
    db.rename(work / "moved.db")

    with pytest.raises(CaiError) as raised:
        find_registry(None)

    assert str(raised.value) == (
        f"no MLflow store at {uri} (from the last `cai run` here ({work / LAST_RUN}, run cai-run-1)): "
        f"{db} does not exist; pass --tracking-uri or set MLFLOW_TRACKING_URI to the store the run used"
    )
    assert not db.exists()


def test_an_unreachable_server_is_named_with_where_it_came_from(after_cai_run, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)

    with pytest.raises(
        CaiError, match=rf"^MLflow tracking server {dead} \(set by \$MLFLOW_TRACKING_URI\) did not"
    ):
        find_registry(None)


def test_the_readme_commands_after_cai_run_work_as_written(after_cai_run):
    work, uri = after_cai_run
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["CAI_CACHE_DIR"] = str(work / "cache")
    commands = [
        ["models", "list"],
        ["promote", "--model", MODEL],
        ["models", "fetch", f"models:/{MODEL}@champion", "--out", "served/"],
    ]

    done = [
        subprocess.run([str(CAI), *args], cwd=work, env=env, capture_output=True, text=True, check=False)
        for args in commands
    ]

    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr for d in done]
    assert {d.stderr.splitlines()[0] for d in done} == {
        f"registry: {uri} (from the last `cai run` here ({work / LAST_RUN}, run cai-run-1))"
    }
    assert done[1].stdout.startswith(f"promoted: {MODEL} candidate 1 is champion as version 1 (candidate 1 is already")
    assert (work / "served" / "model.safetensors").read_text() == f"weights of {MODEL}"


def test_cai_run_records_its_store_where_models_list_finds_it(
    tmp_path, monkeypatch, nothing_set, champion_store
):
    import pipelines.local

    def pipeline_that_registers(config, workdir, platform, warm):
        # Stands in for the pipeline: registers a version where `cai run` pointed the steps.
        champion_store(Path(platform.tracking_uri.removeprefix("sqlite:///")), tmp_path / "artifacts")
        return {
            "run_id": "cai-run-1",
            "run_root": f"{platform.artifact_root}/runs/cai-run-1",
            "report": "report.html",
            "versions": {},
            "promoted": True,
            "reason": "first version",
            "mlflow_tracking_uri": platform.tracking_uri,
            "experiment": "constitutional-ai",
            "ui_command": "mlflow ui",
            "stages": [],
        }

    monkeypatch.setattr(pipelines.local, "run_local", pipeline_that_registers)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    ran = CliRunner().invoke(app, ["run", "--quick", "--tracking-uri", "sqlite:///store/runs.db"])
    names, stderr = models_listed()

    assert ran.exit_code == 0, ran.output
    uri = f"sqlite:///{work / 'store' / 'runs.db'}"
    assert (
        f"MLflow:       {uri} (experiment 'constitutional-ai'; recorded in .cai/last-run.json" in ran.stdout
    )
    assert json.loads((work / LAST_RUN).read_text())["artifact_root"] == str(work / ".cai" / "artifacts")
    assert names == [MODEL]
    assert stderr == f"registry: {uri} (from the last `cai run` here ({work / LAST_RUN}, run cai-run-1))\n"


def test_after_cai_run_mlflow_itself_finds_the_champion_with_nothing_set(after_cai_run):
    work, _ = after_cai_run
    script = "from mlflow import MlflowClient; print(MlflowClient().get_model_version_by_alias('%s', 'champion').version)"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-c", script % MODEL],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "1"), done.stderr
