"""Write test fixtures produced by the FALIP authors' own code (github pumpkin805/FALIP).

    python tools/make_reference_fixtures.py /path/to/pumpkin805+FALIP [--out tests/data] [--parts bias,model,edits]

The script imports the authors' ``executor.py`` (``transform_box2token_base`` and
``Executor.tensorize_inputs``, which builds the FALIP attention mask and draws the baselines) and
their ``clip`` package from the checkout given on the command line; nothing of theirs is copied.
Modules their files import but these code paths never use (spacy, cv2, matplotlib, …) are replaced
by empty stand-ins when they are not installed, so the checkout imports on a CPU-only machine.

It writes, into ``--out``:

- ``reference_bias_numpy{1,2}.npz`` (``bias``): FALIP's row 0 of the 197×197 mask for ≥ 500 boxes —
  random, tiny (≤ 2 patches), exactly on patch borders under odd image sizes, partly outside —
  under the NumPy major version running the script (the bump's float32 arithmetic depends on it:
  run the script once with NumPy 1.x and once with NumPy ≥ 2 to refresh both files);
- ``reference_model.npz`` + ``reference_image_*.png`` (``model``): region embeddings (with their
  masks), text embeddings and per-box logits of a tiny random OpenAI-layout ViT-B/16-geometry
  checkpoint (generated from a seed by :func:`tiny_openai_state`, which the tests share), run through
  the authors' ``clip.load`` and ``ClipExecutor.call_model``;
- ``reference_edits.npz`` (``edits``): the images their ``blur``, ``crop``, ``circle`` (blurred
  background + red ellipse) and ``shade`` representations feed to the model, before preprocessing:
  shape and sha256 of each, and the pixels themselves for the smallest image.

The checkpoint's Linear/Conv/attention/projection weights are drawn already rounded to float16, so
``clip.load`` (which stores those in float16 and, on CPU, casts back to float32) and falip's loader
hold bit-identical float32 weights: the comparison is between the two forward passes, not between
two roundings of the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Geometry fixed by the reference code: 224-px input, 16-px patches, 14×14 grid, blocks >= 8 biased.
S, P, G = 224, 16, 14
SEED = 20240705
CAPTIONS = ("the red ball on the left", "A dog next to the TABLE", "sky")
# Image sizes (W, H) chosen so that many pixel coordinates land exactly on patch borders.
SIZES = [(86, 64), (375, 500), (200, 133), (333, 517), (517, 333), (640, 480), (427, 640), (612, 612), (224, 224),
         (448, 300), (113, 97), (97, 113), (1000, 750), (301, 199), (29, 41), (250, 175), (700, 350)]  # fmt: skip
MODEL_IMAGES = {"a": (86, 64), "b": (375, 250), "c": (200, 333)}
EDIT_METHODS = ("blur", "crop", "circle", "shade")
FULL_EDITS = "a"


# ----------------------------------------------------------------------------------------------
# The tiny checkpoint (shared with tests/test_parity.py, which imports this function)


def tiny_openai_state(seed: int = SEED) -> dict[str, torch.Tensor]:
    """A random OpenAI-layout CLIP ViT state dict: 224 px, patch 16, 12 blocks of width 128 (2 heads).

    Text tower: width 64 (1 head), 2 blocks, OpenAI's 49408-token vocabulary and 77-token context
    (its tokenizer needs them). Tensors that OpenAI's ``convert_weights`` stores in float16 hold
    float16-representable values. Deterministic: drawn with ``torch.Generator`` from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.02):
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def half(t):  # what a float16 parameter holds
        return t.half().float()

    width, layers, text_width, text_layers, embed = 128, 12, 64, 2, 32
    sd: dict[str, torch.Tensor] = {}
    sd["visual.conv1.weight"] = half(randn(width, 3, P, P, std=0.05))
    sd["visual.class_embedding"] = randn(width, std=width**-0.5)
    sd["visual.positional_embedding"] = randn(G * G + 1, width, std=width**-0.5)

    def block(prefix: str, w: int):
        sd[prefix + "ln_1.weight"] = 1 + randn(w, std=0.1)
        sd[prefix + "ln_1.bias"] = randn(w, std=0.1)
        sd[prefix + "attn.in_proj_weight"] = half(randn(3 * w, w, std=w**-0.5))
        sd[prefix + "attn.in_proj_bias"] = half(randn(3 * w, std=0.1))
        sd[prefix + "attn.out_proj.weight"] = half(randn(w, w, std=w**-0.5))
        sd[prefix + "attn.out_proj.bias"] = half(randn(w, std=0.02))
        sd[prefix + "ln_2.weight"] = 1 + randn(w, std=0.1)
        sd[prefix + "ln_2.bias"] = randn(w, std=0.1)
        sd[prefix + "mlp.c_fc.weight"] = half(randn(4 * w, w, std=w**-0.5))
        sd[prefix + "mlp.c_fc.bias"] = half(randn(4 * w, std=0.02))
        sd[prefix + "mlp.c_proj.weight"] = half(randn(w, 4 * w, std=(4 * w) ** -0.5))
        sd[prefix + "mlp.c_proj.bias"] = half(randn(w, std=0.02))

    sd["visual.ln_pre.weight"] = 1 + randn(width, std=0.1)
    sd["visual.ln_pre.bias"] = randn(width, std=0.1)
    for i in range(layers):
        block(f"visual.transformer.resblocks.{i}.", width)
    sd["visual.ln_post.weight"] = 1 + randn(width, std=0.1)
    sd["visual.ln_post.bias"] = randn(width, std=0.1)
    sd["visual.proj"] = half(randn(width, embed, std=width**-0.5))

    sd["token_embedding.weight"] = randn(49408, text_width, std=0.02)
    sd["positional_embedding"] = randn(77, text_width, std=0.01)
    for i in range(text_layers):
        block(f"transformer.resblocks.{i}.", text_width)
    sd["ln_final.weight"] = 1 + randn(text_width, std=0.1)
    sd["ln_final.bias"] = randn(text_width, std=0.1)
    sd["text_projection"] = half(randn(text_width, embed, std=text_width**-0.5))
    sd["logit_scale"] = torch.tensor(float(np.log(1 / 0.07)), dtype=torch.float32)
    return sd


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and float32 bytes of a state dict (checks generation is bit-identical)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to(torch.float32).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class _Holder(torch.nn.Module):
    def forward(self) -> int:
        return 0


