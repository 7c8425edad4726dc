"""Multi-node training through Kubeflow Trainer v2: the TrainJob a step creates, field by field,
and the step's launch-wait-logs-fail logic against a STAND-IN for the Kubernetes API
(tests/kubernetes_standin.py; no cluster runs here). In the success and failure cases the
stand-in runs the TrainJob's own command for real: two local torchrun "nodes" on the CPU."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from kubernetes_standin import KubernetesStandIn

from cai_lib.core.deploy import DeployConfig, default_gpu_profile
from cai_lib.core.errors import CaiError
from cai_lib.core.names import MANIFEST
from cai_lib.core.records import Preference, stable_id
from cai_lib.engines.launch import TrainingJob, staged_rows
from cai_lib.engines.trainjob import (
    ATTEMPT_LABEL,
    OUTPUT_LABEL,
    RUN_LABEL,
    Cancelled,
    TrainJobPlan,
    job_name,
    output_label,
    plan_of,
    render,
    run_trainjob,
    shared_data,
    trainer_and_options,
)

NAMESPACE = "team-a"
OUT = "s3://bucket/artifacts/outputs/sft/0123abcd/attempt-20261202T000000-abcdef12"
JOB_URI = f"{OUT}.trainjob/job.json"
RUN = "6f1c2a9e-0d4b-4b8e-9a53-2f3c1d0e7b11"  # a KFP run id


def two_node_deploy(**profile) -> DeployConfig:
    settings = {
        "num_nodes": 2,
        "accelerator_count": 8,
        "cpu_request": "64",
        "memory_request": "800Gi",
        "memory_limit": "900Gi",
        **profile,
    }
    return DeployConfig(resources={"sft": default_gpu_profile().model_copy(update=settings)})


@pytest.fixture(scope="module")
def manifest() -> dict:
    return render(plan_of("sft", two_node_deploy()), JOB_URI, OUT, NAMESPACE, RUN)


def test_the_trainjob_is_named_and_labelled_by_its_run_and_attempt(manifest):
    assert manifest["metadata"]["name"] == job_name("sft", OUT, RUN)
    assert manifest["metadata"]["labels"] == {
        "cai-platform.io/stage": "sft",
        OUTPUT_LABEL: output_label(OUT),
        RUN_LABEL: RUN,
        ATTEMPT_LABEL: "attempt-20261202T000000-abcdef12",
    }
    assert job_name("sft", OUT, "another-run") != job_name("sft", OUT, RUN)


def node_container_env(manifest: dict) -> dict[str, dict]:
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"
    ][0]
    (container,) = patch["template"]["spec"]["template"]["spec"]["containers"]
    assert patch["name"] == container["name"] == "node"
    return {entry["name"]: entry["valueFrom"] for entry in container["env"]}


def test_the_trainjob_runs_on_the_torch_distributed_cluster_runtime(manifest):
    assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
    assert manifest["spec"]["runtimeRef"] == {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"}


def test_the_trainjob_asks_for_each_node_and_its_gpus(manifest):
    trainer = manifest["spec"]["trainer"]

    assert trainer["numNodes"] == 2
    # the profile's memory limit, not its request: the SDK makes both the node's request and limit
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "8", "cpu": "64", "memory": "900Gi"}
    assert trainer["resourcesPerNode"]["requests"] == trainer["resourcesPerNode"]["limits"]
    assert trainer["image"] == DeployConfig().image_gpu


def test_the_trainjob_runs_the_training_entry_point_under_torchrun(manifest):
    assert manifest["spec"]["trainer"]["command"] == ["torchrun", "-m", "cai_lib.engines.launch", JOB_URI]


def test_the_trainjob_gets_the_steps_secrets_and_settings_as_env(manifest):
    env = node_container_env(manifest)

    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "cai-s3", "key": "AWS_ACCESS_KEY_ID", "optional": False}
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["name"] == "cai-mlflow"
    assert env["CAI_ARTIFACT_ROOT"] == {
        "configMapKeyRef": {"name": "cai-env", "key": "CAI_ARTIFACT_ROOT", "optional": True}
    }


def test_the_trainjob_has_a_deadline_and_lands_on_gpu_nodes(manifest):
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"
    ][0]
    pod = patch["template"]["spec"]["template"]["spec"]

    assert manifest["spec"]["activeDeadlineSeconds"] == 7 * 24 * 3600
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_each_node_mounts_a_memory_backed_dev_shm_of_the_profiles_size(manifest):
    patch = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"
    ][0]
    pod = patch["template"]["spec"]["template"]["spec"]

    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]


def test_a_profile_asking_for_more_than_its_limit_is_refused():
    with pytest.raises(ValueError, match="memory_request 900Gi is more than memory_limit 64Gi"):
        two_node_deploy(memory_request="900Gi", memory_limit="64Gi")


def test_the_sdks_trainjob_model_accepts_the_manifest(manifest):
    from kubeflow_trainer_api import models

    assert models.TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest


def test_a_single_node_profile_makes_no_trainjob():
    assert plan_of("sft", DeployConfig()) is None


def test_several_nodes_for_a_stage_that_cannot_run_distributed_are_refused():
    profile = default_gpu_profile().model_copy(update={"num_nodes": 2})

    with pytest.raises(ValueError, match="resources.label: num_nodes 2, but only the training stages"):
        DeployConfig(resources={"label": profile})


def test_more_processes_than_accelerators_in_a_profile_are_refused():
    from cai_lib.platform.run_config import load_run_config

    with pytest.raises(CaiError, match=r"params.sft.processes 4: more than the 1 accelerator\(s\) per pod"):
        load_run_config(overrides=["sft.processes=4"])


# -- the step against the stand-in Kubernetes API ---------------------------------------------------


def client_of(standin: KubernetesStandIn, namespace: str = NAMESPACE):
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
    from kubernetes.client import Configuration

    configuration = Configuration()
    configuration.host = standin.url
    return TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=configuration))


def pm_job(tmp_path, model: str) -> TrainingJob:
    pairs = [
        Preference(id=stable_id("ai", str(i)), prompt=f"Like? {i}", answer_a=f"Apples {i}.", answer_b=f"Stones {i}.",
                   label=0.9, source="ai")
        for i in range(8)
    ]  # fmt: skip
    (tmp_path / "outputs").mkdir()
    return TrainingJob(
        stage="train_pm",
        model=model,
        out=str(tmp_path / "outputs" / "attempt-1"),
        data={"ai": staged_rows(tmp_path, "ai", pairs)},
        config={"batch_size": 2, "eval_fraction": 0.25, "max_length": 48, "use_cpu": True},
    )


def pm_plan(**overrides) -> TrainJobPlan:
    deploy = DeployConfig(resources={"train_pm": default_gpu_profile().model_copy(update={"num_nodes": 2})})
    return plan_of("train_pm", deploy).model_copy(update={"poll_seconds": 1, **overrides})


@pytest.fixture(autouse=True)
def in_a_pipeline_run(monkeypatch):
    """The steps run inside a stage run, which names the pipeline run."""
    monkeypatch.setenv("CAI_PIPELINE_RUN_ID", RUN)


@pytest.mark.server  # its own KubernetesStandIn
def test_a_two_node_trainjob_trains_streams_node_0s_log_and_returns_rank_0s_metrics(tiny_model_dir, tmp_path):
    job, lines = pm_job(tmp_path, str(tiny_model_dir)), []
    with KubernetesStandIn(tmp_path) as standin:
        metrics = run_trainjob(client_of(standin), pm_plan(schedule_timeout_seconds=60), job, lines.append)
        (created,) = standin.created

    assert metrics["world"]["world_size"] == 2 and [r["rank"] for r in metrics["world"]["ranks"]] == [0, 1]
    assert (tmp_path / "outputs" / "attempt-1" / MANIFEST).is_file()
    assert any("trained on 2 process(es)" in line for line in lines), lines
    assert created["metadata"]["name"] == job_name("train_pm", job.out, RUN)
    assert created["spec"] == render(pm_plan(), f"{job.out}.trainjob/job.json", job.out, NAMESPACE, RUN)["spec"]


@pytest.mark.server  # its own KubernetesStandIn
def test_a_failed_trainjob_fails_the_step_with_its_events(tmp_path):
    job = pm_job(tmp_path, str(tmp_path / "no-such-model"))
    with KubernetesStandIn(tmp_path) as standin, pytest.raises(CaiError) as failure:
        run_trainjob(client_of(standin), pm_plan(schedule_timeout_seconds=60), job, lambda line: None)

    assert f"TrainJob {job_name('train_pm', job.out, RUN)} failed" in str(failure.value)
    assert "BackoffLimitExceeded: container node exited with code" in str(failure.value)


@pytest.mark.server  # its own KubernetesStandIn
def test_a_trainjob_whose_nodes_never_run_is_deleted_after_the_schedule_timeout(tmp_path):
    job = pm_job(tmp_path, "unused")
    with KubernetesStandIn(tmp_path, schedulable=False) as standin, pytest.raises(CaiError) as failure:
        run_trainjob(client_of(standin), pm_plan(schedule_timeout_seconds=3), job, lambda line: None)

    assert "were not all running after 3 s; deleted it" in str(failure.value)
    assert "FailedScheduling: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in str(failure.value)
    assert standin.deleted == [(NAMESPACE, job_name("train_pm", job.out, RUN))]


@pytest.mark.server  # its own KubernetesStandIn
def test_a_cancelled_step_deletes_its_trainjob(tmp_path):
    job = pm_job(tmp_path, "unused")
    # KFP cancels a run by deleting its pods: the step's process receives SIGTERM.
    threading.Timer(3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with KubernetesStandIn(tmp_path, schedulable=False) as standin, pytest.raises(Cancelled):
        run_trainjob(client_of(standin), pm_plan(schedule_timeout_seconds=60), job, lambda line: None)

    assert standin.deleted == [(NAMESPACE, job_name("train_pm", job.out, RUN))]


def left_running(client, out: str, run_id: str) -> str:
    """A TrainJob that run `run_id` created for the output attempt `out` and did not delete."""
    name = job_name("train_pm", out, run_id)
    trainer, options = trainer_and_options(pm_plan(), f"{out}.trainjob/job.json", name, out, run_id)
    client.train(runtime=client.get_runtime("torch-distributed"), trainer=trainer, options=options)
    return name


@pytest.mark.server  # its own KubernetesStandIn
def test_a_retried_step_deletes_the_trainjob_an_earlier_attempt_of_its_run_left(tmp_path):
    job = pm_job(tmp_path, "unused")
    with KubernetesStandIn(tmp_path, schedulable=False) as standin:
        client = client_of(standin)
        earlier = left_running(client, job.out.replace("attempt-1", "attempt-0"), RUN)
        with pytest.raises(CaiError):
            run_trainjob(client, pm_plan(schedule_timeout_seconds=2), job, lambda line: None)

    assert standin.deleted[0] == (NAMESPACE, earlier)


@pytest.mark.server  # its own KubernetesStandIn
def test_a_step_leaves_alone_the_trainjob_another_run_has_on_the_same_output(tmp_path):
    """Outputs are shared by content: two runs can train the same output key at once."""
    job = pm_job(tmp_path, "unused")
    with KubernetesStandIn(tmp_path, schedulable=False) as standin:
        client = client_of(standin)
        others = left_running(client, job.out.replace("attempt-1", "attempt-0"), "another-run")
        with pytest.raises(CaiError):
            run_trainjob(client, pm_plan(schedule_timeout_seconds=2), job, lambda line: None)

    assert standin.deleted == [(NAMESPACE, job_name("train_pm", job.out, RUN))]
    assert (NAMESPACE, others) not in standin.deleted


@pytest.mark.server  # its own KubernetesStandIn
def test_the_standin_keeps_trainjobs_in_their_namespace_and_refuses_a_second_create(tmp_path):
    job = pm_job(tmp_path, "unused")
    name = job_name("train_pm", job.out, RUN)
    with KubernetesStandIn(tmp_path, schedulable=False) as standin:
        client = client_of(standin)
        trainer, options = trainer_and_options(pm_plan(), "job.json", name, job.out, RUN)
        client.train(runtime=client.get_runtime("torch-distributed"), trainer=trainer, options=options)

        assert client.get_job(name).name == name
        with pytest.raises(RuntimeError):
            client_of(standin, "team-b").get_job(name)
        with pytest.raises(RuntimeError, match="Failed to create TrainJob"):
            client.train(runtime=client.get_runtime("torch-distributed"), trainer=trainer, options=options)


def test_rows_staged_on_the_steps_disk_are_shared_with_the_nodes_and_datasets_stay_put(tmp_path):
    staged = tmp_path / "human.jsonl"
    staged.write_text('{"id": "h1"}\n')
    folder = str(tmp_path / "attempt-1.trainjob")

    shared = shared_data({"human": [str(staged)], "ai": ["s3://bucket/outputs/label/k/data"]}, folder)

    assert shared == {"human": [f"{folder}/data/human-0.jsonl"], "ai": ["s3://bucket/outputs/label/k/data"]}
    assert (tmp_path / "attempt-1.trainjob" / "data" / "human-0.jsonl").read_text() == '{"id": "h1"}\n'
