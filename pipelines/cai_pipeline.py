"""The Constitutional AI pipeline: the DAG, built from the run and deploy config.

    resolve ─ prepare_prompts ─ ParallelFor(shard): generate_prompts ─ merge_candidates ─ select_prompts
        ─ ParallelFor(shard): critique_revise, helpful_samples ─ merge_traces, merge_helpful ─ sft
        ─ round 1: ParallelFor(shard): sample_pairs ─ label ─ merge_labels
            ─ train_pm ─ rl ─ ParallelFor(eval shard): answer_eval ─ merge_answers ─ evaluate ─ register
        ─ If(round 1 promoted): round 2 (pairs from round 1's RL policy, ...) ─ If(...): round 3 ...
    validate_labels (after resolve; train_pm waits for it): the labeller on held-out human
        comparisons, whose gate can stop the run
    plan_eval_shards (after prepare_prompts): evaluation's shards, sized by the held-out prompts
    train_reference_pm ─ rl_reference (after prepare_prompts): the human-feedback references that
        every round's evaluation rates beside CAI (`references.policies`; with none they pass on nothing)
    compare (in the last round, between evaluate and register): this run against the run
        compare_against names (cai retrain: the champion's run); register records it
    `rounds` rounds are unrolled when the pipeline is compiled (KFP has no loop over stages).
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

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple, get_args, get_origin

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

    def op(self, name: str, round_: int = 1) -> Callable:
        """A factory of tasks of stage `name` (in round `round_` of iterated CAI), configured from the
        stage table and the deploy config."""
        stage = BY_NAME[name]
        display = stage.display_name if round_ == 1 else f"{stage.display_name} (round {round_})"
        image = self.deploy.image_gpu if stage.gpu else self.deploy.image_cpu
        component = dsl.component(getattr(stages, stage.component), base_image=image, install_kfp_package=False)

        def make_task(**kwargs) -> dsl.PipelineTask:
            task = component(**kwargs)
            task.set_display_name(display)
            # Off: every stage keys its own output on content and reuses it (visibly, with an
            # MLflow record); KFP's cache would key on the per-run context and never hit.
            task.set_caching_options(False)
            if self.deploy.retries:
                task.set_retry(self.deploy.retries, backoff_duration="30s")
            self.resources(task, name)
            self.environment(task)
            return task

        return make_task

    def merge(self, name: str, context, part: dsl.PipelineTask, round_: int = 1):
        """The merge of fan-out `part`'s shard datasets (stage `merge_<name>`); returns the dataset."""
        later = {} if round_ == 1 else {"round": round_}
        task = self.op(f"merge_{name}", round_)(context=context, parts=dsl.Collected(part.output), name=name, **later)
        return task.outputs["merged"]

    def finish(self, experiment) -> dsl.PipelineTask:
        """The exit handler's task (not a stage: it closes the run whatever became of the stages,
        and completes a promotion the register step left half-done, as the promoter)."""
        return self.promoter(
            self.bookkeeping(
                stages.finish_run, "finish", run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, experiment=experiment
            )
        )

    def promoter(self, task: dsl.PipelineTask) -> dsl.PipelineTask:
        """Give `task` the promoter's MLflow credentials: only the tasks that promote get them."""
        secrets = self.deploy.secrets
        kubernetes.use_secret_as_env(
            task, secret_name=secrets.promoter_secret, secret_key_to_env=secrets.promoter_keys, optional=True
        )
        return task

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


class _Round(NamedTuple):
    """The tasks of one round of iterated CAI that the next round builds on."""

    reward_model: dsl.PipelineChannel
    rl_policy: dsl.PipelineChannel
    promoted: dsl.PipelineChannel


class _Run(NamedTuple):
    """What every round reads: the run's context, constitution, prompts and SL-CAI outputs."""

    ctx: dsl.PipelineChannel
    constitution: dsl.PipelineChannel
    shards: dsl.PipelineChannel
    red_team: dsl.PipelineChannel
    helpful: dsl.PipelineChannel
    red_team_eval: dsl.PipelineChannel
    helpful_eval: dsl.PipelineChannel
    eval_shards: dsl.PipelineChannel
    generated: dsl.PipelineChannel
    xstest: dsl.PipelineChannel
    traces: dsl.PipelineChannel
    sl_policy: dsl.PipelineChannel
    validation: dsl.PipelineTask
    references: dsl.PipelineChannel


