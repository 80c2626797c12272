"""Hugging Face <-> flextron: import a pretrained causal LM, score neurons and heads on
calibration text, permute the weights so every prefix holds the most important units, and
export a static sub-network back as a plain Hugging Face checkpoint.

Supported: the Llama family (``llama``, ``mistral`` without sliding windows, ``qwen2``;
SmolLM is ``llama``) and ``gpt2``. Everything is read from local directories
(``local_files_only=True``): nothing is downloaded.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flextron.budgets import UniformLoss
from flextron.checkpoint import load_tokenizer, save_elastic
from flextron.data import Text, token_windows
from flextron.evaluation import mean_loss
from flextron.model import ElasticConfig, ElasticLM, Routing
from flextron.outputs import atomic_write_json, check_free, check_not_source, staged_directory
from flextron.rope import RopeScaling
from flextron.runtime import DtypeName, resolve_dtype

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_FAMILY, "gpt2")
MLP_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
HEAD_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
MLP_MULTIPLE = 64


class UnsupportedModelError(ValueError):
    """The Hugging Face model's architecture or options are outside what flextron converts."""


# ---------------------------------------------------------------------------------------
# Loading


def read_hf_config(model_dir: str | Path):
    """A local Hugging Face model's config, checked to be one flextron converts."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    check_supported(hf_config)
    return hf_config


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True):
    """A local Hugging Face causal LM (safetensors, or a pytorch_model.bin holding only tensors)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    read_hf_config(model_dir)
    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickled object
        raise UnsupportedModelError(
            f"{model_dir}: its pytorch_model.bin holds pickled code, which is never loaded; "
            "convert a safetensors checkpoint instead"
        ) from None
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return model.eval()


def load_hf(model_dir: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True):
    """``(model, tokenizer)`` from a local Hugging Face directory (config.json + weights)."""
    read_hf_config(model_dir)
    tokenizer = load_tokenizer(model_dir)
    return load_hf_model(model_dir, dtype, progress), tokenizer


def check_supported(hf_config) -> None:
    kind = hf_config.model_type
    if kind not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {kind!r} is not supported: flextron converts {', '.join(SUPPORTED)}"
        )
    if kind in LLAMA_FAMILY:
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(
                f"{kind} with hidden_act={act!r}: only SwiGLU (silu) MLPs are supported"
            )
        if getattr(hf_config, "mlp_bias", False):
            raise UnsupportedModelError(f"{kind} with mlp_bias=True is not supported")
        window = getattr(hf_config, "sliding_window", None)
        if window is not None and (kind != "qwen2" or getattr(hf_config, "use_sliding_window", False)):
            raise UnsupportedModelError(f"{kind} with sliding-window attention ({window}) is not supported")
        rope = _rope_parameters(hf_config)
        if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(
                f"RoPE type {rope.get('rope_type')!r} is not supported (default, linear, llama3)"
            )
    else:
        if hf_config.activation_function not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(
                f"gpt2 with activation {hf_config.activation_function!r} is not supported"
            )
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
            raise UnsupportedModelError("gpt2 with non-standard attention scaling is not supported")


def _rope_parameters(hf_config) -> dict[str, Any]:
    params = getattr(hf_config, "rope_parameters", None) or {}
    if not params:  # transformers 4.x
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        if "type" in params:
            params["rope_type"] = params.pop("type")
    return dict(params)


def nested_choices(full: int, fractions: Sequence[float], multiple: int) -> tuple[int, ...]:
    """Strictly decreasing widths ``round(full * f)`` in steps of ``multiple`` (the full width
    itself is kept as it is)."""
    values = {full} | {max(multiple, round(full * f / multiple) * multiple) for f in fractions}
    return tuple(sorted((v for v in values if v <= full), reverse=True))


def default_mlp_widths(inner: int) -> tuple[int, ...]:
    """The MLP width choices conversion gives an MLP of ``inner`` neurons by default."""
    return nested_choices(inner, MLP_FRACTIONS, MLP_MULTIPLE)