def save_torchscript(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save ``state`` as a TorchScript archive whose ``state_dict()`` has exactly its keys, as OpenAI ships.

    The reference's ``clip.load`` tries ``torch.jit.load`` on the open file first; under current torch a
    ``torch.save``-d dict then fails to load from the moved file position, so it needs this form.
    """
    root = _Holder()
    for key, tensor in state.items():
        *path_names, leaf = key.split(".")
        module = root
        for name in path_names:
            if not hasattr(module, name):
                module.add_module(name, _Holder())
            module = getattr(module, name)
        module.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))


def make_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A smooth random RGB image (a 6×5 colour grid resized bicubically): compresses well as PNG."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, size=(5, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


# ----------------------------------------------------------------------------------------------
# Importing the authors' code


class _Stub(types.ModuleType):
    """An empty module standing in for a dependency the exercised code paths never call."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")


def _stub_missing(names: list[str]) -> list[str]:
    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # not installed, or broken against this NumPy: their paths here never call it
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules or not isinstance(sys.modules[sub], _Stub):
                    sys.modules[sub] = _Stub(sub)
            stubbed.append(name)
    return stubbed


def import_reference(checkout: Path):
    """``(executor, interpreter, clip)`` modules imported from the authors' checkout."""
    if not (checkout / "executor.py").is_file() or not (checkout / "clip" / "model.py").is_file():
        raise SystemExit(f"{checkout} does not look like a pumpkin805/FALIP checkout (no executor.py / clip/model.py)")
    stubbed = _stub_missing(
        ["matplotlib", "matplotlib.pyplot", "spacy", "cv2", "ruamel.yaml", "pycocotools", "pycocotools.mask", "transformers"]
    )
    if importlib.util.find_spec("pkg_resources") is None:  # their clip.py reads pkg_resources.packaging
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)  # type: ignore[assignment]
        stubbed.append("pkg_resources")
    for mod in ("clip", "executor", "interpreter"):
        sys.modules.pop(mod, None)
    sys.path.insert(0, str(checkout))
    executor = importlib.import_module("executor")
    interpreter = importlib.import_module("interpreter")
    clip = importlib.import_module("clip")
    if not str(Path(executor.__file__).resolve()).startswith(str(checkout.resolve())):
        raise SystemExit(f"imported executor from {executor.__file__}, not from {checkout}")
    print(f"imported the reference from {checkout} (stand-ins for: {', '.join(stubbed) or 'nothing'})")
    return executor, interpreter, clip


