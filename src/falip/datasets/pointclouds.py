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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

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

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"HDF5 file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("data", "label") if k not in f]
            if missing:
                raise DatasetError(f"{path} has no {' or '.join(repr(m) for m in missing)} dataset (keys: {sorted(f.keys())})")
            data = np.asarray(f["data"][()])
            labels = np.asarray(f["label"][()])
    except OSError as exc:
        raise DatasetError(f"{path} is not a readable HDF5 file: {exc}") from exc
    if data.ndim != 3 or data.shape[-1] < 3:
        raise DatasetError(f"{path}: 'data' must have shape (N, P, 3), got {data.shape}")
    labels = labels.reshape(labels.shape[0], -1) if labels.ndim else labels
    if labels.ndim != 2 or labels.shape[1] != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: 'label' must have shape (N,) or (N, 1) with N = {data.shape[0]}, got {labels.shape}")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise DatasetError(f"{path}: 'label' must hold integer class ids, got dtype {labels.dtype}")
    return H5Part(path, data[..., :3].astype(np.float32, copy=False), labels[:, 0].astype(np.int64))


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
    classnames = [line.strip() for line in (folder / "shape_names.txt").read_text().splitlines() if line.strip()]
    listing = folder / f"{split}_files.txt"
    if listing.is_file():
        names = [Path(line.strip()).name for line in listing.read_text().splitlines() if line.strip()]
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
    path = Path(path)
    if not path.is_file():
        raise PointCloudError(f"point cloud file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in CLOUD_SUFFIXES:
        raise PointCloudError(
            f"{path}: unsupported point cloud format {suffix or '(no suffix)'!r}; use {', '.join(CLOUD_SUFFIXES)}"
        )
    try:
        if suffix == ".npy":
            points = np.load(path, allow_pickle=False)
        elif suffix in (".txt", ".xyz"):
            points = _read_text(path)
        elif suffix == ".ply":
            points = _read_ply(path)
        else:
            points = _read_off(path, n_points, seed)
    except PointCloudError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, IndexError, KeyError) as exc:
        raise PointCloudError(f"{path} is not a readable {suffix} point cloud: {exc}") from exc
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


def _read_text(path: Path) -> np.ndarray:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
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
                elements.append([words[1], int(words[2]), []])
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
        if fmt == "ascii":
            rows = [f.readline().split() for _ in range(count)]
            return np.array([[float(r[c]) for c in cols] for r in rows])
        if fmt not in ("binary_little_endian", "binary_big_endian"):
            raise PointCloudError(f"{path}: unknown PLY format {fmt!r}")
        endian = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(p, endian + t) for p, t in props])
        raw = f.read(dtype.itemsize * count)
        if len(raw) < dtype.itemsize * count:
            raise PointCloudError(f"{path}: PLY file is truncated ({count} vertices announced)")
        verts = np.frombuffer(raw, dtype=dtype, count=count)
        return np.stack([verts["x"], verts["y"], verts["z"]], axis=1).astype(np.float64)


def _read_off(path: Path, n_points: int, seed: int) -> np.ndarray:
    words = []
    for line in path.read_text(encoding="ascii").splitlines():
        line = line.split("#")[0].strip()
        if line:
            words.extend(line.split())
    if not words or not words[0].startswith("OFF"):
        raise PointCloudError(f"{path} is not an OFF file (no 'OFF' header)")
    rest = words[1:]
    if len(words[0]) > 3:  # ModelNet's files glue the counts to the header: "OFF1234 5678 0"
        rest = [words[0][3:]] + rest
    n_verts, n_faces = int(rest[0]), int(rest[1])
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
