"""The generation interface every stage uses, and the registry that picks a backend.

Conversations are `cai_lib.core.conversation.Conversation`s. `shared_prefix` is a run of messages that precedes
every conversation of a call (the constitution's few-shot examples): backends encode it once
(a reused KV cache in transformers, prefix caching in vLLM).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cai_lib.core.config import Seed
from cai_lib.core.conversation import Conversation
from cai_lib.core.errors import CaiError
from cai_lib.core.names import canonical_sha256

BackendName = Literal["transformers", "vllm"]


class SamplingParams(BaseModel):
    """How to sample a reply. temperature 0 means greedy decoding."""

    max_new_tokens: int = Field(default=256, ge=1, description="Upper bound on generated tokens per reply.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 for greedy; >0 samples.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    seed: Seed = Field(
        default=0,
        description="Seed for sampling; the same seed and conversation give the same reply, whatever "
        "else is in the batch or shard.",
    )


def conversation_seed(seed: int, conversation: Conversation, shared_prefix: Conversation | None = None) -> int:
    """The sampling seed of one conversation: fixed by the call's seed and the conversation's
    content, so a reply does not depend on which batch, shard or shard count it was sampled in."""
    return int(canonical_sha256([seed, list(shared_prefix or []), list(conversation)])[:8], 16) >> 1


class EngineConfig(BaseModel):
    """How a vLLM engine is sized to its pod (the transformers backend ignores it).

    Tensor parallelism follows the pod's GPUs: one engine spans every GPU its pod is given, so a
    model too big for one GPU fits by giving the stage more. Data parallelism comes from the
    fan-out instead (one engine per shard pod), which needs no coordination between engines and
    lets a killed pod lose only its shard.
    """

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(
        default=0,
        ge=0,
        description="GPUs one engine shards the model over; 0 takes every GPU the pod sees (the stage's "
        "accelerator_count). Must divide the model's attention heads.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Share of each GPU's memory the engine may take."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Longest prompt plus reply, in tokens; None takes the model's own. A prompt longer than "
        "this is refused before the stage's work starts, naming its row.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights and activations; auto takes the checkpoint's."
    )
    enforce_eager: bool = Field(
        default=False, description="Skip CUDA graph capture: slower decoding, less memory, faster start."
    )


# Engine fields that change how rows are computed, not what they are: left out of output keys.
ENGINE_SIZING = {"tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager"}


def engine_kwargs(engine: EngineConfig, model_config: dict, visible_gpus: int) -> dict:
    """Keyword arguments for `vllm.LLM` sizing it as `engine` asks on a pod that sees
    `visible_gpus` GPUs, for a model whose Hugging Face `config.json` is `model_config`.
    Raises `CaiError` (one line) for a size that cannot work, before any weights load."""
    size = engine.tensor_parallel_size or visible_gpus
    if visible_gpus < 1:
        raise CaiError(
            "engine: the vllm backend needs a GPU and this pod sees none; give the stage an accelerator "
            "(deploy.resources) or use backend transformers"
        )
    if size > visible_gpus:
        raise CaiError(
            f"engine.tensor_parallel_size: {size} GPUs asked for, but this pod sees {visible_gpus}; raise the "
            "stage's accelerator_count or lower tensor_parallel_size"
        )
    heads = model_config.get("num_attention_heads") or model_config.get("text_config", {}).get(
        "num_attention_heads"
    )
    if heads and heads % size:
        divisors = [d for d in range(1, min(heads, visible_gpus) + 1) if heads % d == 0]
        raise CaiError(
            f"engine.tensor_parallel_size: {size} does not divide the model's {heads} attention heads; "
            f"use one of {divisors}"
        )
    kwargs = {
        "tensor_parallel_size": size,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "dtype": engine.dtype,
        "enforce_eager": engine.enforce_eager,
        "enable_prefix_caching": True,
    }
    if engine.max_model_len:
        kwargs["max_model_len"] = engine.max_model_len
    return kwargs


def check_fits(
    backend, rows: Sequence[tuple[str, Conversation]], shared_prefix: Conversation | None, where: str
) -> None:
    """Refuse, naming the first row, any prompt longer than the backend's `max_model_len` (when it
    has one): checked before a stage's work starts, not when the engine meets the row."""
    limit = getattr(backend, "max_model_len", None)
    if not limit:
        return
    prefix = list(shared_prefix or [])
    for row_id, conversation in rows:
        length = len(backend.chat.encode(prefix + list(conversation)))
        if length > limit:
            raise CaiError(
                f"{where}: row {row_id}: its prompt is {length} tokens, more than engine.max_model_len "
                f"{limit}; raise max_model_len (the model allows its max_position_embeddings) or shorten the row"
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


# The backends, by name: each is imported only when asked for (vLLM is installed by the [gpu]
# extra and needs a GPU), as vLLM keeps its own model registry lazily as module and class names
# (vllm/model_executor/models/registry.py). A backend module registers its class on import.
BACKEND_MODULES: dict[str, str] = {
    "transformers": "cai_lib.engines.transformers_backend",
    "vllm": "cai_lib.engines.vllm_backend",
}
_BACKENDS: dict[str, type] = {}


def register_backend(name: str) -> Callable[[type], type]:
    """A class decorator: the class is what `load_backend(..., backend=name)` opens."""

    def register(backend: type) -> type:
        _BACKENDS[name] = backend
        return backend

    return register


def load_backend(
    model_ref: str,
    backend: BackendName = "transformers",
    *,
    batch_size: int = 16,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    engine: EngineConfig | None = None,
) -> GenerationBackend:
    """Open `model_ref` (see `cai_lib.engines.models.resolve_model`) with the chosen backend; a vLLM
    engine is sized by `engine`, the transformers backend batches `batch_size` rows."""
    if backend not in _BACKENDS:
        importlib.import_module(BACKEND_MODULES[backend])
    options = {"engine": engine} if backend == "vllm" else {"batch_size": batch_size}
    return _BACKENDS[backend](
        model_ref, chat_template=chat_template, trust_remote_code=trust_remote_code, **options
    )
