"""Reference depth views (and PointCLIP V2's prompt presets) from the PointCLIP authors' own code.

Usage::

    python tools/make_pointcloud_fixtures.py --pointclip /path/to/ZrrSkywalker+PointCLIP \\
        --pointclip-v2 /path/to/yangyangyang127+PointCLIP_V2

The checkouts are github:ZrrSkywalker/PointCLIP and github:yangyangyang127/PointCLIP_V2. This script
*runs* their modules (nothing of theirs is copied into falip): for a few clouds it renders, on the
CPU, exactly the tensors their zero-shot trainers give CLIP's visual encoder —

- PointCLIP: ``trainers/zeroshot.py`` ``PointCLIP_ZS.mv_proj`` (``PCViews.get_img`` → 3 channels →
  bilinear 224, align_corners=True), 6 views;
- PointCLIP V2: ``zeroshot_cls/trainers/zeroshot.py`` ``PointCLIPV2_ZS.real_proj``
  (``Realistic_Projection.get_img`` → bilinear 224, align_corners=True), 10 views;

each after their data loader's first-1024-points rule (``Dassl3D/dassl/data/data_manager.py``
``DatasetWrapper.__getitem__``, run here on a stand-in data source). Written files:

- ``tests/data/pointclip_views.npz``: ``cloud_<i>`` (P_i, 3) float32 (before the 1024 rule) and
  ``pointclip_<i>`` (6, 224, 224), ``pointclip_v2_<i>`` (10, 224, 224) float32 — one channel, the
  script checks that their three channels are equal;
- ``src/falip/assets/pointclip_v2_presets.json``: V2's searched per-class prompts and view weights
  (``trainers/best_param.py``) for the ViT backbones, keyed by class name
  (``trainers/post_search.py`` ``class_names``), with the source and licence.

Their code needs CUDA, ``torch_scatter``, ``dassl`` and OpenAI ``clip``; here ``Tensor.cuda`` /
``Module.cuda`` are no-ops, ``torch_scatter.scatter(..., reduce="max")`` is a pure-torch stand-in
(``scatter_reduce`` with ``amax`` onto ``out``), and the trainer modules' ``dassl.engine`` / ``clip``
imports get inert stand-ins (the projection and resizing code does not use them). All stand-ins live
in this script's ``sys.modules`` only.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
V2_BACKBONES = {"vit_b16": "ViT-B/16", "vit_b32": "ViT-B/32"}


def stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__path__ = []  # a package, so that submodules can be stubbed below it
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    return module


def scatter(src, index, dim=-1, out=None, dim_size=None, reduce="sum"):
    """Stand-in for ``torch_scatter.scatter``: only what Realistic_Projection calls (reduce="max" onto ``out``).

    torch_scatter's max onto a given ``out`` keeps the larger of ``out`` and the scattered values; V2
    scatters depth values >= 1 onto a background of 0, so that is an ordinary max.
    """
    if reduce != "max" or out is None:
        raise NotImplementedError(f"stand-in scatter only covers reduce='max' with out=..., got {reduce!r}")
    return out.scatter_reduce_(dim, index, src, reduce="amax", include_self=True)


class _Registry:
    def register(self, *args, **kwargs):
        return lambda cls: cls


def install_stand_ins() -> None:
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    stub("torch_scatter", scatter=scatter)
    stub("gdown")  # imported (unused here) by Dassl3D's dataset base module
    stub("tabulate", tabulate=lambda rows, headers=None, **k: str(rows))
    stub("clip")
    stub("clip.clip")
    sys.modules["clip"].clip = sys.modules["clip.clip"]


def purge(prefixes: tuple[str, ...]) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in prefixes]:
        del sys.modules[name]


def load_repo(code_dir: Path, dassl_dir: Path, extra_stubs: tuple[str, ...] = ()):
    """Import one checkout's ``trainers.zeroshot`` and its real ``DatasetWrapper``; returns both modules."""
    purge(("trainers", "dassl"))
    sys.path[:0] = [str(code_dir), str(dassl_dir)]
    try:
        data_manager = importlib.import_module("dassl.data.data_manager")
        # The trainers import dassl.engine (the training loop: tensorboard, optimisers ...) only for the
        # base class and registry; an inert stand-in replaces it.
        stub("dassl.engine", TRAINER_REGISTRY=_Registry(), TrainerX=object)
        for name in extra_stubs:
            stub(name, load_clip_to_cpu=None)
        zeroshot = importlib.import_module("trainers.zeroshot")
        mv_utils = importlib.import_module("trainers.mv_utils_zs")
        best_param = importlib.import_module("trainers.best_param") if (code_dir / "trainers/best_param.py").exists() else None
        post_search = None
        if (code_dir / "trainers/post_search.py").exists():
            post_search = importlib.import_module("trainers.post_search")
    finally:
        del sys.path[:2]
    return data_manager, zeroshot, mv_utils, best_param, post_search


class _Item:
    """What Dassl's ``Datum`` carries that ``DatasetWrapper`` reads: the cloud travels as ``impath``."""

    def __init__(self, cloud: np.ndarray):
        self.impath, self.label, self.domain, self.order, self.classname = cloud, 0, 0, 0, ""


def first_points(data_manager, cloud: np.ndarray) -> np.ndarray:
    wrapper = data_manager.DatasetWrapper.__new__(data_manager.DatasetWrapper)
    wrapper.data_source, wrapper.is_train, wrapper.cfg = [_Item(cloud)], False, None
    return wrapper[0]["img"]


