"""A latency lookup table: the measured time of one transformer layer's attention and MLP at
each width choice, on the current device, at given batch and sequence shapes, timed with the
library's own kernels (warm-up, then the median). Routers use it to predict the latency of
a routing: ``fixed + sum over layers of sum over choices p(choice) * time(choice)``, which
is differentiable in the router probabilities.

A layer whose tokens mix widths (token routing) costs more than that mean: routing,
smaller GEMMs, or, where routing does not pay, every token at full width (the layers' rule,
flextron.layers.ROUTED_MIN_TOKENS). The table also times each layer kind with a uniform
per-token mix (``mlp_mixed_ms``, ``attention_mixed_ms``) and prices a token router's layers
from it: where the mix is not faster than full width the kind costs that measured time
whatever the probabilities (it saves nothing to route it per token); otherwise the mean
above plus the mix's measured overhead over its own static mean.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flextron.model import ElasticLM
from flextron.outputs import atomic_write_json
from flextron.timing import median_ms

Phase = Literal["prefill", "decode"]


@dataclass
class LatencyTable:
    """Milliseconds per layer for each MLP width choice and head choice, plus the fixed part
    (embeddings, final norm, output head) of one forward pass."""

    device: str
    device_name: str
    dtype: str
    phase: Phase
    batch_size: int
    seq_len: int  # prefill: tokens per sequence; decode: cached tokens
    num_layers: int
    mlp_ms: list[float]
    attention_ms: list[float]
    fixed_ms: float
    # One layer's MLP / attention with a uniform per-token mix (None: a table from before 0.2).
    mlp_mixed_ms: float | None = None
    attention_mixed_ms: float | None = None

    def expected_ms(self, mlp_probs: Tensor, attention_probs: Tensor, per_token: bool = False) -> Tensor:
        """Expected latency of a routing given per-layer choice probabilities
        (``[layers, choices]``; per-token probabilities averaged over tokens first).
        ``per_token``: the layers mix widths across tokens (see the module docstring)."""
        mlp = self._kind_ms(mlp_probs, self.mlp_ms, self.mlp_mixed_ms if per_token else None)
        attention = self._kind_ms(
            attention_probs, self.attention_ms, self.attention_mixed_ms if per_token else None
        )
        return self.fixed_ms + mlp + attention

    @staticmethod
    def _kind_ms(probs: Tensor, static_ms: list[float], mixed_ms: float | None) -> Tensor:
        times = torch.as_tensor(static_ms, dtype=probs.dtype, device=probs.device)
        mean = (probs * times).sum()
        if mixed_ms is None:
            return mean
        if mixed_ms >= static_ms[0]:  # mixing saves nothing here: the kind costs what it measured
            # (mean * 0 keeps the probabilities in the graph: zero gradients, not none)
            return mean * 0 + probs.shape[0] * mixed_ms
        return mean + probs.shape[0] * (mixed_ms - sum(static_ms) / len(static_ms))

    def uniform_ms(self, mlp_choice: int, attention_choice: int) -> float:
        return self.fixed_ms + self.num_layers * (
            self.mlp_ms[mlp_choice] + self.attention_ms[attention_choice]
        )

    def full_ms(self) -> float:
        return self.uniform_ms(0, 0)

    def save(self, path: str | Path) -> Path:
        atomic_write_json(Path(path), asdict(self))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"latency table {path} does not exist (build one with `flextron lut`)"
            ) from None
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path} is not a latency table: {e}") from None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


@torch.no_grad()
def measure(
    model: ElasticLM,
    batch_size: int = 1,
    seq_len: int = 256,
    phase: Phase = "prefill",
    warmup: int = 2,
    repeat: int = 7,
    progress: bool = True,
) -> LatencyTable:
    """Time layer 0 of ``model`` (every layer has the same shapes) at each choice, and the
    fixed part, on the model's device and dtype (the autocast dtype under torch.autocast)."""
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    weight = model.embed_tokens.weight
    device, dtype = weight.device, weight.dtype
    # Under torch.autocast (mixed-precision training) the layers compute in its dtype.
    compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
    config = model.config
    layer = model.layers[0]
    steps = seq_len if phase == "prefill" else 1
    x = torch.randn(batch_size, steps, config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(seq_len - steps, seq_len, device=device).expand(batch_size, steps)
    rotary = model.rotary(positions) if model.rotary is not None else None
    cache = _filled_cache(layer.attention, batch_size, seq_len) if phase == "decode" else None

    def attention(choice: int | Tensor):
        if cache is not None:
            cache.length = seq_len - 1
        return layer.attention(layer.attention_norm(x), choice, cache=cache, position_embeddings=rotary)

    cases: list[tuple[str, int | Tensor]] = [("mlp", c) for c in range(len(config.mlp_widths))]
    cases += [("attention", c) for c in range(len(config.head_counts))]
    cases += [("mlp_mixed", uniform_mix(batch_size, steps, len(config.mlp_widths), device))]
    cases += [("attention_mixed", uniform_mix(batch_size, steps, len(config.head_counts), device))]
    times: dict[str, list[float]] = {kind: [] for kind, _ in cases}
    for kind, choice in tqdm(cases, desc=f"latency table ({phase})", disable=not progress):
        fn = (
            (lambda c=choice: layer.mlp(layer.mlp_norm(x), c))
            if kind.startswith("mlp")
            else (lambda c=choice: attention(c))
        )
        times[kind].append(median_ms(fn, device, warmup, repeat))
    ids = torch.randint(0, config.vocab_size, (batch_size, steps), device=device)
    fixed_ms = median_ms(lambda: _fixed_part(model, ids, positions), device, warmup, repeat)
    return LatencyTable(
        device=str(device),
        device_name=device_name(device),
        dtype=str(compute_dtype).removeprefix("torch."),
        phase=phase,
        batch_size=batch_size,
        seq_len=seq_len,
        num_layers=config.num_layers,
        mlp_ms=times["mlp"],
        attention_ms=times["attention"],
        fixed_ms=fixed_ms,
        mlp_mixed_ms=times["mlp_mixed"][0],
        attention_mixed_ms=times["attention_mixed"][0],
    )


def uniform_mix(batch_size: int, steps: int, groups: int, device: torch.device) -> Tensor:
    """Per-token choices ``[batch, steps]``, an equal share of each, in a fixed random order."""
    tokens = batch_size * steps
    order = torch.randperm(tokens, generator=torch.Generator().manual_seed(0))
    return (order % groups).view(batch_size, steps).to(device)


def _filled_cache(attention, batch_size: int, seq_len: int):
    """A KV cache of ``seq_len`` slots holding random keys and values (decode timing)."""
    cache = attention.new_cache(batch_size, seq_len)
    cache.k.normal_()
    cache.v.normal_()
    return cache


def _fixed_part(model: ElasticLM, ids: Tensor, positions: Tensor) -> Tensor:
    """What every budget runs at full size: embeddings, final norm and LM head."""
    h = model.embed_tokens(ids)
    if model.embed_positions is not None:
        h = h + model.embed_positions(positions)
    return model.lm_head(model.norm(h))
