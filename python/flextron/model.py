"""An elastic causal language model: Llama-family (RMSNorm, RoPE, SwiGLU, GQA) or GPT-2
(LayerNorm, learned positions, GELU), built from ElasticAttention and ElasticMLP.

Every layer's width is chosen per call by a :class:`Routing`: for each layer and kind (MLP,
attention) an ``int`` (static), a tensor ``[B]`` (per sequence) or ``[B, S]`` (per token),
each indexing that kind's width choices.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from flextron.kv_cache import KVCache, default_positions
from flextron.layers import ElasticAttention, ElasticMLP
from flextron.ops import ACTIVATIONS
from flextron.rope import RopeScaling, RotaryEmbedding

Architecture = Literal["llama", "gpt2"]
Choice = int | Tensor


@dataclass
class ElasticConfig:
    """Shapes and width choices of an elastic model (saved as JSON with its checkpoint)."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    mlp_widths: tuple[int, ...]
    head_counts: tuple[int, ...]
    max_positions: int = 2048
    norm_eps: float = 1e-5
    activation: str = "swiglu"
    rope_theta: float | None = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        self.mlp_widths = tuple(int(w) for w in self.mlp_widths)
        self.head_counts = tuple(int(h) for h in self.head_counts)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.architecture not in ("llama", "gpt2"):
            raise ValueError(f"architecture must be 'llama' or 'gpt2', got {self.architecture!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.mlp_widths or self.mlp_widths[0] != self.intermediate_size:
            raise ValueError(
                f"mlp_widths must start with the full intermediate_size {self.intermediate_size}, "
                f"got {list(self.mlp_widths)}"
            )
        if not self.head_counts or self.head_counts[0] != self.num_heads:
            raise ValueError(
                f"head_counts must start with the full head count {self.num_heads}, got {list(self.head_counts)}"
            )
        if self.architecture == "gpt2" and self.rope_theta is not None:
            raise ValueError("gpt2 uses learned positions: rope_theta must be None")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mlp_widths"] = list(self.mlp_widths)
        data["head_counts"] = list(self.head_counts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ElasticConfig:
        data = dict(data)
        if "head_choices" in data and "head_counts" not in data:  # checkpoints before the rename
            data["head_counts"] = data.pop("head_choices")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ElasticConfig fields: {unknown}")
        return cls(**data)

    @property
    def head_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_fraction(self, mlp_choice: int, attention_choice: int) -> float:
        """A layer's weights at these choices, as a share of the full layer's."""
        full = self.layer_params(self.mlp_widths[0], self.head_counts[0])
        return self.layer_params(self.mlp_widths[mlp_choice], self.head_counts[attention_choice]) / full

    def smallest_fraction(self) -> float:
        return self.layer_fraction(len(self.mlp_widths) - 1, len(self.head_counts) - 1)

    def layer_params(self, mlp_width: int, heads: int) -> int:
        """Weights one transformer layer uses at these widths (K/V always for all KV heads)."""
        hidden, head_dim = self.hidden_size, self.head_dim
        attention = hidden * (2 * self.num_kv_heads + heads) * head_dim + heads * head_dim * hidden
        mlp = (3 if self.activation == "swiglu" else 2) * hidden * mlp_width
        return attention + mlp


@dataclass
class LayerRoute:
    """One layer's choices (and optional output scales), as :meth:`ElasticLM.forward` uses them."""

    mlp: Choice
    attention: Choice
    mlp_scale: Tensor | None = None
    attention_scale: Tensor | None = None


class DynamicRouting(Protocol):
    """A routing decided while the model runs, from each layer's input hidden states
    ``[B, S, H]`` (token routers)."""

    def layer(self, index: int, x: Tensor) -> LayerRoute: ...


@dataclass
class Routing:
    """Per-layer width choices: ``mlp[i]`` indexes ``config.mlp_widths`` and ``attention[i]``
    indexes ``config.head_counts`` for layer ``i`` (an int, a ``[B]`` or a ``[B, S]``
    tensor). ``mlp_scale[i]`` / ``attention_scale[i]`` (optional: a scalar tensor for the
    layer, or ``[B, S]`` per token) multiply that block's output: a router's probability of
    its choice, which is 1 in the forward pass with straight-through Gumbel-softmax and
    carries the router's gradient."""

    mlp: Sequence[Choice]
    attention: Sequence[Choice]
    mlp_scale: Sequence[Tensor | None] | None = None
    attention_scale: Sequence[Tensor | None] | None = None

    @classmethod
    def uniform(cls, num_layers: int, mlp: Choice = 0, attention: Choice = 0) -> Routing:
        return cls([mlp] * num_layers, [attention] * num_layers)

    def check(self, num_layers: int) -> None:
        lengths = [len(self.mlp), len(self.attention)]
        lengths += [len(s) for s in (self.mlp_scale, self.attention_scale) if s is not None]
        if any(n != num_layers for n in lengths):
            raise ValueError(
                f"routing needs one MLP and one attention choice per layer ({num_layers}), "
                f"got {len(self.mlp)} and {len(self.attention)}"
            )

    def layer(self, index: int, x: Tensor) -> LayerRoute:
        return LayerRoute(
            self.mlp[index],
            self.attention[index],
            self.mlp_scale[index] if self.mlp_scale is not None else None,
            self.attention_scale[index] if self.attention_scale is not None else None,
        )

    def is_static(self) -> bool:
        return all(isinstance(c, int) for c in itertools.chain(self.mlp, self.attention))


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalized in fp32, scaled in the input dtype (as Hugging Face does)."""

    def __init__(self, size: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Block(nn.Module):
    def __init__(self, config: ElasticConfig, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        norm = (
            (lambda: RMSNorm(config.hidden_size, config.norm_eps, **factory))
            if config.architecture == "llama"
            else (lambda: nn.LayerNorm(config.hidden_size, eps=config.norm_eps, **factory))
        )
        self.attention_norm = norm()
        self.attention = ElasticAttention(
            config.hidden_size,
            config.num_heads,
            config.head_counts,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            qkv_bias=config.qkv_bias,
            out_bias=config.out_bias,
            rope_theta=None,  # the model shares one RotaryEmbedding across layers
            **factory,
        )
        self.mlp_norm = norm()
        self.mlp = ElasticMLP(
            config.hidden_size,
            config.intermediate_size,
            config.mlp_widths,
            activation=config.activation,  # type: ignore[arg-type]
            bias=config.mlp_bias,
            **factory,
        )

    def forward(
        self,
        x: Tensor,
        route: LayerRoute,
        attention_mask: Tensor | None,
        cache: KVCache | None,
        rotary: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        attended = self.attention(
            self.attention_norm(x),
            route.attention,
            attention_mask=attention_mask,
            cache=cache,
            position_embeddings=rotary,
        )
        x = x + _scaled(attended, route.attention_scale)
        return x + _scaled(self.mlp(self.mlp_norm(x), route.mlp), route.mlp_scale)


def _scaled(y: Tensor, scale: Tensor | None) -> Tensor:
    if scale is None:
        return y
    return y * (scale[..., None] if scale.dim() else scale).to(y.dtype)


class ElasticLM(nn.Module):
    """A nested elastic causal LM. ``forward(input_ids, routing)`` -> logits ``[B, S, vocab]``."""

    def __init__(self, config: ElasticConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **factory)
        self.embed_positions = (
            nn.Embedding(config.max_positions, config.hidden_size, **factory)
            if config.architecture == "gpt2"
            else None
        )
        self.rotary = (
            RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling).to(device)
            if config.rope_theta is not None
            else None
        )
        self.layers = nn.ModuleList(Block(config, **factory) for _ in range(config.num_layers))
        self.norm = (
            RMSNorm(config.hidden_size, config.norm_eps, **factory)
            if config.architecture == "llama"
            else nn.LayerNorm(config.hidden_size, eps=config.norm_eps, **factory)
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def finish_loading(self, device: torch.device | str) -> None:
        """After weights were assigned into a model built on the meta device: move it to
        ``device``, tie the output head and rebuild the buffers that are not saved."""
        for module in self.modules():
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(device)

    def new_caches(self, batch_size: int, max_length: int) -> list[KVCache]:
        return [layer.attention.new_cache(batch_size, max_length) for layer in self.layers]

    def forward(
        self,
        input_ids: Tensor,
        routing: Routing | DynamicRouting | None = None,
        *,
        attention_mask: Tensor | None = None,
        caches: Sequence[KVCache] | None = None,
        position_ids: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """``input_ids [B, S]``; ``attention_mask [B, S]`` marks real tokens (left padding for
        batches of different lengths); ``caches`` (from :meth:`new_caches`) hold earlier
        tokens and get these appended. Returns logits, and with ``output_hidden_states``
        also each layer's input hidden states (what token routers read)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        config = self.config
        routing = routing or Routing.uniform(config.num_layers)
        if isinstance(routing, Routing):
            routing.check(config.num_layers)
        if caches is not None and len(caches) != config.num_layers:
            raise ValueError(
                f"caches must hold one KVCache per layer ({config.num_layers}), got {len(caches)}"
            )
        batch, steps = input_ids.shape
        if position_ids is None:
            cache = caches[0] if caches else None
            position_ids = default_positions(attention_mask, cache, batch, steps, input_ids.device)
            # A position is at most its slot, known on the host: read the positions (a device
            # sync) only when the slots run past max_positions.
            slots = (cache.length if cache is not None else 0) + steps
            beyond = slots > config.max_positions and int(position_ids.max()) >= config.max_positions
        else:  # given positions are checked as given
            beyond = int(position_ids.max()) >= config.max_positions
        x = self.embed_tokens(input_ids)
        rotary = None
        if self.embed_positions is not None:
            if beyond:
                raise ValueError(f"positions exceed max_positions {config.max_positions}")
            x = x + self.embed_positions(position_ids)
        if self.rotary is not None:
            rotary = self.rotary(position_ids)
        hidden_states = []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x)
            x = layer(
                x,
                routing.layer(i, x),
                attention_mask,
                caches[i] if caches is not None else None,
                rotary,
            )
        logits = self.lm_head(self.norm(x))
        return (logits, hidden_states) if output_hidden_states else logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        routing: Routing | DynamicRouting | None = None,
        *,
        attention_mask: Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``input_ids [B, S]`` (left-padded, see ``attention_mask``) by up to
        ``max_new_tokens``: greedy at ``temperature=0``, else sampling (optionally from the
        ``top_k`` most likely). ``routing`` must be static or per sequence (a per-token
        routing belongs to one sequence length). Sequences that emitted ``eos_token_id``
        are padded with it. Returns ``[B, S + new]``."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        routing = routing or Routing.uniform(self.config.num_layers)
        if isinstance(routing, Routing):
            for choice in itertools.chain(routing.mlp, routing.attention):
                if isinstance(choice, Tensor) and choice.dim() != 1:
                    raise ValueError(
                        "generate needs a static or per-sequence routing (ints or [B] tensors), or token routers"
                    )
        batch, prompt = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        caches = self.new_caches(batch, prompt + max_new_tokens) if use_cache else None
        tokens, mask = input_ids, attention_mask
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        step_input, step_mask = tokens, mask
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(step_input, routing, attention_mask=step_mask, caches=caches)
            else:
                logits = self(tokens, routing, attention_mask=mask)
            next_token = self._pick(logits[:, -1].float(), temperature, top_k, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            step_input, step_mask = next_token[:, None], torch.ones_like(next_token)[:, None]
            tokens = torch.cat([tokens, step_input], dim=1)
            mask = torch.cat([mask, step_mask], dim=1)
            if eos_token_id is not None and bool(finished.all()):
                break
        return tokens

    @staticmethod
    def _pick(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    def num_parameters(self) -> int:
        """All the model's parameters (:meth:`active_parameters`: a static routing's)."""
        return sum(p.numel() for p in self.parameters())

    def active_parameters(self, mlp_choices: Sequence[int], attention_choices: Sequence[int]) -> int:
        """Parameters a static routing uses (one MLP and one head choice per layer)."""
        config = self.config
        full_layer = config.layer_params(config.mlp_widths[0], config.head_counts[0])
        dropped = sum(
            full_layer - config.layer_params(config.mlp_widths[m], config.head_counts[a])
            for m, a in zip(mlp_choices, attention_choices, strict=True)
        )
        return self.num_parameters() - dropped
