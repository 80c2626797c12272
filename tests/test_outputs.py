"""Nothing a user already has is destroyed (flextron.outputs): overwrite protection, the
source is never the destination, outputs written whole, one writer per directory, run
directories owned by one run, resume refusing changed settings, and the checks on values
that used to pass silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import flextron
from flextron import cli, data
from flextron.checkpoint import CheckpointError, latest_checkpoint, load_elastic
from flextron.conversion import ConvertOptions, convert
from flextron.outputs import DirectoryLock, OutputError, staged_directory
from flextron.training import TrainConfig, train

SMALL = {"batch_size": 2, "seq_len": 32, "train_tokens": 3000, "eval_tokens": 64, "warmup_steps": 1}


def run(tiny_elastic, tiny_texts, out, steps=2, **kwargs):
    config = TrainConfig(stage="elastic", steps=steps, save_every=1, keep_last=2, **SMALL)
    return train(config, tiny_elastic, tiny_texts[0], out, tiny_texts[1], progress=False, **kwargs)


def logged_steps(out):
    lines = (json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())
    return [entry["step"] for entry in lines if "step" in entry]


def test_a_new_run_refuses_another_runs_directory(tiny_elastic, tiny_texts, tmp_path):
    run(tiny_elastic, tiny_texts, tmp_path / "run", steps=4)
    with pytest.raises(OutputError, match=r"holds another run's checkpoints .*--resume.*--overwrite"):
        run(tiny_elastic, tiny_texts, tmp_path / "run", steps=2)
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-000004"  # untouched
    run(tiny_elastic, tiny_texts, tmp_path / "run", steps=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [
        "checkpoint-000001",
        "checkpoint-000002",
    ]
    assert logged_steps(tmp_path / "run") == [1, 2]  # the old run's log is gone with it


def test_training_never_writes_over_its_source(tiny_elastic, tiny_texts, tmp_path):
    run(tiny_elastic, tiny_texts, tmp_path / "run", steps=2)
    source = tmp_path / "run" / "checkpoint-000002"
    config = TrainConfig(stage="elastic", steps=2, **SMALL)
    with pytest.raises(OutputError, match="overlaps the source"):
        train(config, source, tiny_texts[0], tmp_path / "run", tiny_texts[1], progress=False, overwrite=True)
    load_elastic(source)


def test_pruning_keeps_the_newest_steps_by_number(tiny_elastic, tiny_texts, tmp_path):
    """checkpoint-1000000 sorts before checkpoint-999999 by name: pruning goes by step."""
    out = tmp_path / "run"
    run(tiny_elastic, tiny_texts, out, steps=3)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    (out / "checkpoint-000003").rename(out / "checkpoint-1000000")
    (out / "latest").write_text("checkpoint-1000000\n")
    from flextron.run_directory import run_checkpoints

    assert [p.name for p in run_checkpoints(out)] == ["checkpoint-000002", "checkpoint-1000000"]


def test_resume_refuses_changed_settings_and_truncates_the_log(tiny_elastic, tiny_texts, tmp_path):
    out = tmp_path / "run"
    run(tiny_elastic, tiny_texts, out, steps=2)
    with (out / "log.jsonl").open("a") as f:  # a killed run logged a step it never saved
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    changed = TrainConfig(stage="elastic", steps=3, save_every=1, **{**SMALL, "batch_size": 3, "seq_len": 16})
    with pytest.raises(CheckpointError, match=r"batch_size: 2 -> 3, seq_len: 32 -> 16"):
        train(changed, "unused", tiny_texts[0], out, tiny_texts[1], resume=True, progress=False)
    other_text = [data.Text("other", tiny_texts[0][0].content[5000:])]
    same_settings = TrainConfig(stage="elastic", steps=3, save_every=1, keep_last=2, **SMALL)
    with pytest.raises(CheckpointError, match=r"started on other training text \(--data\)"):
        train(same_settings, "unused", other_text, out, tiny_texts[1], resume=True, progress=False)
    more_steps = TrainConfig(stage="elastic", steps=3, save_every=1, keep_last=2, **SMALL)  # may change
    train(more_steps, "unused", tiny_texts[0], out, tiny_texts[1], resume=True, progress=False)
    assert logged_steps(out) == [1, 2, 3]


def test_one_writer_per_run_directory(tiny_elastic, tiny_texts, tmp_path):
    """A second process on the same --out is refused with the holder's PID; the lock goes
    with its holder (a dead process leaves nothing to clean up)."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from flextron.outputs import DirectoryLock
            with DirectoryLock({str(out / ".lock")!r}, "run"):
                print("locked", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"being written by another process \\(PID {holder.pid}\\)"):
            run(tiny_elastic, tiny_texts, out, steps=1)
    finally:
        holder.kill()
        holder.wait()
    run(tiny_elastic, tiny_texts, out, steps=1)  # the dead holder's lock is free


