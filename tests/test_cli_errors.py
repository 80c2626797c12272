"""Every bad input of issue 13, run through the CLI: exit status 2, one line on stderr, no
traceback, and the line says what is wrong. The behaviour behind each (nothing destroyed,
values checked) has its own test in test_outputs.py; this file checks what the user sees."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flextron import api, cli, data
from flextron.checkpoint import latest_checkpoint, load_elastic
from flextron.outputs import DirectoryLock

SMALL_RUN = "batch_size = 2\nseq_len = 32\ntrain_tokens = 3000\neval_tokens = 64\nwarmup_steps = 1\n"


@dataclass(frozen=True)
class Workspace:
    hf_model: Path  # a tiny Hugging Face Llama
    elastic: Path  # its elastic checkpoint
    run: Path  # a training run with checkpoint-000001
    config: Path  # the TOML the run was started with
    text: Path  # a small text file

    def copy(self, what: Path, tmp: Path) -> Path:
        target = tmp / what.name
        shutil.copytree(what, target)
        return target


@pytest.fixture(scope="module")
def work(tiny_model_dir, tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("cli-errors")
    text = root / "text.txt"
    text.write_text(data.shakespeare("train")[0].content[:20000])
    elastic = root / "elastic"
    common = ["--quiet", "--seed", "0"]
    argv = ["convert", "--model", str(tiny_model_dir), "--out", str(elastic), "--calib", str(text)]
    assert (
        cli.main([*argv, "--seq-len", "32", "--calib-tokens", "256", "--head-counts", "4,2", "--quiet"]) == 0
    )
    config = root / "small.toml"
    config.write_text(SMALL_RUN + "save_every = 1\n")
    run = root / "run"
    argv = ["train", "--checkpoint", str(elastic), "--out", str(run), "--config", str(config)]
    assert cli.main([*argv, "--data", str(text), "--eval-data", str(text), "--steps", "1", *common]) == 0
    return Workspace(tiny_model_dir, elastic, run, config, text)


def train_argv(
    work: Workspace,
    out: Path,
    *extra: str,
    config: Path | None = None,
    data: Path | str | None = None,
    eval_data: Path | None = None,
) -> list[str]:
    return ["train", "--checkpoint", str(work.elastic), "--out", str(out), "--config", str(config or work.config),
            "--data", str(data or work.text), "--eval-data", str(eval_data or work.text), "--quiet", *extra]  # fmt: skip


def bad_config(line: str) -> Case:
    """A TOML config with one bad line; the error names its field."""
    return lambda w, t: (train_argv(w, t / "o", config=toml(t, line)), line.split(" =")[0])


def toml(tmp: Path, line: str) -> Path:
    """The run's small config with ``line`` added (replacing the line of the same field)."""
    field = line.split(" =")[0]
    kept = [kept for kept in SMALL_RUN.splitlines() if kept.split(" =")[0] != field]
    path = tmp / "bad.toml"
    path.write_text("\n".join([*kept, line]) + "\n")
    return path


def damaged_run(work: Workspace, tmp: Path, damage: Callable[[Path], None]) -> Path:
    run = work.copy(work.run, tmp)
    damage(run / "checkpoint-000001")
    return run


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def retype_weight(checkpoint: Path, dtype) -> None:
    tensors = load_file(checkpoint / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(getattr(torch, dtype))
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "flextron-elastic"})


def narrow_optimizer_tensor(checkpoint: Path) -> None:
    tensors = load_file(checkpoint / "optimizer.safetensors")
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, checkpoint / "optimizer.safetensors")


def with_routers(work: Workspace, tmp: Path, routers: dict, weights: bytes = b"") -> Path:
    checkpoint = work.copy(work.elastic, tmp)
    edit_json(checkpoint / "flextron.json", lambda r: r.update(routers=routers))
    (checkpoint / "routers.safetensors").write_bytes(weights)
    return checkpoint


def resume(work: Workspace, run: Path, config: Path | None = None) -> list[str]:
    return train_argv(work, run, "--resume", "--steps", "2", config=config)


def eval_argv(checkpoint: Path, *extra: str) -> list[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--budgets", "1", "--seq-len", "32",
            "--max-tokens", "64", "--quiet", *extra]  # fmt: skip


