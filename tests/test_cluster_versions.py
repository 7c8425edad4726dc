"""`cai submit` refuses a cluster that lacks what the run needs, in one line naming the feature and
the version, before it uploads anything (`cai_lib.platform.cluster_versions`).

The KFP API server is tests/kfp_standin.py, which answers healthz with the upstream server's
fields (its release in `tag_name`); the Kubernetes API is tests/kubernetes_standin.py, which
serves the OpenAPI v3 documents of the vendored Trainer CRDs (tests/upstream). The minimum
versions are one table, in the code and in docs/deploy.md.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from kfp_standin import KfpStandin
from kubernetes_standin import KubernetesStandIn
from test_submit import kfp_client, no_local_kfp_settings  # noqa: F401 - autouse: no local KFP context or token

from cai_lib.core.errors import CaiError
from cai_lib.platform.cluster_versions import REQUIREMENTS, api_getter, kfp_problem, version_tuple
from cai_lib.platform.run_config import load_run_config
from pipelines.submit import submit_run

TWO_NODE_SFT = [
    "deploy.resources={sft: {accelerator_type: nvidia.com/gpu, accelerator_count: 8, num_nodes: 2}}",
]


def kubernetes_of(standin: KubernetesStandIn):
    from kubernetes.client import ApiClient, Configuration

    configuration = Configuration()
    configuration.host = standin.url
    return api_getter(ApiClient(configuration))


@pytest.fixture
def old_kfp():
    with KfpStandin(tag_name="2.16.1") as standin:
        yield standin


def test_the_docs_table_of_minimum_versions_is_the_one_submit_checks():
    deploy = (REPO_ROOT / "docs" / "deploy.md").read_text()
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| ([^|]+?) \| ([^|]+?) \|$", deploy, re.MULTILINE)
    documented = [tuple(cell.strip() for cell in row) for row in rows if version_tuple(row[1].strip("` >="))]
    assert documented == [(r.part, f">= {r.minimum}", r.feature, r.detail) for r in REQUIREMENTS]


@pytest.mark.parametrize(
    ("tag", "problem"),
    [
        ("2.17.0", None),
        ("2.18.1", None),
        ("unknown", None),  # a build that does not say its release: the run will tell
        (
            "2.16.1",
            "the exit handler seeing how a run with fan-outs ended needs Kubeflow Pipelines >= 2.17.0",
        ),
        (
            "2.14.4",
            "the exit handler seeing how a run with fan-outs ended needs Kubeflow Pipelines >= 2.17.0",
        ),
    ],
)
def test_the_kfp_release_in_healthz_is_held_to_the_newest_minimum(tag, problem):
    found = kfp_problem({"tag_name": tag, "multi_user": False}, "http://kfp")
    assert (found.split(": ", 1)[1] if found else None) == problem


def test_submit_to_a_kfp_older_than_the_minimum_fails_naming_feature_and_version_and_uploads_nothing(old_kfp):
    with pytest.raises(CaiError) as refused:
        submit_run(old_kfp.url, load_run_config(), "e", client=kfp_client(old_kfp.url))
    assert str(refused.value) == (
        f"Kubeflow Pipelines 2.16.1 at {old_kfp.url} is too old: the exit handler seeing how a run with fan-outs "
        "ended needs Kubeflow Pipelines >= 2.17.0"
    )
    assert (old_kfp.pipelines, old_kfp.versions, old_kfp.runs) == ([], [], [])


def test_cai_submit_says_so_in_one_line_with_exit_status_2(old_kfp, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "from cai_lib.cli import main; main()", "submit", "--host", old_kfp.url]
        + ["--set", "judge_model=Qwen/Qwen2.5-7B-Instruct"],  # an independent judge, which submit requires
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith("needs Kubeflow Pipelines >= 2.17.0")


@pytest.mark.parametrize(
    ("crds", "problem"),
    [
        (("trainjobs.trainer.kubeflow.org.json",), None),
        (
            ("trainjobs.trainer.kubeflow.org-v2.1.0.json",),
            (
                "multi-node training (num_nodes > 1): this cluster's TrainJob has no spec.runtimePatches, which Kubeflow "
                "Trainer >= 2.2.0 adds (older ones prune it)"
            ),
        ),
        (
            (),
            (
                "multi-node training (num_nodes > 1) runs as a Kubeflow Trainer TrainJob, and this cluster has no "
                "trainer.kubeflow.org/v1alpha1 API: install Kubeflow Trainer >= 2.2.0"
            ),
        ),
    ],
    ids=["trainer-2.2", "trainer-2.1", "no-trainer"],
)
@pytest.mark.server  # the KFP and Kubernetes API stand-ins, started in its body
def test_a_multi_node_run_needs_a_trainer_whose_trainjob_has_the_fields_the_step_sets(
    tmp_path, crds, problem
):
    config = load_run_config(overrides=TWO_NODE_SFT)
    with KfpStandin() as kfp, KubernetesStandIn(tmp_path, crds=crds) as cluster:
        try:
            submit_run(kfp.url, config, "e", client=kfp_client(kfp.url), kubernetes=kubernetes_of(cluster))
            found = None
        except CaiError as err:
            found = str(err)
        submitted = len(kfp.runs)
    assert (found, submitted) == (problem, 0 if problem else 1)


@pytest.mark.server  # the KFP API stand-in, started in its body
def test_a_single_node_run_does_not_ask_the_kubernetes_api(tmp_path):
    with KfpStandin() as kfp:
        run = submit_run(
            kfp.url, load_run_config(), "e", client=kfp_client(kfp.url), kubernetes=lambda path: 1 / 0
        )
    assert run.run_id