def fixture_clouds() -> list[np.ndarray]:
    """Three clouds inside the unit sphere (as the PointNet HDF5 files are):

    0. an asymmetric object of 1500 points — a tall post at +x/−z, a long bar along +x, a small block
       at +y/+z, of unequal extents on every axis — whose points 1024.. form a far blob that only
       appears if the first-1024 rule is broken;
    1. 1024 points of an anisotropic, rotated Gaussian;
    2. 300 points (fewer than 1024) on a sphere cap and a rod.
    """
    rng = np.random.default_rng(15)

    def box(lo, hi, n):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        return lo + rng.random((n, 3)) * (hi - lo)

    parts = [box((0.3, -0.6, -0.5), (0.45, 0.7, -0.35), 400), box((-0.7, -0.6, -0.1), (0.6, -0.45, 0.05), 400)]
    parts.append(box((-0.5, 0.1, 0.2), (-0.2, 0.35, 0.6), 224))
    parts.append(box((-0.95, 0.6, 0.55), (-0.8, 0.75, 0.7), 476))  # points 1024..1499
    asym = np.concatenate(parts)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    gauss = (rng.normal(size=(1024, 3)) * [0.5, 0.2, 0.1]) @ q.T
    theta = rng.random(200) * np.pi / 3
    phi = rng.random(200) * 2 * np.pi
    cap = np.stack([np.sin(theta) * np.cos(phi), np.cos(theta), np.sin(theta) * np.sin(phi)], 1) * 0.6
    rod = np.stack([rng.random(100) * 1.2 - 0.6, np.full(100, -0.3), np.full(100, 0.2)], 1)
    small = np.concatenate([cap, rod])
    out = []
    for cloud in (asym, gauss, small):
        cloud = cloud - cloud.mean(0)
        out.append((cloud / np.linalg.norm(cloud, axis=1).max() * 0.95).astype(np.float32))
    return out


def render(zeroshot, mv_utils, cloud: np.ndarray, v2: bool) -> torch.Tensor:
    """The authors' trainer's images for one cloud ``(P, 3)`` → ``(V, 3, 224, 224)``."""
    cls = zeroshot.PointCLIPV2_ZS if v2 else zeroshot.PointCLIP_ZS
    trainer = cls.__new__(cls)
    trainer.get_img = (mv_utils.Realistic_Projection() if v2 else mv_utils.PCViews()).get_img
    pc = torch.from_numpy(cloud)[None]
    with torch.no_grad():
        return trainer.real_proj(pc) if v2 else trainer.mv_proj(pc)


def presets(best_param, post_search) -> dict:
    table = best_param.best_prompt_weight
    out = {
        "source": "https://github.com/yangyangyang127/PointCLIP_V2 zeroshot_cls/trainers/best_param.py "
        "(prompts and view weights; class order from zeroshot_cls/trainers/post_search.py class_names)",
        "license": "MIT, Copyright (c) 2023 Xiangyang ZHU, Renrui ZHANG",
        "presets": {},
    }
    for dataset, names in (
        ("modelnet40", post_search.class_names["ModelNet40"]),
        ("scanobjectnn", post_search.class_names["ScanObjectNN"]),
    ):
        for key, backbone in V2_BACKBONES.items():
            prompts = table[f"{dataset}_{key}_test_prompts"]
            assert len(prompts) == len(names), (dataset, key)
            out["presets"][f"{dataset}_{key}"] = {
                "dataset": dataset,
                "backbone": backbone,
                "prompts": dict(zip(names, prompts)),
                "view_weights": table[f"{dataset}_{key}_test_weights"],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pointclip", required=True, type=Path, help="checkout of github:ZrrSkywalker/PointCLIP")
    parser.add_argument("--pointclip-v2", required=True, type=Path, help="checkout of github:yangyangyang127/PointCLIP_V2")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/data/pointclip_views.npz")
    parser.add_argument("--presets", type=Path, default=ROOT / "src/falip/assets/pointclip_v2_presets.json")
    args = parser.parse_args()
    sys.dont_write_bytecode = True
    torch.set_num_threads(1)
    install_stand_ins()

    clouds = fixture_clouds()
    arrays = {f"cloud_{i}": c for i, c in enumerate(clouds)}
    repos = {
        "pointclip": load_repo(args.pointclip, args.pointclip / "Dassl3D", extra_stubs=("trainers.fewshot",)),
        "pointclip_v2": load_repo(args.pointclip_v2 / "zeroshot_cls", args.pointclip_v2 / "zeroshot_cls/Dassl3D"),
    }
    for name, (data_manager, zeroshot, mv_utils, best_param, post_search) in repos.items():
        for i, cloud in enumerate(clouds):
            first = first_points(data_manager, cloud)
            images = render(zeroshot, mv_utils, np.ascontiguousarray(first), v2=name == "pointclip_v2")
            assert images.shape == (10 if name == "pointclip_v2" else 6, 3, 224, 224), images.shape
            assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
            arrays[f"{name}_{i}"] = images[:, 0].numpy().astype(np.float32)
            print(f"{name} cloud {i}: {len(cloud)} points -> {len(first)} used, views {tuple(images.shape)}")
        if best_param is not None:
            args.presets.write_text(json.dumps(presets(best_param, post_search), indent=1, ensure_ascii=False) + "\n")
            print(f"wrote {args.presets}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
