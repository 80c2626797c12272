"""Loads the native extension, which registers the ``torch.ops.flextron`` ops."""

from __future__ import annotations

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from flextron import _C
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "flextron's native extension (flextron._C) is missing or failed to load: "
        f"{error}. Build it with `pip install --no-build-isolation -e .` (see README.md)."
    ) from error

WITH_CUDA: bool = bool(_C.with_cuda)
WITH_SM90: bool = bool(_C.with_sm90)
CUDA_ARCHS: tuple[str, ...] = tuple(a for a in _C.cuda_archs.split(",") if a)
