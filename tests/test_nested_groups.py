"""The sm90 backend's group arguments (csrc/nested_groups.h), run on the CPU.

`_nested_group_problems` returns, for real operands, the per-group GEMM problems that the
CUDA argument kernel writes (the same host-device function). Replaying them in float64
must cover every output element exactly once (with the blocks the caller zeroes), read
only inside the operands, never launch K = 0, keep TMA's 16-byte alignment, and equal
reference.py. CUTLASS's own host-side `can_implement` is swept on the same problems.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flextron
from flextron import reference
from tests.helpers import assert_close_to_reference
from tests.test_nested_linear import make_plan

ops = torch.ops.flextron
KINDS = ("nested_linear_n", "nested_linear_k", "nested_weight_grad", "nested_weight_grad_k")
LAYOUT_FORWARD, LAYOUT_TRANSPOSED_WEIGHT, LAYOUT_WEIGHT_GRAD = 0, 1, 2


def operands(kind: str, tokens: int, nested: int, other: int, gen: torch.Generator):
    """(a, b) in float64 as the op takes them; the nested dimension has size `nested`."""
    shapes = reference.nested_operand_shapes(kind, tokens, nested, other)
    return tuple(torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes)


def replay(kind: str, problems: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan, widths):
    """Run the group problems as CUTLASS would (D = A B^T per group, in each layout), then the
    zeroing the caller and the kernel do. Returns (out, writes per element)."""
    weight_grad = kind.startswith("nested_weight_grad")
    out_shape = (a.shape[1], b.shape[1]) if weight_grad else (a.shape[0], b.shape[0])
    out = torch.full(out_shape, float("nan"), dtype=torch.float64).flatten()
    writes = torch.zeros(out.numel(), dtype=torch.int64)
    a_flat = a.contiguous().flatten()  # the sm90 path reads a row-major
    b_k_major = b.stride(1) == 1
    b_flat = (b if b_k_major else b.t()).contiguous().flatten()  # b's storage, either layout
    lda, ldd = a.shape[1], out_shape[1]
    ldb = b.shape[1] if b_k_major else b.shape[0]
    for m, n, k, a_off, b_off, d_off, zero_m, zero_n in problems.tolist():
        assert k > 0, "a launched problem with K = 0 hangs CUTLASS"
        i, j, depth = torch.arange(m)[:, None], torch.arange(n)[None, :], torch.arange(k)
        if m > 0 and n > 0:
            a_idx = a_off + (i * lda + depth if not weight_grad else i + depth * lda)  # [m, k]
            b_idx = b_off + (
                j.T * ldb + depth if b_k_major and not weight_grad else j.T + depth * ldb
            )  # [n, k]
            for idx, flat in ((a_idx, a_flat), (b_idx, b_flat)):
                assert idx.min() >= 0 and idx.max() < flat.numel(), "read outside the operand"
            d_idx = (d_off + i * ldd + j).flatten()
            out[d_idx] = (a_flat[a_idx] @ b_flat[b_idx].T).flatten()
            writes[d_idx] += 1
        if zero_m > 0:  # skipped group (empty token prefix): its block is zeroed
            d_idx = (d_off + torch.arange(zero_m)[:, None] * ldd + torch.arange(zero_n)[None, :]).flatten()
            out[d_idx] = 0.0
            writes[d_idx] += 1
    out, writes = out.view(out_shape), writes.view(out_shape)
    if kind == "nested_linear_n":  # zero_tails: columns past each row's width
        bounds = plan.offsets.tolist()
        for g, width in enumerate(widths):
            out[bounds[g] : bounds[g + 1], width:] = 0.0
            writes[bounds[g] : bounds[g + 1], width:] += 1
    elif weight_grad:  # the part past widths[0] is zeroed on the host
        dim = 0 if kind == "nested_weight_grad" else 1
        out.narrow(dim, widths[0], out_shape[dim] - widths[0]).zero_()
        writes.narrow(dim, widths[0], out_shape[dim] - widths[0]).add_(1)
    return out, writes


def sm90_aligned(kind: str, a: torch.Tensor, b: torch.Tensor, widths: list[int]) -> bool:
    """The alignment part of the CUDA dispatch rule (nested_linear.cu, use_sm90)."""
    dims = [a.shape[1], b.shape[1]] + ([] if kind.startswith("nested_weight_grad") else [b.shape[0]])
    return all(v % 8 == 0 for v in dims + list(widths))


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    tokens=st.integers(0, 300),
    widths=st.lists(st.integers(1, 24), min_size=1, max_size=5, unique=True).map(
        lambda ws: sorted((8 * w for w in ws), reverse=True)
    ),
    extra=st.sampled_from([0, 8, 24]),
    other=st.sampled_from([8, 16, 40, 96]),
    transposed_weight=st.booleans(),
    skew=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_problems_cover_every_element_once(
    kind, tokens, widths, extra, other, transposed_weight, skew, seed
):
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(tokens, widths, "cpu", gen, skew)
    a, b = operands(kind, tokens, widths[0] + extra, other, gen)
    if transposed_weight and not kind.startswith("nested_weight_grad"):
        b = b.t().contiguous().t()  # the backward's weight.t(): same values, N-major storage
    problems = ops._nested_group_problems(KINDS.index(kind), a, b, plan.offsets, plan.widths)
    assert problems.shape == (len(widths), 8)
    out, writes = replay(kind, problems, a, b, plan, widths)
    assert torch.all(writes == 1), f"elements written {writes.min()}..{writes.max()} times"
    expected = getattr(reference, kind)(a, b, plan.offsets, widths)
    # Both in float64: the emulation's error against the reference is held to the tests' fp64
    # rule (tests/helpers.py), the reference being its own exact value here.
    assert_close_to_reference(out, expected, expected)
    # TMA: every group's base address 16-byte aligned (8 bf16 elements from an aligned base).
    assert torch.all(problems[:, 3:6] % 8 == 0), problems


def test_empty_prefix_groups_are_skipped_not_k0():
    """No token chose the widest widths: those weight-gradient bands have an empty token
    prefix; they run no GEMM (M = 0, K > 0) and their block is zeroed instead."""
    widths = [64, 48, 32, 16]
    offsets = torch.tensor([0, 0, 0, 5, 9], dtype=torch.int32)  # groups 0 and 1 empty
    dy, x = torch.randn(9, 64, dtype=torch.float64), torch.randn(9, 24, dtype=torch.float64)
    problems = ops._nested_group_problems(2, dy, x, offsets, torch.tensor(widths, dtype=torch.int32))
    m, k, zero_m = problems[:, 0], problems[:, 2], problems[:, 6]
    assert m[:2].tolist() == [0, 0] and torch.all(k > 0) and zero_m[:2].tolist() == [16, 16]
    assert m[2:].tolist() == [16, 16] and k[2:].tolist() == [5, 9]


@pytest.mark.parametrize(
    ("offsets", "message"),
    [([0, 3, 8], "end at M=9"), ([0, 5, 4, 9], "not decrease"), ([1, 4, 9], "start at 0")],
)
def test_invalid_offsets_are_refused(offsets, message):
    widths = torch.tensor([16, 8, 4][: len(offsets) - 1], dtype=torch.int32)
    x, w = torch.randn(9, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match=message):
        ops._nested_group_problems(0, x, w, torch.tensor(offsets, dtype=torch.int32), widths)


@pytest.mark.skipif(not flextron.WITH_SM90, reason="built without the sm90 kernels")
@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    tokens=st.integers(1, 200),
    widths=st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True).map(
        lambda ws: sorted(ws, reverse=True)
    ),
    scale=st.sampled_from([1, 8]),
    other=st.sampled_from([7, 8, 24, 64]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cutlass_can_implement_agrees_with_the_dispatch_rule(kind, tokens, widths, scale, other, dtype, seed):
    """CUTLASS's host-side check (no GPU needed) accepts every problem our dispatch rule sends
    to the sm90 kernel. The rule is stricter (it also requires aligned leading dimensions,
    which CUTLASS sees only on the device); what it refuses runs on the SIMT kernel."""
    widths = [w * scale for w in widths]
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(tokens, widths, "cpu", gen)
    a, b = operands(kind, tokens, widths[0], other, gen)
    problems = ops._nested_group_problems(KINDS.index(kind), a, b, plan.offsets, plan.widths)
    layout = LAYOUT_WEIGHT_GRAD if kind.startswith("nested_weight_grad") else LAYOUT_FORWARD
    if sm90_aligned(kind, a, b, widths):
        assert ops._sm90_can_implement(problems, dtype, layout)


@pytest.mark.skipif(not flextron.WITH_SM90, reason="built without the sm90 kernels")
def test_cutlass_can_implement_refuses_unaligned_contractions():
    """The check the sweep relies on does check: a K of 12 bf16 elements (24 bytes) in a
    K-major operand cannot be loaded by TMA."""
    aligned = torch.tensor([[64, 64, 16, 0, 0, 0, 0, 0]])
    unaligned = torch.tensor([[64, 64, 12, 0, 0, 0, 0, 0]])
    assert ops._sm90_can_implement(aligned, torch.bfloat16, LAYOUT_FORWARD)
    assert not ops._sm90_can_implement(unaligned, torch.bfloat16, LAYOUT_FORWARD)
