"""The SFT step: the SL-CAI policy, fine-tuned on the revisions and the helpfulness samples.
"""

from __future__ import annotations

from cai_lib.engines.launch import TrainingJob
from cai_lib.steps.context import DataRef, RunContext, one_line_errors
from cai_lib.steps.stage_runs import produce
from cai_lib.steps.training import train


@one_line_errors
def sft(context: dict, traces: str, helpful: str) -> tuple[DataRef, dict]:
    """Fine-tune the base model on the final revisions mixed with helpfulness samples (SL-CAI)."""
    ctx = RunContext.model_validate(context)
    p = ctx.params
    data, samples, model = DataRef.read(traces), DataRef.read(helpful), ctx.model(p.base_model)
    identity = {
        "inputs": {"traces": data.sha256, "helpful": samples.sha256, "model": model.content},
        "settings": p.sft.model_dump(mode="json"),
    }

    def write(uri: str, _: str) -> dict:
        data_uris = {"traces": [data.uri], "helpful": [samples.uri]}
        return train(
            TrainingJob(stage="sft", model=model.load, out=uri, data=data_uris, config=p.sft.model_dump())
        )

    marker = produce(ctx, "sft", identity, write)
    return DataRef.of(marker), marker.metrics
