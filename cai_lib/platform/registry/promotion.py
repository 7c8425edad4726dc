"""Promotion: the gate's decision applied to the registry, recorded, and never left half-done.

Two models per role. The pipeline registers candidates into `<name>-candidates`
(`cai_lib.platform.registry.versions`); the production model `<name>` holds only copies of the
candidates the gate promoted, and its `champion` alias is what serving follows. MLflow lets
whoever may add a version to a model also move its aliases, so this split is what keeps the
pipeline's identity from moving `champion`: only the promoter's identity (`as_promoter`) writes the
production model. It copies a candidate there with `MlflowClient.copy_model_version` (the copy's
source is `models:/<name>-candidates/<version>`; its tags, lineage and checkpoint hash included,
are the candidate's) and sets `champion` on the copy.

Aliases, not the deprecated stages. `promote` moves `champion` only if the gate
(`cai_lib.platform.registry.gate`) passes, and only for a candidate that passes
`verified_version` (the platform's tags, the registered checkpoint hash).

**Audit.** Each gate attempt is appended to the production model as a tag of its own,
`cai.gate.attempt.NNNNNN` (JSON: the candidate, decision, reason, the champion before, whether it
was forced, the evidence, the lease it held and when), and never overwritten. A promoted copy also
carries the decision as `cai.gate.*` tags.

**Complete or rolled forward.** All of it runs under the production model's promotion lock, with
every write fenced by the lease (`Lease.check`). Before it copies anything, a promotion records
what it is about to do as the production model's tag `cai.promotion.pending` (the candidate, and
the companion models that follow it: a run's PM and SL-CAI model follow its RL-CAI policy). Every
later step is idempotent (a copy is found again by its source), so whoever next takes the lock (the
next promotion of that model, a retry of the step, or the run's exit handler through
`complete_run_promotions`) first completes a pending promotion, then clears the tag. A promotion
killed at any step is therefore either not begun (nothing recorded but its audit entry) or
completed later, never left with `champion` moved on some models and not others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import (
    alias_of,
    all_pages,
    get_version,
    registered_model,
    verified_version,
)
from cai_lib.core.names import (
    CHALLENGER,
    CHAMPION,
    EVAL_CHAMPION_TAG,
    EVAL_COMPARISONS_TAG,
    EVAL_HARMLESS_LOW_TAG,
    EVAL_HARMLESS_TAG,
    EVAL_HELPFUL_LOW_TAG,
    EVAL_HELPFUL_TAG,
    GATE_ATTEMPT_TAG_PREFIX,
    GATE_CHAMPION_BEFORE_TAG,
    GATE_DECISION_TAG,
    GATE_EVIDENCE_TAG,
    GATE_FORCED_TAG,
    GATE_REASON_TAG,
    PROMOTION_PENDING_TAG,
    candidates_name,
)
from cai_lib.core.settings import settings
from cai_lib.core.tracking import PIPELINE_RUN_ENV, connect, filter_literal, scoped_environ
from cai_lib.platform.registry.gate import (
    BASELINES,
    GateDecision,
    PromotionGate,
    WinRateEvidence,
    decide_promotion,
)
from cai_lib.platform.registry.lock import Lease, registry_lock
from cai_lib.platform.registry.promoter import PROMOTER_PASSWORD_ENV, PROMOTER_USERNAME_ENV, as_promoter
from cai_lib.platform.registry.versions import ensure_platform_model

if TYPE_CHECKING:
    from mlflow import MlflowClient

PRODUCTION_DESCRIPTION = (
    "Production model of cai-platform: copies of the candidates the promotion gate promoted; serving follows "
    "its champion alias. Only the promoter identity writes it."
)


def record_evaluation(
    tracking_uri: str | None,
    candidates: str,
    version: str,
    harmless: WinRateEvidence,
    helpful: WinRateEvidence,
    compared_with: str,
) -> None:
    """Tag candidate `version` of the model `candidates` with its win rates against
    `compared_with` (the production champion's version, or a baseline policy of `BASELINES` when
    there is no champion): the evidence the gate reads."""
    client = connect(tracking_uri)
    get_version(client, candidates, version)
    tags = {
        EVAL_HARMLESS_TAG: repr(harmless.rate),
        EVAL_HELPFUL_TAG: repr(helpful.rate),
        EVAL_HARMLESS_LOW_TAG: repr(harmless.ci_low),
        EVAL_HELPFUL_LOW_TAG: repr(helpful.ci_low),
        EVAL_COMPARISONS_TAG: str(min(harmless.n, helpful.n)),
        EVAL_CHAMPION_TAG: str(compared_with),
    }
    for key, value in tags.items():
        client.set_model_version_tag(candidates, str(version), key, value)


def copy_source(model_name: str, version: str) -> str:
    """The source MLflow records for a copy of candidate `version` of `model_name`'s candidates."""
    return f"models:/{candidates_name(model_name)}/{version}"


