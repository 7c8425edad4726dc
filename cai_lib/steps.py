"""The pipeline's steps: what each Kubeflow component (and each `kfp.local` task) runs.

A step takes plain values (strings, dicts, paths of small KFP artifacts), calls one stage of
`cai_lib`, records it in MLflow as a nested run of the pipeline run, and returns a `DataRef`:
a pointer to what it wrote in the artifact store. Big things (datasets, checkpoints) never
travel as KFP artifacts (the launcher would copy every multi-GB checkpoint into every step);
only these pointers do, with row count and sha256 in the artifact metadata (DESIGN §6).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from cai_lib.config import PipelineParams
from cai_lib.constitution import Constitution, dump_constitution, load_constitution, parse_constitution
from cai_lib.records import PromptRecord, ResponsePair, Trace
from cai_lib.shards import dataset_summary, merge_datasets, read_dataset
from cai_lib.store import ArtifactStore, join_uri
from cai_lib.tracking import end_pipeline_run, stage_run, start_pipeline_run


class DataRef(BaseModel):
    """A pointer to a dataset or checkpoint in the artifact store."""

    uri: str = Field(description="Where it lies: an s3:// prefix or a local directory.")
    kind: str = Field(description="dataset or checkpoint.")
    rows: int | None = Field(default=None, description="Row count of a dataset.")
    sha256: str | None = Field(
        default=None, description="Content hash (dataset rows or checkpoint manifest)."
    )

    def write(self, path: str) -> dict:
        """Write the pointer to a KFP artifact file; returns the metadata to attach to it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.model_dump_json())
        return self.model_dump(exclude_none=True)

    @classmethod
    def read(cls, path: str) -> DataRef:
        return cls.model_validate_json(Path(path).read_text())


class RunContext(BaseModel):
    """What every step after the first knows about the pipeline run."""

    params: PipelineParams
    run_root: str = Field(description="<artifact_root>/<run id>: every output of this run lies under it.")
    run_id: str
    parent_run_id: str = Field(description="MLflow parent run id.")

    def uri(self, *keys: str) -> str:
        return join_uri(self.run_root, *keys)


def dataset_ref(uri: str) -> DataRef:
    summary = dataset_summary(uri)
    return DataRef(uri=uri, kind="dataset", rows=summary["rows"], sha256=summary["sha256"])


def checkpoint_ref(uri: str) -> DataRef:
    from cai_lib.registry import checkpoint_manifest_sha256

    return DataRef(uri=uri, kind="checkpoint", sha256=checkpoint_manifest_sha256(uri))


# -- steps -----------------------------------------------------------------------------------------


def resolve(params: dict, run_id: str, run_name: str, constitution_path: str) -> dict:
    """First step: validate the run parameters, pin the constitution, open the MLflow parent run.

    Writes the pinned constitution YAML to `constitution_path` (a small KFP artifact every later
    step reads, so a run is reproducible whatever happens to the registry) and returns the run
    context as a dict.
    """
    checked = PipelineParams.model_validate(params)
    constitution = load_constitution(checked.constitution)
    Path(constitution_path).parent.mkdir(parents=True, exist_ok=True)
    Path(constitution_path).write_text(dump_constitution(constitution))
    parent = start_pipeline_run(
        checked.mlflow_tracking_uri,
        checked.experiment,
        run_name,
        checked.model_dump(mode="json"),
        constitution.ref,
        constitution.sha256,
        tags={"cai.pipeline_run_id": run_id},
    )
    context = RunContext(
        params=checked,
        run_root=join_uri(checked.artifact_root, run_name),
        run_id=run_id,
        parent_run_id=parent,
    )
    ArtifactStore.open(context.run_root).write_text("constitution.yaml", dump_constitution(constitution))
    with stage_run(checked.mlflow_tracking_uri, parent, "resolve") as run:
        run.log_artifact(constitution_path, "constitution")
    return context.model_dump(mode="json", exclude_none=True)  # KFP structs cannot hold null


def pinned_constitution(path: str) -> Constitution:
    return parse_constitution(Path(path).read_text(), path)


