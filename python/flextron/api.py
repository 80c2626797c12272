"""The command line as Python functions, for notebooks and scripts: ``flextron.convert``,
``flextron.train``, ``flextron.lut``, ``flextron.evaluate``, ``flextron.export``,
``flextron.generate``, ``flextron.bench`` and ``flextron.demo`` take the CLI's options as
keyword arguments (same names, same defaults) and return what the command prints or writes.
The CLI calls these; invalid values raise ``ValueError`` (or a subclass) with the message
the CLI prints.

Text arguments (``calib``, ``data``, ``eval_data``) take a ``.txt`` file, a directory of
them, or a list of :class:`flextron.data.Text`; ``None`` is the embedded Shakespeare.
``dtype="auto"`` is float32 on the CPU and bfloat16 on a GPU.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from flextron import data as _data
from flextron.budgets import BudgetResolver, RoutingMethod, ServedBudget
from flextron.outputs import check_files_free, check_free, check_not_source
from flextron.runtime import DtypeName, resolve_device, resolve_dtype

TextSource = str | Path | Sequence[_data.Text] | None
DEFAULT_BUDGETS = (1.0, 0.75, 0.5)


def _texts(source: TextSource, default_split: str) -> list[_data.Text]:
    if source is None:
        return _data.shakespeare(default_split)
    if isinstance(source, str | Path):
        return _data.read_texts(source)
    texts = list(source)
    if not texts or not all(isinstance(t, _data.Text) for t in texts):
        raise ValueError("text must be a file, a directory, or a non-empty list of flextron.data.Text")
    return texts


def _checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a training run's (its latest checkpoint, said on stderr)."""
    from flextron.checkpoint import resolve_checkpoint

    resolved = resolve_checkpoint(path)
    if resolved != Path(path):
        print(f"using {resolved}, the latest checkpoint of the run in {path}", file=sys.stderr)
    return resolved


def _load(checkpoint: str | Path, device: str, dtype: DtypeName | torch.dtype):
    from flextron.checkpoint import load_elastic, load_tokenizer

    resolved = resolve_device(device)
    model, record = load_elastic(checkpoint, device=resolved, dtype=resolve_dtype(dtype, resolved))
    tokenizer = load_tokenizer(checkpoint)
    return model, record, tokenizer


# ---------------------------------------------------------------------------------------


def convert(
    out: str | Path,
    model: str | Path | None = None,
    calib: TextSource = None,
    *,
    mlp_widths: Sequence[int] | None = None,
    head_counts: Sequence[int] | None = None,
    seq_len: int = 256,
    calib_tokens: int = 16384,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: DtypeName = "auto",
    overwrite: bool = False,
    progress: bool = True,
    head_widths: Sequence[int] | None = None,
) -> Path:
    """A local Hugging Face model (default: the embedded SmolLM2-135M) -> an elastic
    checkpoint in ``out``: neurons and heads sorted by importance on ``calib`` text, width
    choices (default: 100/75/50/25% of the MLP, 100/66/33% of the heads in whole KV groups)
    and the loss of every uniform sub-network. Weights stay fp32; ``dtype`` is the compute
    dtype of the calibration passes. ``out`` must be empty or absent unless ``overwrite``.
    ``head_widths`` is the deprecated name of ``head_counts``. Returns the checkpoint directory."""
    from flextron.conversion import ConvertOptions
    from flextron.conversion import convert as convert_model

    if head_widths is not None:
        if head_counts is not None:
            raise ValueError("head_widths is the old name of head_counts: give one of them")
        warnings.warn("head_widths is deprecated, use head_counts", FutureWarning, stacklevel=2)
        head_counts = head_widths

    resolved = resolve_device(device)
    resolve_dtype(dtype, resolved)
    options = ConvertOptions(
        mlp_widths=mlp_widths,
        head_counts=head_counts,
        seq_len=seq_len,
        max_tokens=calib_tokens,
        batch_size=batch_size,
        device=str(resolved),
        dtype=dtype,
        progress=progress,
    )
    model_dir = Path(model) if model is not None else _data.embedded_model_dir()
    return convert_model(model_dir, _texts(calib, "train"), out, options, overwrite=overwrite)


