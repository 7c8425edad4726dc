"""docs/deploy.md is the operator's path: its checklist names every Secret and ConfigMap the
rendered chart and the compiled pipeline refer to, and each step of the path gives its command."""

from __future__ import annotations

import re

import yaml
from conftest import REPO_ROOT
from test_helm_chart import VARIANTS, render_objects

DEPLOY = (REPO_ROOT / "docs" / "deploy.md").read_text()
COMMITTED = REPO_ROOT / "pipelines" / "cai_pipeline.yaml"
# The chart's defaults and each optional part it installs with its own defaults.
PRESETS = ({}, VARIANTS["serving"], VARIANTS["serving-llm"])


def referenced(obj: object, found: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """(kind, name) of every Secret and ConfigMap `obj` refers to, at any depth."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("secretKeyRef", "secretRef") and isinstance(value, dict) and "name" in value:
                found.add(("Secret", value["name"]))
            elif (
                key in ("configMapKeyRef", "configMapRef", "configMap")
                and isinstance(value, dict)
                and "name" in value
            ):
                found.add(("ConfigMap", value["name"]))
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                found.add(("Secret", value["secretName"]))
            referenced(value, found)
    elif isinstance(obj, list):
        for item in obj:
            referenced(item, found)
    return found


def chart_references() -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for values in PRESETS:
        for obj in render_objects(values):
            referenced(obj, found)
            if obj["kind"] == "ServiceAccount":  # KServe's storage initializer reads these Secrets
                found.update(("Secret", s["name"]) for s in obj.get("secrets", []))
            if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "kfp-launcher":
                providers = yaml.safe_load(obj["data"]["providers"])
                found.add(("Secret", providers["s3"]["default"]["credentials"]["secretRef"]["secretName"]))
            if obj["kind"] == "ConfigMap":
                found.add(("ConfigMap", obj["metadata"]["name"]))
    return found


def pipeline_references() -> set[tuple[str, str]]:
    _, platform = yaml.safe_load_all(COMMITTED.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    return {("Secret", m["secretName"]) for e in executors for m in e.get("secretAsEnv", [])} | {
        ("ConfigMap", m["configMapName"]) for e in executors for m in e.get("configMapAsEnv", [])
    }


def checklist() -> set[tuple[str, str]]:
    section = DEPLOY[DEPLOY.index("### 6. The Secrets and ConfigMaps") :]
    section = section[: section.index("\n### 7.")]
    return {
        (kind, name)
        for name, kind in re.findall(r"^\| `([^`]+)` \| (Secret|ConfigMap) \|", section, re.MULTILINE)
    }


def test_the_checklist_names_every_secret_and_configmap_the_chart_and_the_pipeline_refer_to():
    assert checklist() == chart_references() | pipeline_references()


def test_the_checklist_gives_the_command_that_creates_each_secret_you_make():
    section = DEPLOY[DEPLOY.index("### 6. The Secrets and ConfigMaps") : DEPLOY.index("\n### 7.")]
    created = set(re.findall(r"create secret generic (\S+)", section))
    assert created == {name for kind, name in checklist() if kind == "Secret"}


def test_every_step_of_the_path_from_an_empty_cluster_gives_its_command():
    path = DEPLOY[DEPLOY.index("## From an empty cluster") : DEPLOY.index("\n## Images")]
    steps = re.split(r"^### \d+\. ", path, flags=re.MULTILINE)[1:]
    titles = [step.splitlines()[0] for step in steps]
    assert titles == [
        "Tools",
        "The cluster's parts",
        "The bucket",
        "PostgreSQL for MLflow",
        "Images in your registry",
        "The Secrets and ConfigMaps",
        "Install the chart",
        "Reach the Kubeflow Pipelines API",
        "The first run",
        "A promotion, and serving that follows it",
    ]
    assert [title for title, step in zip(titles, steps) if title != "Tools" and "```bash" not in step] == []


def test_the_install_command_overrides_the_image_names_for_your_registry():
    install = DEPLOY[DEPLOY.index("### 7. Install the chart") :]
    assert "--set images.cpu.repository=REGISTRY/cai" in install
    assert "--set images.gpu.repository=REGISTRY/cai-gpu" in install
