"""The Constitutional AI pipeline (DESIGN §2): the DAG, built from the run and deploy config.

    resolve ─ prepare_prompts ─┬─ ParallelFor(shard): critique_revise ─ merge ─┐
                               └─ helpful_samples ─────────────────────────────┴─ sft
    sft ─ sample_pairs ─ label ─ train_pm ─ rl ─ evaluate ─ register

Every field of `PipelineParams` is one pipeline parameter (stage sections are `dict` parameters),
so the Kubeflow UI's run form, `cai run --set` and MLflow's params are the same names. Per-stage
resources, images and secrets come from `DeployConfig` when the pipeline is compiled: GPU stages
get an accelerator, a node selector and tolerations; CPU stages get none.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from kfp import dsl, kubernetes

from cai_lib.config import GPU_STAGES, DeployConfig, PipelineParams, params_as_pipeline_arguments
from components import stages

PIPELINE_NAME = "constitutional-ai"
# Stages whose output is a pure function of their inputs (seeded): KFP may reuse a cached result.
CACHED_STAGES = {
    "prepare_prompts",
    "critique_revise",
    "merge_traces",
    "helpful_samples",
    "sample_pairs",
    "label",
}
# Stages that resume from their finished shards, so a retry loses no work.
RESUMABLE_STAGES = {"critique_revise", "helpful_samples", "sample_pairs", "label"}
TYPES = {str: str, int: int, float: float, bool: bool}
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _annotation(field) -> type:
    return TYPES.get(field.annotation, dict)


def pipeline_signature(defaults: PipelineParams) -> inspect.Signature:
    """One keyword parameter per `PipelineParams` field, with the run config's value as default."""
    arguments = params_as_pipeline_arguments(defaults)
    return inspect.Signature(
        return_annotation=str,
        parameters=[
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=arguments[name],
                annotation=_annotation(field),
            )
            for name, field in PipelineParams.model_fields.items()
        ],
    )


def pipeline_docstring() -> str:
    lines = [
        "Constitutional AI: SL-CAI, AI feedback, preference model, RL-CAI, evaluation, registration.",
        "",
        "Args:",
    ]
    for name, field in PipelineParams.model_fields.items():
        limits = [
            f"{symbol} {getattr(m, attr)}"
            for m in field.metadata
            for attr, symbol in BOUNDS.items()
            if hasattr(m, attr)
        ]
        text = field.description or f"Settings of the {name} stage (see cai_lib)."
        lines.append(f"    {name}: {text}{' (' + ', '.join(limits) + ')' if limits else ''}")
    return "\n".join(lines)


class _Tasks:
    """Turns component functions into KFP components and applies the deploy config to tasks."""

    def __init__(self, deploy: DeployConfig):
        self.deploy = deploy

    def op(self, func: Callable, stage: str) -> Callable:
        image = self.deploy.image_gpu if stage in GPU_STAGES else self.deploy.image_cpu
        component = dsl.component(func, base_image=image)

        def make_task(**kwargs) -> dsl.PipelineTask:
            task = component(**kwargs)
            self.configure(task, stage, func.__name__)
            return task

        return make_task

    def configure(self, task: dsl.PipelineTask, stage: str, name: str) -> None:
        task.set_display_name(name.replace("_", " "))
        task.set_caching_options(stage in CACHED_STAGES)
        profile = self.deploy.resources.get(stage)
        if profile is not None:
            if profile.wants_gpu:
                task.set_accelerator_type(profile.accelerator_type)
                task.set_accelerator_limit(profile.accelerator_count)
                for key, value in profile.node_selector.items():
                    kubernetes.add_node_selector(task, label_key=key, label_value=value)
                for tol in profile.tolerations:
                    kubernetes.add_toleration(
                        task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect
                    )
            for setter, value in (
                (task.set_cpu_request, profile.cpu_request),
                (task.set_cpu_limit, profile.cpu_limit),
                (task.set_memory_request, profile.memory_request),
                (task.set_memory_limit, profile.memory_limit),
            ):
                if value:
                    setter(value)
            if profile.retries:
                task.set_retry(profile.retries)
        if stage in RESUMABLE_STAGES and self.deploy.generation_retries:
            task.set_retry(self.deploy.generation_retries, backoff_duration="30s")
        if stage == "resolve" and self.deploy.constitution_registry:
            task.set_env_variable("CAI_CONSTITUTION_REGISTRY", self.deploy.constitution_registry)
        secrets = self.deploy.secrets
        kubernetes.use_secret_as_env(task, secret_name=secrets.s3_secret, secret_key_to_env=secrets.s3_keys)
        kubernetes.use_secret_as_env(
            task, secret_name=secrets.mlflow_secret, secret_key_to_env=secrets.mlflow_keys, optional=True
        )
        kubernetes.use_config_map_as_env(
            task,
            config_map_name=secrets.s3_endpoint_configmap,
            config_map_key_to_env={
                "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3",
                "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
            },
            optional=True,
        )


