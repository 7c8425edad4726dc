"""The RL step: RL-CAI, the SL-CAI policy optimised against the preference model.
"""

from __future__ import annotations

from cai_lib.engines.launch import TrainingJob
from cai_lib.steps.context import DataRef, RunContext, one_line_errors
from cai_lib.steps.stage_runs import produce
from cai_lib.steps.training import train


@one_line_errors
def rl(
    context: dict, red_team: str, helpful: str, labels: str, policy: str, reward_model: str, round_: int = 1
) -> tuple[DataRef, dict]:
    """RL-CAI: the SL-CAI policy against the PM with a KL penalty (RLOO/GRPO), or DPO on the labels.
    In round `round_` > 1 of iterated CAI, `policy` is the round before's RL-CAI policy, which RL
    continues (and its KL reference); the returned pointer carries the chain of earlier rounds."""
    ctx = RunContext.model_validate(context)
    p = ctx.params.for_round(round_)
    sources = {name: DataRef.read(path) for name, path in (("red_team", red_team), ("helpful", helpful))}
    pairs, start, reward = DataRef.read(labels), DataRef.read(policy), DataRef.read(reward_model)
    dpo = p.rl.algorithm == "dpo"
    identity = {
        "inputs": {
            **{name: ref.sha256 for name, ref in sources.items()},
            "labels": pairs.sha256 if dpo else None,
            "policy": start.sha256,
            "reward": reward.sha256,
        },
        "settings": p.rl.model_dump(mode="json"),
    }

    def write(uri: str, _: str) -> dict:
        data_uris = {
            "prompts": [ref.uri for ref in sources.values()],
            **({"preferences": [pairs.uri]} if dpo else {}),
        }
        job = TrainingJob(
            stage="rl", model=start.uri, reward=reward.uri, out=uri, data=data_uris, config=p.rl.model_dump()
        )
        return train(job)

    marker = produce(ctx, "rl", identity, write, round_=round_)
    return DataRef.of(marker).continued(start, round_), marker.metrics