def reference_executor(executor_mod, method: str, preprocess):
    """A bare ``Executor`` (their base class) drawing ``method`` and preprocessing with ``preprocess``."""
    ex = executor_mod.Executor(device="cpu", box_representation_method=method, method_aggregator="sum", enlarge_boxes=0.0)
    ex.preprocesses = [preprocess]
    ex.model_names = ["tiny"]
    return ex


# ----------------------------------------------------------------------------------------------
# (a) bias rows


def bias_boxes(rng: np.random.Generator) -> list[tuple[int, int, float, float, float, float]]:
    """``(W, H, x, y, w, h)`` boxes (COCO xywh, as the reference's ``Box``): random, tiny, on borders, outside."""
    out = []
    for W, H in SIZES:
        px, py = P * W / S, P * H / S  # one patch in original pixels
        for _ in range(8):  # random
            x0, x1 = sorted(rng.uniform(0, W, 2))
            y0, y1 = sorted(rng.uniform(0, H, 2))
            out.append((W, H, x0, y0, max(x1 - x0, 0.5), max(y1 - y0, 0.5)))
        for _ in range(6):  # tiny: at most 2 patches wide/high
            w, h = rng.uniform(0.3, 2 * px), rng.uniform(0.3, 2 * py)
            out.append((W, H, rng.uniform(0, W - w), rng.uniform(0, H - h), w, h))
        for _ in range(10):  # edges exactly on patch borders, as floats and as the integers/halves users have
            k0, k1 = sorted(rng.choice(np.arange(0, G + 1), 2, replace=False))
            j0, j1 = sorted(rng.choice(np.arange(0, G + 1), 2, replace=False))
            x0, x1, y0, y1 = k0 * px, k1 * px, j0 * py, j1 * py
            if rng.random() < 0.5:
                x0, x1, y0, y1 = (round(v * 2) / 2 for v in (x0, x1, y0, y1))
            if x1 > x0 and y1 > y0:
                out.append((W, H, x0, y0, x1 - x0, y1 - y0))
        for _ in range(4):  # partly outside the image
            x0, y0 = rng.uniform(-0.3 * W, 0.8 * W), rng.uniform(-0.3 * H, 0.8 * H)
            w, h = rng.uniform(0.1 * W, 0.8 * W), rng.uniform(0.1 * H, 0.8 * H)
            if x0 + w > 0 and y0 + h > 0:
                out.append((W, H, x0, y0, w, h))
        out.append((W, H, 0.0, 0.0, float(W), float(H)))  # the whole image
        out.append((W, H, -5.0, -5.0, W + 10.0, H + 10.0))  # larger than the image
        # single pixels and integer boxes on the last row/column
        out.append((W, H, float(W - 1), float(H - 1), 1.0, 1.0))
        out.append((W, H, 0.0, 0.0, 1.0, 1.0))
    return out


