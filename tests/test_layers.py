"""ElasticMLP: the three routing modes agree with each other and with the reference."""

from __future__ import annotations

import pytest
import torch

from flextron import reference
from flextron.layers import ElasticMLP


def make(activation: str, device: str) -> ElasticMLP:
    torch.manual_seed(0)
    return ElasticMLP(32, 128, [128, 96, 64], activation=activation, device=device, dtype=torch.float64)


def reference_weights(mlp: ElasticMLP) -> dict:
    return {
        "w_up": mlp.up.weight,
        "w_down": mlp.down.weight,
        "w_gate": mlp.gate.weight if mlp.gate is not None else None,
        "b_up": mlp.up.bias,
        "b_down": mlp.down.bias,
    }


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_token_routing_matches_reference(device, activation, token_path):
    mlp = make(activation, device)
    x = torch.randn(3, 7, 32, dtype=torch.float64, device=device)
    choice = torch.randint(0, 3, (3, 7), device=device)
    out = mlp(x, choice)
    expected = reference.elastic_mlp(
        x.reshape(-1, 32),
        choice.reshape(-1),
        widths=mlp.widths,
        activation=activation,
        **reference_weights(mlp),
    )
    torch.testing.assert_close(out, expected.reshape(x.shape))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_static_and_per_sequence_equal_token_routing(device, activation, token_path):
    mlp = make(activation, device)
    x = torch.randn(4, 5, 32, dtype=torch.float64, device=device)
    for g in range(3):
        static = mlp(x, g)
        routed = mlp(x, torch.full((4, 5), g, device=device))
        torch.testing.assert_close(static, routed)
    per_sequence = torch.tensor([2, 0, 1, 0], device=device)
    out = mlp(x, per_sequence)
    for b in range(4):
        torch.testing.assert_close(out[b], mlp(x[b : b + 1], int(per_sequence[b]))[0])


def test_full_width_is_the_dense_mlp(device, token_path):
    mlp = make("swiglu", device)
    x = torch.randn(6, 32, dtype=torch.float64, device=device)
    dense = mlp.down(torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x))
    torch.testing.assert_close(mlp(x, 0), dense)
    torch.testing.assert_close(mlp(x, torch.zeros(6, dtype=torch.long, device=device)), dense)


def test_gradients_flow_to_parameters_and_scale(token_path):
    mlp = make("swiglu", "cpu")
    x = torch.randn(10, 32, dtype=torch.float64)
    scale = torch.rand(10, dtype=torch.float64, requires_grad=True)
    mlp(x, torch.randint(0, 3, (10,)), scale=scale).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    assert scale.grad is not None
    # Neurons no token uses get no gradient.
    mlp.zero_grad()
    mlp(x, torch.full((10,), 2)).sum().backward()
    assert torch.count_nonzero(mlp.up.weight.grad[64:]) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "relu"}, "activation must be one of"),
        ({"widths": [64, 128]}, "strictly decreasing"),
        ({"widths": [256, 64]}, "exceeds the available width 128"),
    ],
)
def test_rejects_bad_config(kwargs, match):
    args = {"hidden_size": 32, "intermediate_size": 128, "widths": [128, 64], "activation": "swiglu"} | kwargs
    with pytest.raises(ValueError, match=match):
        ElasticMLP(**args)


def test_rejects_bad_choice():
    mlp = make("swiglu", "cpu")
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"choice must be in \[0, 3\), got 3"):
        mlp(x, 3)
    with pytest.raises(ValueError, match="one entry per sequence or one per token"):
        mlp(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size 32"):
        mlp(torch.randn(2, 16, dtype=torch.float64), 0)
