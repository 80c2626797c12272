"""route_plan, permute and unpermute against reference.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flextron
from flextron import reference
from tests.helpers import random_choice

ops = torch.ops.flextron
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --- route_plan ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 300), groups=st.integers(1, 9), seed=st.integers(0, 2**31 - 1), int32=st.booleans()
)
def test_route_plan_matches_reference_cpu(tokens, groups, seed, int32):
    gen = torch.Generator().manual_seed(seed)
    choice = random_choice(tokens, groups, "cpu", gen, torch.int32 if int32 else torch.int64)
    perm, offsets = ops.route_plan(choice, groups)
    ref_perm, ref_offsets = reference.route_plan(choice, groups)
    assert perm.dtype == torch.int64 and offsets.dtype == torch.int32
    assert torch.equal(perm, ref_perm)
    assert torch.equal(offsets, ref_offsets)


def test_route_plan_device(device):
    gen = torch.Generator().manual_seed(0)
    for tokens, groups in [(0, 3), (1, 1), (1, 4), (1000, 4), (70000, 7), (513, 64)]:
        choice = random_choice(tokens, groups, device, gen)
        perm, offsets = ops.route_plan(choice, groups)
        ref_perm, ref_offsets = reference.route_plan(choice.cpu(), groups)
        assert perm.device.type == device
        assert torch.equal(perm.cpu(), ref_perm), (tokens, groups)
        assert torch.equal(offsets.cpu(), ref_offsets), (tokens, groups)


def test_route_plan_is_stable_and_widest_first():
    choice = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    plan = flextron.route_plan(choice, [256, 128, 64])
    assert plan.perm.tolist() == [1, 3, 6, 2, 5, 0, 4]
    assert plan.offsets.tolist() == [0, 3, 5, 7]
    assert plan.widths.tolist() == [256, 128, 64]
    assert plan.widths.device.type == "cpu" and plan.widths.dtype == torch.int32
    assert plan.num_groups == 3 and plan.num_tokens == 7


def test_route_plan_all_tokens_one_group_and_empty_groups():
    choice = torch.full((10,), 1)
    plan = flextron.route_plan(choice, [64, 32, 16])
    assert plan.perm.tolist() == list(range(10))
    assert plan.offsets.tolist() == [0, 0, 10, 10]


@pytest.mark.parametrize(
    ("choice", "widths", "error", "match"),
    [
        (torch.tensor([0, 3]), [64, 32, 16], ValueError, r"choice values must be in \[0, 3\), got 3"),
        (torch.tensor([0, -1]), [64, 32], ValueError, r"got -1"),
        (torch.tensor([0.0, 1.0]), [64, 32], TypeError, "choice must be int32 or int64"),
        (torch.zeros(2, 2, dtype=torch.long), [64, 32], ValueError, r"choice must be 1-D"),
        (torch.tensor([0, 1]), [32, 64], ValueError, r"strictly decreasing, got \[32, 64\]"),
        (torch.tensor([0, 1]), [64, 64], ValueError, "strictly decreasing"),
        (torch.tensor([0, 1]), [], ValueError, "must not be empty"),
        (torch.tensor([0, 1]), [64, 0], ValueError, "must be positive"),
        (torch.tensor([0, 1]), [64.0, 32.0], TypeError, "must be integers"),
        ([0, 1], [64, 32], TypeError, "choice must be a tensor"),
    ],
)
def test_route_plan_rejects_bad_input(choice, widths, error, match):
    with pytest.raises(error, match=match):
        flextron.route_plan(choice, widths)


def test_route_plan_rejects_too_many_groups():
    with pytest.raises(ValueError, match=r"num_groups must be in \[1, 64\]"):
        ops.route_plan(torch.zeros(3, dtype=torch.long), 65)


# --- permute / unpermute ------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(0, 64),
    cols=st.integers(1, 40),
    groups=st.integers(1, 5),
    dtype=st.sampled_from(DTYPES),
    with_scale=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_permute_unpermute_match_reference_cpu(tokens, cols, groups, dtype, with_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen).to(dtype)
    plan = flextron.route_plan(random_choice(tokens, groups, "cpu", gen), list(range(groups, 0, -1)))
    xs = flextron.permute(x, plan)
    assert torch.equal(xs, reference.permute(x, plan.perm))
    scale = torch.rand(tokens, generator=gen).to(dtype) if with_scale else None
    back = flextron.unpermute(xs, plan, scale)
    expected = reference.unpermute(xs, plan.perm, scale)
    if scale is None:
        assert torch.equal(back, x)
    torch.testing.assert_close(
        back, expected, rtol=0, atol=0
    ) if dtype == torch.float32 else torch.testing.assert_close(back, expected)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("cols", [1, 3, 8, 33, 4096])
def test_permute_roundtrip_device(device, dtype, cols):
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(257, cols, generator=gen).to(dtype).to(device)
    plan = flextron.route_plan(random_choice(257, 4, device, gen), [4, 3, 2, 1])
    xs = flextron.permute(x, plan)
    assert torch.equal(xs.cpu(), x.cpu()[plan.perm.cpu()])
    assert torch.equal(flextron.unpermute(xs, plan), x)
    scale = torch.rand(257, generator=gen).to(dtype).to(device)
    torch.testing.assert_close(flextron.unpermute(xs, plan, scale), x * scale[:, None])


def test_permute_edge_cases(device):
    empty = torch.empty(0, 5, device=device)
    plan = flextron.route_plan(torch.empty(0, dtype=torch.long, device=device), [8])
    assert flextron.permute(empty, plan).shape == (0, 5)
    assert flextron.unpermute(empty, plan, torch.empty(0, device=device)).shape == (0, 5)
    one = torch.randn(1, 7, device=device)
    plan = flextron.route_plan(torch.zeros(1, dtype=torch.long, device=device), [8, 4])
    assert torch.equal(flextron.unpermute(flextron.permute(one, plan), plan), one)
    # Rank-3 rows (tokens x heads x dim) move as whole rows.
    x = torch.randn(6, 2, 3, device=device)
    plan = flextron.route_plan(torch.tensor([1, 0, 1, 0, 1, 0], device=device), [8, 4])
    assert torch.equal(flextron.permute(x, plan), x[plan.perm])


def test_permute_non_contiguous(device):
    base = torch.randn(40, 64, device=device)
    x = base[:, ::2]  # strided columns
    xt = torch.randn(16, 40, device=device).t()  # transposed
    for tensor in (x, xt):
        plan = flextron.route_plan(torch.randint(0, 3, (40,), device=device), [3, 2, 1])
        assert torch.equal(flextron.permute(tensor, plan), tensor[plan.perm])
        scale = torch.rand(80, device=device)[::2]
        torch.testing.assert_close(
            flextron.unpermute(tensor, plan, scale), reference.unpermute(tensor, plan.perm, scale)
        )


def test_permute_unpermute_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = torch.rand(9, dtype=torch.float64, generator=gen, requires_grad=True)
    plan = flextron.route_plan(torch.randint(0, 3, (9,), generator=gen), [3, 2, 1])
    assert torch.autograd.gradcheck(lambda t: flextron.permute(t, plan), (x,))
    assert torch.autograd.gradcheck(lambda t, s: flextron.unpermute(t, plan, s), (x, scale))
    assert torch.autograd.gradgradcheck(lambda t: flextron.permute(t, plan), (x,))


def test_unpermute_scale_gradient_matches_reference():
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(12, 6, generator=gen, requires_grad=True)
    scale = torch.rand(12, generator=gen, requires_grad=True)
    plan = flextron.route_plan(torch.randint(0, 4, (12,), generator=gen), [4, 3, 2, 1])
    weights = torch.randn(12, 6, generator=gen)
    (flextron.unpermute(y, plan, scale) * weights).sum().backward()
    y2 = y.detach().clone().requires_grad_()
    s2 = scale.detach().clone().requires_grad_()
    (reference.unpermute(y2, plan.perm, s2) * weights).sum().backward()
    torch.testing.assert_close(y.grad, y2.grad)
    torch.testing.assert_close(scale.grad, s2.grad)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    choice = random_choice(33, 3, device, gen)
    x = torch.randn(33, 16, generator=gen).to(device).requires_grad_()
    scale = torch.rand(33, generator=gen).to(device).requires_grad_()
    perm, _ = ops.route_plan(choice, 3)
    torch.library.opcheck(ops.route_plan.default, (choice, 3))
    torch.library.opcheck(ops.permute.default, (x, perm))
    torch.library.opcheck(ops.unpermute.default, (x, perm, scale))
    torch.library.opcheck(ops.unpermute.default, (x, perm, None))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.randn(4, 2), torch.arange(3)), ValueError, "perm has 3 entries but x has 4 rows"),
        ((torch.randn(4, 2), torch.arange(4, dtype=torch.int32)), TypeError, "perm must be Long"),
        (
            (torch.randn(4, 2), torch.tensor([0, 1, 2, 9])),
            ValueError,
            r"perm values must be in \[0, 4\), got 9",
        ),
        ((torch.randn(()), torch.arange(1)), ValueError, "leading token dimension"),
    ],
)
def test_permute_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        ops.permute(*args)


def test_unpermute_rejects_bad_scale():
    y, perm = torch.randn(4, 2), torch.arange(4)
    with pytest.raises(TypeError, match="scale must have the dtype of y"):
        ops.unpermute(y, perm, torch.rand(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="one entry per token"):
        ops.unpermute(y, perm, torch.rand(5))
    with pytest.raises(TypeError, match="y must be float64, float32, float16 or bfloat16"):
        ops.unpermute(torch.ones(4, 2, dtype=torch.int32), perm, None)


def test_unpermute_rejects_a_perm_that_is_not_a_permutation():
    """Its output is not zero-filled first: a row perm never reaches would be undefined."""
    with pytest.raises(ValueError, match=r"perm must be a permutation of \[0, 4\), got 2 twice"):
        ops.unpermute(torch.randn(4, 2), torch.tensor([0, 2, 2, 3]), None)


def test_compile_routing():
    def routed_identity(x, choice):
        plan = flextron.route_plan(choice, [4, 2])
        return flextron.unpermute(flextron.permute(x, plan) * 2, plan)

    compiled = torch.compile(routed_identity, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 3)
    choice = torch.randint(0, 2, (10,))
    torch.testing.assert_close(compiled(x, choice), x * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_views_at_any_element_offset(device, dtype):
    """A contiguous view may start at any element: the vectorized row copies must not
    assume 16-byte aligned base addresses."""
    gen = torch.Generator().manual_seed(11)
    tokens, cols = 37, 64
    for shift in range(1, 4):
        flat = torch.randn(tokens * cols + shift, generator=gen).to(dtype).to(device)
        x = flat[shift:].view(tokens, cols)
        choice = random_choice(tokens, 3, device, gen)
        plan = flextron.route_plan(choice, [64, 32, 16])
        torch.testing.assert_close(flextron.permute(x, plan), reference.permute(x, plan.perm), rtol=0, atol=0)
        torch.testing.assert_close(
            flextron.unpermute(x, plan), reference.unpermute(x, plan.perm), rtol=0, atol=0
        )
