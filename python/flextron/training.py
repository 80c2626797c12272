"""Training an elastic model, in three stages (Flextron, section 1 of DESIGN.md):

- ``elastic``: continued training of the model; each micro-batch runs a sampled sub-network
  (with probability ``p_full`` the full model), loss = cross-entropy and/or KL to the frozen
  full model;
- ``routers``: model frozen; routers learn from a surrogate model of the LM loss and the
  latency table: ``SM(p) + latency_weight * |expected_latency(p) / target - 1|``, updated only
  while the surrogate's error is under ``surrogate_threshold``; fresh routers start from
  each budget's best uniform sub-network on the table (:func:`uniform_start`);
- ``joint``: model and routers together, LM loss + the latency term, no surrogate.

A router *budget* is a latency target: ``budget * full-width latency`` on the table.

Everything random (data order, sub-network samples, Gumbel noise) is drawn from generators
seeded by (seed, step, micro-batch, rank), so a resumed run repeats an uninterrupted one
exactly. Runs under torchrun with DDP or FSDP2 (``parallel``), one data shard per rank.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from flextron.budgets import BudgetResolver, UniformLoss, lowest_loss_within, router_metadata, stored_losses
from flextron.checkpoint import (
    ROUTERS,
    CheckpointError,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_step,
    latest_checkpoint,
    load_elastic,
    load_optimizer,
    load_tokenizer,
    optimizer_tensors,
    read_tensors,
    save_elastic,
)
from flextron.data import Text, token_windows
from flextron.evaluation import mean_loss
from flextron.latency import LatencyTable, measure
from flextron.model import ElasticLM
from flextron.outputs import DirectoryLock, OutputError, check_not_source
from flextron.routers import StaticRouter, TokenRouter, load_router_state
from flextron.runtime import DTYPE_NAMES, DtypeName, resolve_device, resolve_dtype
from flextron.stages import Batch, ElasticStage, JointStage, RouterStage, temperature
from flextron.surrogate import Surrogate, SurrogateTrainer

Stage = Literal["elastic", "routers", "joint"]
STATE_FILE = "trainer.json"
RUN_FILES = ("latest", "log.jsonl", "train_config.json")  # a run writes these beside its checkpoints
# Settings a resumed run may change; any other difference would not resume "exactly".
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "eval_tokens", "save_every", "keep_last"})


INT_FIELDS = ("steps", "batch_size", "seq_len", "grad_accum", "warmup_steps", "seed", "router_hidden",
              "eval_every", "eval_tokens", "save_every", "keep_last", "train_tokens")  # fmt: skip
FLOAT_FIELDS = ("lr", "router_lr", "weight_decay", "min_lr_ratio", "clip_norm", "p_full", "router_prior",
                "temperature_start", "temperature_end", "latency_weight", "surrogate_threshold")  # fmt: skip
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
RULES = {  # field: (check, what the value must be)
    **dict.fromkeys(("steps", "batch_size", "seq_len", "grad_accum", "router_hidden"), POSITIVE),
    **dict.fromkeys(("eval_tokens", "keep_last", "train_tokens"), POSITIVE),
    **dict.fromkeys(("lr", "router_lr", "clip_norm"), POSITIVE),
    **dict.fromkeys(("temperature_start", "temperature_end"), POSITIVE),
    **dict.fromkeys(
        (
            "warmup_steps",
            "eval_every",
            "save_every",
            "weight_decay",
            "latency_weight",
            "router_prior",
            "surrogate_threshold",
        ),
        NON_NEGATIVE,
    ),
    "min_lr_ratio": FRACTION,
    "p_full": FRACTION,
    "seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
}


@dataclass
class TrainConfig:
    """Every knob of a training run; validated on construction, loadable from TOML/YAML."""

    stage: Stage = "elastic"
    steps: int = 100
    batch_size: int = 4  # sequences per micro-batch and rank
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 5e-5
    router_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    seed: int = 0
    budgets: tuple[float, ...] = (1.0, 0.75, 0.5)
    p_full: float = 0.25
    sample: Literal["global", "layer"] = "global"
    loss: Literal["ce", "kl", "ce+kl"] = "ce"
    router: Literal["static", "token"] = "static"
    router_hidden: int = 64
    router_prior: float = 2.0  # logit margin on each budget's best uniform sub-network at the start
    temperature_start: float = 1.0
    temperature_end: float = 0.1
    latency_weight: float = 20.0  # a budget is a target to meet: missing it by 5% costs 1 nat
    surrogate_threshold: float = 0.05
    eval_every: int = 0  # steps; 0 = at the end only
    eval_tokens: int = 2048
    save_every: int = 0  # steps; 0 = at the end only
    keep_last: int = 2
    device: str = "cpu"
    dtype: DtypeName = "auto"  # compute dtype (autocast); weights stay fp32. auto: bf16 on GPU
    parallel: Literal["ddp", "fsdp"] = "ddp"
    lut: str | None = None  # a latency table JSON; default: measured at the start
    train_tokens: int = 1_000_000  # at most this many tokens of the training text are used

    def __post_init__(self) -> None:
        for name in INT_FIELDS:
            value = getattr(self, name)
            if type(value) is not int:  # bool, 1.5 and "3" are not step counts
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.budgets, str | bytes) or not isinstance(self.budgets, Sequence):
            raise ValueError(f"budgets must be a list of numbers, got {self.budgets!r}")
        if any(isinstance(b, bool) or not isinstance(b, int | float) for b in self.budgets):
            raise ValueError(f"budgets must be a list of numbers, got {list(self.budgets)!r}")
        self.budgets = tuple(float(b) for b in self.budgets)
        choices = {
            "stage": ("elastic", "routers", "joint"),
            "sample": ("global", "layer"),
            "loss": ("ce", "kl", "ce+kl"),
            "router": ("static", "token"),
            "parallel": ("ddp", "fsdp"),
            "dtype": DTYPE_NAMES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string such as 'cpu' or 'cuda:0', got {self.device!r}")
        if self.lut is not None and not isinstance(self.lut, str):
            raise ValueError(f"lut must be a path, got {self.lut!r}")
        for name, (check, requirement) in RULES.items():
            if not check(getattr(self, name)):
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)!r}")
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError(f"budgets must be in (0, 1], got {list(self.budgets)}")
        if self.temperature_end > self.temperature_start:
            raise ValueError("temperatures must satisfy 0 < temperature_end <= temperature_start")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML (or YAML) file of TrainConfig fields; ``overrides`` win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = tomllib.loads(text)
        except Exception as e:  # the parsers' own error types differ
            raise ValueError(f"{path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown} (known: {sorted(known)})")
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class TrainResult:
    out_dir: Path
    losses: list[float] = field(default_factory=list)  # per step, averaged over micro-batches
    evaluations: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Small pieces


def learning_rate(config: TrainConfig, base: float, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * base``."""
    if step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return base * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def generator_for(config: TrainConfig, step: int, micro: int, rank: int, purpose: int) -> torch.Generator:
    """A generator that depends only on its arguments (so a resumed run draws the same)."""
    seed = (((config.seed * 1_000_003 + step) * 1009 + micro) * 101 + rank) * 7 + purpose
    return torch.Generator().manual_seed(seed % (2**63))


