"""The pipeline's steps: what each Kubeflow component (and each `kfp.local` task) runs.

A step takes plain values (strings, dicts, paths of small KFP artifacts), calls one stage of
`cai_lib`, records it in MLflow as a nested run of the pipeline run, and returns a `DataRef`:
a pointer to what it wrote in the artifact store. Big things (datasets, checkpoints) never
travel as KFP artifacts (the launcher would copy every multi-GB checkpoint into every step);
only these pointers do, with row count and sha256 in the artifact metadata.

Every stage that makes data or a checkpoint writes it as a content-addressed output
(`cai_lib.outputs`): its key hashes the stage, its settings, its code, its inputs' content
hashes and the constitution sections it reads (`cai_lib.stage_table`). A complete output with
the same key is reused, by a retry of the same step or by any later run, without loading a
model. Each step records in the run's folder (`<artifact_root>/runs/<KFP run id>/stages/`), in
its MLflow run (tags `cai.reuse`, `cai.output_key`, `cai.made_by_run`) and so in the report
whether it ran or reused an output.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pydantic import BaseModel, Field

from cai_lib import stage_table
from cai_lib.config import PipelineParams, Platform
from cai_lib.constitution import (
    Constitution,
    canonical_sha256,
    dump_constitution,
    load_constitution,
    parse_constitution,
)
from cai_lib.errors import CaiError
from cai_lib.launch import TrainingJob, launch, stage_config, staged_rows
from cai_lib.outputs import OutputMarker, StageOutput, StageRecord, record_of, summary_lines
from cai_lib.records import PromptRecord, ResponsePair, Trace
from cai_lib.shards import SUCCESS, dataset_summary, fingerprint, merge_datasets, read_dataset
from cai_lib.stage_table import NAMES, ConstitutionPart, Output, code_version
from cai_lib.store import ArtifactStore, join_uri
from cai_lib.tracking import StageRun, finish_pipeline_run, run_url, stage_run, start_pipeline_run
from cai_lib.training import process_count, visible_gpus

if TYPE_CHECKING:
    from cai_lib.registry import Lineage

STAGES_DIR = "stages"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
OUTCOME_ENV = "CAI_RUN_OUTCOME"


class DataRef(BaseModel):
    """A pointer to a dataset or checkpoint in the artifact store."""

    uri: str = Field(description="Where it lies: an s3:// prefix or a local directory.")
    kind: str = Field(description="dataset, checkpoint or directory.")
    rows: int | None = Field(default=None, description="Row count of a dataset.")
    sha256: str | None = Field(
        default=None, description="Content hash (dataset rows or checkpoint manifest)."
    )
    mlflow_run_id: str | None = Field(default=None, description="The MLflow stage run that made it.")

    def write(self, path: str) -> dict:
        """Write the pointer to a KFP artifact file; returns the metadata to attach to it."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(self.model_dump_json())
        return self.model_dump(exclude_none=True)

    @classmethod
    def read(cls, path: str) -> DataRef:
        return cls.model_validate_json(Path(path).read_text())

    @classmethod
    def of(cls, marker: OutputMarker) -> DataRef:
        return cls(
            uri=marker.uri,
            kind=marker.kind,
            rows=marker.rows,
            sha256=marker.sha256,
            mlflow_run_id=marker.made_by_mlflow_run,
        )


class PinnedModel(BaseModel):
    """A model reference fixed for the whole run: every stage loads the same checkpoint even if an
    alias (`models:/NAME@champion`) moves while the run goes on."""

    load: str = Field(description="The reference stages load: an alias becomes models:/NAME/VERSION.")
    content: str = Field(description="Content identity of the checkpoint (see cai_lib.models.pin_model).")


class RunContext(BaseModel):
    """What every step after the first knows about the pipeline run."""

    params: PipelineParams
    run_id: str = Field(description="The KFP run id: unique per run, the run's identity.")
    run_name: str = Field(description="Display name of the run (MLflow run name).")
    artifact_root: str
    tracking_uri: str
    parent_run_id: str = Field(description="MLflow parent run id.")
    mlflow_run_url: str = Field(
        default="", description="The parent run's page in the MLflow UI (empty for a local store)."
    )
    models: dict[str, PinnedModel] = Field(
        default_factory=dict, description="Each model reference of the run, pinned once by the first step."
    )

    def model(self, ref: str) -> PinnedModel:
        """The pin of `ref`: what to load and its content identity (for output keys)."""
        if ref not in self.models:
            raise CaiError(f"model '{ref}': not pinned by the run's first step")
        return self.models[ref]

    @property
    def run_root(self) -> str:
        """The run's folder: pointers to the outputs it used, its pinned constitution, its report."""
        return join_uri(self.artifact_root, "runs", self.run_id)

    @property
    def outputs_root(self) -> str:
        """Where content-addressed stage outputs lie, shared by every run."""
        return join_uri(self.artifact_root, "outputs")


