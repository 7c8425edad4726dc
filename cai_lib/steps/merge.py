"""The merge steps: a fan-out's shard datasets as one dataset, rows in id order.
"""

from __future__ import annotations

from cai_lib.core.shards import merge_datasets
from cai_lib.steps.context import DataRef, RunContext, one_line_errors
from cai_lib.steps.stage_runs import produce


@one_line_errors
def merge(context: dict, parts: list[str], name: str, round_: int = 1) -> DataRef:
    """Merge the shard outputs of a fan-out into one dataset, rows in id order (the same dataset at
    any shard count): stage `merge_<name>`."""
    ctx = RunContext.model_validate(context)
    refs = [DataRef.model_validate_json(part) for part in parts]
    identity = {"of": name, "inputs": [ref.sha256 for ref in refs]}
    return DataRef.of(
        produce(
            ctx,
            f"merge_{name}",
            identity,
            lambda uri, _: merge_datasets([r.uri for r in refs], uri),
            round_=round_,
        )
    )
