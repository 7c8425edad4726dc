"""Multi-node training through Kubeflow Trainer v2: the TrainJob a training step creates and watches.

When a training stage's resource profile asks for `num_nodes > 1`, its KFP step does not train:
it writes the `TrainingJob` next to the stage's output, creates a `TrainJob` with the `kubeflow`
SDK (`TrainerClient`, `CustomTrainerContainer`) on the `torch-distributed` ClusterTrainingRuntime,
and every node runs `torchrun -m cai_lib.engines.launch JOB` (torchrun reads the runtime's `PET_*`
variables). Rank 0 writes the checkpoint and the metrics to S3, so the step returns pointers.

The step waits for the job to run (`schedule_timeout_seconds`), streams node 0's log into its
own, waits for Complete or Failed, and fails with the job's events. A cancelled step (SIGTERM, as
KFP sends) deletes its job.

One owner per TrainJob: its name hashes the pipeline run and the output attempt it writes, and
its labels carry the stage, the output, the run and the attempt. Two runs can work on one output
key at once (outputs are content-addressed and shared), each in an attempt of its own, so a retry
of the step deletes only the jobs that earlier attempts of the *same run* left for that output,
never another run's. The pipeline's service account needs create/get/list/watch/delete on
`trainjobs`, get on `clustertrainingruntimes`, and get/list on pods, their logs and events (the
Helm chart's Role grants exactly these).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydantic import BaseModel, ConfigDict, Field

from cai_lib.core.config import PLATFORM_ENV
from cai_lib.core.deploy import DeployConfig, SecretRefs, Toleration
from cai_lib.core.errors import CaiError
from cai_lib.core.kubeconfig import no_cluster
from cai_lib.core.settings import settings, variable
from cai_lib.engines.launch import TrainingJob, read_metrics, torchrun_command, write_job

log = logging.getLogger(__name__)
TRAINJOB_ENV = variable("trainjob")
NODE_CONTAINER = "node"  # the trainer container (and replicated job) of the torch-distributed runtime
STAGE_LABEL = "cai-platform.io/stage"
OUTPUT_LABEL = "cai-platform.io/output"
RUN_LABEL = "cai-platform.io/pipeline-run"
ATTEMPT_LABEL = "cai-platform.io/attempt"


class TrainJobPlan(BaseModel):
    """What a multi-node training step asks Kubeflow Trainer for (fixed when the pipeline is compiled)."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    runtime: str = Field(default="torch-distributed", description="The ClusterTrainingRuntime to run on.")
    image: str
    num_nodes: int = Field(ge=2)
    accelerator_type: str
    accelerators_per_node: int = Field(ge=1)
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    shm_size: str | None = Field(default=None, description="A memory-backed /dev/shm of this size per node.")
    secrets: SecretRefs = Field(default_factory=SecretRefs)
    deadline_seconds: int = Field(ge=60, description="The TrainJob's activeDeadlineSeconds.")
    schedule_timeout_seconds: int = Field(ge=1, description="How long every node may take to start running.")
    poll_seconds: int = Field(default=10, ge=1)

    @classmethod
    def from_environment(cls) -> TrainJobPlan | None:
        """The plan the pipeline compiled into this step's environment (`CAI_TRAINJOB`), if any."""
        text = settings().trainjob
        return cls.model_validate_json(text) if text else None


def plan_of(stage: str, deploy: DeployConfig) -> TrainJobPlan | None:
    """The TrainJob plan of `stage` when its profile asks for more than one node, else None."""
    profile = deploy.resources.get(stage)
    if profile is None or profile.num_nodes == 1:
        return None
    return TrainJobPlan(
        stage=stage,
        image=deploy.image_gpu,
        num_nodes=profile.num_nodes,
        accelerator_type=profile.accelerator_type,
        accelerators_per_node=profile.accelerator_count,
        # The SDK sets a node's requests and limits both to these: the limit, so none is lost.
        cpu=profile.cpu_limit or profile.cpu_request,
        memory=profile.memory_limit or profile.memory_request,
        shm_size=profile.shm_size,
        node_selector=profile.node_selector,
        tolerations=profile.tolerations,
        secrets=deploy.secrets,
        deadline_seconds=profile.deadline_seconds,
        schedule_timeout_seconds=profile.schedule_timeout_seconds,
    )


