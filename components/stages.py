"""One Kubeflow component per pipeline stage. Each body parses its inputs, calls one function of
`cai_lib.steps`, and writes its outputs; all logic lives in `cai_lib`.

These are plain functions: `pipelines.cai_pipeline` turns them into KFP components with the
image of their kind (CPU or GPU) taken from the deploy config. KFP embeds each function's source
in the pod's command, so every import is inside the body.
"""

from typing import NamedTuple, Optional

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output, PipelineTaskFinalStatus


def resolve_run(
    constitution: str,
    base_model: str,
    feedback_model: str,
    judge_model: str,
    prompt_model: str,
    red_team_prompts: str,
    helpful_prompts: str,
    red_team_eval_prompts: str,
    helpful_eval_prompts: str,
    human_preferences: str,
    human_preference_kind: str,
    num_red_team: int,
    num_helpful: int,
    num_human: int,
    eval_fraction: float,
    seed: int,
    num_shards: int,
    rows_per_shard: int,
    run_name: str,
    experiment: str,
    rounds: int,
    model_name_prefix: str,
    compare_against: str,
    generate_prompts: dict,
    critique_revise: dict,
    helpful_samples: dict,
    sft: dict,
    sample_pairs: dict,
    label: dict,
    validate_labels: dict,
    gates: dict,
    train_pm: dict,
    rl: dict,
    evaluate: dict,
    references: dict,
    promotion: dict,
    iteration: dict,
    run_id: str,
    kfp_run_name: str,
    compiled_rounds: int,
    pinned_constitution: Output[Artifact],
) -> NamedTuple("Outputs", context=dict):
    """Validate the run parameters, pin the constitution, run the pre-flight checks, open the
    MLflow parent run (keyed on the KFP run id; the run name is its display name). `compiled_rounds`
    is the rounds of iterated CAI unrolled into this pipeline; a run asking for others is refused.

    The output is named `context`, not the default `Output`: kfp.local resolves a ParallelFor
    body's inputs by output name, and the fan-out's items are prepare_prompts' `Output`.
    """
    params = {
        k: v
        for k, v in locals().items()
        if k not in ("run_id", "kfp_run_name", "compiled_rounds", "pinned_constitution")
    }

    from cai_lib.steps.resolve import resolve

    return (resolve(params, run_id, kfp_run_name, pinned_constitution.path, compiled_rounds),)


def prepare_prompts(
    context: dict,
    red_team_train: Output[Dataset],
    red_team_eval: Output[Dataset],
    helpful_train: Output[Dataset],
    helpful_eval: Output[Dataset],
    xstest: Output[Dataset],
) -> list[dict]:
    """Read, deduplicate and split the prompt sets, and read XSTest's; returns the work items of
    the generation fan-outs over the training prompts."""
    from cai_lib.steps.prepare_prompts import fan_out
    from cai_lib.steps.prepare_prompts import prepare_prompts as prepare_prompts_step

    refs = prepare_prompts_step(context)
    for name, artifact in (
        ("red_team_train", red_team_train),
        ("red_team_eval", red_team_eval),
        ("helpful_train", helpful_train),
        ("helpful_eval", helpful_eval),
        ("xstest", xstest),
    ):
        artifact.metadata.update(refs[name].write(artifact.path))
    return fan_out(context, refs["red_team_train"].rows)


def plan_eval_shards(
    context: dict, red_team: Input[Dataset], helpful: Input[Dataset], xstest: Input[Dataset]
) -> list[dict]:
    """The work items of evaluation's fan-out, sized by the held-out and XSTest prompts (not a
    stage: it reads three row counts). A task of its own because kfp.local iterates a ParallelFor only over a
    task's single `Output`, which prepare_prompts' holds the training fan-out's items."""
    from cai_lib.steps.prepare_prompts import eval_fan_out

    return eval_fan_out(context, red_team.path, helpful.path, xstest.path)


