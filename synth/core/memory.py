"""A bounded first-in-first-out memory bank of tensors.

Used for the proxy student's replay of earlier synthetic batches (gMI, CMI) and for the contrastive
negatives of earlier batches (D2CIP's latent bank B_z and image bank B_x, Alg. 2 lines 20-21). Rows may carry
a label each (the class a replayed image was asked for: CPSC's pseudo-label); a row pushed without one has -1.
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
        self._labels: torch.Tensor | None = None  # int64 per row, -1 where unknown; created by the first labels
        self._next = 0  # ring-buffer write position once full
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, rows: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        rows = rows.detach()
        if labels is not None and labels.shape[0] != rows.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {rows.shape[0]} rows")
        if labels is None and self._labels is not None:
            labels = torch.full((rows.shape[0],), -1, dtype=torch.long)
        if rows.shape[0] >= self.capacity:
            rows = rows[-self.capacity:]
            labels = labels[-self.capacity:] if labels is not None else None
        if self._rows is None:
            self._rows = rows.new_empty((self.capacity, *rows.shape[1:]))
        if labels is not None and self._labels is None:
            self._labels = torch.full((self.capacity,), -1, dtype=torch.long, device=self._rows.device)
        n = rows.shape[0]
        end = self._next + n
        for buffer, new in ((self._rows, rows), (self._labels, labels)):
            if buffer is None or new is None:
                continue
            new = new.to(buffer.device)
            if end <= self.capacity:
                buffer[self._next:end] = new
            else:
                split = self.capacity - self._next
                buffer[self._next:] = new[:split]
                buffer[: n - split] = new[split:]
        self._next = end % self.capacity
        self._size = min(self._size + n, self.capacity)

    def all(self) -> torch.Tensor | None:
        """Every stored row, oldest first; ``None`` when empty."""
        if self._rows is None or self._size == 0:
            return None
        if self._size < self.capacity:
            return self._rows[: self._size]
        return torch.cat([self._rows[self._next:], self._rows[: self._next]])

    def all_labels(self) -> torch.Tensor | None:
        """The labels of :meth:`all`'s rows (-1 where pushed without one); ``None`` when no row had a label."""
        if self._labels is None or self._size == 0:
            return None
        if self._size < self.capacity:
            return self._labels[: self._size]
        return torch.cat([self._labels[self._next:], self._labels[: self._next]])

    def sample(self, n: int, generator: torch.Generator | None = None, replacement: bool = True) -> torch.Tensor:
        """``n`` rows drawn uniformly, with replacement; without it, ``min(n, len(self))`` distinct rows."""
        return self.sample_with_labels(n, generator, replacement)[0]

    def sample_with_labels(self, n: int, generator: torch.Generator | None = None,
                           replacement: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`sample`, with the drawn rows' labels (-1 where unknown; ``None`` if no row has one)."""
        if self._rows is None or self._size == 0:
            raise RuntimeError("cannot sample from an empty memory bank")
        if replacement:
            index = torch.randint(self._size, (n,), generator=generator, device="cpu")
        else:
            index = torch.randperm(self._size, generator=generator, device="cpu")[:n]
        index = index.to(self._rows.device)
        labels = self._labels[index] if self._labels is not None else None
        return self._rows[index], labels

    def state_dict(self) -> dict:
        """Only the rows held, as a copy: a view of the preallocated buffer would make ``torch.save`` write
        the whole buffer (an 8,192-image float buffer for one shard of 64 images)."""
        rows, labels = self.all(), self.all_labels()
        state = {"capacity": self.capacity, "rows": rows.clone() if rows is not None else None}
        if labels is not None:  # only when kept, so a bank without labels saves what it always saved
            state["labels"] = labels.clone()
        return state

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        self.__init__(int(state["capacity"]))
        if state["rows"] is not None:
            self.push(state["rows"].to(device) if device is not None else state["rows"], state.get("labels"))