def _judge(
    version: str,
    champion: str | None,
    champion_is_this: bool,
    harmless_win_rate: float | None,
    helpful_win_rate: float | None,
    compared_with: str | None,
    gate: PromotionGate,
    force: bool,
) -> GateDecision:
    if champion_is_this:
        return GateDecision(
            promote=True, reason=f"candidate {version} is already the champion (version {champion})"
        )
    against = (
        f"champion version {champion}"
        if champion
        else f"a baseline ({' or '.join(BASELINES)}; no champion yet)"
    )
    if champion is None and compared_with not in BASELINES:
        decision = GateDecision(
            promote=False,
            reason=f"there is no champion yet, so candidate {version} must beat {against}, but its win rates "
            f"were measured against {compared_with or 'nothing'}; evaluate it",
        )
    elif champion is not None and compared_with is not None and compared_with != champion:
        decision = GateDecision(
            promote=False,
            reason=f"win rates were measured against version {compared_with} but the champion is now version "
            f"{champion}; evaluate again",
        )
    else:
        missing = [
            tag
            for tag, value in (
                (EVAL_HARMLESS_LOW_TAG, harmless_win_rate),
                (EVAL_HELPFUL_LOW_TAG, helpful_win_rate),
            )
            if value is None
        ]
        if missing and not force:
            raise CaiError(
                f"candidate {version}: no win rate against {against} "
                f"(missing tag {', '.join(missing)}, written by the evaluation step); evaluate it or use --force"
            )
        decision = (
            GateDecision(promote=False, reason=f"not evaluated (missing {', '.join(missing)})")
            if missing
            else decide_promotion(harmless_win_rate, helpful_win_rate, gate)
        )
    if force and not decision.promote:
        return GateDecision(promote=True, reason=f"forced by hand; the gate said: {decision.reason}")
    return decision


def gate_attempts(client: MlflowClient, model_name: str) -> list[dict]:
    """The gate's audit of `model_name`, oldest first: one record per attempt."""
    tags = dict(registered_model(client, model_name).tags)
    keys = sorted(key for key in tags if key.startswith(GATE_ATTEMPT_TAG_PREFIX))
    return [json.loads(tags[key]) for key in keys]


def _append_attempt(client: MlflowClient, model_name: str, lease: Lease, record: dict) -> None:
    """Add `record` as the next `cai.gate.attempt.NNNNNN` tag of the production model (under the
    lock, so no two attempts take the same number)."""
    tags = dict(registered_model(client, model_name).tags)
    numbers = [
        int(key[len(GATE_ATTEMPT_TAG_PREFIX) :]) for key in tags if key.startswith(GATE_ATTEMPT_TAG_PREFIX)
    ]
    lease.check()
    key = f"{GATE_ATTEMPT_TAG_PREFIX}{max(numbers, default=0) + 1:06d}"
    client.set_registered_model_tag(model_name, key, json.dumps(record, sort_keys=True))


def _production_copy(client: MlflowClient, model_name: str, version: str, lease: Lease) -> str:
    """The production version that copies candidate `version`: found by its source, else made
    with `copy_model_version` (idempotent, so a promotion rolled forward copies once)."""

    def copies() -> list:
        found = client.search_model_versions(
            f"name = {filter_literal(model_name, 'model name')} "
            f"and source_path = {filter_literal(copy_source(model_name, version), 'source')}"
        )
        return sorted(found, key=lambda mv: int(mv.version))

    existing = copies()
    if existing:
        return str(existing[0].version)
    lease.check()
    made = client.copy_model_version(copy_source(model_name, version), model_name)
    # A lost response that MLflow's client retried can make a second copy: keep the first.
    first = copies()[0]
    if int(first.version) < int(made.version):
        client.delete_model_version(model_name, str(made.version))
    return str(first.version)