def generate_prompts_shard(
    work: dict,
    red_team: Input[Dataset],
    helpful: Input[Dataset],
    red_team_eval: Input[Dataset],
    helpful_eval: Input[Dataset],
) -> str:
    """Candidate prompts written few-shot from each kind's training prompts, for one shard of the
    generation requests, each judged by the filters that look at one candidate; returns its DataRef."""
    from cai_lib.steps.generate_prompts import generate_prompts_shard as generate_prompts_shard_step

    return generate_prompts_shard_step(
        work["context"],
        {"red_team": red_team.path, "helpful": helpful.path},
        {"red_team": red_team_eval.path, "helpful": helpful_eval.path},
        int(work["shard"]),
        int(work["shards"]),
    ).model_dump_json()


def select_prompts(
    context: dict,
    candidates: Input[Dataset],
    red_team: Input[Dataset],
    helpful: Input[Dataset],
    generated: Output[Dataset],
    red_team_train: Output[Dataset],
    helpful_train: Output[Dataset],
    metrics: Output[Metrics],
) -> list[dict]:
    """Drop generated prompts that nearly duplicate another, mix the kept ones into each kind's
    training prompts; returns the work items of the generation fan-outs over the mixed prompts."""
    from cai_lib.steps.generate_prompts import select_prompts as select_prompts_step
    from cai_lib.steps.prepare_prompts import fan_out

    refs, counts = select_prompts_step(context, candidates.path, {"red_team": red_team.path, "helpful": helpful.path})
    for name, artifact in (("generated", generated), ("red_team_train", red_team_train), ("helpful_train", helpful_train)):
        artifact.metadata.update(refs[name].write(artifact.path))
    for kind, row in counts.items():
        for key, value in row.items():
            metrics.log_metric(f"{kind}.{key}", value)
    return fan_out(context, refs["red_team_train"].rows)


def critique_revise_shard(work: dict, pinned_constitution: Input[Artifact], prompts: Input[Dataset]) -> str:
    """SL-CAI critique→revision on one shard of the red-team prompts; returns the shard's DataRef.

    `work` is one fan-out item, {"context": ..., "shard": i, "shards": n}: the run context travels
    inside the item because kfp.local replaces every task-output parameter of a ParallelFor body
    by the item.
    """
    from cai_lib.steps.critique_revise import critique_revise_shard as critique_revise_shard_step

    return critique_revise_shard_step(
        work["context"], pinned_constitution.path, prompts.path, int(work["shard"]), int(work["shards"])
    ).model_dump_json()


def helpful_samples_shard(work: dict, prompts: Input[Dataset]) -> str:
    """The base model's answers to one shard of the helpfulness prompts; returns its DataRef."""
    from cai_lib.steps.helpful_samples import helpful_samples

    return helpful_samples(
        work["context"], prompts.path, int(work["shard"]), int(work["shards"])
    ).model_dump_json()


def merge_shards(context: dict, parts: list, name: str, merged: Output[Dataset], round: int = 1):
    """Merge a fan-out's shard datasets into one, rows in id order (the same at any shard count)."""
    from cai_lib.steps.merge import merge

    merged.metadata.update(merge(context, parts, name, round).write(merged.path))


def sft(
    context: dict,
    traces: Input[Dataset],
    helpful: Input[Dataset],
    policy: Output[Model],
    metrics: Output[Metrics],
):
    """Supervised fine-tuning on the revisions: the SL-CAI policy."""
    from cai_lib.steps.sft import sft as sft_step

    ref, values = sft_step(context, traces.path, helpful.path)
    policy.metadata.update(ref.write(policy.path))
    for key, value in values.items():
        metrics.log_metric(key, value)