def export_argv(work: Workspace, out: Path, *extra: str) -> list[str]:
    return ["export", "--checkpoint", str(work.elastic), "--out", str(out), *extra]


def convert_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--model", str(model), "--out", str(out), "--seq-len", "32",
            "--calib-tokens", "256", "--quiet", *extra]  # fmt: skip


def hf_copy_with(work: Workspace, tmp: Path, change: Callable[[Path], None]) -> Path:
    model = work.copy(work.hf_model, tmp)
    change(model)
    return model


def remove_tokenizer(model: Path) -> None:
    for path in model.glob("tokenizer*"):
        path.unlink()


Case = Callable[[Workspace, Path], tuple[list[str], str]]
CASES: dict[str, Case] = {
    # Data loss, now refused
    "new run into another run's directory": lambda w, t: (
        train_argv(w, w.copy(w.run, t), "--steps", "1"), "holds another run's checkpoints"),
    "train from a checkpoint of --out": lambda w, t: (
        ["train", "--checkpoint", str(w.copy(w.run, t) / "checkpoint-000001"), "--out", str(t / "run"),
         "--overwrite", "--quiet"], "overlaps the source"),
    "export over an elastic checkpoint": lambda w, t: (
        export_argv(w, w.copy(w.elastic, t), "--budget", "1"), "already exists and is not empty"),
    "export over its own source": lambda w, t: (
        export_argv(w, w.elastic, "--overwrite"), "overlaps the source"),
    "convert over its source": lambda w, t: (
        convert_argv(w.hf_model, w.hf_model, "--overwrite"), "overlaps the source"),
    "convert over a checkpoint": lambda w, t: (
        convert_argv(w.hf_model, w.copy(w.elastic, t)), "already exists and is not empty"),
    # Silent wrong behaviour, now refused
    **{f"config {line}": bad_config(line)
       for line in ["clip_norm = -1", "clip_norm = 0", "lr = nan", "lr = inf", "min_lr_ratio = -0.5",
                    "weight_decay = -1.0", "latency_weight = -1.0", "router_hidden = 0",
                    "surrogate_threshold = -0.1", "router_prior = nan", "temperature_start = inf",
                    "save_every = true", "warmup_steps = 1.5", 'steps = "abc"', "steps = 1.5",
                    "batch_size = 2.5", "grad_accum = 2.5", 'lr = "1e-3"', "budgets = 0.5"]},
    "resume with other settings": lambda w, t: (
        resume(w, w.copy(w.run, t), config=toml(t, "save_every = 1\nlr = 0.5")),
        "started with other settings (lr:"),
    "resume on other text": lambda w, t: (
        train_argv(w, w.copy(w.run, t), "--resume", "--steps", "2", data=w.elastic / "tokenizer.json"),
        "started on other training text (--data)"),
    "export --mlp-choice -1": lambda w, t: (
        export_argv(w, t / "o", "--mlp-choice", "-1", "--attention-choice", "0"), "--mlp-choice"),
    "export --attention-choice -2": lambda w, t: (
        export_argv(w, t / "o", "--mlp-choice", "0", "--attention-choice", "-2"), "--attention-choice"),
    "export --mlp-choice 9": lambda w, t: (
        export_argv(w, t / "o", "--mlp-choice", "9", "--attention-choice", "0"), "--mlp-choice"),
    "widths beyond 32 bits": lambda w, t: (
        convert_argv(w.hf_model, t / "o", "--mlp-widths", f"{2**32 + 8},64"), "mlp_widths must"),
    "binary --data": lambda w, t: (
        train_argv(w, t / "o", data=w.elastic / "model.safetensors"), "not a UTF-8 text file"),
    "binary --eval-data": lambda w, t: (
        train_argv(w, t / "o", eval_data=w.elastic / "model.safetensors"), "not a UTF-8 text file"),
    "binary --calib": lambda w, t: (
        convert_argv(w.hf_model, t / "o", "--calib", str(w.elastic / "model.safetensors")),
        "not a UTF-8 text file"),
    "latest outside the run": lambda w, t: (
        resume(w, damaged_run(w, t, lambda c: (c.parent / "latest").write_text("../../other/checkpoint-000030"))),
        "must name a checkpoint-NNNNNN inside"),
    # Tracebacks, now one line
    "eval --seq-len 0": lambda w, t: (eval_argv(w.elastic, "--seq-len", "0"), "--seq-len"),
    "eval --seq-len -5": lambda w, t: (eval_argv(w.elastic, "--seq-len", "-5"), "--seq-len"),
    "eval --batch-size 0": lambda w, t: (eval_argv(w.elastic, "--batch-size", "0"), "--batch-size"),
    "eval --batch-size -1": lambda w, t: (eval_argv(w.elastic, "--batch-size", "-1"), "--batch-size"),
    "generate --temperature nan": lambda w, t: (
        ["generate", "--checkpoint", str(w.elastic), "--prompt", "x", "--temperature", "nan"], "--temperature"),
    "generate --seed 2**70": lambda w, t: (
        ["generate", "--checkpoint", str(w.elastic), "--prompt", "x", "--seed", str(2**70)], "--seed"),
    "truncated optimizer.safetensors": lambda w, t: (
        resume(w, damaged_run(w, t, lambda c: truncate(c / "optimizer.safetensors"))),
        "optimizer.safetensors is corrupt or unreadable"),
    "trainer.json missing keys": lambda w, t: (
        resume(w, damaged_run(w, t, lambda c: (c / "trainer.json").write_text('{"step": 1}'))),
        "trainer.json is incomplete: it has no 'optimizer'"),
    "trainer.json step as text": lambda w, t: (
        resume(w, damaged_run(w, t, lambda c: edit_json(c / "trainer.json", lambda r: r.update(step="1")))),
        "step must be an integer"),
    "optimizer tensor of the wrong shape": lambda w, t: (
        resume(w, damaged_run(w, t, narrow_optimizer_tensor)), "does not fit this run"),
    "truncated routers.safetensors": lambda w, t: (
        eval_argv(with_routers(w, t, {"kind": "static", "budgets": [0.5, 1.0], "hidden": 8}, b"\0" * 100)),
        "routers.safetensors is corrupt or unreadable"),
    "routers.hidden = -1": lambda w, t: (
        eval_argv(with_routers(w, t, {"kind": "static", "budgets": [0.5, 1.0], "hidden": -1})),
        "positive integer hidden size"),
    "unknown uniform_losses key": lambda w, t: (
        eval_argv(damaged_run(w, t, lambda c: edit_json(
            c / "flextron.json", lambda r: r["uniform_losses"][0].update(bogus=1))) / "checkpoint-000001"),
        "uniform_losses[0] must have the keys"),
    "int64 model tensor": lambda w, t: (
        eval_argv(damaged_run(w, t, lambda c: retype_weight(c, "int64")) / "checkpoint-000001"),
        "torch.int64"),
    "fp16 model tensor": lambda w, t: (
        eval_argv(damaged_run(w, t, lambda c: retype_weight(c, "float16")) / "checkpoint-000001"),
        "torch.float16"),
    # Unhelpful one-liners, now naming the flag or file
    "empty --data": lambda w, t: (
        train_argv(w, t / "o", data=empty_file(t)), "holds no text"),
    "--data /dev/null": lambda w, t: (
        train_argv(w, t / "o", data="/dev/null"), "/dev/null is neither a text file"),
    "--data too short for --seq-len": lambda w, t: (
        train_argv(w, t / "o", data=short_file(t)), "the --data text has"),
    "corrupt tokenizer.json": lambda w, t: (
        convert_argv(hf_copy_with(w, t, lambda m: truncate(m / "tokenizer.json")), t / "o"),
        "tokenizer.json is corrupt or unreadable"),
    "no tokenizer": lambda w, t: (
        convert_argv(hf_copy_with(w, t, remove_tokenizer), t / "o"), "holds no tokenizer flextron can load"),
    "a run held by another process": lambda w, t: (
        train_argv(w, held(t / "held"), "--steps", "1"), "being written by another process (PID"),
    # Rough edges a new user hit
    "generate an empty prompt": lambda w, t: (
        ["generate", "--checkpoint", str(w.elastic), "--prompt", ""], "the prompt is empty"),
    "a file as --checkpoint": lambda w, t: (
        ["eval", "--checkpoint", str(w.text)], "is a file, not a checkpoint directory"),
    "an empty entry in --budgets": lambda w, t: (
        ["eval", "--checkpoint", str(w.elastic), "--budgets", "1,,0.5"], "an empty entry in '1,,0.5'"),
}  # fmt: skip


