"""The critique-revise step: SL-CAI traces for one shard of the red-team training prompts.
"""

from __future__ import annotations

from cai_lib.core.records import PromptRecord
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, pinned_constitution, slice_of
from cai_lib.steps.stage_runs import produce


@one_line_errors
def critique_revise_shard(
    context: dict, constitution_path: str, prompts: str, shard: int, shards: int
) -> DataRef:
    """SL-CAI critique→revision on one of `shards` interleaved slices of the training prompts."""
    from cai_lib.method.critique_revise import critique_revise

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
