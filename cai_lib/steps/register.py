"""The register step: the run's models registered with lineage, the promotion gate, serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cai_lib.core.constitution import Constitution
from cai_lib.core.names import (
    CHAMPION_POLICY,
    PM,
    REPORT_FILE,
    RL_CAI,
    SL_CAI,
    SUMMARY_FILE,
    candidates_name,
    model_name,
)
from cai_lib.core.outputs import StageRecord, round_of
from cai_lib.core.store import ArtifactStore, join_uri
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, pinned_constitution
from cai_lib.steps.stage_runs import recorded, write_record

if TYPE_CHECKING:
    from cai_lib.core.model_versions import Lineage
    from cai_lib.method.evaluation.results import EvaluationResult
    from cai_lib.platform.registry.gate import WinRateEvidence


def lineage_of(
    ctx: RunContext,
    constitution: Constitution,
    base_model: str,
    data: dict[str, str],
    round_: int = 1,
    parent_version: str = "",
) -> Lineage:
    """The lineage tags of a checkpoint this run trained from `base_model` on `data`, in round
    `round_` of iterated CAI, continuing the registered version `parent_version` (NAME/VERSION)."""
    from cai_lib.core.model_versions import Lineage
    from cai_lib.platform.retrain.identity import run_config_sha256

    p = ctx.params
    return Lineage(
        constitution_name=constitution.name,
        constitution_version=constitution.version,
        constitution_sha256=constitution.sha256,
        pipeline_run_id=ctx.run_id,
        base_model=base_model,
        data_uris=data,
        human_data=f"{p.human_preference_kind}: {p.human_preferences}" if p.human_preferences else "none",
        run_config_sha256=run_config_sha256(p),
        round=round_,
        parent_version=parent_version,
    )


def parent_version(ctx: RunContext, name: str, pointer: str | None) -> str:
    """NAME/VERSION of the registered candidate of model `name` whose checkpoint is the DataRef file
    `pointer` ('' for none): registration is by checkpoint, so the round before's version is found by it."""
    from cai_lib.core.model_versions import version_with_checkpoint

    sha256 = DataRef.read(pointer).sha256 if pointer else None
    if not sha256:
        return ""
    candidates = candidates_name(name)
    version = version_with_checkpoint(ctx.tracking_uri, candidates, sha256)
    return f"{candidates}/{version}" if version else ""


def gate_evidence(
    result: EvaluationResult, champion: str | None, champion_policy: str | None = None
) -> tuple[WinRateEvidence, WinRateEvidence, str]:
    """What the gate reads of an evaluation: the RL-CAI policy's harmlessness and helpfulness win rates
    (as challenger, the row policy) against the champion it was evaluated with, or against the SL-CAI
    policy when there is no champion yet; and what they were measured against (the champion's
    version, or the baseline's name). The champion is evaluated under `champion_policy`: its own
    name, or an earlier round's when it is one (iterated CAI)."""
    from cai_lib.method.evaluation.results import find_win_rate
    from cai_lib.platform.registry.gate import WinRateEvidence

    rival = (champion_policy or CHAMPION_POLICY) if champion else SL_CAI
    harmless, helpful = (find_win_rate(result, c, RL_CAI, rival) for c in ("harmless", "helpful"))
    return (
        WinRateEvidence(rate=harmless.win_rate, ci_low=harmless.ci_low, n=harmless.n),
        WinRateEvidence(rate=helpful.win_rate, ci_low=helpful.ci_low, n=helpful.n),
        champion or rival,
    )


def record_gate_evidence(ctx: RunContext, pointer: dict, candidates: str, version: str) -> None:
    """Tag the RL-CAI candidate with its win rates against the champion it was evaluated with (the
    evaluation's `pointer`), or against the SL-CAI policy when there is no champion yet."""
    from cai_lib.method.evaluation.results import load_result
    from cai_lib.platform.registry.promotion import record_evaluation

    harmless, helpful, compared_with = gate_evidence(
        load_result(pointer["uri"]), pointer.get("champion_version"), pointer.get("champion_policy")
    )
    record_evaluation(ctx.tracking_uri, candidates, version, harmless, helpful, compared_with)

