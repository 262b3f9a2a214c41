"""A bounded first-in-first-out memory bank of tensors.

Used for the proxy student's replay of earlier synthetic batches (gMI, CMI) and for the contrastive
negatives of earlier batches (D2CIP's latent bank B_z and image bank B_x, Alg. 2 lines 20-21).
"""

from __future__ import annotations

import torch


class MemoryBank:
    """Keeps the most recent ``capacity`` rows pushed to it; the oldest are dropped first."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"memory bank capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._rows: torch.Tensor | None = None
        self._next = 0  # ring-buffer write position once full
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, rows: torch.Tensor) -> None:
        rows = rows.detach()
        if rows.shape[0] >= self.capacity:
            rows = rows[-self.capacity:]
        if self._rows is None:
            self._rows = rows.new_empty((self.capacity, *rows.shape[1:]))
        n = rows.shape[0]
        end = self._next + n
        if end <= self.capacity:
            self._rows[self._next:end] = rows
        else:
            split = self.capacity - self._next
            self._rows[self._next:] = rows[:split]
            self._rows[: n - split] = rows[split:]
        self._next = end % self.capacity
        self._size = min(self._size + n, self.capacity)

    def all(self) -> torch.Tensor | None:
        """Every stored row, oldest first; ``None`` when empty."""
        if self._rows is None or self._size == 0:
            return None
        if self._size < self.capacity:
            return self._rows[: self._size]
        return torch.cat([self._rows[self._next:], self._rows[: self._next]])

    def sample(self, n: int, generator: torch.Generator | None = None, replacement: bool = True) -> torch.Tensor:
        """``n`` rows drawn uniformly, with replacement; without it, ``min(n, len(self))`` distinct rows."""
        if self._rows is None or self._size == 0:
            raise RuntimeError("cannot sample from an empty memory bank")
        if replacement:
            index = torch.randint(self._size, (n,), generator=generator, device="cpu")
        else:
            index = torch.randperm(self._size, generator=generator, device="cpu")[:n]
        return self._rows[index.to(self._rows.device)]

    def state_dict(self) -> dict:
        """Only the rows held, as a copy: a view of the preallocated buffer would make ``torch.save`` write
        the whole buffer (an 8,192-image float buffer for one shard of 64 images)."""
        rows = self.all()
        return {"capacity": self.capacity, "rows": rows.clone() if rows is not None else None}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        self.__init__(int(state["capacity"]))
        if state["rows"] is not None:
            self.push(state["rows"].to(device) if device is not None else state["rows"])
