"""Elastic checkpoints: a round trip keeps the model exactly; missing, corrupt or mismatched
files give clear errors; writes are atomic."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flextron import checkpoint
from flextron.checkpoint import CheckpointError, load_elastic, save_elastic
from flextron.model import ElasticConfig, ElasticLM, Routing


def tiny(tied: bool, architecture: str = "llama") -> ElasticLM:
    torch.manual_seed(0)
    config = ElasticConfig(
        architecture=architecture,
        vocab_size=50,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        mlp_widths=(64, 32),
        head_counts=(4, 2),
        tie_embeddings=tied,
        rope_theta=10000.0 if architecture == "llama" else None,
        activation="swiglu" if architecture == "llama" else "gelu_tanh",
    )
    return ElasticLM(config).eval()


@pytest.mark.parametrize(("tied", "architecture"), [(False, "llama"), (True, "llama"), (True, "gpt2")])
def test_round_trip(tmp_path, tied, architecture):
    model = tiny(tied, architecture)
    save_elastic(model, tmp_path, {"note": "hello"})
    loaded, record = load_elastic(tmp_path)
    assert record["note"] == "hello"
    ids = torch.randint(0, 50, (2, 9))
    routing = Routing.uniform(2, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, routing), model(ids, routing), atol=0, rtol=0)
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_elastic(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"flextron\.json is missing"):
        load_elastic(tmp_path)
    save_elastic(tiny(False), tmp_path)
    weights, meta = tmp_path / checkpoint.WEIGHTS, tmp_path / checkpoint.METADATA
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
        load_elastic(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_elastic(tmp_path)
    weights.write_bytes(good)
    record = json.loads(meta.read_text())
    meta.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"flextron\.json is corrupt"):
        load_elastic(tmp_path)
    meta.write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_elastic(tmp_path)
    meta.write_text(
        json.dumps({**record, "config": {**record["config"], "intermediate_size": 128, "mlp_widths": [128]}})
    )
    with pytest.raises(CheckpointError, match=r"is torch.float32 \(\d+, \d+\), expected torch.float32 \("):
        load_elastic(tmp_path)
    meta.write_text(json.dumps({**record, "config": {**record["config"], "num_layers": 3}}))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_elastic(tmp_path)


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model = tiny(False)
    save_elastic(model, tmp_path)
    before = (tmp_path / checkpoint.WEIGHTS).read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with torch.no_grad():
        model.embed_tokens.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_elastic(model, tmp_path)
    assert (tmp_path / checkpoint.WEIGHTS).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
