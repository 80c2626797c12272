"""flextron's benchmarks, shipped with the package so that ``flextron bench`` (or
:func:`flextron.bench`) runs them wherever flextron is installed.

Suites, one module each, named like their results (``<suite>-<device>.json`` and ``.png``):
``nested_linear`` (the nested GEMMs) and ``elastic_mlp`` (the token-routed elastic MLP), both
vs dense matmuls, the per-group torch loop and, on the GPU, ``torch._grouped_mm``;
``elastic_attention`` (the elastic attention layer vs plain attention, dense and sliced);
``elastic_model`` (a whole elastic model vs transformers models of the same sizes). Every ratio is measured side by side in one run;
nothing asserts on speed.
"""

from flextron.benchmarks.common import BenchOptions
from flextron.benchmarks.suite import DEPRECATED_SUITES, SUITES, BenchReport, Suite, run

__all__ = ["DEPRECATED_SUITES", "SUITES", "BenchOptions", "BenchReport", "Suite", "run"]
