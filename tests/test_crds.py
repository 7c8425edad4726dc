"""Custom objects against the upstream CRDs at the minimum supported versions (tests/upstream),
strict: what the API server would prune is an error. The chart's own objects are checked in
tests/test_helm_chart.py (`assert_valid_for_kubernetes`); here the objects made elsewhere: the
TrainJob a training step creates, the stand-ins' objects, KServe's own runtime objects, and the
vendoring itself.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from crd_schema import CRDS, UPSTREAM, crd_errors
from kubernetes_standin import TORCH_DISTRIBUTED
from test_helm_chart import CHART, KUBERNETES_VERSION, SERVED, find, render_objects

from cai_lib.core.deploy import DeployConfig, default_gpu_profile
from cai_lib.engines.trainjob import plan_of, render

OUT = "s3://bucket/artifacts/outputs/sft/0123abcd/attempt-20261202T000000-abcdef12"


@pytest.fixture(scope="module")
def trainjob() -> dict:
    deploy = DeployConfig(resources={"sft": default_gpu_profile().model_copy(update={"num_nodes": 2})})
    return json.loads(
        json.dumps(render(plan_of("sft", deploy), f"{OUT}.trainjob/job.json", OUT, "team-a"), default=str)
    )


def test_the_trainjob_a_training_step_creates_validates_against_trainer_2_2(trainjob):
    assert crd_errors(trainjob) == []


def test_trainer_2_1_would_prune_the_runtime_patches_and_the_deadline_the_trainjob_needs(trainjob):
    errors = crd_errors(trainjob, "trainjobs.trainer.kubeflow.org-v2.1.0.json")
    assert errors == [
        "TrainJob cai-sft-"
        + trainjob["metadata"]["name"].removeprefix("cai-sft-")
        + ": spec: Additional properties are not allowed ('activeDeadlineSeconds', 'runtimePatches' were unexpected)"
    ]


def test_the_kubernetes_stand_ins_training_runtime_is_one_trainer_2_2_accepts():
    assert crd_errors(TORCH_DISTRIBUTED) == []


@pytest.mark.parametrize("name", ["kserve-huggingfaceserver.yaml", "torch-distributed.yaml"])
def test_the_vendored_upstream_objects_validate_against_their_crds(name):
    assert crd_errors(yaml.safe_load((UPSTREAM / name).read_text())) == []


def test_a_field_the_crd_does_not_define_is_refused():
    service = find(render_objects({"serving": {"enabled": True, "models": [SERVED]}}), "InferenceService")
    service["spec"]["predictor"]["model"]["storageURI"] = service["spec"]["predictor"]["model"].pop(
        "storageUri"
    )
    unexpected = "Additional properties are not allowed ('storageURI' was unexpected)"
    assert crd_errors(service) == [
        f"InferenceService cai-harmless-rl-cai: spec/predictor/model: {unexpected}"
    ]


def test_a_kind_at_a_version_its_crd_does_not_serve_is_refused():
    service = find(render_objects({"serving": {"enabled": True, "models": [SERVED]}}), "InferenceService")
    service["apiVersion"] = "serving.kserve.io/v1alpha1"
    assert crd_errors(service)[0].endswith("the CRD serves serving.kserve.io/v1beta1")


def test_the_readme_names_every_vendored_file_with_its_repository_path_tag_and_hash():
    readme = (UPSTREAM / "README.md").read_text()
    rows = {
        m["file"]: m
        for m in re.finditer(
            r"^\| `(?P<file>[^`]+)` \| (?P<repo>\S+) \| `(?P<path>[^`]+)` \| (?P<tag>v\S+) \|.*`(?P<sha>[0-9a-f]{64})` \|$",
            readme,
            re.MULTILINE,
        )
    }
    files = {path.name for path in UPSTREAM.iterdir() if path.suffix in (".json", ".yaml")}
    assert set(rows) == files and {filename for filename, _ in CRDS.values()} <= files
    for name in files:
        if name.endswith(".yaml"):  # byte for byte upstream's
            assert hashlib.sha256((UPSTREAM / name).read_bytes()).hexdigest() == rows[name]["sha"], name


def test_the_charts_kube_version_is_the_version_objects_are_validated_at():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBERNETES_VERSION}.0-0"
