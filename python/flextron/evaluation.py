"""Perplexity of an elastic model per budget on local text (a table, JSON and a plot)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from flextron.budgets import BudgetResolver, ServedBudget
from flextron.data import Text, token_windows
from flextron.latency import LatencyTable
from flextron.model import DynamicRouting, ElasticLM, Routing
from flextron.outputs import atomic_write_bytes
from flextron.routers import StaticRouter


@dataclass(frozen=True)
class BudgetResult:
    budget: float
    routing: str  # "uniform", "static router" or "token router" (see flextron.budgets)
    mlp_widths: str  # per layer, summarized as "width x layers" ("per token" for token routers)
    heads: str
    active_fraction: float  # transformer-layer weights used / full (mean per token for token routers)
    parameters: int  # weights the sub-network uses, embeddings included (mean per token likewise)
    tokens: int
    loss: float  # mean next-token cross-entropy (nats)
    perplexity: float
    seconds: float


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token (in fp32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def mean_loss(
    model: ElasticLM,
    batches: Sequence[torch.Tensor],
    routing: Routing | DynamicRouting,
    progress: bool = False,
) -> tuple[float, int]:
    """Mean next-token cross-entropy over full windows (every target token counted once)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
        batch = batch.to(device)
        logits = model(batch, routing)
        total += next_token_loss(logits, batch, reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count, count


def evaluate_budgets(
    model: ElasticLM,
    tokenizer,
    texts: Sequence[Text],
    budgets: Sequence[float],
    resolve: Callable[[float], ServedBudget],
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 8,
    progress: bool = True,
) -> list[BudgetResult]:
    """Perplexity at each budget on the same token windows; ``resolve`` turns a budget into
    its routing (a :class:`flextron.budgets.BudgetResolver`: trained routers or the uniform
    sub-network table)."""
    batches = list(
        token_windows(tokenizer, texts, seq_len, max_tokens, batch_size, model.config.eos_token_id)
    )
    config = model.config
    full_layers = config.num_layers * config.layer_params(config.mlp_widths[0], config.head_counts[0])
    fixed = model.num_parameters() - full_layers
    results = []
    for budget in tqdm(budgets, desc="budgets", unit="budget", disable=not progress):
        served = resolve(budget)
        start = time.perf_counter()
        loss, tokens = mean_loss(model, batches, served.routing)
        fraction = served.active_fraction(config)
        mlp_widths, heads = served.widths(config)
        results.append(
            BudgetResult(
                budget=budget,
                routing=served.method,
                mlp_widths=mlp_widths,
                heads=heads,
                active_fraction=fraction,
                parameters=round(fixed + fraction * full_layers),
                tokens=tokens,
                loss=loss,
                perplexity=math.exp(loss),
                seconds=time.perf_counter() - start,
            )
        )
    return results


def format_table(results: Sequence[BudgetResult]) -> str:
    lines = [
        "| budget | routing | MLP widths (x layers) | heads (x layers) | layer weights | parameters | perplexity | eval time (s) |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.budget:g} | {r.routing} | {r.mlp_widths} | {r.heads} | {r.active_fraction:.3f} | {r.parameters / 1e6:.1f}M "
            f"| {r.perplexity:.2f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


RESULT_FILES = ("perplexity.json", "perplexity.png")


def write_results(results: Sequence[BudgetResult], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``perplexity.json`` and ``perplexity.png`` (perplexity vs active parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (out_dir / name for name in RESULT_FILES)
    atomic_write_bytes(json_path, (json.dumps([asdict(r) for r in results], indent=1) + "\n").encode())
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r.parameters / 1e6 for r in results]
    ax.plot(xs, [r.perplexity for r in results], "o-")
    for r, x in zip(results, xs, strict=True):
        ax.annotate(
            f"budget {r.budget:g}", (x, r.perplexity), fontsize=7, textcoords="offset points", xytext=(4, 4)
        )
    ax.set_xlabel("parameters used (millions)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


@torch.no_grad()
def evaluate_in_training(
    model: ElasticLM,
    batches: Sequence[torch.Tensor],
    budgets: Sequence[float],
    resolve: BudgetResolver,
    table: LatencyTable | None,
) -> dict[str, Any]:
    """Held-out loss per trained budget: with the routers (argmax) when ``resolve`` has them,
    else with the uniform sub-network table; with routers, also the expected latency of their
    probabilities on ``table`` and the target."""
    was_training = model.training
    model.eval()
    smallest = model.config.smallest_fraction()
    row: dict[str, Any] = {}
    for budget in budgets:
        # The uniform table serves a budget under the smallest sub-network with the smallest.
        served = resolve(budget if resolve.router is not None else max(budget, smallest))
        loss, _ = mean_loss(model, batches, served.routing)
        row[f"{budget:g}"] = {"loss": loss, "perplexity": math.exp(loss)}
        if resolve.router is not None:
            router = resolve.router
            output = router(budget) if isinstance(router, StaticRouter) else served.routing.output()
            row[f"{budget:g}"]["latency_ms"] = float(
                table.expected_ms(output.mlp_probs, output.attention_probs, output.per_token)
            )
            row[f"{budget:g}"]["latency_target_ms"] = budget * table.full_ms()
    model.train(was_training)
    return row
