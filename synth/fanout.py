"""Fan-out synthesis: W workers (``torchrun --nproc-per-node W -m synth run …``, or ``--rank R --world W``)
each synthesise their own part of one dataset, with no communication between them.

Worker R writes ``OUT/part-RRRRR``, a complete dataset of its own: its share of ``--num-images`` (the first
``N mod W`` workers take one more), keys ``[offset, offset + share)`` (disjoint, so ``synth merge`` unites the
parts without renumbering), and its own seed derived from ``(--seed, R)``. The part's identity records
``{rank, world}``: a killed worker reruns its command and resumes its own part only, and a rerun with another
world size is refused instead of mixing two partitions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SynthError


@dataclass(frozen=True)
class FanOut:
    """Which part of a fanned-out synthesis this process makes (rank 0 of 1: the whole dataset)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise SynthError(f"--rank {self.rank} --world {self.world}: need 0 <= rank < world")

    @classmethod
    def resolve(cls, rank: int | None, world: int | None) -> FanOut:
        """From the options, else from torchrun's ``RANK``/``WORLD_SIZE``, else a single worker."""
        if world is None and rank is None:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        elif world is None or rank is None:
            raise SynthError("--rank and --world go together")
        return cls(rank=rank, world=world)

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, num_images: int) -> tuple[int, int]:
        """(first key, number of images) of this worker's part of ``num_images``."""
        base, extra = divmod(num_images, self.world)
        count = base + (1 if self.rank < extra else 0)
        if count == 0:
            raise SynthError(f"--num-images {num_images} over {self.world} workers leaves worker {self.rank} none")
        return self.rank * base + min(self.rank, extra), count

    def seed(self, seed: int) -> int:
        """This worker's seed: a hash of (seed, rank), so no two workers of any run share one."""
        digest = hashlib.sha256(f"fanout:{seed}:{self.rank}".encode()).digest()
        return int.from_bytes(digest[:4], "big")

    def part_dir(self, out: Path) -> Path:
        return Path(out) / f"part-{self.rank:05d}"

    def device(self, device: str) -> str:
        """``auto`` on a multi-GPU node: this worker's own GPU (torchrun's ``LOCAL_RANK``)."""
        if device != "auto" or "LOCAL_RANK" not in os.environ:
            return device
        import torch

        return f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}" \
            if torch.cuda.is_available() else "cpu"

    def apply(self, options: Any, extra_samples: int) -> tuple[Any, int, dict[str, Any] | None]:
        """(this worker's run options, its key offset, the fan-out record for identity and manifest)."""
        if not self.active:
            return options, 0, None
        if extra_samples:
            raise SynthError("a loss plug-in that adds samples (e.g. --condensed) stores them once per dataset; "
                             "fan-out would store them once per worker. Run it with a single worker.")
        offset, count = self.share(options.num_images)
        record = {"rank": self.rank, "world": self.world, "base_seed": options.seed,
                  "base_num_images": options.num_images}
        part = dataclasses.replace(options, out=self.part_dir(options.out), num_images=count,
                                   seed=self.seed(options.seed), device=self.device(options.device))
        return part, offset, record