def _crown(
    client: MlflowClient,
    model_name: str,
    version: str,
    lease: Lease,
    decision: GateDecision,
    before: str,
    forced: bool,
    evidence: dict,
) -> str:
    """Copy candidate `version` into the production model, tag the copy with the decision that
    made it (once: a copy promoted again keeps its first record; the audit has every attempt) and
    point `champion` at it; returns the production version."""
    copy = _production_copy(client, model_name, version, lease)
    already = GATE_DECISION_TAG in dict(get_version(client, model_name, copy).tags)
    tags = (
        {}
        if already
        else {
            GATE_DECISION_TAG: "promoted",
            GATE_REASON_TAG: decision.reason,
            GATE_CHAMPION_BEFORE_TAG: before or "none",
            GATE_FORCED_TAG: str(forced).lower(),
            GATE_EVIDENCE_TAG: json.dumps(evidence, sort_keys=True),
        }
    )
    for key, value in tags.items():
        lease.check()
        client.set_model_version_tag(model_name, copy, key, value)
    lease.check()
    client.set_registered_model_alias(model_name, CHAMPION, copy)
    return copy


def _attempt(
    version: str, decision: GateDecision, before: str | None, forced: bool, evidence: dict, lease: Lease
) -> dict:
    return {
        "candidate": version,
        "decision": "promoted" if decision.promote else "rejected",
        "reason": decision.reason,
        "champion_before": before or "none",
        "forced": forced,
        "evidence": evidence,
        "lease": lease.owner,
        "pipeline_run": settings().pipeline_run_id or "",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _follow(client: MlflowClient, model_name: str, version: str, leader: str) -> None:
    """Make candidate `version` champion of the companion model `model_name` because `leader`
    passed the gate (under its own lock, recorded in its audit)."""
    with registry_lock(client, model_name) as lease:
        verified_version(client, candidates_name(model_name), version)
        champion = alias_of(client, model_name, CHAMPION)
        decision = GateDecision(promote=True, reason=f"promoted with {leader}, which passed the gate")
        evidence = {"leader": leader}
        _append_attempt(
            client, model_name, lease, _attempt(version, decision, champion, False, evidence, lease)
        )
        _crown(client, model_name, version, lease, decision, champion, False, evidence)


def _complete_pending(client: MlflowClient, model_name: str, lease: Lease) -> dict | None:
    """Finish the promotion recorded in `model_name`'s pending tag, if any (see the module
    docstring); returns what it completed."""
    raw = dict(registered_model(client, model_name).tags).get(PROMOTION_PENDING_TAG)
    if not raw:
        return None
    pending = json.loads(raw)
    decision = GateDecision(promote=True, reason=pending["reason"])
    _crown(
        client, model_name, pending["candidate"], lease, decision, pending["champion_before"], pending["forced"],
        pending["evidence"],
    )  # fmt: skip
    for follower, version in pending["followers"].items():
        ensure_platform_model(client, follower, PRODUCTION_DESCRIPTION)
        _follow(client, follower, version, f"{model_name} candidate {pending['candidate']}")
    lease.check()
    client.delete_registered_model_tag(model_name, PROMOTION_PENDING_TAG)
    return pending


def promote(
    tracking_uri: str | None,
    model_name: str,
    version: str,
    harmless_win_rate: float | None,
    helpful_win_rate: float | None,
    gate: PromotionGate,
    force: bool = False,
    compared_with: str | None = None,
    followers: dict[str, str] | None = None,
    comparison: dict | None = None,
) -> GateDecision:
    """Decide whether candidate `version` (of `<model_name>-candidates`) becomes `champion` of the
    production model `model_name`; copy it there and move the alias if so; record why.

    The win rates are the lower bounds of the 95% intervals of the candidate's win rates against
    the current champion; `compared_with` (the production champion version they were measured
    against, if known) guards against promoting on stale evidence when the champion moved in
    between. With no champion yet they must be against a baseline (`compared_with` in `BASELINES`)
    and pass the same gate. `force` promotes whatever the gate says. `followers` (production model
    -> candidate version) become champions with it. `comparison` (the pipeline's compare step's
    pointer, `cai_lib.steps.compare`) is named in the decision's reason and kept in its evidence.
    Runs as the promoter identity, under the production model's lock; a pending promotion left by
    a killed one is completed first.
    """
    version = str(version)
    evidence = {
        "harmless_win_rate": harmless_win_rate,
        "helpful_win_rate": helpful_win_rate,
        "compared_with": compared_with,
        "gate": gate.model_dump(),
        **({"comparison": comparison} if comparison else {}),
    }
    with _as_the_promoter(model_name):
        client = connect(tracking_uri)
        ensure_platform_model(client, model_name, PRODUCTION_DESCRIPTION)
        with registry_lock(client, model_name) as lease:
            _complete_pending(client, model_name, lease)
            verified_version(client, candidates_name(model_name), version)
            champion = alias_of(client, model_name, CHAMPION)
            champion_is_this = champion is not None and get_version(
                client, model_name, champion
            ).source == copy_source(model_name, version)
            decision = _judge(
                version,
                champion,
                champion_is_this,
                harmless_win_rate,
                helpful_win_rate,
                compared_with,
                gate,
                force,
            )
            if comparison:
                decision = decision.model_copy(update={"reason": f"{decision.reason}; {comparison_clause(comparison)}"})
            _append_attempt(
                client, model_name, lease, _attempt(version, decision, champion, force, evidence, lease)
            )
            if decision.promote:
                pending = {
                    "candidate": version,
                    "reason": decision.reason,
                    "champion_before": champion or "none",
                    "forced": force,
                    "evidence": evidence,
                    "followers": followers or {},
                    "pipeline_run": settings().pipeline_run_id or "",
                }
                lease.check()
                client.set_registered_model_tag(
                    model_name, PROMOTION_PENDING_TAG, json.dumps(pending, sort_keys=True)
                )
                _complete_pending(client, model_name, lease)
                decision.production_version = alias_of(client, model_name, CHAMPION)
    return decision


@contextmanager
def _as_the_promoter(model_name: str) -> Iterator[None]:
    """MLflow requests in the block go as the promoter identity; its PERMISSION_DENIED becomes
    one line naming the identity to use."""
    from mlflow.exceptions import MlflowException

    with as_promoter():
        try:
            yield
        except MlflowException as err:
            if err.error_code != "PERMISSION_DENIED":
                raise
            raise CaiError(
                f"registered model '{model_name}': MLflow refused the promoter's write ({err.message}); "
                f"promotions run as the promoter identity (${PROMOTER_USERNAME_ENV} and ${PROMOTER_PASSWORD_ENV}, "
                "else $MLFLOW_TRACKING_USERNAME), which must be the one that created the production model"
            ) from None


def _rate_tag(tags: dict[str, str], key: str, where: str) -> float | None:
    if key not in tags:
        return None
    try:
        return float(tags[key])
    except ValueError:
        raise CaiError(f"{where}: tag {key} = {tags[key]!r} is not a number") from None


def promote_from_evaluation(
    tracking_uri: str | None,
    model_name: str,
    version: str | None,
    gate: PromotionGate,
    force: bool = False,
    followers: dict[str, str] | None = None,
    comparison: dict | None = None,
) -> tuple[str, GateDecision]:
    """`promote` with the evidence the evaluation step tagged on the candidate (default: the
    candidates model's `challenger` alias): the lower bounds of its win rates' 95% intervals.
    Returns the candidate version judged and the decision."""
    candidates = candidates_name(model_name)
    client = connect(tracking_uri)
    if version is None:
        version = alias_of(client, candidates, CHALLENGER)
        if version is None:
            raise CaiError(f"registered model '{candidates}' has no '{CHALLENGER}' alias; pass --version")
    tags = dict(get_version(client, candidates, version).tags)
    where = f"model '{candidates}' version {version}"
    decision = promote(
        tracking_uri,
        model_name,
        version,
        harmless_win_rate=_rate_tag(tags, EVAL_HARMLESS_LOW_TAG, where),
        helpful_win_rate=_rate_tag(tags, EVAL_HELPFUL_LOW_TAG, where),
        gate=gate,
        force=force,
        compared_with=tags.get(EVAL_CHAMPION_TAG),
        followers=followers,
        comparison=comparison,
    )
    return str(version), decision


def comparison_clause(pointer: dict) -> str:
    """The compare step's pointer as a clause of the gate's reason: what the comparison found and
    where its report is, or why there is none."""
    if "report" in pointer:
        return f"compared with run {pointer['against']}: {pointer['summary']} (report {pointer['report']})"
    return f"not compared with run {pointer['against']}: {pointer['error']}"


def complete_run_promotions(tracking_uri: str | None, pipeline_run_id: str) -> list[str]:
    """Complete every promotion that pipeline run `pipeline_run_id` left pending (its exit
    handler: the run's own earlier attempt held the lock, so it is taken over); returns the
    production models completed."""
    completed = []
    with scoped_environ(**{PIPELINE_RUN_ENV: pipeline_run_id}), _as_the_promoter("(any)"):
        client = connect(tracking_uri)
        for model in all_pages(client.search_registered_models):
            raw = dict(model.tags).get(PROMOTION_PENDING_TAG)
            if not raw or json.loads(raw).get("pipeline_run") != pipeline_run_id:
                continue
            with registry_lock(client, model.name) as lease:
                if _complete_pending(client, model.name, lease) is not None:
                    completed.append(model.name)
    return completed
