"""Prompts for the run: read, deduplicated, split into training and held-out sets; and the work
items of the fan-outs over them.
"""

from __future__ import annotations

from contextlib import nullcontext

from cai_lib.core.names import canonical_sha256
from cai_lib.core.outputs import StageOutput, StageRecord
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, work_items, write_finished_dataset
from cai_lib.steps.stage_runs import DeferredStageRun, make, recorded, write_record


@one_line_errors
def prepare_prompts(context: dict) -> dict[str, DataRef]:
    """Read, deduplicate and split the red-team and helpfulness prompts (seeded).

    The sources are read every run (a file can change under the same name); each split is
    stored once per content, at a key that hashes its rows.
    """
    from cai_lib.platform.preflight import prompt_splits

    ctx = RunContext.model_validate(context)
    splits = {
        split: (
            rows,
            StageOutput(
                ctx.outputs_root,
                "prepare_prompts",
                {"split": split, "rows": canonical_sha256({"rows": [r.model_dump() for r in rows]})},
            ),
        )
        for split, rows in prompt_splits(ctx.params).items()
    }
    markers = {split: output.complete() for split, (_, output) in splits.items()}
    # Every split stored before: the exit handler writes the MLflow record (see DeferredStageRun).
    reused = all(markers.values())
    deferred = DeferredStageRun(ctx, "prepare_prompts")
    with nullcontext(deferred) if reused else recorded(ctx, "prepare_prompts") as run:
        for split, (rows, output) in splits.items():
            marker = markers[split] or make(
                ctx,
                "dataset",
                output,
                lambda uri, _, rows=rows: write_finished_dataset(uri, rows),
                run.run_id,
            )
            markers[split] = marker
            run.log_stage_metrics({f"{split}_prompts": len(rows)})
    entry = StageRecord(stage="prepare_prompts", status="ran", made_by_run=ctx.run_id, run_id=ctx.run_id)
    if reused:
        entry = entry.model_copy(update={"deferred": deferred.content})
    write_record(ctx, entry)
    return {split: DataRef.of(marker) for split, marker in markers.items()}


def fan_out(context: dict, prompts: int) -> list[dict]:
    """The items of the generation fan-outs: the run context with one shard index each, and the
    shard count (`PipelineParams.shard_count` of the `prompts` red-team training prompts)."""
    return work_items(context, RunContext.model_validate(context).params.shard_count(prompts))


def eval_fan_out(context: dict, red_team: str, helpful: str, xstest: str) -> list[dict]:
    """The items of evaluation's fan-out over the held-out and XSTest prompts (DataRef files
    `red_team`, `helpful` and `xstest`), `PipelineParams.eval_shard_count` of them."""
    params = RunContext.model_validate(context).params
    rows = [DataRef.read(path).rows or 0 for path in (red_team, helpful, xstest)]
    return work_items(context, params.eval_shard_count(*rows))
