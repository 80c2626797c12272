"""flextron's torch ops: typed wrappers, fake (meta) kernels and autograd.

The kernels are C++/CUDA (``csrc/``), registered as ``torch.ops.flextron.*``. Tokens are
routed by a *plan*: a stable sort of tokens by their width choice, widest group first, so
every routed GEMM is a grouped GEMM whose groups share one weight and differ only in N or K.

Widths are configuration, not data: they are kept as a CPU int32 tensor so that kernels
can validate them and take them by value with no device sync. Offsets are data (computed on
the device by :func:`route_plan`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from flextron import _library  # noqa: F401  (registers torch.ops.flextron)

_ops = torch.ops.flextron

Widths = Sequence[int] | Tensor
Activation = Literal["swiglu", "gelu", "gelu_tanh"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)


@dataclass(frozen=True)
class RoutePlan:
    """Tokens sorted by width choice: ``perm[i]`` is the token at sorted position ``i``.

    Group ``g`` (width ``widths[g]``) holds sorted rows ``offsets[g]:offsets[g+1]``.
    """

    perm: Tensor  # int64 [T], on the tokens' device
    offsets: Tensor  # int32 [G+1], on the tokens' device
    widths: Tensor  # int32 [G], on the CPU, strictly decreasing

    @property
    def num_groups(self) -> int:
        return int(self.widths.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.perm.numel())


def as_widths(widths: Widths, max_width: int | None = None, name: str = "widths") -> Tensor:
    """Validate widths (strictly decreasing positive ints) and return them as CPU int32.

    A tensor is passed on as it is (after a dtype/device cast): the kernels validate its
    values, and reading them here would be a data-dependent branch under torch.compile.
    """
    if isinstance(widths, Tensor):
        if widths.dtype.is_floating_point or widths.dtype.is_complex or widths.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {widths.dtype}")
        if widths.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(widths.shape)}")
        if widths.dtype != torch.int32 and widths.numel():
            # Range-check before the narrowing cast: 2**32 + 8 would become 8.
            low, high = int(widths.min()), int(widths.max())
            if low < 1 or high > torch.iinfo(torch.int32).max:
                raise ValueError(f"{name} must be positive 32-bit integers, got {widths.tolist()}")
        return widths.to(device="cpu", dtype=torch.int32)
    return torch.tensor(check_widths(widths, max_width, name), dtype=torch.int32, device="cpu")


def check_widths(
    widths: Sequence[int], max_width: int | None = None, name: str = "widths"
) -> tuple[int, ...]:
    """Validate a width list on the host (strictly decreasing positive ints, the first at most
    ``max_width``) and return it as a tuple."""
    values = list(widths)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be integers, got {values}")
    if not values:
        raise ValueError(f"{name} must not be empty")
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive, got {values}")
    if any(a <= b for a, b in itertools.pairwise(values)):
        raise ValueError(f"{name} must be strictly decreasing, got {values}")
    if max_width is not None and values[0] > max_width:
        raise ValueError(f"{name}[0]={values[0]} exceeds the available width {max_width}")
    return tuple(values)


def route_plan(choice: Tensor, widths: Widths) -> RoutePlan:
    """Sort tokens by width choice (``choice[t]`` indexes ``widths``), widest group first.

    The sort is stable: within a group, tokens keep their original order.
    """
    width_tensor = as_widths(widths)
    if not isinstance(choice, Tensor):
        raise TypeError(f"choice must be a tensor, got {type(choice).__name__}")
    perm, offsets = _ops.route_plan(choice, width_tensor.numel())
    return RoutePlan(perm=perm, offsets=offsets, widths=width_tensor)


def _perm_of(plan: RoutePlan | Tensor) -> Tensor:
    return plan.perm if isinstance(plan, RoutePlan) else plan


def permute(x: Tensor, plan: RoutePlan | Tensor) -> Tensor:
    """Gather rows into group order: ``out[i] = x[plan.perm[i]]``. Differentiable."""
    return _ops.permute(x, _perm_of(plan))


def unpermute(y: Tensor, plan: RoutePlan | Tensor, scale: Tensor | None = None) -> Tensor:
    """Scatter rows back to token order, optionally scaled per token (e.g. a router
    probability): ``out[perm[i]] = y[i] * scale[perm[i]]``. Differentiable in ``y`` and
    ``scale``."""
    return _ops.unpermute(y, _perm_of(plan), scale)


def autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under ``torch.autocast`` the ops compute in the autocast dtype, as torch's own matmuls
    do: floating inputs are cast per call (fp32 master weights get fp32 gradients through
    the cast). Without autocast the inputs pass unchanged, and mixed dtypes are an error."""
    first = next((t for t in tensors if t is not None), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def nested_linear_n(
    x: Tensor, weight: Tensor, offsets: Tensor, widths: Widths, zero_tails: bool = True
) -> Tensor:
    """Nested output width: rows of group g get ``x @ weight[:d_g].T`` in columns ``< d_g``
    and zeros after. ``x [M, K]``, ``weight [Nmax, K]`` -> ``[M, Nmax]``. With
    ``zero_tails=False`` the columns past each row's width are left unspecified (a pass over
    memory saved when the consumer, like :func:`nested_activation` or
    :func:`nested_linear_k`, reads only each row's width)."""
    x, weight = autocast_inputs(x, weight)
    return _ops.nested_linear_n(x, weight, offsets, as_widths(widths), zero_tails)


def nested_linear_k(x: Tensor, weight: Tensor, offsets: Tensor, widths: Widths) -> Tensor:
    """Nested input width: rows of group g get ``x[:, :d_g] @ weight[:, :d_g].T``.
    ``x [M, Kmax]``, ``weight [N, Kmax]`` -> ``[M, N]``."""
    x, weight = autocast_inputs(x, weight)
    return _ops.nested_linear_k(x, weight, offsets, as_widths(widths))


def nested_weight_grad(grad_out: Tensor, x: Tensor, offsets: Tensor, widths: Widths) -> Tensor:
    """Staircase weight gradient of :func:`nested_linear_n` (``[Nmax, K]``): the row band
    ``[d_{g+1}, d_g)`` sums ``grad_out.T @ x`` over the tokens of groups ``0..g``, the only
    tokens whose width covers it. Accumulates in fp32."""
    return _ops.nested_weight_grad(grad_out, x, offsets, as_widths(widths))


def nested_weight_grad_k(grad_out: Tensor, x: Tensor, offsets: Tensor, widths: Widths) -> Tensor:
    """Staircase weight gradient of :func:`nested_linear_k` (``[N, Kmax]``, the weight's own
    layout): the column band ``[d_{g+1}, d_g)`` sums ``grad_out.T @ x[:, band]`` over the
    tokens of groups ``0..g``. ``grad_out [M, N]``, ``x [M, Kmax]``. Accumulates in fp32."""
    return _ops.nested_weight_grad_k(grad_out, x, offsets, as_widths(widths))


def nested_activation(
    h: Tensor, offsets: Tensor, widths: Widths, activation: Activation = "swiglu", gate: Tensor | None = None
) -> Tensor:
    """The MLP activation of a nested hidden block ``h [M, D]``, computed only inside each
    row's width: rows of group g get ``act[:, :d_g]`` and zeros after. ``"swiglu"`` is
    ``silu(gate) * h`` (needs ``gate``); ``"gelu"``/``"gelu_tanh"`` act on ``h`` alone.
    Differentiable in h and gate."""
    h, gate = autocast_inputs(h, gate)
    return _ops.nested_activation(h, gate, offsets, as_widths(widths), activation)


def _check_mlp_operands(
    x: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    activation: str,
    w_gate: Tensor | None,
    b_up: Tensor | None,
    b_down: Tensor | None,
) -> None:
    """elastic_mlp's operand shapes and activation (see its docstring)."""
    if x.dim() < 1:
        raise ValueError("x must have a trailing hidden dimension")
    hidden = x.shape[-1]
    if w_up.dim() != 2 or w_up.shape[1] != hidden:
        raise ValueError(f"w_up must be [D, H={hidden}], got {tuple(w_up.shape)}")
    inner = w_up.shape[0]
    if w_down.dim() != 2 or tuple(w_down.shape) != (hidden, inner):
        raise ValueError(f"w_down must be [H={hidden}, D={inner}], got {tuple(w_down.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'swiglu', 'gelu' or 'gelu_tanh', got {activation!r}")
    if activation == "swiglu":
        if w_gate is None:
            raise ValueError("activation='swiglu' needs w_gate")
        if w_gate.shape != w_up.shape:
            raise ValueError(f"w_gate must match w_up {tuple(w_up.shape)}, got {tuple(w_gate.shape)}")
    elif w_gate is not None:
        raise ValueError(f"w_gate is only used by activation='swiglu', got activation={activation!r}")
    for bias, size, bias_name in ((b_up, inner, "b_up"), (b_down, hidden, "b_down")):
        if bias is not None and tuple(bias.shape) != (size,):
            raise ValueError(
                f"{bias_name} must be 1-D [{size}] (one value per feature), got {tuple(bias.shape)}"
            )


def elastic_mlp(
    x: Tensor,
    choice: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    widths: Widths,
    activation: Activation = "swiglu",
    w_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    b_down: Tensor | None = None,
    scale: Tensor | None = None,
    plan: RoutePlan | None = None,
) -> Tensor:
    """A token-routed nested MLP. Token ``t`` uses the first ``widths[choice[t]]`` neurons.

    ``x [T, H]`` (or ``[..., H]``), ``w_up``/``w_gate`` ``[D, H]``, ``w_down [H, D]``;
    ``activation`` is ``"swiglu"`` (Llama: ``silu(x Wg^T) * x Wu^T``, needs ``w_gate``),
    ``"gelu"`` or ``"gelu_tanh"`` (GPT-2). ``scale [T]`` multiplies each token's output.
    Pass ``plan`` to reuse a routing computed once for several layers with the same choices.

    route_plan -> permute -> nested up (and gate) GEMM -> nested activation (only inside
    each token's width) -> nested down GEMM -> unpermute. Differentiable in x, the weights, the biases and scale.
    """
    _check_mlp_operands(x, w_up, w_down, activation, w_gate, b_up, b_down)
    hidden, inner = x.shape[-1], w_up.shape[0]
    width_tensor = as_widths(widths, max_width=inner, name="widths")
    x, w_up, w_gate, w_down, b_up, b_down, scale = autocast_inputs(
        x, w_up, w_gate, w_down, b_up, b_down, scale
    )
    tokens = x.reshape(-1, hidden)
    if plan is None:
        if choice.dim() != 1 or choice.numel() != tokens.shape[0]:
            raise ValueError(
                f"choice must be 1-D with one entry per token ({tokens.shape[0]}), got {tuple(choice.shape)}"
            )
        plan = route_plan(choice, width_tensor)
    elif not torch.equal(plan.widths, width_tensor):
        raise ValueError(f"plan.widths {plan.widths.tolist()} differ from widths {width_tensor.tolist()}")

    xs = permute(tokens, plan)
    # The activation reads only each token's width and writes zeros past it: the up/gate
    # tails are never read, so they are not zeroed (and the bias may touch them).
    h = _ops.nested_linear_n(xs, w_up, plan.offsets, width_tensor, False)
    if b_up is not None:
        h = h + b_up
    gate = _ops.nested_linear_n(xs, w_gate, plan.offsets, width_tensor, False) if w_gate is not None else None
    h = _ops.nested_activation(h, gate, plan.offsets, width_tensor, activation)
    ys = nested_linear_k(h, w_down, plan.offsets, width_tensor)
    if b_down is not None:
        ys = ys + b_down
    out = unpermute(ys, plan, scale)
    return out.reshape(x.shape)


# ---------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes only, so torch.compile can trace the ops.


@torch.library.register_fake("flextron::route_plan")
def _route_plan_fake(choice: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    torch._check(choice.dim() == 1, lambda: f"choice must be 1-D, got {choice.dim()}-D")
    perm = choice.new_empty(choice.shape, dtype=torch.int64)
    offsets = choice.new_empty((num_groups + 1,), dtype=torch.int32)
    return perm, offsets


@torch.library.register_fake("flextron::permute")
def _permute_fake(x: Tensor, perm: Tensor) -> Tensor:
    torch._check(perm.shape[0] == x.shape[0], lambda: "perm and x must have the same number of rows")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("flextron::unpermute")
def _unpermute_fake(y: Tensor, perm: Tensor, scale: Tensor | None = None) -> Tensor:
    torch._check(perm.shape[0] == y.shape[0], lambda: "perm and y must have the same number of rows")
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@torch.library.register_fake("flextron::nested_linear_n")
def _nested_linear_n_fake(
    x: Tensor, weight: Tensor, offsets: Tensor, widths: Tensor, zero_tails: bool = True
) -> Tensor:
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: "x and weight must share K")
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("flextron::nested_linear_k")
def _nested_linear_k_fake(x: Tensor, weight: Tensor, offsets: Tensor, widths: Tensor) -> Tensor:
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
    torch._check(x.shape[1] == weight.shape[1], lambda: "x and weight must share Kmax")
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("flextron::nested_weight_grad")
def _nested_weight_grad_fake(grad_out: Tensor, x: Tensor, offsets: Tensor, widths: Tensor) -> Tensor:
    torch._check(grad_out.dim() == 2 and x.dim() == 2, lambda: "grad_out and x must be 2-D")
    torch._check(grad_out.shape[0] == x.shape[0], lambda: "grad_out and x must share M")
    return x.new_empty((grad_out.shape[1], x.shape[1]))


@torch.library.register_fake("flextron::nested_weight_grad_k")
def _nested_weight_grad_k_fake(grad_out: Tensor, x: Tensor, offsets: Tensor, widths: Tensor) -> Tensor:
    torch._check(grad_out.dim() == 2 and x.dim() == 2, lambda: "grad_out and x must be 2-D")
    torch._check(grad_out.shape[0] == x.shape[0], lambda: "grad_out and x must share M")
    return x.new_empty((grad_out.shape[1], x.shape[1]))


@torch.library.register_fake("flextron::nested_activation")
def _nested_activation_fake(
    h: Tensor, gate: Tensor | None, offsets: Tensor, widths: Tensor, activation: str
) -> Tensor:
    torch._check(h.dim() == 2, lambda: "h must be 2-D")
    return torch.empty_like(h, memory_format=torch.contiguous_format)


@torch.library.register_fake("flextron::nested_activation_backward")
def _nested_activation_backward_fake(
    grad: Tensor, h: Tensor, gate: Tensor | None, offsets: Tensor, widths: Tensor, activation: str
) -> tuple[Tensor, Tensor]:
    grad_gate = (
        torch.empty_like(h, memory_format=torch.contiguous_format) if gate is not None else h.new_empty(0)
    )
    return torch.empty_like(h, memory_format=torch.contiguous_format), grad_gate


# ---------------------------------------------------------------------------------------
# Autograd. Backward of each nested op is the other nested op plus the staircase weight
# gradient, so training runs on the same kernels.


def _permute_setup(ctx, inputs, output) -> None:
    _, perm = inputs
    ctx.save_for_backward(perm)


def _permute_backward(ctx, grad: Tensor):
    (perm,) = ctx.saved_tensors
    return _ops.unpermute(grad, perm, None), None


torch.library.register_autograd("flextron::permute", _permute_backward, setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output) -> None:
    y, perm, scale = inputs
    ctx.has_scale = scale is not None
    ctx.save_for_backward(y, perm, scale if scale is not None else y.new_empty(0))


def _unpermute_backward(ctx, grad: Tensor):
    y, perm, scale = ctx.saved_tensors
    if not ctx.has_scale:
        return _ops.permute(grad, perm), None, None
    per_token = scale.reshape((-1,) + (1,) * (grad.dim() - 1))
    grad_y = _ops.permute(grad * per_token, perm) if ctx.needs_input_grad[0] else None
    grad_scale = None
    if ctx.needs_input_grad[2]:
        grad_scale = (grad * _ops.unpermute(y, perm, None)).reshape(grad.shape[0], -1).sum(dim=1)
    return grad_y, None, grad_scale


torch.library.register_autograd("flextron::unpermute", _unpermute_backward, setup_context=_unpermute_setup)


def _nested_setup(ctx, inputs, output) -> None:
    x, weight, offsets, widths = inputs[:4]
    ctx.save_for_backward(x, weight, offsets, widths)


# The backward reads the weight transposed in place (weight.t() is a view; every backend
# takes either layout) and writes weight gradients in the weight's own layout, so autograd
# accumulates them without a copy.


def _nested_linear_n_backward(ctx, grad: Tensor):
    x, weight, offsets, widths = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.nested_linear_k(grad, weight.t(), offsets, widths)
    if ctx.needs_input_grad[1]:
        grad_w = _ops.nested_weight_grad(grad, x, offsets, widths)
    return grad_x, grad_w, None, None, None


def _nested_linear_k_backward(ctx, grad: Tensor):
    x, weight, offsets, widths = ctx.saved_tensors
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        # Zeros past each row's width: exactly the gradient there.
        grad_x = _ops.nested_linear_n(grad, weight.t(), offsets, widths, True)
    if ctx.needs_input_grad[1]:
        grad_w = _ops.nested_weight_grad_k(grad, x, offsets, widths)
    return grad_x, grad_w, None, None


torch.library.register_autograd(
    "flextron::nested_linear_n", _nested_linear_n_backward, setup_context=_nested_setup
)
torch.library.register_autograd(
    "flextron::nested_linear_k", _nested_linear_k_backward, setup_context=_nested_setup
)


def _nested_activation_setup(ctx, inputs, output) -> None:
    h, gate, offsets, widths, activation = inputs
    ctx.activation = activation
    ctx.has_gate = gate is not None
    ctx.save_for_backward(h, gate if gate is not None else h.new_empty(0), offsets, widths)


def _nested_activation_backward(ctx, grad: Tensor):
    h, gate, offsets, widths = ctx.saved_tensors
    grad_h, grad_gate = _ops.nested_activation_backward(
        grad, h, gate if ctx.has_gate else None, offsets, widths, ctx.activation
    )
    return grad_h, (grad_gate if ctx.has_gate else None), None, None, None


torch.library.register_autograd(
    "flextron::nested_activation", _nested_activation_backward, setup_context=_nested_activation_setup
)
