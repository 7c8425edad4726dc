"""The Constitutional AI pipeline: the DAG, built from the run and deploy config.

    resolve ─ prepare_prompts ─ ParallelFor(shard): critique_revise, helpful_samples
        ─ merge_traces, merge_helpful ─ sft
        ─ ParallelFor(shard): sample_pairs ─ label ─ merge_labels
        ─ train_pm ─ rl ─ ParallelFor(eval shard): answer_eval ─ merge_answers ─ evaluate ─ compare ─ register
    validate_labels (after resolve; train_pm waits for it): the labeller on held-out human
        comparisons, whose gate can stop the run
    plan_eval_shards (after prepare_prompts): evaluation's shards, sized by the held-out prompts
    compare: this run against the run compare_against names (cai retrain: the champion's run)
    exit handler: finish (closes the MLflow run, releases promotion locks)

Every field of `PipelineParams` is one pipeline parameter (stage sections are `dict` parameters),
so the Kubeflow UI's run form, `cai run --set` and MLflow's params are the same names. Per-stage
resources, images and secrets come from `DeployConfig` when the pipeline is compiled: GPU stages
get an accelerator, a node selector and tolerations; CPU stages get none. Where the artifacts
and MLflow live is not a parameter: every task reads it from the installation's ConfigMap, so
the compiled pipeline runs as uploaded. The stages, their components and kinds come from
`cai_lib.core.stage_table`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args, get_origin

from kfp import dsl, kubernetes
from pydantic import BaseModel

from cai_lib.core.config import PLATFORM_ENV
from cai_lib.core.deploy import DeployConfig
from cai_lib.core.stage_table import BY_NAME, STAGES
from cai_lib.engines.trainjob import TRAINJOB_ENV, plan_of
from cai_lib.platform.run_config import PipelineParams, params_as_pipeline_arguments
from components import stages

PIPELINE_NAME = "constitutional-ai"
TYPES = {str: str, int: int, float: float, bool: bool}
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _annotation(field) -> type:
    if get_origin(field.annotation) is Literal:  # a choice: the type of its values
        return type(get_args(field.annotation)[0])
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


def _limits(field) -> list[str]:
    return [
        f"{symbol} {getattr(m, attr)}"
        for m in field.metadata
        for attr, symbol in BOUNDS.items()
        if hasattr(m, attr)
    ]


def _section_doc(name: str, model: type[BaseModel]) -> list[str]:
    """A stage section's parameter doc: what it configures, then each field with type, default,
    limits and description (the Kubeflow UI shows it beside the run form)."""
    users = [s.name for s in STAGES if s.settings == name]
    lines = [f"    {name}: Settings of the {', '.join(users) or name} stage(s), a dict of:"]
    for key, field in model.model_fields.items():
        kind = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
        default = field.get_default(call_default_factory=True)
        shown = "derived from seed unless given" if key == "seed" else repr(default)
        facts = ", ".join([kind, *_limits(field), f"default {shown}"])
        lines.append(f"        {key} ({facts}): {field.description or ''}".rstrip())
    return lines


def pipeline_docstring() -> str:
    """The pipeline's docstring: one Args entry per parameter, with its limits; stage sections list
    every field. KFP turns it into the parameter descriptions the UI shows."""
    lines = [
        "Constitutional AI: SL-CAI, AI feedback, preference model, RL-CAI, evaluation, registration.",
        "",
        "Args:",
    ]
    for name, field in PipelineParams.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            lines += _section_doc(name, field.annotation)
            continue
        limits = _limits(field)
        lines.append(f"    {name}: {field.description}{' (' + ', '.join(limits) + ')' if limits else ''}")
    return "\n".join(lines)


class _Tasks:
    """Turns component functions into KFP components and applies the deploy config to tasks.

    Components do not `pip install kfp` when they start (`install_kfp_package=False`): the
    project's images install it with the package (kfp is pinned in its dependencies), so the
    install could only repeat it, at every pod start, and needs a package index that an
    air-gapped cluster does not have; `kfp.local` ran that pip in every task."""

    def __init__(self, deploy: DeployConfig):
        self.deploy = deploy

    def op(self, name: str) -> Callable:
        """A factory of tasks of stage `name`, configured from the stage table and the deploy config."""
        stage = BY_NAME[name]
        image = self.deploy.image_gpu if stage.gpu else self.deploy.image_cpu
        component = dsl.component(getattr(stages, stage.component), base_image=image, install_kfp_package=False)

        def make_task(**kwargs) -> dsl.PipelineTask:
            task = component(**kwargs)
            task.set_display_name(stage.display_name)
            # Off: every stage keys its own output on content and reuses it (visibly, with an
            # MLflow record); KFP's cache would key on the per-run context and never hit.
            task.set_caching_options(False)
            if self.deploy.retries:
                task.set_retry(self.deploy.retries, backoff_duration="30s")
            self.resources(task, name)
            self.environment(task)
            return task

        return make_task

    def merge(self, name: str, context, part: dsl.PipelineTask):
        """The merge of fan-out `part`'s shard datasets (stage `merge_<name>`); returns the dataset."""
        task = self.op(f"merge_{name}")(context=context, parts=dsl.Collected(part.output), name=name)
        return task.outputs["merged"]

    def finish(self, experiment) -> dsl.PipelineTask:
        """The exit handler's task (not a stage: it closes the run whatever became of the stages)."""
        return self.bookkeeping(
            stages.finish_run, "finish", run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment
        )

    def bookkeeping(self, function: Callable, display_name: str, **kwargs) -> dsl.PipelineTask:
        """A task that is not a stage (no output of its own, no MLflow record) on the CPU image."""
        task = dsl.component(function, base_image=self.deploy.image_cpu, install_kfp_package=False)(**kwargs)
        task.set_display_name(display_name)
        task.set_caching_options(False)
        if self.deploy.retries:
            task.set_retry(self.deploy.retries, backoff_duration="30s")
        self.environment(task)
        return task

    def resources(self, task: dsl.PipelineTask, name: str) -> None:
        profile = self.deploy.resources.get(name)
        if profile is None:
            return
        plan = plan_of(name, self.deploy)
        if plan is not None:
            # The TrainJob's nodes hold the accelerators; this pod only launches and watches it.
            task.set_env_variable(TRAINJOB_ENV, plan.model_dump_json())
            task.set_cpu_request("500m")
            task.set_memory_request("1Gi")
            return
        if profile.wants_gpu and profile.shm_size:
            # NCCL and data loaders share memory through /dev/shm; a container's own is 64 MiB.
            kubernetes.empty_dir_mount(
                task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=profile.shm_size
            )
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

    def environment(self, task: dsl.PipelineTask) -> None:
        """Secrets, and the installation's settings (artifact root, MLflow URI, S3 endpoint) from its ConfigMap."""
        if self.deploy.constitution_registry:
            task.set_env_variable("CAI_CONSTITUTION_REGISTRY", self.deploy.constitution_registry)
        secrets = self.deploy.secrets
        kubernetes.use_secret_as_env(task, secret_name=secrets.s3_secret, secret_key_to_env=secrets.s3_keys)
        kubernetes.use_secret_as_env(
            task, secret_name=secrets.mlflow_secret, secret_key_to_env=secrets.mlflow_keys, optional=True
        )
        # Gated or private Hugging Face models: any step may download one (resolve pins them).
        kubernetes.use_secret_as_env(
            task, secret_name=secrets.hf_secret, secret_key_to_env=secrets.hf_keys, optional=True
        )
        kubernetes.use_config_map_as_env(
            task,
            config_map_name=secrets.env_configmap,
            config_map_key_to_env={name: name for name in PLATFORM_ENV},
            optional=True,
        )