def prepare_prompts(context: dict) -> dict[str, DataRef]:
    """Read, deduplicate and split the red-team and helpfulness prompts (seeded)."""
    from cai_lib.prompts import deduplicate, read_prompts, split_prompts

    ctx = RunContext.model_validate(context)
    p = ctx.params
    refs = {}
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "prepare_prompts") as run:
        for kind, source, limit in (
            ("red_team", p.red_team_prompts, p.num_red_team),
            ("helpful", p.helpful_prompts, p.num_helpful),
        ):
            records = deduplicate(read_prompts(source, kind=kind, limit=limit))
            train, held_out = split_prompts(records, p.eval_fraction, p.seed)
            for split, rows in (("train", train), ("eval", held_out)):
                uri = ctx.uri("prompts", f"{kind}-{split}")
                write_finished_dataset(uri, rows)
                refs[f"{kind}_{split}"] = dataset_ref(uri)
                run.log_stage_metrics({f"{kind}_{split}_prompts": len(rows)})
    return refs


def fan_out(context: dict) -> list[dict]:
    """The items of the generation fan-out: the run context with one shard index each."""
    shards = RunContext.model_validate(context).params.num_shards
    return [{"context": context, "shard": shard} for shard in range(shards)]


def write_finished_dataset(uri: str, rows: list[BaseModel]) -> None:
    """A one-shard dataset (the same layout the sharded stages write)."""
    from cai_lib.shards import ShardedOutput

    ShardedOutput(uri, {"rows": [r.id for r in rows]}).run(rows, max(len(rows), 1), lambda chunk: list(chunk))


def critique_revise_shard(context: dict, constitution_path: str, prompts: str, shard: int) -> DataRef:
    """SL-CAI critique→revision on one of `num_shards` interleaved slices of the training prompts."""
    from cai_lib.critique_revise import critique_revise

    ctx = RunContext.model_validate(context)
    p = ctx.params
    rows = list(read_dataset(DataRef.read(prompts).uri, PromptRecord))[shard :: p.num_shards]
    uri = ctx.uri("traces-shards", f"shard-{shard:03d}")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, f"critique_revise[{shard}]") as run:
        written = critique_revise(
            rows, pinned_constitution(constitution_path), p.base_model, uri, p.critique_revise
        )
        run.log_stage_metrics({"traces": written})
    return dataset_ref(uri)


def merge(context: dict, parts: list[str], name: str) -> DataRef:
    """Merge the shard outputs of a fan-out into one dataset `<run>/<name>`."""
    ctx = RunContext.model_validate(context)
    uri = ctx.uri(name)
    merge_datasets([json.loads(part)["uri"] if part.startswith("{") else part for part in parts], uri)
    return dataset_ref(uri)


def helpful_samples(context: dict, prompts: str) -> DataRef:
    """The base model's own answers to the helpfulness training prompts (mixed into SFT)."""
    from cai_lib.critique_revise import sample_helpful

    ctx = RunContext.model_validate(context)
    p = ctx.params
    uri = ctx.uri("helpful-samples")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "helpful_samples") as run:
        rows = list(read_dataset(DataRef.read(prompts).uri, PromptRecord))
        run.log_stage_metrics({"samples": sample_helpful(rows, p.base_model, uri, p.critique_revise)})
    return dataset_ref(uri)


def sft(context: dict, traces: str, helpful: str) -> tuple[DataRef, dict]:
    """Fine-tune the base model on the final revisions mixed with helpfulness samples (SL-CAI)."""
    from cai_lib.sft import train_sft

    ctx = RunContext.model_validate(context)
    p = ctx.params
    uri = ctx.uri("checkpoints", "sl-cai")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "sft") as run:
        metrics = train_sft(
            list(read_dataset(DataRef.read(traces).uri, Trace)),
            list(read_dataset(DataRef.read(helpful).uri, Trace)),
            p.base_model,
            uri,
            p.sft,
        )
        values = numeric(metrics.model_dump())
        run.log_stage_metrics(values)
    return checkpoint_ref(uri), values


