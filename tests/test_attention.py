"""ElasticAttention: equal to the masked reference when routed per token or per sequence,
static head counts equal to per-token routing, cached decoding equal to recomputing the whole
sequence, gradients, bad input. (Hugging Face equivalence: test_attention_hf.py.)"""

from __future__ import annotations

import pytest
import torch

from flextron import reference
from flextron.kv_cache import default_positions
from flextron.layers import ElasticAttention
from tests.helpers import assert_close_to_reference

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 48, 8, 4, 16
CHOICES = [8, 6, 4, 2]


def make(device: str, dtype=torch.float64, bias: bool = True, kv_heads: int = KV_HEADS) -> ElasticAttention:
    torch.manual_seed(0)
    return ElasticAttention(
        HIDDEN,
        HEADS,
        CHOICES if kv_heads == KV_HEADS else [8, 4],
        num_kv_heads=kv_heads,
        head_dim=HEAD_DIM,
        qkv_bias=bias,
        out_bias=bias,
        device=device,
        dtype=dtype,
    )


def run_reference(att: ElasticAttention, x, token_choice, attention_mask=None):
    batch, steps, _ = x.shape
    valid = attention_mask.bool() if attention_mask is not None else None
    positions = default_positions(valid, None, batch, steps, x.device)
    cos, sin = att.rotary(positions)
    counts = torch.tensor(att.head_counts, device=x.device)[token_choice]
    return reference.elastic_attention(
        x,
        counts,
        att.qkv_proj.weight,
        att.o_proj.weight,
        att.num_heads,
        att.num_kv_heads,
        att.qkv_proj.bias,
        att.o_proj.bias,
        cos,
        sin,
        valid,
    )


def left_padding(batch: int, steps: int, device: str) -> torch.Tensor:
    mask = torch.ones(batch, steps, dtype=torch.long, device=device)
    for b in range(batch):
        mask[b, : (2 * b) % steps] = 0
    return mask


# ---------------------------------------------------------------------------------------
# Routing modes against the masked reference


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kv_heads", [KV_HEADS, 2, HEADS])
def test_token_routing_matches_reference(device, padded, kv_heads, token_path):
    att = make(device, kv_heads=kv_heads)
    groups = len(att.head_counts)
    x = torch.randn(3, 13, HIDDEN, dtype=torch.float64, device=device)
    choice = torch.randint(0, groups, (3, 13), device=device)
    mask = left_padding(3, 13, device) if padded else None
    out = att(x, choice, attention_mask=mask)
    expected = run_reference(att, x, choice, mask)
    rows = mask.bool() if padded else slice(None)
    torch.testing.assert_close(out[rows], expected[rows])


@pytest.mark.parametrize("padded", [False, True])
def test_per_sequence_routing_matches_reference_and_static(device, padded):
    att = make(device)
    x = torch.randn(4, 9, HIDDEN, dtype=torch.float64, device=device)
    choice = torch.tensor([3, 0, 2, 0], device=device)
    mask = left_padding(4, 9, device) if padded else None
    out = att(x, choice, attention_mask=mask)
    expected = run_reference(att, x, choice[:, None].expand(4, 9), mask)
    rows = mask.bool() if padded else slice(None)
    torch.testing.assert_close(out[rows], expected[rows])
    for b in range(4):
        alone = att(x[b : b + 1], int(choice[b]), attention_mask=mask[b : b + 1] if padded else None)
        keep = mask[b].bool() if padded else slice(None)
        torch.testing.assert_close(out[b][keep], alone[0][keep])


