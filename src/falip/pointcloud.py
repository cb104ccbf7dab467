"""Point clouds → depth maps that a CLIP ViT can read (pure PyTorch, batched, CPU or GPU).

Conventions (tested in ``tests/test_pointcloud.py``):

- Clouds are ``(P, 3)`` or ``(B, P, 3)`` xyz, **y up** (the PointNet HDF5 files' convention;
  ``up="z"`` turns z-up clouds such as raw ModelNet ``.off`` files upright first).
- :func:`normalize_points` centres each cloud on its centroid and scales it into the unit sphere
  (largest distance to the centre = 1), as PointNet, PointCLIP and PointCLIP V2 do.
- A view is a camera on the unit sphere around the object, looking at the centre (orthographic).
  ``front`` looks from +z towards −z with x to the right and y up; ``right`` looks from +x;
  ``top`` looks down from +y with −z (the back) at the top of the image.
- Depth maps are ``(B, V, S, S)`` float32: the depth of the nearest point in each pixel, 0 at the
  camera-facing side of the unit sphere, 1 at its far side (it **increases away from the viewer**);
  pixels no point falls into are ``inf`` (background). Row 0 is the top of the image.
- The picture CLIP sees (:func:`depth_to_image`): background black, foreground grey levels from
  1.0 (the nearest point of the view) down to 0.25 (the farthest), replicated to RGB.
- Views: :data:`VIEWS_6` (front, right, back, left, top, bottom) and :data:`VIEWS_10` (those six
  and four views from 30° above, at azimuths 45°, 135°, 225° and 315°).

Two projections, after PointCLIP (Zhang et al., CVPR 2022) and PointCLIP V2 (Zhu et al., ICCV 2023):

- ``sparse``: every point lands on one pixel (scatter-min of its depth);
- ``realistic``: the cloud is voxelised on a coarser ``grid × grid`` raster per view (nearest
  depth per cell); densified: each cell takes the nearest depth of its ``densify × densify``
  neighbourhood (the front-most projection of the voxel grid dilated by a cube, up to a constant
  depth shift), and the grown silhouette is eroded back (a morphological closing: holes fill, the
  outline stays); smoothed by a Gaussian over the foreground only; upsampled to S.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import FalipError

PROJECTIONS = ("sparse", "realistic")
MARGIN = 0.05  # fraction of the image left empty on each side around the unit sphere
MIN_RANGE = 0.5  # smallest depth range that depth_to_image spreads over its grey levels


class PointCloudError(FalipError, ValueError):
    """A point cloud (array or file) is empty, malformed or not finite."""


@dataclass(frozen=True)
class View:
    """An orthographic camera looking at the origin from azimuth/elevation in degrees.

    Azimuth 0 is the front (+z), 90 the right side (+x); elevation 90 looks down from +y.
    """

    name: str
    azimuth: float
    elevation: float

    def axes(self) -> torch.Tensor:
        """``(3, 3)`` float32, rows: image right, image up, forward (away from the viewer)."""
        t, p = math.radians(self.azimuth), math.radians(self.elevation)
        towards_viewer = torch.tensor([math.sin(t) * math.cos(p), math.sin(p), math.cos(t) * math.cos(p)], dtype=torch.float64)
        up = torch.tensor([-math.sin(t) * math.sin(p), math.cos(p), -math.cos(t) * math.sin(p)], dtype=torch.float64)
        forward = -towards_viewer
        right = torch.linalg.cross(forward, up)
        return torch.stack([right, up, forward]).float()


VIEWS_6 = (
    View("front", 0, 0),
    View("right", 90, 0),
    View("back", 180, 0),
    View("left", 270, 0),
    View("top", 0, 90),
    View("bottom", 0, -90),
)
# The 6 orthogonal views plus 4 views from 30° above, between the side views.
VIEWS_10 = VIEWS_6 + tuple(View(f"above-{a}", a, 30) for a in (45, 135, 225, 315))


def get_views(views: Union[int, Sequence[View]]) -> tuple[View, ...]:
    """``6`` or ``10`` → the built-in view sets; a sequence of :class:`View` is returned as is."""
    if isinstance(views, int):
        if views == 6:
            return VIEWS_6
        if views == 10:
            return VIEWS_10
        raise PointCloudError(f"views must be 6 or 10 (or a list of View), got {views}")
    views = tuple(views)
    if not views or not all(isinstance(v, View) for v in views):
        raise PointCloudError("views must be 6, 10 or a non-empty list of falip.pointcloud.View")
    return views


def validate_points(points, name: str = "points") -> torch.Tensor:
    """Check a cloud ``(P, 3)`` or a batch ``(B, P, 3)`` and return it as float32 (same shape).

    Raises :class:`PointCloudError` naming ``name`` for a wrong shape, no points or NaN/inf values.
    """
    if isinstance(points, torch.Tensor):
        tensor = points.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(points, dtype=np.float32))
        except (TypeError, ValueError) as exc:
            raise PointCloudError(f"{name} is not a numeric array: {exc}") from exc
    if tensor.ndim not in (2, 3) or tensor.shape[-1] != 3:
        raise PointCloudError(f"{name} must have shape (P, 3) or (B, P, 3), got {tuple(tensor.shape)}")
    if tensor.shape[-2] == 0 or (tensor.ndim == 3 and tensor.shape[0] == 0):
        raise PointCloudError(f"{name} is empty (shape {tuple(tensor.shape)})")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise PointCloudError(f"{name} contains NaN or infinite coordinates")
    return tensor.float()


def normalize_points(points: torch.Tensor, up: str = "y") -> torch.Tensor:
    """Centre each cloud on its centroid and scale it into the unit sphere.

    points: ``(P, 3)`` or ``(B, P, 3)``; up: the cloud's up axis, ``"y"`` (kept) or ``"z"``
    (rotated so that +z becomes +y and +y becomes −z). Returns the same shape, float32.
    A cloud whose points all coincide raises :class:`PointCloudError`.
    """
    if up not in ("y", "z"):
        raise PointCloudError(f"up must be 'y' or 'z', got {up!r}")
    pts = points.float()
    if up == "z":
        pts = torch.stack([pts[..., 0], pts[..., 2], -pts[..., 1]], dim=-1)
    pts = pts - pts.mean(dim=-2, keepdim=True)
    radius = pts.norm(dim=-1).amax(dim=-1, keepdim=True)  # (..., 1)
    if (radius <= 1e-12).any():
        raise PointCloudError("a point cloud has all its points at one place (zero extent)")
    return pts / radius.unsqueeze(-1)


def _camera_coords(points: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """``(B, P, 3)`` → ``(B, V, P, 3)``: (right, up, forward) coordinates of every point per view."""
    axes = torch.stack([v.axes() for v in views]).to(points.device)  # (V, 3, 3)
    return torch.einsum("bpk,vjk->bvpj", points, axes)


def _scatter_depth(points: torch.Tensor, views: Sequence[View], size: int) -> torch.Tensor:
    """Nearest depth per pixel ``(B, V, size, size)`` (``inf`` where no point falls) of normalised clouds."""
    B, P, _ = points.shape
    V = len(views)
    cam = _camera_coords(points, views)
    span, offset = size * (1 - 2 * MARGIN), size * MARGIN
    col = ((cam[..., 0] + 1) / 2 * span + offset).floor().long().clamp(0, size - 1)
    row = ((1 - cam[..., 1]) / 2 * span + offset).floor().long().clamp(0, size - 1)
    depth = ((cam[..., 2] + 1) / 2).clamp(0, 1)
    flat = torch.full((B * V, size * size), math.inf, dtype=torch.float32, device=points.device)
    flat.scatter_reduce_(1, (row * size + col).reshape(B * V, P), depth.reshape(B * V, P), reduce="amin", include_self=True)
    return flat.view(B, V, size, size)


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    return (k[:, None] * k[None, :])[None, None]  # (1, 1, 2r+1, 2r+1)


def project(
    points,
    views: Union[int, Sequence[View]] = 6,
    projection: str = "sparse",
    size: int = 224,
    up: str = "y",
    grid: Optional[int] = None,
    densify: int = 3,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Depth maps ``(B, V, size, size)`` of a batch of clouds ``(B, P, 3)`` (or ``(V, size, size)`` of one ``(P, 3)``).

    The clouds are validated and normalised here (:func:`normalize_points`). ``projection`` is
    ``sparse`` or ``realistic``; the realistic options are ``grid`` (raster side, default
    ``round(size / 3.5)``, 64 at 224), ``densify`` (odd neighbourhood side, default 3) and
    ``smooth`` (Gaussian sigma in grid cells, 0 = off). Runs on the clouds' device in one
    vectorised call.
    """
    if projection not in PROJECTIONS:
        raise PointCloudError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if size < 8:
        raise PointCloudError(f"size must be at least 8 pixels, got {size}")
    pts = validate_points(points)
    single = pts.ndim == 2
    pts = normalize_points(pts[None] if single else pts, up=up)
    views = get_views(views)
    if projection == "sparse":
        depth = _scatter_depth(pts, views, size)
    else:
        depth = _realistic(pts, views, size, grid or round(size / 3.5), densify, smooth)
    return depth[0] if single else depth


