"""A promotion killed at each of its steps is completed later, never left half-done.

Real parts: the `mlflow server` fixture (PostgreSQL where present) behind tests/fault_proxy.py,
which holds the chosen request of the promotion while the test kills the promoting process (a
pod killed mid-request), and moto's S3 server for the checkpoints. The promotion is the register
step's: the RL-CAI candidate through the gate, with its SL-CAI companion following it. After the
kill, the run's exit handler (`complete_run_promotions`) runs, and then the next run promotes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from conftest import hand_lineage
from fault_proxy import FaultProxy
from test_registry import write_checkpoint

from cai_lib.core.model_versions import list_models
from cai_lib.core.names import CHAMPION, LOCK_SUFFIX, PROMOTION_PENDING_TAG, candidates_name
from cai_lib.core.tracking import connect
from cai_lib.platform.registry.gate import PromotionGate, WinRateEvidence
from cai_lib.platform.registry.promotion import (
    complete_run_promotions,
    gate_attempts,
    promote_from_evaluation,
    record_evaluation,
)
from cai_lib.platform.registry.versions import register_checkpoint

pytestmark = pytest.mark.integration

API = "/api/2.0/mlflow/"
# The promotion's writes, in order: (name, method, endpoint, which occurrence).
STEPS = [
    ("audit", "POST", "registered-models/set-tag", 1),
    ("pending", "POST", "registered-models/set-tag", 2),
    ("copy", "POST", "model-versions/create", 1),
    ("decision-tags", "POST", "model-versions/set-tag", 1),
    ("champion", "POST", "registered-models/alias", 1),
    ("companion-audit", "POST", "registered-models/set-tag", 3),
    ("companion-copy", "POST", "model-versions/create", 2),
    ("companion-champion", "POST", "registered-models/alias", 2),
    ("clear-pending", "DELETE", "registered-models/delete-tag", 1),
]
PROMOTE = """
import json, sys
from cai_lib.platform.registry.gate import PromotionGate
from cai_lib.platform.registry.promotion import promote_from_evaluation
uri, leader, follower = sys.argv[1:]
promote_from_evaluation(uri, leader, "1", PromotionGate(), followers={follower: "1"})
"""


@pytest.fixture(scope="module")
def proxy(mlflow_server):
    proxy = FaultProxy(mlflow_server["uri"])
    yield proxy
    proxy.close()


def nth(method: str, endpoint: str, occurrence: int):
    """A hold predicate true for the `occurrence`-th request `method` to `endpoint`."""
    seen = {"count": 0}

    def when(request_method: str, path: str) -> bool:
        if request_method != method or not path.startswith(API + endpoint):
            return False
        seen["count"] += 1
        return seen["count"] == occurrence

    return when


@pytest.fixture
def candidates(mlflow_server, s3_bucket, tmp_path, monkeypatch):
    """An RL-CAI candidate that passed its evaluation against the SL-CAI baseline, and the SL-CAI
    candidate of the same run; returns the two production model names."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    uri, tag = mlflow_server["uri"], uuid.uuid4().hex[:8]
    leader, follower = f"cai-k{tag}-rl-cai", f"cai-k{tag}-sl-cai"
    for name, weights in ((leader, "rl"), (follower, "sl")):
        checkpoint = write_checkpoint(f"s3://{s3_bucket}/runs/r", tmp_path, weights)
        register_checkpoint(uri, candidates_name(name), checkpoint, None, hand_lineage())
    passed = WinRateEvidence(rate=0.8, ci_low=0.7, n=100)
    record_evaluation(uri, candidates_name(leader), "1", passed, passed, "sl-cai")
    return leader, follower


def champions(uri: str, *names: str) -> list[str | None]:
    """The candidate each production model's champion copies, or None."""
    found = []
    for name in names:
        exists = connect(uri).search_registered_models(f"name = '{name}'")
        listed = list_models(uri, name) if exists else []
        champion = next((info for info in listed if CHAMPION in info.aliases), None)
        found.append(champion.registered_source if champion else None)
    return found


@pytest.mark.parametrize(("step", "method", "endpoint", "occurrence"), STEPS, ids=[s[0] for s in STEPS])
def test_a_promotion_killed_at_each_step_is_completed_by_the_exit_handler_or_the_next_run(
    mlflow_server, proxy, candidates, step, method, endpoint, occurrence
):
    uri, (leader, follower) = mlflow_server["uri"], candidates
    run = f"run-{uuid.uuid4().hex[:8]}"
    proxy.hold(nth(method, endpoint, occurrence))
    killed = subprocess.Popen(
        [sys.executable, "-c", PROMOTE, proxy.url, leader, follower],
        env={**os.environ, "CAI_PIPELINE_RUN_ID": run},
    )
    try:
        assert proxy.held.wait(timeout=180), f"the promotion never reached step {step}"
    finally:
        killed.kill()
        killed.wait()
        proxy.release()
    copies = {
        leader: f"models:/{candidates_name(leader)}/1",
        follower: f"models:/{candidates_name(follower)}/1",
    }

    complete_run_promotions(uri, run)  # the killed run's exit handler
    after_exit = champions(uri, leader, follower)

    # All of the promotion, or none of it (killed before it recorded what it was about to do).
    assert after_exit in ([copies[leader], copies[follower]], [None, None]), after_exit
    assert PROMOTION_PENDING_TAG not in connect(uri).get_registered_model(leader).tags

    _, decision = promote_from_evaluation(uri, leader, "1", PromotionGate(), followers={follower: "1"})

    assert decision.promote
    assert champions(uri, leader, follower) == [copies[leader], copies[follower]]
    for name in (leader, follower):
        assert [info.registered_source for info in list_models(uri, name)] == [copies[name]]  # copied once
        assert connect(uri).search_registered_models(f"name = '{name}{LOCK_SUFFIX}'") == []
    assert gate_attempts(connect(uri), leader)[-1]["decision"] == "promoted"
