"""flextron: nested elastic LLMs (Flextron, ICML 2024) with token-routed nested GEMM kernels.

- ops (torch ops with CPU/CUDA kernels and autograd): :func:`route_plan`, :func:`permute`,
  :func:`unpermute`, :func:`nested_linear_n`, :func:`nested_linear_k`,
  :func:`nested_weight_grad`, :func:`nested_weight_grad_k`, :func:`nested_activation`, :func:`elastic_mlp`;
- layers: :class:`ElasticMLP`, :class:`ElasticAttention`, :class:`KVCache`;
- model: :class:`ElasticConfig`, :class:`ElasticLM`, :class:`Routing`;
- the command line as functions (:mod:`flextron.api`): :func:`convert`, :func:`train`,
  :func:`lut`, :func:`evaluate`, :func:`export`, :func:`generate`, :func:`bench`, :func:`demo`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flextron._library import CUDA_ARCHS, WITH_CUDA, WITH_SM90
from flextron.kv_cache import KVCache
from flextron.layers import ElasticAttention, ElasticMLP
from flextron.model import ElasticConfig, ElasticLM, Routing
from flextron.ops import (
    RoutePlan,
    elastic_mlp,
    nested_activation,
    nested_linear_k,
    nested_linear_n,
    nested_weight_grad,
    nested_weight_grad_k,
    permute,
    route_plan,
    unpermute,
)
from flextron.rope import RopeScaling, RotaryEmbedding

if TYPE_CHECKING:
    from flextron.api import bench, convert, demo, evaluate, export, generate, lut, train
    from flextron.budgets import BudgetResolver, ServedBudget
    from flextron.checkpoint import load_elastic, save_elastic
    from flextron.training import TrainConfig

# Imported on first use: `import flextron` needs only torch (the ops and layers); these
# need safetensors, tqdm and (for models) transformers.
_LAZY = {
    **dict.fromkeys(
        ("bench", "convert", "demo", "evaluate", "export", "generate", "lut", "train"), "flextron.api"
    ),
    "BudgetResolver": "flextron.budgets",
    "ServedBudget": "flextron.budgets",
    "BudgetRouting": "flextron.budgets",  # deprecated: ServedBudget
    "load_elastic": "flextron.checkpoint",
    "save_elastic": "flextron.checkpoint",
    "TrainConfig": "flextron.training",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flextron' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "CUDA_ARCHS",
    "WITH_CUDA",
    "WITH_SM90",
    "BudgetResolver",
    "ElasticAttention",
    "ElasticConfig",
    "ElasticLM",
    "ElasticMLP",
    "KVCache",
    "RopeScaling",
    "RotaryEmbedding",
    "RoutePlan",
    "Routing",
    "ServedBudget",
    "TrainConfig",
    "bench",
    "convert",
    "demo",
    "elastic_mlp",
    "evaluate",
    "export",
    "generate",
    "load_elastic",
    "lut",
    "nested_activation",
    "nested_linear_k",
    "nested_linear_n",
    "nested_weight_grad",
    "nested_weight_grad_k",
    "permute",
    "route_plan",
    "save_elastic",
    "train",
    "unpermute",
]
