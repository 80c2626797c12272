"""The flextron CLI end to end on a tiny random Llama that uses the embedded model's tokenizer:
convert -> eval -> export -> generate, checking the files and numbers it writes; and every user
error gives a one-line message and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import flextron
from flextron import cli
from tests.conftest import require_module

transformers = require_module("transformers")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_eval_export_generate(tiny_model_dir, text_file, tmp_path, capsys):
    checkpoint = tmp_path / "elastic"
    code, out, err = run(
        capsys, "convert", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(checkpoint),
        "--mlp-widths", "128,64", "--head-counts", "4,2", "--seq-len", "64", "--calib-tokens", "512", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((checkpoint / "flextron.json").read_text())
    assert record["config"]["mlp_widths"] == [128, 64] and record["config"]["head_counts"] == [4, 2]
    assert record["calibration"] == {"texts": ["sonnets"], "tokens": 512, "seq_len": 64}
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer.json").is_file()

    code, out, err = run(
        capsys, "eval", "--checkpoint", str(checkpoint), "--data", str(text_file), "--budgets", "1,0.6",
        "--seq-len", "64", "--max-tokens", "256", "--out", str(tmp_path / "eval"), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads((tmp_path / "eval" / "perplexity.json").read_text())
    assert [r["budget"] for r in rows] == [1.0, 0.6]
    # Each budget runs the sub-network with the lowest calibration loss among those that fit
    # (on this random model that need not be the widest).
    losses = {(e["mlp"], e["attention"]): e["loss"] for e in record["uniform_losses"]}
    widths = {(m, a): (w, h) for m, w in enumerate([128, 64]) for a, h in enumerate([4, 2])}
    for row in rows:
        assert row["active_fraction"] <= row["budget"] + 1e-9
        assert row["tokens"] == 4 * 63
    layers = record["config"]["num_layers"]
    best_overall = min(losses, key=losses.get)
    width, heads = widths[best_overall]
    assert (rows[0]["mlp_widths"], rows[0]["heads"]) == (f"{width}x{layers}", f"{heads}x{layers}")
    assert all(r["routing"] == "uniform" for r in rows)  # a converted checkpoint has no routers
    assert all(r["perplexity"] > 1 for r in rows)
    assert f"{rows[0]['perplexity']:.2f}" in out  # the printed table holds the same numbers
    assert "perplexity of 252 held-out tokens in windows of 64" in out  # the window is said
    assert (tmp_path / "eval" / "perplexity.png").stat().st_size > 0

    code, out, err = run(
        capsys, "export", "--checkpoint", str(checkpoint), "--budget", "0.6", "--out", str(tmp_path / "hf")
    )
    assert code == 0, err
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    exported_sizes = (exported.config.intermediate_size, exported.config.num_attention_heads)
    assert (rows[1]["mlp_widths"], rows[1]["heads"]) == tuple(f"{v}x{layers}" for v in exported_sizes)

    code, out, err = run(
        capsys, "generate", "--checkpoint", str(checkpoint), "--budget", "0.6", "--prompt", "Shall I compare",
        "--max-new-tokens", "5",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("Shall I compare")
    assert "heads" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--checkpoint", "/nonexistent"], "checkpoint directory /nonexistent does not exist"),
        (["convert", "--model", "/nonexistent", "--out", "/tmp/x"], "is not a Hugging Face model directory"),
        (
            ["generate", "--checkpoint", "/tmp", "--prompt", "hi", "--device", "tpu"],
            "device must be cpu or cuda[:N], got 'tpu'",
        ),
        (["eval", "--checkpoint", "/tmp", "--data", "/nonexistent.txt"], "/tmp is not a flextron checkpoint"),
        (["eval", "--checkpoint", "/tmp", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["train", "--checkpoint", "/tmp"], "the following arguments are required: --out"),
        (["bench", "--suite", "speed"], "argument --suite: expected names from all, nested_linear"),
        (
            ["lut", "--checkpoint", "/tmp", "--out", "t.json", "--device", "cuda:x"],
            "device must be cpu or cuda[:N]",
        ),
        (
            ["generate", "--checkpoint", "/tmp", "--prompt", "x", "--budget", "1.5"],
            "/tmp is not a flextron checkpoint",
        ),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line(capsys, argv, message):
    try:
        code, _out, err = run(capsys, *argv)
    except SystemExit as exit_:  # argparse's usage errors exit from the parser
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_budget_errors(tiny_model_dir, text_file, tmp_path, capsys):
    checkpoint = tmp_path / "elastic"
    assert run(capsys, "convert", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(checkpoint),
               "--seq-len", "64", "--calib-tokens", "256", "--quiet")[0] == 0  # fmt: skip
    code, _, err = run(
        capsys, "generate", "--checkpoint", str(checkpoint), "--budget", "0.01", "--prompt", "x"
    )
    assert code == 2 and "below the smallest sub-network" in err
    code, _, err = run(
        capsys, "generate", "--checkpoint", str(checkpoint), "--budget", "1.5", "--prompt", "x"
    )
    assert code == 2 and "budget must be in (0, 1], got 1.5" in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "eval", "--checkpoint", str(checkpoint), "--device", "cuda")
        assert code == 2 and "device cuda was asked for, but no CUDA GPU is available" in err
    code, _, err = run(capsys, "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x"))
    assert code == 2 and "give --budget, or both --mlp-choice and --attention-choice" in err


def test_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "flextron.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in cli.COMMANDS:
        assert command in result.stdout
    assert set(cli.COMMANDS) == set(cli.build_parser()._subparsers._group_actions[0].choices)
    bad = subprocess.run(
        [sys.executable, "-m", "flextron.cli", "eval", "--budgets", "a,b"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "expected comma-separated numbers" in bad.stderr


def test_the_old_head_widths_flag_still_works_with_a_notice(tiny_model_dir, text_file, tmp_path, capsys):
    argv = ["convert", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(tmp_path / "e"),
            "--head-widths", "4,2", "--seq-len", "64", "--calib-tokens", "256", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "--head-widths is deprecated, use --head-counts" in capsys.readouterr().err
    record = json.loads((tmp_path / "e" / "flextron.json").read_text())
    assert record["config"]["head_counts"] == [4, 2]
    assert cli.main([*argv[:6], str(tmp_path / "f"), "--head-widths", "4,2", "--head-counts", "4,2"]) == 2
    with pytest.warns(FutureWarning, match="head_widths is deprecated"):
        flextron.convert(tmp_path / "g", tiny_model_dir, text_file, head_widths=[4, 2], seq_len=64,
                         calib_tokens=256, progress=False)  # fmt: skip


def test_checkpoints_written_before_the_head_counts_rename_load():
    from flextron.model import ElasticConfig

    new = ElasticConfig(architecture="llama", vocab_size=32, hidden_size=16, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=4, intermediate_size=32, mlp_widths=(32, 16), head_counts=(4, 2))  # fmt: skip
    old = {k if k != "head_counts" else "head_choices": v for k, v in new.to_dict().items()}
    assert ElasticConfig.from_dict(old) == new
