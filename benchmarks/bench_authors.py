"""falip's REC against the authors' pattern, side by side in one run: same data, same weights, same answers.

    PYTHONPATH=src python benchmarks/bench_authors.py                       # both cases, steady state and cold
    PYTHONPATH=src python benchmarks/bench_authors.py --cases det10 --steady-images 2 --no-cold

The authors' pattern (their ``main.py`` loop over ``executor.ClipExecutor``, written again here with
falip's pieces, not copied): per annotation line the image is opened; per sentence its text is encoded
(no cache); per sentence *every* proposal is prepared again (the image preprocessed, the box's bias
built) and run through the model alone: one batch-1 pass with the bias, ``encode_regions(image, [box],
mode="naive")``; the answer is the argmax of ``logit_scale · cos``. falip runs ``falip rec``'s pipeline
(:func:`falip.tasks.rec.evaluate`: images grouped, each image's proposals encoded once for all its
sentences, texts encoded once) in ``exact``, ``approx`` and ``naive`` mode.

Cases, from ``falip synth`` scenes (480 px, 3 sentences per image):

- ``gold3``: 3 objects per image, the gold boxes as proposals;
- ``det10``: 10 objects per image, ``--detections`` with the synth's 10 detector boxes per image.

Steady state: one process, the model loaded once, expressions/s over ``--steady-images`` images
(wall clock of the whole evaluation, writing included). Cold: the whole command in a fresh process,
``python -m falip rec ...`` against ``python benchmarks/bench_authors.py --authors-run ...`` (the
pattern with its own ``falip.load``), over ``--cold-images`` images. Weights: ``--weights``, default
random ViT-B-16 weights (open_clip layout, written once by ``benchmarks/bench_load.py``'s helper).
Every falip mode is checked to choose the authors' box on every sentence (exact within 1e-4 of
their logits; approx and naive are reported as the share of equal choices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CASES = {"gold3": 3, "det10": 10}
MODES = ("exact", "approx", "naive")
MODEL = "ViT-B-16"


def make_data(root: Path, case: str, images: int, sentences: int) -> dict:
    """A ``falip synth`` scene set cut to ``sentences`` per image: ``{annotations, image_root, detections}``."""
    from falip.cli import main

    out = root / f"{case}-{images}"
    if not (out / "reclip_val.jsonl").is_file():
        code = main(["synth", "--output", str(out), "--images", str(images), "--objects", str(CASES[case]), "--size", "480"])
        if code:
            raise SystemExit(f"falip synth failed ({code})")
    kept, count = [], {}
    for line in (out / "reclip_val.jsonl").read_text().splitlines():
        row = json.loads(line)
        room = sentences - count.get(row["image_id"], 0)
        if room > 0:
            row["sentences"] = row["sentences"][:room]
            count[row["image_id"]] = count.get(row["image_id"], 0) + len(row["sentences"])
            kept.append(json.dumps(row))
    annotations = out / f"cut{sentences}.jsonl"
    annotations.write_text("\n".join(kept) + "\n")
    detections = out / "synthetic_dets_dict.json" if case == "det10" else None
    return dict(annotations=annotations, image_root=out / "images", detections=detections)


def authors_pattern(model, data: dict) -> list[tuple[int, np.ndarray]]:
    """The authors' loop (see the module docstring): per sentence ``(chosen proposal, logits (K,))``."""
    import torch

    from falip.datasets.refer import load_detections, xywh_to_xyxy
    from falip.images import load_image

    detections = load_detections(data["detections"]) if data["detections"] else None
    answers = []
    with torch.no_grad():
        for line in data["annotations"].read_text().splitlines():
            row = json.loads(line)
            image = load_image(data["image_root"] / (row["file_name"].rsplit("_", 1)[0] + ".jpg"))  # ReCLIP names
            xywh = detections[str(row["image_id"])] if detections else [a["bbox"] for a in row["anns"]]
            for sentence in row["sentences"]:
                text = model.encode_text([f"a photo of {sentence['raw'].lower()}"])
                regions = torch.cat([model.encode_regions(image, [xywh_to_xyxy(b)], mode="naive") for b in xywh])
                logits = model.runtime.logits(regions, text)[:, 0].numpy()
                answers.append((int(logits.argmax()), logits))
    return answers


def falip_run(model, data: dict, mode: str, output: Path) -> list[tuple[int, np.ndarray]]:
    """``falip rec``'s evaluation in ``mode``: per sentence ``(chosen proposal, logits)``, in file order."""
    from falip.datasets.refer import load_reclip
    from falip.results import predictions_path
    from falip.tasks.rec import RegionScorer, evaluate

    rec = load_reclip(data["annotations"], detections=data["detections"])
    evaluate(RegionScorer([model], "falip", mode=mode), rec, data["image_root"], output, resume=False, progress=False)
    records = [json.loads(x) for x in predictions_path(output).read_text().splitlines()[1:]]
    order = {s.id: i for i, s in enumerate(rec.samples)}
    records.sort(key=lambda r: order[r["id"]])
    return [(r["pred_index"], np.array(r["scores"])) for r in records]


