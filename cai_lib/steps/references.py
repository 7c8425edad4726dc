"""The reference steps: the human-feedback references CAI is compared with (helpful-only RLHF, HH
RLHF), their PMs and policies, made with the train-pm and RL code on human pairs only
(`cai_lib.method.references`). With `references.policies` empty both steps do nothing and pass on
an empty mapping; otherwise each reference is a content-addressed output of its own, reused by
any run that would make it again.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cai_lib.core.names import canonical_sha256
from cai_lib.engines.launch import TrainingJob, staged_rows
from cai_lib.steps.context import DataRef, RunContext, one_line_errors
from cai_lib.steps.stage_runs import produce
from cai_lib.steps.training import train

if TYPE_CHECKING:
    from cai_lib.core.records import Preference


def write_references(refs: dict[str, DataRef], path: str) -> None:
    """The reference name -> pointer mapping, as the small KFP artifact later steps read."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({name: ref.model_dump(mode="json") for name, ref in refs.items()}))


def read_references(path: str) -> dict[str, DataRef]:
    return {name: DataRef.model_validate(ref) for name, ref in json.loads(Path(path).read_text()).items()}


def rows_sha256(rows: list[Preference]) -> str:
    return canonical_sha256({"rows": [row.model_dump() for row in rows]})


@one_line_errors
def train_reference_pms(context: dict) -> dict[str, DataRef]:
    """The PM of each reference in `references.policies`, from the base model on human pairs only."""
    from cai_lib.method.references import reference_pairs, reference_pm_settings

    ctx = RunContext.model_validate(context)
    p = ctx.params
    model = ctx.model(p.base_model)
    settings = reference_pm_settings(p.train_pm)
    made = {}
    for index, kind in enumerate(p.references.policies):
        pairs = reference_pairs(kind, p.references)
        identity = {
            "reference": kind,
            "inputs": {"human": rows_sha256(pairs), "model": model.content},
            "settings": settings.model_dump(mode="json"),
        }

        def write(uri: str, _: str, pairs=pairs) -> dict:
            with tempfile.TemporaryDirectory(prefix="cai-reference-pm-") as folder:
                data = {"ai": [], "human": staged_rows(Path(folder), "human", pairs)}
                job = TrainingJob(stage="train_pm", model=model.load, out=uri, data=data, config=settings.model_dump())
                return train(job)

        made[kind] = DataRef.of(produce(ctx, "train_reference_pm", identity, write, shard=index))
    return made


@one_line_errors
def train_reference_policies(context: dict, red_team: str, helpful: str, reward_models: str) -> dict[str, DataRef]:
    """Each reference's policy: the base model against its PM (`reward_models`, from
    `train_reference_pms`) on the RL-CAI training prompts with the RL-CAI settings, or with
    `rl.algorithm: dpo` DPO on the PM's human pairs."""
    from cai_lib.method.references import reference_pairs

    ctx = RunContext.model_validate(context)
    p = ctx.params
    sources = {name: DataRef.read(path) for name, path in (("red_team", red_team), ("helpful", helpful))}
    start = ctx.model(p.base_model)
    dpo = p.rl.algorithm == "dpo"
    made = {}
    for index, (kind, reward) in enumerate(read_references(reward_models).items()):
        pairs = reference_pairs(kind, p.references) if dpo else []
        identity = {
            "reference": kind,
            "inputs": {
                **{name: ref.sha256 for name, ref in sources.items()},
                "pairs": rows_sha256(pairs) if dpo else None,
                "policy": start.content,
                "reward": reward.sha256,
            },
            "settings": p.rl.model_dump(mode="json"),
        }

        def write(uri: str, _: str, pairs=pairs, reward=reward) -> dict:
            with tempfile.TemporaryDirectory(prefix="cai-reference-rl-") as folder:
                data = {
                    "prompts": [ref.uri for ref in sources.values()],
                    **({"preferences": staged_rows(Path(folder), "pairs", pairs)} if dpo else {}),
                }
                job = TrainingJob(
                    stage="rl", model=start.load, reward=reward.uri, out=uri, data=data, config=p.rl.model_dump()
                )
                return train(job)

        made[kind] = DataRef.of(produce(ctx, "rl_reference", identity, write, shard=index))
    return made
