"""Grouped-query attention in the SDPA kernel gives what transformers' own SDPA attention gives,
masks, padding and gradients included; only the copy of the key/value heads goes. Attention after
a prefix held once for a batch gives what attention over the prefix copied into each row gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cai_lib.engines.attention import (
    GROUPED_SDPA,
    SHARED_PREFIX,
    attend_after_shared_prefix,
    grouped_sdpa_init_kwargs,
    use_grouped_sdpa,
)
from cai_lib.engines.generation import SamplingParams
from cai_lib.engines.transformers_backend import TransformersBackend


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    grouped = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    use_grouped_sdpa(grouped)
    return plain.eval(), grouped.eval()


def padded_batch():
    # Left padding: the first row's two leading positions are masked out.
    ids = torch.tensor([[0, 0, 5, 9, 11, 3], [7, 8, 5, 9, 11, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def test_a_grouped_query_model_on_the_cpu_switches_to_grouped_sdpa(models):
    plain, grouped = models
    assert plain.config.num_key_value_heads < plain.config.num_attention_heads
    assert grouped.config._attn_implementation == GROUPED_SDPA


def test_grouped_sdpa_gives_the_same_logits_on_a_padded_batch(models):
    plain, grouped = models
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        got = grouped(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)


def test_grouped_sdpa_gives_the_same_gradients(models):
    plain, grouped = models
    ids, mask = padded_batch()
    grads = []
    for model in (plain, grouped):
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        grads.append(model.model.layers[0].self_attn.k_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_an_eager_model_keeps_its_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    use_grouped_sdpa(eager)
    assert eager.config._attn_implementation == "eager"


def test_trainers_that_load_their_own_model_get_grouped_sdpa_on_a_cpu():
    assert grouped_sdpa_init_kwargs() == {"attn_implementation": GROUPED_SDPA}


def test_batched_generation_replies_as_transformers_sdpa_does(tiny_model_dir):
    conversations = [
        [{"role": "user", "content": "Hi."}],
        [{"role": "user", "content": "Tell me a much longer story about the sea and the sky, please."}],
    ]
    params = SamplingParams(max_new_tokens=12)
    grouped = TransformersBackend(str(tiny_model_dir), batch_size=2)
    assert grouped.model.config._attn_implementation == GROUPED_SDPA
    plain = TransformersBackend(str(tiny_model_dir), batch_size=2)
    plain.model.set_attn_implementation("sdpa")
    assert grouped.generate(conversations, params) == plain.generate(conversations, params)


def concatenated_attention(query, key, value, mask, prefix_keys, prefix_values):
    """The reference: one attention over the prefix and each row's own keys, the prefix seen by all."""
    rows = query.shape[0]
    keys = torch.cat([prefix_keys.expand(rows, -1, -1, -1), key], dim=2)
    values = torch.cat([prefix_values.expand(rows, -1, -1, -1), value], dim=2)
    seen = torch.ones(rows, 1, query.shape[2], prefix_keys.shape[2], dtype=torch.bool)
    full_mask = torch.cat([seen, mask], dim=3)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=full_mask, enable_gqa=True).transpose(1, 2)


@pytest.mark.parametrize("queries", [1, 4], ids=["decoding-step", "prompt"])
def test_attention_after_a_shared_prefix_equals_one_attention_over_the_concatenated_keys(queries):
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, own, prefix, width = 3, 6, 2, 7, 5, 8
    query = torch.randn(rows, heads, queries, width, generator=generator)
    key, value = (torch.randn(rows, kv_heads, own, width, generator=generator) for _ in range(2))
    prefix_keys, prefix_values = (torch.randn(1, kv_heads, prefix, width, generator=generator) for _ in range(2))
    mask = torch.rand(rows, 1, queries, own, generator=generator) > 0.3
    mask[0, :, 0, :] = False  # a query that sees none of its row's own keys (left padding)
    got = attend_after_shared_prefix(query, key, value, mask, width**-0.5, prefix_keys, prefix_values)
    expected = concatenated_attention(query, key, value, mask, prefix_keys, prefix_values)
    assert got.shape == (rows, queries, heads, width)
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_model_attending_after_a_held_prefix_gives_the_logits_of_the_full_sequence(models):
    from transformers import DynamicCache

    _, grouped = models
    prefix, rest = torch.tensor([[3, 8, 12, 5, 7]]), torch.tensor([[9, 4, 11], [6, 2, 10]])
    held = DynamicCache(config=grouped.config)
    with torch.no_grad():
        grouped(input_ids=prefix, past_key_values=held)
        got = grouped(
            input_ids=rest,
            position_ids=torch.arange(5, 8).expand(2, 3),
            **{SHARED_PREFIX: held},
        ).logits
        expected = grouped(input_ids=torch.cat([prefix.expand(2, -1), rest], dim=1)).logits[:, 5:]
    assert torch.allclose(got, expected, atol=1e-5)
