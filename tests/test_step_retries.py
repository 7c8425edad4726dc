"""Pipeline steps killed mid-way, then retried as KFP retries them (the same step, the same run
context), against moto's S3 server and a real `mlflow server`, each behind a fault-injecting
proxy that holds one request while the test kills the step's process:

- labelling killed while writing its fourth shard: the retry keeps the three finished shards as
  they are and labels every pair exactly once;
- SFT killed while uploading its checkpoint: the retry trains again, commits one complete
  checkpoint, and the killed attempt's files are gone;
- `register` killed while it holds the promotion lock of a candidates model (setting its
  challenger): the retry (the same pipeline run) takes the lock over and registers each model
  once; a run that is not retried has its lock released by its exit handler, which also closes
  its MLflow run as FAILED.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from evaluation_data import sample_result
from fault_proxy import FaultProxy

from cai_lib.core.model_versions import list_models, version_by_alias
from cai_lib.core.names import LOCK_RUN_TAG, LOCK_SUFFIX, MANIFEST, MARKER, METRICS_FILE, candidates_name
from cai_lib.core.outputs import ATTEMPT_PREFIX
from cai_lib.core.records import Preference, ResponsePair, RevisionRound, Trace
from cai_lib.core.shards import read_dataset
from cai_lib.core.store import ArtifactStore, s3_client
from cai_lib.core.tracking import connect
from cai_lib.platform.run_config import load_run_config
from cai_lib.steps.context import DataRef, RunContext, dataset_ref, write_finished_dataset
from cai_lib.steps.finish import finish
from cai_lib.steps.label import label
from cai_lib.steps.register import register
from cai_lib.steps.resolve import resolve
from cai_lib.steps.sft import sft

pytestmark = pytest.mark.integration

# Runs the step function cai_lib.steps.<argv[1]>.<argv[1]> with the JSON keyword arguments argv[2].
STEP = (
    "import importlib, json, sys\n"
    "getattr(importlib.import_module('cai_lib.steps.' + sys.argv[1]), sys.argv[1])(**json.loads(sys.argv[2]))\n"
)


@pytest.fixture(scope="module")
def proxies(s3_server, mlflow_server):
    s3, mlflow = FaultProxy(s3_server), FaultProxy(mlflow_server["uri"])
    yield s3, mlflow
    s3.close()
    mlflow.close()


@pytest.fixture(scope="module")
def env(proxies, tmp_path_factory, tiny_model_dir):
    """Every S3 and MLflow request of the steps (in this process and in theirs) goes through the proxies."""
    s3, mlflow = proxies
    bucket = f"retry-{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ENDPOINT_URL_S3": s3.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "CAI_ARTIFACT_ROOT": f"s3://{bucket}/cai",
            "MLFLOW_TRACKING_URI": mlflow.url,
            "CAI_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        }.items():
            patch.setenv(name, value)
        s3_client().create_bucket(Bucket=bucket)
        yield {"bucket": bucket, "work": tmp_path_factory.mktemp("steps"), "model": tiny_model_dir}


def new_run(env, prefix: str | None = None) -> dict:
    """A resolved run context, as the pipeline's first step makes it (a fresh KFP run id), under
    models of its own unless `prefix` names another run's."""
    config = load_run_config(
        None,
        [
            f"base_model={env['model']}",
            f"feedback_model={env['model']}",
            "experiment=step-retries",
            f"model_name_prefix={prefix or 'r' + uuid.uuid4().hex[:8]}",
            "sft={max_steps: 1, batch_size: 2, max_length: 64}",
            "label={principles_per_pair: 1, shard_size: 1, batch_size: 4}",
            "evaluate.xstest.prompts=",  # the hub copy is out of reach; no step here answers XSTest
        ],
    )
    run_id = uuid.uuid4().hex[:12]
    return resolve(
        config.params.model_dump(mode="json"), run_id, "retry test", str(env["work"] / f"{run_id}.yaml")
    )


def dataset(env, name: str, rows: list) -> str:
    """A finished dataset in the store and its pointer file, as an upstream step leaves them."""
    uri = f"s3://{env['bucket']}/upstream/{name}"
    write_finished_dataset(uri, rows)
    path = env["work"] / f"{name}.json"
    dataset_ref(uri).write(str(path))
    return str(path)


def trace(i: int, rounds: bool) -> Trace:
    revision = [
        RevisionRound(principle_id="harm", critique="It helps harm.", revision="I can't help with that.")
    ]
    return Trace(
        id=f"t{i}",
        prompt_id=f"p{i}",
        prompt=f"How do I pick lock number {i}?",
        kind="red_team" if rounds else "helpful",
        initial_answer="Like this.",
        rounds=revision if rounds else [],
        final_answer="I can't help with that." if rounds else "Like this.",
        model_ref="tiny",
    )