def uniform_start(table: LatencyTable, budget: float, losses: Sequence[UniformLoss]) -> tuple[int, int]:
    """The uniform (MLP, attention) choice a router starts from at ``budget`` (a latency
    fraction): the lowest calibration loss among those within the budget on ``table``
    (without losses, the slowest within it); the fastest if none is."""
    latencies = {
        pair: table.uniform_ms(*pair)
        for pair in itertools.product(range(len(table.mlp_ms)), range(len(table.attention_ms)))
    }
    best = lowest_loss_within(latencies, budget * table.full_ms() * (1 + 1e-9), losses)
    return best if best is not None else min(latencies, key=latencies.get)


class Windows:
    """Training token windows; the order is a fixed permutation per epoch, and each rank
    reads its own slice of every global batch."""

    def __init__(self, tokens: Tensor, seed: int) -> None:
        self.tokens, self.seed = tokens, seed
        self._orders: dict[int, Tensor] = {}

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._orders = {epoch: torch.randperm(self.tokens.shape[0], generator=generator)}
        return self._orders[epoch]

    def batch(self, index: int, batch_size: int, rank: int, world: int) -> Tensor:
        per_epoch = self.tokens.shape[0]
        start = (index * world + rank) * batch_size
        rows = []
        for position in range(start, start + batch_size):
            epoch, offset = divmod(position, per_epoch)
            rows.append(self.tokens[self._order(epoch)[offset]])
        return torch.stack(rows)


