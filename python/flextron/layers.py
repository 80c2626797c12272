"""Elastic layers built on flextron's ops. A layer holds the full-width weights; a forward
pass picks the width per token, per sequence, or for the whole layer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from flextron.attention import (
    band_sequences,
    banded_attention,
    causal_mask,
    token_routed_flex_attention,
    valid_mask,
)
from flextron.kv_cache import KVCache, default_positions
from flextron.ops import (
    ACTIVATIONS,
    Activation,
    check_widths,
    elastic_mlp,
    nested_activation,
    nested_linear_k,
    nested_linear_n,
    permute,
    route_plan,
    unpermute,
)
from flextron.rope import RopeScaling, RotaryEmbedding, apply_rotary

# A call's position_ids [B, S] and precomputed (cos, sin); either may be None.
Positions = tuple[Tensor | None, tuple[Tensor, Tensor] | None]

# Per-token routing pays only where the routed kernels beat computing every token at full
# width and masking what it does not use: the token count from which each layer kind takes
# the routed path, per device type. Measured on the CPU (SmolLM2-135M layer shapes, fp32, 2
# threads; docs/kernels.md, "Token routing"): the routed MLP is 0.94x full width at 4 tokens,
# 0.77x at 256, 0.60x at 1024, the masked one about 1.0x; routed attention with SDPA is
# 1.10-1.54x full width at every token count (its core attention runs every head band over
# all queries, and the routing costs more than the query/output projections it saves), the
# masked one 0.96-1.07x. On CUDA the nested GEMMs switch to a dense masked GEMM for small
# token counts themselves (dense_rows_limit); attention follows the CPU's rule until the GPU
# check measures it.
NEVER = 2**62
ROUTED_MIN_TOKENS: dict[str, dict[str, int]] = {
    "mlp": {"cpu": 4, "cuda": 0},
    "attention": {"cpu": NEVER, "cuda": NEVER},
}


def routes(kind: str, tokens: int, device: torch.device, routed_min_tokens: int | None) -> bool:
    """Whether a per-token call of a ``kind`` layer (``"mlp"``, ``"attention"``) over
    ``tokens`` tokens takes the routed path: from ``routed_min_tokens`` on (a layer's
    override), else from the device's default in ROUTED_MIN_TOKENS."""
    if routed_min_tokens is None:
        routed_min_tokens = ROUTED_MIN_TOKENS[kind].get(device.type, 0)
    return tokens >= routed_min_tokens


def look_up(values: Tensor, choice: Tensor) -> Tensor:
    """``values[choice]``. On the CPU a choice out of range is the ValueError route_plan
    raises; on a GPU (and in compiled code) the indexing's own check (a host check would
    sync or break the graph)."""
    if choice.device.type == "cpu" and choice.numel() and not torch.compiler.is_compiling():
        low, high = int(choice.min()), int(choice.max())
        if low < 0 or high >= len(values):
            raise ValueError(f"choice values must be in [0, {len(values)}), got {low if low < 0 else high}")
    return values[choice]


