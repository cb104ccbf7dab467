"""The DataLoader that feeds the tasks: order, batches, worker processes, pinned pixels."""

import dataclasses

import pytest
import torch

from falip.errors import FalipError
from falip.model import PreparedImage
from falip.tasks.loader import LoadedBatch, check_loader_args, load_batches


def square(x: int) -> tuple[int, int]:
    return x, x * x


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_keep_the_order_and_lose_nothing(workers):
    batches = list(load_batches(list(range(11)), square, 4, workers, torch.device("cpu")))
    assert [len(b) for b in batches] == [4, 4, 3]
    assert [item for b in batches for item in b] == [(x, x * x) for x in range(11)]
    assert list(load_batches([], square, 4, workers, torch.device("cpu"))) == []


def test_loader_flags_are_checked():
    with pytest.raises(FalipError, match="--batch-size must be an integer >= 1, got 0"):
        check_loader_args(0, 1)
    with pytest.raises(FalipError, match="--workers must be an integer >= 0"):
        check_loader_args(4, -1)


@dataclasses.dataclass
class Item:
    one: PreparedImage
    many: list
    other: int = 0


def test_pin_memory_pins_every_prepared_image_and_leaves_the_rest(monkeypatch):
    pinned = []

    def fake_pin(self):  # pinning needs a CUDA device; record which tensors would be pinned
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    a, b, c = (PreparedImage(torch.full((1, 3, 2, 2), float(i)), transform=None) for i in range(3))
    item = Item(a, [b, c])
    batch = LoadedBatch([item, ("not", "a dataclass")]).pin_memory()
    assert len(pinned) == 3 and batch.items[1] == ("not", "a dataclass")
    assert item.one is not a and torch.equal(item.one.pixels, a.pixels) and item.many[1].pixels is not c.pixels
