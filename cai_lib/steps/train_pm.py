"""The train-pm step: the preference model on AI harmlessness labels and human pairs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cai_lib.core.names import canonical_sha256
from cai_lib.engines.launch import TrainingJob, staged_rows
from cai_lib.steps.context import DataRef, PinnedModel, RunContext, one_line_errors
from cai_lib.steps.stage_runs import produce
from cai_lib.steps.training import train


@one_line_errors
def train_pm(
    context: dict, labels: str, previous_pm: str | None = None, round_: int = 1
) -> tuple[DataRef, dict]:
    """The preference model on AI harmlessness labels mixed with human pairs (paper §4.1). In a
    later round of iterated CAI with `iteration.pm_init: continue`, training starts from
    `previous_pm` (the DataRef file of the round before's PM) instead of the base model."""
    from cai_lib.method.human_preferences import read_human_preferences

    ctx = RunContext.model_validate(context)
    p = ctx.params.for_round(round_)
    ai, model = DataRef.read(labels), ctx.model(p.base_model)
    if previous_pm and round_ > 1 and p.iteration.pm_init == "continue":
        previous = DataRef.read(previous_pm)
        model = PinnedModel(load=previous.uri, content=previous.sha256 or "")
    human = read_human_preferences(p.human_preferences, limit=p.num_human) if p.human_preferences else []
    identity = {
        "inputs": {
            "labels": ai.sha256,
            "human": canonical_sha256({"rows": [h.model_dump() for h in human]}),
            "model": model.content,
        },
        "settings": p.train_pm.model_dump(mode="json"),
    }

    def write(uri: str, _: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="cai-train-pm-") as folder:
            data_uris = {"ai": [ai.uri], "human": staged_rows(Path(folder), "human", human)}
            config = p.train_pm.model_dump()
            return train(
                TrainingJob(stage="train_pm", model=model.load, out=uri, data=data_uris, config=config)
            )

    marker = produce(ctx, "train_pm", identity, write, round_=round_)
    return DataRef.of(marker), marker.metrics
