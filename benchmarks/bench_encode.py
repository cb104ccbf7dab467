"""Speed, memory and approximation error of the execution modes, measured in one run.

    python benchmarks/bench_encode.py                       # ViT-B/16, random weights, CPU fp32
    python benchmarks/bench_encode.py --device cuda --precision fp16 --parity
    python benchmarks/bench_encode.py --model ViT-B-16 --pretrained openai   # real weights

Prints a markdown table (regions/s, peak extra memory, speed-up vs naive in the same run) and
the deviation of ``approx`` from ``exact``; ``--output FILE.json`` keeps everything.
Timings are the minimum over ``--repeats`` runs; ratios compare modes measured back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
import warnings

import numpy as np
import torch

import falip


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms (CPU); CUDA uses the allocator."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self._rss())
            self.extra = self.peak - self.base


def random_scene(rng, k, w=640, h=480):
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    x0 = rng.uniform(0, 0.7 * w, k)
    y0 = rng.uniform(0, 0.7 * h, k)
    boxes = np.stack([x0, y0, x0 + rng.uniform(16, 0.3 * w, k), y0 + rng.uniform(16, 0.3 * h, k)], 1)
    return image, boxes


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_mode(model, image, boxes, mode, repeats, device):
    best = float("inf")
    with PeakRSS(device) as mem:
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            model.encode_regions(image, boxes, mode=mode)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return best, mem.extra


def speed_table(model, ks, modes, repeats, device, rng):
    rows = []
    for k in ks:
        image, boxes = random_scene(rng, k)
        model.encode_regions(image, boxes[:1], mode="exact")  # warm-up
        times = {}
        for mode in modes:
            seconds, extra = time_mode(model, image, boxes, mode, repeats, device)
            times[mode] = seconds
            rows.append(dict(k=k, mode=mode, seconds=seconds, regions_per_s=k / seconds, peak_extra_mb=extra / 2**20))
        for row in rows[-len(modes) :]:
            row["speedup_vs_naive"] = times["naive"] / row["seconds"] if "naive" in times else None
        print(
            f"K={k:3d}  " + "  ".join(f"{m}: {k / times[m]:7.1f} reg/s" for m in modes),
            flush=True,
        )
    return rows


def approx_deviation(model, n_images, k, rng):
    """max |exact − approx| of normalised embeddings, and how often the best box changes."""
    texts = ["a photo of a dog", "the red car on the left", "a person", "a small table", "the sky"]
    text = model.encode_text(texts).to(model.device)
    max_abs, changed, total = 0.0, 0, 0
    for _ in range(n_images):
        image, boxes = random_scene(rng, k)
        exact = model.encode_regions(image, boxes, mode="exact")
        approx = model.encode_regions(image, boxes, mode="approx")
        max_abs = max(max_abs, (exact - approx).abs().max().item())
        changed += int(((exact @ text.T).argmax(0) != (approx @ text.T).argmax(0)).sum())
        total += len(texts)
    return dict(max_abs_diff=max_abs, argmax_changed=changed, argmax_total=total, k=k, images=n_images)


def parity(args, rng):
    """Low precision vs fp32 on the same weights and inputs (GPU)."""
    ref = falip.load(args.model, pretrained=args.pretrained, device=args.device, precision="fp32", preprocess="squash")
    low = falip.load(args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, preprocess="squash")
    if args.pretrained is None:  # same random weights in both
        low.runtime.clip.load_state_dict(ref.runtime.clip.state_dict())
        from open_clip.model import convert_weights_to_lp

        convert_weights_to_lp(low.runtime.clip, falip.loading.PRECISIONS[args.precision])
    image, boxes = random_scene(rng, 10)
    out = {}
    for mode in ("naive", "exact", "approx"):
        a = ref.encode_regions(image, boxes, mode=mode)
        b = low.encode_regions(image, boxes, mode=mode)
        out[mode] = dict(max_abs_diff=(a - b).abs().max().item(), min_cosine=(a * b).sum(-1).min().item())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--ks", default="1,5,10,20,50")
    parser.add_argument("--modes", default="naive,exact,approx")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--deviation-images", type=int, default=20)
    parser.add_argument("--parity", action="store_true", help="also compare --precision against fp32")
    parser.add_argument("--output", default=None, help="write all figures as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = falip.load(
            args.model, pretrained=args.pretrained, device=args.device, precision=args.precision, preprocess="squash"
        )
    machine = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
    )
    print(f"# {args.model} ({args.pretrained or 'random weights'}), {args.device} {args.precision}, {machine}")
    ks = [int(k) for k in args.ks.split(",")]
    modes = args.modes.split(",")
    rows = speed_table(model, ks, modes, args.repeats, args.device, rng)
    print("\n| K | mode | regions/s | × naive | peak extra memory (MB) |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['speedup_vs_naive']:.2f}×" if r["speedup_vs_naive"] else "–"
        print(f"| {r['k']} | {r['mode']} | {r['regions_per_s']:.1f} | {ratio} | {r['peak_extra_mb']:.0f} |")
    deviation = approx_deviation(model, args.deviation_images, 10, rng)
    print(
        f"\napprox vs exact over {deviation['images']} images × 10 boxes: max |Δ| of normalised embeddings "
        f"{deviation['max_abs_diff']:.2e}; best box changed for {deviation['argmax_changed']}/{deviation['argmax_total']} texts"
    )
    result = dict(args=vars(args), machine=machine, speed=rows, approx_deviation=deviation)
    if args.parity:
        result["parity"] = parity(args, rng)
        print(f"\n{args.precision} vs fp32: {json.dumps(result['parity'])}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
