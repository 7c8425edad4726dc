"""`cai impact`: what a constitution change would do to the AI labels, before paying for a retrain.

The pairs an earlier run sampled are labelled again under the new constitution by the same
feedback model (the one the run pinned; refused when its reference now names other weights), with
the run's own label settings and the pipeline's rule for them (the judging principles of the new
constitution held out of the pool), exactly as the label stage labels them: each fan-out shard's
pairs on their own, in chunks of `label.shard_size` pairs and batches of `label.batch_size`. The
labels are then compared with the run's own (`cai_lib.method.label_shift`).

So a retrain with the new constitution and the same run config labels the same pairs the same
way: `cai compare` of the two runs shows the flips the preview showed. The preview costs one
labelling pass. Nothing is trained, and nothing is written where any run keeps its outputs: the
labels live in a scratch directory while they are compared.

`cai compare` uses the same relabelling when the later run labelled other pairs than the earlier
(after a critique/revision edit, SL-CAI samples new pairs): the later run's labeller scores the
earlier run's pairs, so the two labellings are compared on the same pairs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from cai_lib.core.config import format_validation_error
from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import RUN_FILE
from cai_lib.core.records import Preference, ResponsePair
from cai_lib.core.runs import PipelineRun
from cai_lib.core.shards import read_dataset
from cai_lib.method.evaluation.comparison import ImpactReport, RunSide, constitution_change
from cai_lib.method.feedback import FeedbackConfig
from cai_lib.method.label_shift import label_shift, principle_statuses
from cai_lib.platform.run_config import PipelineParams


def run_params(run: PipelineRun) -> PipelineParams:
    """The run's parameters, validated as this release reads them."""
    try:
        return PipelineParams.model_validate(run.params)
    except ValidationError as err:
        raise CaiError(format_validation_error(err, f"{run.folder.uri_of(RUN_FILE)} params")) from None


def run_side(run: PipelineRun) -> RunSide:
    params = run.params
    return RunSide(
        run_id=run.run_id,
        run_name=run.run_name,
        root=run.root,
        constitution_ref=run.constitution.ref,
        constitution_sha256=run.constitution.sha256,
        base_model=params.get("base_model", ""),
        feedback_model=params.get("feedback_model", ""),
        judge_model=params.get("judge_model", ""),
    )


def stored_labels(run: PipelineRun) -> list[Preference] | None:
    """The run's AI labels (its merged label dataset), or None when it has none."""
    record = run.output("merge_labels")
    return list(read_dataset(record.uri, Preference)) if record else None


def pair_shards(run: PipelineRun) -> list[list[ResponsePair]]:
    """The pairs the run sampled, one list per fan-out shard, in the order its label stage read them."""
    records = [r for r in run.records_of("sample_pairs") if r.uri]
    if not records:
        raise CaiError(f"{run.describe()}: no sample_pairs output recorded in {run.root}; it has no pairs to relabel")
    return [list(read_dataset(r.uri, ResponsePair)) for r in records]


def feedback_model(run: PipelineRun) -> str:
    """What the run's label stage loaded as its feedback model. A run folder written before runs
    recorded their pinned models has its reference pinned again, and refused when that now names
    other weights than its label stage keyed its output on (an alias that moved since)."""
    from cai_lib.engines.models import pin_model

    ref = run_params(run).feedback_model
    if ref in run.models:
        return run.pinned(ref)
    now = pin_model(ref)
    labelled = next((run.marker(r) for r in run.records_of("label")), None)
    used = (labelled.identity.get("inputs") or {}).get("model") if labelled else None
    if used and used != now.content:
        raise CaiError(
            f"{run.describe()}: its feedback model {ref} now names other weights (content {now.content[:16]}) than "
            f"the run labelled with ({used[:16]}); the run's labeller cannot be loaded again"
        )
    return now.load


def relabel(
    shards: Sequence[Sequence[ResponsePair]], constitution: Constitution, model_ref: str, settings: FeedbackConfig
) -> list[Preference]:
    """Label each shard's pairs as the label stage labels one fan-out shard (`label_preferences`),
    the model loaded once; the labels are kept in a scratch directory only while they are read."""
    from cai_lib.engines.generation import load_backend
    from cai_lib.method.feedback import label_preferences

    shards = [list(s) for s in shards if s]
    if not shards:
        return []
    backend = load_backend(model_ref, settings.backend, batch_size=settings.batch_size, engine=settings.engine)
    labels: list[Preference] = []
    with tempfile.TemporaryDirectory(prefix="cai-relabel-") as scratch:
        for index, pairs in enumerate(shards):
            out = str(Path(scratch) / f"shard-{index}")
            label_preferences(pairs, constitution, model_ref, out, settings, backend=backend)
            labels += read_dataset(out, Preference)
    return labels


def held_out_notes(params: PipelineParams, before: Constitution, after: Constitution) -> list[str]:
    """A line for each changed comparison principle that labelling never asks: the evaluation's
    judging principles, held out of the label pool, judge the policies instead."""
    held = set(params.labelling_settings(after).held_out_principles)
    statuses = principle_statuses(before, after)
    return [
        f"comparison principle {principle} is {status} but held out of labelling (it judges the evaluation, or "
        "label.held_out_principles names it): it changes the judge, not the labels"
        for principle, status in statuses.items()
        if status != "unchanged" and principle in held
    ]


def impact(constitution: Constitution, run: PipelineRun, top: int = 5) -> ImpactReport:
    """The run's pairs relabelled under `constitution` by its feedback model and label settings,
    compared with its own labels. `CaiError` for a run without pairs or labels, whose feedback model
    cannot be loaded again, or whose settings the new constitution cannot meet (a judging principle
    it lacks, fewer comparison principles than label.principles_per_pair)."""
    params = run_params(run)
    before = stored_labels(run)
    if before is None:
        raise CaiError(f"{run.describe()}: no merged labels (merge_labels) recorded in {run.root}")
    settings = params.labelling_settings(constitution)
    model = feedback_model(run)
    after = relabel(pair_shards(run), constitution, model, settings)
    notes = held_out_notes(params, run.constitution, constitution)
    change = constitution_change(run.constitution, constitution)
    if change.edits and all(e.section == "critique_revision" for e in change.edits):
        notes.append(
            "only critique/revision principles changed: these pairs' labels cannot change, but a retrain samples "
            "new pairs from a new SL-CAI model, which a preview cannot show"
        )
    return ImpactReport(
        run=run_side(run),
        constitution=change,
        feedback_model=model,
        labels=label_shift(
            before, after, principle_statuses(run.constitution, constitution), top, relabelled=len(after)
        ),
        notes=notes,
    )
