"""SigLIP / SigLIP2 through open_clip's timm towers: every mode agrees, and the probe path's speed.

    python benchmarks/check_siglip.py                                   # ViT-B-16-SigLIP and -SigLIP2, random weights
    python benchmarks/check_siglip.py --models ViT-B-16-SigLIP --k 10 --threads 2

For each model (random weights, CPU fp32 unless ``--device``): one 640×480 random image and K random
boxes, encoded with the foveal bias on the attention probe (the default ``FovealConfig``) in every
mode, and with the probe plus the last 4 blocks (rows ``all``). Prints max |Δ| of the L2-normalised
embeddings between modes, how far the bias moves them, zero bias against the model's own
``encode_image``, and the time of ``exact`` vs ``naive`` on the probe path (best of ``--repeats``, back
to back in one run). These are checks of the implementation, not of FALIP's accuracy on SigLIP.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings

import numpy as np
import torch

import falip


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def check(name: str, k: int, repeats: int, device: str, rng) -> None:
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = falip.load(name, device=device, preprocess="squash")
    info = model.runtime.info()
    print(f"\n## {name} (random weights): loaded in {time.perf_counter() - t:.1f} s; {info}")
    image = rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    x0, y0 = rng.uniform(0, 450, k), rng.uniform(0, 330, k)
    boxes = np.stack([x0, y0, x0 + rng.uniform(16, 190, k), y0 + rng.uniform(16, 150, k)], 1)
    probe = model.config
    blocks = dataclasses.replace(probe, layers=(-4, -3, -2, -1), rows="all")
    zero = dataclasses.replace(probe, alpha=0.0)
    plain = model.encode_image(image)
    out = {mode: model.encode_regions(image, boxes, mode=mode) for mode in ("naive", "exact", "approx")}
    with_blocks = {mode: model.encode_regions(image, boxes, mode=mode, config=blocks) for mode in ("naive", "exact")}

    def dev(a, b) -> str:
        return f"{(a - b).abs().max().item():.2e}"

    print(f"zero bias, exact vs encode_image: {dev(model.encode_regions(image, boxes, config=zero), plain.expand(k, -1))}")
    print(f"probe only: exact vs naive {dev(out['exact'], out['naive'])}, approx vs exact {dev(out['approx'], out['exact'])}")
    print(f"probe only: max |Δ| against the unbiased image embedding {dev(out['exact'], plain.expand(k, -1))}")
    print(
        f"probe + blocks {model.plan(blocks).layers} rows=all: exact vs naive {dev(with_blocks['exact'], with_blocks['naive'])}"
    )
    print(f"probe + blocks: max |Δ| against probe only {dev(with_blocks['exact'], out['exact'])}")
    naive = best_time(lambda: model.encode_regions(image, boxes, mode="naive"), repeats)
    exact = best_time(lambda: model.encode_regions(image, boxes, mode="exact"), repeats)
    print(f"probe path, K={k}: naive {naive:.2f} s, exact {exact:.2f} s → exact is {naive / exact:.1f}× naive")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-16-SigLIP,ViT-B-16-SigLIP2")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for name in args.models.split(","):
        check(name, args.k, args.repeats, args.device, rng)


if __name__ == "__main__":
    main()
