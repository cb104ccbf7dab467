"""Point clouds: projection geometry, loaders in the real formats, foreground masks, recognition, CLI."""

import json
import math

import h5py
import numpy as np
import pytest
import torch

from conftest import tiny_clip, wrap
from falip import FalipError, FovealConfig
from falip.cli import main
from falip.datasets.pointclouds import (
    SCANOBJECTNN_CLASSES,
    DatasetError,
    load_cloud,
    load_dataset,
    load_modelnet40,
    load_scanobjectnn,
    read_h5,
)
from falip.pointcloud import (
    MARGIN,
    VIEWS_6,
    VIEWS_10,
    PointCloudError,
    View,
    depth_to_image,
    foreground,
    normalize_points,
    project,
    render_views,
    validate_points,
    view_foreground,
)
from falip.tasks.pointcloud import PointCloudClassifier, classify_points, v2_preset_key, v2_presets


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------
# Shapes (surface samples)


def box_surface(rng, lo, hi, n):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    ext = hi - lo
    areas = np.repeat([ext[1] * ext[2], ext[0] * ext[2], ext[0] * ext[1]], 2)
    face = rng.choice(6, n, p=areas / areas.sum())
    p = lo + rng.random((n, 3)) * ext
    axis = face // 2
    p[np.arange(n), axis] = np.where(face % 2 == 0, lo[axis], hi[axis])
    return p


