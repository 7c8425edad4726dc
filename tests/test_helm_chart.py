"""The Helm chart helm/cai-platform, rendered and linted by real Helm (helm-python-sdk binds Helm's Go
SDK; no helm binary), and every object it renders validated against the Kubernetes schemas of one
pinned version (kubernetes-validate, strict: an unknown field fails too).

tests/test_kustomize.py reuses `render`, `assert_valid_for_kubernetes` and `assert_pods_are_locked_down`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from conftest import REPO_ROOT, free_port, hand_lineage, wait_for_port
from crd_schema import CRDS, crd_errors

from cai_lib.platform.serving import STORAGE_ANNOTATION

CHART = REPO_ROOT / "helm" / "cai-platform"
CHART_CONSTITUTIONS = CHART / "files" / "constitutions"
REPO_CONSTITUTIONS = REPO_ROOT / "constitutions"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion): objects are validated against it.
KUBERNETES_VERSION = "1.31"
RELEASE = "cai"
NAMESPACE = "ml-team"
FULLNAME = "cai-cai-platform"
# The installation settings' ConfigMap: the name the committed pipeline reads (DeployConfig's default).
ENV_CONFIGMAP = "cai-env"
CHART_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
# Rewrites the generated deploy files (the chart's copy of constitutions/, the kustomize manifests)
# instead of comparing them; see docs/deploy.md.
UPDATE_DEPLOY_FILES = os.environ.get("CAI_UPDATE_DEPLOY_FILES") == "1"

GIT_REPO = "https://git.example.com/ml/constitutions.git"
SERVED = {
    "constitution": "harmless",
    "role": "rl-cai",
    "storageUri": "s3://cai-platform/artifacts/models/0123abcd",
}
A100X4 = {
    "accelerator_type": "nvidia.com/gpu",
    "accelerator_count": 4,
    "cpu_request": "32",
    "memory_request": "256Gi",
    "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}],
}
VARIANTS = {
    "defaults": {},
    "gpu-profile": {
        "gpuProfiles": {"a100x4": A100X4},
        "pipeline": {"stageProfiles": {"sft": "a100x4", "rl": "a100x4"}},
    },
    "cronjob-from-git": {
        "retrain": {
            "mode": "cronjob",
            "schedule": "*/15 * * * *",
            "constitutions": ["harmless"],
            "dryRun": True,
            "gitRepo": {"url": GIT_REPO, "revision": "v2"},
        }
    },
    "argocd-hook": {"retrain": {"mode": "argocd-hook", "gitRepo": {"url": GIT_REPO}}},
    "mlflow-external": {
        "mlflow": {"server": {"enabled": False}, "trackingUri": "https://mlflow.example.com"}
    },
    "multi-user": {"kfp": {"multiUser": True}},
    "serving": {"serving": {"enabled": True, "models": [SERVED]}},
    "serving-llm": {
        "serving": {
            "enabled": True,
            "policyKind": "LLMInferenceService",
            "models": [
                SERVED,
                {**SERVED, "role": "pm", "storageUri": "s3://cai-platform/artifacts/models/4567cdef"},
            ],
            "llm": {"replicas": 2, "router": {"route": {}}},
        }
    },
    "s3-compatible": {
        "s3": {"endpointUrl": "http://minio.minio.svc.cluster.local:9000"},
        "images": {"pullSecrets": ["regcred"]},
    },
}


def render(
    values: dict | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """Template path -> rendered text, from real Helm (NOTES.txt and empty templates left out)."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=release, namespace=namespace)
    return {path: text for path, text in rendered.items() if path.endswith(".yaml") and text.strip()}


def objects_of(rendered: dict[str, str]) -> list[dict]:
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def render_objects(values: dict | None = None) -> list[dict]:
    return objects_of(render(values))


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, (
        f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in matches]}"
    )
    return matches[0]


def pod_spec(obj: dict) -> dict | None:
    """The pod template's spec of a workload object, None for objects that run no pods."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec.get("template", {}).get("spec")


def retrain_container(objects: list[dict]) -> dict:
    workload = next(
        o for o in objects if o["kind"] in ("CronJob", "Job") and "retrain" in o["metadata"]["name"]
    )
    return pod_spec(workload)["containers"][0]


def run_config_of(objects: list[dict]) -> dict:
    return yaml.safe_load(find(objects, "ConfigMap", f"{FULLNAME}-config")["data"]["run-config.yaml"])


def assert_valid_for_kubernetes(objects: list[dict]) -> None:
    """Every object validates, strict (an unknown field fails): a core object against the
    Kubernetes schemas of the minimum version the chart supports, a custom object against its
    upstream CRD vendored in tests/upstream (tests/crd_schema.py)."""
    assert objects
    for obj in objects:
        if obj["kind"] in CRDS:
            assert crd_errors(obj) == []
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(
                f"{obj['kind']} {obj['metadata']['name']}: {err.message} at {list(err.absolute_path)}"
            )


def assert_pods_are_locked_down(objects: list[dict]) -> int:
    """Every pod runs as a non-root user, and no container can escalate privileges; returns the pod count."""
    specs = [spec for spec in map(pod_spec, objects) if spec is not None]
    for spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context["privileged"] is False, container["name"]
            assert context["readOnlyRootFilesystem"] is True, container["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
    return len(specs)


def env_of(container: dict) -> dict:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def update_chart_constitutions() -> None:
    """Copy the repository's constitutions/ into the chart (Helm cannot read outside the chart)."""
    shutil.rmtree(CHART_CONSTITUTIONS, ignore_errors=True)
    shutil.copytree(REPO_CONSTITUTIONS, CHART_CONSTITUTIONS)