def make_bias(executor_mod, interpreter_mod, out: Path) -> None:
    rng = np.random.default_rng(SEED)
    boxes = bias_boxes(rng)
    ex = reference_executor(executor_mod, "box", lambda image: torch.zeros(3))
    rows = np.zeros((len(boxes), 1 + G * G), dtype=np.float32)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (W, H, *_rest) in enumerate(boxes):
        by_size.setdefault((W, H), []).append(i)
    for (W, H), idx in by_size.items():
        image = Image.new("RGB", (W, H))
        ref_boxes = [interpreter_mod.Box(x=boxes[i][2], y=boxes[i][3], w=boxes[i][4], h=boxes[i][5]) for i in idx]
        tensors = ex.tensorize_inputs("", image, ref_boxes)[0]  # [(pixels, mask (197, 197))] per box
        for i, (_pixels, mask) in zip(idx, tensors):
            mask = mask.numpy()
            if np.any(mask[1:]):
                raise SystemExit("the reference mask has non-zero rows other than row 0; this script expects row 0 only")
            rows[i] = mask[0]
    major = int(np.__version__.split(".")[0])
    path = out / f"reference_bias_numpy{major}.npz"
    np.savez_compressed(
        path,
        boxes_xywh=np.array([b[2:] for b in boxes], dtype=np.float64),
        image_sizes=np.array([b[:2] for b in boxes], dtype=np.int64),
        rows=rows,
        numpy_version=np.array(np.__version__),
    )
    print(f"wrote {path}: {len(boxes)} boxes over {len(by_size)} image sizes, FALIP mask row 0 each (NumPy {np.__version__})")


# ----------------------------------------------------------------------------------------------
# (b) region and text embeddings of the tiny checkpoint


def model_boxes(W: int, H: int) -> list[tuple[float, float, float, float]]:
    """xywh boxes for one fixture image: tiny, on patch borders, partly outside, the whole image, ordinary."""
    px, py = P * W / S, P * H / S
    return [
        (0.0, 0.0, float(W), float(H)),
        (W * 0.1, H * 0.2, W * 0.5, H * 0.45),
        (3 * px, 2 * py, 4 * px, 5 * py),  # exactly on patch borders
        (W / 2, H / 2, 1.0, 1.0),  # a single pixel
        (W * 0.7, H * 0.6, px * 0.8, py * 1.5),  # tiny
        (-W * 0.2, H * 0.5, W * 0.5, H * 0.8),  # partly outside
        (10.5, 7.25, W * 0.33, H * 0.21),  # fractional
    ]