def test_unused_heads_contribute_nothing(device, token_path):
    att = make(device)
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64, device=device)
    choice = torch.full((2, 6), 2, device=device)  # 4 of 8 heads
    before = att(x, choice)
    with torch.no_grad():
        kv = att.kv_size
        att.qkv_proj.weight[kv + 4 * HEAD_DIM :].normal_()
        att.o_proj.weight[:, 4 * HEAD_DIM :].normal_()
    torch.testing.assert_close(att(x, choice), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_token_routing(device, dtype, token_path):
    att = make(device, dtype=torch.float64)
    x = torch.randn(2, 24, HIDDEN, dtype=torch.float64, device=device)
    choice = torch.randint(0, len(CHOICES), (2, 24), device=device)
    exact = run_reference(att, x, choice)
    low = att.to(dtype)
    ref_low = run_reference(low, x.to(dtype), choice)
    assert_close_to_reference(low(x.to(dtype), choice), ref_low, exact, factor=4.0)


def test_one_token_and_one_sequence(device, token_path):
    att = make(device)
    x = torch.randn(1, 1, HIDDEN, dtype=torch.float64, device=device)
    for choice in (torch.tensor([[1]], device=device), torch.tensor([1], device=device), 1):
        torch.testing.assert_close(att(x, choice), run_reference(att, x, torch.tensor([[1]], device=device)))


def test_non_contiguous_input(device, token_path):
    att = make(device)
    x = torch.randn(13, 3, HIDDEN, dtype=torch.float64, device=device).transpose(0, 1)
    choice = torch.randint(0, len(CHOICES), (13, 3), device=device).T
    assert not x.is_contiguous() and not choice.is_contiguous()
    torch.testing.assert_close(att(x, choice), run_reference(att, x.contiguous(), choice.contiguous()))


# ---------------------------------------------------------------------------------------
# KV cache: prefill + decode equals recomputing the whole sequence


@pytest.mark.parametrize("mode", ["static", "sequence", "token"])
def test_cached_decode_equals_full_recompute(device, mode, token_path):
    att = make(device)
    batch, steps, prefill = 3, 12, 7
    x = torch.randn(batch, steps, HIDDEN, dtype=torch.float64, device=device)
    mask = left_padding(batch, steps, device)
    token_choice = torch.randint(0, len(CHOICES), (batch, steps), device=device)
    if mode == "static":
        choices = [1] * steps
    elif mode == "sequence":
        choices = [torch.tensor([2, 0, 3], device=device)] * steps
    else:
        choices = [token_choice[:, s : s + 1] for s in range(steps)]
    full_choice = {"static": 1, "sequence": choices[0], "token": token_choice}[mode]
    full = att(x, full_choice, attention_mask=mask)

    cache = att.new_cache(batch, 32)
    first = {"static": 1, "sequence": choices[0], "token": token_choice[:, :prefill]}[mode]
    outs = [att(x[:, :prefill], first, attention_mask=mask[:, :prefill], cache=cache)]
    for s in range(prefill, steps):
        outs.append(att(x[:, s : s + 1], choices[s], attention_mask=mask[:, s : s + 1], cache=cache))
    assert cache.length == steps
    decoded = torch.cat(outs, dim=1)
    torch.testing.assert_close(decoded[mask.bool()], full[mask.bool()])


def test_decode_at_another_budget_than_prefill(device):
    att = make(device)
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64, device=device)
    choice = torch.zeros(2, 8, dtype=torch.long, device=device)
    choice[:, 5:] = 3  # prefill at full width, decode with 2 heads
    full = att(x, choice)
    cache = att.new_cache(2, 8)
    outs = [att(x[:, :5], 0, cache=cache)] + [att(x[:, s : s + 1], 3, cache=cache) for s in range(5, 8)]
    torch.testing.assert_close(torch.cat(outs, dim=1), full)


def test_cache_reset_and_overflow():
    att = make("cpu")
    cache = att.new_cache(1, 4)
    x = torch.randn(1, 3, HIDDEN, dtype=torch.float64)
    first = att(x, 0, cache=cache)
    with pytest.raises(ValueError, match="KVCache is full: 3 cached \\+ 3 new tokens > max_length 4"):
        att(x, 0, cache=cache)
    cache.reset()
    torch.testing.assert_close(att(x, 0, cache=cache), first)
    with pytest.raises(ValueError, match="batch=1"):
        att(torch.randn(2, 1, HIDDEN, dtype=torch.float64), 0, cache=cache)


# ---------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_token_routing(token_path):
    torch.manual_seed(0)
    att = ElasticAttention(16, 4, [4, 2], num_kv_heads=2, head_dim=4, qkv_bias=True, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    choice = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    weights = [att.qkv_proj.weight, att.qkv_proj.bias, att.o_proj.weight]

    def fn(x, w_qkv, b_qkv, w_o):
        with torch.nn.utils.stateless._reparametrize_module(
            att, {"qkv_proj.weight": w_qkv, "qkv_proj.bias": b_qkv, "o_proj.weight": w_o}
        ):
            return att(x, choice, attention_mask=mask)[mask.bool()]

    assert torch.autograd.gradcheck(fn, (x, *[w.detach().requires_grad_() for w in weights]))


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_gradients_match_reference(device, mode, token_path):
    att = make(device)
    x = torch.randn(3, 10, HIDDEN, dtype=torch.float64, device=device, requires_grad=True)
    seq_choice = torch.tensor([1, 3, 0], device=device)
    token_choice = torch.randint(0, len(CHOICES), (3, 10), device=device)
    choice = seq_choice if mode == "sequence" else token_choice
    expanded = seq_choice[:, None].expand(3, 10) if mode == "sequence" else token_choice
    grad_out = torch.randn(3, 10, HIDDEN, dtype=torch.float64, device=device)
    params = [x, att.qkv_proj.weight, att.qkv_proj.bias, att.o_proj.weight, att.o_proj.bias]
    ours = torch.autograd.grad(att(x, choice), params, grad_out)
    theirs = torch.autograd.grad(run_reference(att, x, expanded), params, grad_out)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_compiles_with_token_routing():
    att = make("cpu")
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64, requires_grad=True)
    choice = torch.randint(0, len(CHOICES), (2, 6))
    compiled = torch.compile(att, backend="aot_eager", fullgraph=True)
    out = compiled(x, choice)
    torch.testing.assert_close(out, att(x, choice))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_counts": [4, 8]}, "head_counts must be strictly decreasing, got \\[4, 8\\]"),
        ({"head_counts": [16, 8]}, "head_counts\\[0\\]=16 exceeds the available width 8"),
        ({"head_counts": [8, 6, 3]}, "whole query groups \\(multiples of 2\\), got \\[8, 6, 3\\]"),
        ({"num_kv_heads": 3}, "num_heads \\(8\\) must be a multiple of num_kv_heads \\(3\\)"),
        ({"hidden_size": 60, "head_dim": None}, "hidden_size \\(60\\) is not a multiple of num_heads"),
    ],
)
def test_bad_configuration(kwargs, message):
    config = {
        "hidden_size": HIDDEN,
        "num_heads": HEADS,
        "head_counts": CHOICES,
        "num_kv_heads": 4,
        "head_dim": 8,
    }
    config.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ElasticAttention(**config)