@one_line_errors
def register(
    context: dict,
    constitution_path: str,
    traces: str,
    labels: str,
    sl_policy: str,
    rl_policy: str,
    reward_model: str,
    results: str,
    round_: int = 1,
    start_policy: str | None = None,
    previous_pm: str | None = None,
    comparison: str = "",
) -> str:
    """Register PM, SL-CAI and RL-CAI with lineage as candidates, make them challengers, run the
    promotion gate.

    In round `round_` of iterated CAI, the PM and RL-CAI policy are that round's: each version is
    tagged with its round and its parent, the version it continues (RL-CAI: the one registered for
    `start_policy`, the policy RL started from, which is the SL-CAI policy in round 1; PM: the one
    registered for `previous_pm` when the round continued it), so lineage reads as a chain.

    The pipeline's identity registers each into its candidates model (`<name>-candidates`). Each
    version's source is the checkpoint's loadable folder under `models/` (see
    `cai_lib.platform.pyfunc_model.publish`), and its run the MLflow run of the stage that trained
    it. The promoter's identity (`cai_lib.platform.registry.promotion`) then judges the RL-CAI
    candidate on its win rates against the champion it was evaluated with (with no champion yet,
    against the SL-CAI policy); when it passes, it and the PM and SL-CAI candidates of the same
    run are copied into their production models and become champions, as one promotion that a
    later run completes if this one is killed half-way. The InferenceServices the installation
    serves then follow the new champions (`cai_lib.platform.serving.sync_served`). Registration is idempotent by
    checkpoint, so a rerun that reused every checkpoint gets the versions the first run
    registered. `comparison` is the compare step's pointer (the last round's): the candidates this
    run made carry its report (`cai_lib.platform.compare.link_comparison`), and the gate's reason
    and evidence name it. Returns a JSON summary (run root, report, versions, decision, what serving now
    serves), also written to the run's folder for the exit handler.
    """
    from cai_lib.platform.compare import link_comparison
    from cai_lib.platform.pyfunc_model import ROLE_KINDS, publish
    from cai_lib.platform.registry.gate import GateDecision
    from cai_lib.platform.registry.promotion import comparison_clause, promote_from_evaluation
    from cai_lib.platform.registry.versions import register_checkpoint, set_challenger
    from cai_lib.platform.serving import sync_served

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    data = {"traces": DataRef.read(traces).uri, "preferences": DataRef.read(labels).uri}
    checkpoints = {SL_CAI: sl_policy, PM: reward_model, RL_CAI: rl_policy}
    start_policy = start_policy or sl_policy
    continued_pm = previous_pm if round_ > 1 and p.iteration.pm_init == "continue" else None
    base = ctx.model(p.base_model).load  # a models:/ alias as the version it named when the run began
    bases = {
        PM: DataRef.read(continued_pm).uri if continued_pm else base,
        SL_CAI: base,
        RL_CAI: DataRef.read(start_policy).uri,
    }
    start_model = model_name(p.model_name_prefix, constitution.name, RL_CAI if round_ > 1 else SL_CAI)
    # Looked up when each role registers: SL-CAI first, so round 1's RL-CAI finds its parent.
    parents = {
        PM: lambda: parent_version(ctx, model_name(p.model_name_prefix, constitution.name, PM), continued_pm),
        SL_CAI: lambda: "",
        RL_CAI: lambda: parent_version(ctx, start_model, start_policy),
    }
    pointer = json.loads(Path(results).read_text())
    superseded = bool(pointer.get("superseded"))
    versions, made_here = {}, []
    with recorded(ctx, "register", round_=round_) as run:
        for role, path in checkpoints.items():
            name = model_name(p.model_name_prefix, constitution.name, role)
            candidates = candidates_name(name)
            checkpoint = DataRef.read(path)
            source = publish(checkpoint.uri, ctx.artifact_root, ROLE_KINDS[role])
            # The version's run is the stage run that trained it; markers older than that field
            # do not name it, and then the register run stands in.
            trained_by = checkpoint.mlflow_run_id or run.run_id
            lineage = lineage_of(
                ctx, constitution, bases[role], data, 1 if role == SL_CAI else round_, parents[role]()
            )
            info = register_checkpoint(ctx.tracking_uri, candidates, source, trained_by, lineage)
            if not superseded:
                set_challenger(ctx.tracking_uri, candidates, info.version)
            versions[role] = (name, info.version)
            if info.lineage and info.lineage.pipeline_run_id == ctx.run_id:
                made_here.append(versions[role])
        policy_name, policy_version = versions[RL_CAI]
        compared = json.loads(Path(comparison).read_text()) if comparison else {}
        if compared:
            link_comparison(ctx.tracking_uri, [(candidates_name(n), v) for n, v in made_here], compared)
        if superseded:
            # A repeated earlier round whose policy the champion continues: gating it again could
            # only move the champion back down the chain it heads.
            reason = f"the champion already continues {candidates_name(policy_name)} v{policy_version}; not gated again"
            decision = GateDecision(
                promote=False, reason=f"{reason}; {comparison_clause(compared)}" if compared else reason
            )
        else:
            record_gate_evidence(ctx, pointer, candidates_name(policy_name), policy_version)
            _, decision = promote_from_evaluation(
                ctx.tracking_uri,
                policy_name,
                policy_version,
                p.promotion,
                followers={versions[role][0]: versions[role][1] for role in (PM, SL_CAI)},
                comparison=compared or None,
            )
        served = []
        if decision.promote:
            served = sync_served(ctx.tracking_uri, [name for name, _ in versions.values()])
        run.log_stage_metrics({"promoted": float(decision.promote)})
        write_record(
            ctx,
            StageRecord(
                stage="register", round=round_of(round_), status="ran", made_by_run=ctx.run_id, run_id=ctx.run_id
            ),
        )
    folder = ArtifactStore.open(ctx.run_root)
    earlier = folder.read_json(SUMMARY_FILE).get("rounds", {}) if round_ > 1 and folder.exists(SUMMARY_FILE) else {}
    candidate_versions = {role: {"name": candidates_name(n), "version": v} for role, (n, v) in versions.items()}
    this_round = {
        "versions": candidate_versions,
        "promoted": decision.promote,
        "reason": decision.reason,
    }
    passed = decision.promote or superseded
    summary = {
        "run_id": ctx.run_id,
        "run_root": ctx.run_root,
        "report": join_uri(ctx.run_root, REPORT_FILE),
        "versions": candidate_versions,
        "promoted": decision.promote,
        "reason": decision.reason,
        "comparison": compared.get("report") or compared.get("error", ""),
        "served": [sync.model_dump() for sync in served],
        "mlflow_tracking_uri": ctx.tracking_uri,
        "experiment": p.experiment,
        "round": round_,
        "passed": passed,
        "rounds": {**earlier, str(round_): this_round},
    }
    folder.write_json(SUMMARY_FILE, summary)
    return json.dumps(summary)
