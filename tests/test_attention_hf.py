"""ElasticAttention equals Hugging Face transformers' attention: Llama (RoPE, llama3 RoPE
scaling, GQA, biases) at every static head count on sliced weights, and GPT-2 at full width."""

from __future__ import annotations

import pytest
import torch

from flextron.layers import ElasticAttention
from flextron.rope import RopeScaling, rope_frequencies
from tests.conftest import require_module

transformers = require_module("transformers")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 48, 8, 4, 16
CHOICES = [8, 6, 4, 2]


def additive_causal_mask(steps: int, dtype) -> torch.Tensor:
    blocked = torch.triu(torch.ones(steps, steps, dtype=torch.bool), diagonal=1)
    return torch.zeros(steps, steps, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def hf_llama_attention(att: ElasticAttention, heads: int, rope_parameters: dict):
    """A transformers LlamaAttention holding ``att``'s first ``heads`` query heads."""
    group = att.num_heads // att.num_kv_heads
    config = transformers.LlamaConfig(
        hidden_size=att.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=heads // group,
        head_dim=att.head_dim,
        attention_bias=att.qkv_proj.bias is not None,
        rope_parameters=rope_parameters,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "eager"
    hf = transformers.models.llama.modeling_llama.LlamaAttention(config, layer_idx=0).double().eval()
    kv_used = heads // group * att.head_dim
    kv_total = att.num_kv_heads * att.head_dim
    weight, bias = att.qkv_proj.weight, att.qkv_proj.bias
    with torch.no_grad():
        hf.k_proj.weight.copy_(weight[:kv_used])
        hf.v_proj.weight.copy_(weight[kv_total : kv_total + kv_used])
        hf.q_proj.weight.copy_(weight[2 * kv_total : 2 * kv_total + heads * att.head_dim])
        hf.o_proj.weight.copy_(att.o_proj.weight[:, : heads * att.head_dim])
        if bias is not None:
            hf.k_proj.bias.copy_(bias[:kv_used])
            hf.v_proj.bias.copy_(bias[kv_total : kv_total + kv_used])
            hf.q_proj.bias.copy_(bias[2 * kv_total : 2 * kv_total + heads * att.head_dim])
            hf.o_proj.bias.copy_(att.o_proj.bias)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).double()
    return hf, rotary


ROPES = {
    "default": ({"rope_type": "default", "rope_theta": 10000.0}, None, 10000.0),
    "llama3": (
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
        500000.0,
    ),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("choice", range(len(CHOICES)))
def test_static_heads_equal_hf_llama_on_sliced_weights(rope, choice):
    rope_parameters, scaling, theta = ROPES[rope]
    torch.manual_seed(0)
    att = ElasticAttention(
        HIDDEN, HEADS, CHOICES, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, qkv_bias=True, out_bias=True,
        rope_theta=theta, rope_scaling=scaling, dtype=torch.float64,
    )  # fmt: skip
    hf, rotary = hf_llama_attention(att, CHOICES[choice], rope_parameters)
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float64)
    positions = torch.arange(40)[None].expand(2, 40)
    expected, _ = hf(x, rotary(x, positions), additive_causal_mask(40, torch.float64))
    torch.testing.assert_close(att(x, choice), expected)
    if choice == 0:  # full width, token-routed path
        torch.testing.assert_close(att(x, torch.zeros(2, 40, dtype=torch.long)), expected)


def test_rope_frequencies_equal_hf():
    for rope_parameters, scaling, theta in ROPES.values():
        config = transformers.LlamaConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, head_dim=HEAD_DIM, rope_parameters=rope_parameters
        )
        hf = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)
        torch.testing.assert_close(rope_frequencies(HEAD_DIM, theta, scaling), hf.inv_freq.float())


def test_full_heads_equal_hf_gpt2():
    config = transformers.GPT2Config(n_embd=HIDDEN, n_head=HEADS, n_positions=64)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.models.gpt2.modeling_gpt2.GPT2Attention(config, layer_idx=0).double().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    att = ElasticAttention(
        HIDDEN, HEADS, [8, 4, 2], qkv_bias=True, out_bias=True, rope_theta=None, dtype=torch.float64
    )
    q, k, v = hf.c_attn.weight.T.split(HIDDEN, dim=0)  # Conv1D stores [in, out]
    qb, kb, vb = hf.c_attn.bias.split(HIDDEN)
    with torch.no_grad():
        att.qkv_proj.weight.copy_(torch.cat([k, v, q]))
        att.qkv_proj.bias.copy_(torch.cat([kb, vb, qb]))
        att.o_proj.weight.copy_(hf.c_proj.weight.T)
        att.o_proj.bias.copy_(hf.c_proj.bias)
    x = torch.randn(3, 20, HIDDEN, dtype=torch.float64)
    expected = hf(x, attention_mask=additive_causal_mask(20, torch.float64))[0]
    torch.testing.assert_close(att(x, 0), expected)
    torch.testing.assert_close(att(x, torch.zeros(3, dtype=torch.long)), expected)
