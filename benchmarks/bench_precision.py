"""fp16 / bf16 against fp32: how far the region embeddings move and how often the best box changes.

    python benchmarks/bench_precision.py                                  # CPU: falip-toy and a random ViT-B/16
    python benchmarks/bench_precision.py --device cuda --scenes 64
    python benchmarks/bench_precision.py --models falip-toy --precisions bf16 --scenes 4

For each model, the same weights are loaded in fp32 and in each precision (shipped weights, or the
same seeded random initialisation), and ``--scenes`` generated scenes (:func:`falip.synthetic.make_scene`,
4 objects each, every object's box a region, one referring expression per object as text) are encoded
with :meth:`FalipModel.encode_regions_batch` in each mode. Reported per (model, precision, mode):
max |Δ| of the L2-normalised region embeddings, min cosine to fp32, and how many texts' best box
(argmax over the scene's boxes) differs from fp32's. The fp32 row is a control (a second load: Δ = 0).
Prints a markdown table; ``--output FILE.json`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import torch

import falip
from falip.errors import ModelLoadError
from falip.synthetic import make_scene


def load(name: str, device: str, precision: str):
    torch.manual_seed(0)  # a random model gets the same weights in every precision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return falip.load(name, device=device, precision=precision, preprocess="squash")


def compare(name: str, precisions: list[str], modes: list[str], device: str, scenes) -> list[dict]:
    images = [s.image for s in scenes]
    boxes = [[o.box for o in s.objects] for s in scenes]
    texts = [[e[0] for e in s.expressions] for s in scenes]
    ref = load(name, device, "fp32")
    ref_text = [ref.encode_text(t) for t in texts]
    reference = {mode: ref.encode_regions_batch(images, boxes, mode=mode) for mode in modes}
    rows = []
    for precision in ["fp32", *precisions]:
        try:
            low = load(name, device, precision)
        except ModelLoadError as exc:
            print(f"{name} {precision}: {exc}")
            rows.append(dict(model=name, precision=precision, error=str(exc)))
            continue
        low_text = [low.encode_text(t) for t in texts]
        for mode in modes:
            got = low.encode_regions_batch(images, boxes, mode=mode)
            diff = max((a - b).abs().max().item() for a, b in zip(reference[mode], got))
            cosine = min((a * b).sum(-1).min().item() for a, b in zip(reference[mode], got))
            changed = sum(
                int(((a @ ta.T).argmax(0) != (b @ tb.T).argmax(0)).sum())
                for a, b, ta, tb in zip(reference[mode], got, ref_text, low_text)
            )
            total = sum(len(t) for t in texts)
            rows.append(
                dict(
                    model=name,
                    precision=precision,
                    mode=mode,
                    max_abs_diff=diff,
                    min_cosine=cosine,
                    best_box_changed=changed,
                    texts=total,
                )
            )
            print(
                f"{name} {precision} {mode}: max |Δ| {diff:.2e}, min cos {cosine:.6f}, best box changed {changed}/{total}",
                flush=True,
            )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | precision | mode | max abs Δ (normalised) | min cosine | best box changed |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | – | not supported: {r['error']} | | |")
        else:
            lines.append(
                f"| {r['model']} | {r['precision']} | {r['mode']} | {r['max_abs_diff']:.2e} | {r['min_cosine']:.6f} "
                f"| {r['best_box_changed']}/{r['texts']} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="falip-toy,ViT-B-16")
    p.add_argument("--precisions", default="fp16,bf16")
    p.add_argument("--modes", default="exact,approx")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, 4, size=256) for _ in range(args.scenes)]
    rows = []
    for name in args.models.split(","):
        rows += compare(name, args.precisions.split(","), args.modes.split(","), args.device, scenes)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\n{args.scenes} scenes × 4 boxes, {device}, torch {torch.__version__}\n")
    print(table(rows))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(args=vars(args), device=device, torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
