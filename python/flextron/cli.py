"""The ``flextron`` command line: demo, convert, export, generate, eval, train, lut.

User errors (missing files, bad values, unsupported models) print one line and exit with
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from flextron import data

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_BUDGETS = "1.0,0.75,0.5"


class UsageError(ValueError):
    """A bad command-line value."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for, but no CUDA GPU is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UsageError(f"--device must be cpu or cuda[:N], got {name!r}")
    return name


def _dtype(name: str) -> torch.dtype:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise UsageError(f"--dtype must be one of {sorted(choices)}, got {name!r}")
    return choices[name]


def _texts(path: str | None, default_split: str) -> list[data.Text]:
    return data.read_texts(path) if path else data.shakespeare(default_split)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(checkpoint: str, device: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoTokenizer

    from flextron.checkpoint import load_elastic

    model, record = load_elastic(checkpoint, device=device, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    return model, record, tokenizer


# ---------------------------------------------------------------------------------------
# Commands


def cmd_convert(args: argparse.Namespace) -> None:
    from flextron.convert import ConvertOptions, convert

    model_dir = Path(args.model) if args.model else data.embedded_model_dir()
    options = ConvertOptions(
        mlp_widths=args.mlp_widths,
        head_choices=args.head_widths,
        seq_len=args.seq_len,
        max_tokens=args.calib_tokens,
        batch_size=args.batch_size,
        device=_device(args.device),
        progress=not args.quiet,
    )
    out = convert(model_dir, _texts(args.calib, "train"), args.out, options)
    print(f"wrote the elastic checkpoint {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from flextron.convert import export_hf, stored_losses
    from flextron.model import choices_for_budget

    model, record, tokenizer = _load(args.checkpoint, "cpu")
    if args.budget is not None:
        choice = choices_for_budget(model.config, args.budget, stored_losses(record))
        mlp, attention = choice.mlp, choice.attention
    elif args.mlp_choice is not None and args.attention_choice is not None:
        mlp, attention = _choice_list(args.mlp_choice), _choice_list(args.attention_choice)
    else:
        raise UsageError("give --budget, or both --mlp-choice and --attention-choice")
    out = export_hf(model, record["source"]["config"], args.out, mlp, attention, tokenizer)
    print(f"wrote a Hugging Face checkpoint to {out} (AutoModelForCausalLM.from_pretrained loads it)")


def _choice_list(values: list[int]) -> int | list[int]:
    return values[0] if len(values) == 1 else values


def cmd_generate(args: argparse.Namespace) -> None:
    from flextron.convert import stored_losses
    from flextron.model import Routing, choices_for_budget

    device = _device(args.device)
    model, record, tokenizer = _load(args.checkpoint, device, _dtype(args.dtype))
    choice = choices_for_budget(model.config, args.budget, stored_losses(record))
    routing = Routing.uniform(model.config.num_layers, choice.mlp, choice.attention)
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = model.generate(
        ids,
        args.max_new_tokens,
        routing,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_token_id=model.config.eos_token_id,
        generator=generator,
    )
    config = model.config
    print(
        f"[budget {args.budget:g}: MLP {config.mlp_widths[choice.mlp]}/{config.mlp_widths[0]}, "
        f"heads {config.head_choices[choice.attention]}/{config.num_heads}]",
        file=sys.stderr,
    )
    print(tokenizer.decode(tokens[0], skip_special_tokens=True))


def cmd_eval(args: argparse.Namespace) -> None:
    from flextron.convert import stored_losses
    from flextron.evaluate import evaluate_budgets, format_table, write_results

    device = _device(args.device)
    model, record, tokenizer = _load(args.checkpoint, device, _dtype(args.dtype))
    if not args.budgets:
        raise UsageError("--budgets needs at least one budget")
    results = evaluate_budgets(
        model,
        tokenizer,
        _texts(args.data, "eval"),
        args.budgets,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        progress=not args.quiet,
        losses=stored_losses(record),
    )
    print(format_table(results))
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    source = record.get("source", {}).get("path", args.checkpoint)
    json_path, png_path = write_results(results, out, f"perplexity per budget: {Path(source).name}")
    print(f"wrote {json_path} and {png_path}")


def cmd_train(args: argparse.Namespace) -> None:
    from flextron.train import TrainConfig, train

    overrides = {
        "stage": args.stage,
        "steps": args.steps,
        "budgets": tuple(args.budgets) if args.budgets else None,
        "device": _device(args.device) if args.device else None,
        "seed": args.seed,
        "lut": args.lut,
    }
    if args.config:
        config = TrainConfig.from_file(args.config, **overrides)
    else:
        config = TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    result = train(
        config,
        args.checkpoint,
        _texts(args.data, "train"),
        args.out,
        eval_texts=_texts(args.eval_data, "eval"),
        resume=args.resume,
        progress=not args.quiet,
    )
    if result.evaluations:
        last = result.evaluations[-1]
        print(
            f"step {last['step']}: "
            + ", ".join(f"budget {b}: perplexity {v['perplexity']:.2f}" for b, v in last["budgets"].items())
        )
    print(
        f"wrote checkpoints to {result.out_dir} (latest: {(result.out_dir / 'latest').read_text().strip()})"
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from flextron.demo import DemoOptions, run

    options = DemoOptions(
        out=Path(args.out), device=_device(args.device), seed=args.seed, progress=not args.quiet
    )
    if args.quick:  # a smoke run: every stage, minutes less
        options = DemoOptions(
            out=options.out, device=options.device, seed=options.seed, progress=options.progress,
            calib_tokens=1024, elastic_steps=2, router_steps=4, batch_size=2, seq_len=64, eval_tokens=512,
            new_tokens=8,
        )  # fmt: skip
    run(options)


def cmd_lut(args: argparse.Namespace) -> None:
    from flextron.latency import measure

    device = _device(args.device)
    model, _, _ = _load(args.checkpoint, device, _dtype(args.dtype))
    table = measure(model, args.batch_size, args.seq_len, args.phase, progress=not args.quiet)
    path = table.save(args.out)
    print(f"{table.phase} latency on {table.device_name}, batch {table.batch_size} x {table.seq_len}:")
    print(
        f"  fixed {table.fixed_ms:.3f} ms; per layer MLP {[round(v, 3) for v in table.mlp_ms]} ms, "
        f"attention {[round(v, 3) for v in table.attention_ms]} ms; full model {table.full_ms():.2f} ms"
    )
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flextron", description="Nested elastic LLMs: demo, convert, export, generate, eval, train, lut."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="a Hugging Face model -> an elastic checkpoint (importance-sorted)")
    p.add_argument("--model", help="local Hugging Face model directory (default: the embedded SmolLM2-135M)")
    p.add_argument(
        "--calib", help="calibration text: a .txt file or a directory of them (default: Shakespeare)"
    )
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--mlp-widths", type=_int_list, help="MLP width choices, e.g. 1536,1152,768,384")
    p.add_argument("--head-widths", type=_int_list, help="query-head choices, e.g. 9,6,3")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default: 16384)")
    p.add_argument("--batch-size", type=int, default=8)
    _common(p)
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("export", help="a static sub-network -> a plain Hugging Face checkpoint")
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint directory")
    p.add_argument("--budget", type=float, help="fraction of the layer weights to keep, in (0, 1]")
    p.add_argument("--mlp-choice", type=_int_list, help="MLP choice index (one, or one per layer)")
    p.add_argument("--attention-choice", type=_int_list, help="head choice index (one, or one per layer)")
    p.add_argument("--out", required=True, help="output directory")
    _common(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("generate", help="continue a prompt at a budget")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--budget", type=float, default=1.0)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    _common(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("eval", help="perplexity per budget (table, JSON, plot)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="a .txt file or a directory of them (default: held-out Shakespeare)")
    p.add_argument("--budgets", type=_float_list, default=_float_list(DEFAULT_BUDGETS))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="where perplexity.json/.png go (default: CHECKPOINT/eval)")
    _common(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("train", help="elastic training, router training, or both jointly")
    p.add_argument(
        "--stage", choices=("elastic", "routers", "joint"), help="default: the config's, else elastic"
    )
    p.add_argument("--checkpoint", required=True, help="elastic checkpoint to start from")
    p.add_argument("--data", help="training text: a .txt file or a directory (default: Shakespeare)")
    p.add_argument("--eval-data", help="held-out text (default: held-out Shakespeare)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, log.jsonl, latency.json)")
    p.add_argument("--config", help="a TOML or YAML file of training settings (flextron.train.TrainConfig)")
    p.add_argument("--budgets", type=_float_list, help="trained budgets (latency fractions), e.g. 1,0.75,0.5")
    p.add_argument("--steps", type=int)
    p.add_argument("--lut", help="a latency table from `flextron lut` (default: measured at the start)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the config's, else cpu)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("demo", help="the whole method on the embedded SmolLM2-135M, in one command")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo); rerun to resume")
    p.add_argument("--quick", action="store_true", help="a smoke run with tiny step counts")
    _common(p)
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("lut", help="measure the latency lookup table on this device")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256, help="prefill: tokens; decode: cached tokens")
    p.add_argument("--phase", choices=("prefill", "decode"), default="prefill")
    p.add_argument("--dtype", default="float32")
    _common(p)
    p.set_defaults(run=cmd_lut)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from flextron.checkpoint import CheckpointError
    from flextron.convert import UnsupportedModelError

    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed if args.seed is not None else 0)
    try:
        args.run(args)
    except (
        UsageError,
        CheckpointError,
        UnsupportedModelError,
        data.MissingDataError,
        ValueError,
        OSError,
    ) as e:
        # Validation errors name what was expected and what was given: one line, no traceback.
        print(f"flextron {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
