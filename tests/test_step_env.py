"""Every setting reaches the step that reads it, followed through the artifacts that ship.

What a step reads: the environment variables (CAI_*, MLFLOW_*, AWS_*, HF_*) its component's code
can read, found in the source (tests/env_reads.py), and those the libraries it imports read on
their own. What a step's container receives: its image's `ENV` (docker/), the env the compiled
pipeline (pipelines/cai_pipeline.yaml) sets on its executor, and the keys its kubernetes platform
spec maps from ConfigMaps and Secrets, resolved against the ConfigMap the rendered chart writes and
the Secrets the deploy checklist creates, as the KFP driver and the kubelet do
(tests/kfp_driver.py `pod_env`). A variable read but never received is a gap.

The chart's workloads are checked the other way round: each gets exactly the credentials its
command needs.
"""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO_ROOT
from env_reads import modules, own_reads, step_reads
from kfp_driver import ContainerConfigError, pod_env
from test_dockerfiles import DOCKERFILES, assignments
from test_helm_chart import ENV_CONFIGMAP, FULLNAME, NAMESPACE, SERVED, env_of, find, pod_spec, render_objects

from cai_lib.core.deploy import DeployConfig

COMMITTED = REPO_ROOT / "pipelines" / "cai_pipeline.yaml"
SPEC, PLATFORM = yaml.safe_load_all(COMMITTED.read_text())
EXECUTORS = PLATFORM["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
# executor label -> the component function it runs
FUNCTIONS = {
    label: executor["container"]["args"][executor["container"]["args"].index("--function_to_execute") + 1]
    for label, executor in SPEC["deploymentSpec"]["executors"].items()
}
IMAGES = {DeployConfig().image_cpu: DOCKERFILES["cpu"], DeployConfig().image_gpu: DOCKERFILES["gpu"]}
# The Secrets an operator creates (docs/deploy.md), with every key the chart's defaults name.
SECRETS = {
    "cai-s3": {"AWS_ACCESS_KEY_ID": "AKIA...", "AWS_SECRET_ACCESS_KEY": "s3cret"},
    "cai-mlflow": {"MLFLOW_TRACKING_USERNAME": "cai-pipeline", "MLFLOW_TRACKING_PASSWORD": "pw"},
    "cai-hf": {"HF_TOKEN": "hf_..."},
    "cai-mlflow-promoter": {"MLFLOW_TRACKING_USERNAME": "cai-promoter", "MLFLOW_TRACKING_PASSWORD": "pw"},
}
PRESETS = {
    "defaults": {},
    "serving": {"serving": {"enabled": True, "models": [SERVED]}},
    "ui-addresses": {
        "kfp": {"uiUrl": "https://kf.example.com/pipelines"},
        "mlflow": {"uiUrl": "https://mlflow.example.com"},
    },
}
# Read by a step, but not the installation's to give, each for a reason:
NOT_FROM_THE_INSTALLATION = {
    "CAI_TRAINJOB": "compiled into a multi-node training step's own env (IR container env); unset: one node",
    "CAI_RUN_OUTCOME": "`cai run` names the file its local exit handler reports to; a cluster run has none",
    "CAI_PIPELINE_RUN_ID": "set by the step itself around each stage's MLflow run (tracking.stage_run)",
    "CAI_CACHE_DIR": "where downloaded models are cached; unset: ~/.cache/cai in the pod",
    "CAI_S3_MAX_ATTEMPTS": "a tuning of S3 retries; unset: 8",
    "AWS_ENDPOINT_URL": "read only when AWS_ENDPOINT_URL_S3, which the ConfigMap sets, is unset",
    "AWS_REGION": "read only when AWS_DEFAULT_REGION, which the ConfigMap sets, is unset",
    "AWS_SESSION_TOKEN": "temporary AWS credentials; the chart's S3 Secret holds a key pair",
    "AWS_PROFILE": "an AWS config file's profile; pods get a key pair instead",
}


def configmaps(preset: str) -> dict[str, dict[str, str]]:
    return {
        o["metadata"]["name"]: o.get("data", {})
        for o in render_objects(PRESETS[preset])
        if o["kind"] == "ConfigMap"
    }


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, dict[str, str]]]:
    return {preset: configmaps(preset) for preset in PRESETS}


def received(label: str, maps: dict, secrets: dict = SECRETS) -> dict[str, str]:
    """Name -> value of every variable the step's container gets (image ENV, IR env, pod spec)."""
    container = SPEC["deploymentSpec"]["executors"][label]["container"]
    env = dict(assignments(IMAGES[container["image"]], "ENV"))
    env.update({item["name"]: item["value"] for item in container.get("env", [])})
    env.update(pod_env(EXECUTORS[label], maps, secrets))
    return env


def test_the_scan_finds_the_reads_it_must():
    # the variables the rest leans on, wherever the lead's layout puts their modules
    everything = set().union(*(own_reads(module) for module in modules()))
    assert {
        "CAI_ARTIFACT_ROOT",
        "MLFLOW_TRACKING_URI",
        "AWS_ENDPOINT_URL_S3",
        "CAI_SERVING_MODELS",
    } <= everything


