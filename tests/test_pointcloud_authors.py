"""PointCLIP / PointCLIP V2 projections against the images the authors' own code renders.

``tests/data/pointclip_views.npz`` comes from ``tools/make_pointcloud_fixtures.py``, which runs
github:ZrrSkywalker/PointCLIP ``PCViews`` + ``PointCLIP_ZS.mv_proj`` and github:yangyangyang127/PointCLIP_V2
``Realistic_Projection`` + ``PointCLIPV2_ZS.real_proj`` (after their first-1024-points data loader) on
three clouds: 0 — asymmetric, 1500 points whose last 476 form a far blob; 1 — 1024 points; 2 — 300 points.
The fixture stores one channel per view (the script checks the three are equal).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from falip.pointcloud import AUTHOR_INFO, PointCloudError, render_views, view_foreground

DATA = np.load(Path(__file__).parent / "data" / "pointclip_views.npz")
TOL = 1e-4
PROJECTIONS = ("pointclip", "pointclip_v2")


def reference(projection: str, i: int) -> torch.Tensor:
    return torch.from_numpy(DATA[f"{projection}_{i}"])


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("i", [0, 1, 2])
def test_every_view_equals_the_authors_images(projection, i):
    images = render_views(DATA[f"cloud_{i}"], projection)
    V = len(AUTHOR_INFO[projection].views)
    assert images.shape == (V, 3, 224, 224) and images.dtype == torch.float32
    for c in range(3):
        assert (images[:, c] - reference(projection, i)).abs().max().item() <= TOL


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_a_batch_of_clouds_equals_each_cloud_rendered_alone(projection):
    clouds = np.stack([DATA["cloud_0"][:1024], DATA["cloud_1"]])
    batch = render_views(clouds, projection)
    assert batch.shape[:2] == (2, len(AUTHOR_INFO[projection].views))
    for b, i in enumerate((0, 1)):
        assert (batch[b, :, 0] - reference(projection, i)).abs().max().item() <= TOL


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_only_the_first_1024_points_are_used_and_max_points_changes_it(projection):
    cloud = DATA["cloud_0"]
    assert len(cloud) > 1024
    ref = reference(projection, 0)
    all_points = render_views(cloud, projection, max_points=None)[:, 0]
    assert (all_points - ref).abs().max().item() > 0.1  # the far blob behind point 1024 shows up
    assert (render_views(cloud[:1024], projection, max_points=None)[:, 0] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_fixture_tells_flips_transposes_and_reversed_depth_apart(projection):
    """The asymmetric cloud's views change under each mistake an implementation could make."""
    ref = reference(projection, 0)
    bg = AUTHOR_INFO[projection].background
    fg = (ref - bg).abs() > TOL
    lo = torch.where(fg, ref, torch.full_like(ref, np.inf)).amin(dim=(-2, -1), keepdim=True)
    hi = torch.where(fg, ref, torch.full_like(ref, -np.inf)).amax(dim=(-2, -1), keepdim=True)
    mistakes = {
        "rows flipped": ref.flip(-2),
        "columns flipped": ref.flip(-1),
        "transposed": ref.transpose(-2, -1),
        "depth reversed": torch.where(fg, lo + hi - ref, ref),
    }
    for name, wrong in mistakes.items():
        per_view = (wrong - ref).abs().amax(dim=(-2, -1))
        assert (per_view > 0.05).all(), f"{name}: some view cannot tell it apart ({per_view.tolist()})"
    mirrored = DATA["cloud_0"] * np.array([-1, 1, 1], dtype=np.float32)
    assert ((render_views(mirrored, projection)[:, 0] - ref).abs().amax(dim=(-2, -1)) > 0.05).all()


def test_pointclip_images_are_raw_depth_on_black_and_v2_images_are_in_0_1_on_white():
    pc, v2 = reference("pointclip", 1), reference("pointclip_v2", 1)
    assert pc.min() == 0 and 1.0 < pc.max() < 2.7  # depth = z + 1.6 for a cloud in the unit sphere, no mean/std
    assert abs(v2.max() - 1) < 1e-6 and v2.min() >= 0 and ((v2[:, 0, 0] - 1).abs() < 1e-6).all()  # corners: background


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_foreground_is_what_differs_from_the_background(projection):
    images = render_views(DATA["cloud_2"], projection)
    mask = view_foreground(images, projection)
    assert mask.shape == (len(AUTHOR_INFO[projection].views), 224, 224)
    bg = AUTHOR_INFO[projection].background
    assert torch.equal(mask, (images[:, 0] - bg).abs() > TOL)
    assert mask.any(dim=(-2, -1)).all() and not mask.all()
    grown = view_foreground(images, projection, dilation=2)
    assert (grown | mask).equal(grown) and grown.sum() > mask.sum()


def test_render_views_rejects_bad_input_naming_it():
    cloud = DATA["cloud_2"]
    for old, new in (("sparse", "ortho_sparse"), ("realistic", "ortho_dense")):
        with pytest.raises(PointCloudError, match=f"renamed '{new}'"):
            render_views(cloud, old)
    with pytest.raises(PointCloudError, match="projection must be one of"):
        render_views(cloud, "ortho_sparse")
    with pytest.raises(PointCloudError, match="max_points"):
        render_views(cloud, "pointclip", max_points=0)
    with pytest.raises(PointCloudError, match="zero extent"):
        render_views(np.ones((10, 3)), "pointclip_v2")
    with pytest.raises(PointCloudError, match="NaN"):
        render_views(np.array([[0, 0, 0], [np.nan, 0, 0]]), "pointclip")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_render_views_on_the_gpu_equals_the_authors_images(projection):
    for i in range(3):
        images = render_views(torch.from_numpy(DATA[f"cloud_{i}"]).cuda(), projection)
        assert images.device.type == "cuda"
        assert (images[:, 0].cpu() - reference(projection, i)).abs().max().item() <= TOL