class ElasticMLP(nn.Module):
    """A nested MLP: width choice ``g`` uses the first ``widths[g]`` hidden neurons.

    ``activation="swiglu"`` is the Llama MLP (gate, up, down; no biases by default);
    ``"gelu"``/``"gelu_tanh"`` the GPT-2 MLP (up with bias, down with bias).

    Routing, by the type of ``choice`` in :meth:`forward`:

    - ``int``: one width for every token (static): dense matmuls on weight slices;
    - tensor ``[B]`` for input ``[B, S, H]``: one width per sequence;
    - tensor with one entry per token: each token its own width (token routing). Below
      ``routed_min_tokens`` tokens (the default: :data:`ROUTED_MIN_TOKENS` for the device)
      every token runs at full width with the hidden units past its width zeroed (three
      dense GEMMs, no permutation); from there on the routed nested GEMMs.
    """

    # Token count from which a per-token call takes the routed path; None: the device's
    # default in ROUTED_MIN_TOKENS. 0 always routes; a huge number always masks.
    routed_min_tokens: int | None = None

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        widths: Sequence[int],
        activation: Activation = "swiglu",
        bias: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if hidden_size <= 0 or intermediate_size <= 0:
            raise ValueError(
                f"sizes must be positive, got hidden={hidden_size}, intermediate={intermediate_size}"
            )
        self.widths = check_widths(widths, max_width=intermediate_size)
        self.activation = activation
        use_bias = activation != "swiglu" if bias is None else bias
        factory = {"device": device, "dtype": dtype}
        self.up = nn.Linear(hidden_size, intermediate_size, bias=use_bias, **factory)
        self.gate = (
            nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
            if activation == "swiglu"
            else None
        )
        self.down = nn.Linear(intermediate_size, hidden_size, bias=use_bias, **factory)
        # Sees the hidden activation [tokens, width] of static calls (importance scoring hooks here).
        self.hidden_probe = nn.Identity()
        self.register_buffer("width_lookup", torch.tensor(self.widths, device=device), persistent=False)

    def reset_buffers(self) -> None:
        """Rebuild the unsaved buffer (after loading into a model built on the meta device)."""
        self.width_lookup = torch.tensor(self.widths)

    @property
    def hidden_size(self) -> int:
        return self.up.in_features

    def forward(self, x: Tensor, choice: int | Tensor = 0, scale: Tensor | None = None) -> Tensor:
        """``x [..., H]``; ``scale`` (one entry per token) multiplies each token's output."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must end in hidden size {self.hidden_size}, got shape {tuple(x.shape)}")
        if isinstance(choice, int):
            return self._forward_static(x, choice, scale)
        tokens = x.numel() // self.hidden_size
        if choice.dim() == 1 and x.dim() == 3 and choice.numel() == x.shape[0] != tokens:
            choice = choice[:, None].expand(x.shape[0], x.shape[1])  # per sequence
        if choice.numel() != tokens:
            raise ValueError(
                f"choice must be an int, one entry per sequence or one per token ({tokens}), got shape {tuple(choice.shape)}"
            )
        if tokens == 1 and x.device.type == "cpu":  # one token is a static call (no device sync)
            return self._forward_static(x, int(choice.reshape(())), scale)
        if not routes("mlp", tokens, x.device, self.routed_min_tokens):
            return self._forward_static(x, 0, scale, hidden_mask=self._hidden_mask(choice))
        return elastic_mlp(
            x,
            choice.reshape(-1),
            self.up.weight,
            self.down.weight,
            self.widths,
            activation=self.activation,
            w_gate=self.gate.weight if self.gate is not None else None,
            b_up=self.up.bias,
            b_down=self.down.bias,
            scale=scale.reshape(-1) if scale is not None else None,
        )

    def _forward_static(
        self, x: Tensor, choice: int, scale: Tensor | None, hidden_mask: Tensor | None = None
    ) -> Tensor:
        if not 0 <= choice < len(self.widths):
            raise ValueError(f"choice must be in [0, {len(self.widths)}), got {choice}")
        d = self.widths[choice]
        tokens = x.reshape(-1, self.hidden_size)
        bias_up = self.up.bias[:d] if self.up.bias is not None else None
        h = nn.functional.linear(tokens, self.up.weight[:d], bias_up)
        gate = nn.functional.linear(tokens, self.gate.weight[:d]) if self.gate is not None else None
        # Built with fills, not torch.tensor([...]): no host-to-device copy on the forward path.
        offsets = torch.full((2,), tokens.shape[0], dtype=torch.int32, device=x.device)
        offsets[0] = 0
        h = nested_activation(h, offsets, [d], self.activation, gate)
        h = h * hidden_mask.to(h.dtype) if hidden_mask is not None else self.hidden_probe(h)
        y = nn.functional.linear(h, self.down.weight[:, :d], self.down.bias)
        if scale is not None:
            y = y * scale.reshape(-1, 1)
        return y.reshape(x.shape)

    def _hidden_mask(self, choice: Tensor) -> Tensor:
        """``[tokens, widths[0]]``: which hidden units each token uses (the masked path runs
        every token at full width and zeroes the rest)."""
        units = torch.arange(self.widths[0], device=choice.device)
        return units < look_up(self.width_lookup, choice.reshape(-1))[:, None]

    def extra_repr(self) -> str:
        return f"widths={list(self.widths)}, activation={self.activation!r}"


def head_shape(
    hidden_size: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None
) -> tuple[int, int]:
    """``(num_kv_heads, head_dim)`` with their defaults (MHA; ``hidden_size // num_heads``),
    checked."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if hidden_size <= 0 or num_heads <= 0 or num_kv_heads <= 0:
        raise ValueError(
            f"sizes must be positive, got hidden={hidden_size}, heads={num_heads}, kv_heads={num_kv_heads}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) is not a multiple of num_heads ({num_heads}): pass head_dim"
            )
        head_dim = hidden_size // num_heads
    return num_kv_heads, head_dim


def routing_mode(choice: int | Tensor, batch: int, steps: int) -> str:
    """``static`` (an int), ``sequence`` (``[B]``) or ``token`` (``[B, S]``); else an error."""
    if isinstance(choice, int):
        return "static"
    if not isinstance(choice, Tensor):
        raise TypeError(f"choice must be an int or a tensor, got {type(choice).__name__}")
    if choice.dtype.is_floating_point or choice.dtype == torch.bool:
        raise TypeError(f"choice must be an integer tensor, got {choice.dtype}")
    if choice.shape == (batch,):
        return "sequence"
    if choice.shape == (batch, steps):
        return "token"
    raise ValueError(
        f"choice must be an int, a tensor [batch={batch}] or [batch={batch}, seq={steps}], "
        f"got shape {tuple(choice.shape)}"
    )


AttentionBackend = Literal["sdpa", "flex"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


class ElasticAttention(nn.Module):
    """Causal self-attention with nested query heads: choice ``g`` uses the first
    ``head_counts[g]`` query heads.

    K and V are computed for every KV head (and cached), whatever the routing; only the
    query heads are elastic. The projections are fused in one weight,
    ``qkv_proj.weight = [K; V; Q]``, so that a token with ``h`` heads needs one nested GEMM
    of width ``(2 * kv_heads + h) * head_dim``; ``o_proj`` reads the first ``h * head_dim``
    columns. Llama (RoPE, GQA, no biases), Qwen2 (QKV biases) and GPT-2 (no RoPE: positions
    are the model's; biases everywhere) are configurations of this one module.

    With GQA (``num_kv_heads < num_heads``) head choices keep whole query groups: every
    choice is a multiple of ``num_heads // num_kv_heads``, and query head ``i`` reads KV
    head ``i // (num_heads // num_kv_heads)`` as in Hugging Face models.

    Routing, by the type of ``choice`` in :meth:`forward`:

    - ``int``: one head count for the layer (static): dense matmuls on weight slices and
      one attention call over the kept heads;
    - tensor ``[B]``: one head count per sequence. Each head band attends only for the
      sequences that use it. The choices are read on the host (one sync if they live on
      the GPU; pass a CPU tensor to avoid it);
    - tensor ``[B, S]``: one head count per token. With ``attention_backend="sdpa"``:
      below ``routed_min_tokens`` tokens (the default: :data:`ROUTED_MIN_TOKENS` for the
      device) every head is computed and each token's outputs past its head count are zeroed
      before ``o_proj`` (the cost of full width, nothing more); from there on the
      projections are token-routed nested GEMMs around core attention per head band over
      all queries. ``"flex"``: routed projections and one compiled FlexAttention call whose
      block mask skips the heads a query does not use.
    """

    # Token count from which a per-token call takes the routed path; None: the device's
    # default in ROUTED_MIN_TOKENS. 0 always routes; a huge number always masks.
    routed_min_tokens: int | None = None

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_counts: Sequence[int],
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        rope_theta: float | None = 10000.0,
        rope_scaling: RopeScaling | None = None,
        attention_backend: AttentionBackend = "sdpa",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}"
            )
        self.attention_backend = attention_backend
        num_kv_heads, head_dim = head_shape(hidden_size, num_heads, num_kv_heads, head_dim)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.head_counts = check_widths(head_counts, max_width=num_heads, name="head_counts")
        group = num_heads // num_kv_heads
        if any(h % group for h in self.head_counts):
            raise ValueError(
                f"with {num_heads} query heads over {num_kv_heads} KV heads, head_counts must keep whole "
                f"query groups (multiples of {group}), got {list(self.head_counts)}"
            )
        factory = {"device": device, "dtype": dtype}
        self.kv_size = 2 * num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, self.kv_size + num_heads * head_dim, bias=qkv_bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias, **factory)
        # Sees the per-head outputs [B, S, heads, head_dim] of static calls (importance scoring).
        self.heads_probe = nn.Identity()
        self.rotary = (
            RotaryEmbedding(head_dim, rope_theta, rope_scaling).to(device) if rope_theta is not None else None
        )
        self.register_buffer(
            "head_count_lookup", torch.tensor(self.head_counts, device=device), persistent=False
        )

    def reset_buffers(self) -> None:
        """Rebuild the unsaved buffer (after loading into a model built on the meta device)."""
        self.head_count_lookup = torch.tensor(self.head_counts)

    @property
    def hidden_size(self) -> int:
        return self.qkv_proj.in_features

    def qkv_widths(self) -> list[int]:
        """Output widths of the nested QKV GEMM, one per head choice."""
        return [self.kv_size + h * self.head_dim for h in self.head_counts]

    def new_cache(
        self,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        weight = self.qkv_proj.weight
        return KVCache(
            batch_size,
            max_length,
            self.num_kv_heads,
            self.head_dim,
            dtype=dtype or weight.dtype,
            device=device or weight.device,
        )

    def forward(
        self,
        x: Tensor,
        choice: int | Tensor = 0,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``x [B, S, H]`` -> ``[B, S, H]``.

        ``attention_mask [B, S]`` marks real tokens (1) and padding (0) of the new tokens
        (pad on the left for batched generation); ``cache`` holds earlier tokens and gets
        these appended. ``position_ids [B, S]`` default to the count of real tokens before
        each token; ``position_embeddings`` (``cos, sin``, ``[B, S, head_dim]``) may be passed
        in to share them across layers (RoPE is then applied even if the layer was built
        with ``rope_theta=None``).
        """
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [batch, seq, {self.hidden_size}], got shape {tuple(x.shape)}")
        batch, steps, _ = x.shape
        valid = valid_mask(attention_mask, batch, steps, x.device)
        positions = (position_ids, position_embeddings)
        mode = routing_mode(choice, batch, steps)
        if mode == "token" and batch * steps == 1 and x.device.type == "cpu":
            choice, mode = int(choice.reshape(())), "static"  # one token (no device sync on the CPU)
        if mode == "static":
            return self._forward_static(x, self._static_heads(choice), valid, cache, positions)
        masked = mode == "token" and self.attention_backend == "sdpa"
        if masked and not routes("attention", batch * steps, x.device, self.routed_min_tokens):
            head_mask = self._head_mask(choice)
            return self._forward_static(x, self.num_heads, valid, cache, positions, head_mask)
        return self._forward_routed(x, choice, mode, valid, cache, positions)

    def _forward_static(
        self,
        x: Tensor,
        heads: int,
        valid: Tensor | None,
        cache: KVCache | None,
        positions: Positions,
        head_mask: Tensor | None = None,
    ) -> Tensor:
        """One head count for every token: the weights' prefixes, one SDPA over kept heads.
        ``head_mask [B, S, heads]`` (the masked per-token path, at full width) zeroes each
        token's outputs past its head count before ``o_proj``."""
        batch, steps, _ = x.shape
        width = self.kv_size + heads * self.head_dim
        bias = self.qkv_proj.bias[:width] if self.qkv_proj.bias is not None else None
        qkv = nn.functional.linear(x, self.qkv_proj.weight[:width], bias)
        q, k, v, key_valid = self._attention_inputs(qkv, heads, valid, cache, positions)
        kv_kept = heads // (self.num_heads // self.num_kv_heads)
        mask, is_causal = causal_mask(steps, k.shape[2], key_valid, x.device)
        out = banded_attention(q, k[:, :kv_kept], v[:, :kv_kept], [heads], mask, is_causal)
        out = out.transpose(1, 2)
        out = out * head_mask[..., None].to(out.dtype) if head_mask is not None else self.heads_probe(out)
        out = out.reshape(batch, steps, heads * self.head_dim)
        return nn.functional.linear(out, self.o_proj.weight[:, : heads * self.head_dim], self.o_proj.bias)

    def _forward_routed(
        self,
        x: Tensor,
        choice: Tensor,
        mode: str,
        valid: Tensor | None,
        cache: KVCache | None,
        positions: Positions,
    ) -> Tensor:
        """A head count per sequence ([B]) or per token ([B, S]): routed nested GEMMs around
        attention per head band (or FlexAttention for tokens)."""
        batch, steps, _ = x.shape
        bands = band_sequences(choice, len(self.head_counts)) if mode == "sequence" else None
        token_choice = choice[:, None].expand(batch, steps) if mode == "sequence" else choice
        plan = route_plan(token_choice.reshape(-1), self.head_counts)
        tokens = permute(x.reshape(batch * steps, -1), plan)
        qkv = nested_linear_n(tokens, self.qkv_proj.weight, plan.offsets, self.qkv_widths())
        if self.qkv_proj.bias is not None:
            qkv = qkv + self.qkv_proj.bias  # columns past a token's width are never read
        qkv = unpermute(qkv, plan).reshape(batch, steps, -1)
        q, k, v, key_valid = self._attention_inputs(qkv, self.num_heads, valid, cache, positions)
        if mode == "token" and self.attention_backend == "flex":
            if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
                raise NotImplementedError(
                    "attention_backend='flex' has no backward pass on the CPU (a FlexAttention limit): "
                    "use 'sdpa' to train on the CPU, or run under torch.no_grad()"
                )
            out = token_routed_flex_attention(q, k, v, self.head_count_lookup[choice], key_valid)
        else:
            mask, is_causal = causal_mask(steps, k.shape[2], key_valid, x.device)
            out = banded_attention(q, k, v, self.head_counts, mask, is_causal, bands)
        out = out.transpose(1, 2).reshape(batch * steps, self.num_heads * self.head_dim)
        widths = [h * self.head_dim for h in self.head_counts]
        y = nested_linear_k(permute(out, plan), self.o_proj.weight, plan.offsets, widths)
        if self.o_proj.bias is not None:
            y = y + self.o_proj.bias
        return unpermute(y, plan).reshape(batch, steps, -1)

    def _head_mask(self, choice: Tensor) -> Tensor:
        """``[B, S, heads]``: which query heads each token uses."""
        heads = torch.arange(self.num_heads, device=choice.device)
        return heads < look_up(self.head_count_lookup, choice)[..., None]

    def _attention_inputs(
        self, qkv: Tensor, heads: int, valid: Tensor | None, cache: KVCache | None, positions: Positions
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``qkv [B, S, kv_size + heads * head_dim]`` -> ``q, k, v`` as ``[B, heads, S, D]``
        with RoPE applied and the cache updated, and the keys' validity mask."""
        (position_ids, position_embeddings), (batch, steps) = positions, qkv.shape[:2]
        half = self.kv_size // 2
        k = qkv[..., :half].reshape(batch, steps, self.num_kv_heads, self.head_dim)
        v = qkv[..., half : self.kv_size].reshape(batch, steps, self.num_kv_heads, self.head_dim)
        q = qkv[..., self.kv_size :].reshape(batch, steps, heads, self.head_dim)
        if position_embeddings is not None or self.rotary is not None:
            if position_embeddings is None:
                if position_ids is None:
                    position_ids = default_positions(valid, cache, batch, steps, qkv.device)
                position_embeddings = self.rotary(position_ids)
            cos, sin = position_embeddings
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        key_valid = valid
        if cache is not None:
            k, v, cached_valid = cache.update(k, v, valid)
            key_valid = cached_valid if cache.padded else None
        return q, k, v, key_valid

    def _static_heads(self, choice: int) -> int:
        if not 0 <= choice < len(self.head_counts):
            raise ValueError(f"choice must be in [0, {len(self.head_counts)}), got {choice}")
        return self.head_counts[choice]

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"head_counts={list(self.head_counts)}, attention_backend={self.attention_backend!r}"
        )