# -- every variant --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(variant):
    assert_valid_for_kubernetes(render_objects(VARIANTS[variant]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_runs_as_non_root_without_privilege_escalation(variant):
    assert assert_pods_are_locked_down(render_objects(VARIANTS[variant])) >= 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_run_config_is_accepted_by_the_pipelines_run_config_model(variant, tmp_path):
    from cai_lib.platform.run_config import load_run_config

    path = tmp_path / "run-config.yaml"
    path.write_text(yaml.safe_dump(run_config_of(render_objects(VARIANTS[variant]))))
    config = load_run_config(path)
    assert config.deploy.image_cpu == "ghcr.io/cai-platform/cai:0.1.0"
    assert config.deploy.image_gpu == "ghcr.io/cai-platform/cai-gpu:0.1.0"
    assert config.deploy.secrets.s3_secret == "cai-s3"
    assert config.deploy.secrets.env_configmap == ENV_CONFIGMAP


# -- what the defaults install --------------------------------------------------------------------


def test_defaults_install_rbac_config_the_retrain_cronjob_and_an_mlflow_server():
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in render_objects())
    assert kinds == [
        ("ClusterRole", f"{FULLNAME}-{NAMESPACE}-training-runtimes"),
        ("ClusterRoleBinding", f"{FULLNAME}-{NAMESPACE}-training-runtimes"),
        ("ConfigMap", f"{FULLNAME}-config"),
        ("ConfigMap", ENV_CONFIGMAP),
        ("ConfigMap", "kfp-launcher"),
        ("CronJob", f"{FULLNAME}-retrain"),
        ("Deployment", f"{FULLNAME}-mlflow"),
        ("Job", f"{FULLNAME}-mlflow-admin"),
        ("Job", f"{FULLNAME}-mlflow-db-upgrade"),
        ("NetworkPolicy", f"{FULLNAME}-egress"),
        ("NetworkPolicy", f"{FULLNAME}-egress-pipeline"),
        ("NetworkPolicy", f"{FULLNAME}-egress-trainjob"),
        ("NetworkPolicy", f"{FULLNAME}-mlflow"),
        ("Role", f"{FULLNAME}-retrain"),
        ("Role", f"{FULLNAME}-trainjobs"),
        ("RoleBinding", f"{FULLNAME}-retrain"),
        ("RoleBinding", f"{FULLNAME}-trainjobs"),
        ("Service", f"{FULLNAME}-mlflow"),
        ("ServiceAccount", f"{FULLNAME}-retrain"),
    ]
    namespaced = [o for o in render_objects() if not o["kind"].startswith("Cluster")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {NAMESPACE}


def test_the_role_grants_exactly_what_cai_retrain_needs():
    role = find(render_objects(), "Role", f"{FULLNAME}-retrain")
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": [f"{FULLNAME}-config", ENV_CONFIGMAP, "kfp-launcher"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["pipelines.kubeflow.org"],
            "resources": ["pipelines", "experiments", "runs"],
            "verbs": ["create", "get", "list"],
        },
    ]


def test_the_pipeline_service_account_may_run_trainjobs_and_nothing_more():
    objects = render_objects()
    role = find(objects, "Role", f"{FULLNAME}-trainjobs")
    runtimes = find(objects, "ClusterRole", f"{FULLNAME}-{NAMESPACE}-training-runtimes")

    assert role["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"],
         "verbs": ["create", "get", "list", "watch", "delete"]},
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainingruntimes"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    ]  # fmt: skip
    assert runtimes["rules"] == [
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["clustertrainingruntimes"], "verbs": ["get"]}
    ]


def test_the_trainjob_roles_are_bound_to_the_pipelines_service_account():
    objects = render_objects({"trainJobs": {"pipelineServiceAccount": "default-editor"}})
    subject = {"kind": "ServiceAccount", "name": "default-editor", "namespace": NAMESPACE}

    assert find(objects, "RoleBinding", f"{FULLNAME}-trainjobs")["subjects"] == [subject]
    assert find(objects, "ClusterRoleBinding", f"{FULLNAME}-{NAMESPACE}-training-runtimes")["subjects"] == [
        subject
    ]


def test_trainjob_permissions_can_be_left_out():
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render_objects({"trainJobs": {"enabled": False}})}

    assert not {name for _, name in kinds if "trainjobs" in name or "training-runtimes" in name}


def test_the_role_binding_gives_the_role_to_the_retrain_service_account():
    objects = render_objects()
    binding = find(objects, "RoleBinding", f"{FULLNAME}-retrain")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": f"{FULLNAME}-retrain",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{FULLNAME}-retrain", "namespace": NAMESPACE}
    ]
    assert pod_spec(find(objects, "CronJob"))["serviceAccountName"] == f"{FULLNAME}-retrain"


def test_kfp_launcher_sets_an_s3_pipeline_root_with_credentials_from_the_secret():
    launcher = find(render_objects(VARIANTS["s3-compatible"]), "ConfigMap", "kfp-launcher")["data"]
    assert launcher["defaultPipelineRoot"] == "s3://cai-platform/pipelines"
    assert yaml.safe_load(launcher["providers"]) == {
        "s3": {
            "default": {
                "endpoint": "minio.minio.svc.cluster.local:9000",
                "region": "us-east-1",
                "disableSSL": True,
                "forcePathStyle": True,
                "credentials": {
                    "fromEnv": False,
                    "secretRef": {
                        "secretName": "cai-s3",
                        "accessKeyKey": "AWS_ACCESS_KEY_ID",
                        "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
                    },
                },
            }
        }
    }


def test_aws_s3_is_reached_over_tls_at_its_regional_endpoint():
    objects = render_objects({"s3": {"region": "eu-west-1", "forcePathStyle": False}})
    provider = yaml.safe_load(find(objects, "ConfigMap", "kfp-launcher")["data"]["providers"])["s3"][
        "default"
    ]
    assert (provider["endpoint"], provider["disableSSL"], provider["forcePathStyle"]) == (
        "s3.eu-west-1.amazonaws.com",
        False,
        False,
    )
    env = find(objects, "ConfigMap", ENV_CONFIGMAP)["data"]
    assert env["AWS_ENDPOINT_URL_S3"] == "https://s3.eu-west-1.amazonaws.com"
    assert env["AWS_S3_ADDRESSING_STYLE"] == "virtual"


def test_the_kfp_launcher_config_map_can_be_left_to_kubeflow():
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render_objects({"kfp": {"launcherConfig": False}})}
    assert ("ConfigMap", "kfp-launcher") not in kinds


def test_the_env_config_map_gives_every_pod_the_artifact_root_s3_endpoint_region_and_tracking_uri():
    env = find(render_objects(VARIANTS["s3-compatible"]), "ConfigMap", ENV_CONFIGMAP)["data"]
    assert env == {
        "CAI_ARTIFACT_ROOT": "s3://cai-platform/artifacts",
        "AWS_ENDPOINT_URL_S3": "http://minio.minio.svc.cluster.local:9000",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_S3_ADDRESSING_STYLE": "path",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio.minio.svc.cluster.local:9000",
        "MLFLOW_TRACKING_URI": f"http://{FULLNAME}-mlflow:5000",
        "CAI_CONSTITUTION_REGISTRY": "s3://cai-platform/constitutions",
    }