@pytest.mark.parametrize("label", sorted(FUNCTIONS))
def test_every_setting_a_step_reads_reaches_its_container(label, rendered):
    reads = step_reads(FUNCTIONS[label])
    receivable = set().union(*(received(label, maps) for maps in rendered.values()))
    assert sorted(reads - receivable - set(NOT_FROM_THE_INSTALLATION)) == []


@pytest.mark.parametrize("label", sorted(FUNCTIONS))
def test_every_key_the_chart_writes_for_the_steps_reaches_every_step(label, rendered):
    for maps in rendered.values():
        assert set(maps[ENV_CONFIGMAP]) <= set(received(label, maps))


def test_with_the_default_chart_every_step_gets_the_settings_a_run_cannot_do_without(rendered):
    needed = {
        "CAI_ARTIFACT_ROOT": "s3://cai-platform/artifacts",
        "MLFLOW_TRACKING_URI": f"http://{FULLNAME}-mlflow:5000",
        "AWS_ENDPOINT_URL_S3": "https://s3.us-east-1.amazonaws.com",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIA...",
        "AWS_SECRET_ACCESS_KEY": "s3cret",
        "CAI_CONSTITUTIONS_DIR": "/opt/cai/constitutions",
    }
    for label in FUNCTIONS:
        env = received(label, rendered["defaults"])
        assert {name: env.get(name) for name in needed} == needed, label


def test_with_serving_on_the_register_step_learns_which_models_to_sync(rendered):
    env = received("exec-register", rendered["serving"])
    assert (env["CAI_SERVING_NAMESPACE"], env["CAI_SERVING_MODELS"]) == (NAMESPACE, "cai-harmless-rl-cai")


def test_the_resolve_step_learns_the_ui_addresses_it_links_runs_with(rendered):
    env = received("exec-resolve-run", rendered["ui-addresses"])
    assert (env["CAI_KFP_UI_URL"], env["CAI_MLFLOW_UI_URL"]) == (
        "https://kf.example.com/pipelines",
        "https://mlflow.example.com",
    )


def test_the_hugging_face_token_reaches_every_step_and_its_secret_may_be_absent(rendered):
    without = {name: data for name, data in SECRETS.items() if name != "cai-hf"}
    for label in FUNCTIONS:
        assert received(label, rendered["defaults"])["HF_TOKEN"] == "hf_..."
        assert "HF_TOKEN" not in received(label, rendered["defaults"], without)


def test_a_step_does_not_start_without_its_s3_secret(rendered):
    # the kubelet's rule for a required secretKeyRef; MLflow's and the token's are optional
    without = {name: data for name, data in SECRETS.items() if name != "cai-s3"}
    with pytest.raises(ContainerConfigError, match="couldn't find Secret cai-s3"):
        received("exec-register", rendered["defaults"], without)


# -- the chart's own workloads ----------------------------------------------------------------------

S3_PAIR = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
MLFLOW_CLIENT = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
# workload (kind, name suffix, container) -> the Secret-held variables its command needs
CREDENTIALS = {
    # `cai retrain`: publishes constitutions to S3, reads champions from MLflow
    ("CronJob", "retrain", "retrain"): S3_PAIR | MLFLOW_CLIENT,
    # `cai serve webhook`: verifies deliveries, reads the champion's manifest in S3 and MLflow
    ("Deployment", "serve-webhook", "receiver"): S3_PAIR | MLFLOW_CLIENT | {"CAI_WEBHOOK_SECRET"},
    # `cai mlflow setup-accounts`: as the admin, the three accounts' names and passwords
    ("Job", "mlflow-admin", "setup-accounts"): MLFLOW_CLIENT
    | {
        f"CAI_{kind}_TRACKING_{field}"
        for kind in ("PIPELINE", "PROMOTER", "SERVING")
        for field in ("USERNAME", "PASSWORD")
    },
    # `cai serve register-webhook`: only MLflow's REST API as the admin, signed with the webhook's secret
    ("Job", "mlflow-admin", "register-webhook"): MLFLOW_CLIENT | {"CAI_WEBHOOK_SECRET"},
    # `mlflow db upgrade`: only the database
    ("Job", "mlflow-db-upgrade", "db-upgrade"): {"MLFLOW_BACKEND_STORE_URI"},
    # `mlflow server`: the database, S3 for the artifacts it proxies, its admin and the webhook key
    ("Deployment", "mlflow", "mlflow"): {
        "MLFLOW_BACKEND_STORE_URI",
        *S3_PAIR,
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY",
    },
}


@pytest.mark.parametrize("workload", CREDENTIALS, ids=lambda w: w[1])
def test_each_workload_of_the_chart_gets_exactly_the_credentials_its_command_needs(workload):
    kind, suffix, container_name = workload
    obj = find(render_objects(PRESETS["serving"]), kind, f"{FULLNAME}-{suffix}")
    spec = pod_spec(obj)
    container = next(
        c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container_name
    )
    from_secrets = {
        name
        for name, value in env_of(container).items()
        if isinstance(value, dict) and "secretKeyRef" in value
    }
    assert from_secrets == CREDENTIALS[workload]