def sample_pairs_shard(
    work: dict, prompts: Input[Dataset], policy: Input[Model], pairs: Output[Dataset], round: int = 1
):
    """Two answers per red-team prompt of one shard, from the SL-CAI policy (in a later round of
    iterated CAI, the round before's RL-CAI policy)."""
    from cai_lib.steps.sample_pairs import sample_pairs

    ref = sample_pairs(
        work["context"], prompts.path, policy.path, int(work["shard"]), int(work["shards"]), round
    )
    pairs.metadata.update(ref.write(pairs.path))


def label_shard(
    work: dict,
    pinned_constitution: Input[Artifact],
    pairs: Input[Dataset],
    labeller: Optional[Input[Model]] = None,
    round: int = 1,
) -> str:
    """AI feedback on one shard's pairs: soft preference labels; returns the shard's DataRef. In a
    later round, `labeller` is the round before's policy, which labels when the run says so."""
    from cai_lib.steps.label import label

    return label(
        work["context"],
        pinned_constitution.path,
        pairs.path,
        int(work["shard"]),
        labeller.path if labeller else None,
        round,
    ).model_dump_json()


def validate_labels(context: dict, pinned_constitution: Input[Artifact], metrics: Output[Metrics]):
    """The feedback labeller, as training uses it, scored on held-out human comparisons; stops the
    run when gates.min_label_accuracy is set and not met."""
    from cai_lib.steps.validate_labels import validate_labels as validate_labels_step

    for key, value in validate_labels_step(context, pinned_constitution.path).items():
        metrics.log_metric(key, value)


def train_pm(
    context: dict,
    labels: Input[Dataset],
    reward_model: Output[Model],
    metrics: Output[Metrics],
    previous_pm: Optional[Input[Model]] = None,
    round: int = 1,
):
    """The preference model on AI harmlessness labels mixed with human pairs (in a later round,
    continued from the round before's PM when the run says so)."""
    from cai_lib.steps.train_pm import train_pm as train_pm_step

    ref, values = train_pm_step(context, labels.path, previous_pm.path if previous_pm else None, round)
    reward_model.metadata.update(ref.write(reward_model.path))
    for key, value in values.items():
        metrics.log_metric(key, value)


def rl(
    context: dict,
    red_team: Input[Dataset],
    helpful: Input[Dataset],
    labels: Input[Dataset],
    policy: Input[Model],
    reward_model: Input[Model],
    rl_policy: Output[Model],
    metrics: Output[Metrics],
    round: int = 1,
):
    """RL-CAI: the SL-CAI policy (in a later round, the round before's RL-CAI policy) optimised
    against the preference model."""
    from cai_lib.steps.rl import rl as rl_step

    ref, values = rl_step(
        context, red_team.path, helpful.path, labels.path, policy.path, reward_model.path, round
    )
    rl_policy.metadata.update(ref.write(rl_policy.path))
    for key, value in values.items():
        metrics.log_metric(key, value)


def train_reference_pm(context: dict, reward_models: Output[Artifact]):
    """The PMs of the human-feedback references (references.policies) on human pairs only."""
    from cai_lib.steps.references import train_reference_pms, write_references

    write_references(train_reference_pms(context), reward_models.path)


def rl_reference(
    context: dict,
    red_team: Input[Dataset],
    helpful: Input[Dataset],
    reward_models: Input[Artifact],
    policies: Output[Artifact],
):
    """The human-feedback reference policies: the base model optimised against each reference PM."""
    from cai_lib.steps.references import train_reference_policies, write_references

    refs = train_reference_policies(context, red_team.path, helpful.path, reward_models.path)
    write_references(refs, policies.path)


def answer_eval_shard(
    work: dict,
    pinned_constitution: Input[Artifact],
    red_team: Input[Dataset],
    helpful: Input[Dataset],
    xstest: Input[Dataset],
    sl_policy: Input[Model],
    rl_policy: Input[Model],
    references: Input[Artifact],
    round: int = 1,
) -> str:
    """Every evaluated policy's answers to one shard of the held-out and XSTest prompts; returns
    its DataRef."""
    from cai_lib.steps.answer_eval import answer_eval

    return answer_eval(
        work["context"],
        pinned_constitution.path,
        red_team.path,
        helpful.path,
        xstest.path,
        sl_policy.path,
        rl_policy.path,
        int(work["shard"]),
        int(work["shards"]),
        round,
        references.path,
    ).model_dump_json()


