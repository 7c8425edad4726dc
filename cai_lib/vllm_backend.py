"""The vLLM generation backend, for GPUs: offline `vllm.LLM` with automatic prefix caching.

Prompts are rendered and tokenized exactly as in the transformers backend (`ChatFormat`) and
handed to vLLM as token ids, so both backends see the same tokens. The shared few-shot prefix
needs no special handling: with `enable_prefix_caching=True` vLLM keeps the KV blocks of the
common prompt start and reuses them across requests. Options are scored through prompt
log-probabilities: each (context, option) row is one prompt, and the option's tokens' logprobs
are summed.

vLLM is imported only inside `VLLMBackend`, and is installed by the `[gpu]` extra. Not executed
in this project's CI (vLLM needs a CUDA GPU and does not install on the CPU machines); the
calls follow vLLM's documented offline API (`LLM`, `LLM.generate`, `SamplingParams`,
`RequestOutput.prompt_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence

from cai_lib.generation import Conversation, SamplingParams


def vllm_sampling_kwargs(params: SamplingParams) -> dict:
    """Keyword arguments for `vllm.SamplingParams` that sample as `params` asks.

    vLLM treats temperature 0 as greedy; a per-request `seed` makes sampling reproducible
    regardless of how vLLM schedules the batch.
    """
    return {
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
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


class VLLMBackend:
    """`GenerationBackend` over `vllm.LLM` (see `cai_lib.generation`)."""

    def __init__(self, model_ref: str, chat_template: str | None = None, trust_remote_code: bool = False):
        from vllm import LLM

        from cai_lib.models import load_tokenizer, resolve_model
        from cai_lib.transformers_backend import ChatFormat

        self.model_ref = model_ref
        path = resolve_model(model_ref)
        self.chat = ChatFormat(load_tokenizer(path, model_ref, chat_template, trust_remote_code))
        self.llm = LLM(model=str(path), enable_prefix_caching=True, trust_remote_code=trust_remote_code)

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
        outputs = self.llm.generate(
            prompts, VLLMSamplingParams(**vllm_sampling_kwargs(params)), use_tqdm=False
        )
        return [output.outputs[0].text.strip() for output in outputs]

    def score_options(
        self,
        contexts: Sequence[Conversation],
        options: Sequence[Sequence[str]],
        shared_prefix: Conversation | None = None,
    ) -> list[list[float]]:
        """For each context, the summed log-probability of each option's tokens after the
        context's rendering (tokenized as `ChatFormat.option_ids`), from prompt logprobs."""
        from vllm import SamplingParams as VLLMSamplingParams

        if len(contexts) != len(options):
            raise ValueError(f"score_options: {len(contexts)} contexts but {len(options)} option lists")
        prefix = list(shared_prefix or [])
        rows, lengths, owners = [], [], []
        for i, (context, opts) in enumerate(zip(contexts, options)):
            full_context = prefix + list(context)
            context_ids = self.chat.encode(full_context)
            for option in opts:
                option_ids = self.chat.option_ids(full_context, option)
                rows.append(context_ids + option_ids)
                lengths.append(len(option_ids))
                owners.append(i)
        result: list[list[float]] = [[] for _ in contexts]
        if not rows:
            return result
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in rows], VLLMSamplingParams(**SCORING_KWARGS), use_tqdm=False
        )
        for owner, ids, length, output in zip(owners, rows, lengths, outputs):
            result[owner].append(summed_option_logprob(output.prompt_logprobs, ids, length))
        return result