def _realistic(points: torch.Tensor, views: Sequence[View], size: int, grid: int, densify: int, smooth: float) -> torch.Tensor:
    if grid < 4 or densify < 1 or densify % 2 == 0 or smooth < 0:
        raise PointCloudError(
            f"realistic projection needs grid >= 4, an odd densify >= 1 and smooth >= 0; got {grid}, {densify}, {smooth}"
        )
    B, V = points.shape[0], len(views)
    coarse = _scatter_depth(points, views, grid).view(B * V, 1, grid, grid)
    # Densify: every cell takes the nearest depth of its densify×densify neighbourhood (min-pool) ...
    filled = torch.where(torch.isinf(coarse), torch.full_like(coarse, 2.0), coarse)
    dense = -F.max_pool2d(-filled, densify, stride=1, padding=densify // 2)
    # ... then the grown silhouette is eroded back (together a closing: holes fill, the outline stays).
    grown = F.pad((dense <= 1.0).float(), [densify // 2] * 4)  # outside the image is background
    fg = -F.max_pool2d(-grown, densify, stride=1)
    depth = torch.where(fg > 0.5, dense, torch.zeros_like(dense))
    if smooth > 0:
        # Normalised convolution: a Gaussian average over foreground cells only.
        kernel = _gaussian_kernel(smooth, points.device)
        pad = kernel.shape[-1] // 2
        num = F.conv2d(depth, kernel, padding=pad)
        den = F.conv2d(fg, kernel, padding=pad)
        depth = torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.ones_like(num))
    up_depth = F.interpolate(depth, size=(size, size), mode="bilinear", align_corners=False)
    up_fg = F.interpolate(fg, size=(size, size), mode="nearest") > 0.5
    out = torch.where(up_fg, up_depth.clamp(0, 1), torch.full_like(up_depth, math.inf))
    return out.view(B, V, size, size)


def foreground(depth: torch.Tensor, dilation: int = 0) -> torch.Tensor:
    """Boolean masks ``(..., S, S)`` of the pixels with a depth, grown by ``dilation`` pixels (square)."""
    mask = torch.isfinite(depth)
    if dilation <= 0:
        return mask
    shape = mask.shape
    flat = mask.reshape(-1, 1, shape[-2], shape[-1]).float()
    grown = F.max_pool2d(flat, 2 * dilation + 1, stride=1, padding=dilation)
    return (grown > 0.5).view(shape)


def depth_to_image(depth: torch.Tensor) -> torch.Tensor:
    """Grey images ``(..., S, S)`` in [0, 1]: background 0; 1.0 at the nearest point of each view, falling
    linearly to 0.25 at its farthest point — over at least ``MIN_RANGE`` of depth, so that a view whose
    depths barely differ (a flat face seen head-on) is not contrast-stretched into noise."""
    fg = torch.isfinite(depth)
    d = torch.where(fg, depth, torch.zeros_like(depth))
    lo = torch.where(fg, depth, torch.full_like(depth, math.inf)).amin(dim=(-2, -1), keepdim=True)
    hi = d.amax(dim=(-2, -1), keepdim=True)
    t = (d - lo) / (hi - lo).clamp_min(MIN_RANGE)
    return torch.where(fg, 1.0 - 0.75 * t.clamp(0, 1), torch.zeros_like(d))


def views_grid(images: torch.Tensor, names: Sequence[str], columns: Optional[int] = None, labels: bool = True):
    """A PIL image tiling ``images (V, S, S)`` in [0, 1], each captioned with its view name."""
    from PIL import Image, ImageDraw

    V, S, _ = images.shape
    columns = columns or (V if V <= 6 else math.ceil(V / 2))
    rows = math.ceil(V / columns)
    gap = 4
    sheet = Image.new("RGB", (columns * S + (columns - 1) * gap, rows * S + (rows - 1) * gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    tiles = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    for i in range(V):
        x, y = (i % columns) * (S + gap), (i // columns) * (S + gap)
        sheet.paste(Image.fromarray(tiles[i]).convert("RGB"), (x, y))
        if labels:
            draw.text((x + 4, y + 3), names[i], fill=(255, 200, 0))
    return sheet
