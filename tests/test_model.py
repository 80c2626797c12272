"""ElasticLM on tiny random Llama-family and GPT-2 models built from transformers configs (no
download): equal to transformers at full width, permutation-invariant, exported sub-networks
load in plain transformers and match, routed forward equals the reference, cached generation
equals uncached."""

from __future__ import annotations

import pytest
import torch

from flextron import reference
from flextron.budgets import UniformLoss, choices_for_budget
from flextron.conversion import (
    elastic_config_from_hf,
    export_hf,
    from_hf,
    head_order,
    importance,
    permute_by_importance,
)
from flextron.model import ElasticConfig, Routing
from tests.conftest import require_module

transformers = require_module("transformers")

VOCAB = 96


def tiny_hf(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1
        )
        return transformers.GPT2LMHeadModel(config).eval()
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "llama3-tied":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common)
        return transformers.Qwen2ForCausalLM(config).eval()
    raise AssertionError(kind)


KINDS = ["llama", "llama3-tied", "qwen2", "gpt2"]


def randomize_biases(hf) -> None:
    """transformers initializes biases to zero; make them matter."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)


@pytest.fixture(params=KINDS)
def pair(request):
    hf = tiny_hf(request.param)
    randomize_biases(hf)
    model = from_hf(hf, elastic_config_from_hf(hf.config))
    return hf, model


def tokens(batch: int = 2, steps: int = 12) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_full_width_equals_transformers(pair):
    hf, model = pair
    ids = tokens()
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_permutation_keeps_the_full_width_model(pair):
    _hf, model = pair
    ids = tokens()
    before = model(ids)
    scores = importance(model, [ids], progress=False)
    assert all(s.shape == (model.config.intermediate_size,) for s in scores.mlp)
    assert all((s > 0).all() for s in scores.heads)
    permute_by_importance(model, scores)
    torch.testing.assert_close(model(ids), before, atol=2e-5, rtol=1e-4)
    # Every prefix now holds the most important units.
    rescored = importance(model, [ids], progress=False)
    for layer_scores in rescored.mlp:
        assert torch.all(layer_scores[:-1] >= layer_scores[1:] - 1e-9)


def test_head_order_keeps_whole_groups():
    scores = torch.tensor([1.0, 5.0, 0.5, 0.1, 3.0, 3.5, 2.0, 2.0])  # 4 KV groups of 2
    query_order, kv_order = head_order(scores, 4)
    assert kv_order.tolist() == [2, 0, 3, 1]  # group sums 6, 0.6, 6.5, 4
    assert query_order.tolist() == [5, 4, 1, 0, 6, 7, 2, 3]
    assert [q // 2 for q in query_order.tolist()] == [2, 2, 0, 0, 3, 3, 1, 1]


@torch.no_grad()
def test_exported_sub_networks_load_in_transformers(pair, tmp_path):
    hf, model = pair
    config = model.config
    ids = tokens()
    for m in range(len(config.mlp_widths)):
        for a, heads in enumerate(config.head_counts):
            exportable = config.hidden_size % heads == 0 and (
                config.architecture != "gpt2" or heads == config.num_heads
            )
            out = tmp_path / f"m{m}a{a}"
            if not exportable:
                with pytest.raises(ValueError, match="head"):
                    export_hf(model, hf.config.to_dict(), out, m, a)
                continue
            export_hf(model, hf.config.to_dict(), out, m, a)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
            assert loaded.num_parameters() < hf.num_parameters() or (m, a) == (0, 0)
            ours = model(ids, Routing.uniform(config.num_layers, m, a))
            torch.testing.assert_close(loaded(ids).logits, ours, atol=2e-5, rtol=1e-4)


def test_heterogeneous_export_is_refused(pair, tmp_path):
    hf, model = pair
    with pytest.raises(ValueError, match="one intermediate_size and one head count for all layers"):
        export_hf(model, hf.config.to_dict(), tmp_path, [0, 1], 0)


@torch.no_grad()
def test_routed_forward_equals_reference(pair):
    _, model = pair
    model = model.double()
    config = model.config
    ids = tokens(3, 10)
    gen = torch.Generator().manual_seed(2)
    mlp = torch.randint(0, len(config.mlp_widths), (config.num_layers, 3, 10), generator=gen)
    attention = torch.randint(0, len(config.head_counts), (config.num_layers, 3, 10), generator=gen)
    routing = Routing(list(mlp), list(attention))
    torch.testing.assert_close(model(ids, routing), reference.elastic_lm(model, ids, mlp, attention))
    # Static and per-sequence routings are special cases of per-token routing.
    static = Routing.uniform(config.num_layers, 1, len(config.head_counts) - 1)
    full_static = torch.ones_like(mlp), torch.full_like(attention, len(config.head_counts) - 1)
    torch.testing.assert_close(model(ids, static), reference.elastic_lm(model, ids, *full_static))
    per_sequence = Routing([torch.tensor([0, 2, 1])] * config.num_layers, [torch.tensor([1, 0, 1])] * 2)
    expanded_mlp = torch.tensor([0, 2, 1])[None, :, None].expand(config.num_layers, 3, 10)
    expanded_attention = torch.tensor([1, 0, 1])[None, :, None].expand(config.num_layers, 3, 10)
    torch.testing.assert_close(
        model(ids, per_sequence), reference.elastic_lm(model, ids, expanded_mlp, expanded_attention)
    )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_with_cache_equals_without(kind):
    hf = tiny_hf(kind)
    model = from_hf(hf, elastic_config_from_hf(hf.config))
    ids = tokens(3, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    layers = model.config.num_layers
    for routing in (None, Routing.uniform(layers, 1, 1), Routing([torch.tensor([0, 2, 1])] * layers, [1, 0])):
        cached = model.generate(ids, 9, routing, attention_mask=mask)
        uncached = model.generate(ids, 9, routing, attention_mask=mask, use_cache=False)
        assert torch.equal(cached, uncached)
        assert cached.shape == (3, 16)
    sampled = [
        model.generate(ids, 5, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(*sampled)


@torch.no_grad()
def test_greedy_generate_matches_transformers():
    hf = tiny_hf("llama")
    model = from_hf(hf, elastic_config_from_hf(hf.config))
    ids = tokens(1, 6)
    ours = model.generate(ids, 8)
    theirs = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert torch.equal(ours, theirs)


def test_budget_choice():
    hf = tiny_hf("llama")
    config = elastic_config_from_hf(hf.config)
    assert config.mlp_widths == (256, 192, 128, 64) and config.head_counts == (8, 6, 4, 2)
    full = choices_for_budget(config, 1.0)
    assert (full.mlp, full.attention, full.active_fraction) == (0, 0, 1.0)
    losses = [
        UniformLoss(m, a, float(m + 3 * a))
        for m in range(len(config.mlp_widths))
        for a in range(len(config.head_counts))
    ]
    previous = None
    for budget in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
        choice = choices_for_budget(config, budget, losses)
        assert choice.active_fraction <= budget + 1e-9
        loss = choice.mlp + 3 * choice.attention
        assert previous is None or loss >= previous  # a smaller budget is never better
        previous = loss
    with pytest.raises(ValueError, match=r"budget 0\.01 is below the smallest sub-network"):
        choices_for_budget(config, 0.01)
    with pytest.raises(ValueError, match="budget must be in \\(0, 1\\]"):
        choices_for_budget(config, 1.5)


def test_config_round_trip_and_validation():
    hf = tiny_hf("llama3-tied")
    config = elastic_config_from_hf(hf.config)
    assert ElasticConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ElasticConfig fields"):
        ElasticConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="mlp_widths must start with the full intermediate_size 256"):
        ElasticConfig.from_dict({**config.to_dict(), "mlp_widths": [128, 64]})


def test_bad_routing():
    hf = tiny_hf("llama")
    model = from_hf(hf, elastic_config_from_hf(hf.config))
    with pytest.raises(ValueError, match="one MLP and one attention choice per layer \\(2\\)"):
        model(tokens(), Routing([0], [0]))
    with pytest.raises(ValueError, match="input_ids must be \\[batch, seq\\]"):
        model(tokens()[0])
    with pytest.raises(ValueError, match="static or per-sequence routing"):
        model.generate(tokens(), 2, Routing([torch.zeros(2, 12, dtype=torch.long)] * 2, [0, 0]))
