"""`cai compare RUN_A RUN_B`: what changed from one run to the next, and what it did.

Read from the two runs' folders (`cai_lib.core.runs`) and the outputs their records point at:

- **stages**: B reused a stage when its output key is A's; otherwise it reran, and the two outputs'
  markers say which part of the key differs (settings, code, a constitution section, an input
  made by an earlier stage);
- **constitution**: the principles added, removed and changed, with their text;
- **settings**: the run parameters that differ;
- **labels**: on the pairs both runs labelled, how often the preferred answer flipped, overall and
  per comparison principle, the mean shift and the pairs that moved most
  (`cai_lib.method.label_shift`). Where B did not label some of A's pairs (B sampled new ones),
  B's labeller scores them, as its label stage would (`cai_lib.platform.impact.relabel`);
- **preference model**: each run's accuracy on the same held-out human comparisons, from its
  evaluation;
- **policies**: B's RL-CAI policy against A's by B's judge, on the held-out prompts both answered
  (`cai_lib.method.evaluation.head_to_head`);
- **per principle**: each run's critique/revision principle statistics.

What two runs do not share (a stage only one ran, a measurement only one made, runs of other base
or feedback models) is compared as far as it goes and named in one line each. Nothing is written
into either run except the comparison itself, into B's folder and B's MLflow run
(`record_comparison`).
"""

from __future__ import annotations

from pathlib import Path

from cai_lib.core.errors import CaiError
from cai_lib.core.names import ANSWERS_FILE, COMPARISON_FILE, COMPARISONS_DIR, REPORT_FILE, RL_CAI
from cai_lib.core.outputs import StageRecord
from cai_lib.core.runs import PipelineRun
from cai_lib.core.stage_table import STAGES
from cai_lib.core.store import ArtifactStore, join_uri
from cai_lib.core.tracking import flatten_params
from cai_lib.method.evaluation.comparison import (
    PMAccuracyComparison,
    PrincipleEffectPair,
    RunComparison,
    StageChange,
    constitution_change,
)
from cai_lib.method.evaluation.head_to_head import HeadToHead
from cai_lib.method.evaluation.results import EvaluationResult, PolicyAnswer, load_result
from cai_lib.method.feedback import as_transcript
from cai_lib.method.label_shift import LabelShift, label_shift, matched, pair_key, principle_statuses
from cai_lib.platform.impact import (
    feedback_model,
    held_out_notes,
    pair_shards,
    relabel,
    run_params,
    run_side,
    stored_labels,
)
from cai_lib.platform.run_config import PipelineParams

# Parameters that name a run or what it is compared with, not what it trains.
NAMING = ("constitution", "run_name", "experiment", "compare_against")
# Settings differences shown before the rest are counted.
SHOWN_SETTINGS = 12


def compare_runs(a: PipelineRun, b: PipelineRun, use_models: bool = True, top: int = 5) -> RunComparison:
    """Run B against run A (see the module docstring). `use_models` off: nothing is scored, so
    labels are compared only on pairs both labelled and the policies are not judged. `top`: how
    many examples (pairs, prompts) each section shows."""
    params_a, params_b = run_params(a), run_params(b)
    notes = model_notes(params_a, params_b) + held_out_notes(params_b, a.constitution, b.constitution)
    missing: list[str] = []
    evaluations = {name: evaluation_of(run, name, missing) for name, run in (("A", a), ("B", b))}
    ea, eb = evaluations["A"], evaluations["B"]
    return RunComparison(
        a=run_side(a),
        b=run_side(b),
        stages=stage_changes(a, b),
        constitution=constitution_change(a.constitution, b.constitution),
        settings=settings_diff(a.params, b.params),
        labels=compare_labels(a, b, params_b, use_models, top, missing),
        pm_accuracy=compare_pm(ea, eb, missing) if ea and eb else None,
        policies=compare_policies(a, b, params_b, ea, eb, use_models, top, missing, notes),
        principle_effects=principle_effects(ea, eb),
        notes=notes,
        not_compared=missing,
    )


