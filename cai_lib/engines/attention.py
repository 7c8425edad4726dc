"""Grouped-query attention inside the SDPA kernel, on every device, with padding masks.

Models such as Llama, SmolLM2 and Qwen share each key/value head among several query heads
(GQA). transformers' "sdpa" attention hands the kernel the shared heads only on CUDA without a
mask (`use_gqa_in_sdpa` in `transformers/integrations/sdpa_attention.py`); otherwise it first
repeats every key/value head for its query heads (`repeat_kv`), a copy of the whole KV cache per
layer and per forward pass. Every batch here has a mask (left padding, the reused-history gaps of
the preallocated cache), so on a CPU each decoding step copied the whole cache: 58% of the time of
a batched critique-revision call on SmolLM2-135M (9 query heads over 3 key/value heads) in a
torch profile. torch's `scaled_dot_product_attention` takes `enable_gqa=True` with a mask on the
CPU too, and gives the same numbers, gradients included (`tests/test_attention.py`).

`GROUPED_SDPA` is that attention, registered with transformers' `AttentionInterface`, and with
the "sdpa" mask builder in its `AttentionMaskInterface` (an attention transformers does not know
otherwise gets no mask at all). `use_grouped_sdpa` switches a loaded CPU model to it; on a GPU the
models keep transformers' own choice.
"""

from __future__ import annotations

GROUPED_SDPA = "cai_grouped_sdpa"


def grouped_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' SDPA attention with the key/value heads shared inside the kernel
    (`enable_gqa`) instead of repeated; the other cases go to transformers' own function."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if not grouped or kwargs.get("position_bias") is not None or kwargs.get("output_attentions"):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers decides: the kernel's causal flag only for a prompt without a mask.
    causal = query.shape[2] > 1 and attention_mask is None and causal
    output = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=True,
    )
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `GROUPED_SDPA` a name transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def use_grouped_sdpa(model) -> None:
    """On a CPU, switch `model` from "sdpa" attention to `GROUPED_SDPA`; a model on an
    accelerator, or with any other attention, is left as it is (CUDA's fused SDPA kernels take
    no mask with `enable_gqa`, and a copy of the cache costs a GPU far less)."""
    import torch

    if model.device.type != "cpu" or torch.cuda.is_available():
        return  # a trainer moves a model loaded on the CPU to the GPU when it has one
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    register()
    model.set_attn_implementation(GROUPED_SDPA)


def grouped_sdpa_init_kwargs() -> dict:
    """`from_pretrained` keyword arguments that load a model with `GROUPED_SDPA` on a machine
    without a GPU (for trainers that load their model themselves, such as TRL's); none otherwise."""
    import torch

    if torch.cuda.is_available():
        return {}
    register()
    return {"attn_implementation": GROUPED_SDPA}
