"""Everything distributed in one place: launcher environment, process group, device per rank, the gather.

- Launcher view (torch-free, valid before any process group exists): :func:`env_rank`,
  :func:`env_world_size`, :func:`env_local_rank` read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by
  ``torchrun``.
- Process group: :func:`init_from_env` (idempotent; ``nccl`` on CUDA, ``gloo`` on CPU, only when
  ``WORLD_SIZE > 1``), :func:`process_group` (the same as a context manager that also destroys what it
  created), :func:`shutdown`. :func:`device_for_rank` gives each rank its own GPU.
- Group view: :func:`is_dist`, :func:`get_rank`, :func:`get_world_size`, :func:`barrier`,
  :func:`broadcast_object`, :func:`all_gather_object`; all are identities / no-ops when no process group
  is initialised.
- THE cross-GPU gather (conventions section 8, pattern 3): every cross-device negative in umarvel goes
  through :func:`all_gather_with_grad`: each rank scores its B local queries against the N = B * world
  candidates gathered here, with targets offset by :func:`local_slice_offset`; averaging the gradients over
  ranks (what DDP and the trainer's all-reduce do) then gives exactly the gradient of the global mean loss
  (no ``loss * world_size``). ``tests/utils/test_dist_gather.py`` proves equality with a single-process run.

The gather is a ``torch.autograd.Function`` over the public collectives ``dist.all_gather`` (forward) and
``dist.all_reduce`` (backward), the pattern the torch docs give for a differentiable gather; it works on
every backend (gloo has no reduce-scatter). ``torch.distributed.nn.functional.all_gather`` is deprecated
since torch 2.13 and the functional collectives live in a private module, so neither is used.

Equal sizes are required: every rank must pass the same shape. Unequal first dimensions raise a clear
``ValueError`` on every rank (the check is one tiny all_gather of the shape). Padding was rejected on purpose:
padded rows would have to be masked out of every loss and the label offsets would depend on the other ranks'
sizes, and the samplers give every rank the same number of examples.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

#: Collective timeout. Long on purpose: rank 0 alone writes merged checkpoints and searches the 5.6M global
#: pool while the other ranks wait in a barrier.
TIMEOUT = datetime.timedelta(hours=12)


# ------------------------------------------------------------------------------ launcher environment
def env_rank() -> int:
    """Global rank from the launcher's environment (``RANK``; 0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """World size from the launcher's environment (``WORLD_SIZE``; 1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    """Rank on this node (``LOCAL_RANK``; 0 when not launched by torchrun): the GPU index of this process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device_for_rank(device: str | None = None) -> str:
    """The device this process should use.

    ``None`` / ``"auto"`` -> ``cuda`` when available, else ``cpu``; a bare ``cuda`` becomes
    ``cuda:<LOCAL_RANK>`` under torchrun (``WORLD_SIZE > 1``) so that each rank has its own GPU; anything
    else (``cpu``, ``cuda:1``) is returned unchanged.
    """
    dev = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and env_world_size() > 1:
        dev = f"cuda:{env_local_rank()}"
    return dev


# ------------------------------------------------------------------------------ process group
def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Initialise the default process group from the torchrun environment when ``WORLD_SIZE > 1``.

    Backend ``nccl`` for a CUDA ``device`` (made this process's current device first), ``gloo`` otherwise.
    Nothing happens when a group already exists or the run is single-process.

    Returns:
        True when this call created the process group.
    """
    if env_world_size() <= 1 or is_dist():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    logger.info("process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def shutdown() -> None:
    """Destroy the default process group if there is one."""
    if is_dist():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str | torch.device = "cpu") -> Iterator[bool]:
    """:func:`init_from_env` for the block; destroys the group on exit if it created it. Yields :func:`is_dist`."""
    created = init_from_env(device)
    try:
        yield is_dist()
    finally:
        if created:
            shutdown()


def is_dist() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """World size, 1 when not distributed."""
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    """``dist.barrier`` when distributed, otherwise nothing."""
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's (picklable) ``obj`` on every rank; ``obj`` itself when not distributed."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (rank order); ``[obj]`` when not distributed."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over ranks (a new tensor; ``t`` itself when not distributed)."""
    if not is_dist():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / get_world_size()


# ------------------------------------------------------------------------------ the gather
def local_slice_offset(batch_size: int) -> int:
    """Index of this rank's first row in a tensor gathered by :func:`all_gather_with_grad` (``rank * B``)."""
    return get_rank() * batch_size


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces (sum) the upstream gradient and returns the local slice.

    The sum is right because every rank's loss reads the gathered tensor: d(sum_r L_r)/d(local rows) is the
    sum over ranks of each rank's gradient on this rank's slice.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # (B, ...) -> (W*B, ...)
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), t.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # (W*B, ...) -> (B, ...)
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def _check_same_shape(t: Tensor) -> None:
    """Raise ValueError on every rank when ranks pass tensors of different shapes (one tiny all_gather)."""
    shape = torch.tensor(list(t.shape), dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(get_world_size())]
    dist.all_gather(shapes, shape)
    listed = [tuple(s.tolist()) for s in shapes]
    if len(set(listed)) > 1:
        raise ValueError(
            f"all_gather_with_grad needs the same shape on every rank (equal per-device batches); "
            f"got {listed} by rank. Use drop_last / a distributed sampler that pads to equal sizes."
        )


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` over ranks along dim 0 in rank order, with gradients to the local slice.

    Args:
        t: (B, ...) local tensor; the same shape on every rank (checked first, for a clear error instead of
            a hang).

    Returns:
        (W*B, ...); ``t`` itself when not distributed or world size 1. Every rank must run backward through
        the result (the backward is a collective).
    """
    if not is_dist() or get_world_size() == 1:
        return t
    _check_same_shape(t)
    return _AllGatherWithGrad.apply(t)
