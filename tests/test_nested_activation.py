"""nested_activation (SwiGLU / GELU / GELU-tanh inside each row's width) against reference.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flextron
from flextron import reference
from tests.helpers import assert_close_to_reference, random_choice

ops = torch.ops.flextron
ACTIVATIONS = ["swiglu", "gelu", "gelu_tanh"]


def make_inputs(tokens, cols, widths, activation, dtype, device, gen):
    plan = flextron.route_plan(random_choice(tokens, len(widths), device, gen), widths)
    h = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) * 3
    gate = (
        torch.randn(tokens, cols, generator=gen, dtype=torch.float64) * 3 if activation == "swiglu" else None
    )
    return plan, h, gate


def run_all(plan, h, gate, widths, activation, dtype, device):
    def cast(t, dt, dev):
        return None if t is None else t.to(dt).to(dev)

    ours = flextron.nested_activation(
        cast(h, dtype, device), plan.offsets, widths, activation, cast(gate, dtype, device)
    )
    offsets = plan.offsets.cpu()
    low = reference.nested_activation(
        cast(h, dtype, "cpu"), offsets, widths, activation, cast(gate, dtype, "cpu")
    )
    exact = reference.nested_activation(h, offsets, widths, activation, gate)
    return ours, low, exact


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 50),
    extra=st.integers(0, 7),
    widths=st.lists(st.integers(1, 30), min_size=1, max_size=4, unique=True).map(
        lambda w: sorted(w, reverse=True)
    ),
    activation=st.sampled_from(ACTIVATIONS),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_cpu(tokens, extra, widths, activation, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    plan, h, gate = make_inputs(tokens, widths[0] + extra, widths, activation, dtype, "cpu", gen)
    assert_close_to_reference(*run_all(plan, h, gate, widths, activation, dtype, "cpu"))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_device(device, activation, dtype):
    gen = torch.Generator().manual_seed(1)
    widths = [1024, 768, 512, 256]
    plan, h, gate = make_inputs(333, 1040, widths, activation, dtype, device, gen)
    ours, low, exact = run_all(plan, h, gate, widths, activation, dtype, device)
    assert_close_to_reference(ours, low, exact)
    # Past each row's width: exact zeros, whatever the inputs there.
    bounds = plan.offsets.tolist()
    for g, d in enumerate(widths):
        assert torch.count_nonzero(ours[bounds[g] : bounds[g + 1], d:]) == 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation):
    gen = torch.Generator().manual_seed(2)
    widths = [9, 5, 2]
    plan, h, gate = make_inputs(13, 11, widths, activation, torch.float64, "cpu", gen)
    inputs = (h.requires_grad_(),) + ((gate.requires_grad_(),) if gate is not None else ())

    def f(h, gate=None):
        return flextron.nested_activation(h, plan.offsets, widths, activation, gate)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_reference(device, activation):
    gen = torch.Generator().manual_seed(3)
    widths = [64, 40, 16]
    plan, h, gate = make_inputs(70, 72, widths, activation, torch.float32, device, gen)
    weights = torch.randn(70, 72, generator=gen, dtype=torch.float64)

    def grads(fn, dt, dev, offsets):
        leaves = [t.to(dt).to(dev).requires_grad_() for t in (h, gate) if t is not None]
        out = fn(leaves[0], offsets, widths, activation, leaves[1] if len(leaves) > 1 else None)
        (out * weights.to(dt).to(dev)).sum().backward()
        return [leaf.grad for leaf in leaves]

    ours = grads(flextron.nested_activation, torch.float32, device, plan.offsets)
    low = grads(reference.nested_activation, torch.float32, "cpu", plan.offsets.cpu())
    exact = grads(reference.nested_activation, torch.float64, "cpu", plan.offsets.cpu())
    for o, lo, ex in zip(ours, low, exact, strict=True):
        assert_close_to_reference(o, lo, ex)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(4)
    plan, h, gate = make_inputs(20, 24, [24, 16, 8], "swiglu", torch.float32, device, gen)
    h, gate = h.float().to(device).requires_grad_(), gate.float().to(device).requires_grad_()
    torch.library.opcheck(ops.nested_activation.default, (h, gate, plan.offsets, plan.widths, "swiglu"))
    torch.library.opcheck(ops.nested_activation.default, (h, None, plan.offsets, plan.widths, "gelu_tanh"))
    grad = torch.randn_like(h)
    torch.library.opcheck(
        ops.nested_activation_backward.default,
        (grad, h.detach(), gate.detach(), plan.offsets, plan.widths, "swiglu"),
    )


def test_one_row_and_no_rows():
    one = torch.randn(1, 8)
    out = flextron.nested_activation(one, torch.tensor([0, 0, 1], dtype=torch.int32), [8, 4], "gelu")
    torch.testing.assert_close(out[:, :4], torch.nn.functional.gelu(one[:, :4]))
    assert torch.count_nonzero(out[:, 4:]) == 0
    empty = flextron.nested_activation(torch.empty(0, 8), torch.zeros(3, dtype=torch.int32), [8, 4], "gelu")
    assert empty.shape == (0, 8)


def test_non_contiguous():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(16, 30, generator=gen).t()  # [30, 16]
    gate = torch.randn(30, 32, generator=gen)[:, ::2]
    plan = flextron.route_plan(torch.randint(0, 2, (30,), generator=gen), [16, 8])
    torch.testing.assert_close(
        flextron.nested_activation(h, plan.offsets, plan.widths, "swiglu", gate),
        reference.nested_activation(h, plan.offsets, [16, 8], "swiglu", gate),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "relu"}, "activation must be 'swiglu', 'gelu' or 'gelu_tanh', got 'relu'"),
        ({"activation": "swiglu", "gate": None}, "activation 'swiglu' needs gate"),
        ({"activation": "gelu", "gate": torch.randn(4, 8)}, "gate is only used by activation 'swiglu'"),
        ({"activation": "swiglu", "gate": torch.randn(4, 6)}, "gate must have the shape of h"),
        ({"activation": "swiglu", "gate": torch.randn(4, 8).double()}, "same dtype"),  # TypeError
        ({"activation": "gelu", "widths": [16, 4]}, r"widths\[0\]=16 exceeds D"),
        (
            {"activation": "gelu", "offsets": torch.tensor([0, 1, 3], dtype=torch.int32)},
            "must end at the number of rows M=4",
        ),
    ],
)
def test_rejects_bad_input(kwargs, match):
    args = {
        "h": torch.randn(4, 8),
        "offsets": torch.tensor([0, 1, 4], dtype=torch.int32),
        "widths": [8, 4],
        "gate": None,
    }
    args.update(kwargs)
    with pytest.raises(TypeError if match == "same dtype" else ValueError, match=match):
        ops.nested_activation(
            args["h"],
            args["gate"],
            args["offsets"],
            flextron.ops.as_widths(args["widths"]),
            args["activation"],
        )
