"""Adapters that run a CLIP implementation's towers with attention biases, and their registry.

Registration order is priority order: :func:`load_runtime` asks each adapter in turn whether it
claims the input. Register adapters here, each before the open_clip one, which claims every input
and so must stay last:

- ``hf.py`` (HF transformers CLIP / SigLIP / SigLIP2): claims ``hf:<hub id>`` and local directories
  holding a ``config.json``; register its ``ADAPTER`` above the open_clip line.
- open_clip's timm towers (``open_clip_timm.py``) are not a separate adapter: the open_clip loader
  picks the runtime class by the image tower's type; that module calls
  ``open_clip_loading.register_visual_runtime("TimmModel", ...)`` when imported (below, with its class).
"""

from . import hf, open_clip_loading
from .base import BlockHeads, Trunk, VisionRuntime
from .open_clip import OpenClipRuntime
from .open_clip_timm import OpenClipTimmRuntime
from .registry import ADAPTERS, Adapter, LoadedModel, list_models, load_runtime, register

register(hf.ADAPTER)
register(open_clip_loading.ADAPTER)  # last: claims every input

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BlockHeads",
    "LoadedModel",
    "OpenClipRuntime",
    "OpenClipTimmRuntime",
    "Trunk",
    "VisionRuntime",
    "list_models",
    "load_runtime",
    "register",
]
