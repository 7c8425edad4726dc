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

It also attends over a shared prefix held once for the whole batch (`SHARED_PREFIX`): keys and
values that every row of the batch sees in full before its own, such as the constitution's
few-shot examples. Copied into each row's cache, a decoding step would read the same prefix once
per row, a matrix-vector product per row that runs at memory speed on a CPU. Held once, the
rows' queries are stacked into one long query per key/value head and meet the prefix in one
kernel call, a matrix-matrix product. The rows' own keys take a second call, and the two are
merged exactly by their log-sum-exp (the split softmax of flash attention).
"""

from __future__ import annotations

GROUPED_SDPA = "cai_grouped_sdpa"
# The forward keyword that carries the shared prefix's KV (a transformers `Cache` of one row) to
# `GROUPED_SDPA`; transformers passes unknown forward keywords on to the attention function.
SHARED_PREFIX = "cai_shared_prefix"


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

    shared_prefix = kwargs.pop(SHARED_PREFIX, None)
    if shared_prefix is not None:
        layer = shared_prefix.layers[module.layer_idx]
        return attend_after_shared_prefix(query, key, value, attention_mask, scaling, layer.keys, layer.values), None
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


def attend_after_shared_prefix(query, key, value, attention_mask, scaling, prefix_keys, prefix_values):
    """Attention of `query` ([batch, heads, queries, head_dim]) over `prefix_keys`/`prefix_values`
    ([1, kv_heads, prefix, head_dim], seen in full by every query) followed by each row's own
    `key`/`value` ([batch, kv_heads, keys, head_dim], under `attention_mask`, transformers' 4-D
    mask: True or 0 where a key is seen). The same numbers as one attention over the concatenated
    keys, up to floating-point rounding; `[batch, queries, heads, head_dim]`, as transformers'
    attention functions return."""
    import torch

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, heads, queries, width = query.shape
    kv_heads = prefix_keys.shape[1]
    groups = heads // kv_heads
    # Every query of every row attends to the same prefix: one query sequence per key/value head.
    stacked = query.reshape(batch, kv_heads, groups * queries, width).transpose(0, 1)
    stacked = stacked.reshape(1, kv_heads, batch * groups * queries, width)
    prefix_out, prefix_lse = flash(stacked, prefix_keys, prefix_values, 0.0, False, attn_mask=None, scale=scaling)
    prefix_out = prefix_out.reshape(kv_heads, batch, groups * queries, width).transpose(0, 1)
    prefix_out = prefix_out.reshape(batch, heads, queries, width)
    prefix_lse = prefix_lse.reshape(kv_heads, batch, groups * queries).transpose(0, 1).reshape(batch, heads, queries)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        # The kernel takes an additive mask. The dtype's minimum, not -inf: a query that sees none
        # of its row's keys (left padding) then gets a log-sum-exp near the minimum, and weight 0
        # below, where -inf would give it 0 and the weight of a real key.
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min
        )
    if queries == 1:
        # A decoding step: a row's query heads that share a key/value head read its keys in one
        # pass, as one query sequence, instead of one pass each (the kernel is memory-bound here).
        own_out, own_lse = flash(
            query.reshape(batch, kv_heads, groups, width), key, value, 0.0, False, attn_mask=mask, scale=scaling
        )
        own_out, own_lse = own_out.reshape(batch, heads, 1, width), own_lse.reshape(batch, heads, 1)
    else:
        causal = mask is None  # as transformers decides: the kernel's causal flag only without a mask
        own_out, own_lse = flash(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
    lse = torch.logaddexp(prefix_lse, own_lse)
    output = prefix_out * (prefix_lse - lse).exp().unsqueeze(-1) + own_out * (own_lse - lse).exp().unsqueeze(-1)
    return output.to(query.dtype).transpose(1, 2).contiguous()


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
