"""Train ``falip-toy``: a small open_clip-architecture CLIP on synthetic shape scenes (CPU, seeded).

    python tools/train_toy.py --steps 3000 --batch-size 64 --eval-every 500 --output src/falip/assets   # 20 min on 2 CPU cores

Model: ViT 64 px / patch 8 (8×8 grid), width 128, 6 blocks, 2 heads; text transformer width 64,
4 blocks, context 24, the real CLIP BPE tokenizer; embed dim 64; QuickGELU (OpenAI layout, so the
file loads through falip's OpenAI-checkpoint path). Data, generated on the fly from the seed:

- 35 %  single-object scenes (1 object, any size) — "a red circle", "the red circle", ...
- 25 %  tight crops around one object of a multi-object scene (what the ``crop`` baseline sees)
- 40 %  2–4 object scenes captioned "a red circle, a blue square and a green star" (random order)

Captions are wrapped in a random template ("{}", "a photo of {}", "a photo of a {}"...). Loss:
symmetric CLIP cross-entropy where every sample whose canonical caption is identical counts as a
positive (batches contain repeated captions). AdamW, warm-up then cosine decay.
Writes ``falip-toy.safetensors`` (fp16 weights) and ``falip-toy.json`` (architecture, recipe and
the command that ran it, training log) to ``--output``, then tunes the FALIP settings on the saved
weights (``tools/tune_toy.py``: the α × blocks sweep, printed) and writes them into the card
(``falip``, ``falip_tuning``) — the complete shipped artifact.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from falip.synthetic import article, make_scene, scene_caption

IMAGE_SIZE = 64
SCENE_SIZE = 128
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
ARCH = dict(
    embed_dim=64,
    vision_cfg=dict(image_size=IMAGE_SIZE, patch_size=8, width=128, layers=6, head_width=64),
    text_cfg=dict(context_length=24, vocab_size=49408, width=64, heads=1, layers=4),
)
TEMPLATES = ("{}", "{}", "a photo of {}", "the {}", "a picture of {}")


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """(B, 3, 64, 64) normalised: bicubic resize of square images (= falip's squash/crop on squares)."""
    arr = np.stack([np.asarray(im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def crop_around(scene, index: int, rng: np.random.Generator) -> Image.Image:
    """A square crop around object ``index`` with a random margin (what the crop baseline sees)."""
    x0, y0, x1, y1 = scene.objects[index].box
    side = max(x1 - x0, y1 - y0) * rng.uniform(1.0, 1.4)
    cx, cy = (x0 + x1) / 2 + rng.uniform(-0.1, 0.1) * side, (y0 + y1) / 2 + rng.uniform(-0.1, 0.1) * side
    return scene.image.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))


def sample(rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """(image, caption, canonical caption)."""
    u = rng.random()
    if u < 0.35:
        scene = make_scene(rng, 1, SCENE_SIZE)
        canonical = scene.objects[0].name
        image = scene.image
    elif u < 0.60:
        scene = make_scene(rng, int(rng.integers(2, 5)), SCENE_SIZE)
        i = int(rng.integers(len(scene.objects)))
        canonical = scene.objects[i].name
        image = crop_around(scene, i, rng)
    else:
        scene = make_scene(rng, int(rng.integers(2, 5)), SCENE_SIZE)
        canonical = scene_caption(scene)  # fixed order: identical scenes' captions compare equal
        return scene.image, scene_caption(scene, rng), " and ".join(sorted(o.name for o in scene.objects))
    phrase = rng.choice([canonical, f"{article(canonical)} {canonical}", f"the {canonical}"])
    return image, str(rng.choice(TEMPLATES)).format(phrase), canonical


def batch(rng: np.random.Generator, size: int, tokenizer):
    images, captions, canon = zip(*(sample(rng) for _ in range(size)))
    ids = {c: i for i, c in enumerate(dict.fromkeys(canon))}
    groups = torch.tensor([ids[c] for c in canon])
    return to_pixels(list(images)), tokenizer(list(captions)), groups


def clip_loss(image_emb, text_emb, logit_scale, groups):
    logits = logit_scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    target = (groups[:, None] == groups[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean()) / 2


@torch.no_grad()
def evaluate(model, tokenizer, seed: int, n: int = 300) -> dict:
    """Zero-shot accuracy on held-out single-object scenes over all colour×shape names."""
    from falip.synthetic import COLOURS, SHAPES

    model.eval()
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    text = F.normalize(model.encode_text(tokenizer([f"a photo of {article(n)} {n}" for n in names])), dim=-1)
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, 1, SCENE_SIZE) for _ in range(n)]
    image = F.normalize(model.encode_image(to_pixels([s.image for s in scenes])), dim=-1)
    pred = (image @ text.T).argmax(1)
    truth = torch.tensor([names.index(s.objects[0].name) for s in scenes])
    model.train()
    return {"single_object_top1": round(100 * (pred == truth).float().mean().item(), 2), "n": n, "classes": len(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="src/falip/assets")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = open_clip.SimpleTokenizer(context_length=ARCH["text_cfg"]["context_length"])
    model = open_clip.CLIP(**ARCH, quick_gelu=True)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup))),
    )
    log, start = [], time.time()
    for step in range(1, args.steps + 1):
        pixels, tokens, groups = batch(rng, args.batch_size, tokenizer)
        loss = clip_loss(model.encode_image(pixels), model.encode_text(tokens), model.logit_scale.exp(), groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  scale {model.logit_scale.exp().item():.1f}  {time.time() - start:6.0f}s",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            entry = {
                "step": step,
                "loss": round(loss.item(), 4),
                "seconds": round(time.time() - start, 1),
                **evaluate(model, tokenizer, seed=10_000),
            }
            log.append(entry)
            print(entry, flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    model.eval()
    save_file(
        {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, str(out / "falip-toy.safetensors")
    )
    meta = dict(
        name="falip-toy",
        architecture=ARCH,
        quick_gelu=True,
        tokenizer="CLIP BPE (open_clip SimpleTokenizer), context 24",
        preprocess="squash",
        scene_size=SCENE_SIZE,
        recipe=dict(
            vars(args),
            mixture="35% single objects, 25% object crops, 40% 2-4 object scenes",
            templates=TEMPLATES,
            command=" ".join(["python tools/train_toy.py", *sys.argv[1:]]),
        ),
        training_log=log,
        train_seconds=round(time.time() - start, 1),
        torch=torch.__version__,
    )
    (out / "falip-toy.json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {out / 'falip-toy.safetensors'} and {out / 'falip-toy.json'}")
    import falip
    from tune_toy import tune  # tools/tune_toy.py (this script's folder is on sys.path)

    tune(falip.load(str(out / "falip-toy.safetensors"), preprocess="squash"), out / "falip-toy.json")


if __name__ == "__main__":
    main()