def agreement(ours: list, theirs: list) -> tuple[float, float]:
    """(share of sentences with the same chosen proposal, largest logit difference)."""
    same = np.mean([a[0] == b[0] for a, b in zip(ours, theirs)])
    diff = max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(ours, theirs))
    return float(same), diff


def steady(weights: Path, data: dict) -> dict:
    """Expressions/s of the authors' pattern and of each falip mode, one process, alternating after a warm-up."""
    import falip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = falip.load(MODEL, pretrained=str(weights))
    answers, rates = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        falip_run(model, dict(data, annotations=_first_line(data["annotations"], Path(tmp))), "exact", Path(tmp) / "w.json")
        for who in ("authors", *MODES):
            start = time.perf_counter()
            got = authors_pattern(model, data) if who == "authors" else falip_run(model, data, who, Path(tmp) / f"{who}.json")
            rates[who] = len(got) / (time.perf_counter() - start)
            answers[who] = got
            print(f"  steady {who:>7}: {rates[who]:.3f} expressions/s ({len(got)} sentences)", flush=True)
    return dict(rates=rates, agreement={m: agreement(answers[m], answers["authors"]) for m in MODES}, n=len(answers["authors"]))


def _first_line(annotations: Path, tmp: Path) -> Path:
    """A one-line copy of an annotation file (the warm-up run)."""
    path = tmp / "warm.jsonl"
    path.write_text(annotations.read_text().splitlines()[0] + "\n")
    return path


def cold(weights: Path, data: dict, repeats: int) -> dict:
    """Seconds of each whole command in fresh processes (min of ``repeats``, alternating)."""
    common = ["--format", "reclip", "--annotations", str(data["annotations"]), "--image-root", str(data["image_root"])]
    common += ["--detections", str(data["detections"])] if data["detections"] else []
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        commands = {"authors": [sys.executable, str(Path(__file__).resolve()), "--authors-run", *_run_args(data), str(weights)]}
        for mode in MODES:
            commands[mode] = [sys.executable, "-m", "falip", "rec", *common, "--model", MODEL, "--pretrained", str(weights)]
            commands[mode] += ["--mode", mode, "--output", str(Path(tmp) / f"{mode}.json"), "--no-resume", "--quiet"]
        for _ in range(repeats):
            for who, argv in commands.items():
                start = time.perf_counter()
                done = subprocess.run(argv, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
                seconds.setdefault(who, []).append(time.perf_counter() - start)
                print(f"  cold {who:>7}: {seconds[who][-1]:.1f} s", flush=True)
    return {who: min(s) for who, s in seconds.items()}


def _run_args(data: dict) -> list[str]:
    return [str(data["annotations"]), str(data["image_root"]), str(data["detections"] or "")]


def authors_run(annotations: str, image_root: str, detections: str, weights: str) -> None:
    """The cold authors' command: load, run the pattern, print one line per sentence."""
    import falip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = falip.load(MODEL, pretrained=weights)
    data = dict(annotations=Path(annotations), image_root=Path(image_root), detections=Path(detections) if detections else None)
    for chosen, _ in authors_pattern(model, data):
        print(chosen)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="gold3,det10", help=f"comma-separated, of {tuple(CASES)}")
    ap.add_argument("--sentences", type=int, default=3, help="sentences per image")
    ap.add_argument("--steady-images", type=int, default=4)
    ap.add_argument("--cold-images", type=int, default=16, help="16 images × 3 sentences = 48 sentences")
    ap.add_argument("--cold-repeats", type=int, default=1)
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--weights", type=Path, default=None, help=f"{MODEL} weights file (default: random, written once)")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/falip-bench-authors"))
    ap.add_argument(
        "--authors-run", nargs=4, metavar=("ANNOTATIONS", "IMAGE_ROOT", "DETECTIONS", "WEIGHTS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.authors_run:
        return authors_run(*args.authors_run)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    from bench_load import weights_for

    weights = args.weights or weights_for("vit-b-16", Path("/tmp/falip-bench-load"))
    args.data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases.split(","):
        print(f"{case}:", flush=True)
        result = steady(weights, make_data(args.data_dir, case, args.steady_images, args.sentences))
        times = (
            None
            if args.no_cold
            else cold(weights, make_data(args.data_dir, case, args.cold_images, args.sentences), args.cold_repeats)
        )
        rows.append((case, result, times))
    print(f"\n{MODEL} random weights, CPU fp32, {os.cpu_count()} CPUs (shared machine), {args.sentences} sentences per image")
    print(
        "| case | who | steady expr/s | × authors | same box | max Δlogit | cold s | × authors |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for case, result, times in rows:
        rates = result["rates"]
        for who in ("authors", *MODES):
            same, diff = result["agreement"].get(who, (1.0, 0.0))
            cold_cells = "| | " if times is None else f"| {times[who]:.1f} | {times['authors'] / times[who]:.2f}× "
            print(
                f"| {case} ({result['n']} steady"
                + ("" if times is None else f", {args.cold_images * args.sentences} cold")
                + f" sentences) | {who} | {rates[who]:.3f} | {rates[who] / rates['authors']:.2f}× | {same:.0%} | {diff:.1e} {cold_cells}|"
            )


if __name__ == "__main__":
    main()
