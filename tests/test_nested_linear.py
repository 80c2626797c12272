"""nested_linear_n, nested_linear_k, nested_weight_grad and nested_weight_grad_k against
reference.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flextron
from flextron import reference
from tests.helpers import assert_close_to_reference, random_choice

ops = torch.ops.flextron
LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_plan(tokens: int, widths: list[int], device: str, gen: torch.Generator, skew: bool = False):
    groups = len(widths)
    if skew:  # most tokens narrow, some groups possibly empty
        probs = torch.tensor([0.05] + [0.95 / max(groups - 1, 1)] * (groups - 1))[:groups]
        choice = (
            torch.multinomial(probs / probs.sum(), tokens, replacement=True, generator=gen)
            if tokens
            else torch.empty(0, dtype=torch.long)
        )
    else:
        choice = random_choice(tokens, groups, "cpu", gen)
    return flextron.route_plan(choice.to(device), widths)


def widths_strategy(max_width: int, multiple: int = 1):
    return st.lists(st.integers(1, max_width // multiple), min_size=1, max_size=5, unique=True).map(
        lambda ws: sorted((w * multiple for w in ws), reverse=True)
    )


def check_op(op_name: str, a_shape, b_shape, widths, tokens, dtype, device, gen, skew=False):
    plan = make_plan(tokens, widths, device, gen, skew)
    a = torch.randn(*a_shape, generator=gen, dtype=torch.float64)
    b = torch.randn(*b_shape, generator=gen, dtype=torch.float64)
    ours = getattr(flextron, op_name)(a.to(dtype).to(device), b.to(dtype).to(device), plan.offsets, widths)
    ref_fn = getattr(reference, op_name)
    exact = ref_fn(a, b, plan.offsets.cpu(), widths)
    low = ref_fn(a.to(dtype), b.to(dtype), plan.offsets.cpu(), widths)
    assert_close_to_reference(ours, low, exact)
    return plan, ours


NESTED_OPS = ["nested_linear_n", "nested_linear_k", "nested_weight_grad", "nested_weight_grad_k"]


@settings(max_examples=120, deadline=None)
@given(
    op=st.sampled_from(NESTED_OPS),
    tokens=st.integers(0, 70),
    other=st.integers(1, 48),
    extra=st.integers(0, 9),
    widths=widths_strategy(40),
    dtype=st.sampled_from([torch.float64, *LOW_DTYPES]),
    seed=st.integers(0, 2**31 - 1),
    skew=st.booleans(),
)
def test_nested_ops_cpu(op, tokens, other, extra, widths, dtype, seed, skew):
    """Any width set (not only multiples of 8 or of a tile size), M = 0, empty groups,
    nested dimension larger than the widest width."""
    gen = torch.Generator().manual_seed(seed)
    a_shape, b_shape = reference.nested_operand_shapes(op, tokens, widths[0] + extra, other)
    _, out = check_op(op, a_shape, b_shape, widths, tokens, dtype, "cpu", gen, skew)
    weight_grad = op.startswith("nested_weight_grad")
    assert out.shape == ((a_shape[1], b_shape[1]) if weight_grad else (tokens, b_shape[0]))


# Shapes the GPU path accepts (multiples of 8), large enough to span several tiles, with
# tiles that straddle groups; run on every device.
GPU_SHAPES = [
    # tokens, K (or Kmax), N (or Nmax), widths
    (1, 64, 64, [64, 32]),
    (300, 136, 264, [256, 200, 64, 8]),
    (1030, 512, 1024, [1024, 768, 512, 256]),
    (129, 64, 128, [64]),
]


@pytest.mark.parametrize("dtype", [*LOW_DTYPES, torch.float64])
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("skew", [False, True])
def test_nested_ops_device(device, dtype, shape, skew):
    tokens, k, n, widths = shape
    gen = torch.Generator().manual_seed(tokens + k)
    widths_n = [w for w in widths if w <= n]
    check_op("nested_linear_n", (tokens, k), (n, k), widths_n, tokens, dtype, device, gen, skew)
    widths_k = [w for w in widths if w <= k] or [k]
    check_op("nested_linear_k", (tokens, k), (n, k), widths_k, tokens, dtype, device, gen, skew)
    check_op("nested_weight_grad", (tokens, n), (tokens, k), widths_n, tokens, dtype, device, gen, skew)
    check_op("nested_weight_grad_k", (tokens, n), (tokens, k), widths_k, tokens, dtype, device, gen, skew)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16, 200])
def test_nested_linear_n_without_tail_zeroing(device, dtype, tokens):
    """zero_tails=False: every column inside a row's width is exact; the rest is not read by
    the consumers that ask for it, so it is only required to exist. Token counts on both sides
    of the GPU's dense small-T path."""
    gen = torch.Generator().manual_seed(tokens)
    widths = [128, 96, 40, 8]
    plan = make_plan(tokens, widths, device, gen, skew=True)
    x = torch.randn(tokens, 64, generator=gen, dtype=torch.float64)
    w = torch.randn(136, 64, generator=gen, dtype=torch.float64)
    ours = flextron.nested_linear_n(
        x.to(dtype).to(device), w.to(dtype).to(device), plan.offsets, widths, zero_tails=False
    )
    inside = (
        reference.nested_linear_n(torch.ones(tokens, 1), torch.ones(136, 1), plan.offsets.cpu(), widths) == 1
    )
    exact = reference.nested_linear_n(x, w, plan.offsets.cpu(), widths)
    low = reference.nested_linear_n(x.to(dtype), w.to(dtype), plan.offsets.cpu(), widths)
    assert_close_to_reference(ours.cpu()[inside], low[inside], exact[inside])


