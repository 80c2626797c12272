"""Core attention for elastic query heads: masks and per-band scaled-dot-product attention.

Query heads are nested: a token with head count ``h`` uses heads ``[0, h)``. Head choices
``h_0 > h_1 > ... > h_{G-1}`` cut the heads into bands ``[h_{g+1}, h_g)`` (the last band is
``[0, h_{G-1})``); band ``g`` is used by the tokens whose choice is ``<= g``. With GQA a
band holds whole query groups, so it attends with its own slice of KV heads.

Keys are addressed by *slot* (their index in the sequence or KV cache). A query at slot
``s`` sees the valid keys at slots ``<= s``, and always its own slot, so that a padding
query never has an empty row (no NaN in the forward or the backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# Compiled once per device type, on first use: uncompiled FlexAttention is a reference path
# that materializes every score. On the GPU shapes may vary without recompiling (automatic
# dynamic shapes); on the CPU each new shape compiles anew, because torch 2.14's CPU
# FlexAttention template fails to compile with dynamic shapes. Tests swap in the eager
# function (small shapes, no compile).
_compiled_flex: dict[str, Callable] = {}


def _flex(device_type: str) -> Callable:
    if device_type not in _compiled_flex:
        dynamic = None if device_type == "cuda" else False
        _compiled_flex[device_type] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled_flex[device_type]


def valid_mask(attention_mask: Tensor | None, batch: int, steps: int, device: torch.device) -> Tensor | None:
    """A call's ``attention_mask [B, S]`` (1: real token, 0: padding) as booleans, checked."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (batch, steps):
        raise ValueError(
            f"attention_mask must be [batch={batch}, seq={steps}], got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask.to(device=device, dtype=torch.bool)


def band_sequences(choice: Tensor, count: int) -> list[Tensor | None]:
    """For a head-choice index per sequence (``choice [B]``, of ``count`` choices), per head
    band the sequences that use it (None: all)."""
    choices = choice.tolist()
    if any(not 0 <= c < count for c in choices):
        raise ValueError(f"choice values must be in [0, {count}), got {choices}")
    bands: list[Tensor | None] = []
    for g in range(count):
        rows = [b for b, c in enumerate(choices) if c <= g]
        full = len(rows) == len(choices)
        bands.append(None if full else torch.tensor(rows, dtype=torch.int64).to(choice.device))
    return bands


def causal_mask(
    query_length: int, key_length: int, key_valid: Tensor | None, device: torch.device
) -> tuple[Tensor | None, bool]:
    """``(mask, is_causal)`` for ``S`` new queries at the last slots of ``L`` keys: a boolean
    mask ``[B or 1, 1, S, L]`` (True = attend), or None when SDPA needs none (plain causal
    attention, or one query that sees every key)."""
    past = key_length - query_length
    if key_valid is None:
        if past == 0:
            return None, True
        if query_length == 1:
            return None, False
    query_slots = torch.arange(past, key_length, device=device)[:, None]
    key_slots = torch.arange(key_length, device=device)[None, :]
    mask = key_slots <= query_slots
    if key_valid is None:
        return mask[None, None], False
    own_slot = key_slots == query_slots
    return mask[None, None] & (key_valid[:, None, None, :] | own_slot[None, None]), False


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool = False) -> Tensor:
    """SDPA of ``q [B, h, S, D]`` over ``k``/``v [B, h_kv, L, D]`` (GQA when ``h_kv < h``:
    query head ``i`` uses KV head ``i // (h / h_kv)``)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=k.shape[1] != q.shape[1]
    )


def head_bands(head_counts: Sequence[int]) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]``: band ``g`` is heads ``[head_counts[g+1], head_counts[g])``."""
    lows = [*head_counts[1:], 0]
    return list(zip(lows, head_counts, strict=True))


def banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    head_counts: Sequence[int],
    mask: Tensor | None,
    is_causal: bool,
    band_sequences: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Attention of ``q [B, H, S, D]`` (``H = head_counts[0]``) band by band.

    ``band_sequences[g]`` lists the sequences that use band ``g`` (None = all of them);
    the others get zeros there. Without it every band attends for every query, and rows
    a token does not use are left for the nested output projection to ignore (it reads
    only the first ``h`` heads of a token with ``h`` heads).
    """
    group = q.shape[1] // k.shape[1]
    outputs = []
    for g, (lo, hi) in enumerate(head_bands(head_counts)):
        q_band, k_band, v_band = q[:, lo:hi], k[:, lo // group : hi // group], v[:, lo // group : hi // group]
        rows = band_sequences[g] if band_sequences is not None else None
        if rows is None:
            outputs.append(attend(q_band, k_band, v_band, mask, is_causal))
            continue
        band = q_band.new_zeros(q_band.shape)
        if rows.numel():
            band_mask = mask if mask is None or mask.shape[0] == 1 else mask[rows]
            band[rows] = attend(q_band[rows], k_band[rows], v_band[rows], band_mask, is_causal)
        outputs.append(band)
    return torch.cat(outputs[::-1], dim=1)


def token_routed_flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    query_heads: Tensor,
    key_valid: Tensor | None,
    compiled: bool = True,
) -> Tensor:
    """Attention of ``q [B, H, S, D]`` where query ``(b, s)`` uses heads ``[0, query_heads[b, s])``,
    as one FlexAttention call whose block mask skips the heads a query does not use.

    Queries are sorted within each sequence by head count (widest first, stable), so that
    for a head the queries that use it form a prefix of every sequence and whole query
    blocks past it are skipped; the result is returned in the original order, with zeros
    in the heads a query does not use.
    """
    batch, heads, steps, _ = q.shape
    key_length = k.shape[2]
    order = torch.sort(query_heads, dim=1, descending=True, stable=True).indices
    sorted_heads = query_heads.gather(1, order)
    query_slots = order + (key_length - steps)

    def visible(b, h, query, key):
        slot = query_slots[b, query]
        seen = key <= slot
        if key_valid is not None:
            seen = seen & (key_valid[b, key] | (key == slot))
        return seen & (h < sorted_heads[b, query])

    block_mask = create_block_mask(
        visible, batch, heads, steps, key_length, device=q.device, _compile=compiled and q.is_cuda
    )
    attend_fn = _flex(q.device.type) if compiled else flex_attention
    gather_index = order[:, None, :, None].expand(batch, heads, steps, q.shape[3])
    out_sorted = attend_fn(
        q.gather(2, gather_index), k, v, block_mask=block_mask, enable_gqa=k.shape[1] != heads
    )
    return torch.empty_like(out_sorted).scatter(2, gather_index, out_sorted)
