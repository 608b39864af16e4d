"""Data parallelism across processes (``torchrun``): one process per device, gloo on CPU, nccl on CUDA.

The contract :func:`causalir.train.fit` keeps under ``torchrun --nproc_per_node R``: ``TrainConfig.batch_size`` is
the batch of one rank (B); every rank draws the same *global* batch of R*B patches and distortions from the
loop's generator (seeded alike on every rank) and trains on its own slice ``[r*B, (r+1)*B)`` of it
(:meth:`causalir.train.StepContext.local`). Losses are batch means, so the mean over ranks of the slice
gradients is the gradient of the global batch, and R ranks x batch B take the same steps as 1 rank x batch R*B
(up to float summation order; ``tests/test_distributed.py`` checks it with 2 CPU ranks).

* Strategies that train by ``loss.backward()`` on the module (ERM, paired MSE) run the model wrapped in
  :class:`torch.nn.parallel.DistributedDataParallel`, which all-reduces (averages) the gradients during the
  backward pass.
* The meta-learning strategies (DIL) compute functional gradients with ``torch.func``, which DDP's backward
  hooks never see: the one update (:meth:`causalir.train.Strategy.update`) averages their gradient dict with one
  flattened all-reduce before clipping and the optimiser step, and each *inner* gradient (the virtual update
  :math:`\\phi = \\theta - \\alpha \\nabla_\\theta \\mathcal{L}`) is averaged with :func:`all_mean`, a
  differentiable all-reduce (its backward is again an all-mean), so that second-order meta-gradients through the
  inner step are those of the global batch too.

Checkpoints are written by rank 0 only; every rank resumes from the same unit. Randomness stays identical across
ranks because all of them draw the whole global batch (the data pipeline is < 1% of a step).
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .utils import check_number

#: environment variables torchrun sets for every process
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): > 1 means this process was started by torchrun."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer >= 1 (set by torchrun), got {raw!r}") from None
    if n < 1:
        raise ValueError(f"WORLD_SIZE: expected an integer >= 1 (set by torchrun), got {raw!r}")
    return n


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Join the process group torchrun describes in the environment (gloo for CPU, nccl for CUDA; each CUDA rank
    on ``cuda:LOCAL_RANK``). Does nothing (returns False) when ``WORLD_SIZE`` is 1 or unset, or when a group is
    already initialised (returns True)."""
    if env_world_size() == 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return True
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE > 1 but {', '.join(missing)} is not set: start the run with torchrun "
                           "(`causalir train --nproc N ...` does)")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else ``device`` unchanged."""
    if device.type == "cuda" and is_active() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


class _AllMean(torch.autograd.Function):
    """y = (1/R) sum_r x_r over the R ranks; its backward is the same all-mean of the cotangents (the mean is
    self-adjoint across ranks), itself differentiable, so double backward (second-order DIL) works, also under
    ``torch.func.grad`` and ``vmap``."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.detach().clone().contiguous()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.div_(dist.get_world_size())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return _AllMean.apply(g)

    @staticmethod
    def vmap(info, in_dims, x):
        # an all-reduce is elementwise over the whole tensor: the batched dimension stays where it is
        return _AllMean.apply(x), in_dims[0]


def all_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks (differentiable); ``x`` itself outside a process group."""
    if not is_active():
        return x
    return _AllMean.apply(x)


def all_mean_dict(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """:func:`all_mean` of every tensor of a dict (e.g. a gradient by parameter name) in one collective over one
    flattened buffer (like one DDP bucket); the dict itself outside a process group."""
    if not is_active():
        return dict(tensors)
    names = list(tensors)
    flat = torch.cat([tensors[n].reshape(-1) for n in names])
    flat = _AllMean.apply(flat)
    out, i = {}, 0
    for n in names:
        t = tensors[n]
        out[n] = flat[i: i + t.numel()].view(t.shape)
        i += t.numel()
    return out


def average_gradients(params) -> None:
    """Average ``p.grad`` over the ranks for every parameter with a gradient (one flattened all-reduce through
    :func:`all_mean_dict`, written back in place); what DDP does in its backward, for gradients DDP never saw
    (functional meta-gradients)."""
    if not is_active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    with torch.no_grad():
        means = all_mean_dict(dict(enumerate(grads)))
        for i, g in enumerate(grads):
            g.copy_(means[i])


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``model`` set to rank ``src``'s values (the start DDP makes)."""
    if not is_active():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


def barrier() -> None:
    if is_active():
        dist.barrier()


def local_slice(t: torch.Tensor, dim: int = 0, rank: Optional[int] = None, world: Optional[int] = None) -> torch.Tensor:
    """Slice ``rank`` of ``world`` equal slices of ``t`` along ``dim`` (the global batch split over the ranks)."""
    r, w = rank_world()
    rank = r if rank is None else rank
    world = w if world is None else world
    check_number("local_slice", "world", world, lo=1, integer=True)
    check_number("local_slice", "rank", rank, lo=0, hi=world - 1, integer=True)
    if world == 1:
        return t
    n = t.shape[dim]
    if n % world:
        raise ValueError(f"local_slice: dimension {dim} of size {n} does not split into {world} equal slices")
    b = n // world
    return t.narrow(dim, rank * b, b)
