"""Feeding the tasks: a ``torch.utils.data.DataLoader`` whose worker processes read and preprocess.

Each task describes its work as a list of *items* (an image with its samples, a point cloud …) and
a picklable ``load`` function that turns one item into what the model needs (decoded image,
:class:`falip.model.PreparedImage`, regions …). ``load`` never raises for a bad item: it returns the
item with its failures recorded (reason + detail), which the task writes as skipped samples — so a
batch never loses an item, and a resumed run finds every sample either predicted or skipped.

The loader keeps the items' order, yields lists of ``batch_size`` loaded items (:class:`LoadedBatch`),
and pins the pixels in memory when the model runs on CUDA (``torch.cuda.is_available()`` needed: no
test here covers it, ``benchmarks/gpu_check.sh`` runs it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import FalipError
from ..model import PreparedImage

T = TypeVar("T")
U = TypeVar("U")


def default_workers() -> int:
    """Worker processes by default: ``min(4, cpus − 1)`` (0 on a single core: loading then runs inline)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


DEFAULT_BATCH_SIZE = 16  # images per batch


def check_loader_args(batch_size: int, workers: int) -> None:
    """:class:`FalipError` naming ``--batch-size`` / ``--workers`` when they are out of range."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FalipError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise FalipError(f"--workers must be an integer >= 0 (0: load in the main process), got {workers!r}")


class _Items(Dataset, Generic[T, U]):
    def __init__(self, items: Sequence[T], load: Callable[[T], U]):
        self.items = items
        self.load = load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> U:
        return self.load(self.items[index])


@dataclasses.dataclass
class LoadedBatch:
    """Loaded items in their order. ``pin_memory`` (called by the DataLoader on CUDA) pins the pixels of
    every item's :class:`PreparedImage` fields."""

    items: list[Any]

    def pin_memory(self) -> LoadedBatch:
        for item in self.items:
            if not dataclasses.is_dataclass(item):
                continue
            for f in dataclasses.fields(item):
                value = getattr(item, f.name)
                if isinstance(value, PreparedImage):
                    setattr(item, f.name, _pinned(value))
                elif isinstance(value, list) and value and all(isinstance(v, PreparedImage) for v in value):
                    setattr(item, f.name, [_pinned(v) for v in value])
        return self


def _pinned(prepared: PreparedImage) -> PreparedImage:
    return dataclasses.replace(prepared, pixels=prepared.pixels.pin_memory())


def load_batches(
    items: Sequence[T], load: Callable[[T], U], batch_size: int, workers: int, device: torch.device
) -> Iterator[list[U]]:
    """``load`` applied to ``items`` in order, ``batch_size`` at a time, by ``workers`` processes (0: inline)."""
    check_loader_args(batch_size, workers)
    if not items:
        return
    loader = DataLoader(
        _Items(items, load),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=LoadedBatch,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=2 if workers else None,
    )
    for batch in loader:
        yield batch.items