# -- stages --------------------------------------------------------------------------------------------


def stage_changes(a: PipelineRun, b: PipelineRun) -> list[StageChange]:
    """Each stage that keeps its output, round by round of iterated CAI and in pipeline order:
    whether B has A's output, and if not, why."""
    changes = []
    for round_ in sorted(set(a.rounds) | set(b.rounds)):
        for stage in STAGES:
            if not stage.reusable:
                continue
            mine, theirs = b.records_of(stage.name, round_), a.records_of(stage.name, round_)
            if not mine and not theirs:
                continue
            change = StageChange(stage=stage.name, round=round_, status="reused")
            if not mine or not theirs:
                change.status = "only in A" if theirs else "only in B"
            elif sorted(r.key or "" for r in mine) != sorted(r.key or "" for r in theirs):
                change.status = "reran"
                change.changed = why_rerun(a, b, theirs, mine)
                change.made_by = sorted({r.made_by_run for r in mine if r.made_by_run != b.run_id})
            changes.append(change)
    return changes


def why_rerun(a: PipelineRun, b: PipelineRun, theirs: list[StageRecord], mine: list[StageRecord]) -> list[str]:
    """What B's output keys hash that A's did not, shard by shard, in words."""
    if len(theirs) != len(mine):
        return [f"{len(theirs)} shard(s) in A, {len(mine)} in B"]
    found: list[str] = []
    for old, new in zip(theirs, mine):
        before, after = a.marker(old), b.marker(new)
        if before is None or after is None:
            return ["an output's marker is gone, so why is unknown"]
        for path in key_differences(before.identity, after.identity):
            words = in_words(path)
            if words not in found:
                found.append(words)
    return found


def key_differences(before: object, after: object, path: str = "") -> list[str]:
    """The dotted paths at which two output identities differ (down to their leaves)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in [*before, *(k for k in after if k not in before)]:
            found += key_differences(before.get(key), after.get(key), f"{path}.{key}" if path else str(key))
        return found
    return [] if before == after else [path]


def in_words(path: str) -> str:
    """An identity path as a reason a person reads: `constitution.comparison` is "comparison
    principles changed", `inputs.labels` "input labels changed"."""
    head, _, rest = path.partition(".")
    if head == "constitution":
        part = {"critique_revision": "critique/revision", "evaluation": "judging"}.get(rest, rest)
        return f"{part} principles changed"
    if head == "inputs":
        return f"input {rest} changed" if rest else "its shards changed"
    if head == "settings":
        return f"setting {rest} changed"
    if head == "part":
        return "its shard's input changed"
    return f"{head} changed"


# -- settings and models --------------------------------------------------------------------------------


def settings_diff(before: dict, after: dict) -> list[str]:
    """'field: A -> B' for each run parameter that differs (naming parameters aside)."""
    old, new = (flatten_params({k: v for k, v in p.items() if k not in NAMING}) for p in (before, after))
    missing = "(unset)"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
    shown = [f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}" for k in keys[:SHOWN_SETTINGS]]
    return shown + ([f"{len(keys) - SHOWN_SETTINGS} more"] if len(keys) > SHOWN_SETTINGS else [])


def model_notes(a: PipelineParams, b: PipelineParams) -> list[str]:
    """A line for each model the runs do not share, and for a judge that is not independent."""
    notes = []
    if a.base_model != b.base_model:
        notes.append(
            f"base models differ (A {a.base_model}, B {b.base_model}): every stage from SL-CAI on differs; labels "
            "are compared on A's pairs, policies head to head"
        )
    if a.feedback_model != b.feedback_model:
        notes.append(
            f"feedback models differ (A {a.feedback_model}, B {b.feedback_model}): label flips mix the constitution "
            "change with the change of labeller"
        )
    if b.judge_model in (a.feedback_model, b.feedback_model):
        notes.append(
            f"the judge {b.judge_model} is a feedback model of these runs: the policies' head-to-head is not "
            "independent of their training labels"
        )
    return notes