def one_line_errors(step: Callable) -> Callable:
    """A user's mistake (`CaiError`) ends the step's process with one line, not a traceback."""
    import functools

    @functools.wraps(step)
    def run(*args, **kwargs):
        try:
            return step(*args, **kwargs)
        except CaiError as err:
            raise SystemExit(f"error: {err}") from None

    return run


def pinned_constitution(path: str) -> Constitution:
    return parse_constitution(Path(path).read_text(), path)


def dataset_ref(uri: str) -> DataRef:
    summary = dataset_summary(uri)
    return DataRef(uri=uri, kind="dataset", rows=summary["rows"], sha256=summary["sha256"])


def numeric(values: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (what MLflow and KFP Metrics accept)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def constitution_part(constitution: Constitution, part: ConstitutionPart, params: PipelineParams) -> str:
    """sha256 of the part of `constitution` a stage reads (see `cai_lib.stage_table`)."""
    from cai_lib.evaluate import evaluation_part, judging_principles

    if part == "evaluation":
        return canonical_sha256(
            evaluation_part(constitution, judging_principles(constitution, params.evaluation))
        )
    return constitution.section_sha256(part)


# -- recording what each stage did -------------------------------------------------------------------


def write_record(ctx: RunContext, record: StageRecord) -> None:
    ArtifactStore.open(ctx.run_root).write_text(
        join_uri(STAGES_DIR, record.file_name), record.model_dump_json(indent=2) + "\n"
    )


def run_records(run_root: str) -> list[StageRecord]:
    """The stage records in a run's folder."""
    store = ArtifactStore.open(run_root)
    return [StageRecord.model_validate_json(store.read_text(key)) for key in store.list(STAGES_DIR)]


def run_summary(run_root: str) -> list[str]:
    """`stage NAME: ran` / `stage NAME: reused (...)`, one line per stage, in pipeline order."""
    return summary_lines(run_records(run_root), NAMES)


@contextmanager
def recorded(ctx: RunContext, name: str, shard: int | None = None):
    """The MLflow stage run of `name` (one per shard of a fanned-out stage)."""
    label = name if shard is None else f"{name}[{shard}]"
    with stage_run(ctx.tracking_uri, ctx.parent_run_id, label) as run:
        yield run


def record(ctx: RunContext, run: StageRun, marker: OutputMarker, shard: int | None = None) -> StageRecord:
    """Tag the stage run and write the run's pointer: ran or reused, key, where, made by whom."""
    entry = record_of(marker, ctx.run_id, shard)
    run.set_tags(
        {
            "cai.reuse": entry.status,
            "cai.output_key": marker.key,
            "cai.output_uri": marker.uri,
            "cai.made_by_run": marker.made_by_run,
        }
    )
    run.log_stage_metrics(marker.metrics)
    write_record(ctx, entry)
    return entry


Write = Callable[[str, str], dict | None]


def produce(
    ctx: RunContext,
    name: str,
    identity: dict,
    write: Write,
    constitution: Constitution | None = None,
    shard: int | None = None,
    then: Callable[[StageRun, OutputMarker], None] | None = None,
) -> OutputMarker:
    """The output of stage `name` for `identity`: the complete one if any run made it, else the
    one `write(uri, rows_key)` makes now (`StageOutput.rows_key`: what row ids derive from). The
    key adds to `identity` the stage's code version and the constitution parts the stage table
    says it reads. Either way the stage run and the run's
    folder record what happened; `then` runs last inside the stage run (e.g. to log a report)."""
    stage = stage_table.stage(name)
    parts = {part: constitution_part(constitution, part, ctx.params) for part in stage.reads}
    output = StageOutput(
        ctx.outputs_root, name, {"code": code_version(name), **identity, "constitution": parts}
    )
    with recorded(ctx, name, shard) as run:
        marker = output.complete() or make(ctx, stage.output, output, write, run.run_id)
        record(ctx, run, marker, shard)
        if then:
            then(run, marker)
    return marker


def make(
    ctx: RunContext, kind: Output, output: StageOutput, write: Write, mlflow_run_id: str
) -> OutputMarker:
    """Write and commit a stage's output, made in the MLflow stage run `mlflow_run_id`. A dataset
    fills (or resumes) `<key>/data`, unless it was finished before the commit was interrupted; a
    checkpoint or results directory goes to a fresh attempt prefix, committed by the output's
    marker."""
    from cai_lib.registry import checkpoint_manifest_sha256

    if kind == "dataset":
        uri = output.data_uri()
        if not ArtifactStore.open(uri).exists(SUCCESS):
            write(uri, output.rows_key)
        summary = dataset_summary(uri)
        rows = summary["rows"]
        return output.commit(
            uri,
            "dataset",
            ctx.run_id,
            rows=rows,
            sha256=summary["sha256"],
            metrics={"rows": rows},
            mlflow_run_id=mlflow_run_id,
        )
    uri = output.new_attempt()
    metrics = numeric(write(uri, output.key) or {})
    sha256 = checkpoint_manifest_sha256(uri) if kind == "checkpoint" else None
    return output.commit(uri, kind, ctx.run_id, sha256=sha256, metrics=metrics, mlflow_run_id=mlflow_run_id)


# -- steps -----------------------------------------------------------------------------------------


@one_line_errors
def resolve(params: dict, run_id: str, run_name: str, constitution_path: str) -> dict:
    """First step: validate the run, pin the constitution, run the pre-flight checks, open the
    MLflow parent run (keyed on the KFP run id `run_id`; `run_name` is its display name).

    Writes the pinned constitution YAML to `constitution_path` (a small KFP artifact every later
    step reads, so a run is reproducible whatever happens to the registry) and returns the run
    context as a dict, with each model reference pinned to what it names now (so an alias that
    moves mid-run does not change what later stages load). Everything a user can get wrong fails
    here, before any model loads.
    """
    from pydantic import ValidationError

    from cai_lib.config import format_validation_error
    from cai_lib.models import pin_model
    from cai_lib.preflight import check_run

    try:
        checked = PipelineParams.model_validate(params)
    except ValidationError as err:
        raise CaiError(format_validation_error(err, "pipeline parameters")) from None
    platform = Platform.from_environment()
    constitution = load_constitution(checked.constitution)
    check_run(checked, constitution)
    Path(constitution_path).parent.mkdir(parents=True, exist_ok=True)
    Path(constitution_path).write_text(dump_constitution(constitution))
    display = checked.run_name or run_name
    models = {
        ref: PinnedModel(**pin_model(ref)._asdict())
        for ref in {checked.base_model, checked.feedback_model, checked.judge_model}
    }
    parent = start_pipeline_run(
        platform.tracking_uri,
        checked.experiment,
        run_id,
        display,
        checked.model_dump(mode="json"),
        constitution.ref,
        constitution.sha256,
    )
    ctx = RunContext(
        params=checked,
        run_id=run_id,
        run_name=display,
        artifact_root=platform.artifact_root,
        tracking_uri=platform.tracking_uri,
        parent_run_id=parent,
        mlflow_run_url=run_url(platform.tracking_uri, parent),
        models=models,
    )
    folder = ArtifactStore.open(ctx.run_root)
    folder.write_text("constitution.yaml", dump_constitution(constitution))
    folder.write_json(
        "run.json", {"run_id": run_id, "run_name": display, "params": checked.model_dump(mode="json")}
    )
    with recorded(ctx, "resolve") as run:
        run.log_artifact(constitution_path, "constitution")
        write_record(ctx, StageRecord(stage="resolve", status="ran", made_by_run=run_id, run_id=run_id))
    return ctx.model_dump(mode="json", exclude_none=True)  # KFP structs cannot hold null


@one_line_errors
def prepare_prompts(context: dict) -> dict[str, DataRef]:
    """Read, deduplicate and split the red-team and helpfulness prompts (seeded).

    The sources are read every run (a file can change under the same name); each split is
    stored once per content, at a key that hashes its rows.
    """
    from cai_lib.preflight import prompt_splits

    ctx = RunContext.model_validate(context)
    refs = {}
    with recorded(ctx, "prepare_prompts") as run:
        for split, rows in prompt_splits(ctx.params).items():
            output = StageOutput(
                ctx.outputs_root,
                "prepare_prompts",
                {"split": split, "rows": fingerprint({"rows": [r.model_dump() for r in rows]})},
            )
            marker = output.complete() or make(
                ctx,
                "dataset",
                output,
                lambda uri, _, rows=rows: write_finished_dataset(uri, rows),
                run.run_id,
            )
            refs[split] = DataRef.of(marker)
            run.log_stage_metrics({f"{split}_prompts": len(rows)})
        write_record(
            ctx, StageRecord(stage="prepare_prompts", status="ran", made_by_run=ctx.run_id, run_id=ctx.run_id)
        )
    return refs


def fan_out(context: dict, prompts: int) -> list[dict]:
    """The items of the generation fan-outs: the run context with one shard index each, and the
    shard count (`PipelineParams.shard_count` of the `prompts` red-team training prompts)."""
    return _work_items(context, RunContext.model_validate(context).params.shard_count(prompts))


def eval_fan_out(context: dict, red_team: str, helpful: str) -> list[dict]:
    """The items of evaluation's fan-out over the held-out prompts (DataRef files `red_team` and
    `helpful`), `PipelineParams.eval_shard_count` of them."""
    params = RunContext.model_validate(context).params
    return _work_items(context, params.eval_shard_count(DataRef.read(red_team).rows, DataRef.read(helpful).rows))


def _work_items(context: dict, shards: int) -> list[dict]:
    return [{"context": context, "shard": shard, "shards": shards} for shard in range(shards)]


def write_finished_dataset(uri: str, rows: list[BaseModel]) -> None:
    """A one-shard dataset (the same layout the sharded stages write)."""
    from cai_lib.shards import ShardedOutput

    ShardedOutput(uri, {"rows": [r.id for r in rows]}).run(rows, max(len(rows), 1), lambda chunk: list(chunk))


def slice_of(uri: str, model: type[BaseModel], shard: int, shards: int) -> list:
    """Shard `shard` of `shards` of a dataset: every `shards`-th row from row `shard` (interleaved,
    so shards stay even when rows are ordered by length or source)."""
    return list(read_dataset(uri, model))[shard::shards]


@one_line_errors
def critique_revise_shard(
    context: dict, constitution_path: str, prompts: str, shard: int, shards: int
) -> DataRef:
    """SL-CAI critique→revision on one of `shards` interleaved slices of the training prompts."""
    from cai_lib.critique_revise import critique_revise

    ctx = RunContext.model_validate(context)
    p = ctx.params
    source, model = DataRef.read(prompts), ctx.model(p.base_model)
    constitution = pinned_constitution(constitution_path)
    identity = {
        "inputs": {"prompts": source.sha256, "model": model.content},
        "part": [shard, shards],
        "settings": p.critique_revise.identity(),
    }

    def write(uri: str, key: str) -> None:
        rows = slice_of(source.uri, PromptRecord, shard, shards)
        critique_revise(rows, constitution, model.load, uri, p.critique_revise, output_key=key)

    return DataRef.of(produce(ctx, "critique_revise", identity, write, constitution, shard=shard))


@one_line_errors
def merge(context: dict, parts: list[str], name: str) -> DataRef:
    """Merge the shard outputs of a fan-out into one dataset, rows in id order (the same dataset at
    any shard count): stage `merge_<name>`."""
    ctx = RunContext.model_validate(context)
    refs = [DataRef.model_validate_json(part) for part in parts]
    identity = {"of": name, "inputs": [ref.sha256 for ref in refs]}
    return DataRef.of(
        produce(ctx, f"merge_{name}", identity, lambda uri, _: merge_datasets([r.uri for r in refs], uri))
    )


@one_line_errors
def helpful_samples(context: dict, prompts: str, shard: int = 0, shards: int = 1) -> DataRef:
    """The base model's own answers to one of `shards` slices of the helpfulness training prompts
    (mixed into SFT)."""
    from cai_lib.critique_revise import sample_helpful

    ctx = RunContext.model_validate(context)
    p = ctx.params
    source, model = DataRef.read(prompts), ctx.model(p.base_model)
    identity = {
        "inputs": {"prompts": source.sha256, "model": model.content},
        "part": [shard, shards],
        "settings": p.helpful_samples.identity(),
    }

    def write(uri: str, key: str) -> None:
        rows = slice_of(source.uri, PromptRecord, shard, shards)
        sample_helpful(rows, model.load, uri, p.helpful_samples, output_key=key)

    return DataRef.of(produce(ctx, "helpful_samples", identity, write, shard=shard))


@one_line_errors
def sft(context: dict, traces: str, helpful: str) -> tuple[DataRef, dict]:
    """Fine-tune the base model on the final revisions mixed with helpfulness samples (SL-CAI)."""
    ctx = RunContext.model_validate(context)
    p = ctx.params
    data, samples, model = DataRef.read(traces), DataRef.read(helpful), ctx.model(p.base_model)
    identity = {
        "inputs": {"traces": data.sha256, "helpful": samples.sha256, "model": model.content},
        "settings": p.sft.model_dump(mode="json"),
    }

    def write(uri: str, _: str) -> dict:
        data_uris = {"traces": [data.uri], "helpful": [samples.uri]}
        return train(
            TrainingJob(stage="sft", model=model.load, out=uri, data=data_uris, config=p.sft.model_dump())
        )

    marker = produce(ctx, "sft", identity, write)
    return DataRef.of(marker), marker.metrics


@one_line_errors
def sample_pairs(context: dict, prompts: str, policy: str, shard: int = 0, shards: int = 1) -> DataRef:
    """Two sampled answers per red-team training prompt of one of `shards` slices, from the SL-CAI
    policy."""
    from cai_lib.pairs import sample_pairs as sample

    ctx = RunContext.model_validate(context)
    p = ctx.params
    source, model = DataRef.read(prompts), DataRef.read(policy)
    identity = {
        "inputs": {"prompts": source.sha256, "policy": model.sha256},
        "part": [shard, shards],
        "settings": p.pairs.identity(),
    }

    def write(uri: str, key: str) -> None:
        sample(slice_of(source.uri, PromptRecord, shard, shards), model.uri, uri, p.pairs, output_key=key)

    return DataRef.of(produce(ctx, "sample_pairs", identity, write, shard=shard))


@one_line_errors
def label(context: dict, constitution_path: str, pairs: str, shard: int | None = None) -> DataRef:
    """AI feedback (paper §4.1): soft preference labels from the feedback model for a dataset of
    pairs (in the pipeline, one fan-out shard's pairs: `shard` names it in the records)."""
    from cai_lib.feedback import label_preferences

    ctx = RunContext.model_validate(context)
    p = ctx.params
    source, model = DataRef.read(pairs), ctx.model(p.feedback_model)
    constitution = pinned_constitution(constitution_path)
    settings = p.labelling_settings(constitution)
    # The pairs are the part: a label's id depends on its pair, not on which pairs share its shard.
    identity = {"inputs": {"model": model.content}, "part": source.sha256, "settings": settings.identity()}

    def write(uri: str, key: str) -> None:
        rows = list(read_dataset(source.uri, ResponsePair))
        label_preferences(rows, constitution, model.load, uri, settings, output_key=key)

    return DataRef.of(produce(ctx, "label", identity, write, constitution, shard=shard))


@one_line_errors
def train_pm(context: dict, labels: str) -> tuple[DataRef, dict]:
    """The preference model on AI harmlessness labels mixed with human pairs (paper §4.1)."""
    from cai_lib.human_preferences import read_human_preferences

    ctx = RunContext.model_validate(context)
    p = ctx.params
    ai, model = DataRef.read(labels), ctx.model(p.base_model)
    human = read_human_preferences(p.human_preferences, limit=p.num_human) if p.human_preferences else []
    identity = {
        "inputs": {
            "labels": ai.sha256,
            "human": fingerprint({"rows": [h.model_dump() for h in human]}),
            "model": model.content,
        },
        "settings": p.preference_model.model_dump(mode="json"),
    }

    def write(uri: str, _: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="cai-train-pm-") as folder:
            data_uris = {"ai": [ai.uri], "human": staged_rows(Path(folder), "human", human)}
            config = p.preference_model.model_dump()
            return train(
                TrainingJob(stage="train_pm", model=model.load, out=uri, data=data_uris, config=config)
            )

    marker = produce(ctx, "train_pm", identity, write)
    return DataRef.of(marker), marker.metrics


@one_line_errors
def rl(
    context: dict, red_team: str, helpful: str, labels: str, policy: str, reward_model: str
) -> tuple[DataRef, dict]:
    """RL-CAI: the SL-CAI policy against the PM with a KL penalty (RLOO/GRPO), or DPO on the labels."""
    ctx = RunContext.model_validate(context)
    p = ctx.params
    sources = {name: DataRef.read(path) for name, path in (("red_team", red_team), ("helpful", helpful))}
    pairs, start, reward = DataRef.read(labels), DataRef.read(policy), DataRef.read(reward_model)
    dpo = p.rl.algorithm == "dpo"
    identity = {
        "inputs": {
            **{name: ref.sha256 for name, ref in sources.items()},
            "labels": pairs.sha256 if dpo else None,
            "policy": start.sha256,
            "reward": reward.sha256,
        },
        "settings": p.rl.model_dump(mode="json"),
    }

    def write(uri: str, _: str) -> dict:
        data_uris = {
            "prompts": [ref.uri for ref in sources.values()],
            **({"preferences": [pairs.uri]} if dpo else {}),
        }
        job = TrainingJob(
            stage="rl", model=start.uri, reward=reward.uri, out=uri, data=data_uris, config=p.rl.model_dump()
        )
        return train(job)

    marker = produce(ctx, "rl", identity, write)
    return DataRef.of(marker), marker.metrics


def train(job: TrainingJob) -> dict:
    """Run a training stage: as a multi-node TrainJob when the pipeline compiled one into this
    step's environment, else here with one process per GPU the pod sees (under torchrun when
    more than one) or as the stage's `processes` setting says. Returns rank 0's metrics."""
    from cai_lib.trainjob import TrainJobPlan, run_trainjob, trainer_client

    plan = TrainJobPlan.from_environment()
    if plan is not None:
        return run_trainjob(trainer_client(), plan, job)
    return launch(job, process_count(stage_config(job), visible_gpus()))


def model_name(params: PipelineParams, constitution: Constitution, role: str) -> str:
    """Registered model name of one role (pm, sl-cai, rl-cai) for one constitution."""
    return f"{params.model_name_prefix}-{constitution.name}-{role}"


def champion_source(ctx: RunContext, constitution: Constitution) -> tuple[str, str, str] | None:
    """(version, checkpoint URI, checkpoint sha256) of the registered RL-CAI champion, if any."""
    from cai_lib.registry import version_by_alias

    champion = version_by_alias(ctx.tracking_uri, model_name(ctx.params, constitution, "rl-cai"), "champion")
    if champion is None:
        return None
    return champion.version, champion.source, champion.checkpoint_sha256 or ""


class EvaluatedPolicies(NamedTuple):
    """What an evaluation compares: policy name -> model reference, the RL step of each policy on
    the RL run's path (Fig. 8), and the registered champion (version, source, sha256) if any."""

    policies: dict[str, str]
    rl_steps: dict[str, int]
    champion: tuple[str, str, str] | None


def evaluated_policies(
    ctx: RunContext, constitution: Constitution, sl: DataRef, rl: DataRef
) -> EvaluatedPolicies:
    """Base, SL-CAI, the policies RL saved on the way (`rl-cai-step-N`), RL-CAI, and the
    registered champion when it is another checkpoint than this run's RL-CAI."""
    from cai_lib.rl import METRICS_FILE, RLMetrics

    rl_metrics = RLMetrics.model_validate(ArtifactStore.open(rl.uri).read_json(METRICS_FILE))
    rl_steps = (
        {"sl-cai": 0}
        | {f"rl-cai-step-{n}": n for n in rl_metrics.intermediate}
        | {"rl-cai": rl_metrics.steps}
    )
    policies = {
        "base": ctx.model(ctx.params.base_model).load,
        "sl-cai": sl.uri,
        **{f"rl-cai-step-{n}": uri for n, uri in rl_metrics.intermediate.items()},
        "rl-cai": rl.uri,
    }
    champion = champion_source(ctx, constitution)
    # A champion that is this run's own RL-CAI checkpoint (a rerun with nothing changed) would
    # only be compared with itself.
    if champion and champion[2] == rl.sha256:
        champion = None
    if champion:
        policies["champion"] = champion[1]
    return EvaluatedPolicies(policies, rl_steps, champion)


@one_line_errors
def answer_eval(
    context: dict,
    constitution_path: str,
    red_team: str,
    helpful: str,
    sl_policy: str,
    rl_policy: str,
    shard: int = 0,
    shards: int = 1,
) -> DataRef:
    """Every evaluated policy's greedy answers to one of `shards` slices of the held-out prompts
    (the generation half of evaluation, fanned out like the other generation stages)."""
    from cai_lib.evaluate import answer_all

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    prompts = {"red_team": DataRef.read(red_team), "helpful": DataRef.read(helpful)}
    sl, rl = DataRef.read(sl_policy), DataRef.read(rl_policy)
    chosen = evaluated_policies(ctx, constitution, sl, rl)
    identity = {
        "inputs": {
            **{kind: ref.sha256 for kind, ref in prompts.items()},
            "base": ctx.model(p.base_model).content,
            "sl-cai": sl.sha256,
            "rl-cai": rl.sha256,
            "champion": chosen.champion[2] if chosen.champion else None,
        },
        "part": [shard, shards],
        # What shapes an answer; batch size and the engine's sizing only change how it is computed.
        "settings": {
            **p.evaluation.model_dump(mode="json", include={"max_new_tokens", "seed", "backend"}),
            "dtype": p.evaluation.engine.dtype,
        },
    }

    def write(uri: str, _: str) -> None:
        sets = {kind: slice_of(ref.uri, PromptRecord, shard, shards) for kind, ref in prompts.items()}
        write_finished_dataset(uri, answer_all(chosen.policies, sets, p.evaluation))

    return DataRef.of(produce(ctx, "answer_eval", identity, write, shard=shard))


@one_line_errors
def evaluate(
    context: dict,
    constitution_path: str,
    red_team: str,
    helpful: str,
    traces: str,
    sl_policy: str,
    rl_policy: str,
    reward_model: str,
    answers: str,
    report_path: str,
    results_path: str,
) -> dict[str, float]:
    """Judge the policies' answers (`answers`, the merged `answer_eval` shards) on the held-out
    prompts: PM scores, evasiveness, win rates and Elo of base, SL-CAI, the policies RL saved on
    the way (`rl-cai-step-N`), RL-CAI and the registered champion, if it is another checkpoint.

    Writes this run's HTML report (the evaluation plus which stages ran or were reused) to
    `report_path` (the KFP HTML artifact), to the run's folder and to MLflow, and a pointer to
    the stored results to `results_path`; returns the flat metrics.
    """
    from cai_lib.evaluate import PolicyAnswer, load_result
    from cai_lib.evaluate import evaluate as run_evaluation
    from cai_lib.report import judge_note, render_report

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    refs = {
        name: DataRef.read(path)
        for name, path in (
            ("red_team", red_team),
            ("helpful", helpful),
            ("traces", traces),
            ("sl-cai", sl_policy),
            ("rl-cai", rl_policy),
            ("pm", reward_model),
            ("answers", answers),
        )
    }
    base, judge, labeller = ctx.model(p.base_model), ctx.model(p.judge_model), ctx.model(p.feedback_model)
    chosen = evaluated_policies(ctx, constitution, refs["sl-cai"], refs["rl-cai"])
    identity = {
        "inputs": {
            **{name: ref.sha256 for name, ref in refs.items()},
            "champion": chosen.champion[2] if chosen.champion else None,
            "base": base.content,
            "judge": judge.content,
            "labeller": labeller.content,
        },
        "settings": p.evaluation.model_dump(mode="json", exclude={"batch_size"}),
    }

    def write(uri: str, _: str) -> dict:
        result = run_evaluation(
            chosen.policies,
            refs["pm"].uri,
            judge.load,
            constitution,
            list(read_dataset(refs["red_team"].uri, PromptRecord)),
            list(read_dataset(refs["helpful"].uri, PromptRecord)),
            uri,
            p.evaluation,
            list(read_dataset(refs["traces"].uri, Trace)),
            # The same checkpoint under two names is the same labeller.
            labeller_ref=judge.load if labeller.content == judge.content else labeller.load,
            rl_steps=chosen.rl_steps,
            answers=list(read_dataset(refs["answers"].uri, PolicyAnswer)),
        )
        return result.flat_metrics()

    def report(run: StageRun, marker: OutputMarker) -> None:
        result = load_result(marker.uri)
        note = judge_note(result)
        run.set_tags(
            {"cai.eval.judge": result.judge_ref, "cai.eval.judge_is_feedback_model": str(bool(note)).lower()}
        )
        if note:
            run.set_tags({"cai.eval.warning": note})
        render_report(result, report_path, run_summary(ctx.run_root))
        ArtifactStore.open(ctx.run_root).put_file(report_path, REPORT_FILE)
        run.log_artifact(report_path, "report")

    marker = produce(ctx, "evaluate", identity, write, constitution, then=report)
    pointer = {"uri": marker.uri, "champion_version": chosen.champion[0] if chosen.champion else None}
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(results_path).write_text(json.dumps(pointer))
    return marker.metrics


def lineage_of(ctx: RunContext, constitution: Constitution, base_model: str, data: dict[str, str]) -> Lineage:
    """The lineage tags of a checkpoint this run trained from `base_model` on `data`."""
    from cai_lib.registry import Lineage
    from cai_lib.retrain import run_config_sha256

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
    from cai_lib.evaluate import find_win_rate, load_result
    from cai_lib.registry import WinRateEvidence, record_evaluation

    champion = pointer.get("champion_version")
    result = load_result(pointer["uri"])
    rival = "champion" if champion else "sl-cai"
    harmless, helpful = (find_win_rate(result, c, "rl-cai", rival) for c in ("harmless", "helpful"))
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
) -> str:
    """Register PM, SL-CAI and RL-CAI with lineage, make them challengers, run the promotion gate.

    Each version's source is the checkpoint's loadable folder under `models/` (see
    `cai_lib.pyfunc_model.publish`), and its run the MLflow run of the stage that trained it.
    After a promotion, the InferenceServices the installation serves follow the new champions
    (`cai_lib.serving.sync_served`).

    The gate judges the RL-CAI policy on its win rates against the champion it was evaluated
    with (with no champion yet, against the SL-CAI policy); when it is promoted, the PM and
    SL-CAI model of the same run become champions with it. Registration is idempotent by
    checkpoint, so a rerun that reused every checkpoint gets the versions the first run
    registered. Returns a JSON summary (run root, report, versions, decision, what serving now
    serves), also written to the run's folder for the exit handler.
    """
    from cai_lib.pyfunc_model import ROLE_KINDS, publish
    from cai_lib.registry import promote_from_evaluation, promote_with, register_checkpoint, set_challenger
    from cai_lib.serving import sync_served

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    data = {"traces": DataRef.read(traces).uri, "preferences": DataRef.read(labels).uri}
    checkpoints = {"pm": reward_model, "sl-cai": sl_policy, "rl-cai": rl_policy}
    base = ctx.model(p.base_model).load  # a models:/ alias as the version it named when the run began
    bases = {"pm": base, "sl-cai": base, "rl-cai": DataRef.read(sl_policy).uri}
    versions = {}
    with recorded(ctx, "register") as run:
        for role, path in checkpoints.items():
            name = model_name(p, constitution, role)
            checkpoint = DataRef.read(path)
            source = publish(checkpoint.uri, ctx.artifact_root, ROLE_KINDS[role])
            # The version's run is the stage run that trained it; markers older than that field
            # do not name it, and then the register run stands in.
            trained_by = checkpoint.mlflow_run_id or run.run_id
            lineage = lineage_of(ctx, constitution, bases[role], data)
            info = register_checkpoint(ctx.tracking_uri, name, source, trained_by, lineage)
            set_challenger(ctx.tracking_uri, name, info.version)
            versions[role] = (name, info.version)
        policy_name, policy_version = versions["rl-cai"]
        record_gate_evidence(ctx, json.loads(Path(results).read_text()), policy_name, policy_version)
        _, decision = promote_from_evaluation(ctx.tracking_uri, policy_name, policy_version, p.promotion)
        served = []
        if decision.promote:
            for role in ("pm", "sl-cai"):
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
        "served": [sync.model_dump() for sync in served],
        "mlflow_tracking_uri": ctx.tracking_uri,
        "experiment": p.experiment,
    }
    ArtifactStore.open(ctx.run_root).write_json(SUMMARY_FILE, summary)
    return json.dumps(summary)


