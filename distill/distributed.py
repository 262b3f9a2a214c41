"""Data-parallel distillation under ``torchrun`` (``torchrun --nproc-per-node N -m distill.cli run …``).

torchrun starts the processes and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; this module
joins them into one process group (NCCL on CUDA, gloo on a CPU) and holds what the rest of ``distill`` needs to
stay correct with several ranks, so that the loop and the sources change by a few lines only:

- **One global batch.** ``--batch-size`` stays the global batch; each rank trains on ``batch_size / world``
  samples per step and DDP averages the gradients, so N processes follow the 1-process optimisation path
  (up to per-rank BatchNorm statistics) at the same learning rate.
- **The same number of batches on every rank**, or DDP hangs: the in-memory set is one seeded permutation
  split evenly (:meth:`Distributed.split`); streaming draws resampled shards for an epoch length taken from
  the manifest's counts (``distill.sources.stream_source``).
- **Reduced figures.** Training loss and image counts are summed over ranks; evaluation is sharded and its
  per-class hits summed (:func:`reduce_counts`), so every rank reports the global accuracy.
- **Only rank 0 writes** (checkpoint, log, metrics, student); the others wait at a barrier, so a resume on
  any rank reads a complete ``last.pt``.

Without torchrun (``WORLD_SIZE`` unset or 1) :data:`SINGLE` makes every helper a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank ``rank`` of ``world``, GPU ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_name(self, name: str) -> str:
        """``auto`` means this rank's own GPU (``cuda:LOCAL_RANK``) when CUDA is there."""
        if name == "auto" and self.active and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def steps(self, n: int, batch: int, training: bool) -> int:
        """Batches per epoch on every rank for ``n`` samples (see :meth:`split`)."""
        size = batch * self.world
        return n // size + (1 if n % size >= (2 * self.world if training else 1) else 0)

    def split(self, order: torch.Tensor, batch: int, training: bool) -> list[torch.Tensor]:
        """This rank's index batches of one epoch, from the permutation ``order`` every rank shares.

        Global step ``s`` takes ``order[s*B:(s+1)*B]`` (``B = batch * world``, the 1-process batch) and this rank
        its every ``world``-th element, so all ranks hold the same number of batches. In training, a last
        global batch too small to give every rank 2 samples (BatchNorm) is dropped; in evaluation none is.
        """
        size = batch * self.world
        steps = self.steps(int(order.numel()), batch, training)
        return [order[s * size:(s + 1) * size][self.rank::self.world] for s in range(steps)]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` over ranks in place (and returns it)."""
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (e.g. the epochs a time budget planned)."""
        if not self.active:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(box, src=0)
        return int(box.item())

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Averages the gradients of ``params`` over ranks: parameters outside the DDP-wrapped model (an
        objective's projection) must stay identical on every rank too."""
        if not self.active:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` for training: in DistributedDataParallel (gradients averaged over ranks) when active."""
        if not self.active:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


SINGLE = Distributed()


def init() -> Distributed:
    """Joins torchrun's process group (once per process) and returns this rank; :data:`SINGLE` without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def reduce_counts(source: object, *counts: torch.Tensor) -> None:
    """Sums evaluation counts over ranks when ``source`` was split over them (each rank saw its own part);
    a source every rank reads whole (``dist`` absent or single) is left alone, or it would count N times."""
    env = getattr(source, "dist", SINGLE)
    for tensor in counts:
        env.sum_(tensor)


def shutdown() -> None:
    """Leaves the process group (at the end of a run, so the process exits cleanly)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