# ---------------------------------------------------------------------------------------
# The run directory (flextron.outputs: never replace what this run did not create)


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


# ---------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One training stage on one elastic checkpoint (see :func:`train`): :meth:`run` is the
    loop, :meth:`step` one optimizer step, the stage object (flextron.stages) the loss."""

    def __init__(
        self,
        config: TrainConfig,
        checkpoint: str | Path,
        texts: Sequence[Text],
        out_dir: str | Path,
        eval_texts: Sequence[Text] = (),
        resume: bool = False,
        progress: bool = True,
    ) -> None:
        self.config, self.out_dir, self.progress = config, Path(out_dir), progress
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = resolve_device(config.device)
        self.start_step = 0
        resume_from = self._open(Path(checkpoint), resume)
        self._read_texts(texts, eval_texts, resume_from)
        self.router, router_loaded = self._build_router(resume_from or Path(checkpoint))
        self.teacher = None
        if config.stage == "elastic" and "kl" in config.loss:
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.trained_model = self._trained_model()
        self.optimizer = self._build_optimizer()
        self.table: LatencyTable | None = None
        self.surrogate: SurrogateTrainer | None = None
        if self.router is not None:
            self._prepare_routers(resume_from, router_loaded)
        self.stage = self._build_stage()
        self.result = TrainResult(self.out_dir)
        if resume_from is not None:
            self._load_training_state(resume_from)

    # -- setup ----------------------------------------------------------------------

    def _open(self, source: Path, resume: bool) -> Path | None:
        """Load the model and tokenizer (from the run's latest checkpoint when resuming, whose
        settings must match); returns that checkpoint, or None for a new run."""
        resume_from = latest_checkpoint(self.out_dir) if resume else None
        if resume and resume_from is None:
            raise CheckpointError(f"--resume: {self.out_dir} holds no checkpoint to resume from")
        self.model, self.record = load_elastic(resume_from or source, device=self.device)
        if resume_from is not None:
            check_resumable(self.record.get("training", {}).get("config", {}), self.config, self.out_dir)
        self.tokenizer = load_tokenizer(resume_from or source)
        return resume_from

    def _read_texts(
        self, texts: Sequence[Text], eval_texts: Sequence[Text], resume_from: Path | None
    ) -> None:
        config, eos = self.config, self.model.config.eos_token_id
        windows = next(
            token_windows(self.tokenizer, texts, config.seq_len, config.train_tokens, 1 << 30, eos)
        )
        self.windows = Windows(windows, config.seed)
        self.data_fingerprint = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
        if resume_from is not None:
            check_same_data(self.record.get("training", {}), self.data_fingerprint, self.out_dir)
        self.probe = windows[: max(config.batch_size, 4)].to(self.device)  # the router stage's fixed batch
        self.eval_batches = []
        if eval_texts:
            self.eval_batches = list(
                token_windows(
                    self.tokenizer, eval_texts, config.seq_len, config.eval_tokens, config.batch_size, eos,
                    flag="--eval-data",
                )
            )  # fmt: skip

    def _build_router(self, source: Path) -> tuple[StaticRouter | TokenRouter | None, bool]:
        """The routers of a router stage (seeded), continuing those saved with the source when
        they have the same kind, budgets and size; ``(router, loaded)``."""
        config = self.config
        if config.stage not in ("routers", "joint"):
            return None, False
        kind = StaticRouter if config.router == "static" else TokenRouter
        with torch.random.fork_rng(devices=[]):  # initialized from the run's seed alone
            torch.manual_seed(config.seed)
            router = kind(self.model.config, config.budgets, config.router_hidden).to(self.device)
        saved = source / ROUTERS
        if saved.is_file() and router_metadata(self.record) == self._router_signature():
            load_router_state(router, read_tensors(saved, self.device))
            return router, True
        return router, False

    def _trained_model(self) -> nn.Module:
        train_model = self.config.stage in ("elastic", "joint")
        self.model.requires_grad_(train_model)
        self.model.train(train_model)
        return self._parallel(self.model) if train_model else self.model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        groups = []
        if self.config.stage in ("elastic", "joint"):
            groups.append({"params": list(self.model.parameters()), "lr": self.config.lr, "name": "model"})
        if self.router is not None:
            groups.append(
                {"params": list(self.router.parameters()), "lr": self.config.router_lr, "name": "router"}
            )
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    def _prepare_routers(self, resume_from: Path | None, router_loaded: bool) -> None:
        """The latency table; fresh routers start from each budget's best uniform sub-network;
        the router stage gets its surrogate (seeded)."""
        self.table = self._latency_table(resume_from)
        if not router_loaded:
            losses = stored_losses(self.record)
            starts = [uniform_start(self.table, budget, losses) for budget in self.router.encode.budgets]
            self.router.warm_start(starts, self.config.router_prior)
        if self.config.stage == "routers":
            model_config = self.model.config
            features = model_config.num_layers * (
                len(model_config.mlp_widths) + len(model_config.head_choices)
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed + 1)
                self.surrogate = SurrogateTrainer(Surrogate(features))

    def _build_stage(self) -> ElasticStage | RouterStage | JointStage:
        config = self.config
        if config.stage == "elastic":
            return ElasticStage(self.trained_model, config, self.model.config, self.teacher, self._autocast)
        if config.stage == "routers":
            return RouterStage(
                self.model,
                self.router,
                self.probe,
                self.surrogate,
                self.table,
                config,
                self.world,
                self._autocast,
            )
        return JointStage(self.trained_model, self.router, self.table, config, self._autocast)

    def _parallel(self, model: ElasticLM) -> nn.Module:
        if self.world == 1:
            return model
        if self.config.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )

    def _router_signature(self) -> dict[str, Any]:
        return {
            "kind": self.config.router,
            "budgets": list(self.config.budgets),
            "hidden": self.config.router_hidden,
        }

    def _latency_table(self, resume_from: Path | None) -> LatencyTable:
        saved = self.out_dir / "latency.json"
        if resume_from is not None and saved.is_file():
            return LatencyTable.load(saved)  # the same table as the interrupted run
        if self.config.lut:
            table = LatencyTable.load(self.config.lut)
        else:
            with self._autocast():  # timed in the dtype the routed model will run in
                table = measure(
                    self.model, self.config.batch_size, self.config.seq_len, progress=self.progress
                )
        if table.num_layers != self.model.config.num_layers or len(table.mlp_ms) != len(
            self.model.config.mlp_widths
        ):
            raise ValueError(
                "the latency table was measured for another model (layers or width choices differ)"
            )
        if self.rank == 0:
            table.save(saved)
        return table

    # -- one step -------------------------------------------------------------------

    def step(self, step: int) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches: ``(mean loss, last info)``."""
        config = self.config
        for group in self.optimizer.param_groups:
            base = config.lr if group["name"] == "model" else config.router_lr
            group["lr"] = learning_rate(config, base, step)
        self.optimizer.zero_grad(set_to_none=True)
        total, info = 0.0, {}
        for micro in range(config.grad_accum):
            ids = None
            if self.stage.needs_batch:
                index = step * config.grad_accum + micro
                ids = self.windows.batch(index, config.batch_size, self.rank, self.world).to(self.device)
            batch = Batch(
                ids,
                generator_for(config, step, micro, self.rank, 0),
                generator_for(config, step, micro, self.rank, 1),
            )
            loss, info = self.stage.loss(batch, step)
            if loss.requires_grad:
                (loss / config.grad_accum).backward()
            total += float(info.get("lm_loss", loss.item())) / config.grad_accum
        self._reduce_router_grads()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            self.optimizer.step()
        return total, info

    def _autocast(self):
        dtype = resolve_dtype(self.config.dtype, self.device)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _reduce_router_grads(self) -> None:
        """Average router gradients across ranks (the model's are reduced by DDP/FSDP)."""
        if self.world == 1 or self.router is None:
            return
        for p in self.router.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

    # -- evaluation and checkpoints -------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss per trained budget: with the routers (argmax) when there are any,
        else with the uniform sub-network table of the checkpoint; with routers, also the
        expected latency of their probabilities on the table."""
        was_training = self.model.training
        self.model.eval()
        resolve = BudgetResolver(self.model, self.router, stored_losses(self.record))
        smallest = self.model.config.smallest_fraction()
        row: dict[str, Any] = {}
        for budget in self.config.budgets:
            # The uniform table serves a budget under the smallest sub-network with the smallest.
            served = resolve(budget if self.router is not None else max(budget, smallest))
            loss, _ = mean_loss(self.model, self.eval_batches, served.routing)
            row[f"{budget:g}"] = {"loss": loss, "perplexity": math.exp(loss)}
            if self.router is not None:
                output = (
                    self.router(budget) if isinstance(self.router, StaticRouter) else served.routing.output()
                )
                latency = self.table.expected_ms(output.mlp_probs, output.attention_probs)
                row[f"{budget:g}"]["latency_ms"] = float(latency)
                row[f"{budget:g}"]["latency_target_ms"] = budget * self.table.full_ms()
        self.model.train(was_training)
        return row

    def _full_model_state(self) -> dict[str, Tensor] | None:
        """The whole model's weights (gathered from the FSDP shards on every rank)."""
        if self.world > 1 and self.config.parallel == "fsdp" and self.trained_model is self.model:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_model_state_dict(self.model, options=options)
        return None

    def save(self, step: int) -> Path | None:
        """Write ``checkpoint-<step+1>`` as a ``.partial`` directory, rename it into place,
        point ``latest`` at it and prune the oldest beyond ``keep_last``."""
        model_state = self._full_model_state()  # a collective: every rank takes part
        if self.rank != 0:
            return None
        name = f"checkpoint-{step + 1:06d}"
        final, partial = self.out_dir / name, self.out_dir / f"{name}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        try:
            self._write_checkpoint(partial, step, model_state)
        except OSError as e:  # e.g. a full disk
            shutil.rmtree(partial, ignore_errors=True)
            raise OSError(f"{name} was not saved (the run's earlier checkpoints are intact): {e}") from None
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        atomic_write_bytes(self.out_dir / "latest", (name + "\n").encode())
        for old in run_checkpoints(self.out_dir)[: -self.config.keep_last]:
            shutil.rmtree(old)
        return final

    def _write_checkpoint(self, partial: Path, step: int, model_state: dict[str, Tensor] | None) -> None:
        metadata = {k: v for k, v in self.record.items() if k not in ("format", "version", "config")}
        metadata["training"] = {
            "stage": self.config.stage,
            "step": step + 1,
            "config": asdict(self.config),
            "data": self.data_fingerprint,
        }
        if self.router is not None:
            metadata["routers"] = self._router_signature()
        save_elastic(self.model, partial, metadata, self.tokenizer, tensors=model_state)
        if self.router is not None:
            atomic_save_tensors(partial / ROUTERS, self.router.state_dict())
        if model_state is None:
            tensors, meta = optimizer_tensors(self.optimizer)
            atomic_save_tensors(partial / "optimizer.safetensors", tensors)
        else:  # FSDP: the optimizer state stays sharded and is not saved (no --resume yet)
            meta = None
        state: dict[str, Any] = {"step": step + 1, "optimizer": meta, "losses": self.result.losses}
        state["evaluations"] = self.result.evaluations
        if self.surrogate is not None:
            surrogate_tensors, state["surrogate"] = self.surrogate.state_dict()
            atomic_save_tensors(partial / "surrogate.safetensors", surrogate_tensors)
        atomic_write_json(partial / STATE_FILE, state)

    def _load_training_state(self, directory: Path) -> None:
        try:
            state = json.loads((directory / STATE_FILE).read_text())
            saved, step, losses = state["optimizer"], state["step"], state["losses"]
        except KeyError as e:
            raise CheckpointError(f"{directory / STATE_FILE} is incomplete: it has no {e}") from None
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{directory / STATE_FILE} is missing or corrupt: {e}") from None
        if type(step) is not int or not isinstance(losses, list):
            raise CheckpointError(
                f"{directory / STATE_FILE}: step must be an integer and losses a list, got {step!r}, "
                f"{type(losses).__name__}"
            )
        if saved is None or (self.world > 1 and self.config.parallel == "fsdp"):
            raise CheckpointError(
                "resuming an FSDP run is not supported yet (its optimizer state is not saved)"
            )
        tensors = read_tensors(directory / "optimizer.safetensors", self.device)
        try:
            load_optimizer(self.optimizer, tensors, saved)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{directory / 'optimizer.safetensors'} does not fit this model: {e}"
            ) from None
        self.start_step = step
        self.result.losses = list(losses)
        self.result.evaluations = list(state.get("evaluations", []))
        if self.surrogate is not None and "surrogate" in state:
            path = directory / "surrogate.safetensors"
            tensors = read_tensors(path)
            try:
                self.surrogate.load_state_dict(tensors, state["surrogate"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{path} does not fit this run: {str(e).splitlines()[0]}") from None

    # -- the loop -------------------------------------------------------------------

    def run(self) -> TrainResult:
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            atomic_write_json(self.out_dir / "train_config.json", asdict(config))
        bar = tqdm(
            range(self.start_step, config.steps),
            initial=self.start_step,
            total=config.steps,
            desc=f"train ({config.stage})",
            disable=not self.progress or self.rank != 0,
        )
        log = self.out_dir / "log.jsonl"
        if self.rank == 0:
            truncate_log(log, self.start_step)
        for step in bar:
            loss, info = self.step(step)
            self.result.losses.append(loss)
            postfix = {"loss": f"{loss:.3f}"}
            if "latency_ms" in info:
                postfix |= {"lat": f"{info['latency_ms']:.1f}ms", "tau": f"{temperature(config, step):.2f}"}
            bar.set_postfix(postfix)
            if self.rank == 0:
                with log.open("a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": loss, **info}) + "\n")
            last = step + 1 == config.steps
            if self.eval_batches and ((config.eval_every and (step + 1) % config.eval_every == 0) or last):
                evaluation = {"step": step + 1, "budgets": self.evaluate()}
                self.result.evaluations.append(evaluation)
                if self.rank == 0:
                    with log.open("a") as f:
                        f.write(json.dumps({"eval": evaluation}) + "\n")
            if (config.save_every and (step + 1) % config.save_every == 0) or last:
                self.save(step)
            if dist.is_initialized():
                dist.barrier()
        return self.result


def train(
    config: TrainConfig,
    checkpoint: str | Path,
    texts: Sequence[Text],
    out_dir: str | Path,
    eval_texts: Sequence[Text] = (),
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Run one training stage from an elastic checkpoint (or resume the last checkpoint in
    ``out_dir``); checkpoints land in ``out_dir/checkpoint-NNNNNN`` (``out_dir/latest``
    names the newest) and each is itself an elastic checkpoint (eval, export, generate).
    ``out_dir`` is locked while the run writes it; a new run refuses a directory holding
    another run's checkpoints unless ``overwrite``."""
    started = False
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if config.device.startswith("cuda"):
            config = dataclasses.replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        started = True
    out_dir = Path(out_dir)
    writer = (dist.get_rank() if dist.is_initialized() else 0) == 0
    try:
        with DirectoryLock(out_dir / ".lock", f"--out {out_dir}") if writer else contextlib.nullcontext():
            if writer:
                prepare_run_directory(out_dir, Path(checkpoint), resume, overwrite)
            return Trainer(config, checkpoint, texts, out_dir, eval_texts, resume, progress).run()
    finally:
        if started:
            dist.destroy_process_group()
