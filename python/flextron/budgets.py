"""A budget -> the routing that serves it.

A checkpoint written by router training (``flextron train --stage routers`` or ``joint``)
holds trained routers: a budget is then a latency target and the router picks each layer's
widths (static routers) or each token's (token routers). Any other elastic checkpoint has
its uniform sub-network table (measured at conversion): a budget is then the share of the
layer weights to keep, and the lowest-loss uniform sub-network that fits serves it.
``method="auto"`` takes the routers when there are some; ``"router"`` and ``"uniform"``
force one or the other.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from flextron.checkpoint import ROUTERS, CheckpointError, read_tensors
from flextron.model import ElasticConfig, ElasticLM, Routing
from flextron.routers import StaticRouter, TokenRouter, TokenRouting, load_router_state

RoutingMethod = Literal["auto", "router", "uniform"]
ROUTING_METHODS: tuple[str, ...] = get_args(RoutingMethod)


@dataclass(frozen=True)
class BudgetChoice:
    """The static sub-network picked for a budget (same choice in every layer)."""

    budget: float
    mlp: int
    attention: int
    active_fraction: float  # its layer weights / the full model's layer weights


@dataclass(frozen=True)
class UniformLoss:
    """The calibration loss of one uniform sub-network (same choices in every layer)."""

    mlp: int
    attention: int
    loss: float


def choices_for_budget(
    config: ElasticConfig, budget: float, losses: Sequence[UniformLoss] | None = None
) -> BudgetChoice:
    """The uniform static sub-network for ``budget``: its transformer-layer weights are at most
    ``budget`` times the full model's (embeddings and head excluded: they do not shrink).

    With ``losses`` (measured at conversion on calibration text, see
    :func:`flextron.conversion.uniform_losses`), the one with the lowest loss among those that
    fit; so a larger budget never picks a worse sub-network. Without, the largest that fits.
    Trained static routers (per-layer choices) replace this table.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    fractions = {
        (m, a): config.layer_fraction(m, a)
        for m, a in itertools.product(range(len(config.mlp_widths)), range(len(config.head_counts)))
    }
    best = lowest_loss_within(fractions, budget + 1e-9, losses or [])
    if best is None:
        raise ValueError(
            f"budget {budget} is below the smallest sub-network "
            f"({config.smallest_fraction():.3f} of the full layers)"
        )
    return BudgetChoice(budget, *best, fractions[best])


def lowest_loss_within(
    costs: dict[tuple[int, int], float], limit: float, losses: Sequence[UniformLoss]
) -> tuple[int, int] | None:
    """Among the uniform (MLP, attention) choices whose cost is at most ``limit``, the one
    with the lowest calibration loss; on equal (or unknown) losses the costliest, i.e. the
    widest. None if none fits."""
    loss_of = {(entry.mlp, entry.attention): entry.loss for entry in losses}
    fitting = [(loss_of.get(pair, math.inf), -cost, pair) for pair, cost in costs.items() if cost <= limit]
    return min(fitting)[2] if fitting else None


def stored_losses(record: dict[str, Any]) -> list[UniformLoss]:
    """The uniform sub-network losses saved in a checkpoint's metadata (checked when it was
    loaded; empty if none)."""
    return [UniformLoss(**entry) for entry in record.get("uniform_losses", [])]


@dataclass
class ServedBudget:
    """How one budget is served: the routing picked for it and by what. ``mlp_choices``/``attention_choices`` are per layer for
    static routings and None for a token router (each token decides while the model runs)."""

    budget: float
    method: str  # "uniform", "static router" or "token router"
    routing: Routing | TokenRouting
    mlp_choices: tuple[int, ...] | None
    attention_choices: tuple[int, ...] | None

    def widths(self, config: ElasticConfig) -> tuple[str, str]:
        """The MLP widths and head counts, summarized as ``"1536x20 1152x10"`` (value x layers)."""
        if self.mlp_choices is None or self.attention_choices is None:
            return "per token", "per token"
        return (
            summarize([config.mlp_widths[m] for m in self.mlp_choices]),
            summarize([config.head_counts[a] for a in self.attention_choices]),
        )

    def active_fraction(self, config: ElasticConfig) -> float:
        """The layer weights in use as a share of the full layers': per layer for static
        routings; for a token router, the mean over every token and layer it has routed so far."""
        if self.mlp_choices is not None and self.attention_choices is not None:
            fractions = [
                config.layer_fraction(m, a)
                for m, a in zip(self.mlp_choices, self.attention_choices, strict=True)
            ]
            return sum(fractions) / len(fractions)
        assert isinstance(self.routing, TokenRouting)
        if not self.routing.choices:
            raise RuntimeError("a token router's active fraction is known once it has routed a forward pass")
        table = torch.tensor(
            [
                [config.layer_fraction(m, a) for a in range(len(config.head_counts))]
                for m in range(len(config.mlp_widths))
            ]
        )
        total, count = 0.0, 0
        for mlp, attention in self.routing.choices:
            values = table[mlp.cpu(), attention.cpu()]
            total += values.sum().item()
            count += values.numel()
        return total / count