def job_name(stage: str, out_uri: str, run_id: str) -> str:
    """A DNS-1035 name for the TrainJob of pipeline run `run_id` that writes `out_uri` (one output
    attempt): another run, or another attempt, gets another name."""
    owner = hashlib.sha256(f"{run_id}\n{out_uri}".encode()).hexdigest()[:12]
    return f"cai-{stage.replace('_', '-')}-{owner}"


def output_label(out_uri: str) -> str:
    """The label value shared by every attempt at one stage output (the attempt suffix left out)."""
    stem = out_uri.rstrip("/").rsplit("/", 1)[0]
    return hashlib.sha256(stem.encode()).hexdigest()[:32]


def label_value(text: str) -> str:
    """`text` as a Kubernetes label value: at most 63 of [A-Za-z0-9_.-], starting and ending
    alphanumeric."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")


def owner_labels(stage: str, out_uri: str, run_id: str) -> dict[str, str]:
    """The labels of the TrainJob run `run_id` makes for the output attempt `out_uri`."""
    return {
        STAGE_LABEL: stage.replace("_", "-"),
        OUTPUT_LABEL: output_label(out_uri),
        RUN_LABEL: label_value(run_id) or "none",
        ATTEMPT_LABEL: label_value(out_uri.rstrip("/").rsplit("/", 1)[-1]),
    }


def trainer_and_options(
    plan: TrainJobPlan, job_uri: str, name: str, out_uri: str, run_id: str
) -> tuple[object, list]:
    """The SDK's `CustomTrainerContainer` and the options (name, labels, command, deadline, secret
    env, scheduling) that make the TrainJob for `plan`."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import (
        ActiveDeadlineSeconds,
        ContainerPatch,
        JobSetSpecPatch,
        JobSetTemplatePatch,
        JobSpecPatch,
        JobTemplatePatch,
        Labels,
        Name,
        PodSpecPatch,
        PodTemplatePatch,
        ReplicatedJobPatch,
        RuntimePatch,
        TrainerCommand,
        TrainingRuntimeSpecPatch,
    )

    resources = {plan.accelerator_type: str(plan.accelerators_per_node)}
    resources.update({key: value for key, value in (("cpu", plan.cpu), ("memory", plan.memory)) if value})
    trainer = CustomTrainerContainer(
        image=plan.image,
        num_nodes=plan.num_nodes,
        resources_per_node=resources,
        env={"PYTHONUNBUFFERED": "1"},
    )
    shm = plan.shm_size and {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": plan.shm_size}}
    pod = PodSpecPatch(
        containers=[
            ContainerPatch(
                name=NODE_CONTAINER,
                env=secret_env(plan.secrets),
                volume_mounts=[{"name": "dshm", "mountPath": "/dev/shm"}] if shm else None,
            )
        ],
        volumes=[shm] if shm else None,
        node_selector=plan.node_selector or None,
        tolerations=[t.model_dump(exclude_none=True) for t in plan.tolerations] or None,
    )
    node = ReplicatedJobPatch(
        name=NODE_CONTAINER,
        template=JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(spec=pod))),
    )
    patch = TrainingRuntimeSpecPatch(
        template=JobSetTemplatePatch(spec=JobSetSpecPatch(replicated_jobs=[node]))
    )
    options = [
        Name(name=name),
        Labels(labels=owner_labels(plan.stage, out_uri, run_id)),
        TrainerCommand(command=torchrun_command(None, job_uri)),
        ActiveDeadlineSeconds(seconds=plan.deadline_seconds),
        RuntimePatch(training_runtime_spec=patch),
    ]
    return trainer, options


