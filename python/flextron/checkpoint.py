"""Elastic checkpoints: a directory with ``model.safetensors`` (weights), ``flextron.json``
(the ElasticConfig plus metadata: width choices, importance scores, the source model's
config) and the tokenizer's files.

Training runs add optimizer state (tensors in safetensors, the rest in JSON) and keep a
``latest`` pointer in their run directory (see flextron.training).

Every file is written atomically (flextron.outputs: a temporary file in the same directory,
flushed, then renamed over the target), so a process killed mid-write leaves the previous
file intact.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from flextron.model import ElasticConfig, ElasticLM
from flextron.outputs import atomic_save_tensors, atomic_write_json

FORMAT = "flextron-elastic"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
METADATA = "flextron.json"
ROUTERS = "routers.safetensors"  # trained routers, next to the weights (router training)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def read_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A safetensors file's tensors; a missing, truncated or corrupt file is a CheckpointError
    that names it."""
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or unreadable: {e}") from None


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in a model or checkpoint directory; a missing or unreadable one is
    a CheckpointError naming the directory and the file."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # JSONDecodeError, tokenizers' own Exception, ValueError, OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0].strip()
        if (directory / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{directory / 'tokenizer.json'} is corrupt or unreadable: {reason}"
            ) from None
        raise CheckpointError(
            f"{directory} holds no tokenizer flextron can load (a tokenizer.json is needed; "
            "sentencepiece- or tiktoken-only tokenizers are not supported)"
        ) from None


def model_tensors(model: ElasticLM) -> dict[str, torch.Tensor]:
    """The model's weights; a tied output head is stored once (as the embedding)."""
    tensors = dict(model.state_dict())
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def save_elastic(
    model: ElasticLM,
    directory: str | Path,
    metadata: dict[str, Any] | None = None,
    tokenizer=None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (+ ``metadata`` and the tokenizer) to ``directory``. ``tensors``
    replaces the model's own state dict (e.g. one gathered from FSDP shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = model_tensors(model)
    elif model.config.tie_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    atomic_save_tensors(directory / WEIGHTS, tensors, {"format": FORMAT})
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        **(metadata or {}),
    }
    atomic_write_json(directory / METADATA, record)
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    path = directory / METADATA
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a flextron checkpoint: {METADATA} is missing")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if record.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {record.get('version')}, this flextron reads {FORMAT_VERSION}"
        )
    return record


def check_metadata(record: dict[str, Any], config: ElasticConfig, path: Path) -> None:
    """What ``flextron.json`` holds beside the config, checked against it: the uniform
    sub-network losses and the description of the routers."""
    losses = record.get("uniform_losses", [])
    if not isinstance(losses, list):
        raise CheckpointError(f"{path}: uniform_losses must be a list, got {type(losses).__name__}")
    for i, entry in enumerate(losses):
        if not isinstance(entry, dict) or sorted(entry) != ["attention", "loss", "mlp"]:
            raise CheckpointError(
                f"{path}: uniform_losses[{i}] must have the keys mlp, attention, loss; got {entry!r}"
            )
        if not (
            _is_index(entry["mlp"], len(config.mlp_widths))
            and _is_index(entry["attention"], len(config.head_counts))
            and isinstance(entry["loss"], float | int)
            and math.isfinite(entry["loss"])
        ):
            raise CheckpointError(
                f"{path}: uniform_losses[{i}] must hold an MLP choice below {len(config.mlp_widths)}, "
                f"an attention choice below {len(config.head_counts)} and a finite loss; got {entry!r}"
            )
    routers = record.get("routers")
    if routers is None:
        return
    if not isinstance(routers, dict) or sorted(routers) != ["budgets", "hidden", "kind"]:
        raise CheckpointError(f"{path}: routers must have the keys kind, budgets, hidden; got {routers!r}")
    budgets = routers["budgets"]
    if (
        routers["kind"] not in ("static", "token")
        or not isinstance(budgets, list)
        or not budgets
        or not all(isinstance(b, float | int) and 0 < b <= 1 for b in budgets)
        or type(routers["hidden"]) is not int
        or routers["hidden"] <= 0
    ):
        raise CheckpointError(
            f"{path}: routers must be of kind 'static' or 'token', with budgets in (0, 1] and a "
            f"positive integer hidden size; got {routers!r}"
        )


def _is_index(value: Any, count: int) -> bool:
    return type(value) is int and 0 <= value < count


def load_elastic(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[ElasticLM, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_elastic`: ``(model, metadata)``."""
    directory = Path(directory)
    record = read_metadata(directory)
    try:
        config = ElasticConfig.from_dict(record["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / METADATA} has an invalid config: {e}") from None
    check_metadata(record, config, directory / METADATA)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory} is incomplete: {WEIGHTS} is missing")
    tensors = read_tensors(weights)
    with torch.device("meta"):
        model = ElasticLM(config)
    expected = model_tensors(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise CheckpointError(
                f"{weights}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected {expected[name].dtype} {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False, assign=True)
    model.finish_loading(device)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), record


# ---------------------------------------------------------------------------------------
# Training state: optimizer state as safetensors + JSON, the run directory's latest checkpoint


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    """Restore what :func:`optimizer_tensors` saved; a tensor whose shape is neither a scalar's
    nor its parameter's is a ValueError (torch would only fail at the next step)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        if not 0 <= int(index) < len(params):
            raise ValueError(f"{name}: the optimizer has {len(params)} parameters")
        if value.dim() > 0 and value.shape != params[int(index)].shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, its parameter {tuple(params[int(index)].shape)}"
            )
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d{6,})")


def checkpoint_step(path: Path) -> int | None:
    """The step of a run's checkpoint directory (``checkpoint-NNNNNN``), else None."""
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or, for a training run's directory (a ``latest`` file and no
    ``flextron.json``), the checkpoint its ``latest`` names. A file is a CheckpointError."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory")
    if path.is_dir() and not (path / METADATA).is_file():
        return latest_checkpoint(path) or path
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint a run directory's ``latest`` names: a ``checkpoint-NNNNNN`` inside it."""
    pointer = out_dir / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if CHECKPOINT_NAME.fullmatch(name) is None:
        raise CheckpointError(f"{pointer} must name a checkpoint-NNNNNN inside {out_dir}, got {name!r}")
    path = out_dir / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which does not exist")
    return path
