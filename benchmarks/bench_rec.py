"""REC throughput of every method on one generated data set, measured in one run.

    python benchmarks/bench_rec.py                                  # ViT-B/16, random weights, CPU fp32
    python benchmarks/bench_rec.py --device cuda --images 64 --boxes 10
    python benchmarks/bench_rec.py --model ViT-B-16 --pretrained openai --output rec.json

Writes ``--images`` random 640×480 images with ``--boxes`` gold boxes and ``--sentences`` sentences
per image as ReCLIP JSONL, then runs :func:`falip.tasks.rec.evaluate` (the ``falip rec`` pipeline:
grouped by image, each image's proposals encoded once per method) for each method and reports
expressions/s (best of ``--repeats`` interleaved rounds), with ratios against ``falip`` (exact)
of the same run. ``reference`` is the pattern
of the ReCLIP/FALIP release code (``bench_authors.authors_pattern``), timed on the same data: every
proposal re-encoded for every sentence, one full forward pass per proposal (``naive``). Accuracy is meaningless with random
weights and is not reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import falip
from falip.datasets.refer import load_reclip
from falip.images import load_image
from falip.tasks.rec import RegionScorer, evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_authors import authors_pattern  # noqa: E402

METHODS = "falip,falip@approx,none,crop,blur,circle,blur_circle,box,shade,grayscale,reverse_blur,falip+circle,falip+blur"


def write_data(root: Path, n_images: int, n_boxes: int, n_sentences: int, seed: int = 0) -> Path:
    """Random smooth images and a ReCLIP JSONL (one line per box, sentences split across boxes)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_images):
        small = rng.integers(0, 256, size=(61, 81, 3), dtype=np.uint8)
        name = f"COCO_train2014_{i:012d}.jpg"
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(root / name)
        x0, y0 = rng.uniform(0, 500, n_boxes), rng.uniform(0, 360, n_boxes)
        w, h = rng.uniform(20, 640 - x0), rng.uniform(20, 480 - y0)
        anns = [{"id": i * 100 + k, "bbox": [float(x0[k]), float(y0[k]), float(w[k]), float(h[k])]} for k in range(n_boxes)]
        for j in range(n_sentences):
            target = anns[j % n_boxes]["id"]
            lines.append(
                dict(
                    file_name=f"COCO_train2014_{i:012d}_{target}.jpg",
                    image_id=i,
                    anns=anns,
                    ann_id=target,
                    sentences=[{"raw": f"object number {j} in picture {i}"}],
                )
            )
    path = root / "bench.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def time_reference(model, annotations: Path, image_root: Path) -> float:
    """Expressions/s of the release code's pattern (``bench_authors.authors_pattern``): per sentence, one naive pass
    per proposal."""
    start = time.perf_counter()
    n = len(authors_pattern(model, dict(annotations=annotations, image_root=image_root, detections=None)))
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--boxes", type=int, default=8)
    ap.add_argument("--sentences", type=int, default=3, help="sentences per image")
    ap.add_argument("--methods", default=METHODS, help="comma-separated; '<method>@approx' runs the approx mode")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over all methods; the best round of each is kept")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the release code's pattern (slow)")
    ap.add_argument("--output", default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = falip.load(
            args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, preprocess="squash"
        )
    specs = args.methods.split(",") + ([] if args.no_reference else ["reference"])
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        root = Path(tmp)
        annotations = write_data(root, args.images, args.boxes, args.sentences)
        data = load_reclip(annotations)
        warm = RegionScorer([model], "falip")  # warm-up: first calls allocate
        warm.score(warm.encode(load_image(root / data.images["0"][0]), np.array([[0, 0, 100, 100]])), ["x"])
        for round_ in range(args.repeats):  # rounds interleave the methods, so slow drifts hit them all
            for spec in specs:
                if spec == "reference":
                    speed = time_reference(model, annotations, root)
                else:
                    name, _, mode = spec.partition("@")
                    scorer = RegionScorer([model], name, mode=mode or "exact")
                    speed = evaluate(scorer, data, root, root / f"{spec}.json", resume=False, progress=False)["metrics"][
                        "expr_per_s"
                    ]
                best[spec] = max(best.get(spec, 0.0), speed)
                print(f"round {round_ + 1} {spec:>16}: {speed:.2f} expressions/s", flush=True)
    rows = []
    for spec in specs:
        name, _, mode = spec.partition("@")
        rows.append(
            dict(method=name, mode="naive, per sentence" if spec == "reference" else mode or "exact", expr_per_s=best[spec])
        )
    base = next(r["expr_per_s"] for r in rows if r["method"] == "falip" and r["mode"] == "exact")
    print(
        f"\n{model.name}, {args.device} {args.precision}, {args.images} images × {args.boxes} boxes × {args.sentences} sentences"
    )
    print("| method | mode | expressions/s | × falip (exact) |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['mode']} | {r['expr_per_s']:.2f} | {r['expr_per_s'] / base:.2f}× |")
    if args.output:
        machine = dict(platform=platform.platform(), cpu_threads=torch.get_num_threads(), torch=torch.__version__)
        Path(args.output).write_text(json.dumps(dict(args=vars(args), machine=machine, rows=rows), indent=2))


if __name__ == "__main__":
    main()