def evaluate(
    context: dict,
    pinned_constitution: Input[Artifact],
    red_team: Input[Dataset],
    helpful: Input[Dataset],
    xstest: Input[Dataset],
    traces: Input[Dataset],
    sl_policy: Input[Model],
    rl_policy: Input[Model],
    reward_model: Input[Model],
    answers: Input[Dataset],
    generated: Input[Dataset],
    references: Input[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    results: Output[Artifact],
    round: int = 1,
):
    """Base vs SL-CAI vs RL-CAI (each round's, in iterated CAI, with the human-feedback references
    and the registered champion), judged on their answers: metrics and the HTML report (which also
    shows the generated prompts)."""
    from cai_lib.steps.evaluate import evaluate as evaluate_step

    values = evaluate_step(
        context,
        pinned_constitution.path,
        red_team.path,
        helpful.path,
        xstest.path,
        traces.path,
        sl_policy.path,
        rl_policy.path,
        reward_model.path,
        answers.path,
        report.path,
        results.path,
        generated.path,
        round,
        references.path,
    )
    for key, value in values.items():
        metrics.log_metric(key, value)


def compare_runs(context: dict, report: Output[HTML], comparison: Output[Artifact], round: int = 1):
    """This run, evaluated in its last round, against the run compare_against names (the one that
    made the champion it challenges, in a retrain): the comparison page, and a pointer to it for
    registration."""
    from cai_lib.steps.compare import compare

    compare(context, report.path, comparison.path, round)


def register(
    context: dict,
    pinned_constitution: Input[Artifact],
    traces: Input[Dataset],
    labels: Input[Dataset],
    sl_policy: Input[Model],
    rl_policy: Input[Model],
    reward_model: Input[Model],
    results: Input[Artifact],
    start_policy: Input[Model],
    previous_pm: Optional[Input[Model]] = None,
    comparison: Optional[Input[Artifact]] = None,
    round: int = 1,
) -> bool:
    """Register PM, SL-CAI and RL-CAI in MLflow with lineage (each round's, with its round and
    parent); run the promotion gate. Returns whether the round passed (its policy was promoted, or
    the champion already continues it): a later round runs only then. The last round gets the
    compare step's pointer (`comparison`), which its versions and gate reason record."""
    import json

    from cai_lib.steps.register import register as register_step

    summary = register_step(
        context,
        pinned_constitution.path,
        traces.path,
        labels.path,
        sl_policy.path,
        rl_policy.path,
        reward_model.path,
        results.path,
        round,
        start_policy.path,
        previous_pm.path if previous_pm else None,
        comparison.path if comparison else "",
    )
    return bool(json.loads(summary)["passed"])


def impact_preview(constitution: str, against: str, top: int, report: Output[HTML], impact: Output[Artifact]) -> str:
    """The impact pipeline's one step: the pairs of run `against` relabelled under `constitution`
    (`cai impact`); the page, the preview as JSON, and its overall flips as the output."""
    import json

    from cai_lib.steps.impact import preview

    return json.dumps(preview(constitution, against, top, report.path, impact.path))


def finish_run(run_id: str, experiment: str, status: PipelineTaskFinalStatus) -> str:
    """Exit handler: close the MLflow parent run (FAILED unless the run succeeded) and release any
    promotion lock the run holds; runs after every other step, whatever became of them. Returns
    the run's summary as JSON (the pipeline's output)."""
    from cai_lib.steps.finish import finish

    summary = finish(run_id, experiment, status.state, status.error_message or "")
    print(summary)
    return summary