def test_backward_reads_and_writes_weights_in_place(device):
    """The backward reads weight.t() in place and returns weight gradients in the weight's own
    layout (contiguous, so autograd accumulates them without a copy): no copy of a
    weight-sized tensor anywhere in a nested MLP's forward + backward."""
    gen = torch.Generator().manual_seed(13)
    widths = [96, 64, 32]
    plan = make_plan(300, widths, device, gen)
    x = torch.randn(300, 48, generator=gen).to(device).requires_grad_()
    w_up = torch.randn(96, 48, generator=gen).to(device).requires_grad_()
    w_down = torch.randn(40, 96, generator=gen).to(device).requires_grad_()
    layouts = []
    for w in (w_up, w_down):
        w.register_hook(lambda grad: layouts.append(grad.is_contiguous()))
    weight_shapes = {tuple(w.shape) for w in (w_up, w_down)} | {tuple(w.shape[::-1]) for w in (w_up, w_down)}
    with torch.profiler.profile(record_shapes=True) as prof:
        h = flextron.nested_linear_n(x, w_up, plan.offsets, plan.widths)
        y = flextron.nested_linear_k(h, w_down, plan.offsets, plan.widths)
        y.square().sum().backward()
    copies = [
        (e.name, e.input_shapes)
        for e in prof.events()
        if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
        and any(tuple(shape) in weight_shapes for shape in e.input_shapes if shape)
    ]
    assert copies == [], copies
    assert layouts == [True, True]


def test_single_full_group_equals_dense_matmul(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 64, generator=gen).to(device)
    w = torch.randn(96, 64, generator=gen).to(device)
    offsets = torch.tensor([0, 40], dtype=torch.int32, device=device)
    torch.testing.assert_close(flextron.nested_linear_n(x, w, offsets, [96]), x @ w.T)
    w2 = torch.randn(32, 64, generator=gen).to(device)
    torch.testing.assert_close(flextron.nested_linear_k(x, w2, offsets, [64]), x @ w2.T)
    dy = torch.randn(40, 96, generator=gen).to(device)
    torch.testing.assert_close(flextron.nested_weight_grad(dy, x, offsets, [96]), dy.T @ x)


def test_nested_linear_n_zero_tail_and_empty_groups(device):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(10, 16, generator=gen).to(device)
    w = torch.randn(48, 16, generator=gen).to(device)
    offsets = torch.tensor([0, 0, 10, 10], dtype=torch.int32, device=device)  # groups 0, 2 empty
    out = flextron.nested_linear_n(x, w, offsets, [40, 24, 8])
    assert torch.all(out[:, 24:] == 0)
    torch.testing.assert_close(out[:, :24], x @ w[:24].T)
    # Output is zero-initialised by the op itself, not by chance: poison the allocator.
    torch.full((10, 48), float("nan"), device=device)
    again = flextron.nested_linear_n(x, w, offsets, [40, 24, 8])
    assert torch.isfinite(again).all()


