"""``FalipModel``: a CLIP ViT that can look at regions of an image."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .bias import FovealConfig, region_biases
from .digests import file_digest
from .encode import MODES, BiasPlan, encode_biased
from .errors import ModelLoadError
from .geometry import PREPROCESS_MODES, ImageTransform, make_transform
from .images import load_image
from .loading import PRECISIONS, check_device, check_precision
from .runtimes import VisionRuntime, load_runtime

# The defaults of a model without its own settings (a model card's ``preprocess`` and ``falip``
# override them): squash preprocessing (the FALIP reference code's; no region is cropped away)
# and ``FovealConfig()`` (α 0.2, σ 100, [CLS] row, the last third of the blocks: the reference's
# settings for ViT-B/16).
DEFAULT_PREPROCESS = "squash"


class FalipModel:
    """A CLIP ViT with foveal attention. Build it with :func:`falip.load`.

    Attributes: ``runtime`` (the model behind its adapter, a :class:`falip.runtimes.VisionRuntime`), ``preprocess`` (``squash``/``crop``/``pad``),
    ``config`` (the default :class:`FovealConfig`; assigning one checks it against the model),
    ``image_size`` S, ``patch_size`` p, ``grid`` (gh, gw), ``num_layers``, ``num_heads``.
    """

    def __init__(
        self,
        runtime: VisionRuntime,
        preprocess: str = DEFAULT_PREPROCESS,
        config: Optional[FovealConfig] = None,
        name: str = "",
        pretrained: Optional[str] = None,
        weights_file=None,
    ):
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        self.runtime = runtime
        self.preprocess = preprocess
        self.name = name
        self.pretrained = pretrained
        self.weights_file = weights_file
        self._digest: Optional[str] = None
        self.config = config or FovealConfig()

    @property
    def config(self) -> FovealConfig:
        return self._config

    @config.setter
    def config(self, config: FovealConfig) -> None:
        config = FovealConfig.of(config)
        self._check_pooling(config, self.bias_layers(config))  # fail early on layers the model lacks
        # ... and on unleash entries naming blocks or heads it lacks (unbiased blocks fail when the bias is used)
        config.unleash_gains(self.runtime.num_layers, self.runtime.num_heads, biased_only=False)
        config.check_dtype(self.runtime.dtype, self.num_heads)  # ... and on values the model's dtype cannot hold
        self._config = config

    def resolve_config(self, config=None) -> FovealConfig:
        """The config a call runs with: ``config`` (a FovealConfig or a dict of its fields), else the model's own."""
        return FovealConfig.of(config) or self.config

    def bias_layers(self, config: Optional[FovealConfig] = None) -> tuple[int, ...]:
        """The blocks that carry the bias under ``config`` (default: the model's): by default the last third of
        the blocks of a [CLS]-pooled model, none of an attention-pooled one (its probe carries the bias)."""
        return self.resolve_config(config).resolve_layers(self.runtime.num_layers, self.runtime.pool)

    def _check_pooling(self, config: FovealConfig, layers: tuple[int, ...]) -> None:
        """ValueError for settings an attention-pooled model cannot honour (it has no [CLS] query to bias)."""
        if self.runtime.pool != "attention_pool":
            return
        if layers and config.rows == "cls":
            raise ValueError(
                f"{self.name or 'this model'} pools with an attention probe and has no [CLS] query: rows='cls' with "
                f"layers {list(config.layers)} has nothing to bias; use rows='all' or rows='diagonal' (the probe is biased anyway)"
            )
        if not layers:
            block_only = [
                f
                for f, on in (
                    ("rows", config.rows != "cls"),
                    ("heads", config.heads is not None),
                    ("unleash", config.unleash is not None),
                )
                if on
            ]
            if block_only:
                raise ValueError(
                    f"FovealConfig {'/'.join(block_only)} act on biased blocks, but {self.name or 'this model'} pools with an "
                    "attention probe and, with layers=None, only its probe carries the bias; set layers (e.g. "
                    "layers=(-4, -3, -2, -1), rows='all') to bias blocks too"
                )

    # -- geometry -------------------------------------------------------------------------------
    image_size = property(lambda self: self.runtime.image_size)
    patch_size = property(lambda self: self.runtime.patch_size)
    grid = property(lambda self: self.runtime.grid)
    num_layers = property(lambda self: self.runtime.num_layers)
    num_heads = property(lambda self: self.runtime.num_heads)
    device = property(lambda self: self.runtime.device)

    def info(self) -> dict:
        """A JSON-able summary: name, weights, geometry, default bias layers, preprocessing, and the runtime's
        own description (``runtime``: family, prefix tokens, pooling, score)."""
        return dict(
            name=self.name,
            pretrained=self.pretrained,
            image_size=self.image_size,
            patch_size=self.patch_size,
            grid=list(self.grid),
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            width=self.runtime.width,
            dtype=str(self.runtime.dtype).replace("torch.", ""),
            device=str(self.device),
            preprocess=self.preprocess,
            mean=list(self.runtime.mean),
            std=list(self.runtime.std),
            config=self.config.to_dict(),
            bias_layers=list(self.bias_layers()),
            bias_probe=self.runtime.pool == "attention_pool",
            runtime=self.runtime.info(),
        )

    def weights_digest(self) -> str:
        """What identifies the weights, for run fingerprints: ``file:<sha256>`` of the weights file
        (cached per path, size and mtime), else ``memory:<sha256>`` of the tensors in memory (a random
        initialisation differs on each load unless torch was seeded)."""
        if self._digest is None:
            if self.weights_file is not None:
                self._digest = "file:" + file_digest(self.weights_file)
            else:
                kind = "memory" if self.pretrained else "random"
                self._digest = f"{kind}:{self.runtime.digest('all')[:16]}"
        return self._digest

    def _finite(
        self, embeddings: torch.Tensor, biased: Optional[tuple[torch.Tensor, torch.Tensor, FovealConfig]] = None
    ) -> torch.Tensor:
        """``embeddings (N, E)`` unchanged, or an error naming the cause when any value is NaN/inf.

        biased: ``(pixels (B, 3, S, S), image_index (N,), config)`` of a biased pass: when the plain pass of the
        images whose regions are not finite is finite, the bias settings are the cause (ValueError naming them);
        otherwise the input, the weights or the precision (ModelLoadError)."""
        bad = ~torch.isfinite(embeddings).all(dim=-1)
        if not bool(bad.any()):
            return embeddings
        if biased is not None and bool(torch.isfinite(self.runtime.run(biased[0][biased[1][bad].unique()])).all()):
            raise ValueError(
                f"the FALIP bias settings {json.dumps(biased[2].to_dict())} make model {self.name or '(unnamed)'} produce NaN "
                f"or infinite embeddings in {str(self.runtime.dtype).replace('torch.', '')} (its plain image pass is finite): "
                "use a smaller alpha, head scales or unleash λ"
            )
        raise ModelLoadError(
            f"model {self.name or '(unnamed)'} (weights {self.pretrained or self.weights_file or 'random'}) produced NaN "
            f"or infinite embeddings in {str(self.runtime.dtype).replace('torch.', '')}; its weights are broken, "
            "or the precision overflows (try --precision fp32)"
        )

    def transform_for(self, image_size: tuple[int, int], preprocess: Optional[str] = None) -> ImageTransform:
        """The preprocessing transform for an image of ``image_size = (W, H)``."""
        return make_transform(preprocess or self.preprocess, image_size, self.image_size)

    def preprocessor(self, preprocess: Optional[str] = None) -> Preprocessor:
        """The model's preprocessing as a small picklable object (for DataLoader worker processes)."""
        return Preprocessor(preprocess or self.preprocess, self.image_size, tuple(self.runtime.mean), tuple(self.runtime.std))

    def preprocess_image(self, image, preprocess: Optional[str] = None) -> tuple[torch.Tensor, ImageTransform]:
        """``(pixels (1, 3, S, S) float32, transform)`` for a path, PIL image or array."""
        prepared = self.preprocessor(preprocess)(load_image(image))
        return prepared.pixels, prepared.transform

    def plan(self, config: Optional[FovealConfig] = None) -> BiasPlan:
        """Where ``config`` (default: the model's) puts the bias on this model: blocks, rows, heads, unleashing,
        and (attention-pooled models) the probe."""
        config = self.resolve_config(config)
        layers = self.bias_layers(config)
        self._check_pooling(config, layers)
        config.check_dtype(self.runtime.dtype, self.num_heads)
        pool = self.runtime.pool
        return BiasPlan(
            layers=layers,
            rows=config.rows,
            head_scales=config.head_scales(self.num_heads),
            unleash=config.unleash_gains(self.num_layers, self.num_heads, pool=pool),
            probe=pool == "attention_pool",
        )

    def region_biases(
        self, transform: ImageTransform, boxes=None, masks=None, config: Optional[FovealConfig] = None
    ) -> torch.Tensor:
        """Bias vectors ``(K, num_prefix + gh·gw)`` of K boxes (xyxy pixels) or K masks ``(H, W)`` (prefix entries 0)."""
        return region_biases(
            transform,
            self.grid,
            self.patch_size,
            self.resolve_config(config),
            boxes=boxes,
            masks=masks,
            num_prefix=self.runtime.num_prefix,
        )

    # -- encoders -------------------------------------------------------------------------------
    def encode_image(self, images, preprocess: Optional[str] = None, batch_size: int = 32) -> torch.Tensor:
        """L2-normalised embeddings ``(B, E)`` of one image or a list of images (no bias); :class:`PreparedImage` too."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.cat(
                [im.pixels if isinstance(im, PreparedImage) else self.preprocess_image(im, preprocess)[0] for im in chunk]
            )
            out.append(F.normalize(self._finite(self.runtime.run(pixels)).float(), dim=-1))
        return torch.cat(out)

    def encode_pixels(
        self,
        pixels: torch.Tensor,
        *,
        normalized: bool,
        masks: Optional[torch.Tensor] = None,
        config: Optional[FovealConfig] = None,
        mode: str = "exact",
        batch_size: int = 32,
    ) -> torch.Tensor:
        """L2-normalised embeddings ``(B, E)`` of images given as pixels ``(B, 3, S, S)`` at the model's input size.

        normalized (required): ``False`` — RGB in [0, 1], the model's mean/std are applied here;
        ``True`` — the pixels go to the ViT as they are (already normalised, or deliberately not, as
        PointCLIP and PointCLIP V2 feed their depth views). masks: ``(B, S, S)`` bool — each image is
        encoded with the foveal bias on its mask (``config``, ``mode`` as in :meth:`encode_regions`);
        ``None``: plain images.
        """
        S = self.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"pixels must be a tensor (B, 3, {S}, {S}), got {getattr(pixels, 'shape', type(pixels))}")
        if masks is not None and tuple(masks.shape) != (pixels.shape[0], S, S):
            raise ValueError(f"masks must be (B, {S}, {S}) for {pixels.shape[0]} images, got {tuple(masks.shape)}")
        pixels = pixels.float().cpu()
        if not normalized:
            mean = torch.tensor(self.runtime.mean).view(1, 3, 1, 1)
            std = torch.tensor(self.runtime.std).view(1, 3, 1, 1)
            pixels = (pixels - mean) / std
        if masks is None:
            out = [self.runtime.run(pixels[s : s + batch_size]) for s in range(0, len(pixels), batch_size)]
            return F.normalize(self._finite(torch.cat(out)).float(), dim=-1)
        transform = self.transform_for((S, S), "squash")  # the identity on an S×S image
        plan = self.plan(config)
        out = []
        for s in range(0, len(pixels), batch_size):  # every image one region: its mask
            bias = self.region_biases(transform, masks=list(masks[s : s + batch_size].cpu().numpy()), config=config)
            index = torch.arange(len(bias))
            out.append(encode_biased(self.runtime, pixels[s : s + batch_size], bias, plan, mode=mode, image_index=index))
        biased = (pixels, torch.arange(len(pixels)), self.resolve_config(config))  # one region per image
        return F.normalize(self._finite(torch.cat(out), biased=biased).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        """L2-normalised embeddings ``(T, E)`` of one text or a list of texts (the model's own tokenizer).

        Raises :class:`falip.errors.TextUnavailableError` when the model was loaded without one."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
        return F.normalize(self._finite(self.runtime.encode_text(texts)).float(), dim=-1)

    def encode_regions(
        self,
        image,
        boxes=None,
        *,
        masks=None,
        config: Optional[FovealConfig] = None,
        mode: str = "exact",
        preprocess: Optional[str] = None,
        chunk_size: Optional[int] = None,
    ) -> torch.Tensor:
        """L2-normalised embeddings ``(K, E)`` of one image looking at each of K regions.

        image: path, PIL image, array, or a :class:`PreparedImage`. boxes: ``(K, 4)`` ``(x0, y0, x1, y1)``
        in original pixels (list, numpy or tensor). masks: instead of boxes, K boolean ``(H, W)`` masks.
        mode: ``exact`` (default), ``naive`` (one pass per region) or ``approx`` (see README).
        chunk_size: regions per batched pass (default: :func:`falip.encode.default_chunk_size`).
        """
        if (boxes is None) == (masks is None):
            raise ValueError("give exactly one of boxes=... or masks=...")
        kwargs = dict(config=config, mode=mode, preprocess=preprocess, chunk_size=chunk_size)
        if masks is not None:
            return self.encode_regions_batch([image], masks_per_image=[masks], **kwargs)[0]
        return self.encode_regions_batch([image], [boxes], **kwargs)[0]

    def encode_regions_batch(
        self,
        images: Sequence,
        boxes_per_image: Optional[Sequence] = None,
        *,
        masks_per_image: Optional[Sequence] = None,
        config: Optional[FovealConfig] = None,
        mode: str = "exact",
        preprocess: Optional[str] = None,
        chunk_size: Optional[int] = None,
    ) -> list[torch.Tensor]:
        """:meth:`encode_regions` of N images in shared passes: a list of N L2-normalised ``(K_i, E)`` tensors.

        images: N paths, PIL images, arrays or :class:`PreparedImage` (``model.preprocessor()(pil)``, e.g.
        made in DataLoader workers). boxes_per_image: N box lists ``(K_i, 4)``; masks_per_image: instead,
        N lists of K_i masks ``(H_i, W_i)``. An image with no regions (``None`` or empty) gives ``(0, E)``.
        The unbiased blocks run batched over the images, the biased ones over all regions in chunks of
        ``chunk_size``; each image's result equals :meth:`encode_regions` on it (up to float rounding).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        images = list(images)
        if (boxes_per_image is None) == (masks_per_image is None):
            raise ValueError("give exactly one of boxes_per_image=... or masks_per_image=... (one list per image)")
        regions = [
            r if r is None or hasattr(r, "__len__") else list(r)
            for r in (boxes_per_image if boxes_per_image is not None else masks_per_image)
        ]  # generators too
        if len(regions) != len(images):
            raise ValueError(f"{len(images)} images but {len(regions)} region lists")
        pixels, biases, counts = [], [], []
        for image, region in zip(images, regions):
            if isinstance(region, Iterator):
                region = list(region)  # a generator of boxes or masks
            if region is None or len(region) == 0:
                counts.append(0)
                continue
            if isinstance(image, PreparedImage):
                if preprocess is not None and preprocess != image.transform.mode:
                    raise ValueError(f"a PreparedImage made with preprocess={image.transform.mode!r} given with {preprocess!r}")
                prepared = image
            else:
                prepared = self.preprocessor(preprocess)(load_image(image))
            kind = dict(boxes=region) if boxes_per_image is not None else dict(masks=region)
            biases.append(self.region_biases(prepared.transform, config=config, **kind))
            pixels.append(prepared.pixels)
            counts.append(len(biases[-1]))
        if not pixels:
            return [torch.zeros(0, self.runtime.embed_dim) for _ in images]
        index = torch.cat([torch.full((len(b),), n) for n, b in enumerate(biases)])
        pixels = torch.cat(pixels)
        embeddings = encode_biased(
            self.runtime, pixels, torch.cat(biases), self.plan(config), mode, chunk_size, image_index=index
        )
        return list(
            F.normalize(self._finite(embeddings, biased=(pixels, index, self.resolve_config(config))).float(), dim=-1)
            .cpu()
            .split(counts)
        )

    @torch.no_grad()
    def score_regions(self, image, boxes, texts: Union[str, Sequence[str]], **kwargs) -> torch.Tensor:
        """The model's own logits ``(K, T)`` between each region's embedding and each text (float32, CPU).

        boxes: ``(K, 4)`` xyxy pixels, or None with ``masks=`` (K of ``(H, W)``) as the regions.
        Per family (``runtime.score_kind``): CLIP — ``logit_scale · cos``, compared across texts
        (softmax); SigLIP — ``logit_scale · cos + logit_bias``, before the sigmoid (each pair alone).
        Keyword arguments are those of :meth:`encode_regions` (``masks``, ``config``, ``mode`` …).
        Like every encoder here it is safe to call from several threads on one model.
        """
        text = self.encode_text(texts)
        return self.runtime.logits(self.encode_regions(image, boxes, **kwargs), text)

    @torch.no_grad()
    def score_regions_batch(
        self, images: Sequence, boxes_per_image: Optional[Sequence], texts: Union[str, Sequence[str]], **kwargs
    ) -> list[torch.Tensor]:
        """:meth:`score_regions` of N images against the same T texts: a list of N ``(K_i, T)`` logits (``runtime.logits``).

        boxes_per_image: N box lists ``(K_i, 4)``, or None with ``masks_per_image=``.
        Keyword arguments are those of :meth:`encode_regions_batch` (``masks_per_image``, ``config``, ``mode`` …).
        """
        text = self.encode_text(texts)
        return [self.runtime.logits(r, text) for r in self.encode_regions_batch(images, boxes_per_image, **kwargs)]


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the ViT: ``pixels (1, 3, S, S)`` float32 (normalised) and its ``transform``."""

    pixels: torch.Tensor
    transform: ImageTransform


@dataclass(frozen=True)
class Preprocessor:
    """A model's preprocessing (``mode``, input size S, mean/std) as a picklable callable: PIL → :class:`PreparedImage`."""

    mode: str
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, pil: Image.Image) -> PreparedImage:
        transform = make_transform(self.mode, pil.size, self.size)
        fill = tuple(int(round(255 * m)) for m in self.mean)
        resized = transform.apply(pil, fill=fill)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return PreparedImage(((pixels - mean) / std)[None], transform)


