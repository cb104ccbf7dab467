"""Point-cloud data as distributed: PointNet-style HDF5 (ModelNet40, ScanObjectNN) and single files.

- ModelNet40: ``modelnet40_ply_hdf5_2048/`` with ``ply_data_{train,test}*.h5`` (``data`` (N, P, 3),
  ``label`` (N, 1)), ``shape_names.txt`` and ``{train,test}_files.txt`` (lines like
  ``data/modelnet40_ply_hdf5_2048/ply_data_test0.h5``; only the file name is used).
- ScanObjectNN: ``h5_files/{main_split,main_split_nobg}/{training,test}_objectdataset*.h5``
  (``data`` (N, 2048, 3), ``label`` (N,)); variants ``obj_bg``, ``obj_only``, ``pb_t50_rs``.
- Single clouds: ``.npy`` (P, ≥3), ``.txt``/``.xyz`` (whitespace or comma separated, ≥3 columns),
  ``.ply`` (ASCII or binary vertices), ``.off`` (mesh: points sampled on the faces by area).
Only the first three columns (xyz) are used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import FalipError
from ..inputs import check_array_bytes, check_claim, check_count, check_path, text_lines
from ..pointcloud import PointCloudError

SCANOBJECTNN_CLASSES = (
    "bag", "bin", "box", "cabinet", "chair", "desk", "display", "door",
    "shelf", "table", "bed", "pillow", "sink", "sofa", "toilet",
)  # fmt: skip
# variant → (folder, file-name suffix)
SCANOBJECTNN_VARIANTS = {
    "obj_bg": ("main_split", ""),
    "obj_only": ("main_split_nobg", ""),
    "pb_t50_rs": ("main_split", "_augmentedrot_scale75"),
}
DATASETS = ("modelnet40", "scanobjectnn")
CLOUD_SUFFIXES = (".npy", ".txt", ".xyz", ".ply", ".off")
MAX_CLOUD_POINTS = 10_000_000  # points sampled on one mesh


class DatasetError(PointCloudError):
    """A dataset folder or file is missing or not in the expected layout."""


@dataclass
class H5Part:
    path: Path
    data: np.ndarray  # (N, P, 3) float32
    labels: np.ndarray  # (N,) int64


@dataclass
class PointCloudDataset:
    """An HDF5 point-cloud split: ``classnames`` and the files' clouds, read on first use.

    Iterating yields ``(sample_id, points (P, 3) float32, label)``; ids are ``"<file>:<index>"``.
    """

    name: str
    split: str
    classnames: list[str]
    files: list[Path]
    variant: Optional[str] = None
    _parts: Optional[list[H5Part]] = field(default=None, repr=False)

    def parts(self) -> list[H5Part]:
        if self._parts is None:
            self._parts = [read_h5(p) for p in self.files]
        return self._parts

    def __len__(self) -> int:
        return sum(len(p.labels) for p in self.parts())

    def __iter__(self) -> Iterator[tuple[str, np.ndarray, int]]:
        for part in self.parts():
            for i in range(len(part.labels)):
                yield f"{part.path.name}:{i}", part.data[i], int(part.labels[i])


def read_h5(path) -> H5Part:
    """Read ``data`` (N, P, ≥3) and ``label`` (N,) or (N, 1) from a PointNet-style HDF5 file."""
    import h5py

    path = check_path(path, "HDF5 file", error=DatasetError)
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("data", "label") if k not in f]
            if missing:
                raise DatasetError(f"{path} has no {' or '.join(repr(m) for m in missing)} dataset (keys: {sorted(f.keys())})")
            data, labels = (_h5_array(f, key, path) for key in ("data", "label"))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        if isinstance(exc, FalipError):
            raise
        raise DatasetError(f"{path} is not a readable HDF5 file: {exc}") from None
    if data.ndim != 3 or data.shape[-1] < 3:
        raise DatasetError(f"{path}: 'data' must have shape (N, P, 3), got {data.shape}")
    labels = labels.reshape(labels.shape[0], -1) if labels.ndim else labels
    if labels.ndim != 2 or labels.shape[1] != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: 'label' must have shape (N,) or (N, 1) with N = {data.shape[0]}, got {labels.shape}")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DatasetError(f"{path}: 'label' must hold integer class ids, got dtype {labels.dtype}")
    return H5Part(path, data[..., :3].astype(np.float32, copy=False), labels[:, 0].astype(np.int64))


def _h5_array(f, key: str, path: Path) -> np.ndarray:
    """``f[key]`` read whole, once it is known to be a numeric dataset of a bounded size that holds data."""
    import h5py

    node = f[key]
    if not isinstance(node, h5py.Dataset):
        raise DatasetError(f"{path}: '{key}' must be a dataset (an array), got a {type(node).__name__.lower()}")
    if node.dtype.kind not in "fiub":
        raise DatasetError(f"{path}: '{key}' must hold numbers, got dtype {node.dtype}")
    check_array_bytes(int(node.size) * node.dtype.itemsize, str(path), f"'{key}' of shape {node.shape}")
    if node.size and node.id.get_storage_size() == 0:
        raise DatasetError(f"{path}: '{key}' of shape {node.shape} was declared but never written (no data stored)")
    return np.asarray(node[()])


def _find_dir(root: Path, names: Sequence[str], marker: str) -> Path:
    """The first of ``root/<name>`` (or ``root`` itself) that contains ``marker``."""
    for candidate in [root / n for n in names] + [root]:
        if (candidate / marker).exists():
            return candidate
    raise DatasetError(f"no {marker} under {root} (looked in {', '.join(str(root / n) for n in names)} and {root} itself)")


def load_modelnet40(root, split: str = "test") -> PointCloudDataset:
    """ModelNet40 from ``root`` = the folder holding ``modelnet40_ply_hdf5_2048/``, or that folder itself."""
    if split not in ("train", "test"):
        raise DatasetError(f"ModelNet40 split must be train or test, got {split!r}")
    folder = _find_dir(Path(root), ["modelnet40_ply_hdf5_2048", "data/modelnet40_ply_hdf5_2048"], "shape_names.txt")
    classnames = [line.strip() for line in text_lines(folder / "shape_names.txt", "ModelNet40 class list") if line.strip()]
    listing = folder / f"{split}_files.txt"
    if listing.exists():
        names = [Path(line.strip()).name for line in text_lines(listing, "ModelNet40 file list") if line.strip()]
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob(f"ply_data_{split}*.h5"))
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise DatasetError(f"ModelNet40 {split} files missing in {folder}: {missing[:3] or 'no ply_data_' + split + '*.h5'}")
    return PointCloudDataset("modelnet40", split, classnames, files)


def load_scanobjectnn(root, variant: str = "obj_bg", split: str = "test") -> PointCloudDataset:
    """ScanObjectNN ``variant`` (obj_bg, obj_only, pb_t50_rs) from ``root`` = the folder holding
    ``h5_files/`` (or ``h5_files/`` itself, or the variant's folder)."""
    if variant not in SCANOBJECTNN_VARIANTS:
        raise DatasetError(f"unknown ScanObjectNN variant {variant!r}: use {', '.join(SCANOBJECTNN_VARIANTS)}")
    if split not in ("train", "test"):
        raise DatasetError(f"ScanObjectNN split must be train or test, got {split!r}")
    folder, suffix = SCANOBJECTNN_VARIANTS[variant]
    name = f"{'training' if split == 'train' else 'test'}_objectdataset{suffix}.h5"
    base = _find_dir(Path(root), [f"h5_files/{folder}", f"ScanObjectNN/h5_files/{folder}", folder], name)
    return PointCloudDataset("scanobjectnn", split, list(SCANOBJECTNN_CLASSES), [base / name], variant=variant)


def load_dataset(name: str, root, variant: Optional[str] = None, split: str = "test") -> PointCloudDataset:
    """``modelnet40`` or ``scanobjectnn`` (``variant`` default ``obj_bg``)."""
    if name == "modelnet40":
        if variant:
            raise DatasetError(f"ModelNet40 has no variants, got --variant {variant!r}")
        return load_modelnet40(root, split)
    if name == "scanobjectnn":
        return load_scanobjectnn(root, variant or "obj_bg", split)
    raise DatasetError(f"unknown dataset {name!r}: use {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Single files

PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def load_cloud(path, n_points: int = 2048, seed: int = 0) -> np.ndarray:
    """Read one cloud ``(P, 3)`` float32 from ``.npy``, ``.txt``/``.xyz``, ``.ply`` or ``.off``.

    ``n_points``/``seed`` only matter for ``.off`` meshes, whose surface is sampled by face area.
    """
    path = check_path(path, "point cloud file", error=PointCloudError)
    n_points = check_count(n_points, "points sampled on a mesh (--points)", 1, MAX_CLOUD_POINTS)
    suffix = path.suffix.lower()
    if suffix not in CLOUD_SUFFIXES:
        raise PointCloudError(
            f"{path}: unsupported point cloud format {suffix or '(no suffix)'!r}; use {', '.join(CLOUD_SUFFIXES)}"
        )
    try:
        if suffix == ".npy":
            points = _read_npy(path)
        elif suffix in (".txt", ".xyz"):
            points = _read_text(path)
        elif suffix == ".ply":
            points = _read_ply(path)
        else:
            points = _read_off(path, n_points, seed)
    except PointCloudError:
        raise
    except FalipError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, IndexError, KeyError, EOFError) as exc:
        raise PointCloudError(f"{path} is not a readable {suffix} point cloud: {exc}") from None
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise PointCloudError(f"{path}: expected points of shape (P, 3) (or more columns), got {points.shape}")
    if points.shape[0] == 0:
        raise PointCloudError(f"{path} holds no points")
    if points.dtype.kind not in "fiu":
        raise PointCloudError(f"{path}: point coordinates must be numbers, got dtype {points.dtype}")
    points = points[:, :3].astype(np.float32)
    if not np.all(np.isfinite(points)):
        raise PointCloudError(f"{path} contains NaN or infinite coordinates")
    return points


def _read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, its header's shape checked against the file's size and :data:`MAX_ARRAY_BYTES` first."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype.hasobject:
            raise PointCloudError(f"{path}: holds Python objects (dtype {dtype}), not numbers")
        check_claim(math.prod(shape) * dtype.itemsize, path.stat().st_size - f.tell(), str(path), f"an array of shape {shape}")
    return np.load(path, allow_pickle=False)


def _read_text(path: Path) -> np.ndarray:
    rows = []
    for line in text_lines(path, "point cloud file"):
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append([float(v) for v in line.replace(",", " ").split()])
    if not rows:
        raise PointCloudError(f"{path} holds no points")
    if len({len(r) for r in rows}) != 1:
        raise PointCloudError(f"{path}: rows have different numbers of columns")
    return np.array(rows, dtype=np.float64)


def _read_ply(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise PointCloudError(f"{path} is not a PLY file (no 'ply' magic line)")
        fmt, elements = None, []  # elements: [name, count, [(prop, dtype)]]
        while True:
            line = f.readline()
            if not line:
                raise PointCloudError(f"{path}: PLY header has no end_header")
            words = line.decode("ascii").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append([words[1], check_count(int(words[2]), f"{path}: PLY element {words[1]!r} count", 0, 2**40), []])
            elif words[0] == "property" and elements:
                if words[1] == "list":
                    elements[-1][2].append((words[-1], "list"))
                else:
                    elements[-1][2].append((words[-1], PLY_TYPES[words[1]]))
        if not elements or elements[0][0] != "vertex":
            raise PointCloudError(f"{path}: PLY has no vertex element first")
        _, count, props = elements[0]
        names = [p for p, _ in props]
        if not {"x", "y", "z"} <= set(names) or any(t == "list" for _, t in props):
            raise PointCloudError(f"{path}: PLY vertices need x, y, z properties (got {names})")
        cols = [names.index(a) for a in "xyz"]
        left = path.stat().st_size - f.tell()
        if fmt == "ascii":  # a vertex line holds at least one character per property and a line end
            check_claim(count * (2 * len(props)), left, str(path), f"{count} ASCII vertices")
            rows = [f.readline().split() for _ in range(count)]
            return np.array([[float(r[c]) for c in cols] for r in rows])
        if fmt not in ("binary_little_endian", "binary_big_endian"):
            raise PointCloudError(f"{path}: unknown PLY format {fmt!r}")
        endian = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(p, endian + t) for p, t in props])
        check_claim(dtype.itemsize * count, left, str(path), f"{count} vertices of {dtype.itemsize} bytes")
        raw = f.read(dtype.itemsize * count)
        if len(raw) < dtype.itemsize * count:
            raise PointCloudError(f"{path}: PLY file is truncated ({count} vertices announced)")
        verts = np.frombuffer(raw, dtype=dtype, count=count)
        return np.stack([verts["x"], verts["y"], verts["z"]], axis=1).astype(np.float64)


