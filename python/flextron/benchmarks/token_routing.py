"""What per-token routing costs and saves in a whole model, and where the time goes.

For each token count (prefill of one sequence; decode: one new token per sequence over a
KV cache of 256 tokens), the model at full width, a uniform sub-network, and per-token
mixes (every layer routes each token to a random MLP width and head count; MLP only;
heads only), timed interleaved; each row says its time over full width and over the
FLOP-proportional ideal, and breaks one call down by kind of work per layer (routing,
nested and dense GEMMs, activation, core attention, LM head, the rest: see
flextron.benchmarks.breakdown), scaled to the unprofiled time. Random weights (the time
does not depend on their values); the layers take the paths their routing rule picks
(flextron.layers.ROUTED_MIN_TOKENS).

Shapes: SmolLM2-135M (30 layers) on the CPU; the Llama-3-8B-shaped model with 4 layers on
the GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron.benchmarks.breakdown import KINDS, breakdown
from flextron.benchmarks.common import BenchOptions, Results, print_table, time_all
from flextron.benchmarks.elastic_model import CPU_SHAPES, GPU_SHAPES
from flextron.model import ElasticConfig, ElasticLM, Routing
from flextron.timing import stats_columns

CPU_PREFILL, GPU_PREFILL = (16, 256, 1024, 4096), (16, 256, 1024, 4096, 8192)
DECODE_BATCHES, CACHED = (1, 4), 256
PER_CALL_KINDS = ("lm_head", "other")


def routings(model: ElasticLM, batch: int, steps: int, device: str) -> dict[str, Routing]:
    """The routings compared: full width, a uniform sub-network (MLP choice 1, heads 1), and
    per-token mixes drawn uniformly at random per layer and token (seeded): over every
    choice (MLP and heads, MLP only, heads only), and over all but the widest ("half": a mean
    width share of 0.5 with four MLP widths and three head counts in equal steps)."""
    config = model.config
    layers = config.num_layers
    gen = torch.Generator().manual_seed(0)

    def draw(groups: int, low: int = 0) -> list[torch.Tensor]:
        return [torch.randint(low, groups, (batch, steps), generator=gen).to(device) for _ in range(layers)]

    mlp, heads = draw(len(config.mlp_widths)), draw(len(config.head_counts))
    narrow_mlp, narrow_heads = draw(len(config.mlp_widths), 1), draw(len(config.head_counts), 1)
    full_mlp, full_heads = [0] * layers, [0] * layers
    return {
        "full": Routing.uniform(layers, 0, 0),
        "uniform": Routing.uniform(layers, 1, 1),
        "per-token mix": Routing(mlp, heads),
        "per-token MLP": Routing(mlp, full_heads),
        "per-token heads": Routing(full_mlp, heads),
        "per-token half": Routing(narrow_mlp, narrow_heads),
    }


def flops(config: ElasticConfig, routing: Routing, batch: int, steps: int, cached: int) -> float:
    """Matmul FLOPs of one call: each token's projections at its widths, its core attention
    over the keys it sees (``cached`` earlier ones plus its causal prefix), the LM head."""
    keys = (cached + torch.arange(1, steps + 1, dtype=torch.float64)).expand(batch, steps)
    mlp_widths = torch.tensor(config.mlp_widths, dtype=torch.float64)
    head_counts = torch.tensor(config.head_counts, dtype=torch.float64)
    total = 2.0 * config.vocab_size * config.hidden_size * batch * steps
    for mlp, attention in zip(routing.mlp, routing.attention, strict=True):
        widths = mlp_widths[torch.as_tensor(mlp).cpu()].expand(batch, steps)
        heads = head_counts[torch.as_tensor(attention).cpu()].expand(batch, steps)
        base = config.layer_params(0, 0)  # layer_params is linear in the MLP width and heads
        params = (
            base + (config.layer_params(1, 0) - base) * widths + (config.layer_params(0, 1) - base) * heads
        )
        total += (2 * params + 4 * config.head_dim * heads * keys).sum().item()
    return total


def run(options: BenchOptions) -> Path:
    device, dtype = options.device, options.dtype
    shapes = GPU_SHAPES if options.on_gpu else CPU_SHAPES
    prefill = GPU_PREFILL if options.on_gpu else CPU_PREFILL
    decode = DECODE_BATCHES
    if options.quick:
        shapes = {name: shape.fewer_layers() for name, shape in shapes.items()}
        prefill, decode = prefill[:1], decode[:1]
    results = Results("token_routing", device)
    results.write_as_you_go(options.out)
    print(f"token_routing benchmark on {results.device_name}, {dtype}")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, shape in shapes.items():
            model = shape.random_model(device, dtype)
            for steps in tqdm(prefill, desc=f"{name} prefill", leave=False):
                _bench(results, model, name, "prefill", 1, steps, options)
            for batch in decode:
                _bench(results, model, name, "decode", batch, 1, options)
            del model
    print_table(
        results.rows,
        ["shape", "phase", "batch", "tokens", "case", "fraction_of_full", "ideal_fraction", "vs_ideal"],
    )
    path = results.write(options.out)
    print(f"wrote {path}")
    return path


def breakdown_columns(kinds: dict[str, float], scale: float, layers: int) -> dict[str, float]:
    """The breakdown scaled to the measured time: ``per_layer_{kind}_ms`` for the layers'
    kinds; ``lm_head_ms`` and ``other_ms`` (embedding, final norm and every layer's norms,
    RoPE, residuals) per call."""
    columns = {}
    for kind in KINDS:
        if kind in PER_CALL_KINDS:
            columns[f"{kind}_ms"] = kinds[kind] * scale
        else:
            columns[f"per_layer_{kind}_ms"] = kinds[kind] * scale / layers
    return columns


def _bench(
    results: Results, model: ElasticLM, name: str, phase: str, batch: int, steps: int, options
) -> None:
    device = options.device
    config = model.config
    ids = torch.randint(0, config.vocab_size, (batch, steps), device=device)
    caches = None
    if phase == "decode":  # a cache of CACHED tokens, written at full width once
        caches = model.new_caches(batch, CACHED + 1)
        model(torch.randint(0, config.vocab_size, (batch, CACHED), device=device), caches=caches)

    def call(routing: Routing):
        def forward():
            if caches is not None:
                for cache in caches:
                    cache.length = CACHED
            return model(ids, routing, caches=caches)

        return forward

    cases = routings(model, batch, steps, device)
    fns = {case: call(routing) for case, routing in cases.items()}
    repeat = options.repeat(3 if steps >= 4096 else 5)
    stats = time_all(fns, device, repeat)
    full_ms = stats["full"].median
    cached = CACHED if phase == "decode" else 0
    full_flops = flops(config, cases["full"], batch, steps, cached)
    for case, routing in cases.items():
        ours_ms = stats[case].median
        kinds = breakdown(fns[case], device, model.lm_head, calls=1 if steps >= 1024 else 2)
        scale = ours_ms / kinds["total"] if kinds["total"] else 0.0
        ideal = flops(config, routing, batch, steps, cached) / full_flops
        results.add(
            shape=name,
            layers=config.num_layers,
            phase=phase,
            batch=batch,
            tokens=batch * steps,
            cached=cached,
            case=case,
            **stats_columns({"ours": stats[case]}),
            fraction_of_full=ours_ms / full_ms,
            ideal_fraction=round(ideal, 4),
            vs_ideal=ours_ms / (ideal * full_ms),
            **breakdown_columns(kinds, scale, config.num_layers),
        )
