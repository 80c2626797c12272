"""Routers: they pick each layer's MLP width and head count for a latency budget.

- :class:`StaticRouter`: budget encoding -> 2-layer MLP -> logits per layer and kind (one
  choice per layer for the whole input).
- :class:`TokenRouter`: per layer, the token's hidden state + the budget encoding -> logits
  per token (each token its own widths).

Training samples choices with Gumbel-softmax at a temperature, hard top-1 in the forward
pass and the soft probabilities' gradient (straight-through); the chosen probability (1 in
the forward pass) scales the block's output so the LM loss reaches the router. Inference
takes the argmax.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from flextron.model import ElasticConfig, LayerRoute


class BudgetEncoding:
    """One-hot over the trained budgets; a budget between two of them is their linear blend."""

    def __init__(self, budgets: Sequence[float]) -> None:
        values = sorted(float(b) for b in budgets)
        if not values or any(not 0 < b <= 1 for b in values) or len(set(values)) != len(values):
            raise ValueError(f"budgets must be distinct values in (0, 1], got {list(budgets)}")
        self.budgets = tuple(values)

    def __len__(self) -> int:
        return len(self.budgets)

    def __call__(self, budget: float, device=None) -> Tensor:
        lo, hi = self.budgets[0], self.budgets[-1]
        if not lo - 1e-9 <= budget <= hi + 1e-9:
            raise ValueError(f"budget {budget} is outside the trained range [{lo}, {hi}]")
        encoding = torch.zeros(len(self.budgets), device=device)
        right = min(bisect.bisect_left(self.budgets, budget - 1e-9), len(self.budgets) - 1)
        if abs(self.budgets[right] - budget) < 1e-9 or right == 0:
            encoding[right] = 1.0
            return encoding
        left = right - 1
        weight = (budget - self.budgets[left]) / (self.budgets[right] - self.budgets[left])
        encoding[left], encoding[right] = 1 - weight, weight
        return encoding


def gumbel_choice(
    logits: Tensor, temperature: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(choice, scale, probs)``: a hard Gumbel-softmax sample over the last dimension, the
    straight-through value of the chosen entry (exactly 1 forward, the soft probability's
    gradient backward) and the soft probabilities."""
    uniform = torch.rand(
        logits.shape, generator=generator, device=logits.device if generator is None else "cpu"
    )
    exponential = (-torch.log(uniform.to(logits.device).clamp_min(1e-20))).clamp_min(1e-20)
    gumbel = -torch.log(exponential)
    probs = F.softmax((logits + gumbel.to(logits.dtype)) / temperature, dim=-1)
    choice = probs.argmax(dim=-1)
    chosen = probs.gather(-1, choice[..., None]).squeeze(-1)
    scale = chosen - chosen.detach() + 1.0
    return choice, scale, probs


@dataclass
class RouterOutput:
    """Per layer: MLP and attention choices (ints or tensors), straight-through scales (or
    None at inference) and probabilities ``[layers, choices]`` (averaged over tokens for
    token routers) for the latency table and the surrogate model."""

    mlp_choice: list
    attention_choice: list
    mlp_scale: list
    attention_scale: list
    mlp_probs: Tensor
    attention_probs: Tensor
    per_token: bool = False  # a token router's: layers mix widths across tokens

    def features(self) -> Tensor:
        """The surrogate model's input: all layers' probabilities, concatenated."""
        return torch.cat([self.mlp_probs.flatten(), self.attention_probs.flatten()])


def prior_logits(
    layers: int, mlp_choices: int, attention_choices: int, starts: Sequence[tuple[int, int]], margin: float
) -> Tensor:
    """``[budgets, layers, mlp_choices + attention_choices]``: ``margin`` on each budget's
    starting (MLP, attention) choice in every layer, 0 elsewhere."""
    prior = torch.zeros(len(starts), layers, mlp_choices + attention_choices)
    for b, (mlp, attention) in enumerate(starts):
        prior[b, :, mlp] = margin
        prior[b, :, mlp_choices + attention] = margin
    return prior