def sample_pairs(context: dict, prompts: str, policy: str) -> DataRef:
    """Two sampled answers per red-team training prompt from the SL-CAI policy."""
    from cai_lib.pairs import sample_pairs as sample

    ctx = RunContext.model_validate(context)
    p = ctx.params
    uri = ctx.uri("pairs")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "sample_pairs") as run:
        rows = list(read_dataset(DataRef.read(prompts).uri, PromptRecord))
        run.log_stage_metrics({"pairs": sample(rows, DataRef.read(policy).uri, uri, p.pairs)})
    return dataset_ref(uri)


def label(context: dict, constitution_path: str, pairs: str) -> DataRef:
    """AI feedback: soft preference labels from the feedback model (paper §4.1)."""
    from cai_lib.feedback import label_preferences

    ctx = RunContext.model_validate(context)
    p = ctx.params
    uri = ctx.uri("labels")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "label") as run:
        rows = list(read_dataset(DataRef.read(pairs).uri, ResponsePair))
        written = label_preferences(
            rows, pinned_constitution(constitution_path), p.feedback_model, uri, p.feedback
        )
        run.log_stage_metrics({"labels": written})
    return dataset_ref(uri)


def numeric(values: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (what MLflow and KFP Metrics accept)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def train_pm(context: dict, labels: str) -> tuple[DataRef, dict]:
    """The preference model on AI harmlessness labels mixed with human pairs (paper §4.1)."""
    from cai_lib.human_preferences import read_human_preferences
    from cai_lib.preference_model import train_preference_model
    from cai_lib.records import Preference

    ctx = RunContext.model_validate(context)
    p = ctx.params
    uri = ctx.uri("checkpoints", "pm")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "train_pm") as run:
        human = read_human_preferences(p.human_preferences, limit=p.num_human) if p.human_preferences else []
        ai = list(read_dataset(DataRef.read(labels).uri, Preference))
        metrics = train_preference_model(ai, human, p.base_model, uri, p.preference_model)
        values = numeric(metrics.model_dump())
        run.log_stage_metrics(values)
    return checkpoint_ref(uri), values


def rl(
    context: dict, red_team: str, helpful: str, labels: str, policy: str, reward_model: str
) -> tuple[DataRef, dict]:
    """RL-CAI: the SL-CAI policy against the PM with a KL penalty (RLOO/GRPO), or DPO on the labels."""
    from cai_lib.records import Preference
    from cai_lib.rl import train_rl

    ctx = RunContext.model_validate(context)
    p = ctx.params
    uri = ctx.uri("checkpoints", "rl-cai")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "rl") as run:
        prompts = [
            *read_dataset(DataRef.read(red_team).uri, PromptRecord),
            *read_dataset(DataRef.read(helpful).uri, PromptRecord),
        ]
        preferences = (
            list(read_dataset(DataRef.read(labels).uri, Preference)) if p.rl.algorithm == "dpo" else None
        )
        metrics = train_rl(
            DataRef.read(policy).uri, DataRef.read(reward_model).uri, prompts, uri, p.rl, preferences
        )
        values = numeric(metrics.model_dump())
        run.log_stage_metrics(values)
    return checkpoint_ref(uri), values


def model_name(params: PipelineParams, constitution: Constitution, role: str) -> str:
    """Registered model name of one role (pm, sl-cai, rl-cai) for one constitution."""
    return f"{params.model_name_prefix}-{constitution.name}-{role}"


def champion_source(params: PipelineParams, constitution: Constitution) -> tuple[str, str] | None:
    """(version, checkpoint URI) of the registered RL-CAI champion, if there is one."""
    from cai_lib.registry import version_by_alias

    champion = version_by_alias(
        params.mlflow_tracking_uri, model_name(params, constitution, "rl-cai"), "champion"
    )
    return (champion.version, champion.source) if champion else None