def secret_env(secrets: SecretRefs) -> list[dict]:
    """The environment every pipeline step gets, as env entries: S3 keys and MLflow credentials
    from their Secrets, the installation's settings from its ConfigMap."""

    def from_secret(secret: str, keys: dict[str, str], optional: bool) -> list[dict]:
        return [
            {"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}
            for key, env in keys.items()
        ]

    settings = [
        {
            "name": name,
            "valueFrom": {"configMapKeyRef": {"name": secrets.env_configmap, "key": name, "optional": True}},
        }
        for name in PLATFORM_ENV
    ]
    return [
        *from_secret(secrets.s3_secret, secrets.s3_keys, optional=False),
        *from_secret(secrets.mlflow_secret, secrets.mlflow_keys, optional=True),
        *from_secret(secrets.hf_secret, secrets.hf_keys, optional=True),
        *settings,
    ]


def render(plan: TrainJobPlan, job_uri: str, out_uri: str, namespace: str = "default", run_id: str = "") -> dict:
    """The TrainJob manifest the step of pipeline run `run_id` would create for `plan`, built by
    the SDK's own code from the same trainer and options, for the runtime as the SDK describes it
    (no cluster is contacted)."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubeflow.trainer.constants import constants
    from kubeflow.trainer.types.types import Runtime, RuntimeKind, RuntimeTrainer, TrainerType
    from kubeflow_trainer_api import models

    name = job_name(plan.stage, out_uri, run_id)
    trainer, options = trainer_and_options(plan, job_uri, name, out_uri, run_id)
    runtime = Runtime(
        name=plan.runtime,
        kind=RuntimeKind.CLUSTER_TRAINING_RUNTIME,
        trainer=RuntimeTrainer(trainer_type=TrainerType.CUSTOM_TRAINER, framework="torch", image=plan.image),
    )
    # An offline backend: the options check that they target Kubernetes, and the spec builder
    # needs no API call when given the runtime itself.
    backend = KubernetesBackend.__new__(KubernetesBackend)
    backend.namespace = namespace
    job_spec: dict = {}
    for option in options:
        option(job_spec, trainer, backend)
    spec = job_spec["spec"]
    trainjob = models.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name, namespace=namespace, labels=job_spec["metadata"]["labels"]
        ),
        spec=backend._get_trainjob_spec(
            runtime=runtime,
            trainer=trainer,
            trainer_overrides=spec.get("trainer", {}),
            runtime_patches=spec.get("runtimePatches"),
            active_deadline_seconds=spec.get("activeDeadlineSeconds"),
        ),
    )
    return trainjob.to_dict()


class Cancelled(Exception):
    """The step was asked to stop (SIGTERM): KFP cancelled the run or deleted the pod."""


@contextmanager
def cancellable() -> Iterator[None]:
    """Turn SIGTERM into `Cancelled` while the block runs, so that cleanup code runs."""

    def stop(signum, frame):
        raise Cancelled("the step received SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_trainjob(client, plan: TrainJobPlan, job: TrainingJob, echo: Callable[[str], None] = print) -> dict:
    """Train `job` as a TrainJob through `client` (a `TrainerClient`); returns rank 0's metrics.

    The pipeline run is `$CAI_PIPELINE_RUN_ID` (set inside a stage's run). Raises `CaiError` when
    the job fails (with its events), when its nodes do not all run within the plan's schedule
    timeout (the job is deleted), or when it outlives its deadline.
    """
    folder = f"{job.out.rstrip('/')}.trainjob"
    metrics_uri = f"{folder}/metrics.json"
    shared = job.model_copy(update={"metrics": metrics_uri, "data": shared_data(job.data, folder)})
    job_uri = write_job(shared, folder)
    run_id = settings().pipeline_run_id or ""
    name = job_name(plan.stage, job.out, run_id)
    delete_earlier_attempts(client, job.out, run_id, keep=name)
    trainer, options = trainer_and_options(plan, job_uri, name, job.out, run_id)
    runtime = client.get_runtime(plan.runtime)
    client.train(runtime=runtime, trainer=trainer, options=options)
    echo(
        f"created TrainJob {name}: {plan.num_nodes} nodes x {plan.accelerators_per_node} {plan.accelerator_type}"
    )
    with cancellable():
        try:
            _watch(client, plan, name, echo)
        except Cancelled:
            client.delete_job(name)
            echo(f"deleted TrainJob {name}: the step was cancelled")
            raise
    return read_metrics(metrics_uri)


def shared_data(data: dict[str, list[str]], folder: str) -> dict[str, list[str]]:
    """`data` with every file on this pod's disk (rows the step staged, e.g. human comparisons)
    copied under `folder`, where the TrainJob's nodes can read it; dataset URIs stay as they are."""
    from pathlib import Path

    from cai_lib.core.store import ArtifactStore, is_s3, join_uri

    shared: dict[str, list[str]] = {}
    for role, uris in data.items():
        shared[role] = []
        for index, uri in enumerate(uris):
            if is_s3(uri) or not Path(uri).is_file():
                shared[role].append(uri)
                continue
            key = f"data/{role}-{index}.jsonl"
            ArtifactStore.open(folder).put_file(uri, key)
            shared[role].append(join_uri(folder, key))
    return shared


def _watch(client, plan: TrainJobPlan, name: str, echo: Callable[[str], None]) -> None:
    every = {"Running", "Complete", "Failed"}
    try:
        status = client.wait_for_job_status(
            name, every, timeout=plan.schedule_timeout_seconds, polling_interval=plan.poll_seconds
        ).status
    except TimeoutError:
        events = _events(client, name)
        client.delete_job(name)
        raise CaiError(
            f"TrainJob {name}: its {plan.num_nodes} nodes were not all running after "
            f"{plan.schedule_timeout_seconds} s; deleted it. Events: {events}"
        ) from None
    if status == "Running":
        for line in client.get_job_logs(name, follow=True):
            echo(line.rstrip("\n"))
        status = client.wait_for_job_status(
            name, {"Complete", "Failed"}, timeout=plan.deadline_seconds, polling_interval=plan.poll_seconds
        ).status
    if status == "Failed":
        raise CaiError(f"TrainJob {name} failed. Events: {_events(client, name)}")
    echo(f"TrainJob {name} completed")


def _events(client, name: str) -> str:
    events = client.get_job_events(name)
    return (
        "; ".join(
            f"{e.involved_object_kind}/{e.involved_object_name} {e.reason}: {e.message}" for e in events
        )
        or "none"
    )


def delete_earlier_attempts(client, out_uri: str, run_id: str, keep: str) -> list[str]:
    """Delete the TrainJobs that earlier attempts of this step in pipeline run `run_id` left for
    the same stage output (a killed or retried step), all but `keep`; another run's are left
    alone, and without a run id nothing is deleted. Returns the names deleted."""
    from kubeflow.trainer.constants import constants

    if not label_value(run_id):
        return []
    backend = client.backend
    selector = f"{OUTPUT_LABEL}={output_label(out_uri)},{RUN_LABEL}={label_value(run_id)}"
    listed = backend.custom_api.list_namespaced_custom_object(
        constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL, label_selector=selector
    )
    deleted = []
    for item in listed.get("items", []):
        name = item["metadata"]["name"]
        if name == keep:
            continue
        log.info("deleting TrainJob %s left by an earlier attempt of run %s", name, run_id)
        client.delete_job(name)
        deleted.append(name)
    return deleted


def trainer_client():
    """A `TrainerClient` for the namespace this pod runs in (in-cluster credentials)."""
    from kubeflow.trainer import KubernetesBackendConfig, TrainerClient
    from kubernetes.config import ConfigException

    try:
        return TrainerClient(backend_config=KubernetesBackendConfig())
    except (ConfigException, OSError) as err:
        raise no_cluster(err) from None


def manifest_yaml(manifest: dict) -> str:
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(manifest, default=str)), sort_keys=False)