@one_line_errors
def finish(run_id: str, experiment: str, state: str, error: str = "") -> str:
    """The exit handler: close the MLflow parent run FINISHED when the pipeline `state` is
    SUCCEEDED and FAILED otherwise (failed, cancelled), and release any promotion lock the run
    still holds. Runs whatever happened to the other steps. Returns a JSON summary: the state,
    what it closed and released, one line per stage that recorded itself (ran or reused), and
    the register step's summary when the run got that far."""
    from cai_lib.registry import release_run_locks

    platform = Platform.from_environment()
    succeeded = state == "SUCCEEDED"
    # Both are tried whatever the other does; a failure of either fails the task, which KFP retries.
    released, parent, errors = [], None, []
    try:
        released = release_run_locks(platform.tracking_uri, run_id)
    except Exception as err:  # noqa: BLE001 - collected and raised below
        errors.append(f"releasing promotion locks: {err}")
    try:
        parent = finish_pipeline_run(platform.tracking_uri, experiment, run_id, succeeded)
    except Exception as err:  # noqa: BLE001 - collected and raised below
        errors.append(f"closing the MLflow run: {err}")
    if errors:
        raise CaiError(f"exit handler of pipeline run {run_id}: {'; '.join(errors)}")
    folder = ArtifactStore.open(join_uri(platform.artifact_root, "runs", run_id))
    outcome = json.dumps(
        {
            "run_id": run_id,
            "state": state,
            "error": error,
            "mlflow_run": parent,
            "mlflow_run_url": run_url(platform.tracking_uri, parent) if parent else "",
            "locks_released": released,
            "stages": run_summary(folder.uri),
            "summary": folder.read_json(SUMMARY_FILE) if folder.exists(SUMMARY_FILE) else None,
        }
    )
    # kfp.local returns no pipeline output from a failed run; `cai run` names a file to read instead.
    if os.environ.get(OUTCOME_ENV):
        Path(os.environ[OUTCOME_ENV]).write_text(outcome)
    return outcome
