"""Promotion: the gate's decision applied to the registry, and recorded.

Aliases, not the deprecated stages: `challenger` marks the newest candidate and `champion` the
model in use. `promote` moves `champion` only if the gate (`cai_lib.platform.registry.gate`)
passes. Every decision and its reason are written to the version's tags, whichever way it goes,
under the promotion lock.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cai_lib.core.errors import CaiError
from cai_lib.core.model_versions import alias_of, get_version
from cai_lib.core.names import (
    CHALLENGER,
    CHAMPION,
    EVAL_CHAMPION_TAG,
    EVAL_COMPARISONS_TAG,
    EVAL_HARMLESS_LOW_TAG,
    EVAL_HARMLESS_TAG,
    EVAL_HELPFUL_LOW_TAG,
    EVAL_HELPFUL_TAG,
    GATE_CHAMPION_BEFORE_TAG,
    GATE_DECISION_TAG,
    GATE_EVIDENCE_TAG,
    GATE_FORCED_TAG,
    GATE_REASON_TAG,
)
from cai_lib.core.tracking import connect
from cai_lib.platform.registry.gate import (
    BASELINES,
    GateDecision,
    PromotionGate,
    WinRateEvidence,
    decide_promotion,
)
from cai_lib.platform.registry.lock import registry_lock

if TYPE_CHECKING:
    from mlflow import MlflowClient


def record_evaluation(
    tracking_uri: str | None,
    model_name: str,
    version: str,
    harmless: WinRateEvidence,
    helpful: WinRateEvidence,
    compared_with: str,
) -> None:
    """Tag `version` with its win rates against `compared_with` (the champion's version, or a
    baseline policy of `BASELINES` when there is no champion): the evidence the gate reads."""
    client = connect(tracking_uri)
    get_version(client, model_name, version)
    tags = {
        EVAL_HARMLESS_TAG: repr(harmless.rate),
        EVAL_HELPFUL_TAG: repr(helpful.rate),
        EVAL_HARMLESS_LOW_TAG: repr(harmless.ci_low),
        EVAL_HELPFUL_LOW_TAG: repr(helpful.ci_low),
        EVAL_COMPARISONS_TAG: str(min(harmless.n, helpful.n)),
        EVAL_CHAMPION_TAG: str(compared_with),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)


def _judge(
    version: str,
    champion: str | None,
    harmless_win_rate: float | None,
    helpful_win_rate: float | None,
    compared_with: str | None,
    gate: PromotionGate,
    force: bool,
) -> GateDecision:
    if champion == version:
        return GateDecision(promote=True, reason=f"version {version} is already the champion")
    against = (
        f"champion version {champion}"
        if champion
        else f"a baseline ({' or '.join(BASELINES)}; no champion yet)"
    )
    if champion is None and compared_with not in BASELINES:
        decision = GateDecision(
            promote=False,
            reason=f"there is no champion yet, so version {version} must beat {against}, but its win rates "
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
                f"version {version}: no win rate against {against} "
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


def _apply_decision(
    client: MlflowClient,
    model_name: str,
    version: str,
    decision: GateDecision,
    champion: str | None,
    forced: bool,
    evidence: dict,
) -> None:
    """Record `decision` as `cai.gate.*` tags on the version and move `champion` if it promotes."""
    tags = {
        GATE_DECISION_TAG: "promoted" if decision.promote else "rejected",
        GATE_REASON_TAG: decision.reason,
        GATE_CHAMPION_BEFORE_TAG: champion or "none",
        GATE_FORCED_TAG: str(forced).lower(),
        GATE_EVIDENCE_TAG: json.dumps(evidence, sort_keys=True),
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if decision.promote:
        client.set_registered_model_alias(model_name, CHAMPION, version)


def promote(
    tracking_uri: str | None,
    model_name: str,
    version: str,
    harmless_win_rate: float | None,
    helpful_win_rate: float | None,
    gate: PromotionGate,
    force: bool = False,
    compared_with: str | None = None,
) -> GateDecision:
    """Decide whether `version` becomes `champion`, move the alias if so, and record why.

    The win rates are the lower bounds of the 95% intervals of the version's win rates against
    the current champion; `compared_with` (the champion version they were measured against, if
    known) guards against promoting on stale evidence when the champion moved in between. With no
    champion yet they must be against a baseline (`compared_with` in `BASELINES`) and pass the same
    gate. `force` promotes whatever the gate says. The decision, its reason, the champion it was
    judged against and the evidence (rates and thresholds, as JSON) are always written as
    `cai.gate.*` tags on the version; all of it runs under the registry lock.
    """
    client = connect(tracking_uri)
    version = str(version)
    evidence = {
        "harmless_win_rate": harmless_win_rate,
        "helpful_win_rate": helpful_win_rate,
        "compared_with": compared_with,
        "gate": gate.model_dump(),
    }
    with registry_lock(client, model_name):
        get_version(client, model_name, version)
        champion = alias_of(client, model_name, CHAMPION)
        decision = _judge(version, champion, harmless_win_rate, helpful_win_rate, compared_with, gate, force)
        _apply_decision(client, model_name, version, decision, champion, force, evidence)
    return decision


def promote_with(tracking_uri: str | None, model_name: str, version: str, leader: str) -> GateDecision:
    """Make `version` champion because `leader` (the model it was trained with, e.g. the RL-CAI
    policy "cai-harmless-rl-cai v3") passed the gate; the PM and SL-CAI model of a run follow
    their policy. Recorded like any decision, with the leader as its evidence.
    """
    client = connect(tracking_uri)
    version = str(version)
    with registry_lock(client, model_name):
        get_version(client, model_name, version)
        champion = alias_of(client, model_name, CHAMPION)
        decision = GateDecision(promote=True, reason=f"promoted with {leader}, which passed the gate")
        _apply_decision(client, model_name, version, decision, champion, False, {"leader": leader})
    return decision


def _rate_tag(tags: dict[str, str], key: str, where: str) -> float | None:
    if key not in tags:
        return None
    try:
        return float(tags[key])
    except ValueError:
        raise CaiError(f"{where}: tag {key} = {tags[key]!r} is not a number") from None


def promote_from_evaluation(
    tracking_uri: str | None, model_name: str, version: str | None, gate: PromotionGate, force: bool = False
) -> tuple[str, GateDecision]:
    """`promote` with the evidence the evaluation step tagged on the version (default: the
    `challenger` alias): the lower bounds of its win rates' 95% intervals. Returns the version
    judged and the decision.
    """
    client = connect(tracking_uri)
    if version is None:
        version = alias_of(client, model_name, CHALLENGER)
        if version is None:
            raise CaiError(f"registered model '{model_name}' has no '{CHALLENGER}' alias; pass --version")
    tags = dict(get_version(client, model_name, version).tags)
    where = f"model '{model_name}' version {version}"
    decision = promote(
        tracking_uri,
        model_name,
        version,
        harmless_win_rate=_rate_tag(tags, EVAL_HARMLESS_LOW_TAG, where),
        helpful_win_rate=_rate_tag(tags, EVAL_HELPFUL_LOW_TAG, where),
        gate=gate,
        force=force,
        compared_with=tags.get(EVAL_CHAMPION_TAG),
    )
    return str(version), decision
