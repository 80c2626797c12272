"""A whole elastic model (prefill) vs plain Hugging Face transformers models measured in the
same run, in the forward, backward and full (training step) modes: ``ElasticLM`` at full width vs the transformers model with the
same weights, and each uniform sub-network vs a transformers model of exactly that size
(the "static sliced model": what you would get by exporting it). Also a per-token routed
mix. Random weights: the time does not depend on their values.

Shapes: SmolLM2-135M on the CPU (all 30 layers); a Llama-3-8B-shaped model with a few
layers on the GPU (the layers dominate; embeddings and head are as in the full model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron.benchmarks.common import BenchOptions, Results, print_table, time_modes
from flextron.conversion import hf_submodel
from flextron.model import ElasticConfig, ElasticLM, Routing
from flextron.timing import Stats, stats_columns


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    mlp_widths: tuple[int, ...]
    head_counts: tuple[int, ...]

    def config(self) -> ElasticConfig:
        return ElasticConfig(
            architecture="llama",
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            intermediate_size=self.intermediate,
            mlp_widths=self.mlp_widths,
            head_counts=self.head_counts,
            max_positions=8192,
            rope_theta=500000.0,
        )

    def fewer_layers(self) -> ModelShape:
        """The same shape with at most 2 layers (quick runs)."""
        return ModelShape(**{**self.__dict__, "layers": min(self.layers, 2)})

    def random_model(self, device: str, dtype: torch.dtype) -> ElasticLM:
        """An inference-mode ElasticLM of this shape with N(0, 0.02) weights (the time does
        not depend on their values)."""
        model = ElasticLM(self.config(), device=device, dtype=dtype).eval().requires_grad_(False)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        return model

    def source_config(self) -> dict:
        """The transformers LlamaConfig of the full model, as a dict."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            tie_word_embeddings=False,
        ).to_dict()


CPU_SHAPES = {"smollm2-135m": ModelShape(49152, 576, 30, 9, 3, 1536, (1536, 1152, 768, 384), (9, 6, 3))}
GPU_SHAPES = {
    "llama3-8b-4layers": ModelShape(
        128256, 4096, 4, 32, 8, 14336, (14336, 10752, 7168, 3584), (32, 24, 16, 8)
    )
}
CPU_TOKENS, GPU_TOKENS = (256,), (2048, 8192)
# (MLP choice, attention choice) of the uniform sub-networks measured
UNIFORM_CASES = ((0, 0), (1, 0), (2, 1), (3, 2))


def layer_flops(config: ElasticConfig, mlp: int, attention: int, tokens: int) -> float:
    """Matmul FLOPs of one layer over a causal prefill of ``tokens`` tokens. The ideal time of
    a routed model is the full model's time x its share of the FLOPs (LM head included)."""
    heads = config.head_counts[attention]
    weights = config.layer_params(config.mlp_widths[mlp], heads)
    core = 2 * 2 * heads * config.head_dim * tokens * (tokens + 1) / 2
    return 2 * weights * tokens + core


def run(options: BenchOptions) -> Path:
    device, dtype = options.device, options.dtype
    shapes = GPU_SHAPES if options.on_gpu else CPU_SHAPES
    tokens_list = GPU_TOKENS if options.on_gpu else CPU_TOKENS
    if options.quick:
        shapes = {name: shape.fewer_layers() for name, shape in shapes.items()}
        tokens_list = tokens_list[:1]
    repeat = options.repeat(5)
    results = Results("elastic_model", device)
    results.write_as_you_go(options.out)
    print(f"elastic_model benchmark on {results.device_name}, {dtype}")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, shape in shapes.items():
            model = shape.random_model(device, dtype)
            source = shape.source_config()
            for tokens in tokens_list:
                _bench_shape(
                    results, model, source, name, tokens, device, repeat, options.quick, options.modes
                )
            del model
    print_table(
        results.rows,
        [
            "shape",
            "tokens",
            "case",
            "fraction_of_full",
            "ideal_fraction",
            "vs_ideal",
            "vs_transformers",
            "full_fraction_of_full",
            "full_vs_transformers",
        ],
    )
    path = results.write(options.out)
    print(f"wrote {path}")
    return path


