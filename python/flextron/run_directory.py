"""A training run directory (flextron.outputs' rule: never replace what this run did not
create): its checkpoints (``checkpoint-NNNNNN``, pruned by step number), ``latest``, the
log, the checks a new or resumed run makes, and the training state beside each checkpoint's
weights (``trainer.json``, ``optimizer.safetensors``, ``surrogate.safetensors``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flextron.checkpoint import CheckpointError, checkpoint_step, read_tensors
from flextron.outputs import (
    OutputError,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    check_not_source,
)

if TYPE_CHECKING:
    from flextron.training import TrainConfig

STATE_FILE = "trainer.json"
RUN_FILES = ("latest", "log.jsonl", "train_config.json")  # a run writes these beside its checkpoints
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "eval_tokens", "save_every", "keep_last"})

TensorState = tuple[dict[str, Tensor], dict[str, Any]]  # tensors (safetensors) + the rest (JSON)


def run_checkpoints(out_dir: Path) -> list[Path]:
    """A run directory's checkpoints, oldest step first (by number, not by name)."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def prepare_run_directory(out_dir: Path, source: Path, resume: bool, overwrite: bool) -> None:
    """Called with the run directory locked: remove what killed runs left (``.partial``
    checkpoints, temporary files), and for a new run refuse a directory that holds another
    run's checkpoints (or the source checkpoint) unless ``overwrite``."""
    for stale in out_dir.glob("checkpoint-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    if resume:
        return
    check_not_source(out_dir, source)
    existing = run_checkpoints(out_dir)
    if existing and not overwrite:
        raise OutputError(
            f"--out {out_dir} holds another run's checkpoints (up to {existing[-1].name}): pass --resume "
            "to continue that run, --overwrite to replace it, or choose another --out"
        )
    for old in existing:
        shutil.rmtree(old)
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


def check_resumable(saved: dict[str, Any], config: TrainConfig, out_dir: Path) -> None:
    """A resumed run must use the settings it was started with (except RESUMABLE_CHANGES)."""
    given = json.loads(json.dumps(asdict(config)))
    changed = sorted(k for k in given if k not in RESUMABLE_CHANGES and saved.get(k) != given[k])
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {given[k]!r}" for k in changed)
        raise CheckpointError(
            f"--resume: the run in {out_dir} was started with other settings ({detail}); only "
            f"{sorted(RESUMABLE_CHANGES)} may change when resuming"
        )


def check_same_data(saved: dict[str, Any], fingerprint: str, out_dir: Path) -> None:
    """A resumed run must read the same training tokens (``fingerprint`` hashes its windows)."""
    if saved.get("data", fingerprint) != fingerprint:
        raise CheckpointError(
            f"--resume: the run in {out_dir} was started on other training text (--data); "
            "resume with the same --data, or start a new run"
        )


def truncate_log(log: Path, step: int) -> None:
    """Drop the log lines of steps after ``step`` (a killed run logged steps it did not save)."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("step", entry.get("eval", {}).get("step", 0)) <= step:
            kept.append(line)
    atomic_write_bytes(log, "".join(f"{line}\n" for line in kept).encode())


def save_checkpoint(out_dir: Path, step: int, keep_last: int, write: Callable[[Path], None]) -> Path:
    """``write`` fills ``checkpoint-<step>.partial``, which is then renamed into place;
    ``latest`` names it and the oldest beyond ``keep_last`` are removed. A failed write (e.g.
    a full disk) removes the partial directory and says the earlier checkpoints are intact."""
    name = f"checkpoint-{step:06d}"
    final, partial = out_dir / name, out_dir / f"{name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        write(partial)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(f"{name} was not saved (the run's earlier checkpoints are intact): {e}") from None
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    atomic_write_bytes(out_dir / "latest", (name + "\n").encode())
    for old in run_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


@dataclass
class TrainingState:
    """What a checkpoint holds beside the weights and routers to resume exactly. The
    optimizer is None for FSDP runs (its state stays sharded and is not saved)."""

    step: int
    losses: list[float] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    optimizer: TensorState | None = None
    surrogate: TensorState | None = None


def write_training_state(directory: Path, state: TrainingState) -> None:
    record: dict[str, Any] = {"step": state.step, "losses": state.losses, "evaluations": state.evaluations}
    record["optimizer"] = None
    if state.optimizer is not None:
        atomic_save_tensors(directory / "optimizer.safetensors", state.optimizer[0])
        record["optimizer"] = state.optimizer[1]
    if state.surrogate is not None:
        atomic_save_tensors(directory / "surrogate.safetensors", state.surrogate[0])
        record["surrogate"] = state.surrogate[1]
    atomic_write_json(directory / STATE_FILE, record)


def trained_steps(directory: Path) -> int:
    """The step a training checkpoint was saved at (its ``trainer.json`` alone)."""
    return _read_record(directory)["step"]


def _read_record(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        record = json.loads(path.read_text())
        _optimizer, step, losses = record["optimizer"], record["step"], record["losses"]
    except KeyError as e:
        raise CheckpointError(f"{path} is incomplete: it has no {e}") from None
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{path} is missing or corrupt: {e}") from None
    if type(step) is not int or not isinstance(losses, list):
        raise CheckpointError(
            f"{path}: step must be an integer and losses a list, got {step!r}, {type(losses).__name__}"
        )
    return record


def read_training_state(directory: Path, device: torch.device | str) -> TrainingState:
    """The state :func:`write_training_state` wrote; a missing, damaged or ill-typed part is
    a CheckpointError naming its file."""
    record = _read_record(directory)
    meta = record["optimizer"]
    state = TrainingState(record["step"], list(record["losses"]), list(record.get("evaluations", [])))
    if meta is not None:
        state.optimizer = (read_tensors(directory / "optimizer.safetensors", device), meta)
    if "surrogate" in record:
        state.surrogate = (read_tensors(directory / "surrogate.safetensors"), record["surrogate"])
    return state


def restore(path: Path, load: Callable[[], None]) -> None:
    """Run ``load`` (state read from ``path`` into an object); a state that does not fit
    (names, shapes, types) is a CheckpointError naming the file."""
    try:
        load()
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit this run: {str(e).splitlines()[0]}") from None


class RunLog:
    """``log.jsonl``: one JSON line per step and per evaluation, written by one process
    (``enabled``); a resumed run first drops the lines past its step."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled:
            truncate_log(path, resumed_step)

    def write(self, entry: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
