"""Linear layers with a packed copy of their weight give the layer's results, keep its parameters,
and take the packed weight only where it is meant to run."""

from __future__ import annotations

import pytest
import torch

from cai_lib.engines.packed_linear import PACKED_ROWS, PackedLinear, pack_linear_layers

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def two_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 16, bias=False))


def test_every_float32_linear_layer_is_packed_in_place_with_its_parameters_kept():
    model = two_layers()
    parameters = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pack_linear_layers(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2], PackedLinear)
    assert list(model.parameters()) == parameters
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_packed_layer_gives_the_layers_results_at_every_row_count():
    model = two_layers()
    inputs = {rows: torch.randn(rows, 3, 24) for rows in (1, 16, 100)}  # 3, 48 and 300 rows
    with torch.no_grad():
        expected = {rows: model(x) for rows, x in inputs.items()}
        pack_linear_layers(model)
        for rows, x in inputs.items():
            assert torch.allclose(model(x), expected[rows], atol=1e-5)


def test_the_packed_weight_runs_for_a_few_rows_without_gradients_only(monkeypatch):
    model = two_layers()
    pack_linear_layers(model)
    calls = []
    packed = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or packed(*a))
    few, many = torch.randn(PACKED_ROWS.stop - 1, 24), torch.randn(PACKED_ROWS.stop, 24)
    with torch.no_grad():
        model(few)
        assert len(calls) == 2
        model(many)
        model(torch.randn(1, 24))
        assert len(calls) == 2
    model(few).sum().backward()  # with gradients, the layer's own path: the weights get them
    assert len(calls) == 2
    assert model[0].weight.grad is not None


def test_layers_in_another_dtype_are_left_as_they_are():
    model = two_layers().to(torch.float64)
    assert pack_linear_layers(model) == 0
    assert type(model[0]) is torch.nn.Linear
