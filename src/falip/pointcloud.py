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

Two families of projections:

- the authors' (:func:`render_views`): ``pointclip`` (PointCLIP, Zhang et al., CVPR 2022,
  github:ZrrSkywalker/PointCLIP ``trainers/mv_utils_zs.py`` ``PCViews``) and ``pointclip_v2``
  (PointCLIP V2, Zhu et al., ICCV 2023, github:yangyangyang127/PointCLIP_V2
  ``zeroshot_cls/trainers/mv_utils_zs.py`` ``Realistic_Projection``), reimplemented here in pure
  PyTorch and equal (≤ 1e-4, ``tests/test_pointcloud_authors.py``) to the images their zero-shot
  trainers give CLIP — which is *not* normalised with CLIP's mean/std;
- our own orthographic ones (:func:`project`): ``ortho_sparse`` (every point lands on one pixel,
  scatter-min of its depth) and ``ortho_dense`` (the cloud voxelised on a coarser ``grid × grid``
  raster per view, nearest depth per cell; densified: each cell takes the nearest depth of its
  ``densify × densify`` neighbourhood and the grown silhouette is eroded back (a closing); smoothed
  by a Gaussian over the foreground only; upsampled to S). They were called ``sparse`` and
  ``realistic``; neither is PointCLIP's nor PointCLIP V2's projection.
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

ORTHO_PROJECTIONS = ("ortho_sparse", "ortho_dense")
AUTHOR_PROJECTIONS = ("pointclip", "pointclip_v2")
PROJECTIONS = AUTHOR_PROJECTIONS + ORTHO_PROJECTIONS
RENAMED = {"sparse": "ortho_sparse", "realistic": "ortho_dense"}
MARGIN = 0.05  # fraction of the image left empty on each side around the unit sphere
MIN_RANGE = 0.5  # smallest depth range that depth_to_image spreads over its grey levels