def test_the_chart_default_images_are_the_pipelines_default_images():
    from cai_lib.core.deploy import DeployConfig

    deploy = run_config_of(render_objects())["deploy"]
    assert (deploy["image_cpu"], deploy["image_gpu"]) == (DeployConfig().image_cpu, DeployConfig().image_gpu)
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == version("cai-platform")


# -- the run config and GPU profiles --------------------------------------------------------------


def test_the_run_config_wires_images_and_secrets_into_the_pipeline():
    config = run_config_of(
        render_objects({"pipeline": {"params": {"num_red_team": 500, "constitution": "harmless@1.0.0"}}})
    )
    assert config["params"] == {"num_red_team": 500, "constitution": "harmless@1.0.0"}
    assert config["deploy"]["secrets"] == {
        "s3_secret": "cai-s3",
        "s3_keys": {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        },
        "mlflow_secret": "cai-mlflow",
        "mlflow_keys": {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
        },
        "promoter_secret": "cai-mlflow-promoter",
        "promoter_keys": {
            "MLFLOW_TRACKING_USERNAME": "CAI_PROMOTER_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "CAI_PROMOTER_TRACKING_PASSWORD",
        },
        "hf_secret": "cai-hf",
        "hf_keys": {"HF_TOKEN": "HF_TOKEN"},
        "env_configmap": ENV_CONFIGMAP,
    }
    assert config["deploy"]["retries"] == 2


def test_the_promoter_secret_reaches_the_variables_the_promoter_reads():
    from cai_lib.core.deploy import SecretRefs

    secrets = run_config_of(render_objects({"mlflow": {"promoterSecret": {"name": "promoter-x"}}}))["deploy"][
        "secrets"
    ]
    assert secrets["promoter_secret"] == "promoter-x"
    assert secrets["promoter_keys"] == SecretRefs().promoter_keys


def test_the_env_configmap_holds_every_setting_the_pipeline_maps_and_nothing_else():
    # Some keys only under some values (serving on, UI addresses set); tests/test_step_env.py
    # follows each setting on to the step that reads it.
    from cai_lib.core.config import PLATFORM_ENV

    presets = [
        *VARIANTS.values(),
        {"kfp": {"uiUrl": "https://kf.example.com"}, "mlflow": {"uiUrl": "https://m.example.com"}},
    ]
    written = {
        key for values in presets for key in find(render_objects(values), "ConfigMap", ENV_CONFIGMAP)["data"]
    }
    assert written == set(PLATFORM_ENV)


def test_a_gpu_profile_reaches_the_stages_that_name_it_and_no_other():
    resources = run_config_of(render_objects(VARIANTS["gpu-profile"]))["deploy"]["resources"]
    default = yaml.safe_load((CHART / "values.yaml").read_text())["gpuProfiles"]["gpu"]
    assert resources["sft"] == resources["rl"] == A100X4
    assert {stage for stage, profile in resources.items() if profile != A100X4} == {
        "generate_prompts",
        "critique_revise",
        "helpful_samples",
        "sample_pairs",
        "label",
        "validate_labels",
        "train_pm",
        "train_reference_pm",
        "rl_reference",
        "answer_eval",
        "evaluate",
        "compare",
    }
    assert resources["label"] == default


def test_stage_profiles_name_exactly_the_pipelines_gpu_stages():
    from cai_lib.core.stage_table import GPU_STAGES

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert list(schema["properties"]["pipeline"]["properties"]["stageProfiles"]["properties"]) == list(
        GPU_STAGES
    )
    assert list(yaml.safe_load((CHART / "values.yaml").read_text())["pipeline"]["stageProfiles"]) == list(
        GPU_STAGES
    )


def test_gpu_profiles_take_the_fields_of_the_run_configs_resource_profile():
    from cai_lib.core.deploy import ResourceProfile, Toleration

    definitions = json.loads((CHART / "values.schema.json").read_text())["definitions"]
    assert set(definitions["resourceProfile"]["properties"]) == set(ResourceProfile.model_fields)
    assert set(definitions["toleration"]["properties"]) == set(Toleration.model_fields)


def test_a_stage_profile_naming_a_missing_gpu_profile_fails_at_render():
    with pytest.raises(helm.HelmRenderError, match='pipeline.stageProfiles.sft names "h100"'):
        render({"pipeline": {"stageProfiles": {"sft": "h100"}}})


# -- the retrain trigger --------------------------------------------------------------------------


def test_by_default_retrain_reads_the_chart_constitutions_mounted_at_etc_cai():
    objects = render_objects()
    spec = pod_spec(find(objects, "CronJob"))
    assert "initContainers" not in spec
    assert spec["containers"][0]["args"] == [
        "retrain",
        "--repo",
        "/etc/cai",
        "--revision",
        f"helm {RELEASE} cai-platform-{CHART_VERSION}",
        "--host",
        "http://ml-pipeline.kubeflow.svc.cluster.local:8888",
        "--experiment",
        "cai-retrain",
        "--config",
        "/etc/cai/run-config.yaml",
        "--registry",
        "s3://cai-platform/constitutions",
    ]
    config_volume = next(v for v in spec["volumes"] if v["name"] == "config")["configMap"]
    assert config_volume["name"] == f"{FULLNAME}-config"
    assert {item["path"] for item in config_volume["items"]} == {"run-config.yaml"} | {
        f"constitutions/{path}" for path in tree(REPO_CONSTITUTIONS)
    }


def mount_config_volume(objects: list[dict], root: Path) -> Path:
    """Write the config ConfigMap's items where the retrain pod's `config` volume would put them."""
    data = find(objects, "ConfigMap", f"{FULLNAME}-config")["data"]
    volume = next(v for v in pod_spec(find(objects, "CronJob"))["volumes"] if v["name"] == "config")
    for item in volume["configMap"]["items"]:
        (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (root / item["path"]).write_text(data[item["key"]])
    return root


def test_the_default_retrain_command_runs_on_the_mounted_config_map(tmp_path, s3_bucket, mlflow_server):
    objects = render_objects()
    etc_cai = mount_config_volume(objects, tmp_path / "etc-cai")
    here = {
        "/etc/cai": str(etc_cai),
        "/etc/cai/run-config.yaml": str(etc_cai / "run-config.yaml"),
        "s3://cai-platform/constitutions": f"s3://{s3_bucket}/constitutions",
    }
    args = [here.get(arg, arg) for arg in retrain_container(objects)["args"]]
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "cai"),
            *args,
            "--dry-run",
            "--tracking-uri",
            mlflow_server["uri"],
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"at helm {RELEASE} cai-platform-{CHART_VERSION} (dry run)" in result.stdout
    assert "would retrain harmless@1.0.0" in result.stdout