def elastic_config_from_hf(
    hf_config,
    mlp_widths: Sequence[int] | None = None,
    head_counts: Sequence[int] | None = None,
) -> ElasticConfig:
    """The ElasticConfig of a Hugging Face config. Width choices default to
    :data:`MLP_FRACTIONS` of the MLP (multiples of 64 neurons) and :data:`HEAD_FRACTIONS` of
    the query heads (whole GQA groups)."""
    check_supported(hf_config)
    if hf_config.model_type == "gpt2":
        hidden, heads, inner = hf_config.n_embd, hf_config.n_head, hf_config.n_inner or 4 * hf_config.n_embd
        common = _gpt2_fields(hf_config)
    else:
        hidden, heads, inner = (
            hf_config.hidden_size,
            hf_config.num_attention_heads,
            hf_config.intermediate_size,
        )
        common = _llama_fields(hf_config)
    group = heads // common["num_kv_heads"]
    return ElasticConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=inner,
        mlp_widths=tuple(mlp_widths) if mlp_widths else default_mlp_widths(inner),
        head_counts=tuple(head_counts) if head_counts else nested_choices(heads, HEAD_FRACTIONS, group),
        pad_token_id=_token_id(hf_config, "pad_token_id"),
        bos_token_id=_token_id(hf_config, "bos_token_id"),
        eos_token_id=_token_id(hf_config, "eos_token_id"),
        **common,
    )


def _gpt2_fields(hf_config) -> dict[str, Any]:
    """The ElasticConfig fields of a GPT-2 config (beyond the sizes)."""
    hidden, heads = hf_config.n_embd, hf_config.n_head
    return {
        "architecture": "gpt2",
        "num_layers": hf_config.n_layer,
        "num_kv_heads": heads,
        "head_dim": hidden // heads,
        "max_positions": hf_config.n_positions,
        "norm_eps": hf_config.layer_norm_epsilon,
        "activation": "gelu" if hf_config.activation_function == "gelu" else "gelu_tanh",
        "rope_theta": None,
        "tie_embeddings": True,
        "qkv_bias": True,
        "out_bias": True,
        "mlp_bias": True,
    }


def _llama_fields(hf_config) -> dict[str, Any]:
    """The ElasticConfig fields of a Llama-family config (beyond the sizes)."""
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    rope = _rope_parameters(hf_config)
    kind = rope.get("rope_type", "default")
    scaling = None
    if kind == "linear":
        scaling = RopeScaling("linear", float(rope["factor"]))
    elif kind == "llama3":
        scaling = RopeScaling(
            "llama3",
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"]),
        )
    return {
        "architecture": "llama",
        "num_layers": hf_config.num_hidden_layers,
        "num_kv_heads": hf_config.num_key_value_heads or heads,
        "head_dim": getattr(hf_config, "head_dim", None) or hidden // heads,
        "max_positions": hf_config.max_position_embeddings,
        "norm_eps": hf_config.rms_norm_eps,
        "activation": "swiglu",
        "rope_theta": float(rope.get("rope_theta", 10000.0)),
        "rope_scaling": scaling,
        "tie_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
        "qkv_bias": bool(getattr(hf_config, "attention_bias", False)) or hf_config.model_type == "qwen2",
        "out_bias": bool(getattr(hf_config, "attention_bias", False)),
        "mlp_bias": False,
    }


def _token_id(hf_config, name: str) -> int | None:
    value = getattr(hf_config, name, None)
    if isinstance(value, list):
        value = value[0] if value else None
    return value


# ---------------------------------------------------------------------------------------
# Weight mapping


def _qkv(k: Tensor, v: Tensor, q: Tensor) -> Tensor:
    return torch.cat([k, v, q], dim=0)


def from_hf(hf_model, config: ElasticConfig) -> ElasticLM:
    """An ElasticLM holding ``hf_model``'s weights (fp32 copies)."""
    with torch.device("meta"):
        model = ElasticLM(config)
    state = hf_to_flextron_state(hf_model.state_dict(), config)
    model.load_state_dict(state, strict=False, assign=True)
    model.finish_loading("cpu")
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UnsupportedModelError(f"weights missing from the Hugging Face model: {missing[:5]}")
    return model.eval()