def _read_off(path: Path, n_points: int, seed: int) -> np.ndarray:
    words = []
    for line in text_lines(path, "OFF file"):
        line = line.split("#")[0].strip()
        if line:
            words.extend(line.split())
    if not words or not words[0].startswith("OFF"):
        raise PointCloudError(f"{path} is not an OFF file (no 'OFF' header)")
    rest = words[1:]
    if len(words[0]) > 3:  # ModelNet's files glue the counts to the header: "OFF1234 5678 0"
        rest = [words[0][3:]] + rest
    n_verts, n_faces = int(rest[0]), int(rest[1])
    if n_verts < 0 or n_faces < 0 or 3 * n_verts + 4 * n_faces > len(rest) - 3:  # a vertex is 3 words, a face at least 4
        raise PointCloudError(
            f"{path}: the OFF header announces {n_verts} vertices and {n_faces} faces, but the file holds only "
            f"{len(rest) - 3} numbers after it; the file is truncated or its header is wrong"
        )
    pos = 3
    verts = np.array(rest[pos : pos + 3 * n_verts], dtype=np.float64).reshape(n_verts, 3)
    pos += 3 * n_verts
    faces = []
    for _ in range(n_faces):
        k = int(rest[pos])
        idx = [int(v) for v in rest[pos + 1 : pos + 1 + k]]
        faces.extend((idx[0], idx[j], idx[j + 1]) for j in range(1, k - 1))  # fan triangulation
        pos += 1 + k
    if not faces:
        return verts
    tri = verts[np.array(faces)]  # (T, 3 corners, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if area.sum() <= 0:
        return verts
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(tri), size=n_points, p=area / area.sum())
    r1, r2 = rng.random(n_points), rng.random(n_points)
    s = np.sqrt(r1)
    a, b, c = 1 - s, s * (1 - r2), s * r2  # uniform barycentric coordinates
    t = tri[pick]
    return a[:, None] * t[:, 0] + b[:, None] * t[:, 1] + c[:, None] * t[:, 2]
