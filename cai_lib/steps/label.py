"""The label step: AI feedback on one shard's pairs.
"""

from __future__ import annotations

from cai_lib.core.records import ResponsePair
from cai_lib.core.shards import read_dataset
from cai_lib.steps.context import DataRef, PinnedModel, RunContext, one_line_errors, pinned_constitution
from cai_lib.steps.stage_runs import produce


@one_line_errors
def label(
    context: dict,
    constitution_path: str,
    pairs: str,
    shard: int | None = None,
    labeller: str | None = None,
    round_: int = 1,
) -> DataRef:
    """AI feedback (paper §4.1): soft preference labels from the feedback model for a dataset of
    pairs (in the pipeline, one fan-out shard's pairs: `shard` names it in the records). In a later
    round of iterated CAI with `iteration.feedback_follows_policy`, the labeller is `labeller`, the
    DataRef file of the round before's RL-CAI policy."""
    from cai_lib.method.feedback import label_preferences

    ctx = RunContext.model_validate(context)
    p = ctx.params.for_round(round_)
    source, model = DataRef.read(pairs), ctx.model(p.feedback_model)
    if labeller and round_ > 1 and p.iteration.feedback_follows_policy:
        policy = DataRef.read(labeller)
        model = PinnedModel(load=policy.uri, content=policy.sha256 or "")
    constitution = pinned_constitution(constitution_path)
    settings = p.labelling_settings(constitution)
    # The pairs are the part: a label's id depends on its pair, not on which pairs share its shard.
    identity = {"inputs": {"model": model.content}, "part": source.sha256, "settings": settings.identity()}

    def write(uri: str, key: str) -> None:
        rows = list(read_dataset(source.uri, ResponsePair))
        label_preferences(rows, constitution, model.load, uri, settings, output_key=key)

    return DataRef.of(produce(ctx, "label", identity, write, constitution, shard=shard, round_=round_))