def hf_to_flextron_state(hf: dict[str, Tensor], config: ElasticConfig) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        if name not in hf:
            raise UnsupportedModelError(f"the Hugging Face model has no {name}")
        return hf[name].detach().float().clone()

    if config.architecture == "gpt2":
        prefix = "transformer." if "transformer.wte.weight" in hf else ""
        state["embed_tokens.weight"] = take(f"{prefix}wte.weight")
        state["embed_positions.weight"] = take(f"{prefix}wpe.weight")
        hidden = config.hidden_size
        for i in range(config.num_layers):
            h, o = f"{prefix}h.{i}.", f"layers.{i}."
            q, k, v = take(h + "attn.c_attn.weight").T.split(hidden, dim=0)  # Conv1D is [in, out]
            qb, kb, vb = take(h + "attn.c_attn.bias").split(hidden)
            state[o + "attention.qkv_proj.weight"] = _qkv(k, v, q)
            state[o + "attention.qkv_proj.bias"] = _qkv(kb, vb, qb)
            state[o + "attention.o_proj.weight"] = take(h + "attn.c_proj.weight").T.contiguous()
            state[o + "attention.o_proj.bias"] = take(h + "attn.c_proj.bias")
            state[o + "mlp.up.weight"] = take(h + "mlp.c_fc.weight").T.contiguous()
            state[o + "mlp.up.bias"] = take(h + "mlp.c_fc.bias")
            state[o + "mlp.down.weight"] = take(h + "mlp.c_proj.weight").T.contiguous()
            state[o + "mlp.down.bias"] = take(h + "mlp.c_proj.bias")
            for ours, theirs in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
                state[f"{o}{ours}.weight"] = take(f"{h}{theirs}.weight")
                state[f"{o}{ours}.bias"] = take(f"{h}{theirs}.bias")
        state["norm.weight"] = take(f"{prefix}ln_f.weight")
        state["norm.bias"] = take(f"{prefix}ln_f.bias")
        return state

    state["embed_tokens.weight"] = take("model.embed_tokens.weight")
    for i in range(config.num_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        attn = h + "self_attn."
        state[o + "attention.qkv_proj.weight"] = _qkv(
            take(attn + "k_proj.weight"), take(attn + "v_proj.weight"), take(attn + "q_proj.weight")
        )
        if config.qkv_bias:
            state[o + "attention.qkv_proj.bias"] = _qkv(
                take(attn + "k_proj.bias"), take(attn + "v_proj.bias"), take(attn + "q_proj.bias")
            )
        state[o + "attention.o_proj.weight"] = take(attn + "o_proj.weight")
        if config.out_bias:
            state[o + "attention.o_proj.bias"] = take(attn + "o_proj.bias")
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            state[f"{o}mlp.{ours}.weight"] = take(f"{h}mlp.{theirs}.weight")
        state[o + "attention_norm.weight"] = take(h + "input_layernorm.weight")
        state[o + "mlp_norm.weight"] = take(h + "post_attention_layernorm.weight")
    state["norm.weight"] = take("model.norm.weight")
    if not config.tie_embeddings:
        state["lm_head.weight"] = take("lm_head.weight")
    return state


# ---------------------------------------------------------------------------------------
# Importance and permutation


@dataclass
class Importance:
    """Per layer: ``mlp[i]`` sums |activation| of each MLP neuron over the calibration tokens,
    ``heads[i]`` sums |output| of each query head (before the output projection)."""

    mlp: list[Tensor]
    heads: list[Tensor]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "mlp": [t.tolist() for t in self.mlp],
            "heads": [t.tolist() for t in self.heads],
        }


