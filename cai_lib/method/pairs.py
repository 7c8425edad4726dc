"""Response pairs for AI feedback (Bai et al. 2022, §4.1): two sampled answers per red-team prompt.

The paper's RL stage starts from pairs of responses that the SL-CAI model samples for each
red-team prompt; the feedback model then says which of the two is better. Here the two answers
come from two batched `generate` calls over a whole shard of prompts, each with its own seed
(answer A from one, answer B from the other), at a temperature above 0 so they can differ.

Where it departs: a pair in which either answer came out empty (the model ended its reply at
once) is dropped with a logged warning, because a comparison needs two answers. The two calls'
seeds derive from the base seed only, and backends seed each prompt by its content
(`conversation_seed`), so a prompt's pair is the same in any shard, shard count or resumed run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pydantic import Field

from cai_lib.core.errors import CaiError
from cai_lib.core.names import canonical_sha256
from cai_lib.core.prompts import deduplicate
from cai_lib.core.records import PromptRecord, ResponsePair, stable_id
from cai_lib.core.shards import ShardedOutput
from cai_lib.engines.generation import GenerationBackend, SamplingParams, check_fits, load_backend
from cai_lib.method.critique_revise import GenerationStageConfig

log = logging.getLogger(__name__)


class SamplePairsConfig(GenerationStageConfig):
    """Settings of response-pair sampling (paper §4.1)."""

    temperature: float = Field(
        default=1.0,
        gt=0.0,
        description="Sampling temperature of both answers (paper: 1). Must be above 0: greedy decoding would "
        "give two identical answers.",
    )
    top_p: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling mass of both answers (1 samples the full distribution).",
    )


def sample_pairs(
    prompts: list[PromptRecord],
    model_ref: str,
    out_uri: str,
    config: SamplePairsConfig,
    backend: GenerationBackend | None = None,
    output_key: str | None = None,
) -> int:
    """Write one `ResponsePair` per (deduplicated) prompt under `out_uri`; returns the row count.

    Answers A and B are sampled by two `generate` calls per shard with different seeds, batched
    across the shard's prompts. Sharded and resumable (`cai_lib.core.shards`); a pair's id depends on
    its prompt and the output's identity: `output_key` when the pipeline gives one (its content
    key), else the model ref and the seed. `backend` defaults to `load_backend(model_ref,
    config.backend)`. Raises `CaiError`, writing nothing, when there are no prompts or when
    `out_uri` holds results of other inputs.
    """
    from tqdm.auto import tqdm

    prompts = deduplicate(prompts)
    if not prompts:
        raise CaiError("sample pairs: no prompts given; check the prompt source")
    # Opened before the output is claimed: a model ref that does not resolve leaves nothing behind.
    model = backend or load_backend(model_ref, config.backend, batch_size=config.batch_size, engine=config.engine)
    check_fits(model, [(p.id, [{"role": "user", "content": p.prompt}]) for p in prompts], None, "sample pairs")
    if output_key:
        inputs, identity = {"output_key": output_key}, output_key
    else:
        run = {"stage": "sample_pairs", "model_ref": model_ref, "config": config.identity()}
        inputs = {
            **run,
            "prompts": {"count": len(prompts), "sha256": canonical_sha256({"ids": [p.id for p in prompts]})},
        }
        identity = f"{model_ref}\0{config.seed}"
    output = ShardedOutput(out_uri, inputs)
    with tqdm(total=len(prompts), unit="prompt", desc="response pairs") as bar:
        return output.run(
            prompts,
            config.shard_size,
            lambda shard: _sample_shard(model, shard, model_ref, identity, config),
            on_shard=bar.update,
        )


def pair_seeds(base_seed: int) -> tuple[int, int]:
    """The sampling seeds of the calls that give answers A and B: distinct, fixed by the base seed."""
    seed_a = int(stable_id(str(base_seed), "a"), 16) % 2**31
    seed_b = int(stable_id(str(base_seed), "b"), 16) % 2**31
    return seed_a, (seed_b if seed_b != seed_a else (seed_a + 1) % 2**31)


def _sample_shard(
    model: GenerationBackend,
    shard: Sequence[PromptRecord],
    model_ref: str,
    identity: str,
    config: SamplePairsConfig,
) -> list[ResponsePair]:
    conversations = [[{"role": "user", "content": p.prompt}] for p in shard]
    answers = []
    for seed in pair_seeds(config.seed):
        params = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=seed,
        )
        replies = model.generate([list(c) for c in conversations], params)
        if len(replies) != len(shard):
            raise RuntimeError(f"backend returned {len(replies)} replies for {len(shard)} prompts")
        answers.append([reply.strip() for reply in replies])
    pairs = [
        ResponsePair(
            id=stable_id("pair", prompt.id, identity),
            prompt_id=prompt.id,
            prompt=prompt.prompt,
            answer_a=answer_a,
            answer_b=answer_b,
            model_ref=model_ref,
        )
        for prompt, answer_a, answer_b in zip(shard, *answers)
        if answer_a and answer_b
    ]
    if len(pairs) < len(shard):
        log.warning("dropped %d of %d pairs with an empty answer", len(shard) - len(pairs), len(shard))
    return pairs