def empty_file(tmp: Path) -> Path:
    (tmp / "empty.txt").write_text("")
    return tmp / "empty.txt"


def short_file(tmp: Path) -> Path:
    (tmp / "short.txt").write_text("Too short.")
    return tmp / "short.txt"


LOCKS: list[DirectoryLock] = []


def held(out: Path) -> Path:
    """``out`` locked by this test (flock locks of two open files conflict within one process)."""
    lock = DirectoryLock(out / ".lock", "test")
    LOCKS.append(lock.__enter__())
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_line_and_exit_2(work, tmp_path, capsys, name, monkeypatch):
    argv, expected = CASES[name](work, tmp_path)
    # Refusals come before the expensive work: loading a model's weights would be a failure here.
    monkeypatch.setattr("flextron.conversion.load_hf_model", _no_weights_loaded)
    try:
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse-level refusals
            code = e.code
    finally:
        while LOCKS:
            LOCKS.pop().__exit__(None, None, None)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert expected in err, err


def _no_weights_loaded(*args, **kwargs):
    raise AssertionError("the bad input was found only after loading the model's weights")


LIMITED_WRITES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from flextron import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["convert", "train"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_output(work, tmp_path, command):
    """A full disk, simulated by a 1 MiB file-size limit (RLIMIT_FSIZE): a write past it fails
    in the kernel like one on a full disk (EFBIG instead of ENOSPC), on the same code paths
    (Python's writes and safetensors' own). The model file is larger than the limit."""
    if command == "convert":
        out = tmp_path / "elastic"
        argv = convert_argv(work.hf_model, out, "--calib", str(work.text), "--head-counts", "4,2")
    else:
        out = work.copy(work.run, tmp_path)
        argv = resume(work, out)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITES, *argv], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and "File too large" in result.stderr, result.stderr
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, (before, after)  # no partial output, temporary file or lock left
    if command == "train":
        assert "checkpoint-000002 was not saved (the run's earlier checkpoints are intact)" in result.stderr
        assert latest_checkpoint(out).name == "checkpoint-000001"
        load_elastic(latest_checkpoint(out))


