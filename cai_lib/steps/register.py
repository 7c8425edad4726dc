"""The register step: the run's models registered with lineage, the promotion gate, serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cai_lib.core.constitution import Constitution
from cai_lib.core.names import CHAMPION_POLICY, PM, REPORT_FILE, RL_CAI, SL_CAI, SUMMARY_FILE, model_name
from cai_lib.core.outputs import StageRecord
from cai_lib.core.store import ArtifactStore, join_uri
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, pinned_constitution
from cai_lib.steps.stage_runs import recorded, write_record

if TYPE_CHECKING:
    from cai_lib.core.model_versions import Lineage


def lineage_of(ctx: RunContext, constitution: Constitution, base_model: str, data: dict[str, str]) -> Lineage:
    """The lineage tags of a checkpoint this run trained from `base_model` on `data`."""
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
    )


def record_gate_evidence(ctx: RunContext, pointer: dict, policy_name: str, version: str) -> None:
    """Tag the RL-CAI version with its win rates against the champion it was evaluated with (the
    evaluation's `pointer`), or against the SL-CAI policy when there is no champion yet."""
    from cai_lib.method.evaluation.results import find_win_rate, load_result
    from cai_lib.platform.registry.gate import WinRateEvidence
    from cai_lib.platform.registry.promotion import record_evaluation

    champion = pointer.get("champion_version")
    result = load_result(pointer["uri"])
    rival = CHAMPION_POLICY if champion else SL_CAI
    harmless, helpful = (find_win_rate(result, c, RL_CAI, rival) for c in ("harmless", "helpful"))
    record_evaluation(
        ctx.tracking_uri,
        policy_name,
        version,
        WinRateEvidence(rate=harmless.win_rate, ci_low=harmless.ci_low, n=harmless.n),
        WinRateEvidence(rate=helpful.win_rate, ci_low=helpful.ci_low, n=helpful.n),
        champion or rival,
    )


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
    comparison: str = "",
) -> str:
    """Register PM, SL-CAI and RL-CAI with lineage, make them challengers, run the promotion gate.

    Each version's source is the checkpoint's loadable folder under `models/` (see
    `cai_lib.platform.pyfunc_model.publish`), and its run the MLflow run of the stage that trained it.
    After a promotion, the InferenceServices the installation serves follow the new champions
    (`cai_lib.platform.serving.sync_served`).

    `comparison` is the compare step's pointer: when it compared this run with an earlier one, the
    versions this run made carry its report, and the gate's reason names it
    (`cai_lib.platform.compare.note_comparison`).

    The gate judges the RL-CAI policy on its win rates against the champion it was evaluated
    with (with no champion yet, against the SL-CAI policy); when it is promoted, the PM and
    SL-CAI model of the same run become champions with it. Registration is idempotent by
    checkpoint, so a rerun that reused every checkpoint gets the versions the first run
    registered. Returns a JSON summary (run root, report, versions, decision, what serving now
    serves), also written to the run's folder for the exit handler.
    """
    from cai_lib.platform.compare import note_comparison
    from cai_lib.platform.pyfunc_model import ROLE_KINDS, publish
    from cai_lib.platform.registry.promotion import promote_from_evaluation, promote_with
    from cai_lib.platform.registry.versions import register_checkpoint, set_challenger
    from cai_lib.platform.serving import sync_served

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    data = {"traces": DataRef.read(traces).uri, "preferences": DataRef.read(labels).uri}
    checkpoints = {PM: reward_model, SL_CAI: sl_policy, RL_CAI: rl_policy}
    base = ctx.model(p.base_model).load  # a models:/ alias as the version it named when the run began
    bases = {PM: base, SL_CAI: base, RL_CAI: DataRef.read(sl_policy).uri}
    versions, made_here = {}, []
    with recorded(ctx, "register") as run:
        for role, path in checkpoints.items():
            name = model_name(p.model_name_prefix, constitution.name, role)
            checkpoint = DataRef.read(path)
            source = publish(checkpoint.uri, ctx.artifact_root, ROLE_KINDS[role])
            # The version's run is the stage run that trained it; markers older than that field
            # do not name it, and then the register run stands in.
            trained_by = checkpoint.mlflow_run_id or run.run_id
            lineage = lineage_of(ctx, constitution, bases[role], data)
            info = register_checkpoint(ctx.tracking_uri, name, source, trained_by, lineage)
            set_challenger(ctx.tracking_uri, name, info.version)
            versions[role] = (name, info.version)
            if info.lineage and info.lineage.pipeline_run_id == ctx.run_id:
                made_here.append(versions[role])
        policy_name, policy_version = versions[RL_CAI]
        record_gate_evidence(ctx, json.loads(Path(results).read_text()), policy_name, policy_version)
        _, decision = promote_from_evaluation(ctx.tracking_uri, policy_name, policy_version, p.promotion)
        compared = json.loads(Path(comparison).read_text()) if comparison else {}
        if compared:
            decision = note_comparison(ctx.tracking_uri, made_here, versions[RL_CAI], compared, decision)
        served = []
        if decision.promote:
            for role in (PM, SL_CAI):
                promote_with(ctx.tracking_uri, *versions[role], leader=f"{policy_name} v{policy_version}")
            served = sync_served(ctx.tracking_uri, [name for name, _ in versions.values()])
        run.log_stage_metrics({"promoted": float(decision.promote)})
        write_record(
            ctx, StageRecord(stage="register", status="ran", made_by_run=ctx.run_id, run_id=ctx.run_id)
        )
    summary = {
        "run_id": ctx.run_id,
        "run_root": ctx.run_root,
        "report": join_uri(ctx.run_root, REPORT_FILE),
        "versions": {role: {"name": n, "version": v} for role, (n, v) in versions.items()},
        "promoted": decision.promote,
        "reason": decision.reason,
        "comparison": compared.get("report") or compared.get("error", ""),
        "served": [sync.model_dump() for sync in served],
        "mlflow_tracking_uri": ctx.tracking_uri,
        "experiment": p.experiment,
    }
    ArtifactStore.open(ctx.run_root).write_json(SUMMARY_FILE, summary)
    return json.dumps(summary)