def load(
    name_or_path: str,
    pretrained: Optional[str] = None,
    device: str = "cpu",
    precision: str = "fp32",
    preprocess: Optional[str] = None,
    config: Optional[FovealConfig] = None,
    quick_gelu: Optional[bool] = None,
) -> FalipModel:
    """Load a CLIP ViT for FALIP: the first runtime adapter that claims ``name_or_path`` loads it
    (:mod:`falip.runtimes.registry`; the README's "Supported models" lists them).

    name_or_path: an open_clip name (``"ViT-B-16"``), an OpenAI name (``"ViT-B/16"``,
        ``"ViT-L/14@336px"``), ``"hf-hub:org/repo"``, a local OpenAI-layout checkpoint file, or
        ``"falip-toy"`` (the small CLIP shipped with falip, with its own tuned settings).
    pretrained: an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"`` …) or a weights file;
        ``None`` gives random weights (with a warning) for a name.
    precision: ``fp32``, ``fp16`` or ``bf16``.
    preprocess: ``squash`` (the FALIP reference code), ``crop`` (CLIP's default) or ``pad``;
        ``None``: the model's own (its card's ``preprocess``, else :data:`DEFAULT_PREPROCESS`, squash).
    config: the model's default :class:`FovealConfig`; ``None``: the model's own (its card's
        ``falip`` settings, else ``FovealConfig()``). To change a few fields of the model's own
        settings, assign ``model.config = dataclasses.replace(model.config, alpha=...)``.
    quick_gelu: override the activation (default: QuickGELU for OpenAI weights and files).
    """
    if preprocess is not None and preprocess not in PREPROCESS_MODES:  # before building the model
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    check_device(device)
    check_precision(precision, device)
    loaded = load_runtime(str(name_or_path), pretrained, device, precision, quick_gelu)
    card = loaded.card or {}
    if config is None and "falip" in card:
        config = FovealConfig(**card["falip"])
    if preprocess is None:
        preprocess = card.get("preprocess", DEFAULT_PREPROCESS)
    return FalipModel(
        loaded.runtime,
        preprocess=preprocess,
        config=config,
        name=loaded.name,
        pretrained=loaded.pretrained,
        weights_file=loaded.weights_file,
    )