def evaluate(
    context: dict,
    constitution_path: str,
    red_team: str,
    helpful: str,
    traces: str,
    sl_policy: str,
    rl_policy: str,
    reward_model: str,
    report_path: str,
    results_path: str,
) -> dict[str, float]:
    """Base, SL-CAI and RL-CAI (and the registered champion, if any) on the held-out prompts.

    Writes the HTML report to `report_path` (the KFP HTML artifact) and a pointer to the stored
    results to `results_path`; returns the flat metrics.
    """
    from cai_lib.evaluate import REPORT_FILE
    from cai_lib.evaluate import evaluate as run_evaluation

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    policies = {
        "base": p.base_model,
        "sl-cai": DataRef.read(sl_policy).uri,
        "rl-cai": DataRef.read(rl_policy).uri,
    }
    champion = champion_source(p, constitution)
    if champion:
        policies["champion"] = champion[1]
    uri = ctx.uri("eval")
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "evaluate") as run:
        result = run_evaluation(
            policies,
            DataRef.read(reward_model).uri,
            p.feedback_model,
            constitution,
            list(read_dataset(DataRef.read(red_team).uri, PromptRecord)),
            list(read_dataset(DataRef.read(helpful).uri, PromptRecord)),
            uri,
            p.evaluation,
            list(read_dataset(DataRef.read(traces).uri, Trace)),
        )
        store = ArtifactStore.open(uri)
        store.get_file(REPORT_FILE, report_path)
        run.log_artifact(report_path, "report")
        metrics = result.flat_metrics()
        run.log_stage_metrics(metrics)
    pointer = {"uri": uri, "champion_version": champion[0] if champion else None}
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(results_path).write_text(json.dumps(pointer))
    return metrics


def register(
    context: dict,
    constitution_path: str,
    traces: str,
    labels: str,
    sl_policy: str,
    rl_policy: str,
    reward_model: str,
    results: str,
) -> str:
    """Register PM, SL-CAI and RL-CAI with lineage, make them challengers, run the promotion gate.

    The gate judges the RL-CAI policy on its win rates against the champion it was evaluated
    with; when it is promoted, the PM and SL-CAI model of the same run become champions with it.
    Returns a JSON summary (run root, report, versions, decision).
    """
    from cai_lib.evaluate import load_result, win_rate
    from cai_lib.registry import (
        Lineage,
        promote_from_evaluation,
        promote_with,
        record_evaluation,
        register_checkpoint,
        set_challenger,
    )

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    pointer = json.loads(Path(results).read_text())
    data = {"traces": DataRef.read(traces).uri, "preferences": DataRef.read(labels).uri}
    checkpoints = {"pm": reward_model, "sl-cai": sl_policy, "rl-cai": rl_policy}
    bases = {"pm": p.base_model, "sl-cai": p.base_model, "rl-cai": DataRef.read(sl_policy).uri}
    versions = {}
    with stage_run(p.mlflow_tracking_uri, ctx.parent_run_id, "register") as run:
        for role, path in checkpoints.items():
            lineage = Lineage(
                constitution_name=constitution.name,
                constitution_version=constitution.version,
                constitution_sha256=constitution.sha256,
                pipeline_run_id=ctx.run_id,
                base_model=bases[role],
                data_uris=data,
            )
            name = model_name(p, constitution, role)
            info = register_checkpoint(
                p.mlflow_tracking_uri, name, DataRef.read(path).uri, run.run_id, lineage
            )
            set_challenger(p.mlflow_tracking_uri, name, info.version)
            versions[role] = (name, info.version)
        policy_name, policy_version = versions["rl-cai"]
        champion = pointer.get("champion_version")
        if champion:
            result = load_result(pointer["uri"])
            record_evaluation(
                p.mlflow_tracking_uri,
                policy_name,
                policy_version,
                win_rate(result, "harmless", "rl-cai", "champion"),
                win_rate(result, "helpful", "rl-cai", "champion"),
                champion,
            )
        _, decision = promote_from_evaluation(p.mlflow_tracking_uri, policy_name, policy_version, p.promotion)
        if decision.promote:
            for role in ("pm", "sl-cai"):
                promote_with(
                    p.mlflow_tracking_uri, *versions[role], leader=f"{policy_name} v{policy_version}"
                )
        run.log_stage_metrics({"promoted": float(decision.promote)})
    end_pipeline_run(p.mlflow_tracking_uri, ctx.parent_run_id, succeeded=True)
    return json.dumps(
        {
            "run_root": ctx.run_root,
            "report": join_uri(pointer["uri"], "report.html"),
            "versions": {role: {"name": n, "version": v} for role, (n, v) in versions.items()},
            "promoted": decision.promote,
            "reason": decision.reason,
            "mlflow_tracking_uri": p.mlflow_tracking_uri,
            "experiment": p.experiment,
        }
    )