def build_pipeline(defaults: PipelineParams | None = None, deploy: DeployConfig | None = None):
    """The KFP pipeline whose parameters default to `defaults` and whose tasks follow `deploy`."""
    defaults = defaults or PipelineParams()
    t = _Tasks(deploy or DeployConfig())
    names = list(PipelineParams.model_fields)

    def cai_pipeline(*args):
        params = dict(zip(names, args))
        run = t.op(stages.resolve_run, "resolve")(
            **params, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER
        )
        ctx = run.outputs["context"]
        constitution = run.outputs["pinned_constitution"]
        prompts = t.op(stages.prepare_prompts, "prepare_prompts")(context=ctx)
        with dsl.ParallelFor(
            prompts.outputs["Output"], parallelism=t.deploy.shard_parallelism, name="shards"
        ) as work:
            part = t.op(stages.critique_revise_shard, "critique_revise")(
                work=work, pinned_constitution=constitution, prompts=prompts.outputs["red_team_train"]
            )
        traces = t.op(stages.merge_traces, "merge")(context=ctx, parts=dsl.Collected(part.output))
        helpful = t.op(stages.helpful_samples, "helpful_samples")(
            context=ctx, prompts=prompts.outputs["helpful_train"]
        )
        sl = t.op(stages.sft, "sft")(
            context=ctx, traces=traces.outputs["traces"], helpful=helpful.outputs["samples"]
        )
        pairs = t.op(stages.sample_pairs, "sample_pairs")(
            context=ctx, prompts=prompts.outputs["red_team_train"], policy=sl.outputs["policy"]
        )
        labels = t.op(stages.label, "label")(
            context=ctx, pinned_constitution=constitution, pairs=pairs.outputs["pairs"]
        )
        pm = t.op(stages.train_pm, "train_pm")(context=ctx, labels=labels.outputs["labels"])
        rl = t.op(stages.rl, "rl")(
            context=ctx,
            red_team=prompts.outputs["red_team_train"],
            helpful=prompts.outputs["helpful_train"],
            labels=labels.outputs["labels"],
            policy=sl.outputs["policy"],
            reward_model=pm.outputs["reward_model"],
        )
        evaluation = t.op(stages.evaluate, "evaluate")(
            context=ctx,
            pinned_constitution=constitution,
            red_team=prompts.outputs["red_team_eval"],
            helpful=prompts.outputs["helpful_eval"],
            traces=traces.outputs["traces"],
            sl_policy=sl.outputs["policy"],
            rl_policy=rl.outputs["rl_policy"],
            reward_model=pm.outputs["reward_model"],
        )
        registered = t.op(stages.register, "register")(
            context=ctx,
            pinned_constitution=constitution,
            traces=traces.outputs["traces"],
            labels=labels.outputs["labels"],
            sl_policy=sl.outputs["policy"],
            rl_policy=rl.outputs["rl_policy"],
            reward_model=pm.outputs["reward_model"],
            results=evaluation.outputs["results"],
        )
        return registered.output

    cai_pipeline.__signature__ = pipeline_signature(defaults)
    cai_pipeline.__doc__ = pipeline_docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=cai_pipeline.__doc__.splitlines()[0])(cai_pipeline)


def compile_pipeline(
    out: str, defaults: PipelineParams | None = None, deploy: DeployConfig | None = None
) -> str:
    """Write the pipeline's IR YAML (what users upload in the Kubeflow UI); returns `out`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(defaults, deploy), package_path=out)
    return out
