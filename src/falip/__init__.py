"""falip — foveal attention for CLIP ViTs (Zhuang et al., ECCV 2024), exact and fast."""

from .bias import FovealConfig, Unleash, bump, region_bias
from .encode import MODES, BiasPlan, encode_biased
from .errors import (
    FalipError,
    ImageLoadError,
    InvalidRegionError,
    ModelLoadError,
    RegionClampWarning,
    UnsupportedModelError,
)
from .geometry import PREPROCESS_MODES, ImageTransform, make_transform
from .images import load_image
from .loading import normalize_model_name
from .methods import encode_with_method, parse_method
from .model import FalipModel, load
from .tasks.classify import classify
from .tasks.pointcloud import classify_points
from .tasks.rec import Grounding, ground

__version__ = "0.1.0"


def list_models() -> list[str]:
    """open_clip architecture names that falip can load (ViTs with a [CLS] token)."""
    import open_clip

    return [m for m in open_clip.list_models() if "ViT" in m]


__all__ = [
    "BiasPlan",
    "Grounding",
    "Unleash",
    "classify",
    "classify_points",
    "encode_with_method",
    "ground",
    "parse_method",
    "FalipError",
    "FalipModel",
    "FovealConfig",
    "ImageLoadError",
    "ImageTransform",
    "InvalidRegionError",
    "MODES",
    "ModelLoadError",
    "PREPROCESS_MODES",
    "RegionClampWarning",
    "UnsupportedModelError",
    "bump",
    "encode_biased",
    "list_models",
    "load",
    "load_image",
    "make_transform",
    "normalize_model_name",
    "region_bias",
]