def summarize(values: Sequence[int]) -> str:
    counts = {v: list(values).count(v) for v in sorted(set(values), reverse=True)}
    return " ".join(f"{v}x{n}" for v, n in counts.items())


def router_metadata(record: dict[str, Any]) -> dict[str, Any] | None:
    """The routers a checkpoint's metadata describes (kind, budgets, hidden size), or None."""
    return record.get("routers")


def load_router(
    directory: str | Path, record: dict[str, Any], config: ElasticConfig, device: torch.device | str = "cpu"
) -> StaticRouter | TokenRouter | None:
    """The trained routers saved next to an elastic checkpoint, or None if it has none."""
    meta = router_metadata(record)
    if meta is None:
        return None
    path = Path(directory) / ROUTERS
    if not path.is_file():
        raise CheckpointError(f"{directory} describes routers but has no {ROUTERS}")
    kind = StaticRouter if meta["kind"] == "static" else TokenRouter  # checked by load_elastic
    router = kind(config, meta["budgets"], meta["hidden"])
    try:
        load_router_state(router, read_tensors(path, device))
    except RuntimeError as e:
        raise CheckpointError(
            f"{path} does not match the model's routers: {str(e).splitlines()[0]}"
        ) from None
    return router.to(device).eval()


class BudgetResolver:
    """Budgets -> routings for one model: with ``router`` (static or token), the router's
    choice; without, the lowest-loss uniform sub-network of ``losses`` that fits (see the
    module docstring). :meth:`for_checkpoint` builds one from a saved checkpoint."""

    def __init__(
        self,
        model: ElasticLM,
        router: StaticRouter | TokenRouter | None = None,
        losses: Sequence[UniformLoss] = (),
    ) -> None:
        self.config = model.config
        self.router = router
        self.losses = list(losses)

    @classmethod
    def for_checkpoint(
        cls,
        model: ElasticLM,
        record: dict[str, Any],
        directory: str | Path,
        method: RoutingMethod = "auto",
    ) -> BudgetResolver:
        """``record`` is the checkpoint's metadata (as :func:`flextron.load_elastic` returns it)."""
        if method not in ROUTING_METHODS:
            raise ValueError(f"routing must be one of {list(ROUTING_METHODS)}, got {method!r}")
        device = next(model.parameters()).device
        router = None if method == "uniform" else load_router(directory, record, model.config, device)
        if method == "router" and router is None:
            raise ValueError(
                f"{directory} has no trained routers (train them with `flextron train --stage routers`)"
            )
        return cls(model, router, stored_losses(record))

    @property
    def method(self) -> str:
        if self.router is None:
            return "uniform"
        return "token router" if isinstance(self.router, TokenRouter) else "static router"

    def __call__(self, budget: float) -> ServedBudget:
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        layers = self.config.num_layers
        if isinstance(self.router, StaticRouter):
            with torch.no_grad():
                output = self.router(budget)
            mlp, attention = tuple(output.mlp_choice), tuple(output.attention_choice)
            return ServedBudget(budget, self.method, Routing(list(mlp), list(attention)), mlp, attention)
        if isinstance(self.router, TokenRouter):
            self.router.encode(budget)  # a budget outside the trained range: a clear error now
            return ServedBudget(budget, self.method, self.router.route(budget), None, None)
        choice = choices_for_budget(self.config, budget, self.losses)
        mlp, attention = (choice.mlp,) * layers, (choice.attention,) * layers
        return ServedBudget(budget, self.method, Routing(list(mlp), list(attention)), mlp, attention)


def __getattr__(name: str) -> Any:
    if name == "BudgetRouting":  # the name before 0.2
        warnings.warn("BudgetRouting is deprecated: use ServedBudget", FutureWarning, stacklevel=2)
        return ServedBudget
    raise AttributeError(f"module 'flextron.budgets' has no attribute {name!r}")