def test_zero_rows_and_zero_k():
    w = torch.randn(16, 8)
    empty_offsets = torch.zeros(3, dtype=torch.int32)
    assert flextron.nested_linear_n(torch.empty(0, 8), w, empty_offsets, [16, 8]).shape == (0, 16)
    assert flextron.nested_linear_k(torch.empty(0, 8), torch.randn(4, 8), empty_offsets, [8, 4]).shape == (
        0,
        4,
    )
    assert (
        torch.count_nonzero(
            flextron.nested_weight_grad(torch.empty(0, 16), torch.empty(0, 8), empty_offsets, [16, 8])
        )
        == 0
    )
    out = flextron.nested_linear_n(
        torch.empty(3, 0), torch.empty(16, 0), torch.tensor([0, 3, 3], dtype=torch.int32), [16, 8]
    )
    assert out.shape == (3, 16) and torch.count_nonzero(out) == 0


def test_non_contiguous_inputs(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 30, generator=gen).to(device).t()  # [30, 64], transposed
    w = torch.randn(64, 128, generator=gen).to(device)[:, ::2]  # [64, 64], strided
    plan = make_plan(30, [64, 32, 16], device, gen)
    torch.testing.assert_close(
        flextron.nested_linear_n(x, w, plan.offsets, plan.widths),
        reference.nested_linear_n(x, w, plan.offsets, [64, 32, 16]),
    )
    torch.testing.assert_close(
        flextron.nested_linear_k(x, w, plan.offsets, plan.widths),
        reference.nested_linear_k(x, w, plan.offsets, [64, 32, 16]),
    )
    # A transposed weight view (what the backward passes; the CPU kernels read it in place).
    wt = torch.randn(64, 64, generator=gen).to(device).t()
    for op in ("nested_linear_n", "nested_linear_k"):
        torch.testing.assert_close(
            getattr(flextron, op)(x, wt, plan.offsets, plan.widths),
            getattr(reference, op)(x, wt.contiguous(), plan.offsets, [64, 32, 16]),
        )