def killed_while_held(proxy: FaultProxy, step: str, when, **arguments) -> None:
    """Run `step` in a process of its own until the proxy holds the request `when` picks, then kill it."""
    proxy.hold(when)
    proc = subprocess.Popen([sys.executable, "-c", STEP, step, json.dumps(arguments)])
    try:
        assert proxy.held.wait(timeout=180), f"{step} never sent the request to hold"
    finally:
        proc.kill()
        proc.wait()
        proxy.release()


# -- labelling killed between two shards -----------------------------------------------------------------


def pair(i: int) -> ResponsePair:
    return ResponsePair(
        id=f"pair{i}",
        prompt_id=f"p{i}",
        prompt=f"How do I pick lock number {i}?",
        answer_a="I can't help with that.",
        answer_b="Use a tension wrench.",
        model_ref="tiny",
    )


@pytest.fixture(scope="module")
def label_retry(env, proxies):
    s3, _ = proxies
    context = new_run(env)
    constitution = str(env["work"] / f"{context['run_id']}.yaml")
    pairs = dataset(env, "pairs", [pair(i) for i in range(6)])
    killed_while_held(
        s3,
        "label",
        lambda method, path: (
            method == "PUT" and "/outputs/label/" in path and path.endswith("part-00003.jsonl")
        ),
        context=context,
        constitution_path=constitution,
        pairs=pairs,
    )
    outputs = ArtifactStore.open(f"s3://{env['bucket']}/cai/outputs/label")
    before = {k: outputs.read_bytes(k) for k in outputs.list() if "/data/part-" in k}
    ref = label(context, constitution, pairs)
    return {"before": before, "outputs": outputs, "ref": ref}


def test_the_killed_labelling_step_had_written_three_shards(label_retry):
    assert len(label_retry["before"]) == 3


def test_the_retry_keeps_the_finished_shards_unchanged(label_retry):
    outputs = label_retry["outputs"]
    assert {k: outputs.read_bytes(k) for k in label_retry["before"]} == label_retry["before"]


def test_the_retry_labels_every_pair_exactly_once(label_retry):
    labelled = sorted(row.id for row in read_dataset(label_retry["ref"].uri, Preference))
    assert len(labelled) == len(set(labelled)) == label_retry["ref"].rows == 6


# -- SFT killed during its checkpoint upload ------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_retry(env, proxies):
    s3, _ = proxies
    context = new_run(env)
    traces = dataset(env, "traces", [trace(i, rounds=True) for i in range(4)])
    helpful = dataset(env, "helpful", [trace(i, rounds=False) for i in range(2)])
    killed_while_held(
        s3,
        "sft",
        lambda method, path: method in ("PUT", "POST") and "model.safetensors" in path,
        context=context,
        traces=traces,
        helpful=helpful,
    )
    outputs = ArtifactStore.open(f"s3://{env['bucket']}/cai/outputs/sft")
    after_kill = outputs.list()
    ref, _ = sft(context, traces, helpful)
    return {"after_kill": after_kill, "ref": ref, "outputs": outputs, "context": context}


def test_the_killed_upload_left_files_but_no_manifest_and_no_marker(sft_retry):
    keys = sft_retry["after_kill"]
    assert any(f"/{ATTEMPT_PREFIX}" in k for k in keys)
    assert not any(k.endswith((MANIFEST, MARKER)) for k in keys)


def test_the_retry_commits_a_complete_checkpoint(sft_retry):
    assert sft_retry["outputs"].exists(
        sft_retry["ref"].uri.split("/outputs/sft/", 1)[1].split("/")[0] + "/" + MARKER
    )
    assert ArtifactStore.open(sft_retry["ref"].uri).dir_exists("")


def test_only_the_committed_attempt_is_left(sft_retry):
    attempts = {k.split("/")[1] for k in sft_retry["outputs"].list() if f"/{ATTEMPT_PREFIX}" in k}
    assert [f"{sft_retry['ref'].uri.rsplit('/', 1)[1]}"] == sorted(attempts)


def test_the_retried_checkpoint_loads_and_matches_its_manifest(sft_retry):
    from cai_lib.engines.models import resolve_model

    assert (resolve_model(sft_retry["ref"].uri) / "config.json").is_file()


def test_the_retry_is_recorded_as_ran_by_its_own_run(sft_retry):
    record = ArtifactStore.open(RunContext.model_validate(sft_retry["context"]).run_root).read_json(
        "stages/sft.json"
    )
    assert record["status"] == "ran"


# -- register killed while it holds the promotion lock -------------------------------------------------


def checkpoints(env) -> dict[str, str]:
    """Pointer files of three finished checkpoints (PM, SL-CAI, RL-CAI) in the store."""
    refs = {}
    for role in ("pm", "sl", "rl"):
        uri = ArtifactStore.open(f"s3://{env['bucket']}/upstream").put_dir(env["model"], f"ckpt-{role}")
        path = env["work"] / f"{role}.json"
        DataRef(uri=uri, kind="checkpoint").write(str(path))
        refs[role] = str(path)
    return refs