def test_export_and_convert_refuse_their_source_and_existing_outputs(
    tiny_elastic, tiny_model_dir, tiny_texts, tmp_path
):
    with pytest.raises(OutputError, match="overlaps the source"):
        flextron.export(tiny_elastic, tiny_elastic, mlp_choice=0, attention_choice=0, overwrite=True)
    with pytest.raises(OutputError, match="overlaps the source"):
        convert(tiny_model_dir, tiny_texts[0], tiny_model_dir, ConvertOptions(progress=False), overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="already exists and is not empty: pass --overwrite"):
        flextron.export(tiny_elastic, mine, mlp_choice=0, attention_choice=0)
    assert (mine / "notes.txt").read_text() == "keep me"
    flextron.export(tiny_elastic, mine, mlp_choice=1, attention_choice=1, overwrite=True)
    assert not (mine / "notes.txt").exists() and (mine / "config.json").is_file()


@pytest.mark.parametrize("choice", [-1, 2])
def test_export_refuses_choices_out_of_range(tiny_elastic, tmp_path, choice):
    with pytest.raises(ValueError, match=r"--mlp-choice must be an index in \[0, 2\)"):
        flextron.export(tiny_elastic, tmp_path / "x", mlp_choice=choice, attention_choice=0)


def test_a_killed_write_leaves_the_old_output_whole(tiny_elastic, tmp_path, monkeypatch):
    """Killed between files, convert/export leave the previous output, never a mix."""
    out = tmp_path / "export"
    flextron.export(tiny_elastic, out, mlp_choice=0, attention_choice=0)
    before = sorted(p.name for p in out.iterdir())

    def killed(path, *args, **kwargs):  # the last file: weights and tokenizer are written
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("flextron.conversion.atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        flextron.export(tiny_elastic, out, mlp_choice=1, attention_choice=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "flextron_export.json").read_text())["mlp_choice"] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.partial")] == []


