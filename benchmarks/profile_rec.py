"""Where a ``falip rec`` run spends its time, and the naive path against one plain pass.

    PYTHONPATH=src python benchmarks/profile_rec.py                 # 4 synth images, 10 proposals, 3 sentences each
    PYTHONPATH=src python benchmarks/profile_rec.py --images 8 --objects 3 --mode approx

1. Runs ``falip rec`` in this process under cProfile (``--workers 0``, so reading images happens here too)
   on ``falip synth`` scenes with full-size random ViT-B-16 weights, and splits the wall clock into: load
   (``falip.load``), data (reading annotations and images, preprocessing, proposals), text encode (+ its
   cache), image encode (every region of every image), writing (the run recorder: predictions JSONL,
   results JSON), and the rest (argument parsing, bookkeeping, printing).
2. Times the naive path per region against one plain batch-1 image pass, alternately in one process
   (``--pairs`` rounds, min of each): the naive path is the honest baseline only if it costs no more.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (part, [(file suffix, function name)]): the cumulative time of the outermost calls of these functions.
PARTS = [
    ("load", [("falip/model.py", "load")]),
    ("data", [("falip/datasets/refer.py", "load_reclip"), ("falip/tasks/loader.py", "load_batches")]),
    ("text encode (+ cache)", [("falip/model.py", "encode_text")]),
    ("image encode", [("falip/model.py", "encode_regions_batch")]),
    ("writing", [("falip/results.py", name) for name in ("add", "skip", "finish", "close")]),
]


def cumulative(stats: pstats.Stats, targets: list[tuple[str, str]]) -> float:
    """Summed cumulative seconds of the functions ``targets`` (recursive calls counted once by cProfile)."""
    total = 0.0
    for (filename, _, name), (_, _, _, cum, _) in stats.stats.items():
        if any(filename.endswith(suffix) and name == fn for suffix, fn in targets):
            total += cum
    return total


def profile(argv: list[str]) -> tuple[float, dict[str, float]]:
    from falip.cli import main

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    code = main(argv)
    profiler.disable()
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"falip {' '.join(argv)} failed ({code})")
    stats = pstats.Stats(profiler)
    return wall, {part: cumulative(stats, targets) for part, targets in PARTS}


def naive_vs_plain(weights: Path, image_path: Path, pairs: int) -> tuple[float, float]:
    """(min seconds of one naive region, min seconds of one plain batch-1 pass), timed alternately."""
    import numpy as np

    import falip
    from falip.images import load_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = falip.load("ViT-B-16", pretrained=str(weights))
    image = load_image(image_path)
    box = np.array([[40, 60, 300, 320]])
    model.encode_image(image), model.encode_regions(image, box, mode="naive")  # warm-up
    naive, plain = [], []
    for _ in range(pairs):
        start = time.perf_counter()
        model.encode_regions(image, box, mode="naive")
        naive.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.encode_image(image)
        plain.append(time.perf_counter() - start)
    return min(naive), min(plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--objects", type=int, default=10, help="objects per image = detector proposals")
    ap.add_argument("--sentences", type=int, default=3, help="sentences per image")
    ap.add_argument("--mode", default="exact", choices=("exact", "approx", "naive"))
    ap.add_argument("--pairs", type=int, default=5, help="alternating naive/plain rounds")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/falip-bench-authors"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    from bench_authors import make_data
    from bench_load import weights_for

    weights = weights_for("vit-b-16", Path("/tmp/falip-bench-load"))
    args.data_dir.mkdir(parents=True, exist_ok=True)
    case = {3: "gold3", 10: "det10"}.get(args.objects)
    if case is None:
        raise SystemExit("--objects is 3 (gold boxes) or 10 (detector boxes)")
    data = make_data(args.data_dir, case, args.images, args.sentences)
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["rec", "--format", "reclip", "--annotations", str(data["annotations"]), "--image-root", str(data["image_root"])]
        argv += ["--detections", str(data["detections"])] if data["detections"] else []
        argv += ["--model", "ViT-B-16", "--pretrained", str(weights), "--mode", args.mode, "--workers", "0"]
        argv += ["--output", str(Path(tmp) / "rec.json"), "--no-resume", "--quiet"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wall, parts = profile(argv)
    n = args.images * args.sentences
    print(f"\nfalip rec --mode {args.mode}: {args.images} images × {args.objects} proposals, {n} sentences, ViT-B-16 random")
    print(f"weights, CPU fp32, {os.cpu_count()} CPUs (shared machine); wall clock {wall:.1f} s (cProfile on)")
    print("| part | seconds | share |\n|---|---:|---:|")
    for part, seconds in [*parts.items(), ("rest", wall - sum(parts.values()))]:
        print(f"| {part} | {seconds:.2f} | {seconds / wall:.0%} |")
    naive, plain = naive_vs_plain(weights, data["image_root"] / sorted(os.listdir(data["image_root"]))[0], args.pairs)
    print(
        f"\nnaive path per region {naive:.3f} s, plain batch-1 pass {plain:.3f} s (min of {args.pairs}, alternating): "
        f"{naive / plain:.2f}× the plain pass"
    )


if __name__ == "__main__":
    main()
