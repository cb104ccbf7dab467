"""Adapters that run a CLIP implementation's vision tower with attention biases."""

from .base import BlockHeads, Trunk, VisionRuntime
from .open_clip import OpenClipRuntime

__all__ = ["BlockHeads", "OpenClipRuntime", "Trunk", "VisionRuntime"]
