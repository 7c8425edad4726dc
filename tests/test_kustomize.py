"""The kustomize manifests in k8s/: a base and two overlays (dev: a retrain CronJob; gitops: an Argo
CD PostSync hook Job), plus an example Argo CD Application.

The base and each overlay's trigger are the Helm chart rendered with the values.yaml beside them,
so kustomize and Helm users install the same objects; these tests fail while a committed manifest
differs from a fresh rendering (CAI_UPDATE_DEPLOY_FILES=1 rewrites them). Each overlay is then built
with `kubectl kustomize` (kubectl bundles kustomize; Debian package `kubectl`) and every object it
outputs is validated against the Kubernetes schemas.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from conftest import REPO_ROOT
from test_helm_chart import (
    UPDATE_DEPLOY_FILES,
    assert_pods_are_locked_down,
    assert_valid_for_kubernetes,
    objects_of,
    pod_spec,
    render,
    update_chart_constitutions,
)

K8S = REPO_ROOT / "k8s"
RELEASE = "cai-platform"
NAMESPACE = "cai"
HEADER = (
    "# Generated from helm/cai-platform (release {release}, namespace {namespace}) with {values}.\n"
    "# Do not edit: change the chart or the values, then run\n"
    "#   CAI_UPDATE_DEPLOY_FILES=1 .venv/bin/pytest tests/test_helm_chart.py tests/test_kustomize.py\n"
)
# overlay -> (the chart template it adds, the file that holds it)
OVERLAYS = {
    "dev": ("retrain-cronjob.yaml", "retrain-cronjob.yaml"),
    "gitops": ("retrain-hook-job.yaml", "retrain-hook-job.yaml"),
}
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (which bundles kustomize) is not installed: apt-get install kubectl"
)


def merged(base: dict, override: dict) -> dict:
    result = dict(base)
    for key, value in override.items():
        result[key] = (
            merged(result[key], value)
            if isinstance(value, dict) and isinstance(result.get(key), dict)
            else value
        )
    return result


def values_of(*paths) -> dict:
    values: dict = {}
    for path in paths:
        values = merged(values, yaml.safe_load(path.read_text()) or {})
    return values


def manifest(templates: list[str], values_label: str) -> str:
    header = HEADER.format(release=RELEASE, namespace=NAMESPACE, values=values_label)
    return header + "".join(f"---\n{text.strip()}\n" for text in templates)


def expected_base() -> str:
    rendered = render(values_of(K8S / "base" / "values.yaml"), release=RELEASE, namespace=NAMESPACE)
    return manifest(list(rendered.values()), "k8s/base/values.yaml")


def expected_trigger(overlay: str) -> str:
    template, _ = OVERLAYS[overlay]
    values = values_of(K8S / "base" / "values.yaml", K8S / "overlays" / overlay / "values.yaml")
    rendered = render(values, release=RELEASE, namespace=NAMESPACE)
    return manifest([rendered[f"cai-platform/templates/{template}"]], f"k8s/overlays/{overlay}/values.yaml")


def check_generated(path, expected: str) -> None:
    if UPDATE_DEPLOY_FILES:
        path.write_text(expected)
    assert path.read_text() == expected, (
        f"{path.relative_to(REPO_ROOT)} is not the chart's current rendering: "
        "run CAI_UPDATE_DEPLOY_FILES=1 .venv/bin/pytest tests/test_helm_chart.py tests/test_kustomize.py"
    )


def kustomize_build(overlay: str) -> list[dict]:
    built = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def identity(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def test_the_base_is_the_chart_rendered_with_the_base_values():
    if UPDATE_DEPLOY_FILES:
        update_chart_constitutions()
    check_generated(K8S / "base" / "cai-platform.yaml", expected_base())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_trigger_is_the_chart_rendered_with_the_overlay_values(overlay):
    check_generated(K8S / "overlays" / overlay / OVERLAYS[overlay][1], expected_trigger(overlay))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_the_built_overlay_validates_against_the_kubernetes_schemas(overlay):
    assert_valid_for_kubernetes(kustomize_build(overlay))


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_of_the_built_overlay_runs_as_non_root_without_privilege_escalation(overlay):
    # the MLflow server, its schema-upgrade hook, its admin hook (the accounts) and the retrain job
    assert assert_pods_are_locked_down(kustomize_build(overlay)) == 4


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_built_overlay_holds_the_objects_helm_installs_with_the_same_values(overlay):
    values = values_of(K8S / "base" / "values.yaml", K8S / "overlays" / overlay / "values.yaml")
    from_helm = {identity(o): o for o in objects_of(render(values, release=RELEASE, namespace=NAMESPACE))}
    built = {identity(o): o for o in kustomize_build(overlay)}
    assert built.keys() == from_helm.keys()
    for key, obj in built.items():
        assert obj["metadata"]["labels"].pop("app.kubernetes.io/managed-by") == "kustomize"
        from_helm[key]["metadata"]["labels"].pop("app.kubernetes.io/managed-by")
        assert obj == from_helm[key], key


@needs_kubectl
def test_the_dev_overlay_retrains_on_a_schedule_and_has_no_hook():
    objects = kustomize_build("dev")
    cronjob = next(o for o in objects if o["kind"] == "CronJob")
    assert cronjob["spec"]["schedule"] == "*/30 * * * *"
    assert pod_spec(cronjob)["containers"][0]["args"][:3] == ["retrain", "--repo", "/etc/cai"]
    assert not [o for o in objects if o["kind"] == "Job" and "retrain" in o["metadata"]["name"]]


@needs_kubectl
def test_the_gitops_overlay_retrains_in_an_argocd_postsync_hook_and_has_no_cronjob():
    objects = kustomize_build("gitops")
    job = next(o for o in objects if o["kind"] == "Job" and "retrain" in o["metadata"]["name"])
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PostSync"
    assert pod_spec(job)["containers"][0]["args"][:3] == ["retrain", "--repo", "/etc/cai"]
    assert not [o for o in objects if o["kind"] == "CronJob"]


def test_the_example_argocd_application_syncs_the_gitops_overlay_into_the_rendered_namespace():
    # kubernetes-validate ships the core Kubernetes schemas only, not Argo CD's CRDs, so the
    # Application is checked field by field.
    application = yaml.safe_load((K8S / "argocd" / "application.yaml").read_text())
    assert (application["apiVersion"], application["kind"]) == ("argoproj.io/v1alpha1", "Application")
    spec = application["spec"]
    assert spec["source"]["path"] == "k8s/overlays/gitops"
    assert (K8S / "overlays" / "gitops" / "kustomization.yaml").is_file()
    assert spec["destination"] == {"server": "https://kubernetes.default.svc", "namespace": NAMESPACE}
    assert spec["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