def build_pipeline(defaults: PipelineParams | None = None, deploy: DeployConfig | None = None):
    """The KFP pipeline whose parameters default to `defaults` and whose tasks follow `deploy`."""
    defaults = defaults or PipelineParams()
    t = _Tasks(deploy or DeployConfig())
    names = list(PipelineParams.model_fields)

    def cai_pipeline(*args):
        params = dict(zip(names, args))
        finish = t.finish(params["experiment"])
        with dsl.ExitHandler(finish, name="run"):
            run = t.op("resolve")(
                **params,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            )
            ctx = run.outputs["context"]
            constitution = run.outputs["pinned_constitution"]
            prompts = t.op("prepare_prompts")(context=ctx)
            red_team, helpful = prompts.outputs["red_team_train"], prompts.outputs["helpful_train"]
            shards = prompts.outputs["Output"]
            with dsl.ParallelFor(shards, parallelism=t.deploy.shard_parallelism, name="sl-shards") as work:
                trace_part = t.op("critique_revise")(
                    work=work, pinned_constitution=constitution, prompts=red_team
                )
                helpful_part = t.op("helpful_samples")(work=work, prompts=helpful)
            traces = t.merge("traces", ctx, trace_part)
            samples = t.merge("helpful", ctx, helpful_part)
            sl = t.op("sft")(context=ctx, traces=traces, helpful=samples)
            with dsl.ParallelFor(shards, parallelism=t.deploy.shard_parallelism, name="feedback-shards") as work:
                pairs = t.op("sample_pairs")(work=work, prompts=red_team, policy=sl.outputs["policy"])
                label_part = t.op("label")(
                    work=work, pinned_constitution=constitution, pairs=pairs.outputs["pairs"]
                )
            labels = t.merge("labels", ctx, label_part)
            # Needs only the run: on a cluster it runs beside SL-CAI, and its gate stops the run
            # before the preference model trains on labels that agree with no human.
            validation = t.op("validate_labels")(context=ctx, pinned_constitution=constitution)
            pm = t.op("train_pm")(context=ctx, labels=labels).after(validation)
            rl = t.op("rl")(
                context=ctx,
                red_team=red_team,
                helpful=helpful,
                labels=labels,
                policy=sl.outputs["policy"],
                reward_model=pm.outputs["reward_model"],
            )
            red_team_eval, helpful_eval = prompts.outputs["red_team_eval"], prompts.outputs["helpful_eval"]
            xstest = prompts.outputs["xstest"]
            eval_shards = t.bookkeeping(
                stages.plan_eval_shards,
                "plan eval shards",
                context=ctx,
                red_team=red_team_eval,
                helpful=helpful_eval,
                xstest=xstest,
            )
            with dsl.ParallelFor(
                eval_shards.output, parallelism=t.deploy.shard_parallelism, name="eval-shards"
            ) as work:
                answer_part = t.op("answer_eval")(
                    work=work,
                    pinned_constitution=constitution,
                    red_team=red_team_eval,
                    helpful=helpful_eval,
                    xstest=xstest,
                    sl_policy=sl.outputs["policy"],
                    rl_policy=rl.outputs["rl_policy"],
                )
            answers = t.merge("answers", ctx, answer_part)
            evaluation = t.op("evaluate")(
                context=ctx,
                pinned_constitution=constitution,
                red_team=red_team_eval,
                helpful=helpful_eval,
                xstest=xstest,
                traces=traces,
                sl_policy=sl.outputs["policy"],
                rl_policy=rl.outputs["rl_policy"],
                reward_model=pm.outputs["reward_model"],
                answers=answers,
            )
            comparison = t.op("compare")(context=ctx).after(evaluation)
            t.op("register")(
                context=ctx,
                pinned_constitution=constitution,
                traces=traces,
                labels=labels,
                sl_policy=sl.outputs["policy"],
                rl_policy=rl.outputs["rl_policy"],
                reward_model=pm.outputs["reward_model"],
                results=evaluation.outputs["results"],
                comparison=comparison.outputs["comparison"],
            )
        return finish.output

    cai_pipeline.__signature__ = pipeline_signature(defaults)
    cai_pipeline.__doc__ = pipeline_docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=cai_pipeline.__doc__.splitlines()[0])(cai_pipeline)


def compile_pipeline(
    out: str, defaults: PipelineParams | None = None, deploy: DeployConfig | None = None
) -> str:
    """Write the pipeline's IR YAML (what users upload in the Kubeflow UI); returns `out`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(defaults, deploy), package_path=out)
    _sorted_header(Path(out))
    return out


def _sorted_header(path: Path) -> None:
    """Rewrite the comment kfp heads the file with, from the file's own (sorted) YAML body.

    kfp writes the body with sorted keys, but the header's `[Default: {...}]` of each dict
    parameter in the order of a protobuf map, which changes from one process to the next: the
    same pipeline compiled twice would differ. The header is rebuilt with kfp's own function from
    the body's data with every mapping's keys in order, so the file is the same on every run.
    """
    import json

    import yaml
    from kfp.compiler.pipeline_spec_builder import extract_comments_from_pipeline_spec

    lines = path.read_text().splitlines(keepends=True)
    start = next(number for number, line in enumerate(lines) if not line.startswith("#"))
    body = "".join(lines[start:])
    spec = json.loads(json.dumps(next(yaml.safe_load_all(body)), sort_keys=True))
    path.write_text(extract_comments_from_pipeline_spec(spec, spec["pipelineInfo"].get("description")) + body)
