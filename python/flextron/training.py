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
import functools
import hashlib
import itertools
import math
import os
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
    latest_checkpoint,
    load_elastic,
    load_optimizer,
    load_tokenizer,
    optimizer_tensors,
    read_tensors,
    save_elastic,
)
from flextron.data import Text, token_windows
from flextron.distributed import average_gradients, full_state_dict, rank, world_size, wrap_parallel
from flextron.evaluation import evaluate_in_training
from flextron.latency import LatencyTable, measure
from flextron.model import ElasticLM
from flextron.outputs import DirectoryLock, atomic_save_tensors, atomic_write_json
from flextron.routers import StaticRouter, TokenRouter, load_router_state
from flextron.run_directory import (
    RunLog,
    TrainingState,
    check_resumable,
    check_same_data,
    prepare_run_directory,
    read_training_state,
    restore,
    save_checkpoint,
    write_training_state,
)
from flextron.runtime import DTYPE_NAMES, DtypeName, resolve_device, resolve_dtype
from flextron.stages import Batch, ElasticStage, JointStage, RouterStage, temperature
from flextron.surrogate import SurrogateTrainer

Stage = Literal["elastic", "routers", "joint"]
# Settings a resumed run may change; any other difference would not resume "exactly".


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
# The trainer


def router_signature(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint's metadata says of its routers (saved ones are reused if it matches)."""
    return {"kind": config.router, "budgets": list(config.budgets), "hidden": config.router_hidden}


def latency_table(
    config: TrainConfig, model: ElasticLM, progress: bool, resumed: Path | None
) -> LatencyTable:
    """The interrupted run's table (``resumed``, when it exists), else ``config.lut``'s, else
    one measured now; checked against the model."""
    if resumed is not None and resumed.is_file():
        return LatencyTable.load(resumed)  # the same table as the interrupted run
    if config.lut:
        table = LatencyTable.load(config.lut)
    else:
        table = measure(model, config.batch_size, config.seq_len, progress=progress)
    if table.num_layers != model.config.num_layers or len(table.mlp_ms) != len(model.config.mlp_widths):
        raise ValueError("the latency table was measured for another model (layers or width choices differ)")
    return table


def postfix(loss: float, info: dict[str, Any], tau: float) -> dict[str, str]:
    """The progress bar's figures: the loss, and for router stages the latency and temperature."""
    shown = {"loss": f"{loss:.3f}"}
    if "latency_ms" in info:
        shown |= {"lat": f"{info['latency_ms']:.1f}ms", "tau": f"{tau:.2f}"}
    return shown


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
        self.world, self.rank = world_size(), rank()
        self.device = resolve_device(config.device)
        self.start_step = 0
        resume_from = self._open(Path(checkpoint), resume)
        self._read_texts(texts, eval_texts, resume_from)
        self.router, router_loaded = self._build_router(resume_from or Path(checkpoint))
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
        if saved.is_file() and router_metadata(self.record) == router_signature(self.config):
            load_router_state(router, read_tensors(saved, self.device))
            return router, True
        return router, False

    def _trained_model(self) -> nn.Module:
        train_model = self.config.stage in ("elastic", "joint")
        self.model.requires_grad_(train_model)
        self.model.train(train_model)
        return wrap_parallel(self.model, self.config.parallel, self.device) if train_model else self.model

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
        saved = self.out_dir / "latency.json"
        resumed = saved if resume_from is not None and saved.is_file() else None
        with self._autocast():  # timed in the dtype the routed model will run in
            self.table = latency_table(self.config, self.model, self.progress, resumed)
        if self.rank == 0 and resumed is None:  # the interrupted run's table is already there
            self.table.save(saved)
        if not router_loaded:
            losses = stored_losses(self.record)
            starts = [uniform_start(self.table, budget, losses) for budget in self.router.encode.budgets]
            self.router.warm_start(starts, self.config.router_prior)
        if self.config.stage == "routers":
            self.surrogate = SurrogateTrainer.for_model(self.model.config, self.config.seed + 1)

    def _build_stage(self) -> ElasticStage | RouterStage | JointStage:
        config, autocast = self.config, self._autocast
        if config.stage == "elastic":
            teacher = copy.deepcopy(self.model).eval().requires_grad_(False) if "kl" in config.loss else None
            return ElasticStage(self.trained_model, config, self.model.config, teacher, autocast)
        if config.stage == "routers":
            return RouterStage(
                self.model, self.router, self.probe, self.surrogate, self.table, config, autocast
            )
        return JointStage(self.trained_model, self.router, self.table, config, autocast)

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
        if self.router is not None:
            average_gradients(self.router)  # the model's are reduced by DDP/FSDP
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            self.optimizer.step()
        return total, info

    def _autocast(self):
        dtype = resolve_dtype(self.config.dtype, self.device)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # -- evaluation and checkpoints -------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss (and, with routers, expected latency) per trained budget."""
        resolver = BudgetResolver(self.model, self.router, stored_losses(self.record))
        return evaluate_in_training(self.model, self.eval_batches, self.config.budgets, resolver, self.table)

    def _full_model_state(self) -> dict[str, Tensor] | None:
        """FSDP: the whole model's weights, gathered on every rank; else None (the model's own)."""
        fsdp = self.world > 1 and self.config.parallel == "fsdp" and self.trained_model is self.model
        return full_state_dict(self.model) if fsdp else None

    def save(self, step: int) -> Path | None:
        """Write ``checkpoint-<step+1>`` (an elastic checkpoint plus the training state)."""
        model_state = self._full_model_state()  # a collective: every rank takes part
        if self.rank != 0:
            return None
        write = functools.partial(self._write_checkpoint, step=step + 1, model_state=model_state)
        return save_checkpoint(self.out_dir, step + 1, self.config.keep_last, write)

    def _write_checkpoint(self, partial: Path, step: int, model_state: dict[str, Tensor] | None) -> None:
        metadata = {k: v for k, v in self.record.items() if k not in ("format", "version", "config")}
        metadata["training"] = {
            "stage": self.config.stage,
            "step": step,
            "config": asdict(self.config),
            "data": self.data_fingerprint,
        }
        if self.router is not None:
            metadata["routers"] = router_signature(self.config)
        save_elastic(self.model, partial, metadata, self.tokenizer, tensors=model_state)
        if self.router is not None:
            atomic_save_tensors(partial / ROUTERS, self.router.state_dict())
        state = TrainingState(step, self.result.losses, self.result.evaluations)
        state.optimizer = optimizer_tensors(self.optimizer) if model_state is None else None
        state.surrogate = self.surrogate.state_dict() if self.surrogate is not None else None
        write_training_state(partial, state)

    def _load_training_state(self, directory: Path) -> None:
        state = read_training_state(directory, self.device)
        if state.optimizer is None or (self.world > 1 and self.config.parallel == "fsdp"):
            raise CheckpointError(
                "resuming an FSDP run is not supported yet (its optimizer state is not saved)"
            )
        restore(directory / "optimizer.safetensors", lambda: load_optimizer(self.optimizer, *state.optimizer))
        if self.surrogate is not None and state.surrogate is not None:
            restore(
                directory / "surrogate.safetensors", lambda: self.surrogate.load_state_dict(*state.surrogate)
            )
        self.start_step = state.step
        self.result.losses, self.result.evaluations = state.losses, state.evaluations

    # -- the loop -------------------------------------------------------------------

    def run(self) -> TrainResult:
        """The loop: a step, its log line, an evaluation and a checkpoint when due."""
        config = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            atomic_write_json(self.out_dir / "train_config.json", asdict(config))
        log = RunLog(self.out_dir / "log.jsonl", self.rank == 0, self.start_step)
        steps = range(self.start_step, config.steps)
        bar = tqdm(steps, initial=self.start_step, total=config.steps, desc=f"train ({config.stage})",
                   disable=not self.progress or self.rank != 0)  # fmt: skip
        for step in bar:
            loss, info = self.step(step)
            self.result.losses.append(loss)
            bar.set_postfix(postfix(loss, info, temperature(config, step)))
            log.write({"step": step + 1, "loss": loss, **info})
            if self.eval_batches and self._due(config.eval_every, step):
                evaluation = {"step": step + 1, "budgets": self.evaluate()}
                self.result.evaluations.append(evaluation)
                log.write({"eval": evaluation})
            if self._due(config.save_every, step):
                self.save(step)
            if dist.is_initialized():
                dist.barrier()
        return self.result

    def _due(self, every: int, step: int) -> bool:
        """Every ``every`` steps (0: never) and at the last step."""
        return bool(every and (step + 1) % every == 0) or step + 1 == self.config.steps


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
