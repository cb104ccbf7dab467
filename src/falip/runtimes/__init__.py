"""Adapters that run a CLIP implementation's towers with attention biases, and their registry.

Registration order is priority order: :func:`load_runtime` asks each adapter in turn whether it
claims the input; :func:`register` keeps the catch-all open_clip adapter (it claims every input) last, so an
adapter registered later, here or by a third party, is asked before it:

- ``hf.py`` (HF transformers CLIP / SigLIP / SigLIP2): claims ``hf:<hub id>`` and local directories
  holding a ``config.json``; register its ``ADAPTER`` above the open_clip line.
- open_clip's timm towers (``open_clip_timm.py``: ViT; ``open_clip_eva.py``: Eva) are not a separate adapter:
  the open_clip loader picks the runtime class by the image tower's type; ``open_clip_timm`` calls
  ``open_clip_loading.register_visual_runtime("TimmModel", ...)`` when imported (open_clip_eva.py, for both kinds of timm tower).

Every runtime class is a :class:`~falip.runtimes.contract.BlockRuntime` over its model's primitives.
"""

from . import hf, open_clip_loading
from .base import BlockHeads, Trunk, VisionRuntime
from .contract import BlockRuntime
from .open_clip import OpenClipRuntime
from .open_clip_eva import OpenClipEvaRuntime
from .open_clip_timm import OpenClipTimmRuntime
from .registry import ADAPTERS, Adapter, LoadedModel, list_models, load_runtime, register

register(hf.ADAPTER)
register(open_clip_loading.ADAPTER)  # catch-all: stays last

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BlockHeads",
    "BlockRuntime",
    "LoadedModel",
    "OpenClipEvaRuntime",
    "OpenClipRuntime",
    "OpenClipTimmRuntime",
    "Trunk",
    "VisionRuntime",
    "list_models",
    "load_runtime",
    "register",
]
