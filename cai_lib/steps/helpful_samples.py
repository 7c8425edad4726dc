"""The helpful-samples step: the base model's own answers to one shard of the helpfulness prompts.
"""

from __future__ import annotations

from cai_lib.core.records import PromptRecord
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, slice_of
from cai_lib.steps.stage_runs import produce


@one_line_errors
def helpful_samples(context: dict, prompts: str, shard: int = 0, shards: int = 1) -> DataRef:
    """The base model's own answers to one of `shards` slices of the helpfulness training prompts
    (mixed into SFT)."""
    from cai_lib.method.critique_revise import sample_helpful

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
