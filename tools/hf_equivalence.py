"""Cross-runtime figures: the same random weights in OpenAI layout (open_clip runtime) and converted to a
transformers ``CLIPModel`` directory (HF runtime, ``tools/openai_to_hf.py``): max |Δ| of region embeddings,
text embeddings and logits per mode and setting.

    HF_HUB_OFFLINE=1 python tools/hf_equivalence.py [--device cpu]

The model: a random ViT with 12 blocks like ViT-B/16 (width 128, 6×6 patches of 16 px), OpenAI's QuickGELU,
attention logits enlarged ×3 so that the bias matters; 8 random boxes on a random 160×120 image.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch

import falip
from falip import FovealConfig, Unleash
from falip.runtimes.open_clip_loading import infer_openai_config

sys.path.insert(0, str(Path(__file__).parent))
from openai_to_hf import save_hf_clip  # noqa: E402

TEXTS = ["a photo of a cat", "the big red dog on the left, running!", "two mugs: one blue & one white"]
SETTINGS = {
    "official": FovealConfig.official(),
    "default": FovealConfig(),
    "alpha4 blocks 2-11": FovealConfig(alpha=4.0, layers=tuple(range(2, 12))),
    "rows=all blocks 9-11": FovealConfig(alpha=2.0, rows="all", layers=(9, 10, 11)),
    "head 0, unleash 10-11": FovealConfig(alpha=2.0, layers=(8, 9, 10, 11), heads=(0,), unleash=(Unleash(layers=(10, 11)),)),
}


def random_openai_clip() -> torch.nn.Module:
    torch.manual_seed(7)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(layers=12, width=128, head_width=64, patch_size=16, image_size=96),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=True,
    )
    with torch.no_grad():
        for blk in model.visual.transformer.resblocks:
            blk.attn.in_proj_weight.mul_(3.0)
    return model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, size=(16, 21, 3), dtype=np.uint8)
    from PIL import Image

    image = np.asarray(Image.fromarray(small).resize((160, 120), Image.BILINEAR))
    x0, y0 = rng.uniform(0, 120, 8), rng.uniform(0, 90, 8)
    boxes = np.stack([x0, y0, np.minimum(x0 + rng.uniform(8, 80, 8), 160), np.minimum(y0 + rng.uniform(8, 60, 8), 120)], 1)
    with tempfile.TemporaryDirectory() as tmp:
        clip = random_openai_clip()
        state = {k: v.contiguous() for k, v in clip.state_dict().items() if k != "attn_mask"}
        save_file(state, f"{tmp}/tiny.safetensors")
        save_hf_clip(state, infer_openai_config(state), Path(tmp) / "hf")
        oc = falip.load(f"{tmp}/tiny.safetensors", device=args.device, preprocess="squash")
        hf = falip.load(f"{tmp}/hf", device=args.device, preprocess="squash")
        text = (hf.encode_text(TEXTS) - oc.encode_text(TEXTS)).abs().max().item()
        print(f"text embeddings: max |Δ| {text:.2e}")
        print(f"{'setting':24s} {'mode':7s} {'regions max |Δ|':>16s} {'logits max |Δ|':>15s} {'bias effect':>12s}")
        for name, config in SETTINGS.items():
            for mode in falip.MODES:
                if mode == "approx" and config.rows != "cls":
                    continue
                a = hf.encode_regions(image, boxes, config=config, mode=mode)
                b = oc.encode_regions(image, boxes, config=config, mode=mode)
                la = hf.score_regions(image, boxes, TEXTS, config=config, mode=mode)
                lb = oc.score_regions(image, boxes, TEXTS, config=config, mode=mode)
                effect = (b - oc.encode_image(image)).abs().max().item()
                print(
                    f"{name:24s} {mode:7s} {(a - b).abs().max().item():16.2e} {(la - lb).abs().max().item():15.2e} {effect:12.3f}"
                )


if __name__ == "__main__":
    main()