def load_router_state(router: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load saved router weights; routers saved before the prior existed get a zero prior
    (what they computed)."""
    tensors = dict(tensors)
    if "prior" not in tensors:
        tensors["prior"] = torch.zeros_like(router.prior)
    router.load_state_dict(tensors)


class BudgetRouter(nn.Module):
    """What both routers share: the budget encoding, the choice counts per layer and a
    per-budget prior on the logits (zero: no preference; :meth:`warm_start` sets it)."""

    def __init__(self, config: ElasticConfig, budgets: Sequence[float]) -> None:
        super().__init__()
        self.encode = BudgetEncoding(budgets)
        self.layers = config.num_layers
        self.mlp_choices, self.attention_choices = len(config.mlp_widths), len(config.head_counts)

    def _add_prior(self) -> None:
        # Registered after the subclass's nets: saved optimizer states index parameters in order.
        width = self.mlp_choices + self.attention_choices
        self.prior = nn.Parameter(torch.zeros(len(self.encode), self.layers, width))

    def warm_start(self, starts: Sequence[tuple[int, int]], margin: float) -> None:
        """Start each budget (in :attr:`encode` order, ascending) from one uniform choice."""
        with torch.no_grad():
            self.prior.copy_(
                prior_logits(self.layers, self.mlp_choices, self.attention_choices, starts, margin)
            )


class StaticRouter(BudgetRouter):
    """Budget -> one MLP choice and one head choice per layer.

    The logits are a 2-layer MLP of the budget encoding plus a per-budget prior (a bias per
    trained budget, blended like the encoding). The prior starts at zero (no preference) or,
    with :meth:`warm_start`, on a chosen sub-network per budget.
    """

    def __init__(self, config: ElasticConfig, budgets: Sequence[float], hidden: int = 64) -> None:
        super().__init__(config, budgets)
        width = self.mlp_choices + self.attention_choices
        self.net = nn.Sequential(
            nn.Linear(len(self.encode), hidden), nn.ReLU(), nn.Linear(hidden, self.layers * width)
        )
        self._add_prior()
        with torch.no_grad():  # no preference at the start: every choice gets explored
            self.net[-1].bias.zero_()

    def logits(self, budget: float) -> tuple[Tensor, Tensor]:
        encoding = self.encode(budget, self.prior.device)
        out = self.net(encoding).view(self.layers, -1) + torch.einsum("b,blc->lc", encoding, self.prior)
        return out[:, : self.mlp_choices], out[:, self.mlp_choices :]

    def forward(self, budget: float, temperature: float | None = None, generator=None) -> RouterOutput:
        """Sample (training, ``temperature`` given) or take the argmax (inference)."""
        mlp_logits, attention_logits = self.logits(budget)
        if temperature is None:
            mlp_choice, attention_choice = mlp_logits.argmax(-1), attention_logits.argmax(-1)
            return RouterOutput(
                mlp_choice.tolist(),
                attention_choice.tolist(),
                [None] * self.layers,
                [None] * self.layers,
                F.softmax(mlp_logits, -1),
                F.softmax(attention_logits, -1),
            )
        mlp_choice, mlp_scale, mlp_probs = gumbel_choice(mlp_logits, temperature, generator)
        attention_choice, attention_scale, attention_probs = gumbel_choice(
            attention_logits, temperature, generator
        )
        return RouterOutput(
            mlp_choice.tolist(),
            attention_choice.tolist(),
            list(mlp_scale),
            list(attention_scale),
            mlp_probs,
            attention_probs,
        )


class TokenRouter(BudgetRouter):
    """Per layer: hidden state of each token + budget encoding -> its MLP and head choices,
    plus a per-budget prior as in :class:`StaticRouter`."""

    def __init__(self, config: ElasticConfig, budgets: Sequence[float], hidden: int = 64) -> None:
        super().__init__(config, budgets)
        self.nets = nn.ModuleList(
            nn.Sequential(
                nn.Linear(config.hidden_size + len(self.encode), hidden),
                nn.ReLU(),
                nn.Linear(hidden, self.mlp_choices + self.attention_choices),
            )
            for _ in range(config.num_layers)
        )
        self._add_prior()
        with torch.no_grad():
            for net in self.nets:
                net[-1].bias.zero_()

    def route(self, budget: float, temperature: float | None = None, generator=None) -> TokenRouting:
        return TokenRouting(self, budget, temperature, generator)


class TokenRouting:
    """A routing decided layer by layer from the hidden states (see ElasticLM.forward);
    records what it chose, for the latency table and the surrogate."""

    def __init__(self, router: TokenRouter, budget: float, temperature: float | None, generator) -> None:
        self.router, self.budget, self.temperature, self.generator = router, budget, temperature, generator
        self.mlp_probs: list[Tensor] = []
        self.attention_probs: list[Tensor] = []
        self.choices: list[tuple[Tensor, Tensor]] = []  # per layer of each pass: (mlp, attention) [B, S]

    def layer(self, index: int, x: Tensor) -> LayerRoute:
        net = self.router.nets[index]
        budget = self.router.encode(self.budget, x.device)
        encoding = budget.to(x.dtype).expand(*x.shape[:-1], -1)
        logits = net(torch.cat([x.detach(), encoding], dim=-1)).float() + budget @ self.router.prior[:, index]
        mlp_logits, attention_logits = (
            logits[..., : self.router.mlp_choices],
            logits[..., self.router.mlp_choices :],
        )
        if self.temperature is None:
            self.mlp_probs.append(F.softmax(mlp_logits, -1).flatten(0, -2).mean(0))
            self.attention_probs.append(F.softmax(attention_logits, -1).flatten(0, -2).mean(0))
            route = LayerRoute(mlp_logits.argmax(-1), attention_logits.argmax(-1))
            self.choices.append((route.mlp, route.attention))
            return route
        mlp_choice, mlp_scale, mlp_probs = gumbel_choice(mlp_logits, self.temperature, self.generator)
        attention_choice, attention_scale, attention_probs = gumbel_choice(
            attention_logits, self.temperature, self.generator
        )
        self.mlp_probs.append(mlp_probs.flatten(0, -2).mean(0))
        self.attention_probs.append(attention_probs.flatten(0, -2).mean(0))
        self.choices.append((mlp_choice, attention_choice))
        return LayerRoute(mlp_choice, attention_choice, mlp_scale, attention_scale)

    def output(self) -> RouterOutput:
        """After one or more forward passes: each layer's probabilities, averaged over tokens
        and passes (``[layers, choices]``)."""
        layers = len(self.router.nets)
        if not self.mlp_probs or len(self.mlp_probs) % layers:
            raise RuntimeError("TokenRouting.output() needs at least one complete forward pass")
        mlp = torch.stack(self.mlp_probs).view(-1, layers, self.router.mlp_choices).mean(0)
        attention = torch.stack(self.attention_probs).view(-1, layers, self.router.attention_choices).mean(0)
        return RouterOutput([], [], [], [], mlp, attention, per_token=True)