@pytest.mark.parametrize(
    ("raised", "code", "expected"),
    [
        (KeyboardInterrupt(), 130, "flextron eval: interrupted\n"),
        (RuntimeError("an unexpected state"), 1, "internal error (a bug in flextron, not in your input)"),
    ],
)
def test_ctrl_c_is_one_line_and_a_bug_asks_to_be_reported(monkeypatch, capsys, raised, code, expected):
    @functools.wraps(api.evaluate)  # the parser reads its defaults from the API's signature
    def evaluate(*args, **kwargs):
        raise raised

    monkeypatch.setattr("flextron.api.evaluate", evaluate)
    assert cli.main(["eval", "--checkpoint", "x"]) == code
    err = capsys.readouterr().err
    assert expected in err
    if code == 130:
        assert err == expected
    else:  # a bug keeps its traceback, for the report
        assert "Traceback" in err and "RuntimeError: an unexpected state" in err


def test_lut_eval_and_bench_refuse_to_replace_results(work, tmp_path, capsys):
    (tmp_path / "table.json").write_text("mine")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "perplexity.png").write_text("mine")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "notes.txt").write_text("mine")
    for argv in (
        ["lut", "--checkpoint", str(work.elastic), "--out", str(tmp_path / "table.json"), "--quiet"],
        eval_argv(work.elastic, "--out", str(tmp_path / "eval")),
        ["bench", "--suite", "nested_linear", "--quick", "--device", "cpu", "--out", str(tmp_path / "bench")],
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "already exists" in err and "pass --overwrite" in err, err
    assert [p.read_text() for p in sorted(tmp_path.rglob("*.*"))] == ["mine"] * 3
    argv = eval_argv(work.elastic, "--out", str(tmp_path / "eval"), "--overwrite")
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "eval" / "perplexity.json").read_text())[0]["budget"] == 1


def test_a_run_directory_as_checkpoint_means_its_latest_checkpoint(work, capsys):
    code = cli.main(["generate", "--checkpoint", str(work.run), "--prompt", "To be", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    first = err.splitlines()[0]
    assert first == f"using {work.run / 'checkpoint-000001'}, the latest checkpoint of the run in {work.run}"
    assert out.strip()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("flextron 0.")