def test_on_multi_user_kubeflow_retrain_files_runs_in_the_release_namespace():
    args = retrain_container(render_objects(VARIANTS["multi-user"]))["args"]
    assert args[args.index("--namespace") + 1] == NAMESPACE


def test_the_cronjob_variant_clones_the_git_repo_and_retrains_the_named_constitutions():
    cronjob = find(render_objects(VARIANTS["cronjob-from-git"]), "CronJob")
    assert cronjob["spec"]["schedule"] == "*/15 * * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    spec = pod_spec(cronjob)
    clone = spec["initContainers"][0]
    assert clone["command"] == [
        "git", "clone", "--depth", "1", "--branch", "$(GIT_REVISION)", "--", "$(GIT_URL)", "/workspace/repo"
    ]  # fmt: skip
    assert env_of(clone) == {"GIT_URL": GIT_REPO, "GIT_REVISION": "v2", "HOME": "/tmp"}
    args = spec["containers"][0]["args"]
    assert args[args.index("--repo") + 1] == "/workspace/repo"
    assert "--revision" not in args
    assert args[-3:] == ["--constitution", "harmless", "--dry-run"]


def test_the_hook_variant_renders_an_argocd_postsync_job_and_no_cronjob():
    objects = render_objects(VARIANTS["argocd-hook"])
    assert not [o for o in objects if o["kind"] == "CronJob"]
    job = find(objects, "Job", f"{FULLNAME}-retrain")
    assert job["metadata"]["annotations"] == {
        "argocd.argoproj.io/hook": "PostSync",
        "argocd.argoproj.io/hook-delete-policy": "BeforeHookCreation",
    }
    assert pod_spec(job)["containers"][0]["args"][:3] == ["retrain", "--repo", "/workspace/repo"]


def test_retrain_can_be_turned_off():
    objects = render_objects({"retrain": {"enabled": False}})
    assert not [o for o in objects if o["kind"] in ("CronJob", "Job") and "retrain" in o["metadata"]["name"]]


def test_the_retrain_job_gets_credentials_from_the_secrets_and_the_images_it_submits_with():
    container = retrain_container(render_objects({"images": {"cpu": {"tag": "1.2.3"}}}))
    env = env_of(container)
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "cai-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "cai-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    # it only reads the registry: the read-only account, not the pipeline's
    assert env["MLFLOW_TRACKING_PASSWORD"] == {
        "secretKeyRef": {"name": "cai-mlflow-serving", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    }
    assert (env["CAI_IMAGE_CPU"], env["CAI_IMAGE_GPU"]) == (
        "ghcr.io/cai-platform/cai:1.2.3",
        "ghcr.io/cai-platform/cai-gpu:0.1.0",
    )
    assert container["image"] == "ghcr.io/cai-platform/cai:1.2.3"
    assert container["envFrom"] == [{"configMapRef": {"name": ENV_CONFIGMAP}}]


def test_the_retrain_pod_carries_a_kubeflow_pipelines_token_for_the_kfp_client():
    spec = pod_spec(find(render_objects(), "CronJob"))
    token = next(v for v in spec["volumes"] if v["name"] == "kfp-token")["projected"]["sources"][0]
    assert token["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["kfp-token"] == "/var/run/secrets/kubeflow/pipelines"


# -- MLflow ---------------------------------------------------------------------------------------


def test_the_mlflow_server_proxies_s3_artifacts_and_allows_its_in_cluster_host_names():
    objects = render_objects()
    container = pod_spec(find(objects, "Deployment"))["containers"][0]
    args = container["args"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://cai-platform/mlflow"
    assert "--serve-artifacts" in args
    assert args[args.index("--backend-store-uri") + 1] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert env_of(container)["MLFLOW_BACKEND_STORE_URI"] == {
        "secretKeyRef": {"name": "cai-mlflow-backend", "key": "backend-store-uri"}
    }
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    service = f"{FULLNAME}-mlflow"
    for host in (
        service,
        f"{service}.{NAMESPACE}",
        f"{service}.{NAMESPACE}.svc",
        f"{service}.{NAMESPACE}.svc.cluster.local",
    ):
        assert {host, f"{host}:*"} <= set(allowed)
    assert find(objects, "Service")["spec"]["ports"] == [
        {"name": "http", "port": 5000, "targetPort": "http", "protocol": "TCP"}
    ]


def test_the_mlflow_server_runs_the_basic_auth_app_with_its_admin_from_the_secret():
    spec = pod_spec(find(render_objects(), "Deployment"))
    container = spec["containers"][0]
    assert container["args"][-2:] == ["--app-name", "basic-auth"]
    env = env_of(container)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == "/mlflow-auth/basic_auth.ini"
    for variable, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY"),
    ):
        assert env[variable] == {"secretKeyRef": {"name": "cai-mlflow-admin", "key": key}}
    init = spec["initContainers"][0]
    assert env_of(init)["MLFLOW_AUTH_DATABASE_URI"] == {
        "secretKeyRef": {"name": "cai-mlflow-backend", "key": "auth-database-uri"}
    }


def test_the_admin_password_goes_only_to_the_server_and_the_admin_hook():
    for variant in VARIANTS.values():
        objects = render_objects(variant)
        holders = sorted(
            {
                obj["metadata"]["name"]
                for obj in objects
                if pod_spec(obj) is not None
                for container in pod_spec(obj).get("initContainers", []) + pod_spec(obj)["containers"]
                for source in env_of(container).values()
                if isinstance(source, dict)
                and source.get("secretKeyRef", {}).get("name") == "cai-mlflow-admin"
            }
        )
        assert holders in ([f"{FULLNAME}-mlflow", f"{FULLNAME}-mlflow-admin"], [f"{FULLNAME}-mlflow-admin"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())["mlflow"]
    secrets = [values[key]["name"] for key in ("credentialsSecret", "promoterSecret", "servingSecret")]
    assert len(set(secrets + [values["server"]["auth"]["adminSecret"]["name"]])) == 4


def write_auth_config(server: dict, folder: Path, database_uri: str) -> Path:
    """Run the rendered MLflow Deployment's (`server`, a pod spec) auth init container with its
    volume at `folder` and `database_uri` as the auth database's Secret; returns the file it wrote."""
    script = server["initContainers"][0]["args"][0].replace("/mlflow-auth", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["/bin/sh", "-c", script], env={"MLFLOW_AUTH_DATABASE_URI": database_uri}, check=True)
    return folder / "basic_auth.ini"


def written_auth_config(tmp_path: Path, values: dict | None = None):
    """The auth config the rendered init container writes, as MLflow reads it."""
    from mlflow.server.auth.config import read_auth_config

    server = pod_spec(find(render_objects(values), "Deployment"))
    write_auth_config(server, tmp_path, "postgresql://u:p@db/auth")
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    try:
        return read_auth_config()
    finally:
        del os.environ["MLFLOW_AUTH_CONFIG_PATH"]


def test_the_auth_config_written_at_start_is_one_mlflow_reads(tmp_path):
    config = written_auth_config(tmp_path)
    assert (config.default_permission, config.database_uri) == ("READ", "postgresql://u:p@db/auth")
    assert oct((tmp_path / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"


def test_a_checked_password_is_trusted_for_the_values_seconds_and_zero_checks_every_request(tmp_path):
    default = written_auth_config(tmp_path / "default").auth_cache_ttl_seconds
    off = {"mlflow": {"server": {"auth": {"credentialCacheSeconds": 0}}}}
    assert (default, written_auth_config(tmp_path / "off", off).auth_cache_ttl_seconds) == (60, 0)


def test_auth_can_be_turned_off():
    spec = pod_spec(find(render_objects({"mlflow": {"server": {"auth": {"enabled": False}}}}), "Deployment"))
    assert "--app-name" not in spec["containers"][0]["args"] and "initContainers" not in spec


def test_the_network_policy_admits_only_this_releases_pods_pipeline_pods_and_the_ingress():
    policy = find(render_objects(), "NetworkPolicy", f"{FULLNAME}-mlflow")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "cai-platform",
                    "app.kubernetes.io/instance": RELEASE,
                }
            }
        },
        {"podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
    ]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


# -- egress ---------------------------------------------------------------------------------------

DNS = {
    "to": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ],
    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
}
MLFLOW_PODS = {
    "to": [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "cai-platform",
                    "app.kubernetes.io/instance": RELEASE,
                    "app.kubernetes.io/component": "mlflow",
                }
            }
        }
    ],
    "ports": [{"port": 5000, "protocol": "TCP"}],
}
MINIO = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}],
    "ports": [{"port": 9000, "protocol": "TCP"}],
}
KFP = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}}}],
    "ports": [{"port": port, "protocol": "TCP"} for port in (8888, 8887, 8080)],
}
KUBERNETES_API_ANYWHERE = {
    "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
    "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
}


