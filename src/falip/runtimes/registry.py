"""The adapter registry: how :func:`falip.load` finds the runtime for a name, hub id or path.

Each adapter module registers one :class:`Adapter` at import (``runtimes/__init__.py`` imports them
in priority order). ``load_runtime`` asks each, in order, whether it claims the input; the first that
does builds the model. The last registered adapter (open_clip) claims everything, so a name nobody
knows ends in open_clip's "unknown model" error with suggestions.
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
    :func:`falip.list_models` (None: it loads from paths or hub ids only)."""

    name: str
    claims: Callable[[str, Optional[str]], bool]
    load: Callable[..., LoadedModel]
    list_models: Optional[Callable[[], list[str]]] = None


ADAPTERS: list[Adapter] = []


def register(adapter: Adapter) -> None:
    """Add an adapter after those registered before it (a name registered twice is an error)."""
    if any(a.name == adapter.name for a in ADAPTERS):
        raise ValueError(f"a runtime adapter named {adapter.name!r} is already registered")
    ADAPTERS.append(adapter)


def load_runtime(
    name_or_path: str, pretrained: Optional[str], device: str, precision: str, quick_gelu: Optional[bool]
) -> LoadedModel:
    """The first registered adapter that claims ``name_or_path`` loads it."""
    for adapter in ADAPTERS:
        if adapter.claims(name_or_path, pretrained):
            return adapter.load(name_or_path, pretrained, device, precision, quick_gelu)
    raise AssertionError("the open_clip adapter claims every input; no adapter is registered")


def list_models() -> list[str]:
    """The model names every registered adapter knows, in registration order."""
    return [name for adapter in ADAPTERS if adapter.list_models is not None for name in adapter.list_models()]