def test_bad_forward_input():
    att = make("cpu")
    x = torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    with pytest.raises(ValueError, match="x must be \\[batch, seq, 48\\]"):
        att(x[0])
    with pytest.raises(ValueError, match="choice must be in \\[0, 4\\), got 4"):
        att(x, 4)
    with pytest.raises(ValueError, match="choice values must be in \\[0, 4\\)"):
        att(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="choice must be an int, a tensor \\[batch=2\\]"):
        att(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        att(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="attention_mask must be \\[batch=2, seq=5\\]"):
        att(x, 0, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="choice"):
        att(x, torch.full((2, 5), 7))


# ---------------------------------------------------------------------------------------
# FlexAttention backend (token routing that skips unused heads)


EAGER_FLEX_WARNING = "ignore:flex_attention called without torch.compile"


@pytest.fixture
def eager_flex(monkeypatch):
    """Uncompiled FlexAttention: exact and quick to start at test sizes."""
    from torch.nn.attention.flex_attention import flex_attention

    from flextron import attention

    monkeypatch.setattr(attention, "_compiled_flex", {"cpu": flex_attention, "cuda": flex_attention})


@pytest.mark.filterwarnings(EAGER_FLEX_WARNING)
@pytest.mark.parametrize("padded", [False, True])
def test_flex_backend_matches_reference(device, eager_flex, padded):
    att = make(device)
    att.attention_backend = "flex"
    x = torch.randn(3, 11, HIDDEN, dtype=torch.float64, device=device)
    choice = torch.randint(0, len(CHOICES), (3, 11), device=device)
    mask = left_padding(3, 11, device) if padded else None
    rows = mask.bool() if padded else slice(None)
    with torch.no_grad():
        out = att(x, choice, attention_mask=mask)
    torch.testing.assert_close(out[rows], run_reference(att, x, choice, mask)[rows])


@pytest.mark.cuda
@pytest.mark.filterwarnings(EAGER_FLEX_WARNING)
def test_flex_backend_gradients_match_reference(eager_flex):
    att = make("cuda")
    att.attention_backend = "flex"
    x = torch.randn(3, 11, HIDDEN, dtype=torch.float64, device="cuda", requires_grad=True)
    choice = torch.randint(0, len(CHOICES), (3, 11), device="cuda")
    grad_out = torch.randn(3, 11, HIDDEN, dtype=torch.float64, device="cuda")
    params = (x, att.qkv_proj.weight, att.o_proj.weight)
    ours = torch.autograd.grad(att(x, choice), params, grad_out)
    theirs = torch.autograd.grad(run_reference(att, x, choice), params, grad_out)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_compiled_flex_backend(device):
    """The production path: FlexAttention compiled (a generated kernel), fp32."""
    att = make(device, dtype=torch.float32)
    att.attention_backend = "flex"
    x = torch.randn(2, 64, HIDDEN, device=device)
    choice = torch.randint(0, len(CHOICES), (2, 64), device=device)
    with torch.no_grad():
        out = att(x, choice)
    expected = run_reference(att.double(), x.double(), choice)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_flex_backend_has_no_cpu_backward():
    att = make("cpu")
    att.attention_backend = "flex"
    x = torch.randn(1, 3, HIDDEN, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="no backward pass on the CPU"):
        att(x, torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.filterwarnings(EAGER_FLEX_WARNING)
def test_flex_backend_cached_decode(device, eager_flex):
    att = make(device)
    att.attention_backend = "flex"
    x = torch.randn(2, 9, HIDDEN, dtype=torch.float64, device=device)
    choice = torch.randint(0, len(CHOICES), (2, 9), device=device)
    mask = left_padding(2, 9, device)
    cache = att.new_cache(2, 9)
    with torch.no_grad():
        full = att(x, choice, attention_mask=mask)
        outs = [att(x[:, :4], choice[:, :4], attention_mask=mask[:, :4], cache=cache)]
        outs += [
            att(x[:, s : s + 1], choice[:, s : s + 1], attention_mask=mask[:, s : s + 1], cache=cache)
            for s in range(4, 9)
        ]
    torch.testing.assert_close(torch.cat(outs, dim=1)[mask.bool()], full[mask.bool()])


def test_unknown_backend():
    with pytest.raises(
        ValueError, match="attention_backend must be one of \\('sdpa', 'flex'\\), got 'triton'"
    ):
        ElasticAttention(HIDDEN, HEADS, CHOICES, attention_backend="triton")
