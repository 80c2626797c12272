"""The three training stages (flextron.training runs one of them), each an object with
``loss(batch, step) -> (loss, info)``:

- :class:`ElasticStage`: a random sub-network per micro-batch (whole model or uniform or
  per-layer choices), LM loss and/or KL to the frozen full model.
- :class:`RouterStage`: the model frozen; the routers learn from a surrogate of the LM loss
  (fit online on a fixed probe batch) plus a latency term, and wait for the surrogate to be
  accurate enough.
- :class:`JointStage`: model and routers together, LM loss + the latency term.

``info`` holds what the log records (``lm_loss``, ``latency_ms``, ``budget``, surrogate
fit and error).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flextron.distributed import gather_samples
from flextron.evaluation import next_token_loss
from flextron.latency import LatencyTable
from flextron.model import ElasticConfig, Routing
from flextron.routers import RouterOutput, StaticRouter, TokenRouter, TokenRouting
from flextron.surrogate import SurrogateTrainer

if TYPE_CHECKING:
    from flextron.training import TrainConfig

Autocast = Callable[[], AbstractContextManager]


@dataclass
class Batch:
    """One micro-batch: its token windows (None for the router stage, which reads its fixed
    probe batch) and the generators of its random draws (reproducible on resume)."""

    ids: Tensor | None
    sample: torch.Generator  # sub-networks, budgets, surrogate batches
    noise: torch.Generator  # the routers' Gumbel noise


def temperature(config: TrainConfig, step: int) -> float:
    """Exponential annealing from ``temperature_start`` to ``temperature_end``."""
    fraction = step / max(1, config.steps - 1)
    return config.temperature_start * (config.temperature_end / config.temperature_start) ** fraction


def sample_subnetwork(
    config: TrainConfig, model_config: ElasticConfig, generator: torch.Generator
) -> Routing:
    layers = model_config.num_layers
    if torch.rand((), generator=generator) < config.p_full:
        return Routing.uniform(layers)
    mlp_choices, head_counts = len(model_config.mlp_widths), len(model_config.head_counts)
    count = 1 if config.sample == "global" else layers
    mlp = torch.randint(mlp_choices, (count,), generator=generator).tolist()
    attention = torch.randint(head_counts, (count,), generator=generator).tolist()
    if count == 1:
        return Routing.uniform(layers, mlp[0], attention[0])
    return Routing(mlp, attention)


def kl_to_teacher(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    student = F.log_softmax(logits[:, :-1].float(), dim=-1).flatten(0, 1)
    teacher = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1).flatten(0, 1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def routing_from(output: RouterOutput) -> Routing:
    return Routing(output.mlp_choice, output.attention_choice, output.mlp_scale, output.attention_scale)


def latency_penalty(table: LatencyTable, output: RouterOutput, budget: float) -> tuple[Tensor, Tensor]:
    """``|expected latency / target - 1|`` and the expected latency (ms) of the routers'
    probabilities on the latency table."""
    expected = table.expected_ms(output.mlp_probs, output.attention_probs, output.per_token)
    return (expected / (budget * table.full_ms()) - 1).abs(), expected


def pick_budget(budgets: tuple[float, ...], generator: torch.Generator) -> float:
    return budgets[int(torch.randint(len(budgets), (), generator=generator))]


def route(
    router: StaticRouter | TokenRouter, budget: float, tau: float, generator: torch.Generator
) -> tuple[Routing | TokenRouting, RouterOutput | None]:
    """A sampled routing; a static router's output now, a token router's once the model ran."""
    if isinstance(router, StaticRouter):
        output = router(budget, tau, generator)
        return routing_from(output), output
    return router.route(budget, tau, generator), None


class ElasticStage:
    needs_batch = True

    def __init__(
        self, model: nn.Module, config: TrainConfig, model_config: ElasticConfig, teacher, autocast: Autocast
    ) -> None:
        self.model, self.config, self.model_config = model, config, model_config
        self.teacher, self.autocast = teacher, autocast

    def loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, Any]]:
        routing = sample_subnetwork(self.config, self.model_config, batch.sample)
        with self.autocast():
            logits = self.model(batch.ids, routing)
            loss = next_token_loss(logits, batch.ids) if "ce" in self.config.loss else logits.new_zeros(())
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(batch.ids)
                loss = loss + kl_to_teacher(logits, teacher_logits)
        return loss, {}


class RouterStage:
    needs_batch = False

    def __init__(
        self,
        model: nn.Module,
        router: StaticRouter | TokenRouter,
        probe: Tensor,
        surrogate: SurrogateTrainer,
        table: LatencyTable,
        config: TrainConfig,
        autocast: Autocast,
    ) -> None:
        self.model, self.router, self.probe, self.surrogate = model, router, probe, surrogate
        self.table, self.config, self.autocast = table, config, autocast

    def loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, Any]]:
        # The frozen model's loss is measured on one fixed probe batch, so that it depends on
        # the routing alone and the surrogate can learn it (batch-to-batch noise would not fit).
        budget = pick_budget(self.config.budgets, batch.sample)
        routing, output = route(self.router, budget, temperature(self.config, step), batch.noise)
        with torch.no_grad() if output is not None else torch.enable_grad(), self.autocast():
            measured = next_token_loss(self.model(self.probe, routing), self.probe).item()
        output = output or routing.output()
        fit = 0.0
        for features, loss in gather_samples(output.features().detach(), measured):
            fit = self.surrogate.observe(features, loss, generator=batch.sample)
        penalty, expected = latency_penalty(self.table, output, budget)
        info = {"lm_loss": measured, "latency_ms": expected.item(), "budget": budget, "surrogate_fit": fit}
        info["surrogate_error"] = self.surrogate.error or 0.0
        if not self.surrogate.ready(self.config.surrogate_threshold):
            return penalty.detach(), info  # routers wait for a surrogate they can trust
        predicted = self.surrogate.surrogate(output.features().float())
        return predicted + self.config.latency_weight * penalty, info


class JointStage:
    needs_batch = True

    def __init__(
        self,
        model: nn.Module,
        router: StaticRouter | TokenRouter,
        table: LatencyTable,
        config: TrainConfig,
        autocast: Autocast,
    ) -> None:
        self.model, self.router, self.table, self.config, self.autocast = (
            model,
            router,
            table,
            config,
            autocast,
        )

    def loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, Any]]:
        budget = pick_budget(self.config.budgets, batch.sample)
        routing, output = route(self.router, budget, temperature(self.config, step), batch.noise)
        with self.autocast():
            loss = next_token_loss(self.model(batch.ids, routing), batch.ids)
        output = output or routing.output()
        penalty, expected = latency_penalty(self.table, output, budget)
        info = {"lm_loss": loss.item(), "latency_ms": expected.item(), "budget": budget}
        return loss + self.config.latency_weight * penalty, info