def train(
    checkpoint: str | Path,
    out: str | Path,
    *,
    stage: Literal["elastic", "routers", "joint"] | None = None,
    config: str | Path | Any | None = None,
    data: TextSource = None,
    eval_data: TextSource = None,
    budgets: Sequence[float] | None = None,
    steps: int | None = None,
    lut: str | Path | None = None,
    resume: bool = False,
    device: str | None = None,
    dtype: DtypeName | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """One training stage from an elastic checkpoint into the run directory ``out``
    (checkpoints, ``log.jsonl``, ``latency.json``): ``"elastic"`` (all sub-networks),
    ``"routers"`` (routers for latency budgets, model frozen) or ``"joint"``. ``config`` is a
    :class:`flextron.TrainConfig` or a TOML/YAML file of its fields; the keyword arguments
    given override it. ``resume=True`` continues from ``out``'s latest checkpoint exactly (a
    changed setting is refused, except those that may change: see docs/cli/train.md); a new
    run refuses a directory holding another run's checkpoints unless ``overwrite``.
    Returns a :class:`flextron.training.TrainResult`."""
    from flextron.training import TrainConfig
    from flextron.training import train as run_training

    overrides = {
        "stage": stage,
        "steps": steps,
        "budgets": tuple(budgets) if budgets is not None else None,
        "device": device,  # checked by the trainer (resolve_device)
        "dtype": dtype,
        "seed": seed,
        "lut": str(lut) if lut is not None else None,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(config, TrainConfig):
        settings = dataclasses.replace(config, **given)
    elif config is not None:
        settings = TrainConfig.from_file(config, **given)
    else:
        settings = TrainConfig(**given)
    return run_training(
        settings,
        _checkpoint(checkpoint),
        _texts(data, "train"),
        out,
        eval_texts=_texts(eval_data, "eval"),
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )


def lut(
    checkpoint: str | Path,
    out: str | Path,
    *,
    batch_size: int = 1,
    seq_len: int = 256,
    phase: Literal["prefill", "decode"] = "prefill",
    device: str = "cpu",
    dtype: DtypeName = "auto",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
):
    """Measure the latency lookup table (per layer kind x width choice, plus the fixed part)
    of a checkpoint's model on this device and save it as JSON to ``out`` (an existing file
    only with ``overwrite``). Returns the :class:`flextron.latency.LatencyTable`."""
    from flextron.latency import measure

    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    check_files_free([Path(out)], overwrite)
    model, _, _ = _load(_checkpoint(checkpoint), device, dtype)
    torch.manual_seed(seed)  # the timed inputs are random
    table = measure(model, batch_size, seq_len, phase, progress=progress)
    table.save(out)
    return table


def evaluate(
    checkpoint: str | Path,
    *,
    data: TextSource = None,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    routing: RoutingMethod = "auto",
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 8,
    out: str | Path | None = None,
    device: str = "cpu",
    dtype: DtypeName = "auto",
    overwrite: bool = False,
    progress: bool = True,
):
    """Perplexity at each budget on held-out text (default: the held-out Shakespeare plays),
    with the checkpoint's trained routers when it has them (``routing="auto"``), else its
    uniform sub-network table (see :mod:`flextron.budgets`). With ``out``, also writes
    ``perplexity.json`` and ``perplexity.png`` there (replacing earlier ones only with
    ``overwrite``). Returns a list of :class:`flextron.evaluation.BudgetResult`."""
    from flextron.evaluation import RESULT_FILES, evaluate_budgets, write_results

    if not budgets:
        raise ValueError("budgets needs at least one budget")
    if out is not None:
        check_files_free([Path(out) / name for name in RESULT_FILES], overwrite)
    checkpoint = _checkpoint(checkpoint)
    model, record, tokenizer = _load(checkpoint, device, dtype)
    resolver = BudgetResolver.for_checkpoint(model, record, checkpoint, routing)
    results = evaluate_budgets(
        model,
        tokenizer,
        _texts(data, "eval"),
        budgets,
        resolver,
        seq_len=seq_len,
        max_tokens=max_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    if out is not None:
        source = record.get("source", {}).get("path", str(checkpoint))
        write_results(results, out, f"perplexity per budget: {Path(source).name} ({resolver.method})")
    return results


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    budget: float | None = None,
    mlp_choice: int | Sequence[int] | None = None,
    attention_choice: int | Sequence[int] | None = None,
    routing: RoutingMethod = "auto",
    device: str = "cpu",
    dtype: DtypeName = "auto",
    overwrite: bool = False,
) -> Path:
    """Write a static sub-network as a plain Hugging Face checkpoint (loads with
    ``AutoModelForCausalLM.from_pretrained``): the one serving ``budget`` (resolved as in
    :func:`evaluate`), or explicit choice indices. Transformers holds one MLP size and one
    head count for all layers, so a routing with per-layer widths is refused (use
    ``routing="uniform"``). The weights are saved in ``dtype``; ``out`` must be empty or
    absent unless ``overwrite``, and never the checkpoint. Returns ``out``."""
    from flextron.conversion import export_hf

    checkpoint = _checkpoint(checkpoint)
    check_not_source(Path(out), checkpoint)
    check_free(Path(out), overwrite)
    model, record, tokenizer = _load(checkpoint, device, dtype)
    if budget is not None:
        if mlp_choice is not None or attention_choice is not None:
            raise ValueError("give a budget or choice indices, not both")
        served = BudgetResolver.for_checkpoint(model, record, checkpoint, routing)(budget)
        if served.mlp_choices is None or served.attention_choices is None:
            raise ValueError(
                "a token router picks widths per token, which a static checkpoint cannot hold: "
                "export with routing='uniform' (--routing uniform) or choice indices"
            )
        mlp, attention = list(served.mlp_choices), list(served.attention_choices)
    elif mlp_choice is not None and attention_choice is not None:
        mlp, attention = mlp_choice, attention_choice
    else:
        raise ValueError("give --budget, or both --mlp-choice and --attention-choice")
    if "source" not in record:
        raise ValueError(f"{checkpoint} does not record its source model's config, which export needs")
    return export_hf(model, record["source"]["config"], out, mlp, attention, tokenizer, overwrite=overwrite)


@dataclass
class Generation:
    text: str  # the prompt and its continuation
    served: ServedBudget
    widths: tuple[str, str]  # MLP widths and head counts, summarized per layer


def generate(
    checkpoint: str | Path,
    prompt: str,
    *,
    budget: float = 1.0,
    routing: RoutingMethod = "auto",
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: DtypeName = "auto",
) -> Generation:
    """Continue ``prompt`` at ``budget`` (greedy at ``temperature=0``), with the KV cache."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if not prompt:
        raise ValueError("the prompt is empty: give the text to continue")
    checkpoint = _checkpoint(checkpoint)
    model, record, tokenizer = _load(checkpoint, device, dtype)
    served = BudgetResolver.for_checkpoint(model, record, checkpoint, routing)(budget)
    resolved = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(resolved)
    if ids.shape[1] == 0:
        raise ValueError(f"the prompt {prompt!r} is no tokens for this tokenizer: give text to continue")
    generator = torch.Generator(device=resolved).manual_seed(seed)
    tokens = model.generate(
        ids,
        max_new_tokens,
        served.routing,
        temperature=temperature,
        top_k=top_k,
        eos_token_id=model.config.eos_token_id,
        generator=generator,
    )
    text = tokenizer.decode(tokens[0], skip_special_tokens=True)
    return Generation(text, served, served.widths(model.config))


def bench(
    suites: Sequence[str] = (
        "nested_linear",
        "elastic_mlp",
        "elastic_attention",
        "elastic_model",
        "token_routing",
    ),
    *,
    device: str | None = None,
    dtype: DtypeName = "auto",
    quick: bool = False,
    modes: Sequence[str] = ("forward", "backward", "full"),
    out: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
):
    """Run benchmark suites (``"nested_linear"``, ``"elastic_mlp"``, ``"elastic_attention"``,
    ``"elastic_model"``, ``"token_routing"``; each writes ``<suite>-<device>.json`` and ``.png``) on this device (the
    GPU when there is one), print their tables and a summary of ratios against the
    baselines measured in the same run, and write JSON + plots to ``out`` (default:
    ``runs/bench-<date>-<device>``; it must be empty unless ``overwrite``). ``modes``: what is
    timed, ``forward`` (inference), ``backward`` and ``full`` (a training step), each row's
    columns ``NAME_ms``, ``NAME_backward_ms``, ``NAME_full_ms``. Returns a
    :class:`flextron.benchmarks.BenchReport`."""
    from flextron.benchmarks import BenchOptions
    from flextron.benchmarks import run as run_suites
    from flextron.benchmarks.common import default_out_dir

    resolved = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type == "cuda" and resolved.index is not None:
        torch.cuda.set_device(resolved)
    torch.manual_seed(seed)
    options = BenchOptions(
        device=resolved.type,
        dtype=resolve_dtype(dtype, resolved),
        quick=quick,
        modes=tuple(modes),
        out=Path(out) if out is not None else default_out_dir(resolved.type),
    )
    check_free(options.out, overwrite)
    return run_suites(tuple(suites), options)


def demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    device: str = "cpu",
    dtype: DtypeName = "auto",
    seed: int = 0,
    progress: bool = True,
):
    """The whole method on the embedded SmolLM2-135M (see :mod:`flextron.demo_pipeline`):
    convert, elastic training, latency table, router training, then per budget the
    parameters used, measured latency, perplexity and speed-up; a Pareto plot and text at
    two budgets. Rerun with the same ``out`` to resume. ``quick`` is a smoke run with tiny
    step counts. Returns the table's rows."""
    from flextron.demo_pipeline import DemoOptions, run

    options = DemoOptions(
        out=Path(out), device=str(resolve_device(device)), dtype=dtype, seed=seed, progress=progress
    )
    if quick:
        options = dataclasses.replace(
            options,
            calib_tokens=1024,
            elastic_steps=2,
            router_steps=4,
            batch_size=2,
            seq_len=64,
            eval_tokens=512,
            new_tokens=8,
        )
    return run(options)
