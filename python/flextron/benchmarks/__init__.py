"""flextron's benchmarks, shipped with the package so that ``flextron bench`` (or
:func:`flextron.bench`) runs them wherever flextron is installed.

Suites: ``kernels`` (nested GEMMs and the token-routed elastic MLP vs dense matmuls, the
per-group torch loop and, on the GPU, ``torch._grouped_mm``), ``attention`` (the elastic
attention layer vs plain attention, dense and sliced), ``model`` (a whole elastic model vs
transformers models of the same sizes). Every ratio is measured side by side in one run;
nothing asserts on speed.
"""

from flextron.benchmarks.common import BenchOptions
from flextron.benchmarks.suite import SUITES, BenchReport, Suite, run

__all__ = ["SUITES", "BenchOptions", "BenchReport", "Suite", "run"]