def make_model(executor_mod, interpreter_mod, clip_mod, out: Path) -> None:
    state = tiny_openai_state()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny.pt"
        save_torchscript(state, ckpt)
        model, preprocess = clip_mod.load(str(ckpt), device="cpu", jit=False)
    model.eval()
    if model.visual.conv1.weight.dtype != torch.float32:
        raise SystemExit(f"clip.load on CPU should cast to float32, got {model.visual.conv1.weight.dtype}")
    ex = executor_mod.ClipExecutor.__new__(executor_mod.ClipExecutor)  # their class, without clip.load by model name
    executor_mod.Executor.__init__(ex, device="cpu", box_representation_method="box", method_aggregator="sum", enlarge_boxes=0.0)
    # main.py's default (square_size=True): Resize((224, 224)) bicubic, no crop — the "squash" preprocessing
    from torchvision import transforms

    preprocess.transforms[0] = transforms.Resize((S, S), interpolation=transforms.InterpolationMode.BICUBIC)
    ex.preprocesses, ex.models, ex.model_names = [preprocess], [model], ["tiny"]

    arrays: dict[str, np.ndarray] = {}
    texts = [f"a photo of {c.lower()}" for c in CAPTIONS]
    with torch.no_grad():
        tokens = clip_mod.tokenize(texts)
        text = model.encode_text(tokens, mask=None)
        arrays["text_embeddings"] = (text / text.norm(dim=-1, keepdim=True)).numpy()
        arrays["text_tokens"] = tokens.numpy()
        for key, size in MODEL_IMAGES.items():
            image = make_image(size, seed=SEED + ord(key))
            image.save(out / f"reference_image_{key}.png")
            xywh = model_boxes(*size)
            boxes = [interpreter_mod.Box(x=x, y=y, w=w, h=h) for x, y, w, h in xywh]
            images = ex.tensorize_inputs("", image, boxes)[0]
            logits, _, region, _, _ = ex.call_model(model, images, tokens)
            arrays[f"{key}/boxes_xywh"] = np.array(xywh, dtype=np.float64)
            arrays[f"{key}/mask_rows"] = np.stack([m[0].numpy() for _, m in images])
            arrays[f"{key}/region_embeddings"] = region.numpy()
            arrays[f"{key}/logits"] = logits.numpy()  # (K boxes, T texts), their logit_scale · cosine
            arrays[f"{key}/pixels_digest"] = np.array(hashlib.sha256(images[0][0].numpy().tobytes()).hexdigest())
    arrays["captions"] = np.array(CAPTIONS)
    arrays["state_sha256"] = np.array(state_digest(state))
    arrays["seed"] = np.array(SEED)
    arrays["numpy_version"] = np.array(np.__version__)
    path = out / "reference_model.npz"
    np.savez_compressed(path, **arrays)
    n = sum(len(model_boxes(*s)) for s in MODEL_IMAGES.values())
    print(f"wrote {path}: {n} region embeddings over {len(MODEL_IMAGES)} images, {len(texts)} text embeddings, logits")
    print(f"wrote {', '.join(f'reference_image_{k}.png' for k in MODEL_IMAGES)}")


# ----------------------------------------------------------------------------------------------
# (c) the baselines' edited images


def make_edits(executor_mod, interpreter_mod, out: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    n = 0
    for key, size in MODEL_IMAGES.items():
        image = make_image(size, seed=SEED + ord(key))
        xywh = model_boxes(*size)
        boxes = [interpreter_mod.Box(x=x, y=y, w=w, h=h) for x, y, w, h in xywh]
        arrays[f"{key}/boxes_xywh"] = np.array(xywh, dtype=np.float64)
        for method in EDIT_METHODS:
            ex = reference_executor(executor_mod, method, lambda im: torch.from_numpy(np.asarray(im.convert("RGB")).copy()))
            edited = ex.tensorize_inputs("", image, boxes)[0]
            for k, pixels in enumerate(edited):
                pixels = np.ascontiguousarray(pixels.numpy(), dtype=np.uint8)
                arrays[f"{key}/{method}/{k}/shape"] = np.array(pixels.shape)
                arrays[f"{key}/{method}/{k}/sha256"] = np.array(hashlib.sha256(pixels.tobytes()).hexdigest())
                if key == FULL_EDITS:  # the pixels themselves only for the smallest image (file size)
                    arrays[f"{key}/{method}/{k}/pixels"] = pixels
                n += 1
    path = out / "reference_edits.npz"
    np.savez_compressed(path, **arrays)
    print(f"wrote {path}: {n} edited images ({', '.join(EDIT_METHODS)}) of {len(MODEL_IMAGES)} images")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of github.com/pumpkin805/FALIP")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data")
    parser.add_argument("--parts", default="bias,model,edits", help="comma-separated: bias, model, edits (default: all)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"bias", "model", "edits"}:
        parser.error(f"--parts takes bias, model, edits; got {args.parts!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    executor_mod, interpreter_mod, clip_mod = import_reference(args.checkout.resolve())
    if "bias" in parts:
        make_bias(executor_mod, interpreter_mod, args.out)
    if "model" in parts:
        make_model(executor_mod, interpreter_mod, clip_mod, args.out)
    if "edits" in parts:
        make_edits(executor_mod, interpreter_mod, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
