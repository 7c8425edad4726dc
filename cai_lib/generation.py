"""The generation interface every stage uses, and the factory that picks a backend.

A conversation is a list of chat messages `{"role": ..., "content": ...}`. If its last message
has role "assistant", that message is a partial reply to be continued (used to read option
probabilities after a chain of thought). `shared_prefix` is a run of messages that precedes
every conversation of a call (the constitution's few-shot examples): backends encode it once
(a reused KV cache in transformers, prefix caching in vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, Field

Message = dict[str, str]
Conversation = list[Message]
BackendName = Literal["transformers", "vllm"]


class SamplingParams(BaseModel):
    """How to sample a reply. temperature 0 means greedy decoding."""

    max_new_tokens: int = Field(default=256, ge=1, description="Upper bound on generated tokens per reply.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 for greedy; >0 samples.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    seed: int = Field(
        default=0,
        description="Seed for sampling; the same seed and conversation give the same reply, whatever "
        "else is in the batch or shard.",
    )


def conversation_seed(seed: int, conversation: Conversation, shared_prefix: Conversation | None = None) -> int:
    """The sampling seed of one conversation: fixed by the call's seed and the conversation's
    content, so a reply does not depend on which batch, shard or shard count it was sampled in."""
    import hashlib
    import json

    text = json.dumps([seed, list(shared_prefix or []), list(conversation)], sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1


class GenerationBackend(Protocol):
    """What a stage needs from a model: replies to conversations and log-probs of options."""

    model_ref: str

    def generate(
        self,
        conversations: Sequence[Conversation],
        params: SamplingParams,
        shared_prefix: Conversation | None = None,
    ) -> list[str]:
        """One assistant reply per conversation (stopping at EOS or max_new_tokens), batched."""
        ...

    def score_options(
        self,
        contexts: Sequence[Conversation],
        options: Sequence[Sequence[str]],
        shared_prefix: Conversation | None = None,
    ) -> list[list[float]]:
        """For each context i, the summed log-probability of each string in options[i] as the
        continuation of the assistant turn that follows the context, up to a term shared by all
        options of that context: a backend may leave out the log-probability of the options'
        common leading tokens, which cancels whenever two options are compared. After the call,
        `last_one_pass[i]` says whether context i's options were read from one next-token
        distribution (`one_pass_split`) or scored one row per option."""
        ...


def one_pass_split(option_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[int]] | None:
    """(the shared leading tokens, each option's last token) when there are at least two options and
    each is the same leading tokens plus one distinct last token, as the labeller's "(A" / "(B" are:
    then one next-token distribution after the context and the leading tokens scores every option
    in one forward pass. None otherwise (the options are scored one row each)."""
    if len(option_ids) < 2 or any(not ids for ids in option_ids):
        return None
    shared = list(option_ids[0][:-1])
    lasts = [ids[-1] for ids in option_ids]
    if any(list(ids[:-1]) != shared for ids in option_ids) or len(set(lasts)) != len(lasts):
        return None
    return shared, lasts


def load_backend(
    model_ref: str,
    backend: BackendName = "transformers",
    *,
    batch_size: int = 16,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> GenerationBackend:
    """Open `model_ref` (see `cai_lib.models.resolve_model`) with the chosen backend.

    vLLM is imported only here, only when asked for, and is installed by the `[gpu]` extra.
    """
    if backend == "vllm":
        from cai_lib.vllm_backend import VLLMBackend

        return VLLMBackend(model_ref, chat_template=chat_template, trust_remote_code=trust_remote_code)
    from cai_lib.transformers_backend import TransformersBackend

    return TransformersBackend(
        model_ref, batch_size=batch_size, chat_template=chat_template, trust_remote_code=trust_remote_code
    )
