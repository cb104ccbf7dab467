"""Point-cloud speed in one run: projection (clouds/s) and end-to-end recognition (clouds/s).

    python benchmarks/bench_pointcloud.py                        # CPU, ViT-B/16 with random weights
    python benchmarks/bench_pointcloud.py --device cuda --model ViT-B-16 --pretrained openai

Projection: batches of ``--batch`` random 2048-point clouds (surface samples of random boxes, inside
the unit sphere), one vectorised call per batch: the authors' ``pointclip`` (6 views) and
``pointclip_v2`` (10 views) with their first-1024-points rule and the resize to 224 (the tensors CLIP
gets), and our ``ortho_sparse`` / ``ortho_dense`` (6 and 10 views, depth maps). End to end: ``--clouds``
clouds through :class:`falip.tasks.pointcloud.PointCloudClassifier` (projection, CLIP on every view,
40 class prompts) with ``none`` and ``falip``. Timings are the minimum over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import numpy as np
import torch

import falip
from falip.pointcloud import project, render_views
from falip.tasks.pointcloud import PointCloudClassifier


def random_clouds(n: int, points: int, seed: int = 0) -> np.ndarray:
    """``(n, points, 3)`` surface samples of random axis-aligned boxes."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, points, 3), np.float32)
    for i in range(n):
        half = rng.uniform(0.2, 1.0, 3)
        p = rng.uniform(-half, half, (points, 3))
        axis = rng.integers(0, 3, points)
        p[np.arange(points), axis] = np.where(rng.random(points) < 0.5, -half[axis], half[axis])
        out[i] = p / np.linalg.norm(half)
    return out


def best_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--batch", type=int, default=32, help="clouds per projection call")
    parser.add_argument("--clouds", type=int, default=2, help="clouds for the end-to-end timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    rows = []
    clouds = torch.from_numpy(random_clouds(args.batch, 2048)).to(args.device)
    for projection, views in (("pointclip", 6), ("pointclip_v2", 10)):
        render_views(clouds[:2], projection)  # warm-up
        t = best_time(lambda p=projection: render_views(clouds, p), args.repeats, sync)
        rows.append(dict(stage="projection", projection=projection, views=views, method="", clouds_per_s=args.batch / t))
    project(clouds[:2], 6, "ortho_sparse")  # warm-up
    for projection in ("ortho_sparse", "ortho_dense"):
        for views in (6, 10):
            t = best_time(lambda v=views, p=projection: project(clouds, v, p), args.repeats, sync)
            rows.append(dict(stage="projection", projection=projection, views=views, method="", clouds_per_s=args.batch / t))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = falip.load(args.model, pretrained=args.pretrained, device=args.device)
    names = [f"class {i}" for i in range(40)]
    small = random_clouds(args.clouds, 2048, seed=1)
    settings = [(m, p, v) for m in ("none", "falip") for p, v in (("pointclip", 6), ("pointclip_v2", 10))]
    classifiers = [PointCloudClassifier(model, names, projection=p, method=m) for m, p, v in settings]
    for clf in classifiers:
        clf.logits(small[:1])  # warm-up
    best = [float("inf")] * len(settings)
    for _ in range(args.repeats):  # round-robin, so that a burst of load on the machine hits every setting alike
        for i, clf in enumerate(classifiers):
            best[i] = min(best[i], best_time(lambda c=clf: c.logits(small), 1, sync))
    for (method, projection, views), t in zip(settings, best):
        rows.append(dict(stage="end-to-end", projection=projection, views=views, method=method, clouds_per_s=args.clouds / t))

    env = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(), device=args.device,
               model=args.model, pretrained=args.pretrained, batch=args.batch, clouds=args.clouds)  # fmt: skip
    print(f"{env}\n")
    print("| stage | projection | views | method | clouds/s |\n|---|---|---:|---|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['projection']} | {r['views']} | {r['method']} | {r['clouds_per_s']:.2f} |")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(dict(env=env, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