# -- labels ----------------------------------------------------------------------------------------------


def compare_labels(
    a: PipelineRun, b: PipelineRun, params_b: PipelineParams, use_models: bool, top: int, missing: list[str]
) -> LabelShift | None:
    """B's labels against A's on A's pairs; those B did not label are scored by B's labeller."""
    labels_a, labels_b = stored_labels(a), stored_labels(b)
    for name, run, labels in (("A", a, labels_a), ("B", b, labels_b)):
        if labels is None:
            missing.append(f"labels: run {name} ({run.run_id}) has no merged labels (no merge_labels output)")
            return None
    if max(a.rounds) > 1 or max(b.rounds) > 1:
        missing.append(
            "labels of later rounds: each run sampled them from its own round's policy, so only round 1's "
            "pairs (sampled from SL-CAI) are compared"
        )
    statuses = principle_statuses(a.constitution, b.constitution)
    shared = {pair_key(x.prompt, x.answer_a, x.answer_b) for x, _, _ in matched(labels_a, labels_b)}
    if len(shared) == len(labels_a):
        return label_shift(labels_a, labels_b, statuses, top)
    if not use_models:
        missing.append(
            f"labels: B did not label {len(labels_a) - len(shared)} of A's {len(labels_a)} pairs, and with "
            "--no-models B's labeller does not score them" + (": compared on the rest" if shared else "")
        )
        return label_shift(labels_a, labels_b, statuses, top)
    unlabelled = [
        [p for p in shard if pair_key(as_transcript(p.prompt), p.answer_a, p.answer_b) not in shared]
        for shard in pair_shards(a)
    ]
    extra = relabel(unlabelled, b.constitution, feedback_model(b), params_b.labelling_settings(b.constitution))
    return label_shift(labels_a, labels_b + extra, statuses, top, relabelled=len(extra))


# -- evaluation ----------------------------------------------------------------------------------------


def evaluation_of(run: PipelineRun, name: str, missing: list[str]) -> EvaluationResult | None:
    """The evaluation of the run's last round: the one of its final policy."""
    record = run.output("evaluate", run.last_round("evaluate"))
    if record is None:
        missing.append(
            f"preference model and policies: run {name} ({run.run_id}) has no evaluation (no evaluate output)"
        )
        return None
    return load_result(record.uri)


def compare_pm(a: EvaluationResult, b: EvaluationResult, missing: list[str]) -> PMAccuracyComparison | None:
    """Both PMs' accuracy when both evaluations measured it on the same human comparisons."""
    if a.pm_accuracy is None or b.pm_accuracy is None:
        which = " and ".join(n for n, e in (("A", a), ("B", b)) if e.pm_accuracy is None)
        missing.append(f"PM accuracy: run {which} measured none (evaluate.pm_benchmark unset)")
        return None
    same = (a.pm_accuracy.source, a.pm_accuracy.n, a.config.pm_benchmark_limit) == (
        b.pm_accuracy.source,
        b.pm_accuracy.n,
        b.config.pm_benchmark_limit,
    )
    if not same:
        missing.append(
            f"PM accuracy: measured on other human comparisons (A {a.pm_accuracy.source}, {a.pm_accuracy.n} pairs; "
            f"B {b.pm_accuracy.source}, {b.pm_accuracy.n} pairs)"
        )
        return None
    return PMAccuracyComparison(a=a.pm_accuracy, b=b.pm_accuracy)


def answers_of(run: PipelineRun) -> list[PolicyAnswer]:
    """Every answer of every policy the run's last evaluation made (answers.jsonl beside its metrics)."""
    store = ArtifactStore.open(run.output("evaluate", run.last_round("evaluate")).uri)
    return list(store.read_jsonl(ANSWERS_FILE, PolicyAnswer)) if store.exists(ANSWERS_FILE) else []


