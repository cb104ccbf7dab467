"""Throughput of region classification (images/s) per method and loader setting, on generated data.

    python benchmarks/bench_classify.py                          # ViT-B/16, random weights, CPU fp32
    python benchmarks/bench_classify.py --methods falip --runs 1:0,16:2 --images 64
    python benchmarks/bench_classify.py --device cuda --precision fp16 --images 512 --runs 1:0,64:8

Writes ``--images`` random 640×480 images with one box each as a generic JSONL dataset and runs
:func:`falip.tasks.classify.evaluate` once per method and per ``--runs`` entry ``BATCH:WORKERS``
(images encoded together : DataLoader worker processes; ``1:0`` is the per-image path, everything
in the main process). Text side excluded from the timing, image reading included; the ratio
compares each run with the first of its method, measured back to back. Predictions are checked
to be identical across runs. The same images also go through the model's plain image pass
(``encode_image``, read and preprocessed, in batches of the largest ``--runs`` batch): no region
method can beat that rate on the machine, so each run is also given as a fraction of it. Prints a
markdown table; ``--output FILE.json`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import falip
from falip.datasets.generic import load_generic
from falip.results import predictions_path
from falip.tasks.classify import evaluate


def write_dataset(root: Path, n: int, classes: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        small = rng.integers(0, 256, size=(61, 81, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(root / f"{i}.jpg", quality=90)
        x0, y0 = rng.uniform(0, 400), rng.uniform(0, 300)
        box = [x0, y0, x0 + rng.uniform(60, 240), y0 + rng.uniform(60, 180)]
        lines.append(json.dumps({"image": f"{i}.jpg", "label": f"class {i % classes}", "box": box}))
    (root / "regions.jsonl").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(f"class {c}" for c in range(classes)) + "\n")
    return root


def plain_images_per_s(model, root: Path, n: int, batch_size: int) -> float:
    """Images/s of the model's plain image pass over ``n`` dataset images, reading included (after one warm-up batch)."""
    files = [root / f"{i}.jpg" for i in range(n)]
    model.encode_image([Image.open(files[0]).convert("RGB")])
    start = time.perf_counter()
    for s in range(0, n, batch_size):
        model.encode_image([Image.open(f).convert("RGB") for f in files[s : s + batch_size]], batch_size=batch_size)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--methods", default="none,falip,blur,circle,falip+blur")
    p.add_argument("--mode", default="exact")
    p.add_argument("--runs", default="1:0,16:2", help="BATCH:WORKERS settings compared (first = baseline)")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    runs = [tuple(int(v) for v in r.split(":")) for r in args.runs.split(",")]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = falip.load(args.model, pretrained=args.pretrained, device=args.device, precision=args.precision)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_dataset(Path(tmp), args.images, classes=10)
        dataset = load_generic(root / "regions.jsonl", root / "classes.txt")
        plain = plain_images_per_s(model, root, args.images, max(b for b, _ in runs))
        print(f"plain image pass (encode_image): {plain:.2f} images/s", flush=True)
        for method in args.methods.split(","):
            predictions: list[list[dict]] = []
            base = 0.0
            for batch_size, workers in runs:
                out = root / f"{method}-{batch_size}-{workers}.json"
                result = evaluate(
                    model,
                    dataset,
                    out,
                    method=method,
                    templates="simple",
                    mode=args.mode,
                    resume=False,
                    workers=workers,
                    batch_size=batch_size,
                    progress=False,
                )
                lines = predictions_path(out).read_text().splitlines()[1:]
                predictions.append([{k: v for k, v in json.loads(line).items() if k != "image_stamp"} for line in lines])
                speed = result["speed"]
                base = speed["images_per_s"] if not predictions[:-1] else base  # the method's first run
                rows.append(
                    dict(
                        method=method,
                        batch_size=batch_size,
                        workers=workers,
                        ratio=speed["images_per_s"] / base,
                        of_plain=speed["images_per_s"] / plain,
                        **speed,
                    )
                )
                print(f"{method} batch {batch_size} workers {workers}: {speed['images_per_s']:.2f} images/s", flush=True)
            same = all(p == predictions[0] for p in predictions)
            for r in rows[-len(runs) :]:
                r["same_predictions"] = same
    print(
        f"\n{args.model} ({args.pretrained or 'random weights'}), {args.device} {args.precision}, mode {args.mode}, "
        f"{args.images} images 640x480, 1 box each; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, {platform.machine()}\n"
    )
    print(
        f"| method | batch | workers | images/s | × batch {runs[0][0]}, workers {runs[0][1]} | of the plain pass "
        f"({plain:.2f} images/s) | same predictions |\n|---|---:|---:|---:|---:|---:|---|"
    )
    for r in rows:
        print(
            f"| {r['method']} | {r['batch_size']} | {r['workers']} | {r['images_per_s']:.2f} | {r['ratio']:.2f}× "
            f"| {100 * r['of_plain']:.0f} % | {'yes' if r['same_predictions'] else 'NO'} |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(dict(args=vars(args), plain_images_per_s=plain, rows=rows), indent=2))


if __name__ == "__main__":
    main()
