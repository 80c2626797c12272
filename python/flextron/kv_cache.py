"""A preallocated key/value cache for one attention layer.

K and V are computed for every KV head whatever a token's head count, so the cache never
depends on routing: a sequence can be prefilled at one budget and decoded at another.
Sequences of different lengths share the cache through left padding: every sequence writes
its next token at the same slot, and ``valid`` marks which slots hold real tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def default_positions(
    attention_mask: Tensor | None, cache: KVCache | None, batch: int, steps: int, device: torch.device
) -> Tensor:
    """Each new token's position: the number of real tokens before it in its sequence
    (cached ones included); ``attention_mask [B, S]`` marks the new tokens that are real."""
    past = cache.past_valid_counts()[:, None] if cache is not None else 0
    if attention_mask is None:
        return past + torch.arange(steps, device=device).expand(batch, steps)
    return past + (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class KVCache(nn.Module):
    """``k``/``v``: ``[batch, kv_heads, max_length, head_dim]``; ``valid``: ``[batch, max_length]``.

    ``length`` (a Python int, so masks and positions need no device sync) counts the
    filled slots; ``padded`` says whether a ``valid`` mask was ever given (if not, every
    slot is real and attention needs no padding mask).
    """

    def __init__(
        self,
        batch_size: int,
        max_length: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if min(batch_size, max_length, num_kv_heads, head_dim) <= 0:
            raise ValueError(
                f"KVCache sizes must be positive, got batch={batch_size}, max_length={max_length}, "
                f"kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer(
            "valid", torch.zeros(batch_size, max_length, dtype=torch.bool, device=device), persistent=False
        )
        self.length = 0
        self.padded = False

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused, not reallocated)."""
        self.length = 0
        self.padded = False
        self.valid.zero_()

    def past_valid_counts(self) -> Tensor:
        """Real (non-padding) tokens cached so far, per sequence: ``[batch]`` int64."""
        return self.valid[:, : self.length].sum(dim=1)

    def update(self, k: Tensor, v: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Append ``k``/``v`` (``[batch, kv_heads, S, head_dim]``) and their ``valid`` mask
        (``[batch, S]``, default all real); returns the cached ``k, v, valid`` up to the new
        length (views, no copy)."""
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(
                f"k and v must be [batch, kv_heads, S, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        batch, heads, steps, head_dim = k.shape
        expected = (self.batch_size, self.k.shape[1], head_dim)
        if (batch, heads, self.k.shape[3]) != expected:
            raise ValueError(
                f"k must be [batch={expected[0]}, kv_heads={expected[1]}, S, head_dim={self.k.shape[3]}], "
                f"got {tuple(k.shape)}"
            )
        end = self.length + steps
        if end > self.max_length:
            raise ValueError(
                f"KVCache is full: {self.length} cached + {steps} new tokens > max_length {self.max_length}"
            )
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        if valid is None:
            self.valid[:, self.length : end] = True
        else:
            if valid.shape != (batch, steps):
                raise ValueError(f"valid must be [batch={batch}, S={steps}], got {tuple(valid.shape)}")
            self.valid[:, self.length : end] = valid
            self.padded = True
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.valid[:, :end]

    def extra_repr(self) -> str:
        return f"batch={self.batch_size}, max_length={self.max_length}, length={self.length}"
