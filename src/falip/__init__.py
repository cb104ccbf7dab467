"""falip — foveal attention for CLIP ViTs (Zhuang et al., ECCV 2024), exact and fast."""

from .bias import FovealConfig, Unleash, bump, region_bias
from .encode import MODES, BiasPlan, encode_biased
from .errors import (
    FalipError,
    ImageLoadError,
    InvalidRegionError,
    ModelLoadError,
    RegionClampWarning,
    TextUnavailableError,
    UnsupportedModelError,
)
from .geometry import PREPROCESS_MODES, ImageTransform, make_transform
from .images import load_image
from .methods import encode_with_method, parse_method
from .model import FalipModel, PreparedImage, Preprocessor, load
from .runtimes import list_models as _runtime_models
from .runtimes.open_clip_loading import normalize_model_name
from .tasks.classify import classify
from .tasks.pointcloud import classify_points
from .tasks.rec import Grounding, ground
from .version import __version__


def list_models() -> list[str]:
    """Model names falip's runtime adapters know (open_clip's ViT architectures); paths and hub ids load too."""
    return _runtime_models()


__all__ = [
    "__version__",
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
    "PreparedImage",
    "Preprocessor",
    "RegionClampWarning",
    "TextUnavailableError",
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
