"""elastic_mlp (route_plan -> permute -> nested GEMMs -> activation -> unpermute) against a
per-token reference that slices the dense MLP to each token's width."""

from __future__ import annotations

import pytest
import torch

import flextron
from flextron import reference
from tests.helpers import assert_close_to_reference

ACTIVATIONS = ["swiglu", "gelu", "gelu_tanh"]


def make_mlp(hidden: int, inner: int, activation: str, gen: torch.Generator, bias: bool):
    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5

    params = {"w_up": rand(inner, hidden), "w_down": rand(hidden, inner)}
    if activation == "swiglu":
        params["w_gate"] = rand(inner, hidden)
    if bias:
        params["b_up"] = rand(inner)
        params["b_down"] = rand(hidden)
    return params


def cast(params, dtype, device):
    return {k: v.to(dtype).to(device) for k, v in params.items()}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_scale", [False, True])
def test_elastic_mlp_matches_reference(device, activation, dtype, with_scale):
    gen = torch.Generator().manual_seed(0)
    hidden, inner, widths = 64, 256, [256, 192, 128, 64]
    params = make_mlp(hidden, inner, activation, gen, bias=activation != "swiglu")
    x = torch.randn(150, hidden, generator=gen, dtype=torch.float64)
    choice = torch.randint(0, len(widths), (150,), generator=gen)
    scale = torch.rand(150, generator=gen, dtype=torch.float64) if with_scale else None

    def call(fn, dt, dev):
        s = scale.to(dt).to(dev) if scale is not None else None
        return fn(
            x.to(dt).to(dev),
            choice.to(dev),
            widths=widths,
            activation=activation,
            scale=s,
            **cast(params, dt, dev),
        )

    ours = call(flextron.elastic_mlp, dtype, device)
    assert_close_to_reference(
        ours, call(reference.elastic_mlp, dtype, "cpu"), call(reference.elastic_mlp, torch.float64, "cpu")
    )


def test_full_width_equals_dense_mlp(device):
    gen = torch.Generator().manual_seed(1)
    params = cast(make_mlp(32, 128, "swiglu", gen, bias=False), torch.float32, device)
    x = torch.randn(4, 9, 32, generator=gen).to(device)  # leading batch dims are kept
    choice = torch.zeros(36, dtype=torch.long, device=device)
    out = flextron.elastic_mlp(x, choice, widths=[128, 64], **params)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference.dense_mlp(x, **params))


def test_one_token_and_no_tokens(device):
    gen = torch.Generator().manual_seed(2)
    params = cast(make_mlp(16, 64, "gelu", gen, bias=True), torch.float32, device)
    one = torch.randn(1, 16, generator=gen).to(device)
    choice = torch.tensor([1], device=device)
    torch.testing.assert_close(
        flextron.elastic_mlp(one, choice, widths=[64, 32], activation="gelu", **params),
        reference.elastic_mlp(one, choice, widths=[64, 32], activation="gelu", **params),
    )
    none = torch.empty(0, 16, device=device)
    out = flextron.elastic_mlp(
        none, torch.empty(0, dtype=torch.long, device=device), widths=[64, 32], activation="gelu", **params
    )
    assert out.shape == (0, 16)


def test_gradients_match_reference():
    gen = torch.Generator().manual_seed(3)
    widths = [96, 64, 32]
    params = make_mlp(24, 96, "swiglu", gen, bias=False)
    x = torch.randn(40, 24, generator=gen, dtype=torch.float64)
    choice = torch.randint(0, 3, (40,), generator=gen)
    scale = torch.rand(40, generator=gen, dtype=torch.float64)

    def grads(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in {**params, "x": x, "scale": scale}.items()}
        out = fn(leaves["x"], choice, widths=widths, scale=leaves["scale"], **{k: leaves[k] for k in params})
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        return {k: v.grad for k, v in leaves.items()}

    ours, ref = grads(flextron.elastic_mlp), grads(reference.elastic_mlp)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], msg=name)


def test_gradcheck():
    gen = torch.Generator().manual_seed(4)
    params = make_mlp(6, 12, "gelu", gen, bias=True)
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    choice = torch.randint(0, 3, (7,), generator=gen)
    names = list(params)
    leaves = [params[n].requires_grad_() for n in names]

    def f(x, *weights):
        return flextron.elastic_mlp(
            x, choice, widths=[12, 8, 3], activation="gelu", **dict(zip(names, weights, strict=True))
        )

    assert torch.autograd.gradcheck(f, (x, *leaves))


def test_reused_plan():
    gen = torch.Generator().manual_seed(5)
    params = make_mlp(8, 32, "swiglu", gen, bias=False)
    x = torch.randn(10, 8, generator=gen, dtype=torch.float64)
    choice = torch.randint(0, 2, (10,), generator=gen)
    plan = flextron.route_plan(choice, [32, 16])
    torch.testing.assert_close(
        flextron.elastic_mlp(x, choice, widths=[32, 16], plan=plan, **params),
        flextron.elastic_mlp(x, choice, widths=[32, 16], **params),
    )
    with pytest.raises(ValueError, match=r"plan\.widths"):
        flextron.elastic_mlp(x, choice, widths=[32, 8], plan=plan, **params)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"activation": "relu", "w_gate": None}, ValueError, "activation must be"),
        ({"w_gate": None}, ValueError, "needs w_gate"),
        ({"activation": "gelu"}, ValueError, "w_gate is only used"),
        ({"widths": [64, 16]}, ValueError, r"widths\[0\]=64 exceeds the available width 32"),
        ({"widths": [16, 32]}, ValueError, "strictly decreasing"),
        ({"w_down": torch.randn(8, 16)}, ValueError, r"w_down must be \[H=8, D=32\]"),
        ({"choice": torch.zeros(3, dtype=torch.long)}, ValueError, "one entry per token"),
    ],
)
def test_rejects_bad_input(change, error, match):
    gen = torch.Generator().manual_seed(6)
    kwargs = {"widths": [32, 16], "activation": "swiglu", "choice": torch.zeros(10, dtype=torch.long)}
    kwargs.update({k: v.float() for k, v in make_mlp(8, 32, "swiglu", gen, bias=False).items()})
    kwargs.update(change)
    with pytest.raises(error, match=match):
        flextron.elastic_mlp(torch.randn(10, 8), **kwargs)