@torch.no_grad()
def importance(model: ElasticLM, batches: Sequence[Tensor], progress: bool = True) -> Importance:
    """Score every MLP neuron and attention head over the calibration batches (full width)."""
    device = next(model.parameters()).device
    mlp_scores = [torch.zeros(layer.mlp.up.out_features, dtype=torch.float64) for layer in model.layers]
    head_scores = [torch.zeros(layer.attention.num_heads, dtype=torch.float64) for layer in model.layers]
    hooks = []
    for i, layer in enumerate(model.layers):

        def on_hidden(module, args, out, i=i):
            mlp_scores[i] += out.abs().sum(dim=0).double().cpu()

        def on_heads(module, args, out, i=i):
            head_scores[i] += out.abs().sum(dim=(0, 1, 3)).double().cpu()

        hooks.append(layer.mlp.hidden_probe.register_forward_hook(on_hidden))
        hooks.append(layer.attention.heads_probe.register_forward_hook(on_heads))
    tokens = 0
    try:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            model(batch.to(device))
            tokens += batch.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return Importance(mlp_scores, head_scores, tokens)


def head_order(scores: Tensor, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """``(query_order, kv_order)``: KV groups by summed importance (descending) and, within
    each group, its query heads by importance, so that every prefix of whole groups keeps
    the best groups and each query head keeps its KV head."""
    group = scores.numel() // num_kv_heads
    grouped = scores.view(num_kv_heads, group)
    kv_order = torch.argsort(grouped.sum(dim=1), descending=True, stable=True)
    query_order = torch.cat(
        [g * group + torch.argsort(grouped[g], descending=True, stable=True) for g in kv_order.tolist()]
    )
    return query_order, kv_order


def _rows(order: Tensor, block: int) -> Tensor:
    """Row indices that move whole blocks of ``block`` rows into ``order``."""
    return (order[:, None] * block + torch.arange(block)).reshape(-1)


@torch.no_grad()
def permute_by_importance(model: ElasticLM, scores: Importance) -> None:
    """Reorder neurons and heads (in place) so that each width prefix keeps the most
    important ones. The full-width model computes the same function."""
    config = model.config
    d = config.head_dim
    for layer, mlp_score, head_score in zip(model.layers, scores.mlp, scores.heads, strict=True):
        mlp = layer.mlp
        order = torch.argsort(mlp_score, descending=True, stable=True).to(mlp.up.weight.device)
        for linear in (mlp.up, mlp.gate):
            if linear is not None:
                linear.weight.copy_(linear.weight[order])
                if linear.bias is not None:
                    linear.bias.copy_(linear.bias[order])
        mlp.down.weight.copy_(mlp.down.weight[:, order])

        attn = layer.attention
        query_order, kv_order = head_order(head_score, config.num_kv_heads)
        kv_rows = _rows(kv_order, d)
        kv_half = config.num_kv_heads * d
        rows = torch.cat([kv_rows, kv_half + kv_rows, 2 * kv_half + _rows(query_order, d)])
        rows = rows.to(attn.qkv_proj.weight.device)
        attn.qkv_proj.weight.copy_(attn.qkv_proj.weight[rows])
        if attn.qkv_proj.bias is not None:
            attn.qkv_proj.bias.copy_(attn.qkv_proj.bias[rows])
        columns = _rows(query_order, d).to(attn.o_proj.weight.device)
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, columns])


def uniform_losses(model: ElasticLM, batches: Sequence[Tensor], progress: bool = True) -> list[UniformLoss]:
    """Mean next-token loss of every uniform sub-network (one MLP and one head choice in all
    layers) on ``batches``: the table budgets are resolved with before routers exist."""
    config = model.config
    pairs = [(m, a) for m in range(len(config.mlp_widths)) for a in range(len(config.head_counts))]
    return [
        UniformLoss(m, a, mean_loss(model, batches, Routing.uniform(config.num_layers, m, a))[0])
        for m, a in tqdm(pairs, desc="sub-network losses", unit="net", disable=not progress)
    ]


# ---------------------------------------------------------------------------------------
# The whole conversion


