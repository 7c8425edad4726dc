"""Linear layers whose weights are prepacked for oneDNN, for batched decoding on a CPU.

A decoding step multiplies a few rows, one per conversation of the batch, by every weight matrix
of the model. On a CPU, `torch.nn.functional.linear` then spends much of each call rearranging
the weight into the blocked layout its matrix kernel reads, work that does not depend on the
input. `torch.ops.mkldnn._reorder_linear_weight` does it once, and
`torch.ops.mkldnn._linear_pointwise` multiplies by the packed weight; it is how PyTorch's own
compiler (`torch/_inductor/fx_passes/mkldnn_fusion.py`) runs frozen linear layers on a CPU. On 2
x86-64 cores (AVX2), float32, 32 rows: 85 → 118 GFLOP/s for SmolLM2-135M's 576×576 projections,
118 → 137 for 576→1536, 91 → 105 for 1536→576 and 62 → 119 for its lm_head (576→49152). For a
single row and for prompt-sized inputs (hundreds of rows and more) the default path is as fast or
faster, so `PackedLinear` takes the packed weight only for `PACKED_ROWS`.

The packed weight is a second copy of the layer's weight, made when the layer is packed: a model
whose weights change afterwards (training) must not be packed. `TransformersBackend` packs the
models it loads for inference on a CPU; the results equal the unpacked layer's up to
floating-point rounding (`tests/test_packed_linear.py`).
"""

from __future__ import annotations

import torch

# Input rows (all leading dimensions together) for which the packed weight is used.
PACKED_ROWS = range(2, 129)


class PackedLinear(torch.nn.Linear):
    """A `torch.nn.Linear` with a packed copy of its weight (`packed_weight`: not a parameter or a
    buffer, so the state dict is unchanged), used for inputs of `PACKED_ROWS` rows when no
    gradient is recorded."""

    packed_weight: torch.Tensor

    def forward(self, input):
        if input.numel() // self.in_features in PACKED_ROWS and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(input, self.packed_weight, self.bias, "none", [], "")
        return super().forward(input)


def pack_linear_layers(model) -> int:
    """Turn every float32 `torch.nn.Linear` of `model` (a CPU model used for inference only) into
    a `PackedLinear`, in place: the same module with the same parameters, its class changed and a
    packed copy of its weight added. Returns how many layers were packed (0 where oneDNN is not
    available or cannot pack the weights)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    packed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu":
            try:
                weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACKED_ROWS.stop - 1)
            except RuntimeError:
                return packed  # this build or CPU cannot pack; the layers left keep the default path
            module.__class__ = PackedLinear
            module.packed_weight = weight
            packed += 1
    return packed
