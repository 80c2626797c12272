"""Pure-PyTorch versions of every flextron op: the oracle for tests and the baseline for
benchmarks. Written for clarity, not speed; never used on the library's hot path."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _widths_list(widths: Sequence[int] | Tensor) -> list[int]:
    return [int(w) for w in (widths.tolist() if isinstance(widths, Tensor) else widths)]


def _bounds(offsets: Tensor) -> list[int]:
    return [int(o) for o in offsets.cpu().tolist()]


def route_plan(choice: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """perm (int64 [T]) and offsets (int32 [G+1]) of a stable sort by choice."""
    if choice.numel() and (int(choice.min()) < 0 or int(choice.max()) >= num_groups):
        raise ValueError(f"choice values must be in [0, {num_groups})")
    perm = torch.sort(choice.long(), stable=True).indices
    counts = torch.bincount(choice.long(), minlength=num_groups)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int32, device=choice.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return perm, offsets


def permute(x: Tensor, perm: Tensor) -> Tensor:
    return x[perm]


def unpermute(y: Tensor, perm: Tensor, scale: Tensor | None = None) -> Tensor:
    out = torch.zeros_like(y)
    out[perm] = y
    if scale is not None:
        out = out * scale.reshape((-1,) + (1,) * (y.dim() - 1))
    return out


def nested_operand_shapes(op: str, tokens: int, nested: int, other: int) -> tuple[tuple[int, int], ...]:
    """The ``(a, b)`` shapes of a nested GEMM op ``op(a, b, offsets, widths)`` for ``tokens``
    rows when its nested dimension has size ``nested`` and its free one ``other``."""
    return {
        "nested_linear_n": ((tokens, other), (nested, other)),  # x [M, K], weight [Nmax, K]
        "nested_linear_k": ((tokens, nested), (other, nested)),  # x [M, Kmax], weight [N, Kmax]
        "nested_weight_grad": ((tokens, nested), (tokens, other)),  # dy [M, Nmax], x [M, K]
        "nested_weight_grad_k": ((tokens, other), (tokens, nested)),  # dy [M, N], x [M, Kmax]
    }[op]


def nested_linear_n(x: Tensor, weight: Tensor, offsets: Tensor, widths: Sequence[int] | Tensor) -> Tensor:
    out = x.new_zeros(x.shape[0], weight.shape[0])
    bounds = _bounds(offsets)
    for g, d in enumerate(_widths_list(widths)):
        start, end = bounds[g], bounds[g + 1]
        out[start:end, :d] = x[start:end] @ weight[:d].T
    return out


def nested_linear_k(x: Tensor, weight: Tensor, offsets: Tensor, widths: Sequence[int] | Tensor) -> Tensor:
    out = x.new_zeros(x.shape[0], weight.shape[0])
    bounds = _bounds(offsets)
    for g, d in enumerate(_widths_list(widths)):
        start, end = bounds[g], bounds[g + 1]
        out[start:end] = x[start:end, :d] @ weight[:, :d].T
    return out


def _weight_grad_accumulator(grad_out: Tensor, x: Tensor) -> Tensor:
    """Zeros ``[grad_out columns, x columns]`` in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.zeros(grad_out.shape[1], x.shape[1], dtype=dtype, device=x.device)


def nested_weight_grad(
    grad_out: Tensor, x: Tensor, offsets: Tensor, widths: Sequence[int] | Tensor
) -> Tensor:
    """Per-group accumulation ``dw[:d_g] += grad_out_g[:, :d_g].T @ x_g`` (fp32 accumulate)."""
    acc = _weight_grad_accumulator(grad_out, x)
    bounds = _bounds(offsets)
    for g, d in enumerate(_widths_list(widths)):
        start, end = bounds[g], bounds[g + 1]
        acc[:d] += grad_out[start:end, :d].to(acc.dtype).T @ x[start:end].to(acc.dtype)
    return acc.to(x.dtype)


def nested_weight_grad_k(
    grad_out: Tensor, x: Tensor, offsets: Tensor, widths: Sequence[int] | Tensor
) -> Tensor:
    """Per-group accumulation ``dw[:, :d_g] += grad_out_g.T @ x_g[:, :d_g]`` (fp32 accumulate)."""
    acc = _weight_grad_accumulator(grad_out, x)
    bounds = _bounds(offsets)
    for g, d in enumerate(_widths_list(widths)):
        start, end = bounds[g], bounds[g + 1]
        acc[:, :d] += grad_out[start:end].to(acc.dtype).T @ x[start:end, :d].to(acc.dtype)
    return acc.to(x.dtype)


def _activate(h: Tensor, gate: Tensor | None, activation: str) -> Tensor:
    if activation == "swiglu":
        return torch.nn.functional.silu(gate) * h
    if activation == "gelu":
        return torch.nn.functional.gelu(h)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(h, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}")


def nested_activation(
    h: Tensor,
    offsets: Tensor,
    widths: Sequence[int] | Tensor,
    activation: str = "swiglu",
    gate: Tensor | None = None,
) -> Tensor:
    out = torch.zeros_like(h)
    bounds = _bounds(offsets)
    for g, d in enumerate(_widths_list(widths)):
        start, end = bounds[g], bounds[g + 1]
        gate_block = gate[start:end, :d] if gate is not None else None
        out[start:end, :d] = _activate(h[start:end, :d], gate_block, activation)
    return out


