"""Elastic attention (flextron.ElasticAttention) vs plain torch attention measured in the same
run: the dense full-width layer, and for each static head count the same layer built on
sliced weights (the "static sliced model"). Prefill (causal, batch 1) and one decode step
with a filled KV cache; static head counts, a per-token mix (SDPA masked: every head, each
token's unused heads zeroed; SDPA routed: nested projections around core attention per head
band; FlexAttention) and a batch of sequences with different budgets. Prefill is
timed in the forward, backward and full (training step) modes; decode in the forward mode.

The ideal is FLOP-proportional: time x (FLOPs of the routed layer / FLOPs of the dense one),
counting the projections and the causal core attention each token actually uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from flextron.benchmarks.common import BenchOptions, Results, mode_ratios, print_table, time_all, time_modes
from flextron.layers import NEVER, ElasticAttention
from flextron.rope import apply_rotary
from flextron.timing import Stats, stats_columns

HEAD_FRACTIONS = (1.0, 0.75, 0.5, 0.25)


@dataclass(frozen=True)
class AttentionShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    def head_counts(self) -> list[int]:
        group = self.heads // self.kv_heads
        counts = [max(group, round(self.heads * f / group) * group) for f in HEAD_FRACTIONS]
        return sorted(set(counts), reverse=True)


GPU_SHAPES = {
    "llama2-7b": AttentionShape(4096, 32, 32, 128),
    "llama2-7b-gqa": AttentionShape(4096, 32, 8, 128),
}
GPU_PREFILL = (512, 2048, 8192)
GPU_DECODE = (16, 4096)  # batch, cached tokens
CPU_SHAPES = {"small": AttentionShape(512, 8, 8, 64), "small-gqa": AttentionShape(512, 8, 4, 64)}
CPU_PREFILL = (256, 1024)
CPU_DECODE = (4, 1024)


def layer_flops(shape: AttentionShape, heads: torch.Tensor, keys: torch.Tensor) -> float:
    """FLOPs of the projections and the core attention for tokens using ``heads[t]`` query
    heads over ``keys[t]`` keys."""
    kv = 2 * shape.kv_heads * shape.head_dim
    projections = 2 * shape.hidden * (kv * heads.numel() + 2 * shape.head_dim * heads.sum().item())
    core = 4 * shape.head_dim * (heads * keys).sum().item()
    return float(projections + core)


@dataclass(frozen=True)
class PlainAttention:
    """Standard attention (torch only) on copies of the first ``heads`` query heads' weights:
    the static sliced model, or the dense layer when ``heads`` is all of them."""

    w_qkv: torch.Tensor
    w_o: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def slice(cls, layer: ElasticAttention, heads: int) -> PlainAttention:
        kv_heads = heads * layer.num_kv_heads // layer.num_heads
        d, kv_size = layer.head_dim, layer.kv_size
        weight = layer.qkv_proj.weight
        w_qkv = torch.cat(
            [
                weight[: kv_heads * d],
                weight[kv_size // 2 : kv_size // 2 + kv_heads * d],
                weight[kv_size : kv_size + heads * d],
            ]
        )
        w_o = layer.o_proj.weight[:, : heads * d].contiguous()
        return cls(w_qkv, w_o, heads, kv_heads, d)

    def __call__(self, x, cos, sin, cache_kv=None):
        batch, steps, _ = x.shape
        kv, d = self.kv_heads * self.head_dim, self.head_dim
        qkv = F.linear(x, self.w_qkv)
        k = qkv[..., :kv].view(batch, steps, self.kv_heads, d)
        v = qkv[..., kv : 2 * kv].view(batch, steps, self.kv_heads, d)
        q = qkv[..., 2 * kv :].view(batch, steps, self.heads, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache_kv is not None:  # decode: write the new token into a preallocated cache
            cache_k, cache_v, length = cache_kv
            cache_k[:, : self.kv_heads, length - steps : length] = k
            cache_v[:, : self.kv_heads, length - steps : length] = v
            k, v = cache_k[:, : self.kv_heads, :length], cache_v[:, : self.kv_heads, :length]
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=cache_kv is None, enable_gqa=self.kv_heads != self.heads
        )
        return F.linear(out.transpose(1, 2).reshape(batch, steps, -1), self.w_o)


def add_row(results, common: dict, case: str, backend: str, stats: dict[str, Stats], ideal: float) -> None:
    """``stats``: "ours" and "dense" (and "sliced", the plain layer at the same head count),
    timed interleaved, in the modes that ran (see common.time_modes)."""
    forward = {}
    if "ours" in stats:
        ours_ms, dense_ms = stats["ours"].median, stats["dense"].median
        sliced_ms = stats["sliced"].median if "sliced" in stats else None
        forward = {
            "fraction_of_dense": ours_ms / dense_ms,
            "vs_ideal": ours_ms / (ideal * dense_ms),
            "vs_sliced": ours_ms / sliced_ms if sliced_ms else None,
        }
    results.add(
        **common,
        case=case,
        backend=backend,
        **{"sliced_ms": None, **stats_columns(stats)},
        ideal_fraction=ideal,
        **forward,
        **mode_ratios(stats, "ours", "dense", "fraction_of_dense"),
        **mode_ratios(stats, "ours", "sliced", "vs_sliced"),
    )


# Per-token rows time both SDPA paths of the layer's routing rule and FlexAttention.
TOKEN_BACKENDS = ("sdpa-masked", "sdpa-routed", "flex")


def use_backend(layer: ElasticAttention, backend: str) -> None:
    """``"sdpa"`` (the layer's own rule), ``"sdpa-masked"``, ``"sdpa-routed"`` or ``"flex"``."""
    layer.attention_backend = "flex" if backend == "flex" else "sdpa"
    layer.routed_min_tokens = {"sdpa-masked": NEVER, "sdpa-routed": 0}.get(backend)


def weights(*layers: PlainAttention) -> list[torch.Tensor]:
    return [t for layer in layers for t in (layer.w_qkv, layer.w_o)]


def mixed_choice(batch: int, steps: int, groups: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, groups, (batch, steps), generator=gen).to(device)


def bench_prefill(results, layer, shape, name, steps, device, dtype, repeat, modes):
    x = torch.randn(1, steps, shape.hidden, dtype=dtype, device=device)
    positions = torch.arange(steps, device=device)[None]
    cos, sin = layer.rotary(positions)
    keys = torch.arange(1, steps + 1, device=device)
    full_flops = layer_flops(shape, torch.full((steps,), shape.heads, device=device), keys)
    dense = PlainAttention.slice(layer, shape.heads)
    common = {"phase": "prefill", "shape": name, "batch": 1, "tokens": steps, "dtype": str(dtype)[6:]}

    for g, heads in enumerate(layer.head_counts):
        sliced = PlainAttention.slice(layer, heads)
        fns = {
            "ours": lambda g=g: layer(x, g, position_embeddings=(cos, sin)),
            "dense": lambda: dense(x, cos, sin),
            "sliced": lambda sliced=sliced: sliced(x, cos, sin),
        }
        ideal = layer_flops(shape, torch.full((steps,), heads, device=device), keys) / full_flops
        leaves = [x, *layer.parameters(), *weights(dense, sliced)]
        stats = time_modes(fns, leaves, device, repeat, modes)
        add_row(results, common, f"static {heads}/{shape.heads} heads", "sdpa", stats, ideal)

    choice = mixed_choice(1, steps, len(layer.head_counts), device)
    token_heads = layer.head_count_lookup[choice].reshape(-1)
    proportional = layer_flops(shape, token_heads, keys) / full_flops
    for backend in TOKEN_BACKENDS:
        backend_modes = modes
        if backend == "flex" and x.device.type == "cpu":  # FlexAttention has no CPU backward
            backend_modes = tuple(m for m in modes if m == "forward")
        if not backend_modes:
            continue
        use_backend(layer, backend)
        fns = {
            "ours": lambda: layer(x, choice, position_embeddings=(cos, sin)),
            "dense": lambda: dense(x, cos, sin),
        }
        leaves = [x, *layer.parameters(), *weights(dense)]
        stats = time_modes(fns, leaves, device, repeat, backend_modes)
        add_row(results, common, "per-token uniform mix", backend, stats, proportional)
    use_backend(layer, "sdpa")


def bench_per_sequence(results, layer, shape, name, steps, device, dtype, repeat, modes):
    """A batch with one sequence per head choice (requests with different budgets)."""
    groups = len(layer.head_counts)
    x = torch.randn(groups, steps, shape.hidden, dtype=dtype, device=device)
    cos, sin = layer.rotary(torch.arange(steps, device=device)[None].expand(groups, steps))
    choice = torch.arange(groups)  # on the host: no device sync to group the sequences
    keys = torch.arange(1, steps + 1, device=device).repeat(groups)
    full = layer_flops(shape, torch.full((groups * steps,), shape.heads, device=device), keys)
    heads = torch.tensor(layer.head_counts, device=device).repeat_interleave(steps)
    ideal = layer_flops(shape, heads, keys) / full
    dense = PlainAttention.slice(layer, shape.heads)
    fns = {
        "ours": lambda: layer(x, choice, position_embeddings=(cos, sin)),
        "dense": lambda: dense(x, cos, sin),
    }
    common = {
        "phase": "prefill",
        "shape": name,
        "batch": groups,
        "tokens": groups * steps,
        "dtype": str(dtype)[6:],
    }
    stats = time_modes(fns, [x, *layer.parameters(), *weights(dense)], device, repeat, modes)
    add_row(results, common, "per-sequence budgets", "sdpa", stats, ideal)


def bench_decode(results, layer, shape, name, batch, cached, device, dtype, repeat):
    """One decode step (inference: timed in the forward mode only)."""
    cache = layer.new_cache(batch, cached + 1)
    cache.k.normal_()
    cache.v.normal_()
    cache.valid[:, :cached] = True
    x = torch.randn(batch, 1, shape.hidden, dtype=dtype, device=device)
    positions = torch.full((batch, 1), cached, device=device)
    cos, sin = layer.rotary(positions)
    keys = torch.full((batch,), cached + 1, device=device)
    full_flops = layer_flops(shape, torch.full((batch,), shape.heads, device=device), keys)

    def step(choice):
        cache.length = cached
        return layer(x, choice, cache=cache, position_embeddings=(cos, sin))

    kv = (cache.k.clone(), cache.v.clone(), cached + 1)
    dense = PlainAttention.slice(layer, shape.heads)
    common = {"phase": "decode", "shape": name, "batch": batch, "tokens": cached, "dtype": str(dtype)[6:]}
    cases = [(f"static {h}/{shape.heads} heads", g, "sdpa") for g, h in enumerate(layer.head_counts)]
    choice = mixed_choice(batch, 1, len(layer.head_counts), device)
    cases += [("per-token uniform mix", choice, backend) for backend in TOKEN_BACKENDS]
    for case, choice_arg, backend in cases:
        use_backend(layer, backend)
        fns = {"ours": lambda c=choice_arg: step(c), "dense": lambda: dense(x, cos, sin, kv)}
        if isinstance(choice_arg, int):
            heads = torch.full((batch,), layer.head_counts[choice_arg], device=device)
            sliced = PlainAttention.slice(layer, layer.head_counts[choice_arg])
            fns["sliced"] = lambda sliced=sliced: sliced(x, cos, sin, kv)
        else:
            heads = layer.head_count_lookup[choice_arg].reshape(-1)
        ideal = layer_flops(shape, heads, keys) / full_flops
        add_row(results, common, case, backend, time_all(fns, device, repeat), ideal)
    use_backend(layer, "sdpa")


def run(options: BenchOptions) -> Path:
    device, dtype, on_gpu = options.device, options.dtype, options.on_gpu
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    prefill = GPU_PREFILL if on_gpu else CPU_PREFILL
    batch, cached = GPU_DECODE if on_gpu else CPU_DECODE
    if options.quick:
        shapes, prefill = dict(list(shapes.items())[:1]), prefill[:1]
    repeat = options.repeat(7)
    out_dir = options.out
    results = Results("elastic_attention", device)
    results.write_as_you_go(out_dir)
    print(f"elastic_attention benchmark on {results.device_name}, {dtype}")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, shape in shapes.items():
            layer = ElasticAttention(
                shape.hidden,
                shape.heads,
                shape.head_counts(),
                num_kv_heads=shape.kv_heads,
                head_dim=shape.head_dim,
                device=device,
                dtype=dtype,
            )
            for steps in prefill:
                bench_prefill(results, layer, shape, name, steps, device, dtype, repeat, options.modes)
            bench_per_sequence(results, layer, shape, name, prefill[0], device, dtype, repeat, options.modes)
            if "forward" in options.modes:
                bench_decode(results, layer, shape, name, batch, cached, device, dtype, repeat)
    print_table(
        results.rows,
        [
            "phase",
            "shape",
            "tokens",
            "case",
            "backend",
            "fraction_of_dense",
            "ideal_fraction",
            "vs_ideal",
            "vs_sliced",
            "full_fraction_of_dense",
        ],
    )
    path = results.write(out_dir)
    print(f"wrote {path}")
    return path
