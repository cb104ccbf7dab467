"""Cold start: ``falip.load`` against the library's own loader on the same weights file, in fresh processes.

    PYTHONPATH=src python benchmarks/bench_load.py                       # all three cases, min of 3
    PYTHONPATH=src python benchmarks/bench_load.py --cases vit-b-16 --repeats 5

Cases (random weights, written once to ``--weights-dir`` in the formats the libraries distribute):

- ``vit-b-16``: ``falip.load("ViT-B-16", pretrained=FILE)`` vs open_clip's
  ``create_model_and_transforms("ViT-B-16", pretrained=FILE)`` (FILE: ``open_clip_model.safetensors``);
- ``siglip2``: the same for ``ViT-B-16-SigLIP2`` (open_clip with a timm image tower);
- ``hf-clip``: ``falip.load(DIR)`` vs transformers' ``CLIPModel.from_pretrained(DIR)`` (DIR: a
  ``save_pretrained`` directory of the ViT-B-16 weights, written by ``tools/openai_to_hf.py``).

Each timing is the wall clock of a whole ``python -c`` process (interpreter start, imports, load), the
two loaders alternating; the ratio is min(falip) / min(library). The child processes inherit this
environment (``PYTHONPATH`` decides which falip is measured).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("vit-b-16", "siglip2", "hf-clip")
OPEN_CLIP_NAMES = {"vit-b-16": "ViT-B-16", "siglip2": "ViT-B-16-SigLIP2"}


def weights_for(case: str, directory: Path) -> Path:
    """The case's weights file (open_clip cases) or directory (hf-clip), written on first use."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    if case in OPEN_CLIP_NAMES:
        path = directory / OPEN_CLIP_NAMES[case] / "open_clip_model.safetensors"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            model = open_clip.create_model(OPEN_CLIP_NAMES[case])
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path
    out = directory / "hf-clip-vit-b-16"
    if not (out / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tools"))
        from safetensors.torch import load_file

        from falip.runtimes.open_clip_loading import infer_openai_config
        from openai_to_hf import save_hf_clip

        state = load_file(str(weights_for("vit-b-16", directory)))
        save_hf_clip(state, infer_openai_config(state), out, quick_gelu=False)
    return out


def commands(case: str, weights: Path) -> dict[str, str]:
    """The two ``python -c`` programs of a case: falip's load and the library's own."""
    if case == "hf-clip":
        return {
            "falip": f"import falip; falip.load({str(weights)!r})",
            "library": f"from transformers import CLIPModel; CLIPModel.from_pretrained({str(weights)!r})",
        }
    name = OPEN_CLIP_NAMES[case]
    return {
        "falip": f"import falip; falip.load({name!r}, pretrained={str(weights)!r})",
        "library": f"import open_clip; open_clip.create_model_and_transforms({name!r}, pretrained={str(weights)!r})",
    }


def cold_seconds(code: str) -> float:
    """Wall clock of one fresh ``python -c code`` process (it must exit 0)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"this failed ({done.returncode}):\n  python -c {code!r}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {CASES}")
    ap.add_argument("--repeats", type=int, default=3, help="cold processes per loader (min is kept)")
    ap.add_argument("--weights-dir", type=Path, default=Path("/tmp/falip-bench-load"))
    args = ap.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {CASES}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for case in cases:
        programs = commands(case, weights_for(case, args.weights_dir))
        times: dict[str, list[float]] = {k: [] for k in programs}
        for round_ in range(args.repeats):  # alternating, so load drifts on a shared machine hit both
            for who, code in programs.items():
                times[who].append(cold_seconds(code))
                print(f"{case} round {round_ + 1} {who:>7}: {times[who][-1]:.2f} s", flush=True)
        rows.append((case, min(times["falip"]), min(times["library"])))
    print(f"\ncold processes, min of {args.repeats} alternating; python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print("| case | falip.load | library's own | ratio |\n|---|---:|---:|---:|")
    for case, ours, theirs in rows:
        print(f"| {case} | {ours:.2f} s | {theirs:.2f} s | {ours / theirs:.2f}× |")


if __name__ == "__main__":
    main()
