"""The ``flextron`` command line: convert, train, lut, eval, export, generate, bench, demo.

Each command parses its flags and calls the function of the same name in
:mod:`flextron.api` (``eval`` calls ``evaluate``). User errors (missing files, bad values,
unsupported models, CUDA asked for without a GPU) print one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import flextron
from flextron import api
from flextron.budgets import ROUTING_METHODS
from flextron.runtime import DTYPE_NAMES

COMMANDS = ("convert", "train", "lut", "eval", "export", "generate", "bench", "demo")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line (``flextron eval: error: ...; see --help``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_in(low: int, high: int, what: str):
    """An argparse type: an integer in [low, high), else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value < high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _int_in(1, 2**63, "a positive integer")
_seed = _int_in(0, 2**63, "an integer in [0, 2**63)")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in _entries(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in _entries(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _entries(text: str) -> list[str]:
    """The comma-separated entries of ``text``; an empty one (``1,,0.5``) is an error, not
    silently dropped."""
    entries = [v.strip() for v in text.split(",")]
    if not all(entries):
        raise argparse.ArgumentTypeError(f"an empty entry in {text!r}")
    return entries


def _choice_list(choices: Sequence[str], deprecated: Sequence[str] = ()):
    """An argparse type: comma-separated names from ``choices`` (or ``deprecated``, accepted
    but not offered), else a one-line usage error."""

    def parse(text: str) -> list[str]:
        names = _entries(text)
        unknown = [n for n in names if n not in choices and n not in deprecated]
        if unknown:
            raise argparse.ArgumentTypeError(f"expected names from {', '.join(choices)}; got {text!r}")
        return names

    return parse


def _choice_arg(values: list[int] | None) -> int | list[int] | None:
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


# ---------------------------------------------------------------------------------------
# Commands


def _renamed(args: argparse.Namespace, old: str, new: str):
    """The value of flag ``new``, or of its deprecated name ``old`` (with a one-line notice)."""
    flag = "--" + old.replace("_", "-")
    value = getattr(args, old)
    if value is None:
        return getattr(args, new)
    if getattr(args, new) is not None:
        raise ValueError(f"{flag} is the old name of --{new.replace('_', '-')}: give one of them")
    print(f"flextron {args.command}: {flag} is deprecated, use --{new.replace('_', '-')}", file=sys.stderr)
    return value


def cmd_convert(args: argparse.Namespace) -> None:
    out = api.convert(
        args.out,
        args.model,
        args.calib,
        mlp_widths=args.mlp_widths,
        head_counts=_renamed(args, "head_widths", "head_counts"),
        seq_len=args.seq_len,
        calib_tokens=args.calib_tokens,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=_progress(args),
    )
    print(f"wrote the elastic checkpoint {out}")


def cmd_train(args: argparse.Namespace) -> None:
    result = api.train(
        args.checkpoint,
        args.out,
        stage=args.stage,
        config=args.config,
        data=args.data,
        eval_data=args.eval_data,
        budgets=args.budgets,
        steps=args.steps,
        lut=args.lut,
        resume=args.resume,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=_progress(args),
    )
    if result.evaluations:
        last = result.evaluations[-1]
        print(
            f"step {last['step']}: "
            + ", ".join(f"budget {b}: perplexity {v['perplexity']:.2f}" for b, v in last["budgets"].items())
        )
    latest = (result.out_dir / "latest").read_text().strip()
    print(f"wrote checkpoints to {result.out_dir} (latest: {latest})")


def cmd_lut(args: argparse.Namespace) -> None:
    table = api.lut(
        args.checkpoint,
        args.out,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        phase=args.phase,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=_progress(args),
    )
    print(f"{table.phase} latency on {table.device_name}, batch {table.batch_size} x {table.seq_len}:")
    print(
        f"  fixed {table.fixed_ms:.3f} ms; per layer MLP {[round(v, 3) for v in table.mlp_ms]} ms, "
        f"attention {[round(v, 3) for v in table.attention_ms]} ms; full model {table.full_ms():.2f} ms"
    )
    print(
        f"  a uniform per-token mix: MLP {table.mlp_mixed_ms:.3f} ms, attention {table.attention_mixed_ms:.3f} ms"
        " per layer (what a token router's layers are priced from)"
    )
    print(f"wrote {args.out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from flextron.evaluation import format_table

    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    results = api.evaluate(
        args.checkpoint,
        data=args.data,
        budgets=args.budgets,
        routing=args.routing,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        out=out,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=_progress(args),
    )
    print(format_table(results))
    print(
        f"perplexity of {results[0].tokens} held-out tokens in windows of {args.seq_len} "
        "(it depends on the window: compare runs at the same --seq-len)"
    )
    print(f"wrote {out / 'perplexity.json'} and {out / 'perplexity.png'}")


def cmd_export(args: argparse.Namespace) -> None:
    out = api.export(
        args.checkpoint,
        args.out,
        budget=args.budget,
        mlp_choice=_choice_arg(args.mlp_choice),
        attention_choice=_choice_arg(args.attention_choice),
        routing=args.routing,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(f"wrote a Hugging Face checkpoint to {out} (AutoModelForCausalLM.from_pretrained loads it)")


def cmd_generate(args: argparse.Namespace) -> None:
    result = api.generate(
        args.checkpoint,
        args.prompt,
        budget=args.budget,
        routing=args.routing,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    mlp, heads = result.widths
    print(f"[budget {args.budget:g}, {result.served.method}: MLP {mlp}, heads {heads}]", file=sys.stderr)
    print(result.text)


def cmd_bench(args: argparse.Namespace) -> None:
    from flextron.benchmarks import SUITES
    from flextron.benchmarks.suite import resolve_suites

    def notice(old: str, new: tuple[str, ...]) -> None:
        print(f"flextron bench: --suite {old} is deprecated, use --suite {','.join(new)}", file=sys.stderr)

    suites = resolve_suites(SUITES if args.suite == ["all"] else args.suite, notice)
    report = api.bench(
        suites,
        device=args.device,
        dtype=args.dtype,
        quick=args.quick,
        modes=args.modes,
        out=args.out,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print("wrote " + ", ".join(str(p) for p in [*report.results, *report.plots]))


def cmd_demo(args: argparse.Namespace) -> None:
    api.demo(
        args.out,
        quick=args.quick,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        progress=_progress(args),
    )


# ---------------------------------------------------------------------------------------
# Parser


def _api_default(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s parameter ``name``: every CLI default is read from the
    Python API, so the two cannot drift apart."""
    default = inspect.signature(function).parameters[name].default
    return list(default) if isinstance(default, tuple) else default


def _option(
    parser: argparse.ArgumentParser, function: Callable[..., Any], flag: str, help: str, **kwargs: Any
) -> None:
    """``--flag`` with the API's default for it, shown at the end of its help."""
    default = _api_default(function, flag.removeprefix("--").replace("-", "_"))
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    parser.add_argument(flag, default=default, help=f"{help} (default: {shown})", **kwargs)


def _config_default(config: type | None, name: str) -> str:
    """How help shows a ``None`` API default that defers to a config file's field."""
    if config is None:
        return ""
    default = {f.name: f.default for f in dataclasses.fields(config)}[name]
    return f"the config's, else {default}"


def _common(
    parser: argparse.ArgumentParser,
    function: Callable[..., Any],
    config: type | None = None,
    unset_device: str = "",
    dtype_help: str = "compute dtype",
) -> None:
    """The flags the commands share, with ``function``'s defaults: ``--device``, ``--dtype``,
    ``--seed`` where randomness is involved, ``--quiet`` where there are progress bars. A
    ``None`` default defers to ``config``'s field (train) or means ``unset_device`` (bench)."""
    parameters = inspect.signature(function).parameters
    device = _api_default(function, "device")
    shown = device or unset_device or _config_default(config, "device")
    parser.add_argument("--device", default=device, help=f"cpu, cuda or cuda:N (default: {shown})")
    dtype = _api_default(function, "dtype")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=dtype,
        help=f"{dtype_help}; auto = float32 on the CPU, bfloat16 on a GPU "
        f"(default: {dtype or _config_default(config, 'dtype')})",
    )
    if "seed" in parameters:
        seed = _api_default(function, "seed")
        shown = _config_default(config, "seed") if seed is None else seed
        parser.add_argument("--seed", type=_seed, default=seed, help=f"random seed (default: {shown})")
    if "progress" in parameters:
        parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what --out holds (refused by default: flextron never replaces what it did not create)",
    )


def _routing(parser: argparse.ArgumentParser, function: Callable[..., Any]) -> None:
    _option(
        parser,
        function,
        "--routing",
        "how a budget picks widths: the checkpoint's trained routers (router), its uniform "
        "sub-network table (uniform), or routers when it has them (auto)",
        choices=ROUTING_METHODS,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="flextron",
        description="Nested elastic LLMs (Flextron): one model, many budgets. "
        "Start with `flextron demo`; every command's --help lists its flags.",
    )
    parser.add_argument(
        "--version", action="version", version=f"flextron {flextron.__version__} (torch {torch.__version__})"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_train(sub)
    _add_lut(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_bench(sub)
    _add_demo(sub)
    return parser


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="a Hugging Face model -> an elastic checkpoint (importance-sorted)")
    p.add_argument("--model", help="local Hugging Face model directory (default: the embedded SmolLM2-135M)")
    p.add_argument(
        "--calib", help="calibration text: a .txt file or a directory of them (default: Shakespeare)"
    )
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--mlp-widths", type=_int_list, help="MLP width choices, e.g. 1536,1152,768,384")
    p.add_argument("--head-counts", type=_int_list, help="query-head counts, e.g. 9,6,3")
    p.add_argument("--head-widths", type=_int_list, help=argparse.SUPPRESS)  # deprecated: --head-counts
    _option(p, api.convert, "--seq-len", "tokens per calibration window", type=_positive_int)
    _option(p, api.convert, "--calib-tokens", "calibration tokens", type=_positive_int)
    _option(p, api.convert, "--batch-size", "windows per batch", type=_positive_int)
    _overwrite(p)
    _common(p, api.convert)
    p.set_defaults(run=cmd_convert)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from flextron.training import TrainConfig

    p = sub.add_parser("train", help="elastic training, router training, or both jointly")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint to start from")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, latency.json)")
    p.add_argument(
        "--stage",
        choices=("elastic", "routers", "joint"),
        help=f"default: {_config_default(TrainConfig, 'stage')}",
    )
    p.add_argument("--config", help="a TOML or YAML file of training settings (flextron.TrainConfig fields)")
    p.add_argument("--data", help="training text: a .txt file or a directory (default: Shakespeare)")
    p.add_argument("--eval-data", help="held-out text (default: held-out Shakespeare)")
    p.add_argument("--budgets", type=_float_list, help="trained budgets (latency fractions), e.g. 1,0.75,0.5")
    p.add_argument(
        "--steps",
        type=_positive_int,
        help=f"optimizer steps (default: {_config_default(TrainConfig, 'steps')})",
    )
    p.add_argument("--lut", help="a latency table from `flextron lut` (default: measured at the start)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    _overwrite(p)
    _common(p, api.train, config=TrainConfig)
    p.set_defaults(run=cmd_train)


def _add_lut(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lut", help="measure the latency lookup table on this device")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint")
    p.add_argument("--out", required=True, help="JSON file to write")
    _option(p, api.lut, "--batch-size", "sequences per forward", type=_positive_int)
    _option(p, api.lut, "--seq-len", "prefill: tokens; decode: cached tokens", type=_positive_int)
    _option(p, api.lut, "--phase", "what is timed", choices=("prefill", "decode"))
    _overwrite(p)
    _common(p, api.lut)
    p.set_defaults(run=cmd_lut)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity per budget (table, JSON, plot)")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint")
    p.add_argument("--data", help="a .txt file or a directory of them (default: held-out Shakespeare)")
    _option(p, api.evaluate, "--budgets", "latency fractions to evaluate", type=_float_list)
    _routing(p, api.evaluate)
    _option(p, api.evaluate, "--seq-len", "tokens per window", type=_positive_int)
    _option(p, api.evaluate, "--max-tokens", "evaluated tokens", type=_positive_int)
    _option(p, api.evaluate, "--batch-size", "windows per batch", type=_positive_int)
    p.add_argument("--out", help="where perplexity.json/.png go (default: CHECKPOINT/eval)")
    _overwrite(p)
    _common(p, api.evaluate)
    p.set_defaults(run=cmd_eval)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a static sub-network -> a plain Hugging Face checkpoint")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--budget", type=float, help="the budget whose sub-network to export, in (0, 1]")
    _routing(p, api.export)
    p.add_argument("--mlp-choice", type=_int_list, help="MLP choice index (one, or one per layer)")
    p.add_argument("--attention-choice", type=_int_list, help="head choice index (one, or one per layer)")
    _overwrite(p)
    _common(p, api.export, dtype_help="dtype of the written weights")
    p.set_defaults(run=cmd_export)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt at a budget")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint")
    p.add_argument("--prompt", required=True, help="the text to continue")
    _option(p, api.generate, "--budget", "latency fraction; 1 = full width", type=float)
    _routing(p, api.generate)
    _option(p, api.generate, "--max-new-tokens", "tokens to generate", type=_positive_int)
    _option(p, api.generate, "--temperature", "0 = greedy", type=_non_negative_float)
    p.add_argument("--top-k", type=_positive_int, help="sample from the k most likely tokens")
    _common(p, api.generate)
    p.set_defaults(run=cmd_generate)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="kernel, layer and model benchmarks on this device (ratios vs baselines)"
    )
    from flextron.benchmarks import DEPRECATED_SUITES, SUITES

    p.add_argument(
        "--suite",
        type=_choice_list(("all", *SUITES), deprecated=tuple(DEPRECATED_SUITES)),
        default=["all"],
        help=f"comma-separated: {', '.join(SUITES)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a smoke run)")
    _option(
        p,
        api.bench,
        "--modes",
        "comma-separated: forward (inference), backward, full (a training step)",
        type=_choice_list(("forward", "backward", "full")),
    )
    p.add_argument("--out", help="where the JSON and plots go (default: runs/bench-<date>-<device>)")
    _overwrite(p)
    _common(p, api.bench, unset_device="cuda when there is a GPU, else cpu")
    p.set_defaults(run=cmd_bench)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole method on the embedded SmolLM2-135M, in one command")
    _option(p, api.demo, "--out", "run directory; rerun to resume")
    p.add_argument("--quick", action="store_true", help="a smoke run with tiny step counts")
    _common(p, api.demo)
    p.set_defaults(run=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    # flextron reads local files only (every from_pretrained says local_files_only=True); in
    # our own process, make sure nothing else transformers does reaches for the hub either.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    torch.manual_seed(getattr(args, "seed", None) or 0)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        # User errors (flextron's own error types derive from these) name what was expected
        # and what was given: one line, no traceback.
        print(f"flextron {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flextron {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            f"flextron {args.command}: internal error (a bug in flextron, not in your input): "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