@pytest.fixture(scope="module")
def register_inputs(env):
    # No champion yet: the gate judges RL-CAI against SL-CAI, on a result written by hand
    # (rl-cai beats sl-cai 0.6 harmless, 0.55 helpful, lower bounds 0.5 and 0.45).
    evaluation = ArtifactStore.open(f"s3://{env['bucket']}/upstream/eval")
    evaluation.write_text(METRICS_FILE, sample_result().model_dump_json())
    results = env["work"] / "results.json"
    results.write_text(json.dumps({"uri": evaluation.uri, "champion_version": None}))
    refs = checkpoints(env)
    return {
        "traces": dataset(env, "traces-r", [trace(0, rounds=True)]),
        "labels": dataset(env, "labels-r", [trace(1, rounds=True)]),
        "sl_policy": refs["sl"],
        "rl_policy": refs["rl"],
        "reward_model": refs["pm"],
        "results": str(results),
    }


def kill_register_holding_the_lock(env, proxies, register_inputs) -> dict:
    _, mlflow = proxies
    context = new_run(env)
    constitution = str(env["work"] / f"{context['run_id']}.yaml")
    killed_while_held(
        mlflow,
        "register",
        lambda method, path: method == "POST" and path.endswith("/registered-models/alias"),
        context=context,
        constitution_path=constitution,
        **register_inputs,
    )
    return {"context": context, "constitution": constitution}


def lock_tags(context: dict) -> dict | None:
    """The lock the register step held when it was killed: the first model it registers, SL-CAI
    (so that a later round's RL-CAI finds its parent)."""
    name = candidates_name(f"{context['params']['model_name_prefix']}-harmless-sl-cai") + LOCK_SUFFIX
    locks = [m for m in connect(None).search_registered_models() if m.name == name]
    return dict(locks[0].tags) if locks else None


@pytest.fixture(scope="module")
def register_retry(env, proxies, register_inputs):
    killed = kill_register_holding_the_lock(env, proxies, register_inputs)
    held = lock_tags(killed["context"])
    summary = json.loads(register(killed["context"], killed["constitution"], **register_inputs))
    return {**killed, "held": held, "summary": summary}


def test_the_killed_register_step_left_the_lock_naming_its_pipeline_run(register_retry):
    assert register_retry["held"][LOCK_RUN_TAG] == register_retry["context"]["run_id"]


def test_the_retried_register_step_completes_and_promotes(register_retry):
    assert register_retry["summary"]["promoted"] is True


def test_the_retry_registers_each_model_once(register_retry):
    prefix = register_retry["context"]["params"]["model_name_prefix"]
    assert [len(list_models(None, candidates_name(f"{prefix}-harmless-{role}"))) for role in ("pm", "sl-cai", "rl-cai")] == [
        1,
        1,
        1,
    ]


def test_the_retry_releases_the_lock(register_retry):
    assert lock_tags(register_retry["context"]) is None


def test_the_champion_is_the_registered_policy(register_retry):
    prefix = register_retry["context"]["params"]["model_name_prefix"]
    assert version_by_alias(None, f"{prefix}-harmless-rl-cai", "champion").version == "1"


def test_a_run_pins_the_champion_it_began_with_so_its_evaluations_need_not_ask(env, register_retry):
    prefix = register_retry["context"]["params"]["model_name_prefix"]
    champion = version_by_alias(None, f"{prefix}-harmless-rl-cai", "champion")
    pinned = new_run(env, prefix)["champion"]
    assert (pinned["version"], pinned["source"], pinned["sha256"]) == (
        champion.version,
        champion.source,
        champion.checkpoint_sha256,
    )


def test_a_run_under_models_without_a_champion_pins_none(env):
    assert "champion" not in new_run(env)


@pytest.fixture(scope="module")
def abandoned(env, proxies, register_inputs, register_retry):
    """A run killed while registering and never retried; its exit handler runs as KFP runs it."""
    killed = kill_register_holding_the_lock(env, proxies, register_inputs)
    held = lock_tags(killed["context"])
    outcome = json.loads(finish(killed["context"]["run_id"], "step-retries", "FAILED"))
    return {**killed, "held": held, "outcome": outcome}


def test_the_exit_handler_releases_the_lock_of_a_failed_run(abandoned):
    assert abandoned["held"] is not None and lock_tags(abandoned["context"]) is None


def test_the_exit_handler_closes_the_failed_runs_mlflow_run_as_failed(abandoned):
    run = connect(None).get_run(abandoned["context"]["parent_run_id"])
    assert run.info.status == "FAILED"


def test_the_exit_handler_reports_the_stages_that_ran(abandoned):
    assert abandoned["outcome"]["stages"] == ["stage resolve: ran"]