def test_gradcheck_cpu():
    gen = torch.Generator().manual_seed(6)
    plan = make_plan(11, [6, 4, 1], "cpu", gen)
    x = torch.randn(11, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: flextron.nested_linear_n(a, b, plan.offsets, plan.widths), (x, w)
    )
    xk = torch.randn(11, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    wk = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: flextron.nested_linear_k(a, b, plan.offsets, plan.widths), (xk, wk)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(device, dtype):
    gen = torch.Generator().manual_seed(7)
    widths = [128, 64, 32]
    plan = make_plan(77, widths, device, gen, skew=True)
    x = torch.randn(77, 96, generator=gen, dtype=torch.float64)
    w_up = torch.randn(160, 96, generator=gen, dtype=torch.float64) / 10
    w_down = torch.randn(48, 160, generator=gen, dtype=torch.float64) / 10
    dy = torch.randn(77, 48, generator=gen, dtype=torch.float64)

    def run(module, a, wu, wd, offsets):
        a, wu, wd = (t.clone().requires_grad_() for t in (a, wu, wd))
        h = module.nested_linear_n(a, wu, offsets, widths)
        y = module.nested_linear_k(h, wd[:, : h.shape[1]], offsets, widths)
        y.backward(dy.to(y.dtype).to(y.device))
        return a.grad, wu.grad, wd.grad

    ours = run(
        flextron, x.to(dtype).to(device), w_up.to(dtype).to(device), w_down.to(dtype).to(device), plan.offsets
    )
    low = run(reference, x.to(dtype), w_up.to(dtype), w_down.to(dtype), plan.offsets.cpu())
    exact = run(reference, x, w_up, w_down, plan.offsets.cpu())
    for o, lo, ex in zip(ours, low, exact, strict=True):
        assert_close_to_reference(o, lo, ex, factor=3.0)


def test_opcheck(device):
    gen = torch.Generator().manual_seed(8)
    plan = make_plan(20, [32, 16, 8], device, gen)
    x = torch.randn(20, 24, generator=gen).to(device).requires_grad_()
    w = torch.randn(40, 24, generator=gen).to(device).requires_grad_()
    xk = torch.randn(20, 32, generator=gen).to(device).requires_grad_()
    wk = torch.randn(16, 32, generator=gen).to(device).requires_grad_()
    dy = torch.randn(20, 40, generator=gen).to(device)
    torch.library.opcheck(ops.nested_linear_n.default, (x, w, plan.offsets, plan.widths))
    torch.library.opcheck(ops.nested_linear_k.default, (xk, wk, plan.offsets, plan.widths))
    torch.library.opcheck(ops.nested_weight_grad.default, (dy, x.detach(), plan.offsets, plan.widths))
    dyk = torch.randn(20, 16, generator=gen).to(device)
    torch.library.opcheck(ops.nested_weight_grad_k.default, (dyk, xk.detach(), plan.offsets, plan.widths))


def test_torch_compile():
    gen = torch.Generator().manual_seed(9)

    def mlp(x, choice, w_up, w_down):
        plan = flextron.route_plan(choice, [64, 32])
        xs = flextron.permute(x, plan)
        h = torch.relu(flextron.nested_linear_n(xs, w_up, plan.offsets, plan.widths))
        return flextron.unpermute(flextron.nested_linear_k(h, w_down, plan.offsets, plan.widths), plan)

    x = torch.randn(12, 16, generator=gen, requires_grad=True)
    w_up = torch.randn(64, 16, generator=gen, requires_grad=True)
    w_down = torch.randn(16, 64, generator=gen, requires_grad=True)
    choice = torch.randint(0, 2, (12,), generator=gen)
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    out = compiled(x, choice, w_up, w_down)
    torch.testing.assert_close(out, mlp(x, choice, w_up, w_down))
    out.sum().backward()
    assert w_up.grad is not None and w_down.grad is not None


@pytest.mark.parametrize(
    ("fn", "args", "error", "match"),
    [
        (
            "nested_linear_n",
            ((5, 8), (16, 8), [32, 8]),
            ValueError,
            r"widths\[0\]=32 exceeds weight rows Nmax=16",
        ),
        ("nested_linear_n", ((5, 8), (16, 8), [8, 16]), ValueError, "strictly decreasing"),
        ("nested_linear_n", ((5, 8), (16, 4), [16, 8]), ValueError, "must share K"),
        ("nested_linear_k", ((5, 8), (16, 8), [16, 8]), ValueError, "exceeds Kmax=8"),
        ("nested_weight_grad", ((5, 16), (4, 8), [16, 8]), ValueError, "must share M"),
        ("nested_weight_grad_k", ((5, 16), (4, 8), [8, 4]), ValueError, "must share M"),
        ("nested_weight_grad_k", ((5, 16), (5, 8), [16, 8]), ValueError, "exceeds x columns Kmax=8"),
    ],
)
def test_rejects_bad_shapes(fn, args, error, match):
    a_shape, b_shape, widths = args
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(error, match=match):
        getattr(flextron, fn)(torch.randn(*a_shape), torch.randn(*b_shape), offsets, widths)


def test_rejects_bad_offsets_dtype_device():
    x, w = torch.randn(5, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match="offsets must end at the number of rows M=5, got 4"):
        flextron.nested_linear_n(x, w, torch.tensor([0, 2, 4], dtype=torch.int32), [16, 8])
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        flextron.nested_linear_n(x, w, torch.tensor([0, 4, 2, 5], dtype=torch.int32), [16, 8, 4])
    with pytest.raises(ValueError, match="offsets must start at 0"):
        flextron.nested_linear_n(x, w, torch.tensor([1, 2, 5], dtype=torch.int32), [16, 8])
    with pytest.raises(ValueError, match=r"offsets must have len\(widths\)\+1=3 entries, got 2"):
        flextron.nested_linear_n(x, w, torch.tensor([0, 5], dtype=torch.int32), [16, 8])
    with pytest.raises(TypeError, match="offsets must be Int"):
        flextron.nested_linear_n(x, w, torch.tensor([0, 2, 5]), [16, 8])
    with pytest.raises(TypeError, match="must have the same dtype"):
        flextron.nested_linear_n(x, w.double(), torch.tensor([0, 2, 5], dtype=torch.int32), [16, 8])
    with pytest.raises(TypeError, match="widths must be Int"):
        ops.nested_linear_n(x, w, torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([16, 8]))
    with pytest.raises(ValueError, match=r"widths must be strictly decreasing, got \[8, 16\]"):
        ops.nested_linear_n(
            x, w, torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([8, 16], dtype=torch.int32)
        )
    with pytest.raises(TypeError, match="x must be float64, float32, float16 or bfloat16"):
        flextron.nested_linear_n(x.int(), w.int(), torch.tensor([0, 2, 5], dtype=torch.int32), [16, 8])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_any_width_and_strided_offsets(dtype):
    """Widths that are not multiples of 8 run (on the SIMT kernel where TMA cannot), and an
    offsets view with a stride is read as its values, not as raw memory."""
    gen = torch.Generator().manual_seed(14)
    widths = [72, 36, 12]
    plan = make_plan(300, widths, "cuda", gen)
    strided_offsets = torch.stack([plan.offsets, torch.full_like(plan.offsets, -7)], 1)[:, 0]
    assert not strided_offsets.is_contiguous()
    x = torch.randn(300, 40, generator=gen, dtype=torch.float64)
    w = torch.randn(80, 40, generator=gen, dtype=torch.float64)
    ours = flextron.nested_linear_n(x.to(dtype).cuda(), w.to(dtype).cuda(), strided_offsets, widths)
    offsets = plan.offsets.cpu()
    exact = reference.nested_linear_n(x, w, offsets, widths)
    assert_close_to_reference(
        ours, reference.nested_linear_n(x.to(dtype), w.to(dtype), offsets, widths), exact
    )


@pytest.mark.cuda
def test_cuda_rejects_bad_input():
    x, w = torch.randn(5, 16, device="cuda"), torch.randn(24, 16, device="cuda")
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="must be on the same device"):
        flextron.nested_linear_n(x, w.cpu(), offsets, [24, 16])
    with pytest.raises(ValueError, match="offsets and x must be on the same device"):
        flextron.nested_linear_n(x, w, offsets.cpu(), [24, 16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_at_any_element_offset(device, dtype):
    """Contiguous views with odd storage offsets (misaligned for TMA on the GPU) are valid
    inputs: the CUDA path copies them to aligned memory."""
    gen = torch.Generator().manual_seed(12)
    widths = [64, 32, 16]
    plan = make_plan(40, widths, device, gen)
    x = torch.randn(40 * 64 + 3, generator=gen).to(dtype).to(device)[3:].view(40, 64)
    w = torch.randn(64 * 64 + 5, generator=gen).to(dtype).to(device)[5:].view(64, 64)
    exact_x, exact_w = x.double(), w.double()
    for op in ("nested_linear_n", "nested_linear_k"):
        ours = getattr(flextron, op)(x, w, plan.offsets, plan.widths)
        ref_low = getattr(reference, op)(x, w, plan.offsets, widths)
        exact = getattr(reference, op)(exact_x, exact_w, plan.offsets, widths)
        assert_close_to_reference(ours, ref_low, exact)
    dy = torch.randn(40 * 64 + 1, generator=gen).to(dtype).to(device)[1:].view(40, 64)
    ours = flextron.nested_weight_grad(dy, x, plan.offsets, plan.widths)
    exact = reference.nested_weight_grad(dy.double(), exact_x, plan.offsets, widths)
    assert_close_to_reference(ours, reference.nested_weight_grad(dy, x, plan.offsets, widths), exact)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_a_widths_mistake_raises_the_same_error_as_a_list_or_a_tensor(as_tensor):
    """The list is checked in Python, the tensor in C++ (TORCH_CHECK_VALUE): both ValueError."""
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32)
    widths = torch.tensor([8, 16], dtype=torch.int32) if as_tensor else [8, 16]
    with pytest.raises(ValueError, match=r"widths must be strictly decreasing, got \[8, 16\]"):
        flextron.nested_linear_n(x, w, offsets, widths)
    with pytest.raises(TypeError, match="offsets must be Int"):
        flextron.nested_linear_n(x, w, offsets.long(), [16, 8])


def test_every_pattern_of_empty_groups_matches_the_reference(device):
    """The CPU kernels merge the staircase bands of neighbouring groups when the groups
    between them are empty; every pattern of empty groups over four widths, in float64."""
    torch.manual_seed(0)
    widths = [16, 12, 8, 4]
    w_n = torch.randn(16, 10, dtype=torch.float64, device=device)
    w_k = torch.randn(7, 16, dtype=torch.float64, device=device)
    for counts in itertools.product((0, 3), repeat=4):
        offsets = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=device)
        x = torch.randn(sum(counts), 10, dtype=torch.float64, device=device)
        h = torch.randn(sum(counts), 16, dtype=torch.float64, device=device)
        expected_n = reference.nested_linear_n(x, w_n, offsets, widths)
        expected_k = reference.nested_linear_k(h, w_k, offsets, widths)
        assert_close_to_reference(flextron.nested_linear_n(x, w_n, offsets, widths), expected_n, expected_n)
        assert_close_to_reference(flextron.nested_linear_k(h, w_k, offsets, widths), expected_k, expected_k)
