"""Training on several processes (torchrun): wrapping the model (DDP or FSDP2), averaging
the routers' gradients, gathering the surrogate's samples and the FSDP weights. Every
function is a no-op (or returns its input) in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def wrap_parallel(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """The model to train: itself in one process, else sharded per layer (``"fsdp"``) or
    replicated (``"ddp"``)."""
    if world_size() == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def average_gradients(module: nn.Module) -> None:
    """Average a module's gradients across ranks (for modules DDP/FSDP do not wrap)."""
    world = world_size()
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def gather_samples(features: Tensor, loss: float) -> list[tuple[Tensor, float]]:
    """Every rank's (features, measured loss), in rank order: each rank fits its own copy of
    the surrogate on the same samples, so the copies stay identical."""
    world = world_size()
    if world == 1:
        return [(features, loss)]
    all_features = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(all_features, features.contiguous())
    all_losses = [torch.zeros((), dtype=torch.float64, device=features.device) for _ in range(world)]
    dist.all_gather(all_losses, torch.tensor(loss, dtype=torch.float64, device=features.device))
    return [(f, float(v)) for f, v in zip(all_features, all_losses, strict=True)]


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """An FSDP model's whole weights, gathered on every rank (a collective), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
