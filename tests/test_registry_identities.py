"""Registration and promotion as two MLflow identities, on the real `mlflow server` with its
basic-auth app as the Helm chart renders and configures it (default permission READ).

In MLflow's permission model whoever may add a version to a model may also move its aliases, and
the creator of a model may do both. So the pipeline's identity creates and writes only the
candidates model, and the promoter's identity creates the production model, copies a candidate
into it and moves `champion`. These tests show the pipeline's identity refused every write that
could move what serving follows, and the promoter allowed.
"""

from __future__ import annotations

import pytest
from conftest import free_port, hand_lineage
from test_helm_chart import find, pod_spec, render_objects, rendered_auth, rendered_mlflow_server

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import version_by_alias
from cai_lib.core.names import CHAMPION, LOCK_SUFFIX, candidates_name
from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import scoped_environ
from cai_lib.platform.registry.gate import PromotionGate, WinRateEvidence
from cai_lib.platform.registry.lock import release_run_locks
from cai_lib.platform.registry.promotion import promote_from_evaluation, record_evaluation
from cai_lib.platform.registry.versions import register_checkpoint, set_challenger

pytestmark = pytest.mark.integration

ADMIN = ("admin", "s3cret-admin")
PIPELINE = ("cai-pipeline", "s3cret-pipeline")
PROMOTER = ("cai-promoter", "s3cret-promoter")
MODEL = "cai-harmless-rl-cai"


def as_user(user: tuple[str, str]):
    """MLflow requests in the block authenticate as `user`."""
    return scoped_environ(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])


def refused(err: Exception) -> bool:
    return "PERMISSION_DENIED" in str(err) or "403" in str(err)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The chart's MLflow server with basic auth, its admin and the platform's two accounts."""
    from mlflow.server.auth.client import AuthServiceClient

    work, port = tmp_path_factory.mktemp("auth"), free_port()
    spec = pod_spec(find(render_objects({"mlflow": {"server": {"port": port, "workers": 1}}}), "Deployment"))
    env = rendered_auth(spec, work, ADMIN)
    uri = f"http://127.0.0.1:{port}"
    with rendered_mlflow_server(spec["containers"][0]["args"], port, work, env):
        with as_user(ADMIN):
            for user in (PIPELINE, PROMOTER):
                AuthServiceClient(uri).create_user(*user)
        yield uri


@pytest.fixture
def candidate(auth_server, s3_bucket, tiny_model_dir, monkeypatch):
    """As the pipeline: a registered candidate, made challenger and evaluated (as the register
    step leaves it before the gate); returns the production model's name."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
    name = f"{MODEL}-{s3_bucket[-6:]}"
    checkpoint = ArtifactStore.open(f"s3://{s3_bucket}").put_dir(tiny_model_dir, "ck")
    with as_user(PIPELINE):
        version = register_checkpoint(
            auth_server, candidates_name(name), checkpoint, None, hand_lineage()
        ).version
        set_challenger(auth_server, candidates_name(name), version)
        passed = WinRateEvidence(rate=0.8, ci_low=0.7, n=100)
        record_evaluation(auth_server, candidates_name(name), version, passed, passed, "sl-cai")
    return name


def test_the_promoter_copies_the_candidate_into_production_and_moves_champion(auth_server, candidate):
    with as_user(PROMOTER):
        _, decision = promote_from_evaluation(auth_server, candidate, None, PromotionGate())
    with as_user(PIPELINE):
        champion = version_by_alias(auth_server, candidate, CHAMPION)
    assert decision.promote and decision.production_version == champion.version == "1"
    assert champion.registered_source == f"models:/{candidates_name(candidate)}/1"


def test_the_pipeline_identity_cannot_move_champion_or_add_a_version_to_production(auth_server, candidate):
    from mlflow import MlflowClient

    with as_user(PROMOTER):
        promote_from_evaluation(auth_server, candidate, None, PromotionGate())
    with as_user(PIPELINE):
        client = MlflowClient(auth_server, auth_server)
        with pytest.raises(Exception) as alias:
            client.set_registered_model_alias(candidate, CHAMPION, "1")
        with pytest.raises(Exception) as copy:
            client.copy_model_version(f"models:/{candidates_name(candidate)}/1", candidate)
        with pytest.raises(Exception) as version:
            client.create_model_version(candidate, "s3://elsewhere/weights")
    assert refused(alias.value) and refused(copy.value) and refused(version.value)


def test_a_promotion_run_as_the_pipeline_identity_is_refused_in_one_line(auth_server, candidate):
    with as_user(PROMOTER):  # the promoter made the production model: the pipeline may only read it
        promote_from_evaluation(auth_server, candidate, None, PromotionGate())
    with as_user(PIPELINE), pytest.raises(CaiError) as err:
        promote_from_evaluation(auth_server, candidate, "1", PromotionGate(), force=True)
    assert str(err.value).startswith(f"registered model '{candidate}': MLflow refused the promoter's write")
    assert "$CAI_PROMOTER_TRACKING_USERNAME" in str(err.value)


def test_the_register_step_promotes_as_the_promoter_given_to_it_beside_its_own_identity(
    auth_server, candidate, monkeypatch
):
    # The step's environment: its own account, and the promoter's from the promoter's Secret.
    monkeypatch.setenv("CAI_PROMOTER_TRACKING_USERNAME", PROMOTER[0])
    monkeypatch.setenv("CAI_PROMOTER_TRACKING_PASSWORD", PROMOTER[1])
    with as_user(PIPELINE):
        _, decision = promote_from_evaluation(auth_server, candidate, None, PromotionGate())
        assert decision.promote
        assert version_by_alias(auth_server, candidate, CHAMPION).version == "1"


def test_the_exit_handler_releases_each_lock_as_the_identity_that_made_it(
    auth_server, candidate, monkeypatch
):
    from mlflow import MlflowClient

    from cai_lib.platform.registry.lock import _try_acquire

    monkeypatch.setenv("CAI_PROMOTER_TRACKING_USERNAME", PROMOTER[0])
    monkeypatch.setenv("CAI_PROMOTER_TRACKING_PASSWORD", PROMOTER[1])
    monkeypatch.setenv("CAI_PIPELINE_RUN_ID", "run-killed")
    # Locks a killed register step left: the candidates' (taken as the pipeline) and the
    # production model's (taken as the promoter), acquired and never released.
    for user, model in ((PIPELINE, candidates_name(candidate)), (PROMOTER, candidate)):
        with as_user(user):
            assert _try_acquire(MlflowClient(auth_server, auth_server), model, f"killed-{user[0]}", 600)
    with as_user(PIPELINE):
        released = release_run_locks(auth_server, "run-killed")
        client = MlflowClient(auth_server, auth_server)
        left = [
            n
            for n in (candidate, candidates_name(candidate))
            if client.search_registered_models(f"name = '{n}{LOCK_SUFFIX}'")
        ]
    assert sorted(released) == sorted([candidate, candidates_name(candidate)])
    assert left == []
