"""The evaluate step: the judged evaluation, the report, and the pointer the register step reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from cai_lib.core.names import (
    BASE,
    CHAMPION_POLICY,
    EVAL_DEPENDENT_JUDGE_TAG,
    EVAL_JUDGE_IS_LABELLER_TAG,
    EVAL_JUDGE_TAG,
    EVAL_WARNING_TAG,
    PM,
    REPORT_FILE,
    RL_CAI,
    SL_CAI,
)
from cai_lib.core.outputs import OutputMarker
from cai_lib.core.records import PromptRecord, Trace
from cai_lib.core.shards import read_dataset
from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import StageRun
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, pinned_constitution
from cai_lib.steps.policies import evaluated_policies
from cai_lib.steps.references import read_references
from cai_lib.steps.stage_runs import produce, run_summary, source_tags
from cai_lib.steps.validate_labels import run_validation_of

if TYPE_CHECKING:
    from cai_lib.method.generate_prompts import GeneratedPrompts


def generated_prompts(generated: str | None, config) -> GeneratedPrompts | None:
    """The report's view of the run's generated prompts (DataRef file `generated`), if any."""
    from cai_lib.core.records import GeneratedPrompt
    from cai_lib.method.generate_prompts import generated_view

    if not generated:
        return None
    ref = DataRef.read(generated)
    rows = list(read_dataset(ref.uri, GeneratedPrompt))
    return generated_view(rows, ref.uri, config.num_samples_in_report, config.seed) if rows else None


@one_line_errors
def evaluate(
    context: dict,
    constitution_path: str,
    red_team: str,
    helpful: str,
    xstest: str,
    traces: str,
    sl_policy: str,
    rl_policy: str,
    reward_model: str,
    answers: str,
    report_path: str,
    results_path: str,
    generated: str | None = None,
    round_: int = 1,
    references: str | None = None,
) -> dict[str, float]:
    """Judge the policies' answers (`answers`, the merged `answer_eval` shards) on the held-out
    prompts and on XSTest's (`xstest`): PM scores, evasiveness, XSTest refusals, win rates and Elo
    of base, SL-CAI, the human-feedback `references`, the policies RL saved on the way
    (`rl-cai-step-N`), the RL-CAI policies of earlier rounds of iterated CAI (`rl-cai-round-K`),
    RL-CAI and the registered champion, if it is another checkpoint. The report also shows the
    run's labeller validation and its generated prompts (`generated`, the DataRef file of the
    run's generated prompts, is shown in the report only).

    Writes this run's HTML report (the evaluation plus which stages ran or were reused) to
    `report_path` (the KFP HTML artifact), to the run's folder and to MLflow, and a pointer to
    the stored results to `results_path`; returns the flat metrics.
    """
    from cai_lib.method.evaluation.evaluate import evaluate as run_evaluation
    from cai_lib.method.evaluation.report import judge_note, render_report
    from cai_lib.method.evaluation.results import PolicyAnswer, load_result
    from cai_lib.method.evaluation.xstest import XSTestPrompt

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    refs = {
        name: DataRef.read(path)
        for name, path in (
            ("red_team", red_team),
            ("helpful", helpful),
            ("xstest", xstest),
            ("traces", traces),
            (SL_CAI, sl_policy),
            (RL_CAI, rl_policy),
            (PM, reward_model),
            ("answers", answers),
        )
    }
    base, judge, labeller = ctx.model(p.base_model), ctx.model(p.judge_model), ctx.model(p.feedback_model)
    human_feedback = read_references(references) if references else {}
    chosen = evaluated_policies(ctx, constitution, refs[SL_CAI], refs[RL_CAI], human_feedback)
    identity = {
        "inputs": {
            **{name: ref.sha256 for name, ref in refs.items()},
            **{name: ref.sha256 for name, ref in human_feedback.items()},
            CHAMPION_POLICY: chosen.champion.sha256 if chosen.champion_policy == CHAMPION_POLICY else None,
            **({"earlier_rounds": [ref.sha256 for ref in refs[RL_CAI].earlier]} if refs[RL_CAI].earlier else {}),
            BASE: base.content,
            "judge": judge.content,
            "labeller": labeller.content,
        },
        "settings": p.evaluate.model_dump(mode="json", exclude={"batch_size"}),
    }

    def write(uri: str, _: str) -> dict:
        result = run_evaluation(
            chosen.policies,
            refs[PM].uri,
            judge.load,
            constitution,
            list(read_dataset(refs["red_team"].uri, PromptRecord)),
            list(read_dataset(refs["helpful"].uri, PromptRecord)),
            uri,
            p.evaluate,
            list(read_dataset(refs["traces"].uri, Trace)),
            # The same checkpoint under two names is the same labeller.
            labeller_ref=judge.load if labeller.content == judge.content else labeller.load,
            rl_steps=chosen.rl_steps,
            rounds=chosen.rounds,
            answers=list(read_dataset(refs["answers"].uri, PolicyAnswer)),
            xstest=list(read_dataset(refs["xstest"].uri, XSTestPrompt)),
        )
        return result.flat_metrics()

    def report(run: StageRun, marker: OutputMarker) -> None:
        result = load_result(marker.uri)
        note = judge_note(result)
        run.set_tags(
            {
                EVAL_JUDGE_TAG: result.judge_ref,
                EVAL_JUDGE_IS_LABELLER_TAG: str(result.labeller_ref == result.judge_ref).lower(),
            }
            | source_tags(result.metric_sources())
        )
        if note:
            run.set_tags({EVAL_WARNING_TAG: note})
        if result.dependent_judge_reason:
            run.set_tags({EVAL_DEPENDENT_JUDGE_TAG: result.dependent_judge_reason})
        render_report(
            result,
            report_path,
            run_summary(ctx.run_root),
            run_validation_of(ctx.run_root),
            generated_prompts(generated, p.evaluate),
        )
        ArtifactStore.open(ctx.run_root).put_file(report_path, REPORT_FILE)
        run.log_artifact(report_path, "report")

    marker = produce(ctx, "evaluate", identity, write, constitution, then=report, round_=round_)
    pointer = {
        "uri": marker.uri,
        "champion_version": chosen.champion.version if chosen.champion else None,
        "champion_policy": chosen.champion_policy,
        "superseded": chosen.superseded,
    }
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(results_path).write_text(json.dumps(pointer))
    return marker.metrics
