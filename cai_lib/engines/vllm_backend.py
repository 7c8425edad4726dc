"""The vLLM generation backend, for GPUs: offline `vllm.LLM` with automatic prefix caching.

Prompts are rendered and tokenized exactly as in the transformers backend (`cai_lib.engines.chat_format`) and
handed to vLLM as token ids, so both backends see the same tokens. The shared few-shot prefix
needs no special handling: with `enable_prefix_caching=True` vLLM keeps the KV blocks of the
common prompt start and reuses them across requests. Options that differ only in their last
token (the labeller's "(A" / "(B") are read as next-token log-probabilities, so the prefix cache
applies to the whole question; other options are scored through prompt log-probabilities (each
(context, option) row one prompt, its option tokens' logprobs summed), which vLLM computes
without the prefix cache.

vLLM is imported only inside `VLLMBackend`, and is installed by the `[gpu]` extra. Not executed
in this project's CI (vLLM needs a CUDA GPU and does not install on the CPU machines); the
calls follow vLLM's documented offline API (`LLM`, `LLM.generate`, `SamplingParams`,
`RequestOutput.prompt_logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

from cai_lib.core.conversation import Conversation
from cai_lib.core.names import MODEL_CONFIG_FILE
from cai_lib.engines.chat_format import ChatFormat
from cai_lib.engines.generation import (
    EngineConfig,
    SamplingParams,
    conversation_seed,
    engine_kwargs,
    one_pass_split,
    register_backend,
)


def vllm_sampling_kwargs(params: SamplingParams, seed: int) -> dict:
    """Keyword arguments for `vllm.SamplingParams` of one request, sampling as `params` asks.

    vLLM treats temperature 0 as greedy; a per-request `seed` (`conversation_seed`) makes sampling
    reproducible regardless of how vLLM schedules the batch.
    """
    return {
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": seed,
    }


# One forward pass over the prompt, no real generation: prompt_logprobs=0 returns, for every
# prompt position after the first, the logprob of the prompt's own token.
SCORING_KWARGS = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}


def summed_option_logprob(prompt_logprobs: Sequence, prompt_ids: Sequence[int], option_length: int) -> float:
    """Sum of the logprobs vLLM reports for the last `option_length` prompt tokens.

    `prompt_logprobs[i]` maps token ids to `Logprob` objects for position i (None for i = 0).
    """
    start = len(prompt_ids) - option_length
    return sum(prompt_logprobs[i][prompt_ids[i]].logprob for i in range(start, len(prompt_ids)))


@register_backend("vllm")
class VLLMBackend:
    """`GenerationBackend` over `vllm.LLM` (see `cai_lib.engines.generation`)."""

    def __init__(
        self,
        model_ref: str,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        engine: EngineConfig | None = None,
    ):
        import json

        import torch
        from vllm import LLM

        from cai_lib.engines.models import load_tokenizer, resolve_model

        self.model_ref = model_ref
        path = resolve_model(model_ref)
        engine = engine or EngineConfig()
        model_config = json.loads((path / MODEL_CONFIG_FILE).read_text())
        kwargs = engine_kwargs(engine, model_config, torch.cuda.device_count())
        self.chat = ChatFormat(load_tokenizer(path, model_ref, chat_template, trust_remote_code))
        self.max_model_len = engine.max_model_len or model_config.get("max_position_embeddings")
        self.llm = LLM(model=str(path), trust_remote_code=trust_remote_code, **kwargs)

    def generate(
        self,
        conversations: Sequence[Conversation],
        params: SamplingParams,
        shared_prefix: Conversation | None = None,
    ) -> list[str]:
        """One reply per conversation, in order; vLLM batches and caches the shared prefix."""
        from vllm import SamplingParams as VLLMSamplingParams

        if not conversations:
            return []
        prefix = list(shared_prefix or [])
        prompts = [{"prompt_token_ids": self.chat.encode(prefix + list(c))} for c in conversations]
        requests = [
            VLLMSamplingParams(**vllm_sampling_kwargs(params, conversation_seed(params.seed, c, prefix)))
            for c in conversations
        ]
        outputs = self.llm.generate(prompts, requests, use_tqdm=False)
        return [output.outputs[0].text.strip() for output in outputs]

    def score_options(
        self,
        contexts: Sequence[Conversation],
        options: Sequence[Sequence[str]],
        shared_prefix: Conversation | None = None,
    ) -> list[list[float]]:
        """For each context, the log-probability of each option after the context's rendering
        (tokenized as `ChatFormat.option_ids`). Options that are shared leading tokens plus one
        distinct last token (`one_pass_split`) are read as next-token log-probabilities after the
        context and the leading tokens, one request per option restricted to that token: the
        requests share their whole prompt, so prefix caching computes it once, and the log-prob of
        the shared leading tokens (common to every option of the context) is left out. Other
        options are scored from prompt log-probabilities, one request each; vLLM computes those
        without the prefix cache. `last_one_pass` records which contexts were read in one pass."""
        from vllm import SamplingParams as VLLMSamplingParams

        if len(contexts) != len(options):
            raise ValueError(f"score_options: {len(contexts)} contexts but {len(options)} option lists")
        requests = option_requests(self.chat, contexts, options, list(shared_prefix or []))
        self.last_one_pass = requests.one_pass
        result: list[list[float]] = [[] for _ in contexts]
        if not requests.prompts:
            return result
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in requests.prompts],
            [VLLMSamplingParams(**kwargs) for kwargs in requests.params],
            use_tqdm=False,
        )
        for owner, read, output in zip(requests.owners, requests.reads, outputs):
            result[owner].append(read(output))
        return result


class OptionRequests(NamedTuple):
    """The vLLM requests that score a call's options: per request its prompt ids, its sampling
    keyword arguments, the context it belongs to and how its score is read from its output; and
    per context whether it is read in one pass."""

    prompts: list[list[int]]
    params: list[dict]
    owners: list[int]
    reads: list[Callable]
    one_pass: list[bool]


def option_requests(
    chat, contexts: Sequence[Conversation], options: Sequence[Sequence[str]], prefix: Conversation
) -> OptionRequests:
    """Plan the requests of `VLLMBackend.score_options` (see there)."""
    requests = OptionRequests([], [], [], [], [])
    for i, (context, opts) in enumerate(zip(contexts, options)):
        full_context = prefix + list(context)
        context_ids = chat.encode(full_context)
        option_ids = [chat.option_ids(full_context, option) for option in opts]
        split = one_pass_split(option_ids)
        requests.one_pass.append(split is not None)
        if split:
            shared, lasts = split
            for token in lasts:
                requests.prompts.append(context_ids + shared)
                requests.params.append(next_token_kwargs(token))
                requests.reads.append(partial(next_token_logprob, token=token))
                requests.owners.append(i)
            continue
        for ids in option_ids:
            prompt = context_ids + ids
            requests.prompts.append(prompt)
            requests.params.append(SCORING_KWARGS)
            requests.reads.append(partial(prompt_option_logprob, prompt_ids=prompt, option_length=len(ids)))
            requests.owners.append(i)
    return requests


def next_token_kwargs(token: int) -> dict:
    """One greedy token restricted to `token`, with its log-probability. vLLM's default
    logprobs mode returns raw log-probabilities, taken over the whole vocabulary before the
    restriction applies; the sampled token's is always among those returned."""
    return {"max_tokens": 1, "temperature": 0.0, "logprobs": 1, "allowed_token_ids": [token]}


def next_token_logprob(output, token: int) -> float:
    """The log-probability of `token` as the first generated token of a request's output."""
    return output.outputs[0].logprobs[0][token].logprob


def prompt_option_logprob(output, prompt_ids: Sequence[int], option_length: int) -> float:
    """The summed prompt log-probabilities of the last `option_length` prompt tokens of an output."""
    return summed_option_logprob(output.prompt_logprobs, prompt_ids, option_length)