def egress_of(objects: list[dict], name: str) -> dict:
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-{name}")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    return policy["spec"]


def test_pipeline_steps_may_reach_only_dns_s3_mlflow_kfp_and_the_kubernetes_api():
    spec = egress_of(render_objects(VARIANTS["s3-compatible"]), "egress-pipeline")
    assert spec["podSelector"] == {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}
    assert spec["egress"] == [DNS, MINIO, MLFLOW_PODS, KFP, KUBERNETES_API_ANYWHERE]


def test_the_releases_own_pods_but_the_mlflow_server_get_the_same_egress():
    spec = egress_of(render_objects(VARIANTS["s3-compatible"]), "egress")
    assert spec["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "cai-platform", "app.kubernetes.io/instance": RELEASE},
        "matchExpressions": [
            {
                "key": "app.kubernetes.io/component",
                "operator": "NotIn",
                "values": ["mlflow", "mlflow-db-upgrade"],
            }
        ],
    }
    assert spec["egress"] == [DNS, MINIO, MLFLOW_PODS, KFP, KUBERNETES_API_ANYWHERE]


def test_trainjob_nodes_reach_each_other_but_neither_kfp_nor_the_kubernetes_api():
    spec = egress_of(render_objects(VARIANTS["s3-compatible"]), "egress-trainjob")
    nodes = {"matchLabels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}}
    assert spec["podSelector"] == nodes
    assert spec["egress"] == [DNS, MINIO, MLFLOW_PODS, {"to": [{"podSelector": nodes}]}]


def test_the_trainjob_node_label_is_the_one_the_torch_runtime_puts_on_its_pods():
    runtime = yaml.safe_load((REPO_ROOT / "tests" / "upstream" / "torch-distributed.yaml").read_text())
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    selector = egress_of(render_objects(), "egress-trainjob")["podSelector"]["matchLabels"]
    assert selector.items() <= node["template"]["metadata"]["labels"].items()


def test_serving_pods_reach_only_dns_s3_and_mlflow():
    spec = egress_of(render_objects(VARIANTS["serving"]), "egress-serving")
    assert spec["podSelector"] == {
        "matchExpressions": [
            {"key": "serving.kserve.io/inferenceservice", "operator": "In", "values": ["cai-harmless-rl-cai"]}
        ]
    }
    assert [rule["to"][0] for rule in spec["egress"]][2:] == MLFLOW_PODS["to"]


def test_aws_s3_is_reached_on_its_port_outside_the_private_ranges_or_at_the_cidrs_given():
    public = {
        "to": [
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}
        ],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }
    assert egress_of(render_objects(), "egress-pipeline")["egress"][1] == public
    given = render_objects({"egress": {"s3Cidrs": ["52.216.0.0/15", "3.5.0.0/19"]}})
    assert egress_of(given, "egress-pipeline")["egress"][1] == {
        "to": [{"ipBlock": {"cidr": "52.216.0.0/15"}}, {"ipBlock": {"cidr": "3.5.0.0/19"}}],
        "ports": [{"port": 443, "protocol": "TCP"}],
    }