def compare_policies(
    a: PipelineRun,
    b: PipelineRun,
    params_b: PipelineParams,
    ea: EvaluationResult | None,
    eb: EvaluationResult | None,
    use_models: bool,
    top: int,
    missing: list[str],
    notes: list[str],
) -> HeadToHead | None:
    """B's RL-CAI policy against A's, by B's judge and judging principles."""
    from cai_lib.method.evaluation.head_to_head import head_to_head

    if ea is None or eb is None:
        return None
    if not use_models:
        missing.append("policies: not judged head to head (--no-models)")
        return None
    if params_b.evaluate.hold_out_judge_principles is False:
        notes.append("B's judging principles were not held out of its labels (evaluate.hold_out_judge_principles)")
    result = head_to_head(
        b.pinned(params_b.judge_model),
        b.constitution,
        params_b.evaluate,
        answers_of(b),
        answers_of(a),
        RL_CAI,
        top,
    )
    if result is None:
        missing.append(f"policies: no held-out prompt that both runs' {RL_CAI} policies answered")
    return result


def principle_effects(a: EvaluationResult | None, b: EvaluationResult | None) -> list[PrincipleEffectPair]:
    """Each critique/revision principle's effect in both runs' revisions, by id."""
    if a is None or b is None:
        return []
    old = {e.principle_id: e for e in a.principle_effects}
    new = {e.principle_id: e for e in b.principle_effects}
    return [PrincipleEffectPair(principle_id=i, a=old.get(i), b=new.get(i)) for i in dict.fromkeys([*new, *old])]


# -- where a comparison is kept ---------------------------------------------------------------------------


def record_comparison(
    comparison: RunComparison, b_folder: str, tracking_uri: str | None, mlflow_run_id: str | None
) -> dict[str, str]:
    """Write the comparison (report.html and comparison.json) into B's folder, under
    `run-comparisons/<A's run id>/`, and as artifacts of B's MLflow run `mlflow_run_id` when given.
    Returns where: `report` (the page's URI) and `mlflow_run` (the run it was logged to, or "")."""
    import tempfile

    from cai_lib.core.tracking import log_files
    from cai_lib.method.evaluation.compare_report import comparison_html

    where = join_uri(COMPARISONS_DIR, comparison.a.run_id)
    folder = ArtifactStore.open(join_uri(b_folder, where))
    html = comparison_html(comparison)
    folder.write_text(REPORT_FILE, html)
    folder.write_text(COMPARISON_FILE, comparison.model_dump_json(indent=2) + "\n")
    if mlflow_run_id:
        with tempfile.TemporaryDirectory(prefix="cai-compare-") as scratch:
            files = [Path(scratch) / REPORT_FILE, Path(scratch) / COMPARISON_FILE]
            files[0].write_text(html, encoding="utf-8")
            files[1].write_text(comparison.model_dump_json(indent=2) + "\n", encoding="utf-8")
            log_files(tracking_uri, mlflow_run_id, files, where)
    return {"report": folder.uri_of(REPORT_FILE), "mlflow_run": mlflow_run_id or ""}


def link_comparison(tracking_uri: str | None, made_here: list[tuple[str, str]], pointer: dict) -> None:
    """Tag each version in `made_here` (the candidate versions the run registered new) with the
    compare step's report and the run it compared with; a pointer without a report tags nothing.
    A promotion copies the tags onto the production version; the gate's reason names the
    comparison (`cai_lib.platform.registry.promotion.comparison_clause`)."""
    from cai_lib.core.names import COMPARE_AGAINST_TAG, COMPARE_REPORT_TAG
    from cai_lib.core.tracking import connect

    if "report" not in pointer:
        return
    client = connect(tracking_uri)
    for name, version in made_here:
        client.set_model_version_tag(name, version, COMPARE_REPORT_TAG, pointer["report"])
        client.set_model_version_tag(name, version, COMPARE_AGAINST_TAG, pointer["against"])


def refuse_same_run(a: PipelineRun, b: PipelineRun) -> None:
    if a.run_id == b.run_id:
        raise CaiError(f"run {a.run_id} is given twice: compare a run with another")
