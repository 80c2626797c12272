"""The surrogate model: a small MLP from the routers' probabilities (all layers, both kinds,
concatenated) to the LM loss the model would have with that routing. It is trained online on
(router output, measured loss) pairs; routers learn from its prediction (differentiable in
the probabilities) only while its error on fresh samples is under a threshold.
"""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flextron.checkpoint import load_optimizer, optimizer_tensors
from flextron.model import ElasticConfig


class Surrogate(nn.Module):
    def __init__(self, features: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(-1)


class SurrogateTrainer:
    """Keeps the last ``capacity`` samples, fits the surrogate a few steps per new sample and
    tracks its relative error on each sample *before* fitting it (an honest running
    estimate: exponential average with ``error_decay``)."""

    def __init__(
        self,
        surrogate: Surrogate,
        lr: float = 3e-3,
        capacity: int = 512,
        steps_per_sample: int = 8,
        batch_size: int = 32,
        error_decay: float = 0.9,
    ) -> None:
        self.surrogate = surrogate
        self.optimizer = torch.optim.AdamW(surrogate.parameters(), lr=lr)
        self.samples: collections.deque[tuple[Tensor, float]] = collections.deque(maxlen=capacity)
        self.steps_per_sample = steps_per_sample
        self.batch_size = batch_size
        self.error_decay = error_decay
        self.error: float | None = None  # running relative error on unseen samples

    @classmethod
    def for_model(cls, config: ElasticConfig, seed: int) -> SurrogateTrainer:
        """A fresh surrogate (initialized from ``seed`` alone) for ``config``'s routers: one
        feature per layer and width choice of each kind."""
        features = config.num_layers * (len(config.mlp_widths) + len(config.head_counts))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(Surrogate(features))

    def observe(self, features: Tensor, loss: float, generator: torch.Generator | None = None) -> float:
        """Add one (features, measured loss) pair and fit; returns the mean fit loss."""
        features = features.detach().float().cpu()
        with torch.no_grad():
            predicted = float(self.surrogate(features))
        relative = abs(predicted - loss) / max(abs(loss), 1e-6)
        self.error = (
            relative
            if self.error is None
            else self.error_decay * self.error + (1 - self.error_decay) * relative
        )
        self.samples.append((features, float(loss)))
        fit = 0.0
        for _ in range(self.steps_per_sample):
            picks = torch.randint(
                len(self.samples), (min(self.batch_size, len(self.samples)),), generator=generator
            )
            x = torch.stack([self.samples[i][0] for i in picks.tolist()])
            y = torch.tensor([self.samples[i][1] for i in picks.tolist()])
            step_loss = F.mse_loss(self.surrogate(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            self.optimizer.step()
            fit += step_loss.item()
        return fit / self.steps_per_sample

    def ready(self, threshold: float) -> bool:
        return self.error is not None and self.error < threshold

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)``: the network, its optimizer and the kept samples as tensors;
        the optimizer's non-tensor state and the running error as JSON-able values."""
        tensors = {f"net.{k}": v for k, v in self.surrogate.state_dict().items()}
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors |= {f"optimizer.{k}": v for k, v in opt_tensors.items()}
        if self.samples:
            tensors["samples.features"] = torch.stack([f for f, _ in self.samples])
            tensors["samples.losses"] = torch.tensor([loss for _, loss in self.samples], dtype=torch.float64)
        return tensors, {"error": self.error, "optimizer": opt_meta}

    def load_state_dict(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a mismatch raises KeyError, TypeError,
        ValueError or RuntimeError)."""
        self.surrogate.load_state_dict(
            {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
        )
        opt_tensors = {
            k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")
        }
        load_optimizer(self.optimizer, opt_tensors, meta["optimizer"])
        self.samples.clear()
        if "samples.features" in tensors:
            pairs = zip(tensors["samples.features"], tensors["samples.losses"].tolist(), strict=True)
            self.samples.extend((f, loss) for f, loss in pairs)
        self.error = None if meta["error"] is None else float(meta["error"])
