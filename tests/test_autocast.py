"""Under torch.autocast the ops compute in the autocast dtype, like torch's own matmuls: fp32
weights are cast per call (and get fp32 gradients), so mixed-precision training and
inference work on the token-routed paths. Without autocast, mixed dtypes stay an error."""

from __future__ import annotations

import pytest
import torch

import flextron
from flextron import reference
from flextron.layers import ElasticAttention
from flextron.model import ElasticConfig, ElasticLM, Routing
from tests.helpers import assert_close_to_reference


def tiny_config() -> ElasticConfig:
    return ElasticConfig(
        architecture="llama", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, mlp_widths=(128, 64), head_counts=(4, 2),
    )  # fmt: skip


def autocast_kind(device: str) -> str:
    return torch.device(device).type


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_elastic_mlp_under_autocast(device, activation):
    gen = torch.Generator().manual_seed(0)
    hidden, inner, widths = 64, 128, [128, 96, 64, 32]

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) / shape[-1] ** 0.5).to(device)

    params = {"w_up": rand(inner, hidden), "w_down": rand(hidden, inner)}
    if activation == "swiglu":
        params["w_gate"] = rand(inner, hidden)
    else:
        params["b_up"], params["b_down"] = rand(inner), rand(hidden)
    x = torch.randn(90, hidden, generator=gen, dtype=torch.float64).to(device)
    choice = torch.randint(0, len(widths), (90,), generator=gen).to(device)
    scale = torch.rand(90, generator=gen, dtype=torch.float64).to(device)
    exact = reference.elastic_mlp(x, choice, widths=widths, activation=activation, scale=scale, **params)

    fp32 = {k: v.float().requires_grad_() for k, v in params.items()}
    with torch.autocast(autocast_kind(device), dtype=torch.bfloat16):
        out = flextron.elastic_mlp(
            x.float(), choice, widths=widths, activation=activation, scale=scale.float(), **fp32
        )
    assert out.dtype == torch.bfloat16
    low = {k: v.bfloat16() for k, v in params.items()}
    ref_low = reference.elastic_mlp(
        x.bfloat16(), choice, widths=widths, activation=activation, scale=scale.bfloat16(), **low
    )
    assert_close_to_reference(out, ref_low, exact, factor=4.0)
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fp32.values())


def test_mixed_dtypes_without_autocast_are_an_error():
    x = torch.randn(4, 8)
    weight = torch.randn(16, 8, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        flextron.nested_linear_n(x, weight, offsets, [16])


def test_token_routed_attention_under_autocast(device):
    torch.manual_seed(0)
    attention = ElasticAttention(64, 8, [8, 4], num_kv_heads=4, head_dim=16, qkv_bias=True, device=device)
    x = torch.randn(2, 12, 64, device=device)
    choice = torch.randint(0, 2, (2, 12), device=device)
    full = attention(x, choice)
    with torch.autocast(autocast_kind(device), dtype=torch.bfloat16):
        low = attention(x, choice)
    torch.testing.assert_close(low.float(), full, atol=5e-2, rtol=5e-2)


def test_token_routed_model_trains_under_autocast():
    config = tiny_config()
    torch.manual_seed(0)
    model = ElasticLM(config)
    ids = torch.randint(0, 100, (2, 10))
    routing = Routing(
        [torch.randint(0, 2, (2, 10)) for _ in range(2)], [torch.randint(0, 2, (2, 10)) for _ in range(2)]
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, routing)
    exact = model(ids, routing)
    torch.testing.assert_close(logits.float(), exact, atol=0.1, rtol=0.1)
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_latency_table_records_the_autocast_dtype():
    from flextron.latency import measure

    config = tiny_config()
    model = ElasticLM(config)
    assert measure(model, 1, 8, repeat=1, warmup=0, progress=False).dtype == "float32"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        table = measure(model, 1, 8, repeat=1, warmup=0, progress=False)
    assert table.dtype == "bfloat16" and len(table.mlp_ms) == 2
