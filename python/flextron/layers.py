"""Elastic layers built on flextron's ops. A layer holds the full-width weights; a forward
pass picks the width per token, per sequence, or for the whole layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flextron.ops import ACTIVATIONS, Activation, as_widths, elastic_mlp, nested_activation


class ElasticMLP(nn.Module):
    """A nested MLP: width choice ``g`` uses the first ``widths[g]`` hidden neurons.

    ``activation="swiglu"`` is the Llama MLP (gate, up, down; no biases by default);
    ``"gelu"``/``"gelu_tanh"`` the GPT-2 MLP (up with bias, down with bias).

    Routing, by the type of ``choice`` in :meth:`forward`:

    - ``int``: one width for every token (static): dense matmuls on weight slices;
    - tensor ``[B]`` for input ``[B, S, H]``: one width per sequence;
    - tensor with one entry per token: each token its own width (token routing).
    """

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
        self.widths = tuple(as_widths(widths, max_width=intermediate_size).tolist())
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

    def _forward_static(self, x: Tensor, choice: int, scale: Tensor | None) -> Tensor:
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
        y = nn.functional.linear(h, self.down.weight[:, :d], self.down.bias)
        if scale is not None:
            y = y * scale.reshape(-1, 1)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"widths={list(self.widths)}, activation={self.activation!r}"
