"""Device and dtype names as users give them (CLI flags, API arguments), checked once with
clear errors."""

from __future__ import annotations

from typing import Literal, get_args

import torch

DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA only when a GPU is there."""
    text = str(name)
    if not (text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit())):
        raise ValueError(f"device must be cpu or cuda[:N], got {text!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {text} was asked for, but no CUDA GPU is available")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {text} was asked for, but there are {torch.cuda.device_count()} GPUs")
    return torch.device(text)


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """``auto`` is float32 on the CPU and bfloat16 on a GPU; otherwise the named dtype."""
    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {name}")
        return name
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)