def add_generated_prompts(t: _Tasks, ctx, prompts: dsl.PipelineTask) -> dsl.PipelineTask:
    """Generated prompts: candidates written few-shot from each kind's training prompts, one shard of
    requests per task, merged, filtered for near duplicates across shards and mixed with the human
    prompts (the task's outputs `red_team_train`, `helpful_train`, `generated`, and the work items of
    the fan-outs over the mixed prompts as its `Output`)."""
    outputs = prompts.outputs
    with dsl.ParallelFor(outputs["Output"], parallelism=t.deploy.shard_parallelism, name="prompt-shards") as work:
        part = t.op("generate_prompts")(
            work=work,
            red_team=outputs["red_team_train"],
            helpful=outputs["helpful_train"],
            red_team_eval=outputs["red_team_eval"],
            helpful_eval=outputs["helpful_eval"],
        )
    candidates = t.merge("candidates", ctx, part)
    return t.op("select_prompts")(
        context=ctx, candidates=candidates, red_team=outputs["red_team_train"], helpful=outputs["helpful_train"]
    )


def add_round(t: _Tasks, run: _Run, k: int, previous: _Round | None, last: bool) -> _Round:
    """Round `k` of iterated CAI: pairs sampled from the policy the round starts from (round 1: SL-CAI;
    round k: round k-1's RL-CAI), labelled, a PM trained on them (continued from round k-1's when the
    run says so), RL continued from that policy, every policy so far evaluated, and the round's
    models registered and gated. Every task of a later round carries `round` and a display name
    that says it. The `last` round compares the run, whose final policy it has just evaluated,
    with the run `compare_against` names, before it registers: its versions and gate reason then
    record the comparison."""
    start = run.sl_policy if previous is None else previous.rl_policy
    later = {} if k == 1 else {"round": k}
    suffix = "" if k == 1 else f"-round-{k}"
    with dsl.ParallelFor(
        run.shards, parallelism=t.deploy.shard_parallelism, name=f"feedback-shards{suffix}"
    ) as work:
        pairs = t.op("sample_pairs", k)(work=work, prompts=run.red_team, policy=start, **later)
        label_part = t.op("label", k)(
            work=work,
            pinned_constitution=run.constitution,
            pairs=pairs.outputs["pairs"],
            **({} if previous is None else {"labeller": start}),
            **later,
        )
    labels = t.merge("labels", run.ctx, label_part, k)
    pm = t.op("train_pm", k)(
        context=run.ctx,
        labels=labels,
        **({} if previous is None else {"previous_pm": previous.reward_model}),
        **later,
    )
    if previous is None:
        pm.after(run.validation)
    rl = t.op("rl", k)(
        context=run.ctx,
        red_team=run.red_team,
        helpful=run.helpful,
        labels=labels,
        policy=start,
        reward_model=pm.outputs["reward_model"],
        **later,
    )
    with dsl.ParallelFor(
        run.eval_shards, parallelism=t.deploy.shard_parallelism, name=f"eval-shards{suffix}"
    ) as work:
        answer_part = t.op("answer_eval", k)(
            work=work,
            pinned_constitution=run.constitution,
            red_team=run.red_team_eval,
            helpful=run.helpful_eval,
            xstest=run.xstest,
            sl_policy=run.sl_policy,
            rl_policy=rl.outputs["rl_policy"],
            references=run.references,
            **later,
        )
    answers = t.merge("answers", run.ctx, answer_part, k)
    evaluation = t.op("evaluate", k)(
        context=run.ctx,
        pinned_constitution=run.constitution,
        red_team=run.red_team_eval,
        helpful=run.helpful_eval,
        xstest=run.xstest,
        traces=run.traces,
        sl_policy=run.sl_policy,
        rl_policy=rl.outputs["rl_policy"],
        reward_model=pm.outputs["reward_model"],
        answers=answers,
        generated=run.generated,
        references=run.references,
        **later,
    )
    compared = {}
    if last:
        comparison = t.op("compare", k)(context=run.ctx, **later).after(evaluation)
        compared = {"comparison": comparison.outputs["comparison"]}
    register = t.op("register", k)(
        context=run.ctx,
        pinned_constitution=run.constitution,
        traces=run.traces,
        labels=labels,
        sl_policy=run.sl_policy,
        rl_policy=rl.outputs["rl_policy"],
        reward_model=pm.outputs["reward_model"],
        results=evaluation.outputs["results"],
        start_policy=start,
        **({} if previous is None else {"previous_pm": previous.reward_model}),
        **compared,
        **later,
    )
    t.promoter(register)
    return _Round(pm.outputs["reward_model"], rl.outputs["rl_policy"], register.output)