def test_an_external_mlflow_the_kubernetes_api_and_extra_cidrs_come_from_values():
    objects = render_objects(
        {
            "mlflow": {"server": {"enabled": False}, "trackingUri": "http://mlflow.tracking.svc:5000"},
            "egress": {
                "kubernetesApiCidrs": ["172.20.0.1/32"],
                "kubernetesApiPorts": [443],
                "extraCidrs": [{"cidr": "10.9.0.0/16", "ports": [3128]}, {"cidr": "10.8.0.0/16"}],
            },
        }
    )
    rules = egress_of(objects, "egress-pipeline")["egress"]
    assert rules[2] == {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tracking"}}}],
        "ports": [{"port": 5000, "protocol": "TCP"}],
    }
    assert rules[4:] == [
        {"to": [{"ipBlock": {"cidr": "172.20.0.1/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]},
        {"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}], "ports": [{"port": 3128, "protocol": "TCP"}]},
        {"to": [{"ipBlock": {"cidr": "10.8.0.0/16"}}]},
    ]


def test_the_retrain_clone_may_reach_its_git_host():
    rules = egress_of(render_objects(VARIANTS["cronjob-from-git"]), "egress")["egress"]
    assert len(rules) == 6  # DNS, S3, MLflow, KFP, the Kubernetes API, and the git host (https)
    assert rules[-1]["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert rules[-1]["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert len(egress_of(render_objects(), "egress")["egress"]) == 5


def test_egress_policies_can_be_left_out():
    objects = render_objects({"egress": {"enabled": False}})
    assert not [o for o in objects if o["kind"] == "NetworkPolicy" and "egress" in o["metadata"]["name"]]


def test_the_database_schema_is_upgraded_by_a_hook_before_the_server_starts():
    job = find(render_objects(), "Job", f"{FULLNAME}-mlflow-db-upgrade")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = pod_spec(job)["containers"][0]
    assert [container["command"][0], *container["args"]] == [
        "mlflow",
        "db",
        "upgrade",
        "$(MLFLOW_BACKEND_STORE_URI)",
    ]
    assert env_of(container)["MLFLOW_BACKEND_STORE_URI"] == {
        "secretKeyRef": {"name": "cai-mlflow-backend", "key": "backend-store-uri"}
    }


def test_with_serving_on_each_role_gets_an_inference_service_on_its_champions_s3_folder():
    objects = render_objects(VARIANTS["serving"])
    service = find(objects, "InferenceService", "cai-harmless-rl-cai")
    assert (service["apiVersion"], service["metadata"]["namespace"]) == (
        "serving.kserve.io/v1beta1",
        NAMESPACE,
    )
    assert service["metadata"]["annotations"] == {
        "serving.kserve.io/deploymentMode": "Standard",
        STORAGE_ANNOTATION: SERVED["storageUri"],
    }
    predictor = service["spec"]["predictor"]
    assert predictor["serviceAccountName"] == f"{FULLNAME}-serving"
    assert predictor["automountServiceAccountToken"] is False
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 1)
    model = predictor["model"]
    assert model["storageUri"] == SERVED["storageUri"] and model["storageUri"].startswith("s3://")
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["args"] == ["--model_name=cai-harmless-rl-cai", "--backend=vllm"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert set(service) == {"apiVersion", "kind", "metadata", "spec"} and set(service["spec"]) == {
        "predictor"
    }


def test_each_predictor_verifies_the_folder_before_kserve_downloads_it():
    service = find(render_objects(VARIANTS["serving"]), "InferenceService", "cai-harmless-rl-cai")
    predictor = service["spec"]["predictor"]
    (verify,) = predictor["initContainers"]
    assert verify["image"] == "ghcr.io/cai-platform/cai:0.1.0"
    assert verify["args"] == ["serve", "verify", "cai-harmless-rl-cai", "--storage-uri", "$(CAI_STORAGE_URI)"]
    env = env_of(verify)
    # the annotation sync writes (and the chart renders equal to storageUri), read by the downward API
    assert env["CAI_STORAGE_URI"] == {
        "fieldRef": {"fieldPath": f"metadata.annotations['{STORAGE_ANNOTATION}']"}
    }
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "cai-s3-read", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert env["MLFLOW_TRACKING_USERNAME"] == {
        "secretKeyRef": {"name": "cai-mlflow-serving", "key": "MLFLOW_TRACKING_USERNAME", "optional": True}
    }
    assert verify["envFrom"] == [{"configMapRef": {"name": ENV_CONFIGMAP}}]
    assert verify["securityContext"]["readOnlyRootFilesystem"] is True
    assert verify["securityContext"]["allowPrivilegeEscalation"] is False
    assert predictor["volumes"] == [{"name": "cai-verify-tmp", "emptyDir": {}}]


def test_the_serving_pods_account_lists_only_the_read_only_s3_secret_and_holds_no_role():
    objects = render_objects(VARIANTS["serving"])
    account = find(objects, "ServiceAccount", f"{FULLNAME}-serving")
    assert account["secrets"] == [{"name": "cai-s3-read"}]
    assert account["automountServiceAccountToken"] is False
    bound = [
        subject["name"]
        for binding in objects
        if binding["kind"] in ("RoleBinding", "ClusterRoleBinding")
        for subject in binding["subjects"]
    ]
    assert f"{FULLNAME}-serving" not in bound


def test_sync_may_get_and_patch_only_the_served_inference_services_by_name():
    objects = render_objects(
        {
            "serving": {
                "enabled": True,
                "models": [SERVED, {**SERVED, "constitution": "helpful", "role": "pm"}],
            }
        }
    )
    assert find(objects, "Role", f"{FULLNAME}-serve-sync")["rules"] == [
        {
            "apiGroups": ["serving.kserve.io"],
            "resources": ["inferenceservices", "llminferenceservices"],
            "resourceNames": ["cai-harmless-rl-cai", "cai-helpful-pm"],
            "verbs": ["get", "patch"],
        }
    ]


def test_every_service_account_has_only_its_own_role_binding():
    objects = render_objects(VARIANTS["serving"])
    subjects = {
        binding["metadata"]["name"]: [(s["name"], binding["roleRef"]["name"]) for s in binding["subjects"]]
        for binding in objects
        if binding["kind"] in ("RoleBinding", "ClusterRoleBinding")
    }
    assert subjects == {
        f"{FULLNAME}-retrain": [(f"{FULLNAME}-retrain", f"{FULLNAME}-retrain")],
        f"{FULLNAME}-trainjobs": [("pipeline-runner", f"{FULLNAME}-trainjobs")],
        f"{FULLNAME}-{NAMESPACE}-training-runtimes": [
            ("pipeline-runner", f"{FULLNAME}-{NAMESPACE}-training-runtimes")
        ],
        f"{FULLNAME}-serve-sync": [("pipeline-runner", f"{FULLNAME}-serve-sync")],
        f"{FULLNAME}-serve-webhook": [(f"{FULLNAME}-serve-webhook", f"{FULLNAME}-serve-sync")],
    }
    accounts = {
        obj["metadata"]["name"]: pod_spec(obj).get("serviceAccountName")
        for obj in objects
        if pod_spec(obj) is not None
    }
    assert accounts == {
        f"{FULLNAME}-retrain": f"{FULLNAME}-retrain",
        f"{FULLNAME}-serve-webhook": f"{FULLNAME}-serve-webhook",
        f"{FULLNAME}-mlflow": None,
        f"{FULLNAME}-mlflow-db-upgrade": None,
        f"{FULLNAME}-mlflow-admin": None,
    }
    # the pods without an account of their own mount no token
    assert all(
        pod_spec(obj)["automountServiceAccountToken"] is False
        for obj in objects
        if pod_spec(obj) is not None and not pod_spec(obj).get("serviceAccountName")
    )


def test_the_webhook_receiver_serves_the_models_and_verifies_with_the_secret():
    objects = render_objects(VARIANTS["serving"])
    container = pod_spec(find(objects, "Deployment", f"{FULLNAME}-serve-webhook"))["containers"][0]
    assert container["args"] == ["serve", "webhook", "cai-harmless-rl-cai", "--port", "8080"]
    env = env_of(container)
    assert env["CAI_WEBHOOK_SECRET"] == {
        "secretKeyRef": {"name": "cai-mlflow-webhook", "key": "CAI_WEBHOOK_SECRET"}
    }
    # it only reads S3 and MLflow
    assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "cai-s3-read"
    assert env["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["name"] == "cai-mlflow-serving"
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-serve-webhook")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
        "app.kubernetes.io/component"
    ] == ("mlflow")


def test_a_hook_registers_the_webhook_after_install_and_the_server_may_deliver_it_in_cluster():
    objects = render_objects(VARIANTS["serving"])
    job = find(objects, "Job", f"{FULLNAME}-mlflow-admin")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    # after the accounts exist; MLflow lets only an admin manage webhooks
    assert [c["name"] for c in pod_spec(job)["initContainers"]] == ["setup-accounts"]
    register = pod_spec(job)["containers"][0]
    assert register["args"] == [
        "serve", "register-webhook", f"http://{FULLNAME}-serve-webhook:8080/"
    ]  # fmt: skip
    assert env_of(register)["MLFLOW_TRACKING_PASSWORD"]["secretKeyRef"]["name"] == "cai-mlflow-admin"
    server = env_of(pod_spec(find(objects, "Deployment", f"{FULLNAME}-mlflow"))["containers"][0])
    assert (server["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"], server["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"]) == (
        "true",
        "http,https",
    )
    assert server["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == {
        "secretKeyRef": {"name": "cai-mlflow-webhook", "key": "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"}
    }


def test_the_env_config_map_names_the_inference_services_the_register_step_syncs():
    data = find(render_objects(VARIANTS["serving"]), "ConfigMap", ENV_CONFIGMAP)["data"]
    assert (data["CAI_SERVING_NAMESPACE"], data["CAI_SERVING_MODELS"]) == (NAMESPACE, "cai-harmless-rl-cai")


def test_the_env_config_map_names_the_kfp_and_mlflow_uis_for_run_links():
    values = {
        "kfp": {"uiUrl": "https://kf.example.com/pipelines"},
        "mlflow": {"uiUrl": "https://mlflow.example.com"},
    }
    data = find(render_objects(values), "ConfigMap", ENV_CONFIGMAP)["data"]
    assert (data["CAI_KFP_UI_URL"], data["CAI_MLFLOW_UI_URL"]) == (
        "https://kf.example.com/pipelines",
        "https://mlflow.example.com",
    )


def test_serving_is_off_by_default():
    objects = render_objects()
    assert not [o for o in objects if o["kind"] == "InferenceService" or "serving" in o["metadata"]["name"]]
    assert "CAI_SERVING_MODELS" not in find(objects, "ConfigMap", ENV_CONFIGMAP)["data"]


def test_extra_allowed_hosts_are_added_for_an_ingress():
    objects = render_objects({"mlflow": {"server": {"extraAllowedHosts": ["mlflow.example.com"]}}})
    args = pod_spec(find(objects, "Deployment"))["containers"][0]["args"]
    assert args[args.index("--allowed-hosts") + 1].split(",")[-1] == "mlflow.example.com"


@pytest.mark.integration
@pytest.mark.server  # `mlflow server` with the rendered arguments
def test_a_real_mlflow_server_accepts_the_rendered_arguments_and_only_the_allowed_host_names(tmp_path):
    port = free_port()
    # Without auth: the host check is the point here (the basic-auth test below starts it with auth).
    rendered = render_objects(
        {"mlflow": {"server": {"port": port, "workers": 1, "auth": {"enabled": False}}}}
    )
    args = pod_spec(find(rendered, "Deployment"))["containers"][0]["args"]
    with rendered_mlflow_server(args, port, tmp_path):
        service = f"{FULLNAME}-mlflow"
        statuses = {
            host: status_for_host(port, host)
            for host in (
                f"{service}:{port}",
                f"{service}.{NAMESPACE}.svc:{port}",
                f"attacker.example.com:{port}",
            )
        }
    assert list(statuses.values()) == [200, 200, 403]


def rendered_auth(server: dict, tmp_path: Path, admin: tuple[str, str]) -> dict[str, str]:
    """Run the rendered MLflow Deployment's (`server`, a pod spec) auth init container in
    `tmp_path` (it writes basic_auth.ini there, over a SQLite auth database) and return the server's
    environment for basic auth with `admin` as its admin."""
    config = write_auth_config(server, tmp_path, f"sqlite:///{tmp_path / 'auth.db'}")
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


@contextlib.contextmanager
def rendered_mlflow_server(args: list[str], port: int, tmp_path: Path, env: dict | None = None):
    """`mlflow` run with the chart's rendered server arguments until the block ends: the pod's
    secret-held backend URI becomes a SQLite file in `tmp_path`, and it listens on loopback only."""
    local = {"$(MLFLOW_BACKEND_STORE_URI)": f"sqlite:///{tmp_path / 'mlflow.db'}", "0.0.0.0": "127.0.0.1"}
    with open(tmp_path / "mlflow.log", "w") as log:
        # its own session, so that stopping it also stops the uvicorn workers it spawns
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *(local.get(arg, arg) for arg in args)],
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        try:
            wait_for_port(port, server, f"mlflow server (log: {tmp_path / 'mlflow.log'})", timeout=240)
            yield
        finally:
            stop_session(server)


def stop_session(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def status_for_host(port: int, host: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
    return connection.getresponse().status


def test_with_mlflow_off_no_server_is_installed_and_clients_use_the_given_uri():
    objects = render_objects(VARIANTS["mlflow-external"])
    assert not {o["kind"] for o in objects} & {"Deployment", "Service"}
    assert (
        find(objects, "ConfigMap", ENV_CONFIGMAP)["data"]["MLFLOW_TRACKING_URI"]
        == "https://mlflow.example.com"
    )


# -- constitutions --------------------------------------------------------------------------------


def test_the_chart_constitutions_equal_the_repository_constitutions():
    if UPDATE_DEPLOY_FILES:
        update_chart_constitutions()
    assert tree(REPO_CONSTITUTIONS), "constitutions/ is empty"
    assert tree(CHART_CONSTITUTIONS) == tree(REPO_CONSTITUTIONS), (
        "helm/cai-platform/files/constitutions differs from constitutions/: "
        "run CAI_UPDATE_DEPLOY_FILES=1 .venv/bin/pytest tests/test_helm_chart.py tests/test_kustomize.py"
    )


def test_the_config_map_carries_every_constitution_file_byte_for_byte():
    data = find(render_objects(), "ConfigMap", f"{FULLNAME}-config")["data"]
    carried = {
        key.replace("__", "/"): text.encode() for key, text in data.items() if key != "run-config.yaml"
    }
    assert carried == tree(CHART_CONSTITUTIONS)


# -- lint and bad values --------------------------------------------------------------------------


def test_helm_lint_finds_no_warning_or_error():
    report = helm.lint(CHART, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBERNETES_VERSION}.0")
    assert report["errors"] == []
    # severity 2 is a warning, 3 an error; only informational notes (e.g. "icon is recommended") remain
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"retrain": {"mode": "nightly"}},
            "at '/retrain/mode': value must be one of 'cronjob', 'argocd-hook'",
        ),
        ({"s3": {"bucket_name": "x"}}, "at '/s3': additional properties 'bucket_name' not allowed"),
        ({"podSecurity": {"runAsUser": 0}}, "at '/podSecurity/runAsUser'"),
        ({"retrain": {"schedule": "hourly"}}, "at '/retrain/schedule'"),
        ({"gpuProfiles": {"gpu": {"accelerator_count": 0}}}, "at '/gpuProfiles/gpu/accelerator_count'"),
        (
            {"pipeline": {"stageProfiles": {"sfft": "gpu"}}},
            "at '/pipeline/stageProfiles': additional properties 'sfft'",
        ),
        ({"s3": {"endpointUrl": "minio:9000"}}, "at '/s3/endpointUrl'"),
    ],
)
def test_a_value_that_breaks_the_schema_fails_at_render_naming_the_field(values, named):
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    assert named in str(caught.value)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"s3": {"credentialsSecret": {"name": ""}}}, "s3.credentialsSecret.name is required"),
        ({"mlflow": {"credentialsSecret": {"name": ""}}}, "mlflow.credentialsSecret.name is required"),
        (
            {"mlflow": {"server": {"backendStoreSecret": {"name": ""}}}},
            "mlflow.server.backendStoreSecret.name is required",
        ),
        ({"mlflow": {"server": {"enabled": False}}}, "mlflow.trackingUri is required"),
        (
            {"serving": {"enabled": True}},
            "serving.models[0].storageUri is required to create InferenceService cai-harmless-rl-cai",
        ),
        (
            {"mlflow": {"server": {"auth": {"adminSecret": {"name": ""}}}}},
            "mlflow.server.auth.adminSecret.name is required",
        ),
        (
            {"mlflow": {"server": {"auth": {"databaseSecret": {"name": ""}}}}},
            "mlflow.server.auth.databaseSecret.name is required",
        ),
    ],
)
def test_a_missing_secret_or_server_reference_fails_at_render_naming_it(values, named):
    with pytest.raises(helm.HelmRenderError, match=re.escape(named)):
        render(values)


