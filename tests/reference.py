"""Independent float64 implementations of what the FALIP reference code computes.

Written from docs/method.md §2.1 and §3 and the OpenAI CLIP ViT equations, sharing no code with falip, so that
falip's compatibility mode can be checked against them.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def spec_bump(h, w, alpha=0.2, sigma=100.0, eps=1e-6, numerics="float64"):
    """The (h, w) bump of docs/method.md §2.1, element by element: the float64 formula, or the reference's float32 steps.

    ``reference-numpy2``: docs/method.md §2.1, the reference's float rules (float32 normalisation).
    ``reference-numpy1``: the same, with ``max + ε − min`` a float64 scalar, as NumPy 1.x promotes it.
    """
    f32 = np.float32
    if numerics == "float64":
        G = np.zeros((h, w))
        for i in range(h):
            for j in range(w):
                G[i, j] = math.exp(-((i - (h - 1) / 2) ** 2 + (j - (w - 1) / 2) ** 2) / (2 * sigma**2))
        return alpha * (G - G.min() + eps) / (G.max() - G.min() + eps)
    G = np.zeros((h, w), dtype=np.float32)
    for i in range(h):
        for j in range(w):
            G[i, j] = math.exp(-0.5 * (math.sqrt((i - (h - 1) / 2) ** 2 + (j - (w - 1) / 2) ** 2) / sigma) ** 2)
    lo, hi = float(G.min()), float(G.max())
    den = f32(hi + eps - lo) if numerics == "reference-numpy1" else f32(f32(f32(hi) + f32(eps)) - f32(lo))
    R = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            num = f32(f32(G[i, j] - f32(lo)) + f32(eps))
            R[i, j] = f32(f32(num / den) * f32(alpha))
    return R


def spec_bias_row(box, W, H, S=224, p=16, alpha=0.2, sigma=100.0, eps=1e-6, numerics="float64"):
    """Row 0 of M (length 1 + g²) for one box, transcribed step by step from docs/method.md §3."""
    g = S // p
    x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    sx, sy = S / W, S / H  # the scale first, then x * scale (docs/method.md §3 step 2)
    X0, X1 = min(x0 * sx, S), min(x1 * sx, S)
    Y0, Y1 = min(y0 * sy, S), min(y1 * sy, S)
    c0 = max(math.ceil(X0 / p), 1) - 1
    c1 = max(math.ceil(X1 / p), 1)
    r0 = max(math.ceil(Y0 / p), 1) - 1
    r1 = max(math.ceil(Y1 / p), 1) - 1
    w, h = c1 - c0, r1 - r0 + 1
    R = spec_bump(h, w, alpha, sigma, eps, numerics).astype(np.float32)
    row = np.zeros(1 + g * g, dtype=np.float32)
    for r in range(r0, r1 + 1):
        for c in range(c0, c1):
            row[1 + g * r + c] = R[r - r0, c - c0]
    return row


def squash_pixels(image: Image.Image, S=224) -> torch.Tensor:
    """(1, 3, S, S) float64: PIL bicubic resize to S×S, /255, CLIP mean/std."""
    arr = np.asarray(image.convert("RGB").resize((S, S), Image.BICUBIC), dtype=np.float64) / 255.0
    arr = (arr - np.array(MEAN)) / np.array(STD)
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def vit_encode(state: dict, pixels: torch.Tensor, row0: np.ndarray, layers) -> torch.Tensor:
    """Normalised float64 image embedding of an OpenAI-layout ViT with M[0] = row0 in ``layers``."""
    sd = {k: v.double() for k, v in state.items()}
    conv = sd["visual.conv1.weight"]
    width, p = conv.shape[0], conv.shape[-1]
    heads = width // 64
    x = F.conv2d(pixels.double(), conv, stride=p).flatten(2).transpose(1, 2)  # (1, g², width)
    x = torch.cat([sd["visual.class_embedding"].view(1, 1, -1), x], dim=1) + sd["visual.positional_embedding"]

    def ln(t, name):
        return F.layer_norm(t, (width,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    x = ln(x, "visual.ln_pre")
    L = x.shape[1]
    M = torch.zeros(L, L, dtype=torch.float64)
    M[0] = torch.from_numpy(row0.astype(np.float64))
    n_layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(n_layers):
        pre = f"visual.transformer.resblocks.{i}."
        h = ln(x, pre + "ln_1")
        qkv = h @ sd[pre + "attn.in_proj_weight"].T + sd[pre + "attn.in_proj_bias"]
        q, k, v = (t.view(1, L, heads, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if i in layers:
            logits = logits + M
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, L, width)
        x = x + a @ sd[pre + "attn.out_proj.weight"].T + sd[pre + "attn.out_proj.bias"]
        h = ln(x, pre + "ln_2") @ sd[pre + "mlp.c_fc.weight"].T + sd[pre + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[pre + "mlp.c_proj.weight"].T + sd[pre + "mlp.c_proj.bias"]
    out = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    return F.normalize(out, dim=-1)[0]
