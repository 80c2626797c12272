"""Test helpers: tolerances derived from the reference's own numerical error."""

from __future__ import annotations

import torch

# Floor tolerances per dtype, added to the reference-derived bound.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def assert_close_to_reference(
    out: torch.Tensor, ref_low: torch.Tensor, ref_exact: torch.Tensor, factor: float = 2.0
) -> None:
    """``out`` must be as close to the exact (fp64) reference as the reference computed in
    ``out``'s dtype is, within ``factor`` and a small per-dtype floor."""
    assert out.shape == ref_exact.shape, (out.shape, ref_exact.shape)
    assert out.dtype == ref_low.dtype, (out.dtype, ref_low.dtype)
    exact = ref_exact.double().cpu()
    ours = (out.double().cpu() - exact).abs().max().item() if out.numel() else 0.0
    theirs = (ref_low.double().cpu() - exact).abs().max().item() if out.numel() else 0.0
    scale = exact.abs().max().item() if out.numel() else 0.0
    bound = factor * theirs + ATOL[out.dtype] * max(1.0, scale)
    assert ours <= bound, f"max error {ours:.3e} > bound {bound:.3e} (reference in {out.dtype}: {theirs:.3e})"


def assert_close_to_fp64_model(out: torch.Tensor, reference: torch.nn.Module, *inputs, **kwargs) -> None:
    """``out`` (computed in fp32) must be as close to ``reference`` run in fp64 as ``reference``
    itself is when run in fp32: the bound is the reference's own fp32 error, measured on these
    inputs. Reordered fp32 sums (a permuted model, other kernels) differ by that much."""
    import copy

    with torch.no_grad():
        ref_low = reference(*inputs, **kwargs)
        ref_exact = copy.deepcopy(reference).double()(*inputs, **kwargs)
    ref_low, ref_exact = (getattr(r, "logits", r) for r in (ref_low, ref_exact))
    assert_close_to_reference(out, ref_low, ref_exact)


def random_choice(
    tokens: int, groups: int, device: str, generator: torch.Generator | None = None, dtype=torch.int64
):
    return torch.randint(0, groups, (tokens,), generator=generator, dtype=dtype).to(device)
