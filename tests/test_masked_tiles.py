"""The SIMT backend's tile logic (csrc/masked_tiles.h), run on the CPU.

`_masked_gemm_emulate` runs the CUDA kernel's tile loop on the host with the same
host-device functions (row limits, tile skip rule, thread load maps, element addresses) on
the operands at their own strides, in float64. Every output element must be written
exactly once, no read may leave its operand, and the result must equal reference.py.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flextron import reference
from tests.helpers import assert_close_to_reference
from tests.test_nested_groups import KINDS, operands
from tests.test_nested_linear import make_plan

ops = torch.ops.flextron


def strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another storage: transposed, or a column slice of a wider tensor."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        wide = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=t.dtype)
        wide[:, 2 : 2 + t.shape[1]] = t
        return wide[:, 2 : 2 + t.shape[1]]
    return t


@settings(max_examples=120, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    tokens=st.integers(0, 140),
    widths=st.lists(st.integers(1, 80), min_size=1, max_size=5, unique=True).map(
        lambda ws: sorted(ws, reverse=True)
    ),
    extra=st.integers(0, 20),
    other=st.integers(1, 70),
    a_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    b_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    skew=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_tiles_cover_every_element_once_and_match_reference(
    kind, tokens, widths, extra, other, a_layout, b_layout, skew, seed
):
    """Any widths (not only multiples of 8), any strides, tiles straddling groups, empty
    groups, M = 0, the nested dimension wider than widths[0]."""
    gen = torch.Generator().manual_seed(seed)
    plan = make_plan(tokens, widths, "cpu", gen, skew)
    a, b = operands(kind, tokens, widths[0] + extra, other, gen)
    a, b = strided(a, a_layout), strided(b, b_layout)
    out, writes, bad_reads = ops._masked_gemm_emulate(KINDS.index(kind), a, b, plan.offsets, plan.widths)
    assert bad_reads.item() == 0
    assert torch.all(writes == 1), f"elements written {writes.min()}..{writes.max()} times"
    expected = getattr(reference, kind)(a, b, plan.offsets, widths)
    # Both in float64: the emulation's error against the reference is held to the tests' fp64
    # rule (tests/helpers.py), the reference being its own exact value here.
    assert_close_to_reference(out, expected, expected)
