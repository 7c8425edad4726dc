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
        default=0, description="Seed for sampling; the same seed and inputs give the same replies."
    )


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
        continuation of the assistant turn that follows the context."""
        ...


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