def elastic_mlp(
    x: Tensor,
    choice: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    widths: Sequence[int] | Tensor,
    activation: str = "swiglu",
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    scale: Tensor | None = None,
) -> Tensor:
    """Each token runs the dense MLP sliced to its width; no routing machinery."""
    hidden = x.shape[-1]
    tokens = x.reshape(-1, hidden)
    out = torch.zeros_like(tokens)
    for g, d in enumerate(_widths_list(widths)):
        rows = (choice == g).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        xg = tokens[rows]
        h = xg @ w_up[:d].T
        if b_up is not None:
            h = h + b_up[:d]
        gate = xg @ w_gate[:d].T if w_gate is not None else None
        y = _activate(h, gate, activation) @ w_down[:, :d].T
        if b_down is not None:
            y = y + b_down
        out = out.index_copy(0, rows, y)
    if scale is not None:
        out = out * scale[:, None]
    return out.reshape(x.shape)


def dense_mlp(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    activation: str = "swiglu",
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
) -> Tensor:
    """The full-width MLP (the dense baseline)."""
    h = x @ w_up.T
    if b_up is not None:
        h = h + b_up
    gate = x @ w_gate.T if w_gate is not None else None
    y = _activate(h, gate, activation) @ w_down.T
    return y + b_down if b_down is not None else y


def elastic_attention(
    x: Tensor,
    head_counts: Tensor,
    w_qkv: Tensor,
    w_o: Tensor,
    num_heads: int,
    num_kv_heads: int,
    b_qkv: Tensor | None = None,
    b_o: Tensor | None = None,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    key_valid: Tensor | None = None,
) -> Tensor:
    """Causal self-attention where token ``(b, s)`` uses query heads ``[0, head_counts[b, s])``.

    Written as the full-width attention with the unused heads of each token masked to zero
    before the output projection (the same as slicing the weights per token). ``w_qkv`` is
    ``[K; V; Q]``; ``key_valid [B, S]`` marks real tokens (a query always sees itself).
    """
    batch, steps, _ = x.shape
    head_dim = w_o.shape[1] // num_heads
    kv_size = num_kv_heads * head_dim
    qkv = x @ w_qkv.T + (b_qkv if b_qkv is not None else 0)
    k = qkv[..., :kv_size].reshape(batch, steps, num_kv_heads, head_dim)
    v = qkv[..., kv_size : 2 * kv_size].reshape(batch, steps, num_kv_heads, head_dim)
    q = qkv[..., 2 * kv_size :].reshape(batch, steps, num_heads, head_dim)
    if cos is not None and sin is not None:

        def rotate(t: Tensor) -> Tensor:
            half = head_dim // 2
            turned = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
            return t * cos[:, :, None].to(t.dtype) + turned * sin[:, :, None].to(t.dtype)

        q, k = rotate(q), rotate(k)
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / head_dim**0.5
    slots = torch.arange(steps, device=x.device)
    allowed = slots[None, :] <= slots[:, None]
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, :].bool() | (slots[None, :] == slots[:, None]))
    scores = scores.masked_fill(~allowed.reshape(-1, 1, steps, steps), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    used = torch.arange(num_heads, device=x.device) < head_counts[..., None]
    out = out * used[..., None].to(out.dtype)
    y = out.reshape(batch, steps, -1) @ w_o.T
    return y + b_o if b_o is not None else y


def elastic_lm(model, input_ids: Tensor, mlp_choice: Tensor, attention_choice: Tensor) -> Tensor:
    """Logits of a :class:`flextron.model.ElasticLM` where token ``(b, s)`` of layer ``i`` uses
    MLP choice ``mlp_choice[i, b, s]`` and head choice ``attention_choice[i, b, s]``, computed
    with the reference MLP and attention (no routing machinery, no KV cache)."""
    config = model.config
    batch, steps = input_ids.shape
    positions = torch.arange(steps, device=input_ids.device).expand(batch, steps)
    x = model.embed_tokens(input_ids)
    cos = sin = None
    if model.embed_positions is not None:
        x = x + model.embed_positions(positions)
    if model.rotary is not None:
        cos, sin = model.rotary(positions)
    head_counts = torch.tensor(config.head_counts, device=input_ids.device)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attention, layer.mlp
        x = x + elastic_attention(
            layer.attention_norm(x),
            head_counts[attention_choice[i]],
            attn.qkv_proj.weight,
            attn.o_proj.weight,
            config.num_heads,
            config.num_kv_heads,
            attn.qkv_proj.bias,
            attn.o_proj.bias,
            cos,
            sin,
        )
        h = layer.mlp_norm(x).reshape(-1, config.hidden_size)
        x = x + elastic_mlp(
            h,
            mlp_choice[i].reshape(-1),
            mlp.up.weight,
            mlp.down.weight,
            config.mlp_widths,
            config.activation,
            mlp.gate.weight if mlp.gate is not None else None,
            mlp.up.bias,
            mlp.down.bias,
        ).reshape(x.shape)
    return model.lm_head(model.norm(x))