def test_a_convert_killed_between_files_leaves_the_old_checkpoint_whole(
    tiny_elastic, tiny_model_dir, tiny_texts, tmp_path, monkeypatch
):
    import shutil

    out = tmp_path / "elastic"
    shutil.copytree(tiny_elastic, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(path, *args, **kwargs):  # flextron.json is the last file: weights and tokenizer are written
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("flextron.checkpoint.atomic_write_json", killed)
    options = ConvertOptions(seq_len=32, max_tokens=256, table_tokens=64, progress=False, head_counts=(4,))
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_model_dir, tiny_texts[0], out, options, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["elastic"]


def test_the_demo_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"holds files the demo did not write \(notes.txt\)"):
        flextron.demo(tmp_path, quick=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_staged_directory_cleans_up_after_a_killed_process(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-999999"  # a killed run's temporary sibling
    stale.mkdir()
    with staged_directory(out, overwrite=False) as staging:
        (staging / "file").write_text("new")
    assert (out / "file").read_text() == "new" and not stale.exists()


def test_files_follow_the_umask(tiny_elastic, tiny_texts, tmp_path):
    old = os.umask(0o027)  # group may read, others nothing
    try:
        run(tiny_elastic, tiny_texts, tmp_path / "run", steps=1)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "flextron.json", "optimizer.safetensors", "trainer.json"):
        assert (tmp_path / "run" / "checkpoint-000001" / name).stat().st_mode & 0o777 == 0o640, name
    assert (tmp_path / "run" / "latest").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("pointer", ["../../other/checkpoint-000030", "/tmp/checkpoint-000001", "junk"])
def test_latest_must_name_a_checkpoint_inside_the_run(tmp_path, pointer):
    (tmp_path / "latest").write_text(pointer + "\n")
    with pytest.raises(CheckpointError, match="must name a checkpoint-NNNNNN inside"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"clip_norm": -1}, "clip_norm must be positive"),
        ({"clip_norm": 0}, "clip_norm must be positive"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"min_lr_ratio": -0.1}, r"min_lr_ratio must be in \[0, 1\]"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"latency_weight": -1.0}, "latency_weight must be >= 0"),
        ({"router_hidden": 0}, "router_hidden must be positive"),
        ({"surrogate_threshold": -0.1}, "surrogate_threshold must be >= 0"),
        ({"router_prior": float("nan")}, "router_prior must be a finite number"),
        ({"temperature_start": float("inf")}, "temperature_start must be a finite number"),
        ({"save_every": True}, "save_every must be an integer"),
        ({"warmup_steps": 1.5}, "warmup_steps must be an integer"),
        ({"steps": "abc"}, "steps must be an integer"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"lr": "1e-3"}, "lr must be a finite number"),
        ({"budgets": 0.5}, "budgets must be a list of numbers"),
        ({"seed": 2**70}, r"seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_train_config_names_the_bad_field(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_config_file_type_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text('steps = "abc"\n')
    argv = [
        "train",
        "--checkpoint",
        "x",
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(tmp_path / "bad.toml"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "steps must be an integer" in err and "Traceback" not in err


def test_ops_reject_silent_narrowing_and_misplaced_biases():
    offsets = torch.tensor([0, 2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="positive 32-bit integers"):
        flextron.nested_linear_n(torch.randn(4, 8), torch.randn(16, 8), offsets, torch.tensor([2**32 + 8, 4]))
    x, choice = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    w_up, w_down = torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"b_down must be 1-D \[8\]"):
        flextron.elastic_mlp(x, choice, w_up, w_down, [16, 8], "gelu", b_down=torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"b_up must be 1-D \[16\]"):
        flextron.elastic_mlp(x, choice, w_up, w_down, [16, 8], "gelu", b_up=torch.randn(4, 16))


def test_directory_lock_is_reentrant_after_release(tmp_path):
    with DirectoryLock(tmp_path / ".lock", "x"):
        pass
    with DirectoryLock(tmp_path / ".lock", "x"):
        pass


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--checkpoint", "x", "--seq-len", "0"],
        ["eval", "--checkpoint", "x", "--seq-len", "-5"],
        ["eval", "--checkpoint", "x", "--batch-size", "0"],
        ["eval", "--checkpoint", "x", "--batch-size", "-1"],
        ["generate", "--checkpoint", "x", "--temperature", "nan"],
        ["generate", "--checkpoint", "x", "--seed", str(2**70)],
        ["train", "--checkpoint", "x", "--out", "y", "--steps", "1.5"],
    ],
)
def test_bad_numeric_flags_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


def test_binary_files_are_not_text(tmp_path):
    (tmp_path / "random.txt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match=r"random.txt is not a UTF-8 text file"):
        data.read_texts(tmp_path / "random.txt")
    (tmp_path / "ok.txt").write_text("Shall I compare thee to a summer's day? — naïve café")
    assert "naïve" in data.read_texts(tmp_path / "ok.txt")[0].content


@pytest.mark.parametrize("damage", ["truncate optimizer", "step as text", "missing keys"])
def test_a_damaged_training_state_is_named(tiny_elastic, tiny_texts, tmp_path, damage):
    out = tmp_path / "run"
    run(tiny_elastic, tiny_texts, out, steps=1)
    checkpoint = out / "checkpoint-000001"
    state = json.loads((checkpoint / "trainer.json").read_text())
    if damage == "truncate optimizer":
        path = checkpoint / "optimizer.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        expected = "optimizer.safetensors is corrupt or unreadable"
    elif damage == "step as text":
        (checkpoint / "trainer.json").write_text(json.dumps({**state, "step": "1"}))
        expected = "step must be an integer"
    else:
        (checkpoint / "trainer.json").write_text(json.dumps({"step": 1}))
        expected = "trainer.json is incomplete: it has no 'optimizer'"
    with pytest.raises(CheckpointError, match=expected):
        run(tiny_elastic, tiny_texts, out, steps=2, resume=True)


def test_an_optimizer_state_of_the_wrong_shape_is_named(tiny_elastic, tiny_texts, tmp_path):
    """It used to load and fail at the first step with a shape error from AdamW."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    run(tiny_elastic, tiny_texts, out, steps=1)
    path = out / "checkpoint-000001" / "optimizer.safetensors"
    tensors = load_file(path)
    name = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, path)
    with pytest.raises(
        CheckpointError, match=rf"optimizer.safetensors does not fit this run: {name} has shape"
    ):
        run(tiny_elastic, tiny_texts, out, steps=2, resume=True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["uniform_losses"][0].update(bogus=1), r"uniform_losses\[0\] must have the keys"),
        (lambda r: r["uniform_losses"][0].pop("loss"), r"uniform_losses\[0\] must have the keys"),
        (lambda r: r["uniform_losses"][0].update(mlp="0"), "an MLP choice below"),
        (lambda r: r["uniform_losses"][0].update(mlp=7), "an MLP choice below"),
        (lambda r: r["uniform_losses"][0].update(loss=float("nan")), "a finite loss"),
        (lambda r: r.update(routers={"kind": "static", "budgets": [0.5, 1.0], "hidden": -1}), "positive integer hidden"),
        (lambda r: r.update(routers={"kind": "magic", "budgets": [1.0], "hidden": 8}), "of kind 'static' or 'token'"),
        (lambda r: r.update(routers={"kind": "token", "budgets": [1.0]}), "must have the keys kind, budgets, hidden"),
    ],
)  # fmt: skip
def test_metadata_beside_the_config_is_checked(tiny_elastic, tmp_path, edit, message):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_elastic, copy)
    record = json.loads((copy / "flextron.json").read_text())
    edit(record)
    (copy / "flextron.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=f"flextron.json: .*{message}"):
        load_elastic(copy)


def test_weights_of_another_dtype_are_refused(tiny_elastic, tmp_path):
    """An int64 (or fp16) tensor in model.safetensors used to load into the fp32 model."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_elastic, copy)
    tensors = load_file(copy / "model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "flextron-elastic"})
    with pytest.raises(CheckpointError, match=f"{name} is torch.int64 .*, expected torch.float32"):
        load_elastic(copy)


def test_pickled_code_in_a_model_is_one_line(tmp_path, capsys):
    import pickle

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    config.save_pretrained(tmp_path / "evil")
    transformers.AutoTokenizer.from_pretrained(data.embedded_model_dir()).save_pretrained(tmp_path / "evil")
    with open(tmp_path / "evil" / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(tmp_path / "ran"), f)
    assert cli.main(["convert", "--model", str(tmp_path / "evil"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds pickled code" in err and err.count("\n") == 1 and not (tmp_path / "ran").exists()


class _Payload:
    """Creates a file when unpickled (torch.load with weights_only refuses to)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