def build_pipeline(defaults: PipelineParams | None = None, deploy: DeployConfig | None = None):
    """The KFP pipeline whose parameters default to `defaults` and whose tasks follow `deploy`, with
    `defaults.rounds` rounds of iterated CAI unrolled: round k+1 runs inside a `dsl.If` on round
    k's promotion, so a round the gate refuses ends the run and the champion stays the last
    promoted round's."""
    defaults = defaults or PipelineParams()
    t = _Tasks(deploy or DeployConfig())
    names = list(PipelineParams.model_fields)

    def cai_pipeline(*args):
        params = dict(zip(names, args))
        finish = t.finish(params["experiment"])
        with dsl.ExitHandler(finish, name="run"):
            resolved = t.op("resolve")(
                **params,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                compiled_rounds=defaults.rounds,
            )
            ctx = resolved.outputs["context"]
            constitution = resolved.outputs["pinned_constitution"]
            prompts = t.op("prepare_prompts")(context=ctx)
            mixed = add_generated_prompts(t, ctx, prompts)
            red_team, helpful = mixed.outputs["red_team_train"], mixed.outputs["helpful_train"]
            shards = mixed.outputs["Output"]
            with dsl.ParallelFor(shards, parallelism=t.deploy.shard_parallelism, name="sl-shards") as work:
                trace_part = t.op("critique_revise")(
                    work=work, pinned_constitution=constitution, prompts=red_team
                )
                helpful_part = t.op("helpful_samples")(work=work, prompts=helpful)
            traces = t.merge("traces", ctx, trace_part)
            samples = t.merge("helpful", ctx, helpful_part)
            sl = t.op("sft")(context=ctx, traces=traces, helpful=samples)
            reference_pms = t.op("train_reference_pm")(context=ctx)
            references = t.op("rl_reference")(
                context=ctx, red_team=red_team, helpful=helpful, reward_models=reference_pms.outputs["reward_models"]
            ).outputs["policies"]
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
            # Needs only the run: on a cluster it runs beside SL-CAI, and its gate stops the run
            # before the preference model trains on labels that agree with no human.
            validation = t.op("validate_labels")(context=ctx, pinned_constitution=constitution)
            run = _Run(
                ctx,
                constitution,
                shards,
                red_team,
                helpful,
                red_team_eval,
                helpful_eval,
                eval_shards.output,
                mixed.outputs["generated"],
                xstest,
                traces,
                sl.outputs["policy"],
                validation,
                references,
            )
            with contextlib.ExitStack() as later_rounds:
                previous = add_round(t, run, 1, None, defaults.rounds == 1)
                for k in range(2, defaults.rounds + 1):
                    later_rounds.enter_context(dsl.If(previous.promoted == True, name=f"round-{k}"))  # noqa: E712
                    previous = add_round(t, run, k, previous, k == defaults.rounds)
        return finish.output

    cai_pipeline.__signature__ = pipeline_signature(defaults)
    cai_pipeline.__doc__ = pipeline_docstring()
    with _container_checks_without_stack():
        return dsl.pipeline(name=PIPELINE_NAME, description=cai_pipeline.__doc__.splitlines()[0])(
            cai_pipeline
        )


@contextlib.contextmanager
def _container_checks_without_stack() -> Iterator[None]:
    """While the block builds a pipeline, kfp's task setters check their task the cheap way.

    Each setter kfp gives a task (set_cpu_limit, set_env_variable, add_node_selector_constraint...)
    first calls `PipelineTask._ensure_container_spec_exists`, which takes its caller's name for an
    error message from `inspect.stack()` (kfp 2.17, kfp/dsl/pipeline_task.py). That reads the source
    of every frame on the stack, and under a deep stack costs about 75 ms a call: 140 calls, 10 s
    of CPU for one compile under pytest. The replacement takes the same name from the caller's
    frame and makes the same check."""
    from kfp.dsl.pipeline_task import PipelineTask

    def ensure_container_spec_exists(task: PipelineTask) -> None:
        if task.container_spec is None:
            caller_method_name = sys._getframe(1).f_code.co_name
            raise ValueError(
                f"{caller_method_name} can only be used on single-step components, not pipelines used as "
                "components, or special components like importers."
            )

    original = PipelineTask._ensure_container_spec_exists
    PipelineTask._ensure_container_spec_exists = ensure_container_spec_exists
    try:
        yield
    finally:
        PipelineTask._ensure_container_spec_exists = original


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