MAX_VIEW_SIZE = 4096  # pixels per side of one rendered view


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
    projection: str = "ortho_sparse",
    size: int = 224,
    up: str = "y",
    grid: Optional[int] = None,
    densify: int = 3,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Depth maps ``(B, V, size, size)`` of a batch of clouds ``(B, P, 3)`` (or ``(V, size, size)`` of one ``(P, 3)``).

    The clouds are validated and normalised here (:func:`normalize_points`). ``projection`` is
    ``ortho_sparse`` or ``ortho_dense`` (for the authors' projections see :func:`render_views`); the dense options are ``grid`` (raster side, default
    ``round(size / 3.5)``, 64 at 224), ``densify`` (odd neighbourhood side, default 3) and
    ``smooth`` (Gaussian sigma in grid cells, 0 = off). Runs on the clouds' device in one
    vectorised call.
    """
    check_projection(projection, ORTHO_PROJECTIONS)
    if not 8 <= size <= MAX_VIEW_SIZE:
        raise PointCloudError(f"size must be 8 to {MAX_VIEW_SIZE} pixels per view, got {size}")
    pts = validate_points(points)
    single = pts.ndim == 2
    pts = normalize_points(pts[None] if single else pts, up=up)
    views = get_views(views)
    if projection == "ortho_sparse":
        depth = _scatter_depth(pts, views, size)
    else:
        depth = _realistic(pts, views, size, grid or round(size / 3.5), densify, smooth)
    return depth[0] if single else depth


def _realistic(points: torch.Tensor, views: Sequence[View], size: int, grid: int, densify: int, smooth: float) -> torch.Tensor:
    if grid < 4 or densify < 1 or densify % 2 == 0 or smooth < 0:
        raise PointCloudError(
            f"ortho_dense projection needs grid >= 4, an odd densify >= 1 and smooth >= 0; got {grid}, {densify}, {smooth}"
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


def check_projection(projection: str, allowed: Sequence[str] = PROJECTIONS) -> None:
    """Raise :class:`PointCloudError` for a projection name outside ``allowed`` (naming renamed ones' new names)."""
    if projection in RENAMED:
        raise PointCloudError(
            f"projection {projection!r} was renamed {RENAMED[projection]!r} (it is our own orthographic projection, "
            "not PointCLIP's or PointCLIP V2's: those are 'pointclip' and 'pointclip_v2')"
        )
    if projection not in allowed:
        raise PointCloudError(f"projection must be one of {tuple(allowed)}, got {projection!r}")


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


# ----------------------------------------------------------------------------------------------
# The authors' projections: PointCLIP and PointCLIP V2, as their zero-shot trainers feed CLIP.
# Written from reading their code (cited above); every float operation that decides a pixel
# (rotation products, scaling, ceil) is done in their order so that the rasters agree exactly.


@dataclass(frozen=True)
class AuthorProjection:
    """One of the authors' pipelines: view names (where the viewer stands, in this module's axes),
    the pixel value of the background, and the raster side before the resize to S."""

    name: str
    views: tuple[str, ...]
    background: float
    raster: int


# PointCLIP: a perspective camera 1.6 from the centre along each axis; images are mirrored (+x of
# the camera frame to the right of a viewer looking along −x). V2: azimuth (0 = +z, 90 = +x) and
# elevation of the side each view shows; it keeps the farthest point along its camera axis.
AUTHOR_INFO = {
    "pointclip": AuthorProjection("pointclip", ("back", "left", "front", "right", "top", "bottom"), 0.0, 128),
    "pointclip_v2": AuthorProjection(
        "pointclip_v2",
        tuple(f"az{a} el+20" for a in (45, 135, 225, 315, 0, 90, 180, 270)) + ("az0 el-78", "az180 el+78"),
        1.0,
        110,
    ),
}
FOREGROUND_TOLERANCE = 1e-4  # a pixel further than this from the background value is foreground


def _euler_matrices(angles: Sequence[Sequence[float]], device) -> torch.Tensor:
    """``(V, 3, 3)`` float32 ``Rx(a) @ Ry(b) @ Rz(c)`` of ``(a, b, c)`` rows, computed in float32 as the authors do."""
    a = torch.tensor(np.asarray(angles, dtype=np.float64)).float()
    x, y, z = a[:, 0], a[:, 1], a[:, 2]
    zero, one = torch.zeros_like(x), torch.ones_like(x)

    def mat(*entries):
        return torch.stack(entries, dim=1).reshape(-1, 3, 3)

    rz = mat(torch.cos(z), -torch.sin(z), zero, torch.sin(z), torch.cos(z), zero, zero, zero, one)
    ry = mat(torch.cos(y), zero, torch.sin(y), zero, one, zero, -torch.sin(y), zero, torch.cos(y))
    rx = mat(one, zero, zero, zero, torch.cos(x), -torch.sin(x), zero, torch.sin(x), torch.cos(x))
    return (rx @ ry @ rz).to(device)


def _pointclip(points: torch.Tensor) -> torch.Tensor:
    """PointCLIP's 6 depth maps ``(B·V, 128, 128)``: perspective, each pixel the harmonic mean of the
    depths of every point projected into it (hidden ones included), 0 where none falls."""
    res, trans, eps = 128, -1.6, torch.tensor([1e-12], device=points.device)
    half = math.pi / 2
    angles = [[0, 0, half], [half, 0, half], [2 * half, 0, half], [3 * half, 0, half], [0, -half, half], [0, half, half]]
    rot = _euler_matrices(angles, points.device).transpose(1, 2)
    B, V = points.shape[0], rot.shape[0]
    translation = torch.tensor([0.0, 0.0, trans], device=points.device)
    cam = torch.matmul(points.repeat_interleave(V, dim=0), rot.repeat(B, 1, 1)) - translation  # (B·V, P, 3)
    depth = cam[..., 2]
    u = ((cam[..., 0] / (depth + eps)) * (res / res) + 1) * res / 2  # camera x → image row
    v = ((cam[..., 1] / (depth + eps)) + 1) * res / 2  # camera y → image column
    rows, cols = (u - 0.5).ceil(), (v - 0.5).ceil()  # the pixel whose centre is nearest
    inside = (rows >= 0) & (rows <= res - 1) & (cols >= 0) & (cols <= res - 1) & (depth >= 0)
    weight = inside.float() * (1 / (depth + eps))
    index = ((rows % res) * res + (cols % res)).long()
    total = torch.zeros(B * V, res * res, device=points.device).scatter_add(1, index, depth * weight)
    weights = torch.zeros(B * V, res * res, device=points.device).scatter_add(1, index, weight)
    weights = weights + (weights == 0).float()
    return (total / weights).view(B * V, res, res)


def _gaussian_3x3(sigma: float) -> torch.Tensor:
    """``(3, 3)`` float32 Gaussian normalised to sum 1 (V2 normalises it twice; so do we)."""
    xs = np.arange(3, dtype=np.float32) - 1
    k1 = np.exp(-(xs**2) / (2 * sigma**2))
    k2 = torch.from_numpy(k1[:, None] @ k1[None, :])
    k2 = k2 / k2.sum()
    return k2 / k2.sum()


def _sliding_max_7(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max over windows of 7 along ``dim`` (size n → n − 6) by doubling: 3 elementwise maxima instead of 7."""
    n = x.shape[dim]
    m2 = torch.maximum(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1))  # windows of 2
    m4 = torch.maximum(m2.narrow(dim, 0, n - 3), m2.narrow(dim, 2, n - 3))  # of 4
    return torch.maximum(m4.narrow(dim, 0, n - 6), m4.narrow(dim, 3, n - 6))  # of 7 (4 + 4 overlapping by 1)


def _densify_smooth(grid: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """V2's 7 × 7 max-pool (stride 1, padding 2) then 3 × 3 convolution (zero padding 1) of every depth
    slice of ``grid (N, bins, r, r)`` (values >= 0) → ``(N, bins, r − 2, r − 2)``. The max-pool is done
    separably by doubling — max is exact in any order, and with values >= 0 zero padding equals the
    pool's −inf padding — several times faster on a CPU than ``max_pool2d`` over thousands of maps."""
    dense = _sliding_max_7(_sliding_max_7(F.pad(grid, (2, 2, 2, 2)), -1), -2)
    bins = grid.shape[1]
    return F.conv2d(dense, kernel[None, None].expand(bins, 1, 3, 3), padding=1, groups=bins)


def _pointclip_v2(points: torch.Tensor) -> torch.Tensor:
    """PointCLIP V2's 10 "realistic" views ``(B·V, 110, 110)`` in [0, 1], background 1.

    Per view: rotate; scale the rotated cloud's bounding box to [-1, 1] (x, y shrunk by 0.8); quantise
    to a 112 × 112 × 8 grid keeping the largest depth bin value per voxel (scatter-max); densify with
    a 7 × 7 max-pool (padding 2, so 110 × 110 out); smooth each depth slice with a 3 × 3 Gaussian
    (σ = 3, background included); take the max over the slices; ``1 − value / max`` per view.
    """
    res, bins, ratio, depth_bias = 112, 8, 0.8, 0.2
    q, s, t = math.pi / 4, math.pi / 9, math.pi / 15
    angles = [[k * q, 0, 2 * q] for k in (1, 3, 5, 7)] + [[k * 2 * q, 0, 2 * q] for k in range(4)]
    angles += [[0, -2 * q, 2 * q], [0, 2 * q, 2 * q]]
    rot = _euler_matrices(angles, points.device).transpose(1, 2)
    tilt = _euler_matrices([[0, s, 0]] * 8 + [[0, t, 0]] * 2, points.device).transpose(1, 2)
    B, V = points.shape[0], rot.shape[0]
    translation = torch.tensor([-0.5, -0.5, -1.5], device=points.device)
    cam = torch.matmul(torch.matmul(points.repeat_interleave(V, dim=0), rot.repeat(B, 1, 1)), tilt.repeat(B, 1, 1))
    cam = cam - translation  # (B·V, P, 3); the framing below cancels it, kept for equal rounding
    pmax, pmin = cam.max(dim=1)[0], cam.min(dim=1)[0]
    centre = ((pmax + pmin) / 2)[:, None, :]
    extent = (pmax - pmin).max(dim=-1)[0][:, None, None]
    cam = (cam - centre) / extent * 2.0
    cam = torch.cat([cam[..., :2] * ratio, cam[..., 2:]], dim=-1)
    x = ((cam[..., 0] + 1) / 2 * res).ceil().clip(1, res - 2)
    y = ((cam[..., 1] + 1) / 2 * res).ceil().clip(1, res - 2)
    z = ((cam[..., 2] + 1) / 2 + depth_bias) / (1 + depth_bias) * (bins - 2)
    index = (z.ceil() * res * res + y * res + x).long()
    grid = torch.zeros(B * V, bins * res * res, device=points.device)
    grid.scatter_reduce_(1, index, z.clip(1, bins - 2), reduce="amax", include_self=True)
    # Pooling and the (symmetric) Gaussian commute with transposing; transposing last keeps memory contiguous.
    img = _densify_smooth(grid.view(B * V, bins, res, res), _gaussian_3x3(3.0).to(points.device)).amax(dim=1)
    img = img.transpose(1, 2)  # (B·V, res − 2, res − 2); rows: camera x, columns: camera y
    return 1 - img / img.amax(dim=(-2, -1), keepdim=True)


def render_views(points, projection: str = "pointclip_v2", max_points: Optional[int] = 1024, size: int = 224) -> torch.Tensor:
    """The images the authors' zero-shot code gives CLIP: ``(P, 3)`` → ``(V, 3, size, size)``, ``(B, P, 3)`` → ``(B, V, 3, size, size)``.

    projection: ``pointclip`` (6 views, raw depth, background 0) or ``pointclip_v2`` (10 views,
    ``1 − depth/max``, background 1); view order and names in :data:`AUTHOR_INFO`. The clouds are used
    as given — PointCLIP's camera assumes the unit sphere, as in the PointNet HDF5 files; V2 frames each
    view itself. max_points: only the first N points of each cloud are used (their data loader's rule,
    default 1024; ``None`` = all). Resized bilinearly with ``align_corners=True`` to ``size`` (their 224).
    **No** CLIP mean/std: the authors feed these pixels to the ViT as they are. Pure PyTorch on the
    clouds' device, one vectorised call per batch.
    """
    check_projection(projection, AUTHOR_PROJECTIONS)
    if max_points is not None and max_points < 1:
        raise PointCloudError(f"max_points must be >= 1 or None, got {max_points}")
    if not 8 <= size <= MAX_VIEW_SIZE:
        raise PointCloudError(f"size must be 8 to {MAX_VIEW_SIZE} pixels per view, got {size}")
    pts = validate_points(points)
    single = pts.ndim == 2
    pts = (pts[None] if single else pts)[:, :max_points].contiguous()
    if ((pts.amax(dim=1) - pts.amin(dim=1)).amax(dim=-1) <= 0).any():
        raise PointCloudError("a point cloud has all its (first max_points) points at one place (zero extent)")
    maps = _pointclip(pts) if projection == "pointclip" else _pointclip_v2(pts)  # (B·V, r, r)
    V = len(AUTHOR_INFO[projection].views)
    # Their resize runs on the 3 identical channels; resizing one and repeating it is the same, 3× cheaper.
    images = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=True)
    images = images.view(pts.shape[0], V, 1, size, size).repeat(1, 1, 3, 1, 1)
    return images[0] if single else images


def view_foreground(images: torch.Tensor, projection: str, dilation: int = 0) -> torch.Tensor:
    """Boolean masks ``(..., S, S)`` of the pixels of :func:`render_views` images ``(..., 3, S, S)`` that
    differ from the projection's background (0 for ``pointclip``, 1 for ``pointclip_v2``) by more than
    :data:`FOREGROUND_TOLERANCE` — the object as the image shows it — grown by ``dilation`` pixels."""
    check_projection(projection, AUTHOR_PROJECTIONS)
    mask = (images[..., 0, :, :] - AUTHOR_INFO[projection].background).abs() > FOREGROUND_TOLERANCE
    if dilation <= 0:
        return mask
    shape = mask.shape
    grown = F.max_pool2d(mask.reshape(-1, 1, shape[-2], shape[-1]).float(), 2 * dilation + 1, stride=1, padding=dilation)
    return (grown > 0.5).view(shape)
