"""Rotary position embeddings (RoPE) in the Hugging Face Llama convention: the head
dimension is split in two halves rotated against each other (``rotate_half``), with
optional Llama 3 or linear frequency scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of RoPE, as in a Hugging Face ``rope_scaling`` entry.

    ``"linear"`` divides every frequency by ``factor``; ``"llama3"`` (Llama 3.1+) divides
    only the low frequencies and blends the band between ``low_freq_factor`` and
    ``high_freq_factor`` of ``original_max_position_embeddings``.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"rope scaling kind must be 'linear' or 'llama3', got {self.kind!r}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}"
            )


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Tensor:
    """Inverse frequencies (fp32, ``[head_dim // 2]``)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"rope theta must be positive, got {theta}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).float()
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = context / scaling.low_freq_factor
    high_freq_wavelength = context / scaling.high_freq_factor
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(in_band, blended, scaled).float()


class RotaryEmbedding(nn.Module):
    """``cos, sin = rotary(position_ids)``, each ``[..., head_dim]`` in fp32."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.register_buffer("inv_freq", rope_frequencies(head_dim, theta, scaling), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute the unsaved buffer (after loading into a model built on the meta device)."""
        self.inv_freq = rope_frequencies(self.head_dim, self.theta, self.scaling)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, scaling={self.scaling}"


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, S, heads, head_dim]`` by the angles of ``cos``/``sin [B, S, head_dim]``
    (fp32 angles cast to x's dtype first, as Hugging Face models do)."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
