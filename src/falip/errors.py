"""Exceptions raised by falip. Every message names the offending input."""


class FalipError(Exception):
    """Base class of all falip errors."""


class InvalidRegionError(FalipError, ValueError):
    """A box or mask is malformed, empty, or lies outside the image."""


class ImageLoadError(FalipError, ValueError):
    """An image could not be read or has an unsupported layout."""


class ModelLoadError(FalipError, RuntimeError):
    """A model name, tag or checkpoint could not be resolved or loaded."""


class UnsupportedModelError(FalipError, ValueError):
    """The model is not a [CLS]-pooled CLIP ViT that FALIP can steer."""


class RegionClampWarning(UserWarning):
    """A region extended past the image (or the centre crop) and was clamped."""


class TextUnavailableError(FalipError, RuntimeError):
    """The model was loaded without what text encoding needs (a tokenizer, or the text tower)."""


class InputFileError(FalipError, ValueError):
    """An input file or value is missing, not what it should be, undecodable, malformed, or over a size bound."""