def sphere_surface(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def cylinder_surface(rng, n, radius=0.25, height=1.0):
    """Axis along y; side and both caps."""
    side = int(n * 0.8)
    t = rng.uniform(0, 2 * math.pi, side)
    pts = [np.stack([radius * np.cos(t), rng.uniform(-height / 2, height / 2, side), radius * np.sin(t)], 1)]
    for y in (-height / 2, height / 2):
        m = (n - side) // 2
        r, a = radius * np.sqrt(rng.random(m)), rng.uniform(0, 2 * math.pi, m)
        pts.append(np.stack([r * np.cos(a), np.full(m, y), r * np.sin(a)], 1))
    return np.concatenate(pts)


def pixel(u, v, size):
    span, off = size * (1 - 2 * MARGIN), size * MARGIN
    col = min(max(math.floor((u + 1) / 2 * span + off), 0), size - 1)
    row = min(max(math.floor((1 - v) / 2 * span + off), 0), size - 1)
    return row, col


def bbox(mask):
    rows, cols = np.nonzero(np.asarray(mask))
    return rows.min(), rows.max(), cols.min(), cols.max()


# The documented camera of each orthogonal view, (right, up, forward) as functions of (x, y, z).
CAMERAS = {
    "front": lambda x, y, z: (x, y, -z),
    "right": lambda x, y, z: (-z, y, -x),
    "back": lambda x, y, z: (-x, y, z),
    "left": lambda x, y, z: (z, y, x),
    "top": lambda x, y, z: (x, -z, -y),
    "bottom": lambda x, y, z: (x, z, y),
}

# Centroid at the origin and one point at distance 1, so normalisation leaves them in place.
MARKERS = np.array([[0.7, 0.1, 0.05], [-0.05, 0.45, 0.2], [0.1, -0.2, 0.6], [-0.3, -0.15, -0.2]])
MARKERS = np.concatenate([MARKERS, -MARKERS.sum(0, keepdims=True)])
MARKERS = MARKERS / np.linalg.norm(MARKERS, axis=1).max()


def markers_match(depth_views, size=64) -> bool:
    """True iff every marker lands on its documented pixel with its documented depth in all 6 views."""
    for view, depth in zip(VIEWS_6, depth_views):
        expected = np.full((size, size), np.inf)
        for x, y, z in MARKERS:
            u, v, w = CAMERAS[view.name](x, y, z)
            r, c = pixel(u, v, size)
            expected[r, c] = min(expected[r, c], (w + 1) / 2)
        got = depth.numpy()
        if not (
            np.array_equal(np.isfinite(got), np.isfinite(expected))
            and np.allclose(got[np.isfinite(got)], expected[np.isfinite(expected)], atol=1e-5)
        ):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Geometry


def test_points_land_on_documented_pixels_and_depths():
    depth = project(MARKERS, 6, "ortho_sparse", size=64)
    assert depth.shape == (6, 64, 64) and markers_match(depth)


def test_flipped_or_transposed_views_fail_the_check():
    depth = project(MARKERS, 6, "ortho_sparse", size=64)
    assert not markers_match(torch.flip(depth, dims=[-1]))  # mirrored left-right
    assert not markers_match(torch.flip(depth, dims=[-2]))  # upside down
    assert not markers_match(depth.transpose(-1, -2))  # x and y swapped
    assert not markers_match(depth[[1, 0, 2, 3, 4, 5]])  # views in the wrong order
    assert not markers_match(project(MARKERS[:, [0, 2, 1]], 6, "ortho_sparse", size=64))  # y and z swapped


def test_each_view_looks_from_its_stated_direction():
    for view in VIEWS_10:
        axes = view.axes()
        assert torch.allclose(axes @ axes.T, torch.eye(3), atol=1e-6)
        t, p = math.radians(view.azimuth), math.radians(view.elevation)
        eye = np.array([math.sin(t) * math.cos(p), math.sin(p), math.cos(t) * math.cos(p)])
        # A point on the viewer's side hides its antipode: the centre pixel holds depth 0.
        depth = project(np.stack([eye, -eye]), [view], "ortho_sparse", size=64)[0]
        assert depth[np.isfinite(depth.numpy())].tolist() == pytest.approx([0.0], abs=1e-6)
        assert depth[32, 32] == pytest.approx(0.0, abs=1e-6)
        if abs(view.elevation) < 90:  # image "up" is the world's +y side
            assert axes[1, 1] > 0.5


def test_depth_increases_away_from_the_viewer():
    near_far = np.array([[-0.5, 0, 0.5], [0.5, 0, -0.5]])  # left point nearer to the front viewer
    front = project(near_far, [VIEWS_6[0]], "ortho_sparse", size=64)[0]
    back = project(near_far, [VIEWS_6[2]], "ortho_sparse", size=64)[0]
    r_left, c_left = pixel(-0.5 / math.sqrt(0.5), 0, 64)
    r_right, c_right = pixel(0.5 / math.sqrt(0.5), 0, 64)
    assert front[r_left, c_left] < front[r_right, c_right]
    # From the back, the point that was far is near, and it shows on the image's left.
    assert back[r_left, c_left] < back[r_right, c_right]
    assert back[r_left, c_left] == pytest.approx(front[r_left, c_left].item())
    image = depth_to_image(front)
    assert image[r_left, c_left] == pytest.approx(1.0) and image[r_right, c_right] == pytest.approx(0.25)
    assert image[~torch.isfinite(front)].eq(0).all()
    # A view whose depths barely differ is not stretched over the whole grey range.
    flat = torch.full((4, 4), math.inf)
    flat[1, 1], flat[2, 2] = 0.30, 0.31
    assert depth_to_image(flat)[2, 2] == pytest.approx(1 - 0.75 * 0.01 / 0.5)


@pytest.mark.parametrize("projection", ["ortho_sparse", "ortho_dense"])
def test_cube_projects_to_a_centred_square_in_every_orthogonal_view(rng, projection):
    pts = box_surface(rng, (-1, -1, -1), (1, 1, 1), 40000)
    depth = project(pts, 6, projection, size=64)
    half = 1 / math.sqrt(3) * 64 * (1 - 2 * MARGIN) / 2  # half side in pixels
    tol = 1.5 if projection == "ortho_sparse" else 64 / round(64 / 3.5) + 0.5  # a pixel, or a realistic grid cell
    for v in range(6):
        fg = torch.isfinite(depth[v]).numpy()
        r0, r1, c0, c1 = bbox(fg)
        for lo, hi in ((r0, r1), (c0, c1)):
            assert abs(lo - (32 - half)) <= tol and abs(hi + 1 - (32 + half)) <= tol
        assert fg[r0 : r1 + 1, c0 : c1 + 1].mean() > 0.97
        # The face towards the viewer is at depth 0.5 - 1/(2√3) everywhere inside.
        inside = depth[v, r0 + 2 : r1 - 1, c0 + 2 : c1 - 1]
        # (a rare hole in the front face shows the back face, at depth 0.5 + 1/(2√3))
        assert ((inside - (0.5 - 0.5 / math.sqrt(3))).abs() < 0.03).float().mean() > 0.97


@pytest.mark.parametrize("projection", ["ortho_sparse", "ortho_dense"])
def test_sphere_projects_to_a_disk_whose_depth_grows_to_the_rim(rng, projection):
    pts = sphere_surface(rng, 100000)
    size, radius = 64, 64 * (1 - 2 * MARGIN) / 2
    depth = project(pts, 10, projection, size=size)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dist = np.hypot(yy - size / 2, xx - size / 2)
    tol = 1.5 if projection == "ortho_sparse" else size / round(size / 3.5) * math.sqrt(2) + 0.5  # a pixel or a grid cell
    for v in range(10):
        fg = torch.isfinite(depth[v]).numpy()
        assert not fg[dist > radius + tol].any()
        assert fg[dist < radius - tol].mean() > 0.97
        d = depth[v].numpy()
        assert np.mean(d[(dist < 3) & fg] < 0.03) > 0.9  # (a rare hole shows the far side)
        rings = [d[(dist >= a * radius) & (dist < b * radius) & fg].mean() for a, b in ((0, 0.3), (0.3, 0.6), (0.6, 0.8))]
        assert rings[0] < rings[1] < rings[2]
        if projection == "ortho_sparse":  # exact: depth (1 - sqrt(1 - r²)) / 2 at normalised radius r
            rim = d[(dist > radius - 3) & (dist < radius - 1.5) & fg]
            assert np.median(rim) > (1 - math.sqrt(1 - ((radius - 3) / radius) ** 2)) / 2 - 0.02


def test_cylinder_is_a_tall_rectangle_from_the_side_and_a_disk_from_above(rng):
    pts = cylinder_surface(rng, 40000, radius=0.25, height=1.0)
    depth = project(pts, 6, "ortho_sparse", size=64)
    names = [v.name for v in VIEWS_6]
    for side in ("front", "right", "back", "left"):
        fg = torch.isfinite(depth[names.index(side)]).numpy()
        r0, r1, c0, c1 = bbox(fg)
        assert (r1 - r0 + 1) / (c1 - c0 + 1) == pytest.approx(2.0, rel=0.12)
        assert fg[r0 : r1 + 1, c0 : c1 + 1].mean() > 0.95
    for end in ("top", "bottom"):
        fg = torch.isfinite(depth[names.index(end)]).numpy()
        r0, r1, c0, c1 = bbox(fg)
        assert (r1 - r0) == pytest.approx(c1 - c0, abs=1)
        assert fg[r0 : r1 + 1, c0 : c1 + 1].mean() == pytest.approx(math.pi / 4, abs=0.06)


def test_asymmetric_l_shape_keeps_its_orientation(rng):
    # An L in the xy plane: a post up the left (x < 0) and a foot along the bottom towards +x.
    pts = np.concatenate(
        [
            box_surface(rng, (-0.6, -0.8, -0.1), (-0.3, 0.8, 0.1), 20000),
            box_surface(rng, (-0.3, -0.8, -0.1), (0.6, -0.5, 0.1), 12000),
        ]
    )
    front, right, back, left, top, bottom = (torch.isfinite(d).numpy() for d in project(pts, 6, "ortho_sparse", size=64))
    r0, r1, c0, c1 = bbox(front)
    mid_r, mid_c = (r0 + r1) // 2, (c0 + c1) // 2
    assert front[r0 : r0 + 5, c0 : c0 + 5].any() and not front[r0 : r0 + 5, c1 - 4 : c1 + 1].any()  # post at top-left
    assert front[r1 - 4 : r1 + 1, c1 - 4 : c1 + 1].any()  # foot reaches the bottom-right
    assert np.array_equal(back, front[:, ::-1])  # the back view is the mirror image
    assert not front[:mid_r, mid_c + 3 :].any()  # nothing upper right
    # From above (−z at the top of the image) the L is a thin strip as wide as the front view.
    rt0, rt1, ct0, ct1 = bbox(top)
    assert (ct0, ct1) == (c0, c1) and rt1 - rt0 < 0.3 * (c1 - c0)
    assert np.array_equal(bottom, top[::-1])
    assert np.array_equal(left, right[:, ::-1])


def test_realistic_projection_fills_gaps_that_sparse_leaves(rng):
    pts = box_surface(rng, (-1, -1, -1), (1, 1, 1), 2048)
    sparse, realistic = project(pts, 6, "ortho_sparse", size=224), project(pts, 6, "ortho_dense", size=224)
    r0, r1, c0, c1 = bbox(torch.isfinite(realistic[0]))
    assert torch.isfinite(sparse[0, r0:r1, c0:c1]).float().mean() < 0.2
    assert torch.isfinite(realistic[0, r0:r1, c0:c1]).float().mean() > 0.95
    r0s, r1s, c0s, c1s = bbox(torch.isfinite(sparse[0]))
    assert max(abs(r0 - r0s), abs(r1 - r1s), abs(c0 - c0s), abs(c1 - c1s)) <= 2  # the outline is kept


def test_batched_projection_equals_one_by_one(rng):
    clouds = np.stack([sphere_surface(rng, 512) * s + o for s, o in ((1, 0), (2, 3), (0.5, -1))]).astype(np.float32)
    for projection in ("ortho_sparse", "ortho_dense"):
        batch = project(clouds, 10, projection, size=64)
        assert batch.shape == (3, 10, 64, 64)
        for i in range(3):
            assert torch.equal(batch[i], project(clouds[i], 10, projection, size=64))


def test_normalisation_centres_scales_and_turns_z_up():
    pts = torch.tensor([[2.0, 0, 0], [4.0, 0, 0], [3.0, 0, 3.0]])
    out = normalize_points(pts)
    assert torch.allclose(out.mean(0), torch.zeros(3), atol=1e-6) and out.norm(dim=1).max() == pytest.approx(1.0)
    z_up = normalize_points(torch.tensor([[0.0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0]]), up="z")
    assert torch.allclose(z_up, torch.tensor([[0.0, 1, 0], [0, -1, 0], [0, 0, -1], [0, 0, 1]]))


def test_foreground_masks_and_dilation():
    depth = torch.full((2, 9, 9), math.inf)
    depth[0, 4, 4] = 0.3
    depth[1, 0, 8] = 0.9
    assert torch.equal(foreground(depth), torch.isfinite(depth))
    grown = foreground(depth, dilation=2)
    assert grown[0].sum() == 25 and grown[0, 2:7, 2:7].all()
    assert grown[1].sum() == 9 and grown[1, 0:3, 6:9].all()  # clipped at the corner


def test_projection_rejects_bad_input():
    good = np.zeros((10, 3))
    good[0, 0] = 1
    with pytest.raises(PointCloudError, match="empty"):
        project(np.zeros((0, 3)))
    with pytest.raises(PointCloudError, match="NaN or infinite"):
        project(np.array([[0, 0, 0], [np.nan, 1, 1.0]]))
    with pytest.raises(PointCloudError, match="NaN or infinite"):
        project(np.array([[0, 0, 0], [np.inf, 1, 1.0]]))
    for shape in ((10,), (10, 2), (10, 4), (2, 10, 3, 1)):
        with pytest.raises(PointCloudError, match=r"\(P, 3\)"):
            project(np.zeros(shape))
    with pytest.raises(PointCloudError, match="not a numeric array"):
        validate_points([["a", "b", "c"]], name="cloud chair.npy")
    with pytest.raises(PointCloudError, match="one place"):
        project(np.ones((5, 3)))
    with pytest.raises(PointCloudError, match="views must be 6 or 10"):
        project(good, views=7)
    with pytest.raises(PointCloudError, match="projection"):
        project(good, projection="splat")
    with pytest.raises(PointCloudError, match="odd densify"):
        project(good, projection="ortho_dense", densify=2)
    with pytest.raises(PointCloudError, match="up must be"):
        project(good, up="x")
    with pytest.raises(PointCloudError, match="cloud chair.npy"):
        validate_points(np.zeros((3, 2)), name="cloud chair.npy")
    assert View("custom", 10, 20).axes().shape == (3, 3)


# ----------------------------------------------------------------------------------------------
# Loaders


def write_h5(path, data, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("label", data=labels)


def make_modelnet(root, rng, n_per_file=(4, 3), points=64, bad=False):
    folder = root / "modelnet40_ply_hdf5_2048"
    folder.mkdir(parents=True)
    (folder / "shape_names.txt").write_text("airplane\nbathtub\nflower_pot\n")
    names = []
    for i, n in enumerate(n_per_file):
        data = rng.normal(size=(n, points, 3)).astype(np.float32)
        labels = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
        if bad and i == 0:
            data[1, 5] = np.nan
            labels[2] = 7
        write_h5(folder / f"ply_data_test{i}.h5", data, labels)
        names.append(f"data/modelnet40_ply_hdf5_2048/ply_data_test{i}.h5")
    (folder / "test_files.txt").write_text("\n".join(names) + "\n")
    return folder


def test_modelnet40_layout_from_the_parent_or_the_folder_itself(tmp_path, rng):
    folder = make_modelnet(tmp_path, rng)
    for root in (tmp_path, folder):
        ds = load_modelnet40(root)
        assert ds.classnames == ["airplane", "bathtub", "flower_pot"] and len(ds) == 7
        samples = list(ds)
        assert [s[0] for s in samples[:2]] == ["ply_data_test0.h5:0", "ply_data_test0.h5:1"]
        assert samples[4][0] == "ply_data_test1.h5:0" and samples[4][1].shape == (64, 3) and samples[5][2] == 1
    with h5py.File(folder / "ply_data_test1.h5") as f:
        assert np.array_equal(samples[4][1], f["data"][0])


def test_scanobjectnn_variants_pick_their_files(tmp_path, rng):
    base = tmp_path / "h5_files"
    for folder, suffix, n in (("main_split", "", 2), ("main_split_nobg", "", 3), ("main_split", "_augmentedrot_scale75", 5)):
        write_h5(
            base / folder / f"test_objectdataset{suffix}.h5", rng.normal(size=(n, 32, 3)).astype(np.float32), np.arange(n) % 15
        )
    sizes = {v: len(load_scanobjectnn(tmp_path, v)) for v in ("obj_bg", "obj_only", "pb_t50_rs")}
    assert sizes == {"obj_bg": 2, "obj_only": 3, "pb_t50_rs": 5}
    ds = load_dataset("scanobjectnn", base, "pb_t50_rs")  # the h5_files folder itself
    assert len(ds.classnames) == 15 and ds.classnames[4] == "chair" and ds.variant == "pb_t50_rs"
    assert len(load_scanobjectnn(base / "main_split_nobg", "obj_only")) == 3  # the variant's folder itself


def test_dataset_errors_name_the_input(tmp_path, rng):
    with pytest.raises(DatasetError, match="shape_names.txt"):
        load_modelnet40(tmp_path)
    with pytest.raises(DatasetError, match="unknown ScanObjectNN variant 'hardest'"):
        load_scanobjectnn(tmp_path, "hardest")
    with pytest.raises(DatasetError, match="test_objectdataset.h5"):
        load_scanobjectnn(tmp_path, "obj_bg")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("shapenet", tmp_path)
    folder = make_modelnet(tmp_path / "a", rng)
    (folder / "ply_data_test1.h5").unlink()
    with pytest.raises(DatasetError, match="ply_data_test1.h5"):
        load_modelnet40(folder)
    with h5py.File(tmp_path / "nolabel.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((2, 4, 3)))
    with pytest.raises(DatasetError, match="nolabel.h5 has no 'label'"):
        read_h5(tmp_path / "nolabel.h5")
    write_h5(tmp_path / "flat.h5", np.zeros((2, 12)), np.zeros(2))
    with pytest.raises(DatasetError, match=r"flat.h5: 'data' must have shape \(N, P, 3\)"):
        read_h5(tmp_path / "flat.h5")
    write_h5(tmp_path / "count.h5", np.zeros((2, 4, 3)), np.zeros(3))
    with pytest.raises(DatasetError, match="count.h5: 'label'"):
        read_h5(tmp_path / "count.h5")
    (tmp_path / "fake.h5").write_text("not hdf5")
    with pytest.raises(DatasetError, match="fake.h5 is not a readable HDF5"):
        read_h5(tmp_path / "fake.h5")


def test_single_file_readers(tmp_path, rng):
    pts = rng.normal(size=(20, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", np.concatenate([pts, np.ones((20, 3), np.float32)], axis=1))  # xyz + normals
    np.savetxt(tmp_path / "b.txt", np.concatenate([pts, np.zeros((20, 3))], axis=1), delimiter=",")  # ModelNet .txt
    np.savetxt(tmp_path / "c.xyz", pts)
    header = "ply\nformat {}\ncomment test\nelement vertex 20\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nend_header\n"
    with open(tmp_path / "d.ply", "w") as f:
        f.write(header.format("ascii 1.0") + "".join(f"{x} {y} {z} 7\n" for x, y, z in pts))
    rec = np.zeros(20, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
    rec["x"], rec["y"], rec["z"] = pts.T
    with open(tmp_path / "e.ply", "wb") as f:
        f.write(header.format("binary_little_endian 1.0").encode() + rec.tobytes())
    for name in ("a.npy", "b.txt", "c.xyz", "d.ply", "e.ply"):
        got = load_cloud(tmp_path / name)
        assert got.shape == (20, 3) and got.dtype == np.float32 and np.allclose(got, pts, atol=1e-5), name
    # An OFF cube with ModelNet's glued header: points are sampled on its faces.
    corners = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    text = (
        "OFF8 6 0\n"
        + "".join(f"{x} {y} {z}\n" for x, y, z in corners)
        + "".join("4 " + " ".join(map(str, q)) + "\n" for q in quads)
    )
    (tmp_path / "cube.off").write_text(text)
    cube = load_cloud(tmp_path / "cube.off", n_points=500)
    assert cube.shape == (500, 3) and np.allclose(np.abs(cube).max(axis=1), 1.0, atol=1e-6)
    assert all((cube[:, a] > 0.99).any() and (cube[:, a] < -0.99).any() for a in range(3))  # all six faces


def test_single_file_errors_name_the_file(tmp_path):
    cases = {
        "missing.npy": "not found",
        "cloud.obj": "unsupported point cloud format",
        "words.txt": "not a readable .txt",
        "empty.xyz": "holds no points",
        "flat.npy": r"expected points of shape \(P, 3\)",
        "nan.txt": "NaN or infinite",
        "image.ply": "not a PLY file",
        "mesh.off": "not an OFF file",
        "ragged.txt": "different numbers of columns",
    }
    (tmp_path / "cloud.obj").write_text("v 0 0 0\n")
    (tmp_path / "words.txt").write_text("hello world foo\n")
    (tmp_path / "empty.xyz").write_text("# nothing\n")
    np.save(tmp_path / "flat.npy", np.zeros((4, 2)))
    (tmp_path / "nan.txt").write_text("0 0 0\nnan 1 2\n")
    (tmp_path / "image.ply").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "mesh.off").write_text("COFF\n")
    (tmp_path / "ragged.txt").write_text("0 0 0\n1 2\n")
    for name, message in cases.items():
        with pytest.raises(PointCloudError, match=message) as info:
            load_cloud(tmp_path / name)
        assert name in str(info.value)


# ----------------------------------------------------------------------------------------------
# Recognition


@pytest.fixture(scope="module")
def small_model():
    return wrap(tiny_clip(64, 16, layers=4))


def test_encode_pixels_normalizes_only_when_told(small_model, rng):
    image = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
    assert torch.allclose(small_model.encode_pixels(pixels, normalized=False), small_model.encode_image(image), atol=1e-5)
    raw = torch.nn.functional.normalize(small_model.runtime.run(pixels).float(), dim=-1)
    assert torch.allclose(small_model.encode_pixels(pixels, normalized=True), raw, atol=1e-6)
    mask = np.zeros((64, 64), bool)
    mask[10:40, 5:30] = True
    config = FovealConfig(alpha=2.0)
    biased = small_model.encode_pixels(pixels, normalized=False, masks=torch.from_numpy(mask)[None], config=config)
    assert torch.allclose(biased, small_model.encode_regions(image, masks=[mask], config=config), atol=1e-5)
    with pytest.raises(TypeError):
        small_model.encode_pixels(pixels)  # normalized= must be said
    with pytest.raises(ValueError, match="pixels must be"):
        small_model.encode_pixels(pixels[:, :, :32], normalized=True)


def test_classify_points_shapes_and_the_authors_view_combination(small_model, rng):
    clouds = np.stack([sphere_surface(rng, 256), box_surface(rng, (-1, -1, -1), (1, 1, 1), 256)]).astype(np.float32) * 0.9
    names = ["sphere", "cube", "flower_pot"]
    batch = classify_points(small_model, clouds, names)
    assert batch.shape == (2, 3) and torch.isfinite(batch).all()
    assert torch.allclose(classify_points(small_model, clouds[1], names), batch[1], atol=1e-5)
    for projection, views, V in (("ortho_dense", 10, 10), ("pointclip_v2", None, 10), ("pointclip", None, 6)):
        weights = [0] * (V - 1) + [2]
        clf = PointCloudClassifier(small_model, names, projection=projection, views=views, method="none", view_weights=weights)
        emb = clf.view_embeddings(clouds)
        assert emb.shape == (2, V, 64) and torch.allclose(emb.norm(dim=-1), torch.ones(2, V), atol=1e-5)
        # logit_scale · Σ_v w_v cos_v / √V: PointCLIP's / V2's concatenated, normalised features
        expected = small_model.runtime.clip.logit_scale.exp() * 2 * emb[:, V - 1] @ clf.text.T / math.sqrt(V)
        assert torch.allclose(clf.logits(clouds), expected, atol=1e-4)


@pytest.mark.parametrize("projection", ["pointclip", "pointclip_v2"])
def test_authors_views_reach_the_vit_without_mean_std(small_model, rng, projection):
    cloud = (cylinder_surface(rng, 1500) * 0.9).astype(np.float32)[None]
    clf = PointCloudClassifier(small_model, ["a", "b"], projection=projection, method="none")
    pixels, masks = clf.render(cloud)
    assert torch.equal(pixels[0], render_views(cloud[0], projection, size=64))  # first 1024 points, 64 px for this model
    raw = torch.nn.functional.normalize(small_model.runtime.run(pixels[0]).float(), dim=-1)
    assert torch.allclose(clf.view_embeddings(cloud)[0], raw, atol=1e-5)
    assert torch.equal(masks[0], view_foreground(pixels[0], projection, clf.mask_dilation))
    assert clf.mask_dilation == (4 if projection == "pointclip" else 0)


@pytest.mark.parametrize("projection", ["pointclip_v2", "ortho_sparse"])
def test_falip_views_use_each_views_foreground(small_model, rng, projection):
    cloud = (cylinder_surface(rng, 2048) * 0.9)[None].astype(np.float32)
    names = ["a", "b"]
    plain = PointCloudClassifier(small_model, names, projection=projection, method="none").view_embeddings(cloud)
    zero = PointCloudClassifier(small_model, names, projection=projection, config=FovealConfig(alpha=0.0)).view_embeddings(cloud)
    assert torch.allclose(zero, plain, atol=1e-5)  # no bias ≡ the plain image
    config = FovealConfig(alpha=2.0)
    falip = PointCloudClassifier(small_model, names, projection=projection, method="falip", config=config)
    biased = falip.view_embeddings(cloud)
    assert (biased - plain).abs().max() > 1e-3
    pixels, masks = falip.render(cloud)
    assert pixels.dtype == torch.float32 and masks.dtype == torch.bool and masks.shape == pixels.shape[:2] + (64, 64)
    assert masks[0].any(dim=(-2, -1)).all() and not masks[0].all()
    normalized = projection == "pointclip_v2"
    expected = small_model.encode_pixels(pixels[0, 4:5], normalized=normalized, masks=masks[0, 4:5], config=config)
    assert torch.allclose(biased[0, 4], expected[0].cpu(), atol=1e-5)


def test_classifier_rejects_bad_options(small_model):
    with pytest.raises(FalipError, match="method"):
        PointCloudClassifier(small_model, ["a"], method="circle")
    with pytest.raises(FalipError, match="view weights must be 6"):
        PointCloudClassifier(small_model, ["a"], view_weights=[1, 1])
    with pytest.raises(FalipError, match="view weights"):
        PointCloudClassifier(small_model, ["a"], view_weights=[0] * 6)
    with pytest.raises(PointCloudError, match="own fixed views"):
        PointCloudClassifier(small_model, ["a"], projection="pointclip_v2", views=6)
    with pytest.raises(PointCloudError, match="renamed 'ortho_dense'"):
        PointCloudClassifier(small_model, ["a"], projection="realistic")
    with pytest.raises(PointCloudError, match="up='z'"):
        PointCloudClassifier(small_model, ["a"], up="z")
    with pytest.raises(PointCloudError, match="NaN"):
        classify_points(small_model, np.full((5, 3), np.nan), ["a"])


def test_v2_presets_hold_the_authors_prompts_and_weights():
    presets = v2_presets()
    assert sorted(presets) == ["modelnet40_vit_b16", "modelnet40_vit_b32", "scanobjectnn_vit_b16", "scanobjectnn_vit_b32"]
    mn = presets["modelnet40_vit_b16"]
    assert mn["view_weights"] == [0.75, 0.75, 0.75, 0.25, 0.75, 1.0, 0.25, 1.0, 0.75, 0.25]
    assert len(mn["prompts"]) == 40 and mn["prompts"]["airplane"].startswith("A three-dimensional model of an airplane")
    assert list(presets["scanobjectnn_vit_b16"]["prompts"]) == list(SCANOBJECTNN_CLASSES)
    assert v2_preset_key("modelnet40", "ViT-B-16") == "modelnet40_vit_b16"
    assert v2_preset_key("scanobjectnn", "ViT-B-32-quickgelu") == "scanobjectnn_vit_b32"
    with pytest.raises(FalipError, match="--v2-preset"):
        v2_preset_key("modelnet40", "ViT-L-14")


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pc")
    torch.save(tiny_clip(224, 32, layers=4).state_dict(), root / "tiny.pt")
    make_modelnet(root / "data", np.random.default_rng(1), n_per_file=(5, 3), points=128, bad=True)
    return root


@pytest.mark.parametrize(
    "projection,extra,method",
    [
        ("pointclip", [], "falip"),
        ("pointclip_v2", ["--v2-preset", "modelnet40_vit_b16"], "none"),
        ("ortho_dense", ["--views", "10"], "none"),
    ],
)
def test_cli_runs_end_to_end_and_resumes(cli_files, tmp_path, capsys, projection, extra, method):
    out = tmp_path / "res.json"
    args = ["pointcloud", "--dataset", "modelnet40", "--data-root", str(cli_files / "data"), "--projection", projection,
            "--method", method, "--model", str(cli_files / "tiny.pt"), "--batch-size", "4", "--output", str(out), *extra]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "pointcloud" and result["dataset"] == "modelnet40"
    assert result["metrics"]["n"] == 6 and result["metrics"]["skipped"] == 2
    assert result["skipped"]["by_reason"] == {"bad points": 1, "bad label": 1}
    config = result["config"]
    assert (
        config["projection"] == projection
        and config["method"] == method
        and len(config["views"]) == (6 if projection == "pointclip" else 10)
    )
    if projection == "pointclip_v2":
        assert (
            config["v2_preset"] == "modelnet40_vit_b16"
            and config["view_weights"] == v2_presets()["modelnet40_vit_b16"]["view_weights"]
        )
        assert config["max_points"] == 1024 and "no CLIP mean/std" in config["pixels"]
    if projection == "pointclip":
        assert config["templates"] == ["point cloud depth map of a {}."] and config["view_weights"] == [1.0] * 6
    lines = [json.loads(x) for x in (tmp_path / "res.predictions.jsonl").read_text().splitlines()]
    preds = [r for r in lines[1:] if "skipped" not in r]
    assert result["metrics"]["acc"] == pytest.approx(100 * sum(r["correct"] for r in preds) / 6)
    assert {r["label_name"] for r in preds} <= {"airplane", "bathtub", "flower_pot"}
    assert "acc" in capsys.readouterr().out
    assert main(args) == 0  # resumes: nothing recomputed, the same numbers
    again = json.loads(out.read_text())
    assert again["metrics"] == result["metrics"]
    assert len((tmp_path / "res.predictions.jsonl").read_text().splitlines()) == len(lines)


def test_cli_limit_and_errors(cli_files, tmp_path, capsys):
    base = ["pointcloud", "--dataset", "modelnet40", "--model", str(cli_files / "tiny.pt"), "--output", str(tmp_path / "r.json")]
    data = ["--data-root", str(cli_files / "data")]
    assert main(base + data + ["--limit", "2", "--method", "none"]) == 0
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert (metrics["n"], metrics["skipped"]) == (1, 1)  # the second cloud has a NaN point
    assert main(base + ["--data-root", str(tmp_path / "nowhere")]) == 2
    assert "shape_names.txt" in capsys.readouterr().err
    assert main(base + data + ["--variant", "obj_bg"]) == 2
    assert "no variants" in capsys.readouterr().err
    assert main(base + data + ["--projection", "pointclip_v2"]) == 2  # a model file: no preset to pick
    assert "--v2-preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(base + data + ["--projection", "sparse"])
    assert info.value.code == 2 and "renamed 'ortho_sparse'" in capsys.readouterr().err


def test_render_depth_writes_a_picture_of_every_projection(tmp_path, rng, capsys):
    from PIL import Image

    np.save(tmp_path / "cyl.npy", cylinder_surface(rng, 2048))
    for projection, extra, V in (
        ("pointclip", [], 6),
        ("pointclip_v2", [], 10),
        ("ortho_sparse", [], 6),
        ("ortho_dense", ["--views", "10"], 10),
    ):
        out = tmp_path / f"{projection}.png"
        assert (
            main(
                [
                    "render-depth",
                    str(tmp_path / "cyl.npy"),
                    "--projection",
                    projection,
                    "--size",
                    "64",
                    "--output",
                    str(out),
                    *extra,
                ]
            )
            == 0
        )
        assert f"{V} {projection} views" in capsys.readouterr().out
        with Image.open(out) as im:
            cols, rows = (6, 1) if V == 6 else (5, 2)
            assert im.size == (cols * 64 + (cols - 1) * 4, rows * 64 + (rows - 1) * 4)
    (tmp_path / "bad.npy").write_bytes(b"nonsense")
    assert main(["render-depth", str(tmp_path / "bad.npy"), "--output", str(tmp_path / "x.png")]) == 2
    assert "bad.npy" in capsys.readouterr().err


def test_cli_scanobjectnn_with_prompt_file_and_view_weights(cli_files, tmp_path, capsys):
    rng = np.random.default_rng(2)
    write_h5(
        tmp_path / "h5_files" / "main_split_nobg" / "test_objectdataset.h5",
        rng.normal(size=(3, 64, 3)).astype(np.float32),
        np.array([0, 4, 14]),
    )
    (tmp_path / "prompts.txt").write_text("a depth map of a {}.\na rendering of a {}.\n")
    out = tmp_path / "sonn.json"
    base = ["pointcloud", "--dataset", "scanobjectnn", "--variant", "obj_only", "--data-root", str(tmp_path), "--projection",
            "ortho_dense", "--views", "10", "--templates", str(tmp_path / "prompts.txt"), "--model", str(cli_files / "tiny.pt"),
            "--output", str(out)]  # fmt: skip
    assert main(base + ["--view-weights", "1,1,1,1,1,1,2,2,2,2"]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["n"] == 3 and result["config"]["variant"] == "obj_only"
    assert result["config"]["view_weights"] == pytest.approx([1] * 6 + [2] * 4)
    lines = [json.loads(x) for x in (tmp_path / "sonn.predictions.jsonl").read_text().splitlines()[1:]]
    assert [r["label_name"] for r in lines] == ["bag", "chair", "toilet"]
    assert main(base + ["--view-weights", "1,2", "--no-resume"]) == 2
    assert "view weights must be 10" in capsys.readouterr().err


def test_batched_run_with_workers_equals_batch_size_1_inline(cli_files, tmp_path):
    """Batches of clouds (all their views encoded together) checked by worker processes ≡ one cloud at a time, inline."""
    runs = {}
    for name, flags in [
        ("single", ["--batch-size", "1", "--workers", "0"]),
        ("batched", ["--batch-size", "5", "--workers", "2"]),
    ]:
        out = tmp_path / f"{name}.json"
        args = ["pointcloud", "--dataset", "modelnet40", "--data-root", str(cli_files / "data"), "--method", "falip",
                "--model", str(cli_files / "tiny.pt"), "--output", str(out), *flags]  # fmt: skip
        assert main(args) == 0
        result = json.loads(out.read_text())
        lines = (tmp_path / f"{name}.predictions.jsonl").read_text().splitlines()[1:]
        runs[name] = (result["metrics"], result["skipped"], [json.loads(x) for x in lines])
    assert runs["batched"] == runs["single"] and runs["single"][0]["n"] == 6
