"""The adapter registry: how :func:`falip.load` finds the runtime for a name, hub id or path.

Each adapter module registers one :class:`Adapter` at import (``runtimes/__init__.py``), and a third party
registers its own with :func:`register`. ``load_runtime`` asks each, in order, whether it claims the input; the
first that does builds the model. A catch-all adapter (open_clip, which claims everything so that a name nobody
knows ends in open_clip's "unknown model" error with suggestions) is always asked last: :func:`register` puts a
new adapter before it, or before the adapter the caller names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .base import VisionRuntime


@dataclass(frozen=True)
class LoadedModel:
    """What an adapter's loader returns.

    runtime: the model behind its adapter. name: what the user asked for, normalised. pretrained:
    the weights' tag or path (``None`` = random weights). weights_file: the local file or directory
    the weights came from, for run fingerprints (``None`` when there is none). card: falip's model
    card (``preprocess``, ``falip`` settings) of a model that ships one, else ``None``.
    """

    runtime: VisionRuntime
    name: str
    pretrained: Optional[str]
    weights_file: Optional[Path]
    card: Optional[dict]


@dataclass(frozen=True)
class Adapter:
    """name: the adapter's id. claims(name_or_path, pretrained): True when it loads that input.
    load(name_or_path, pretrained, device, precision, quick_gelu) → :class:`LoadedModel` (precision and
    device are checked by :func:`falip.load` before). list_models(): the model names it knows, for
    :func:`falip.list_models` (None: it loads from paths or hub ids only). catalog(): ``(name, "runs" | "refused:
    why")`` for every model it knows, for ``falip models``. catch_all: it claims every input, so it is asked after
    every other adapter."""

    name: str
    claims: Callable[[str, Optional[str]], bool]
    load: Callable[..., LoadedModel]
    list_models: Optional[Callable[[], list[str]]] = None
    catalog: Optional[Callable[[], list[tuple[str, str]]]] = None
    catch_all: bool = False


ADAPTERS: list[Adapter] = []


def register(adapter: Adapter, *, before: Optional[str] = None) -> None:
    """Add ``adapter``: after the adapters registered before it and before the catch-all ones (a catch-all adapter goes
    last), or, with ``before``, just ahead of the adapter of that name. A name registered twice is an error."""
    names = [a.name for a in ADAPTERS]
    if adapter.name in names:
        raise ValueError(f"a runtime adapter named {adapter.name!r} is already registered")
    if before is not None:
        if before not in names:
            raise ValueError(f"no runtime adapter named {before!r} is registered (registered: {names})")
        ADAPTERS.insert(names.index(before), adapter)
    elif adapter.catch_all:
        ADAPTERS.append(adapter)
    else:
        ADAPTERS.insert(next((i for i, a in enumerate(ADAPTERS) if a.catch_all), len(ADAPTERS)), adapter)


def load_runtime(
    name_or_path: str, pretrained: Optional[str], device: str, precision: str, quick_gelu: Optional[bool]
) -> LoadedModel:
    """The first registered adapter that claims ``name_or_path`` loads it."""
    for adapter in ADAPTERS:
        if adapter.claims(name_or_path, pretrained):
            return adapter.load(name_or_path, pretrained, device, precision, quick_gelu)
    raise AssertionError("the open_clip adapter claims every input; it is not registered")


def list_models() -> list[str]:
    """The model names every registered adapter knows, in registration order."""
    return [name for adapter in ADAPTERS if adapter.list_models is not None for name in adapter.list_models()]


def catalog() -> list[tuple[str, str, str]]:
    """``(adapter, name, "runs" | "refused: why")`` for every model every registered adapter knows, in asking order."""
    return [(adapter.name, name, status) for adapter in ADAPTERS if adapter.catalog for name, status in adapter.catalog()]
