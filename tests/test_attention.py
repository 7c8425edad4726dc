"""Grouped-query attention in the SDPA kernel gives what transformers' own SDPA attention gives,
masks, padding and gradients included; only the copy of the key/value heads goes."""

from __future__ import annotations

import pytest
import torch

from cai_lib.engines.attention import GROUPED_SDPA, grouped_sdpa_init_kwargs, use_grouped_sdpa
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
