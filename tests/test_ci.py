"""The CI workflow that makes the images the chart and the run config name
(.github/workflows/images.yaml): linted with actionlint (the dev extras install it), building both
Dockerfiles, running the test suite inside the CPU image, and pushing under the exact names and tag
`DeployConfig` and the chart default to.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from cai_lib.core.deploy import DeployConfig

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "images.yaml"
ACTIONLINT = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
VERSION = version("cai-platform")


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps_of(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def built(workflow: dict, job: str) -> dict:
    return next(
        s["with"]
        for s in steps_of(workflow, job)
        if s.get("uses", "").startswith("docker/build-push-action@")
    )


@pytest.mark.skipif(ACTIONLINT is None, reason="actionlint is not installed: pip install -e '.[dev]'")
def test_actionlint_finds_nothing_in_the_workflows():
    linted = subprocess.run(
        [ACTIONLINT, "-no-color", *map(str, sorted(WORKFLOW.parent.glob("*.y*ml")))],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")


def test_the_images_are_pushed_under_the_names_and_tag_the_run_config_and_the_chart_use(workflow):
    values = yaml.safe_load((REPO_ROOT / "helm" / "cai-platform" / "values.yaml").read_text())["images"]
    chart = yaml.safe_load((REPO_ROOT / "helm" / "cai-platform" / "Chart.yaml").read_text())
    names = {f"{workflow['env'][key]}:{VERSION}" for key in ("CPU_IMAGE", "GPU_IMAGE")}
    assert names == {DeployConfig().image_cpu, DeployConfig().image_gpu}
    assert names == {f"{values[kind]['repository']}:{chart['appVersion']}" for kind in ("cpu", "gpu")}


def test_each_job_builds_its_dockerfile_tagged_with_the_package_version(workflow):
    for job, kind in (("cpu", "CPU"), ("gpu", "GPU")):
        build = built(workflow, job)
        assert build["file"] == f"docker/Dockerfile.{job}"
        assert build["tags"] == f"${{{{ env.{kind}_IMAGE }}}}:${{{{ steps.version.outputs.version }}}}"
        version_step = next(s for s in steps_of(workflow, job) if s.get("id") == "version")
        assert '["project"]["version"]' in version_step["run"]


def test_the_test_suite_runs_inside_the_cpu_image_it_just_built(workflow):
    steps = steps_of(workflow, "cpu")
    build = next(i for i, s in enumerate(steps) if s.get("uses", "").startswith("docker/build-push-action@"))
    tests = next(i for i, s in enumerate(steps) if "pytest" in s.get("run", ""))
    assert steps[build]["with"]["load"] is True and build < tests
    assert steps[tests]["env"]["IMAGE"] == steps[build]["with"]["tags"]
    assert "docker run" in steps[tests]["run"] and '"$IMAGE"' in steps[tests]["run"]


def test_images_are_pushed_from_main_and_tags_only_after_the_tests(workflow):
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"] == {"branches": ["main"], "tags": ["v*"]}
    assert workflow["env"]["PUSH"] == "${{ github.event_name == 'push' }}"
    steps = steps_of(workflow, "cpu")
    tests = next(i for i, s in enumerate(steps) if "pytest" in s.get("run", ""))
    push = next(i for i, s in enumerate(steps) if "docker push" in s.get("run", ""))
    assert tests < push and steps[push]["if"] == "env.PUSH == 'true'"
    assert built(workflow, "gpu")["push"] == "${{ env.PUSH == 'true' }}"
