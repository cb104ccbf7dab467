"""The foveal bias: configuration, the bump, and the attention masks built from it.

The one internal representation is a **bias vector** per region: ``(num_prefix + gh·gw,)`` float32
values over the tokens (the runtime's prefix tokens first — [CLS], then any register tokens — all 0;
then the patches row-major). ``rows`` says which queries it is added to:

- ``cls``: only the [CLS] query's logits (row 0 of ``M``) — the paper's choice;
- ``all``: every query's logits (every row of ``M`` is the vector);
- ``diagonal``: each token's logit to itself (``M[t, t] = v[t]``).

``heads`` scales the bias per head (selection is a scale of 0 or 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Optional, Union

import numpy as np
import torch

from .errors import InvalidRegionError
from .geometry import box_token_weights, make_transform, mask_token_weights, validate_boxes, validate_masks

SHAPES = ("gaussian", "uniform", "hard")
ROWS = ("cls", "all", "diagonal")
# How the bump's numbers are computed (see :func:`bump`).
NUMERICS = ("float64", "reference-numpy1", "reference-numpy2")

HeadSpec = Union[None, Sequence[int], Mapping[int, float]]


@dataclass(frozen=True)
class Unleash:
    """Amplify ("unleash") the change the bias makes to chosen heads in chosen blocks.

    In each of ``layers`` (0-based, negative counts from the end), head h of ``heads`` (None = all)
    attends with ``P_h + lam·(P_h − P0_h)``, where ``P`` / ``P0`` are its attention probabilities
    with / without the bias at the same input: ``lam = 1`` doubles the prompt-induced change (the
    paper), ``lam = 0`` is the prompted model unchanged. CLI spelling: ``LAYERS:HEADS[:λ]``.
    """

    layers: tuple[int, ...]
    heads: Optional[tuple[int, ...]] = None
    lam: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not self.layers:
            raise ValueError("Unleash.layers is empty: name at least one block")
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
            if not self.heads:
                raise ValueError("Unleash.heads is empty: name at least one head, or None for all")
        check_float32("Unleash.lam", self.lam)
        object.__setattr__(self, "lam", float(self.lam))


@dataclass(frozen=True)
class FovealConfig:
    """FALIP settings.

    alpha: peak bias (centre of the region). sigma: Gaussian width in token units.
    shape: ``gaussian`` (the paper's bump), ``uniform`` (``alpha`` on every region token) or
        ``hard`` (0 inside the region, ``hard_value`` on patch tokens outside it).
    rows: which attention queries get the bias (``cls``, ``all``, ``diagonal``).
    layers: 0-based block indices that carry the bias (negative counts from the end);
        ``None`` = the last third of the blocks (blocks 8–11 of 12, as the reference code) for a
        [CLS]-pooled model, and no block for an attention-pooled one (SigLIP: the bias goes on its
        probe, always; ``layers`` adds blocks, with rows ``all``/``diagonal``).
    heads: ``None`` = all heads; a sequence of head indices; or ``{head: scale}``.
    unleash: ``None`` (off), or :class:`Unleash` entries amplifying the bias's effect on chosen
        heads of biased blocks (a later entry overrides an earlier one for the same head).
    numerics: how the bump is computed: ``float64`` (the clean formula of docs/method.md §2.1, the default),
        or the reference code's float32 operations as they run under NumPy 1.x
        (``reference-numpy1``, its pinned environment) or NumPy ≥ 2 (``reference-numpy2``);
        see :func:`bump`.
    """

    alpha: float = 0.2
    sigma: float = 100.0
    shape: str = "gaussian"
    rows: str = "cls"
    layers: Optional[tuple[int, ...]] = None
    heads: HeadSpec = None
    eps: float = 1e-6
    hard_value: float = -100.0
    unleash: Optional[tuple[Unleash, ...]] = None
    numerics: str = "float64"

    def __post_init__(self):
        if self.numerics not in NUMERICS:
            raise ValueError(f"FovealConfig.numerics must be one of {NUMERICS}, got {self.numerics!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"FovealConfig.shape must be one of {SHAPES}, got {self.shape!r}")
        if self.rows not in ROWS:
            raise ValueError(f"FovealConfig.rows must be one of {ROWS}, got {self.rows!r}")
        for name in ("alpha", "hard_value"):
            check_float32(f"FovealConfig.{name}", getattr(self, name))
        for name in ("sigma", "eps"):
            value = real_number(f"FovealConfig.{name}", getattr(self, name))
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"FovealConfig.{name} must be > 0 and finite, got {getattr(self, name)!r}")
        with np.errstate(all="ignore"):
            two_var = 2.0 * np.float64(self.sigma) ** 2  # what the float64 bump divides by
        if not 0.0 < two_var < np.inf:
            raise ValueError(
                f"FovealConfig.sigma = {self.sigma!r}: the bump divides by 2·sigma², which is {float(two_var)!r} in float64; "
                "use a sigma between 1e-150 and 1e150 (in tokens; the library default is 100)"
            )
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if self.heads is not None and not isinstance(self.heads, Mapping):
            object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        for head, scale in self.heads.items() if isinstance(self.heads, Mapping) else ():
            check_float32(f"FovealConfig.heads[{head}] (a head's bias scale)", scale)
            check_float32(f"the largest bias on head {head} (alpha × its scale {scale:g})", self.bias_bound(scale))
        if self.unleash is not None:
            if isinstance(self.unleash, Unleash):
                object.__setattr__(self, "unleash", (self.unleash,))
            entries = tuple(
                u if isinstance(u, Unleash) else Unleash(**u) if isinstance(u, Mapping) else Unleash(*u) for u in self.unleash
            )
            object.__setattr__(self, "unleash", entries or None)

    @classmethod
    def of(cls, config) -> Optional[FovealConfig]:
        """``config`` as a FovealConfig: None stays None, a FovealConfig is itself, a mapping gives its fields
        (as :meth:`to_dict` writes them); anything else, or an unknown field, is a ValueError naming it."""
        if config is None or isinstance(config, cls):
            return config
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a FovealConfig or a dict of its fields, got {type(config).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(str(k) for k in config if k not in known)
        if unknown:
            raise ValueError(f"unknown FovealConfig field(s) {unknown}: the fields are {sorted(known)}")
        return cls(**config)

    @classmethod
    def official(cls, numerics: str = "reference-numpy1") -> FovealConfig:
        """The reference code's settings: α 0.2, σ 100, [CLS] row, blocks ≥ 8 of 12, all heads.

        The bump follows the reference's float32 operations as its pinned environment (NumPy 1.21,
        ``requirements.txt``) runs them; ``numerics="reference-numpy2"`` gives what the same code
        computes under NumPy ≥ 2 (tiny regions differ: 0.2 vs 0.2097 for 1×1, see :func:`bump`).
        """
        if numerics == "float64":
            raise ValueError(
                "official() reproduces the reference's float32 bump; use FovealConfig(layers=(8, 9, 10, 11)) for float64"
            )
        return cls(alpha=0.2, sigma=100.0, shape="gaussian", rows="cls", layers=(8, 9, 10, 11), numerics=numerics)

    def bias_bound(self, scale: float = 1.0) -> float:
        """The largest |value| a bias of this config takes on a head of bias scale ``scale`` (the bump's peak is alpha)."""
        peak = abs(self.hard_value) if self.shape == "hard" else abs(self.alpha)
        return peak * abs(float(scale))

    def check_dtype(self, dtype: torch.dtype, num_heads: int) -> None:
        """ValueError unless every bias value and unleashing gain of this config is finite in ``dtype``, the
        attention dtype of the model it runs on (fp16 holds at most 65504)."""
        scales = self.head_scales(num_heads)
        worst = self.bias_bound(1.0 if scales is None else float(scales.abs().max()))
        gains = [abs(u.lam) for u in self.unleash or ()]
        for what, value in [("the largest bias (alpha × head scale)", worst)] + [("an unleash λ", g) for g in gains]:
            if not bool(torch.isfinite(torch.tensor(value, dtype=torch.float64).to(dtype))):
                limit = torch.finfo(dtype).max
                raise ValueError(
                    f"{what} = {value:g} overflows {str(dtype).replace('torch.', '')}, the attention dtype of this model "
                    f"(largest value {limit:g}): use a smaller value, or load the model with --precision fp32"
                )

    def resolve_layers(self, depth: int, pool: str = "cls") -> tuple[int, ...]:
        """Sorted 0-based block indices for a ViT of ``depth`` blocks that pools with ``pool`` (``cls`` or
        ``attention_pool``, as :attr:`falip.runtimes.VisionRuntime.pool`)."""
        if self.layers is None:
            return () if pool == "attention_pool" else tuple(range(depth - depth // 3, depth))
        out = set()
        for i in self.layers:
            j = i + depth if i < 0 else i
            if not 0 <= j < depth:
                raise ValueError(f"layer {i} is out of range for a ViT with {depth} blocks")
            out.add(j)
        return tuple(sorted(out))

    def head_scales(self, num_heads: int) -> Optional[torch.Tensor]:
        """``(num_heads,)`` float32 per-head scale of the bias, or ``None`` for all heads at 1."""
        if self.heads is None:
            return None
        scales = torch.zeros(num_heads, dtype=torch.float32)
        items = self.heads.items() if isinstance(self.heads, Mapping) else ((h, 1.0) for h in self.heads)
        for h, s in items:
            if not 0 <= int(h) < num_heads:
                raise ValueError(f"head {h} is out of range for a ViT with {num_heads} heads")
            scales[int(h)] = float(s)
        return scales

    def unleash_gains(
        self, depth: int, num_heads: int, biased_only: bool = True, pool: str = "cls"
    ) -> Optional[dict[int, torch.Tensor]]:
        """``{block: gain (num_heads,) float32}`` for the unleashed blocks, or ``None`` when off.

        Raises ValueError for blocks or heads the model lacks, and (``biased_only``, for the bias
        alone) for blocks without the bias: there is no prompt-induced change to amplify there.
        Image-edit prompts change every block (:func:`falip.methods.encode_unleashed`).
        """
        if self.unleash is None:
            return None
        biased = self.resolve_layers(depth, pool)
        gains: dict[int, torch.Tensor] = {}
        for entry in self.unleash:
            for i in entry.layers:
                j = i + depth if i < 0 else i
                if not 0 <= j < depth:
                    raise ValueError(f"unleash layer {i} is out of range for a ViT with {depth} blocks")
                if biased_only and j not in biased:
                    raise ValueError(
                        f"unleash layer {i} carries no bias (biased blocks: {list(biased)}), so there is no "
                        "prompt-induced change to amplify; unleash biased blocks or add the block to layers"
                    )
                heads = range(num_heads) if entry.heads is None else entry.heads
                gain = gains.setdefault(j, torch.zeros(num_heads, dtype=torch.float32))
                for h in heads:
                    if not 0 <= h < num_heads:
                        raise ValueError(f"unleash head {h} is out of range for a ViT with {num_heads} heads")
                    gain[h] = entry.lam
        return gains

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.heads, Mapping):
            d["heads"] = {str(k): float(v) for k, v in self.heads.items()}
        if self.unleash is None:
            del d["unleash"]  # configs without unleashing serialise exactly as before the option existed
        if self.numerics == "float64":
            del d["numerics"]  # likewise for the default bump arithmetic
        return d


FLOAT32_MAX = float(np.finfo(np.float32).max)


def real_number(name: str, value) -> float:
    """``value`` as a float, or ValueError naming ``name`` when it is not a real number a float holds."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} = {value!r} is too large for a float") from None


def check_float32(name: str, value) -> None:
    """ValueError unless ``value`` is a real number that float32 holds (falip's bias vectors are float32)."""
    if not abs(real_number(name, value)) <= FLOAT32_MAX:
        raise ValueError(f"{name} = {value!r} does not fit the float32 bias (|value| ≤ {FLOAT32_MAX:.3g}); use a smaller value")


def bump(h: int, w: int, alpha: float, sigma: float, eps: float = 1e-6, numerics: str = "float64") -> np.ndarray:
    """The ``(h, w)`` bump ``α (G − min G + ε) / (max G − min G + ε)`` (docs/method.md §2.1), as float64 values.

    ``numerics="float64"``: the formula in float64 (a 1×1 region gets exactly α).

    ``reference-numpy1`` / ``reference-numpy2``: the float operations of the reference code
    (executor.py, ``generate_gaussian_mask_region``): each ``G = exp(-0.5 (√(dx² + dy²) / σ)²)`` is
    computed in float64 and stored into a float32 array; then ``(G − min + ε) / (max + ε − min) · α``
    runs with float32 arrays. NumPy's scalar promotion decides the denominator: with NumPy 1.x (the
    reference's pinned 1.21) ``max + ε − min`` is a float64 scalar (cast to float32 for the division);
    with NumPy ≥ 2 (NEP 50) it is float32, and ``1 + 1e-6`` rounds to ``1 + 8·2⁻²³``, so flat 1×1,
    1×2, 2×2 regions get 0.2097·α/0.2 … instead of α. Written here from those rules, not copied.
    """
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    dy = np.arange(h, dtype=np.float64)[:, None] - (h - 1) / 2
    dx = np.arange(w, dtype=np.float64)[None, :] - (w - 1) / 2
    if numerics == "float64":
        g = np.exp(-(dy**2 + dx**2) / (2 * sigma**2))
        return alpha * (g - g.min() + eps) / (g.max() - g.min() + eps)
    g = np.exp(-0.5 * (np.sqrt(dx**2 + dy**2) / sigma) ** 2).astype(np.float32)
    lo, hi = g.min(), g.max()  # float32 scalars
    num = (g - lo) + np.float32(eps)
    if numerics == "reference-numpy1":
        den = np.float32(np.float64(hi) + eps - np.float64(lo))
    else:
        den = (hi + np.float32(eps)) - lo
    out = (num / den) * np.float32(alpha)
    assert out.dtype == np.float32
    return out.astype(np.float64)


def bias_from_weights(weights: np.ndarray, config: FovealConfig, num_prefix: int = 1) -> torch.Tensor:
    """Bias vector ``(num_prefix + gh·gw,)`` float32 from token weights ``(gh, gw)`` in [0, 1] (prefix entries 0).

    Region tokens are those with weight > 0; the bump spans their bounding rectangle and is
    multiplied by the weight (1 for boxes, the covered fraction for masks).
    """
    covered = weights > 0
    rows = np.flatnonzero(covered.any(axis=1))
    cols = np.flatnonzero(covered.any(axis=0))
    patch = np.zeros_like(weights)
    if config.shape == "hard":
        patch[~covered] = config.hard_value
    elif config.shape == "uniform":
        patch = config.alpha * weights
    else:
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        patch[r0:r1, c0:c1] = bump(r1 - r0, c1 - c0, config.alpha, config.sigma, config.eps, config.numerics)
        patch *= weights
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be >= 0, got {num_prefix}")
    vec = np.concatenate([np.zeros(num_prefix), patch.reshape(-1)]).astype(np.float32)
    return torch.from_numpy(vec)


def region_bias(
    box,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    config: Optional[FovealConfig] = None,
    preprocess: str = "squash",
    patch_size: int = 16,
    num_prefix: int = 1,
) -> torch.Tensor:
    """The float32 bias vector ``(num_prefix + gh·gw,)`` added to the [CLS] query's logits for one box.

    ``box`` is ``(x0, y0, x1, y1)`` in original pixels of an image of ``image_size = (W, H)``;
    ``grid = (gh, gw)`` patches of ``patch_size`` pixels. The first ``num_prefix`` entries ([CLS], then
    register tokens) are always 0.
    With ``preprocess="squash"`` and :meth:`FovealConfig.official` this is docs/method.md §3 exactly.
    """
    config = config or FovealConfig.official()
    gh, gw = grid
    if gh != gw:
        raise ValueError(f"only square patch grids are supported, got {grid}")
    box = validate_boxes(box, image_size)
    if box.shape[0] != 1:
        raise ValueError(f"region_bias takes one box, got {box.shape[0]}")
    transform = make_transform(preprocess, image_size, gh * patch_size)
    weights = box_token_weights(transform.map_box(box[0]), gh * patch_size, patch_size, grid)
    return bias_from_weights(weights, config, num_prefix)


def region_biases(
    transform,
    grid: tuple[int, int],
    patch_size: int,
    config: FovealConfig,
    boxes=None,
    masks=None,
    num_prefix: int = 1,
) -> torch.Tensor:
    """Bias vectors ``(K, num_prefix + gh·gw)`` for K boxes or K masks of one image under ``transform`` (prefix entries 0)."""
    if (boxes is None) == (masks is None):
        raise ValueError("give exactly one of boxes=... or masks=...")
    S = transform.input_size
    if boxes is not None:
        arr = validate_boxes(boxes, transform.image_size)
        weights = [box_token_weights(transform.map_box(b, i), S, patch_size, grid) for i, b in enumerate(arr)]
    else:
        weights = []
        for i, m in enumerate(validate_masks(masks, transform.image_size)):
            w = mask_token_weights(transform.map_mask(m), patch_size, grid)
            if not w.any():
                raise InvalidRegionError(f"mask {i} lies entirely outside the centre crop (preprocess={transform.mode!r})")
            weights.append(w)
    return torch.stack([bias_from_weights(w, config, num_prefix) for w in weights])


def full_attention_mask(bias: torch.Tensor, rows: str, num_heads: int, head_scales: Optional[torch.Tensor]) -> torch.Tensor:
    """Additive attention mask ``(K·H, L, L)`` from bias vectors ``(K, L)``."""
    K, L = bias.shape
    mask = bias.new_zeros(K, L, L)
    if rows == "cls":
        mask[:, 0, :] = bias
    elif rows == "all":
        mask[:] = bias[:, None, :]
    else:
        mask.diagonal(dim1=1, dim2=2).copy_(bias)
    mask = mask[:, None].expand(K, num_heads, L, L)
    if head_scales is not None:
        mask = mask * head_scales.to(mask)[None, :, None, None]
    return mask.reshape(K * num_heads, L, L)


def query_rows_mask(bias: torch.Tensor, num_heads: int, head_scales: Optional[torch.Tensor]) -> torch.Tensor:
    """Additive mask ``(H, K, L)`` for K [CLS] queries of *one* sequence, query k carrying bias ``k`` ``(K, L)``."""
    mask = bias[None].expand(num_heads, -1, -1)
    if head_scales is not None:
        mask = mask * head_scales.to(mask)[:, None, None]
    return mask


def approx_sequence_mask(bias_rows: torch.Tensor, num_heads: int, head_scales: Optional[torch.Tensor]) -> torch.Tensor:
    """Additive mask ``(m·H, L + Q, L + Q)`` for m sequences ``[L image tokens, Q [CLS] copies]`` (``approx`` mode).

    ``bias_rows (m, Q, L)``: copy q of image j carries the bias ``bias_rows[j, q]``. The image tokens
    attend to each other unmasked and never to the copies (``-inf``), so they stay the plain pass.
    Copy q sees its own key (bias ``[..., 0]``) and the image's tokens after [CLS] — register tokens,
    if any, then patches (bias ``[..., 1:]``); the image's own [CLS] and the other copies get
    ``-inf``, i.e. exactly zero weight. So Q independent biased [CLS] rows share one attention call
    with the unbiased tokens they read.
    """
    m, Q, L = bias_rows.shape
    rows = bias_rows[:, None].expand(m, num_heads, Q, L)
    if head_scales is not None:
        rows = rows * head_scales.to(rows)[None, :, None, None]
    mask = bias_rows.new_full((m, num_heads, L + Q, L + Q), float("-inf"))
    mask[:, :, :L, :L] = 0
    mask[:, :, L:, 1:L] = rows[..., 1:]
    mask[:, :, L:, L:].diagonal(dim1=-2, dim2=-1).copy_(rows[..., 0])
    return mask.view(m * num_heads, L + Q, L + Q)
