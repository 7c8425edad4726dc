"""The sample-pairs step: two answers per red-team prompt of one shard, from the SL-CAI policy.
"""

from __future__ import annotations

from cai_lib.core.records import PromptRecord
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, slice_of
from cai_lib.steps.stage_runs import produce


@one_line_errors
def sample_pairs(
    context: dict, prompts: str, policy: str, shard: int = 0, shards: int = 1, round_: int = 1
) -> DataRef:
    """Two sampled answers per red-team training prompt of one of `shards` slices, from the SL-CAI
    policy (round 1) or the round before's RL-CAI policy (round `round_` of iterated CAI)."""
    from cai_lib.method.pairs import sample_pairs as sample

    ctx = RunContext.model_validate(context)
    p = ctx.params.for_round(round_)
    source, model = DataRef.read(prompts), DataRef.read(policy)
    identity = {
        "inputs": {"prompts": source.sha256, "policy": model.sha256},
        "part": [shard, shards],
        "settings": p.sample_pairs.identity(),
    }

    def write(uri: str, key: str) -> None:
        sample(slice_of(source.uri, PromptRecord, shard, shards), model.uri, uri, p.sample_pairs, output_key=key)

    return DataRef.of(produce(ctx, "sample_pairs", identity, write, shard=shard, round_=round_))
