"""flextron: nested elastic LLMs (Flextron, ICML 2024) with token-routed nested GEMM kernels."""

from flextron._library import CUDA_ARCHS, WITH_CUDA, WITH_SM90
from flextron.kv_cache import KVCache
from flextron.layers import ElasticAttention, ElasticMLP
from flextron.ops import (
    RoutePlan,
    elastic_mlp,
    nested_activation,
    nested_linear_k,
    nested_linear_n,
    nested_weight_grad,
    permute,
    route_plan,
    unpermute,
)
from flextron.rope import RopeScaling, RotaryEmbedding

__version__ = "0.1.0"

__all__ = [
    "CUDA_ARCHS",
    "WITH_CUDA",
    "WITH_SM90",
    "ElasticAttention",
    "ElasticMLP",
    "KVCache",
    "RopeScaling",
    "RotaryEmbedding",
    "RoutePlan",
    "elastic_mlp",
    "nested_activation",
    "nested_linear_k",
    "nested_linear_n",
    "nested_weight_grad",
    "permute",
    "route_plan",
    "unpermute",
]