def _bench_shape(
    results, model: ElasticLM, source: dict, name: str, tokens: int, device, repeat, quick, modes
):
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    head_flops = 2 * config.vocab_size * config.hidden_size * tokens  # the LM head: never elastic
    full_flops = config.num_layers * layer_flops(config, 0, 0, tokens) + head_flops
    common = {
        "shape": name,
        "layers": config.num_layers,
        "tokens": tokens,
        "dtype": str(model.embed_tokens.weight.dtype)[6:],
    }
    full_stats: dict[str, Stats] | None = None
    cases = UNIFORM_CASES[:2] if quick else UNIFORM_CASES
    for mlp, attention in tqdm(cases, desc=f"{name} T={tokens}", leave=False):
        routing = Routing.uniform(config.num_layers, mlp, attention)
        hf_model, width, heads = hf_submodel(model, source, mlp, attention)
        fns = {
            "ours": lambda r=routing: model(ids, r),
            "transformers": lambda m=hf_model: m(ids, use_cache=False).logits,
        }
        leaves = [*model.parameters(), *hf_model.parameters()]
        stats = time_modes(fns, leaves, device, repeat, modes)
        del hf_model, fns, leaves
        full_stats = full_stats or stats  # the first case is the full width
        ideal = (config.num_layers * layer_flops(config, mlp, attention, tokens) + head_flops) / full_flops
        results.add(
            **common,
            case=f"uniform MLP {width} heads {heads}",
            **stats_columns(stats),
            ideal_fraction=round(ideal, 4),
            **_ratios(stats, full_stats, ideal),
        )
    # Per token: every layer routes each token to a random MLP width and head count.
    gen = torch.Generator().manual_seed(0)
    mlp_choice = [
        torch.randint(0, len(config.mlp_widths), (1, tokens), generator=gen).to(device)
        for _ in range(config.num_layers)
    ]
    attention_choice = [
        torch.randint(0, len(config.head_counts), (1, tokens), generator=gen).to(device)
        for _ in range(config.num_layers)
    ]
    routing = Routing(mlp_choice, attention_choice)
    stats = time_modes({"ours": lambda: model(ids, routing)}, list(model.parameters()), device, repeat, modes)
    ideal = (_token_flops(config, mlp_choice, attention_choice, tokens) + head_flops) / full_flops
    results.add(
        **common,
        case="per-token uniform mix",
        **stats_columns(stats),
        transformers_ms=None,
        ideal_fraction=round(ideal, 4),
        **_ratios(stats, full_stats, ideal),
    )


def _ratios(stats: dict[str, Stats], full: dict[str, Stats], ideal: float) -> dict[str, float | None]:
    """Ours over our full width in every mode that ran; in the forward mode also over the
    FLOP-proportional ideal and over transformers (None when it was not timed)."""
    ratios: dict[str, float | None] = {}
    for mode, suffix in (("", ""), ("backward_", "_backward"), ("full_", "_full")):
        if f"ours{suffix}" in stats:
            ratios[f"{mode}fraction_of_full"] = stats[f"ours{suffix}"].median / full[f"ours{suffix}"].median
        if f"transformers{suffix}" in stats:
            ratios[f"{mode}vs_transformers"] = (
                stats[f"ours{suffix}"].median / stats[f"transformers{suffix}"].median
            )
    if "ours" in stats:
        ratios["vs_ideal"] = ratios["fraction_of_full"] / ideal
        ratios.setdefault("vs_transformers", None)
    return ratios


def _token_flops(config: ElasticConfig, mlp_choice, attention_choice, tokens: int) -> float:
    """Projection FLOPs of each token at its own widths, plus its causal core attention."""
    total = 0.0
    head_counts = torch.tensor(config.head_counts, dtype=torch.float64)
    positions = torch.arange(1, tokens + 1, dtype=torch.float64)
    for mlp, attention in zip(mlp_choice, attention_choice, strict=True):
        for m in range(len(config.mlp_widths)):
            for a in range(len(config.head_counts)):
                count = ((mlp == m) & (attention == a)).sum().item()
                total += 2 * config.layer_params(config.mlp_widths[m], config.head_counts[a]) * count
        heads = head_counts[attention.reshape(-1).cpu()]
        total += (4 * config.head_dim * heads * positions).sum().item()
    return total