def test_the_committed_pipeline_reads_only_configmaps_and_secrets_the_default_chart_provides():
    from cai_lib.core.deploy import SecretRefs

    _, platform = yaml.safe_load_all((REPO_ROOT / "pipelines" / "cai_pipeline.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    configmaps = {m["configMapName"] for e in executors for m in e.get("configMapAsEnv", [])}
    secrets = {m["secretName"] for e in executors for m in e.get("secretAsEnv", [])}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rendered = {o["metadata"]["name"] for o in render_objects({}) if o["kind"] == "ConfigMap"}
    assert configmaps <= rendered
    assert secrets == {
        values["s3"]["credentialsSecret"]["name"],
        values["mlflow"]["credentialsSecret"]["name"],
        values["mlflow"]["promoterSecret"]["name"],
        values["huggingface"]["tokenSecret"]["name"],
    }
    assert secrets == {
        SecretRefs().s3_secret,
        SecretRefs().mlflow_secret,
        SecretRefs().hf_secret,
        SecretRefs().promoter_secret,
    }


@pytest.mark.integration
@pytest.mark.server  # `mlflow server` with the rendered arguments and auth
def test_the_rendered_auth_server_refuses_anonymous_alias_writes_and_admits_the_pipelines_account(
    tmp_path, tiny_model_dir, s3_bucket, monkeypatch
):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from cai_lib.core.store import ArtifactStore
    from cai_lib.platform.registry.versions import register_checkpoint

    port = free_port()
    spec = pod_spec(find(render_objects({"mlflow": {"server": {"port": port, "workers": 1}}}), "Deployment"))
    # The init container's script writes the auth config; here into tmp_path, on a SQLite auth store.
    script = spec["initContainers"][0]["args"][0].replace("/mlflow-auth", str(tmp_path))
    subprocess.run(
        ["/bin/sh", "-c", script],
        env={"MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'auth.db'}"},
        check=True,
    )
    args = spec["containers"][0]["args"]
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": "pipeline",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-pipeline",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-key",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    uri = f"http://127.0.0.1:{port}"
    with rendered_mlflow_server(args, port, tmp_path, env):
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pipeline")
        checkpoint = ArtifactStore.open(f"s3://{s3_bucket}").put_dir(tiny_model_dir, "ck")
        version = register_checkpoint(uri, "cai-harmless-rl-cai", checkpoint, None, hand_lineage()).version
        MlflowClient(uri).set_registered_model_alias("cai-harmless-rl-cai", "champion", version)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(MlflowException) as anonymous:
            MlflowClient(uri).set_registered_model_alias("cai-harmless-rl-cai", "champion", version)
        champion = http_json(
            uri,
            "/api/2.0/mlflow/registered-models/get?name=cai-harmless-rl-cai",
            ("pipeline", "s3cret-pipeline"),
        )
    assert "401" in str(anonymous.value) or "Unauthorized" in str(anonymous.value)
    assert champion["registered_model"]["aliases"] == [{"alias": "champion", "version": version}]


def http_json(uri: str, path: str, credentials: tuple[str, str]) -> dict:
    import base64
    import urllib.request

    token = base64.b64encode(":".join(credentials).encode()).decode()
    request = urllib.request.Request(uri + path, headers={"Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)