@dataclass
class ConvertOptions:
    mlp_widths: Sequence[int] | None = None
    head_counts: Sequence[int] | None = None
    seq_len: int = 256
    max_tokens: int = 16384
    batch_size: int = 8
    table_tokens: int = 1024  # calibration tokens each uniform sub-network's loss is measured on
    device: str = "cpu"
    dtype: DtypeName | torch.dtype = "auto"  # compute dtype (autocast); the weights stay fp32
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.seq_len, self.max_tokens, self.batch_size, self.table_tokens) <= 0:
            raise ValueError("seq_len, max_tokens, batch_size and table_tokens must be positive")


def convert(
    model_dir: str | Path,
    calibration: Sequence[Text],
    out: str | Path,
    options: ConvertOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Load a Hugging Face model, score it on ``calibration`` text, permute it and save an
    elastic checkpoint to ``out``: refused before any work when ``out`` holds something
    (unless ``overwrite``) or overlaps the model; written whole (flextron.outputs)."""
    options = options or ConvertOptions()
    out = Path(out)
    check_not_source(out, Path(model_dir))
    check_free(out, overwrite)
    # The cheap checks first: a bad tokenizer or too little text is refused before the weights load.
    config = elastic_config_from_hf(read_hf_config(model_dir), options.mlp_widths, options.head_counts)
    tokenizer = load_tokenizer(model_dir)
    batches = list(
        token_windows(
            tokenizer,
            calibration,
            options.seq_len,
            options.max_tokens,
            options.batch_size,
            config.eos_token_id,
            flag="--calib",
        )
    )
    model = from_hf(load_hf_model(model_dir, progress=options.progress), config).to(options.device)
    dtype = resolve_dtype(options.dtype, options.device)
    device_type = torch.device(options.device).type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        scores = importance(model, batches, progress=options.progress)
    permute_by_importance(model, scores)
    windows = torch.cat(batches)[-max(1, options.table_tokens // options.seq_len) :]
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        losses = uniform_losses(model, windows.split(options.batch_size), progress=options.progress)
    source = source_config_dict(model_dir)
    metadata = {
        "source": {
            "path": str(Path(model_dir).resolve()),
            "model_type": source["model_type"],
            "config": source,
        },
        "calibration": {
            "texts": [t.name for t in calibration][:200],
            "tokens": scores.tokens,
            "seq_len": options.seq_len,
        },
        "importance": scores.to_dict(),
        "uniform_losses": [asdict(entry) for entry in losses],
    }
    with staged_directory(out, overwrite) as staging:
        save_elastic(model.cpu(), staging, metadata, tokenizer)
    return out


def source_config_dict(model_dir: str | Path) -> dict[str, Any]:
    """The source config as a plain dict, without loader-only entries (GGUF quantization)."""
    from transformers import AutoConfig

    data = AutoConfig.from_pretrained(model_dir, local_files_only=True).to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        data.pop(key, None)
    return data


# ---------------------------------------------------------------------------------------
# Export


def export_hf(
    model: ElasticLM,
    source_config: dict[str, Any],
    out: str | Path,
    mlp_choice: int | Sequence[int],
    attention_choice: int | Sequence[int],
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Write the static sub-network (one MLP and one attention choice per layer, or the same
    for all) as a Hugging Face checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads,
    in the model's dtype. The limits of :func:`hf_submodel` apply; ``out`` is written whole
    and must be free unless ``overwrite`` (flextron.outputs)."""
    out = Path(out)
    check_free(out, overwrite)
    hf_model, width, heads = hf_submodel(model, source_config, mlp_choice, attention_choice)
    with staged_directory(out, overwrite) as staging:
        hf_model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_json(
            staging / "flextron_export.json",
            {
                "mlp_width": width,
                "heads": heads,
                "kv_heads": heads // model.config.head_group,
                "mlp_choice": model.config.mlp_widths.index(width),
                "attention_choice": model.config.head_counts.index(heads),
            },
        )
    return out


def _uniform_choices(
    config: ElasticConfig, mlp_choice: int | Sequence[int], attention_choice: int | Sequence[int]
) -> tuple[list[int], list[int]]:
    """Per-layer choice indices, checked: in range, and equal across layers (transformers'
    configs hold one MLP size and one head count)."""
    layers = config.num_layers
    mlp_choices = [mlp_choice] * layers if isinstance(mlp_choice, int) else list(mlp_choice)
    attention_choices = (
        [attention_choice] * layers if isinstance(attention_choice, int) else list(attention_choice)
    )
    if len(mlp_choices) != layers or len(attention_choices) != layers:
        raise ValueError(f"need one choice per layer ({layers})")
    for flag, choices, count, what in (
        ("--mlp-choice", mlp_choices, len(config.mlp_widths), "MLP widths"),
        ("--attention-choice", attention_choices, len(config.head_counts), "head counts"),
    ):
        bad = [c for c in choices if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < count]
        if bad:
            raise ValueError(
                f"{flag} must be an index in [0, {count}) (one of the {count} {what}), got {bad[0]!r}"
            )
    if len(set(mlp_choices)) > 1 or len(set(attention_choices)) > 1:
        raise ValueError(
            "per-layer widths differ, but transformers' Llama/GPT-2 configs hold one intermediate_size and "
            "one head count for all layers: export a uniform choice (or run the sub-network in flextron)"
        )
    return mlp_choices, attention_choices


def hf_submodel(
    model: ElasticLM,
    source_config: dict[str, Any],
    mlp_choice: int | Sequence[int],
    attention_choice: int | Sequence[int],
):
    """``(hf_model, mlp_width, heads)``: the static sub-network as a plain transformers model
    (in memory, the model's dtype and device) built from ``source_config`` (the source
    model's config dict) with the sub-network's sizes.

    Transformers' Llama and GPT-2 configs have one MLP size and one head count for all
    layers, so per-layer choices must be equal; they require the hidden size to be a
    multiple of the head count; and GPT-2 ties its head size to ``n_embd / n_head``, so its
    sub-networks keep all heads. Each limit raises a ValueError that names it.
    """
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = model.config
    mlp_choices, attention_choices = _uniform_choices(config, mlp_choice, attention_choice)
    width = config.mlp_widths[mlp_choices[0]]
    heads = config.head_counts[attention_choices[0]]
    kv_heads = heads // config.head_group
    d = config.head_dim
    data = dict(source_config)
    if config.architecture == "gpt2":
        if heads != config.num_heads:
            raise ValueError(
                f"GPT-2 sub-networks keep all {config.num_heads} heads: its config ties head size to "
                f"n_embd / n_head (asked for {heads})"
            )
        data["n_inner"] = width
    else:
        if config.hidden_size % heads:
            valid = [h for h in config.head_counts if config.hidden_size % h == 0]
            raise ValueError(
                f"transformers' {source_config['model_type']} config requires hidden_size "
                f"({config.hidden_size}) to be a multiple of the head count, so {heads} heads cannot be "
                f"exported (exportable head choices: {valid}); the sub-network runs in flextron"
            )
        data.update(
            intermediate_size=width, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d
        )
    data.pop("model_type", None)
    hf_config = CONFIG_MAPPING[source_config["model_type"]](**data)
    weight = model.embed_tokens.weight
    with torch.device(weight.device):  # built where the weights are (no host round trip on a GPU)
        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=weight.dtype)
    state = flextron_to_hf_state(model, width, heads)
    result = hf_model.load_state_dict(state, strict=False)
    unexpected_missing = [
        k for k in result.missing_keys if not k.endswith("attn.bias") and k != "lm_head.weight"
    ]
    if unexpected_missing or result.unexpected_keys:
        raise RuntimeError(
            f"export mapping is incomplete: missing {unexpected_missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if getattr(hf_config, "tie_word_embeddings", False):
        hf_model.tie_weights()
    return hf_model.eval(), width, heads


def flextron_to_hf_state(model: ElasticLM, width: int, heads: int) -> dict[str, Tensor]:
    """The transformers state dict of the uniform sub-network with ``width`` MLP neurons and
    ``heads`` query heads (copies: the elastic model is left as it is)."""
    gpt2 = model.config.architecture == "gpt2"
    layer_state = _gpt2_layer_state if gpt2 else _llama_layer_state
    state: dict[str, Tensor] = {}
    for i, layer in enumerate(model.layers):
        state |= layer_state(f"transformer.h.{i}." if gpt2 else f"model.layers.{i}.", layer, width, heads)
    if gpt2:
        state["transformer.wte.weight"] = model.embed_tokens.weight
        state["transformer.wpe.weight"] = model.embed_positions.weight
        state["transformer.ln_f.weight"] = model.norm.weight
        state["transformer.ln_f.bias"] = model.norm.bias
    else:
        state["model.embed_tokens.weight"] = model.embed_tokens.weight
        state["model.norm.weight"] = model.norm.weight
        if not model.config.tie_embeddings:
            state["lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def _kvq(fused: Tensor, attention, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The K, V and Q rows that ``heads`` query heads use, of the fused ``[K; V; Q]``
    projection's weight or bias."""
    d = attention.head_dim
    kv_half, kv = attention.num_kv_heads * d, heads // (attention.num_heads // attention.num_kv_heads) * d
    return fused[:kv], fused[kv_half : kv_half + kv], fused[2 * kv_half : 2 * kv_half + heads * d]


def _llama_layer_state(prefix: str, layer, width: int, heads: int) -> dict[str, Tensor]:
    attn, mlp = layer.attention, layer.mlp
    state = {}
    for name, w in zip(("k", "v", "q"), _kvq(attn.qkv_proj.weight, attn, heads), strict=True):
        state[f"{prefix}self_attn.{name}_proj.weight"] = w
    if attn.qkv_proj.bias is not None:
        for name, b in zip(("k", "v", "q"), _kvq(attn.qkv_proj.bias, attn, heads), strict=True):
            state[f"{prefix}self_attn.{name}_proj.bias"] = b
    state[prefix + "self_attn.o_proj.weight"] = attn.o_proj.weight[:, : heads * attn.head_dim]
    if attn.o_proj.bias is not None:
        state[prefix + "self_attn.o_proj.bias"] = attn.o_proj.bias
    state[prefix + "mlp.gate_proj.weight"] = mlp.gate.weight[:width]
    state[prefix + "mlp.up_proj.weight"] = mlp.up.weight[:width]
    state[prefix + "mlp.down_proj.weight"] = mlp.down.weight[:, :width]
    state[prefix + "input_layernorm.weight"] = layer.attention_norm.weight
    state[prefix + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
    return state


def _gpt2_layer_state(prefix: str, layer, width: int, heads: int) -> dict[str, Tensor]:
    attn, mlp = layer.attention, layer.mlp
    k, v, q = _kvq(attn.qkv_proj.weight, attn, heads)
    kb, vb, qb = _kvq(attn.qkv_proj.bias, attn, heads)
    state = {
        prefix + "attn.c_attn.weight": torch.cat([q, k, v]).T,
        prefix + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
        prefix + "attn.c_proj.weight": attn.o_proj.weight[:, : heads * attn.head_dim].T,
        prefix + "attn.c_proj.bias": attn.o_proj.bias,
        prefix + "mlp.c_fc.weight": mlp.up.weight[:width].T,
        prefix + "mlp.c_fc.bias": mlp.up.bias[:width],
        prefix + "mlp.c_proj.weight": mlp.down.weight[:, :width].T,
        prefix + "mlp.c_proj.bias": mlp.down.bias,
    }
    for ours, theirs in (("attention_norm", "ln_1"), ("mlp_norm", "ln_2")):
        norm = getattr(layer, ours)
        state[f"{prefix}{theirs}.weight"] = norm.weight
        state[f"{prefix}{theirs}.bias"] = norm.bias
    return state
