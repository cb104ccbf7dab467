#!/usr/bin/env bash
# The prepared accelerator check (docs/benchmarks.md, "On a GPU, one command"): one run, under 5 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                      # CUDA device 0, ViT-B/16 random weights, full size
#   bash benchmarks/gpu_check.sh --cpu                # reduced, on CPU (falip-toy; a few minutes on 2 cores)
#   bash benchmarks/gpu_check.sh --output out.json    # where the JSON goes (default gpu_check.json)
#
# Steps: (1) fp32 / fp16 / bf16 parity (benchmarks/bench_precision.py: max |Δ| of normalised region
# embeddings, best-box changes) on falip-toy and ViT-B/16; (2) regions/s of naive / exact / approx at
# K = 1 … 50 (benchmarks/bench_encode.py); (3) images/s of batched REC and classification end to end
# (`falip rec` / `falip classify` on a `falip synth` data set, fp16 on GPU). Prints one markdown
# report on stdout and writes every figure to one JSON file.
set -euo pipefail

device=cuda
output=gpu_check.json
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu) device=cpu; shift ;;
        --output) output="$2"; shift 2 ;;
        *) echo "gpu_check.sh: unknown option $1 (use --cpu, --output FILE)" >&2; exit 2 ;;
    esac
done

here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1

if [[ $device == cuda ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device (use --cpu)')"
    models=falip-toy,ViT-B-16; scenes=32; enc_model=ViT-B-16; ks=1,5,10,20,50; repeats=3; dev_images=20
    images=750; objects=8-10; size=320; precision=fp16; batch=64; workers=8  # ≈ 9 boxes per image (testA: ≈ 10)
else
    models=falip-toy; scenes=2; enc_model=falip-toy; ks=1,10; repeats=1; dev_images=2
    images=24; objects=3; size=256; precision=fp32; batch=8; workers=1
fi

echo "== 1/3 precision parity ($models)" >&2
python "$here/bench_precision.py" --device "$device" --models "$models" --scenes "$scenes" --output "$work/precision.json" >&2

echo "== 2/3 regions/s ($enc_model, K = $ks)" >&2
python "$here/bench_encode.py" --device "$device" --model "$enc_model" --ks "$ks" --repeats "$repeats" \
    --deviation-images "$dev_images" --output "$work/encode.json" >&2

echo "== 3/3 batched REC and classification ($enc_model $precision, $images synthetic images)" >&2
python -m falip synth --output "$work/synth" --images "$images" --objects "$objects" --size "$size" >&2
common=(--model "$enc_model" --device "$device" --precision "$precision" --batch-size "$batch" --workers "$workers")
start=$(date +%s.%N)
python -m falip rec --dataset synthetic --split val --data-root "$work/synth/refer" --image-root "$work/synth/images" \
    --method falip --quiet --output "$work/rec.json" "${common[@]}" >&2
rec_wall=$(python -c "import sys; print(round($(date +%s.%N) - $start, 2))")
start=$(date +%s.%N)
python -m falip classify --annotations "$work/synth/regions.jsonl" --image-root "$work/synth/images" \
    --classes "$work/synth/classes.txt" --templates simple --method falip --output "$work/classify.json" "${common[@]}" >&2
cls_wall=$(python -c "import sys; print(round($(date +%s.%N) - $start, 2))")

python - "$work" "$output" "$device" "$rec_wall" "$cls_wall" <<'EOF'
import json
import sys
from pathlib import Path

import torch

work, output, device, rec_wall, cls_wall = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
precision = json.loads((work / "precision.json").read_text())
encode = json.loads((work / "encode.json").read_text())
rec = json.loads((work / "rec.json").read_text())
cls = json.loads((work / "classify.json").read_text())
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print(f"# falip accelerator check — {name}, torch {torch.__version__}\n")
print("## Precision parity (vs fp32)\n")
print("| model | precision | mode | max abs Δ | min cosine | best box changed |\n|---|---|---|---:|---:|---:|")
for r in precision["rows"]:
    if "error" in r:
        print(f"| {r['model']} | {r['precision']} | – | not supported | | |")
    else:
        print(f"| {r['model']} | {r['precision']} | {r['mode']} | {r['max_abs_diff']:.2e} | {r['min_cosine']:.6f} | {r['best_box_changed']}/{r['texts']} |")
print(f"\n## Regions/s ({encode['args']['model']}, {encode['args']['precision']})\n")
print("| K | mode | regions/s | × naive | peak extra memory (MB) |\n|---:|---|---:|---:|---:|")
for r in encode["speed"]:
    ratio = f"{r['speedup_vs_naive']:.2f}×" if r["speedup_vs_naive"] else "–"
    print(f"| {r['k']} | {r['mode']} | {r['regions_per_s']:.1f} | {ratio} | {r['peak_extra_mb']:.0f} |")
print("\n## Batched tasks end to end\n")
print("| task | images | samples | images/s (model loop) | wall clock incl. model load (s) |\n|---|---:|---:|---:|---:|")
rm, cs = rec["metrics"], cls["speed"]
print(f"| REC (gold boxes) | {rec['run']['images_encoded']} | {rm['n']} expressions | {rm['images_per_s']:.1f} | {rec_wall:.1f} |")
print(f"| classification | {cs['images']} | {cs['regions']} regions | {cs['images_per_s']:.1f} | {cls_wall:.1f} |")
summary = dict(
    device=name,
    torch=torch.__version__,
    precision=precision,
    encode=encode,
    rec=dict(metrics=rm, run=rec["run"], wall_s=rec_wall),
    classify=dict(speed=cs, metrics=cls["metrics"], wall_s=cls_wall),
)
Path(output).write_text(json.dumps(summary, indent=2))
print(f"\nwrote {output}")
EOF
