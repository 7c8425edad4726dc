"""The answer-eval step: every evaluated policy's answers to one shard of the held-out prompts.
"""

from __future__ import annotations

from cai_lib.core.names import BASE, CHAMPION_POLICY, RL_CAI, SL_CAI
from cai_lib.core.records import PromptRecord
from cai_lib.steps.context import (
    DataRef,
    RunContext,
    one_line_errors,
    pinned_constitution,
    slice_of,
    write_finished_dataset,
)
from cai_lib.steps.policies import evaluated_policies
from cai_lib.steps.references import read_references
from cai_lib.steps.stage_runs import produce


@one_line_errors
def answer_eval(
    context: dict,
    constitution_path: str,
    red_team: str,
    helpful: str,
    xstest: str,
    sl_policy: str,
    rl_policy: str,
    shard: int = 0,
    shards: int = 1,
    round_: int = 1,
    references: str | None = None,
) -> DataRef:
    """Every evaluated policy's greedy answers to one of `shards` slices of the held-out prompts
    and of XSTest's (the generation half of evaluation, fanned out like the other generation
    stages: a shard takes every n-th prompt of each set)."""
    from cai_lib.method.evaluation.answers import answer_all
    from cai_lib.method.evaluation.refusals import XSTEST_KIND, as_prompt_records
    from cai_lib.method.evaluation.xstest import XSTestPrompt

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    prompts = {"red_team": DataRef.read(red_team), "helpful": DataRef.read(helpful)}
    xstest_prompts = DataRef.read(xstest)
    sl, rl = DataRef.read(sl_policy), DataRef.read(rl_policy)
    human_feedback = read_references(references) if references else {}
    chosen = evaluated_policies(ctx, constitution, sl, rl, human_feedback)
    identity = {
        "inputs": {
            **{kind: ref.sha256 for kind, ref in prompts.items()},
            XSTEST_KIND: xstest_prompts.sha256,
            BASE: ctx.model(p.base_model).content,
            SL_CAI: sl.sha256,
            RL_CAI: rl.sha256,
            **{name: ref.sha256 for name, ref in human_feedback.items()},
            CHAMPION_POLICY: chosen.champion.sha256 if chosen.champion_policy == CHAMPION_POLICY else None,
            **({"earlier_rounds": [ref.sha256 for ref in rl.earlier]} if rl.earlier else {}),
        },
        "part": [shard, shards],
        # What shapes an answer; batch size and the engine's sizing only change how it is computed.
        "settings": {
            **p.evaluate.model_dump(mode="json", include={"max_new_tokens", "seed", "backend"}),
            "dtype": p.evaluate.engine.dtype,
        },
    }

    def write(uri: str, _: str) -> None:
        sets = {kind: slice_of(ref.uri, PromptRecord, shard, shards) for kind, ref in prompts.items()}
        sets[XSTEST_KIND] = as_prompt_records(slice_of(xstest_prompts.uri, XSTestPrompt, shard, shards))
        write_finished_dataset(uri, answer_all(chosen.policies, sets, p.evaluate))

    return DataRef.of(produce(ctx, "answer_eval", identity, write, shard=shard, round_=round_))
