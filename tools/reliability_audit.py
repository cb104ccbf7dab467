"""Fault-injection audit: bad inputs, crashes and concurrency, each classified by its outcome.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python tools/reliability_audit.py [--markdown]

Outcome classes: ``right`` (the right answer), ``warning`` (right or usable answer, and the user is
told), ``clear error`` (one sentence naming the input, exit code 2 on the CLI), ``vague error``
(an error that does not say which input or setting is wrong), ``silent`` (a wrong answer, nothing
said), ``data loss`` (outputs overwritten, mixed or left unparseable), ``traceback``, ``hang`` (the server
never closed a stalled connection within a generous bound).

Only the CLI and API that every falip version since the CLI move has are used, so the same script
measures a branch before and after a change (run it with another ``PYTHONPATH``). The pytest suite
``tests/test_reliability.py`` keeps the same cases from coming back.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

import falip
from falip.cli import main
from falip.errors import FalipError

CASES = []


def case(group: str, name: str):
    def register(fn):
        CASES.append((group, name, fn))
        return fn

    return register


# ----------------------------------------------------------------------------------------------
# Helpers


def cli(argv, must_name: str = "") -> str:
    """Run the CLI in-process: ``clear error`` (exit 2, one line naming ``must_name``), ``vague error``,
    ``traceback`` (an exception escaped), or ``ok``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    except Exception:
        return "traceback"
    if code == 0:
        return "ok"
    text = err.getvalue().strip()
    return "clear error" if code == 2 and len(text.splitlines()) == 1 and must_name in text else "vague error"


def api(fn, must_name: str = ""):
    """Call ``fn``: its result, or ``clear error`` / ``vague error`` (a falip or value error, naming
    ``must_name`` or not), or ``traceback`` (any other exception)."""
    try:
        return fn()
    except (FalipError, ValueError) as exc:
        return "clear error" if must_name in str(exc) else "vague error"
    except Exception:
        return "traceback"


def tiny_checkpoint(path: Path, seed: int = 0, nan: bool = False) -> Path:
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(layers=2, width=64, head_width=64, patch_size=16, image_size=64),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=True,
    )
    state = model.state_dict()
    if nan:
        state["visual.proj"][0, 0] = float("nan")
    torch.save(state, path)
    return path


def smooth_image(seed: int, w: int = 64, h: int = 48) -> Image.Image:
    small = np.random.default_rng(seed).integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def generic_data(root: Path, boxes=None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        smooth_image(i).save(root / "images" / f"{i}.png")
    boxes = boxes or [[4, 4, 40, 30], [20, 10, 60, 44], [0, 0, 32, 32]]
    rows = [{"image": f"images/{k % 2}.png", "label": ["cat", "dog"][k % 2], "box": b} for k, b in enumerate(boxes)]
    (root / "regions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "classes.txt").write_text("cat\ndog\n")
    return root


def classify_argv(root: Path, ckpt: Path, output: Path, *extra) -> list:
    return [
        "classify", "--annotations", root / "regions.jsonl", "--classes", root / "classes.txt", "--image-root", root,
        "--model", ckpt, "--templates", "simple", "--workers", "0", "--output", output, *extra,
    ]  # fmt: skip


def predictions(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.with_name(output.stem + ".predictions.jsonl").read_text().splitlines()]


def mixed_run(t: Path, change, must_name: str) -> str:
    """A classify run, ``change(...)`` to its inputs, and a resumed run: refused naming ``must_name``
    (clear error) or mixed (silent)."""
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    assert cli(classify_argv(root, ckpt, t / "r.json")) == "ok"
    argv = change(root, ckpt)
    out = cli(argv or classify_argv(root, ckpt, t / "r.json"), must_name=must_name)
    if out != "ok":
        return out
    return "silent" if json.loads((t / "r.json").read_text())["speed"]["resumed"] else "right"


def reclip_line(image_id, anns, sent_id=None, raw="the thing"):
    sentence = {"raw": raw} if sent_id is None else {"raw": raw, "sent_id": sent_id}
    return {
        "file_name": f"COCO_train2014_{image_id:012d}_1.jpg",
        "image_id": image_id,
        "anns": [{"id": i, "bbox": b} for i, b in enumerate(anns)],
        "ann_id": 0,
        "sentences": [sentence],
    }


# ----------------------------------------------------------------------------------------------
# Threads


@case("threads", "thread pool on one model: encode_regions (3 modes), encode_image, score_regions")
def _(t):
    model = falip.load(str(tiny_checkpoint(t / "m.pt")), config=falip.FovealConfig(layers=(1,)))
    transformer = model.runtime.visual.transformer
    images = [np.asarray(smooth_image(i, 64 + 8 * i, 48)) for i in range(3)]
    boxes = [[[0, 0, 30, 30]] * (i + 1) for i in range(3)]
    jobs = [(k, i, m) for i in range(3) for m in ("exact", "naive", "approx") for k in ("regions", "image", "score")]

    def call(job):
        kind, i, mode = job
        if kind == "regions":
            return model.encode_regions(images[i], boxes[i], mode=mode)
        if kind == "image":
            return model.encode_image(images[i])
        return model.score_regions(images[i], boxes[i], ["a", "b"], mode=mode)

    want = {job: call(job) for job in jobs}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, jobs * 4))
    ok = all(g.shape == want[j].shape and torch.allclose(g, want[j], atol=1e-5) for g, j in zip(got, jobs * 4))
    return "right" if ok and model.runtime.visual.transformer is transformer else "silent"


@case("threads", "score_regions returns tensors without autograd history")
def _(t):
    model = falip.load(str(tiny_checkpoint(t / "m.pt")))
    return "silent" if model.score_regions(np.asarray(smooth_image(0)), [[0, 0, 20, 20]], ["x"]).requires_grad else "right"


# ----------------------------------------------------------------------------------------------
# Resume


@case("resume", "another --image-root, same --output")
def _(t):
    def change(root, ckpt):
        other = t / "other"
        shutil.copytree(root, other)
        for i in range(2):
            smooth_image(10 + i).save(other / "images" / f"{i}.png")
        return classify_argv(root, ckpt, t / "r.json", "--image-root", other)

    return mixed_run(t, change, "image_root")


@case("resume", "annotation file edited (generic ids are line numbers)")
def _(t):
    return mixed_run(
        t, lambda root, ckpt: generic_data(root, [[1, 1, 20, 20], [5, 5, 60, 40], [10, 10, 50, 40]]) and None, "annotations"
    )


@case("resume", "checkpoint replaced at the same path")
def _(t):
    return mixed_run(t, lambda root, ckpt: tiny_checkpoint(ckpt, seed=1) and None, "weights")


@case("resume", "a changed setting (--alpha) is refused naming it")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    cli(classify_argv(root, ckpt, t / "r.json"))
    return cli(classify_argv(root, ckpt, t / "r.json", "--alpha", "0.5"), must_name="alpha")


@case("resume", "another --predictions with the same --output")
def _(t):
    ckpt = tiny_checkpoint(t / "m.pt")
    argv = [
        "rec",
        "--format",
        "reclip",
        "--annotations",
        t / "r.jsonl",
        "--image-root",
        t,
        "--model",
        ckpt,
        "--output",
        t / "o.json",
    ]
    smooth_image(0).save(t / "COCO_train2014_000000000001.jpg")
    (t / "r.jsonl").write_text(json.dumps(reclip_line(1, [[1, 1, 20, 20], [30, 10, 20, 20]])) + "\n")
    cli([*argv, "--predictions", t / "a.jsonl", "--quiet"])
    out = cli([*argv, "--predictions", t / "b.jsonl", "--quiet"], must_name="a.jsonl")
    return "data loss" if out == "ok" else out


@case("resume", "duplicate sentence ids in ReCLIP JSONL")
def _(t):
    lines = [reclip_line(1, [[0, 0, 9, 9]], sent_id=7, raw="a"), reclip_line(1, [[0, 0, 9, 9]], sent_id=7, raw="b")]
    (t / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    from falip.datasets.refer import load_reclip

    out = api(lambda: load_reclip(t / "r.jsonl"), must_name="r.jsonl:2")
    return "silent" if not isinstance(out, str) else out


@case("resume", "duplicate sentence ids in a refer pickle")
def _(t):
    from falip.datasets.refer import load_refer

    folder = t / "refer" / "ds"
    folder.mkdir(parents=True)
    refs = [{"ref_id": r, "ann_id": 5, "image_id": 1, "split": "val", "sentences": [{"raw": "a", "sent_id": 9}]} for r in (1, 2)]
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    (folder / "instances.json").write_text(
        json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 1, "bbox": [0, 0, 4, 4]}]})
    )
    out = api(lambda: load_refer(t / "refer", "ds", "val"), must_name="ref 1")
    return "silent" if not isinstance(out, str) else out


@case("resume", "duplicate ids in generic JSONL")
def _(t):
    from falip.datasets.generic import read_regions_jsonl

    (t / "g.jsonl").write_text('{"image": "a.png", "box": [0,0,4,4], "id": 3}\n{"image": "b.png", "box": [0,0,4,4], "id": 3}\n')
    out = api(lambda: read_regions_jsonl(t / "g.jsonl"), must_name="line 1")
    return "silent" if not isinstance(out, str) else out


# ----------------------------------------------------------------------------------------------
# Outputs


@case("outputs", "a line cut by a crash, then resume: the final JSONL parses")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    cli(classify_argv(root, ckpt, t / "r.json", "--limit", "2"))
    with open(t / "r.predictions.jsonl", "a") as f:
        f.write('{"id": "3", "label": "ca')
    cli(classify_argv(root, ckpt, t / "r.json"))
    try:
        ids = [r.get("id") for r in predictions(t / "r.json")]
    except json.JSONDecodeError:
        return "data loss"
    return "right" if ids == [None, "1", "2", "3"] else "data loss"


@case("outputs", "a second process writes the same --output")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    script = (
        "import sys, time; from falip.results import RunRecorder\n"
        "rec = RunRecorder(sys.argv[1], task='classify', config={})\n"
        "print('open', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(t / "r.json")], stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()
        out = cli(classify_argv(root, ckpt, t / "r.json"), must_name=str(child.pid))
    finally:
        child.kill()
        child.wait()
    return "data loss" if out == "ok" else out


@case("outputs", "--output names a folder")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    (t / "out").mkdir()
    return cli(classify_argv(root, ckpt, t / "out"), must_name=str(t / "out"))


@case("outputs", "--output under a regular file (unwritable path)")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    (t / "f").write_text("x")
    return cli(classify_argv(root, ckpt, t / "f" / "r.json"), must_name=str(t / "f"))


@case("outputs", "aggregate: a missing results file")
def _(t):
    return cli(["aggregate", t / "missing.json"], must_name="missing.json")


@case("outputs", "aggregate: a file that is not JSON")
def _(t):
    (t / "bad.json").write_text("{not json")
    return cli(["aggregate", t / "bad.json"], must_name="bad.json")


@case("outputs", "aggregate: --output names a folder")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    cli(classify_argv(root, ckpt, t / "r.json"))
    return cli(["aggregate", t / "r.json", "--output", t], must_name=str(t))


# ----------------------------------------------------------------------------------------------
# Images


def tagged_photo(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: a 64x48 bitmap displays as 48x64
    smooth_image(0).save(path, exif=exif.tobytes())
    return path


@case("images", "EXIF-rotated photo given by the user: boxes in the image as displayed")
def _(t):
    ckpt = tiny_checkpoint(t / "m.pt")
    out = cli(["score", tagged_photo(t / "p.jpg"), "--box", "0,50,40,64", "--text", "x", "--model", ckpt], must_name="EXIF")
    return "right" if out == "ok" else out


@case("images", "EXIF-rotated image in a dataset run: stored orientation, and a warning")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    tagged_photo(t / "data" / "images" / "0.jpg")
    rows = [{"image": "images/0.jpg", "label": "cat", "box": [40, 4, 60, 40]}]
    (root / "regions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cli(classify_argv(root, ckpt, t / "r.json"))
    if out != "ok":
        return out
    told = any("EXIF" in str(w.message) for w in caught)
    if predictions(t / "r.json")[1].get("skipped") is not None:
        return "silent"
    return "warning" if told else "right"


@case("images", "16-bit PNG")
def _(t):
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(t / "g.png")
    return "right" if falip.load_image(t / "g.png").getpixel((0, 0)) == (156, 156, 156) else "silent"


@case("images", "float TIFF in [0, 1]")
def _(t):
    Image.fromarray(np.full((8, 8), 0.25, np.float32)).save(t / "f.tif")
    return "right" if falip.load_image(t / "f.tif").getpixel((0, 0)) == (64, 64, 64) else "silent"


@case("images", "32-bit integer TIFF")
def _(t):
    Image.fromarray(np.full((8, 8), 2**30, np.int32)).save(t / "i.tif")
    return "right" if falip.load_image(t / "i.tif").getpixel((0, 0)) == (128, 128, 128) else "silent"


@case("images", "float TIFF outside [0, 1]")
def _(t):
    Image.fromarray(np.full((8, 8), 7.0, np.float32)).save(t / "f.tif")
    out = api(lambda: falip.load_image(t / "f.tif"), must_name="f.tif")
    return "silent" if not isinstance(out, str) else out


@case("images", "image over the decompression-bomb limit: single image")
def _(t):
    ckpt = tiny_checkpoint(t / "m.pt")
    smooth_image(0).save(t / "big.png")
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 1000
    try:
        return cli(["score", t / "big.png", "--box", "0,0,9,9", "--text", "x", "--model", ckpt], must_name="big.png")
    finally:
        Image.MAX_IMAGE_PIXELS = old


@case("images", "image over the decompression-bomb limit: dataset run skips it with a reason")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 1000
    try:
        out = cli(classify_argv(root, ckpt, t / "r.json"))
    finally:
        Image.MAX_IMAGE_PIXELS = old
    if out != "ok":
        return out
    return "right" if json.loads((t / "r.json").read_text())["skipped"]["count"] == 3 else "silent"


# ----------------------------------------------------------------------------------------------
# Models and devices


@case("models", "checkpoint with a wrong tensor shape")
def _(t):
    state = torch.load(tiny_checkpoint(t / "m.pt"), weights_only=True)
    state["visual.ln_pre.bias"] = torch.zeros(3)
    torch.save(state, t / "m.pt")
    return cli(["info", "--model", t / "m.pt"], must_name="m.pt")


@case("models", "empty --pretrained file")
def _(t):
    (t / "e.bin").write_bytes(b"")
    return cli(["info", "--model", "ViT-B-32", "--pretrained", t / "e.bin"], must_name="e.bin")


@case("models", "checkpoint with NaN weights")
def _(t):
    ckpt = tiny_checkpoint(t / "nan.pt", nan=True)
    out = cli(["score", *_photo(t), "--box", "0,0,9,9", "--text", "x", "--model", ckpt], must_name="nan.pt")
    return "silent" if out == "ok" else out


def _photo(t: Path) -> list:
    smooth_image(0).save(t / "p.png")
    return [t / "p.png"]


@case("models", "--device cuda on a machine without a GPU")
def _(t):
    if torch.cuda.is_available():
        return "right"
    return cli(["info", "--model", "falip-toy", "--device", "cuda"], must_name="cuda")


@case("models", "--device cpuu")
def _(t):
    return cli(["info", "--model", "falip-toy", "--device", "cpuu"], must_name="cpuu")


# ----------------------------------------------------------------------------------------------
# Formats


@case("formats", "generic JSONL boxes written as xywh")
def _(t):
    root, ckpt = (
        generic_data(t / "data", [[10 + i, 20, 30, 15] for i in range(5)] + [[1, 1, 50, 40]]),
        tiny_checkpoint(t / "m.pt"),
    )
    out = cli(classify_argv(root, ckpt, t / "r.json"), must_name="x, y, w, h")
    return "silent" if out == "ok" else out


@case("formats", "ReCLIP anns written as xyxy (many clamped boxes)")
def _(t):
    smooth_image(0).save(t / "COCO_train2014_000000000001.jpg")
    line = reclip_line(1, [[10, 10, 50, 40], [30, 5, 60, 30], [2, 20, 40, 45]])
    (t / "r.jsonl").write_text(json.dumps(line) + "\n")
    ckpt = tiny_checkpoint(t / "m.pt")
    argv = ["rec", "--format", "reclip", "--annotations", t / "r.jsonl", "--image-root", t, "--model", ckpt, "--quiet"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cli([*argv, "--output", t / "o.json"])
    return out if out != "ok" else ("warning" if any("clamped" in str(w.message) for w in caught) else "silent")


@case("formats", "detections written as xyxy")
def _(t):
    from falip.datasets.refer import load_detections

    rng = np.random.default_rng(0)
    x0, y0 = rng.uniform(0, 100, 20), rng.uniform(0, 100, 20)
    boxes = np.stack([x0, y0, x0 + rng.uniform(5, 50, 20), y0 + rng.uniform(5, 50, 20)], 1)
    (t / "d.json").write_text(json.dumps({"1": boxes.tolist()}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = api(lambda: load_detections(t / "d.json"), must_name="d.json")
    return out if isinstance(out, str) else ("warning" if caught else "silent")


@case("formats", "0/1 PNG mask")
def _(t):
    m = np.zeros((48, 64), np.uint8)
    m[8:20, 10:30] = 1
    Image.fromarray(m).save(t / "m.png")
    out = cli(["score", *_photo(t), "--mask", t / "m.png", "--text", "x", "--model", tiny_checkpoint(t / "c.pt")], "m.png")
    return "right" if out == "ok" else out


@case("formats", "RGBA mask (region in the alpha channel)")
def _(t):
    from falip.datasets.generic import read_mask

    rgba = np.full((48, 64, 4), 255, np.uint8)
    rgba[..., 3] = 0
    rgba[8:20, 10:30, 3] = 255
    Image.fromarray(rgba).save(t / "a.png")
    out = api(lambda: read_mask(t / "a.png"), must_name="a.png")
    return out if isinstance(out, str) else ("right" if out.sum() == 240 else "silent")


# ----------------------------------------------------------------------------------------------
# Round 3, R3-A: run outputs, fingerprints by content, locks, lost inputs, batch isolation (tasks layer).
# (cases of this family go below this line, above the next section)


def cli_run(argv, must_name: str = "") -> tuple[str, str]:
    """The CLI in-process, judged on its last stderr line (progress bars and ``falip: warning:`` lines may
    come first): ``(outcome, stderr)`` with outcome ``ok``, ``clear error`` (exit 2, the error line names
    ``must_name``), ``vague error`` or ``traceback``."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    except Exception:
        return "traceback", err.getvalue()
    lines = err.getvalue().strip().splitlines()
    if code == 0:
        return "ok", err.getvalue()
    last = lines[-1] if lines else ""
    good = code == 2 and last.startswith("falip: error:") and must_name in last
    return ("clear error" if good else "vague error"), err.getvalue()


def kept(path: Path, before: bytes, outcome: str) -> str:
    """``data loss`` when ``path`` no longer holds ``before``, else ``outcome``."""
    return outcome if path.is_file() and path.read_bytes() == before else "data loss"


def pc_data(root: Path, clouds) -> Path:
    import h5py

    folder = root / "modelnet40_ply_hdf5_2048"
    folder.mkdir(parents=True)
    (folder / "shape_names.txt").write_text("airplane\nbathtub\nflower_pot\n")
    with h5py.File(folder / "ply_data_test0.h5", "w") as f:
        f.create_dataset("data", data=np.asarray(clouds, dtype=np.float32))
        f.create_dataset("label", data=(np.arange(len(clouds)) % 3).reshape(-1, 1).astype(np.uint8))
    (folder / "test_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_test0.h5\n")
    return root


def pc_argv(root: Path, ckpt: Path, output: Path, *extra) -> list:
    return ["pointcloud", "--dataset", "modelnet40", "--data-root", root, "--model", ckpt, "--workers", "0", "--output", output,
            *extra]  # fmt: skip


def rec_setup(t: Path, anns=((2, 2, 30, 30), (30, 10, 30, 30)), images=2) -> list:
    for i in range(1, images + 1):
        smooth_image(i).save(t / f"COCO_train2014_{i:012d}.jpg")
    lines = [reclip_line(i, [list(b) for b in anns], raw=f"thing {i}") for i in range(1, images + 1)]
    (t / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return ["rec", "--format", "reclip", "--annotations", t / "r.jsonl", "--image-root", t, "--model", tiny_checkpoint(t / "m.pt"),
            "--quiet", "--workers", "0"]  # fmt: skip


@case("r3-runs", "classify: a {class: [prompts]} templates JSON edited in place, then resumed")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    prompts = t / "p.json"
    prompts.write_text(json.dumps({"cat": ["a photo of a cat."], "dog": ["a photo of a dog."]}))
    argv = classify_argv(root, ckpt, t / "r.json", "--templates", prompts)
    assert cli_run(argv)[0] == "ok"
    prompts.write_text(json.dumps({"cat": ["a sketch of a cat."], "dog": ["a photo of a dog."]}))
    out, _ = cli_run(argv, must_name="prompts")
    if out != "ok":
        return out
    return "silent" if json.loads((t / "r.json").read_text())["speed"]["resumed"] else "right"


@case("r3-runs", "classify library: a native dataset's box changed under the same sample id, resumed")
def _(t):
    from falip.datasets.generic import RegionDataset, RegionSample
    from falip.tasks.classify import evaluate

    root = generic_data(t / "data")
    model = falip.load(str(tiny_checkpoint(t / "m.pt")))

    def run(box):
        samples = [RegionSample("0", root / "images" / "0.png", "cat", box=box)]
        return evaluate(model, RegionDataset("native", "test", ["cat", "dog"], samples), t / "r.json", templates="simple",
                        workers=0, progress=False)  # fmt: skip

    run((4, 4, 40, 30))
    again = run((20, 10, 60, 44))  # e.g. CUB's bounding_boxes.txt edited
    return "right" if again["speed"]["regions"] == 1 else "silent"


@case("r3-runs", "pointcloud: --view-weights changed, same --output")
def _(t):
    root, ckpt = pc_data(t / "data", np.random.default_rng(0).normal(size=(3, 64, 3))), tiny_checkpoint(t / "m.pt")
    assert cli_run(pc_argv(root, ckpt, t / "r.json"))[0] == "ok"
    out, _ = cli_run(pc_argv(root, ckpt, t / "r.json", "--view-weights", "1,1,1,1,3,3"), must_name="view_weights")
    return "silent" if out == "ok" else out


@case("r3-runs", "rec library: run_config {'note': ...} and another mode, same output")
def _(t):
    from falip.datasets.refer import load_reclip
    from falip.tasks.rec import RegionScorer, evaluate

    rec_setup(t)
    model = falip.load(str(t / "m.pt"))
    data = load_reclip(t / "r.jsonl")

    def run(mode):
        scorer = RegionScorer([model], "falip", mode=mode)
        return evaluate(scorer, data, t, t / "o.json", run_config={"note": "mine"}, progress=False, workers=0)

    run("exact")
    out = api(lambda: run("approx"), must_name="mode")
    return "silent" if isinstance(out, dict) else out


@case("r3-runs", "classify --output names the templates file")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    templates = t / "t.txt"
    templates.write_text("a photo of a {}.\n")
    before = templates.read_bytes()
    out, _ = cli_run(classify_argv(root, ckpt, templates, "--templates", templates, "--no-resume"), must_name=str(templates))
    return kept(templates, before, out)


@case("r3-runs", "classify --output names the model checkpoint")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    before = ckpt.read_bytes()
    out, _ = cli_run(classify_argv(root, ckpt, ckpt), must_name=str(ckpt))
    return kept(ckpt, before, out)


@case("r3-runs", "rec --predictions names the detections file, with --no-resume")
def _(t):
    argv = rec_setup(t)
    (t / "d.json").write_text(json.dumps({"1": [[2, 2, 30, 30]], "2": [[30, 10, 30, 30]]}))
    before = (t / "d.json").read_bytes()
    out, err = cli_run([*argv, "--detections", t / "d.json", "--output", t / "o.json", "--predictions", t / "d.json", "--no-resume"],
                       must_name="d.json")  # fmt: skip
    return kept(t / "d.json", before, out)


@case("r3-runs", "pointcloud --output names an HDF5 file of the data")
def _(t):
    root, ckpt = pc_data(t / "data", np.random.default_rng(0).normal(size=(3, 64, 3))), tiny_checkpoint(t / "m.pt")
    h5 = root / "modelnet40_ply_hdf5_2048" / "ply_data_test0.h5"
    before = h5.read_bytes()
    out, _ = cli_run(pc_argv(root, ckpt, h5, "--no-resume"), must_name=str(h5))
    return kept(h5, before, out)


@case("r3-runs", "--output is a JSON file falip did not write")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    (t / "notes.json").write_text('{"my": "notes"}')
    before = (t / "notes.json").read_bytes()
    out, _ = cli_run(classify_argv(root, ckpt, t / "notes.json", "--no-resume"), must_name="notes.json")
    return kept(t / "notes.json", before, out)


@case("r3-runs", "rec: one --output, another --predictions, with --no-resume")
def _(t):
    argv = rec_setup(t)
    assert cli_run([*argv, "--output", t / "o.json", "--predictions", t / "a.jsonl"])[0] == "ok"
    before = (t / "o.json").read_bytes()
    out, _ = cli_run([*argv, "--output", t / "o.json", "--predictions", t / "b.jsonl", "--no-resume"], must_name="a.jsonl")
    return kept(t / "o.json", before, out)


@case("r3-runs", "a lock left by a dead PID of another PID namespace")
def _(t):
    import socket

    from falip.results import OutputInUseError, RunRecorder, predictions_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = Path(str(predictions_path(t / "r.json")) + ".lock")
    boot = Path("/proc/sys/kernel/random/boot_id")
    here = {"host": socket.gethostname(), "boot_id": boot.read_text().strip() if boot.is_file() else None}
    lock.write_text(json.dumps({**here, "pid": dead.pid, "pid_ns": "pid:[4026531999]"}))  # this host, another namespace
    try:
        RunRecorder(t / "r.json", task="t", config={}).finish({})
    except OutputInUseError as exc:
        return "clear error" if str(lock) in str(exc) and "delete" in str(exc) else "vague error"
    return "data loss"  # taken over: two writers in two namespaces would interleave


@case("r3-runs", "the file-size limit (EFBIG) is reached while a run writes")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (900, 900))\n"
    body = "import sys\nfrom falip.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [str(a) for a in classify_argv(root, ckpt, t / "r.json")]
    child = subprocess.run([sys.executable, "-c", limit + body, *argv], capture_output=True, text=True, env=env, timeout=600)
    if "Traceback" in child.stderr:
        return "traceback"
    last = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""
    named = str(t / "r.json") in last or "r.predictions.jsonl" in last
    if child.returncode == 0:  # every file fit under the limit: right if the results are complete
        try:
            return "right" if json.loads((t / "r.json").read_text())["metrics"]["n"] == 3 else "silent"
        except (OSError, ValueError, KeyError):
            return "silent"
    return "clear error" if child.returncode == 2 and named else "vague error"


@case("r3-runs", "rec: every detection has zero or negative size")
def _(t):
    argv = rec_setup(t)
    (t / "d.json").write_text(json.dumps({"1": [[5, 5, 0, 9]], "2": [[5, 5, -4, 9]]}))
    out, _ = cli_run([*argv, "--detections", t / "d.json", "--output", t / "o.json"], must_name="--allow-lost-inputs")
    return "silent" if out == "ok" else out


def every_item_lost(argv: list, output: Path, metric: str) -> str:
    """A run that lost every item: refused naming --allow-lost-inputs, then (asked) null metrics — ``right``;
    ``silent`` when a number (e.g. 0.00 %) is reported for no item."""
    out, _ = cli_run(argv, must_name="--allow-lost-inputs")
    if out == "clear error":
        out, _ = cli_run([*argv, "--allow-lost-inputs"])
    if out != "ok":
        return out
    metrics = json.loads(output.read_text())["metrics"]
    return "right" if metrics[metric] is None and metrics["n"] == 0 else "silent"


@case("r3-runs", "classify with every image missing: metrics")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    shutil.rmtree(root / "images")
    return every_item_lost(classify_argv(root, ckpt, t / "r.json"), t / "r.json", "top1")


@case("r3-runs", "pointcloud with every cloud unreadable (NaN points): metrics")
def _(t):
    clouds = np.random.default_rng(2).normal(size=(3, 64, 3))
    clouds[:, 0] = np.nan
    root, ckpt = pc_data(t / "data", clouds), tiny_checkpoint(t / "m.pt")
    return every_item_lost(pc_argv(root, ckpt, t / "r.json"), t / "r.json", "acc")


@case("r3-runs", "pointcloud: a cloud at 1e30 in a batch of 4 vs one cloud at a time")
def _(t):
    clouds = np.random.default_rng(1).normal(size=(4, 64, 3))
    clouds[2] *= 1e30
    root, ckpt = pc_data(t / "data", clouds), tiny_checkpoint(t / "m.pt")
    runs = []
    for batch in ("4", "1"):
        out, _ = cli_run(pc_argv(root, ckpt, t / f"b{batch}.json", "--batch-size", batch))
        if out != "ok":
            return out
        runs.append(json.loads((t / f"b{batch}.json").read_text())["metrics"])
    return "right" if runs[0] == runs[1] and runs[0]["skipped"] == 1 else "silent"


# ----------------------------------------------------------------------------------------------
# Round 3, R3-B: damaged and odd input files: images, masks, annotation formats, texts, resource bounds (readers).
# (cases of this family go below this line, above the next section)


def refused(fn, must_name: str) -> str:
    """:func:`api` for a call that must refuse its input: an accepted input is ``silent``."""
    out = api(fn, must_name)
    return out if isinstance(out, str) else "silent"


def _jpeg(t: Path, name: str = "p.jpg") -> bytes:
    smooth_image(3, 96, 64).save(t / name, quality=90)
    return (t / name).read_bytes()


@case("r3-inputs", "score a JPEG cut to 60 % of its bytes")
def _(t):
    data = _jpeg(t)
    (t / "cut.jpg").write_bytes(data[: len(data) * 3 // 5])
    out = cli(["score", t / "cut.jpg", "--box", "0,0,30,30", "--text", "x", "--model", tiny_checkpoint(t / "m.pt")], "cut.jpg")
    return "silent" if out == "ok" else out


@case("r3-inputs", "classify with one PNG whose pixel data has 4 bytes zeroed")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    data = bytearray((root / "images" / "1.png").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\0\0\0\0"
    (root / "images" / "1.png").write_bytes(bytes(data))
    out = cli(classify_argv(root, ckpt, t / "r.json", "--allow-lost-inputs"))
    if out != "ok":
        return out
    skipped = json.loads((t / "r.json").read_text())["skipped"]
    return "warning" if skipped.get("by_reason", {}).get("unreadable file") == 1 else "silent"


@case("r3-inputs", "load_image on the bytes of a GIF cut in half")
def _(t):
    buf = io.BytesIO()
    smooth_image(1, 80, 60).save(buf, "GIF")
    out = api(lambda: falip.load_image(buf.getvalue()[: len(buf.getvalue()) // 2], name="half.gif"), "half.gif")
    return "silent" if not isinstance(out, str) else out


@case("r3-inputs", "refer instances.json annotation without 'bbox'")
def _(t):
    folder = t / "refer" / "refcoco"
    folder.mkdir(parents=True)
    ref = dict(ref_id=1, ann_id=5, image_id=1, split="val", sentences=[{"raw": "the cat"}])
    (folder / "refs(unc).p").write_bytes(pickle.dumps([ref]))
    (folder / "instances.json").write_text(json.dumps({"images": [], "annotations": [{"id": 5, "image_id": 1}]}))
    from falip.datasets.refer import load_refer

    return refused(lambda: load_refer(t / "refer", "refcoco", "val"), "'bbox' is missing")


@case("r3-inputs", "ReCLIP line whose 'sentences' is an object")
def _(t):
    line = {**reclip_line(1, [[0, 0, 9, 9]]), "sentences": {"raw": "the cat"}}
    (t / "r.jsonl").write_text(json.dumps(line) + "\n")
    from falip.datasets.refer import load_reclip

    return refused(lambda: load_reclip(t / "r.jsonl"), "r.jsonl:1: 'sentences' must be a list")


@case("r3-inputs", "generic JSONL box written as the string '0,0,9,9'")
def _(t):
    (t / "g.jsonl").write_text(json.dumps({"image": "a.png", "box": "0,0,9,9"}) + "\n")
    from falip.datasets.generic import read_regions_jsonl

    return refused(lambda: read_regions_jsonl(t / "g.jsonl"), "g.jsonl:1: 'box' must be")


@case("r3-inputs", "generic JSONL label that is a list")
def _(t):
    (t / "g.jsonl").write_text(json.dumps({"image": "a.png", "box": [0, 0, 9, 9], "label": ["cat"]}) + "\n")
    from falip.datasets.generic import read_regions_jsonl

    return refused(lambda: read_regions_jsonl(t / "g.jsonl"), "g.jsonl:1: 'label'")


@case("r3-inputs", "detections file with a 3-number box and one with a string coordinate")
def _(t):
    from falip.datasets.refer import load_detections

    outs = []
    for boxes in ([[1, 2, 3]], [[1, 2, "3", 4]]):
        (t / "d.json").write_text(json.dumps({"7": boxes}))
        outs.append(api(lambda: load_detections(t / "d.json"), "image 7 box 0"))
    return next((o for o in outs if o != "clear error"), "clear error") if all(isinstance(o, str) for o in outs) else "silent"


@case("r3-inputs", "score --mask naming a folder")
def _(t):
    (t / "maskdir").mkdir()
    out = cli(["score", *_photo(t), "--mask", t / "maskdir", "--text", "x", "--model", tiny_checkpoint(t / "m.pt")], "a folder")
    return out


@case("r3-inputs", "classify --annotations through a broken symlink")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    os.symlink(t / "gone.jsonl", t / "link.jsonl")
    argv = classify_argv(root, ckpt, t / "r.json")
    argv[argv.index(root / "regions.jsonl")] = t / "link.jsonl"
    return cli(argv, "broken symlink")


@case("r3-inputs", "16-bit mask with values 0 and 1000 (all under its rule)")
def _(t):
    m = np.zeros((48, 64), np.uint16)
    m[5:20, 5:30] = 1000
    Image.fromarray(m).save(t / "m16.png")
    out = cli(["score", *_photo(t), "--mask", t / "m16.png", "--text", "x", "--model", tiny_checkpoint(t / "m.pt")], "> 32767")
    return "silent" if out == "ok" else out


@case("r3-inputs", "palette mask with classes 2 and 3 in dark palette colours")
def _(t):
    from falip.datasets.generic import read_mask

    index = np.zeros((48, 64), np.uint8)
    index[4:10, 4:14], index[20:30, 30:40] = 2, 3
    img = Image.fromarray(index, "P")
    img.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 252)
    img.save(t / "voc.png")
    out = api(lambda: read_mask(t / "voc.png"), "voc.png")
    return out if isinstance(out, str) else ("right" if out.sum() == 160 else "silent")


@case("r3-inputs", "classes file saved as UTF-16")
def _(t):
    root, ckpt = generic_data(t / "data"), tiny_checkpoint(t / "m.pt")
    (root / "classes.txt").write_bytes("cat\ndog\n".encode("utf-16"))
    return cli(classify_argv(root, ckpt, t / "r.json"), "classes.txt:1: not UTF-8")


@case("r3-inputs", "a templates file and a classes file starting with a byte-order mark")
def _(t):
    from falip.datasets.generic import read_classes
    from falip.zeroshot import load_templates

    (t / "t.txt").write_bytes("\ufeffa photo of a {}.\n".encode())
    (t / "c.txt").write_bytes("\ufeffcat\ndog\n".encode())
    got = api(lambda: (load_templates(str(t / "t.txt")), read_classes(t / "c.txt")), "t.txt")
    if isinstance(got, str):
        return got
    return "right" if got == (["a photo of a {}."], ["cat", "dog"]) else "silent"


@case("r3-inputs", "rec with a 120-word expression")
def _(t):
    smooth_image(0).save(t / "COCO_train2014_000000000001.jpg")
    line = reclip_line(1, [[2, 2, 20, 20], [30, 10, 20, 20]], raw=" ".join(["red"] * 120))
    (t / "r.jsonl").write_text(json.dumps(line) + "\n")
    argv = ["rec", "--format", "reclip", "--annotations", t / "r.jsonl", "--image-root", t, "--quiet"]
    err = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("default")
        code = main([str(a) for a in [*argv, "--model", tiny_checkpoint(t / "m.pt"), "--output", t / "o.json"]])
    if code != 0:
        return "vague error"
    counted = json.loads((t / "o.json").read_text())["run"].get("expressions_truncated") == 1
    return "warning" if counted and "text context of 77 tokens" in err.getvalue() else "silent"


@case("r3-inputs", "rec with an empty 'raw' beside a real expression")
def _(t):
    smooth_image(0).save(t / "COCO_train2014_000000000001.jpg")
    line = {**reclip_line(1, [[2, 2, 20, 20], [30, 10, 20, 20]]), "sentences": [{"raw": "the thing"}, {"raw": ""}]}
    (t / "r.jsonl").write_text(json.dumps(line) + "\n")
    argv = ["rec", "--format", "reclip", "--annotations", t / "r.jsonl", "--image-root", t, "--quiet", "--allow-lost-inputs"]
    out = cli([*argv, "--model", tiny_checkpoint(t / "m.pt"), "--output", t / "o.json"])
    if out != "ok":
        return out
    result = json.loads((t / "o.json").read_text())
    return "warning" if result["skipped"]["by_reason"] == {"empty expression": 1} else "silent"


@case("r3-inputs", "render-depth on an ASCII PLY announcing 10^9 vertices")
def _(t):
    head = "ply\nformat ascii 1.0\nelement vertex 1000000000\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    (t / "a.ply").write_text(head + "0 0 0\n1 1 1\n")
    return cli(["render-depth", t / "a.ply", "--output", t / "d.png"], "a.ply")


@case("r3-inputs", "render-depth on an OFF mesh announcing 10^8 faces")
def _(t):
    (t / "m.off").write_text("OFF\n3 100000000 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    return cli(["render-depth", t / "m.off", "--output", t / "d.png"], "m.off")


@case("r3-inputs", "render-depth --size 100000 and synth --size 5000")
def _(t):
    np.save(t / "c.npy", np.random.default_rng(0).normal(size=(64, 3)))
    outs = [cli(["render-depth", t / "c.npy", "--size", "100000", "--output", t / "d.png"], "100000"),
            cli(["synth", "--output", t / "s", "--size", "5000", "--images", "1"], "--size")]  # fmt: skip
    return next((o for o in outs if o != "clear error"), "clear error")


@case("r3-inputs", "a .npy point cloud whose header claims 10^10 points")
def _(t):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**10, 3)})
    (t / "c.npy").write_bytes(buf.getvalue() + b"\0" * 48)
    return cli(["render-depth", t / "c.npy", "--output", t / "d.png"], "c.npy")


# ----------------------------------------------------------------------------------------------
# Round 3, R3-C: numbers that overflow, non-finite scores, threads, the CLI's one-line error handler (core and CLI).
# (cases of this family go below this line, above the next section)


def cli_capture(argv) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of the CLI run in-process (a traceback propagates)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("always")
            code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


def bias_grid(extra, must_name: str) -> str:
    """``falip bias`` with ``extra``: a clear error naming ``must_name``, or a grid that is all finite (right) or not (silent)."""
    out = cli(["bias", "--image-size", "100,100", "--box", "0,0,50,50", *extra], must_name=must_name)
    if out != "ok":
        return out
    _, text, _ = cli_capture(["bias", "--image-size", "100,100", "--box", "0,0,50,50", *extra])
    return "silent" if any(w in text for w in ("nan", "inf")) else "right"


@case("r3-numbers", "bias --sigma 1e-300 (2σ² underflows to 0 in float64)")
def _(t):
    return bias_grid(["--sigma", "1e-300"], "sigma")


@case("r3-numbers", "bias --sigma 1e300 (2σ² overflows)")
def _(t):
    return bias_grid(["--sigma", "1e300"], "sigma")


@case("r3-numbers", "bias --alpha 1e39 (a float64, inf as the float32 bias)")
def _(t):
    return bias_grid(["--alpha", "1e39"], "alpha")


@case("r3-numbers", "bias --heads 0:1e40 (a head scale beyond float32)")
def _(t):
    return bias_grid(["--heads", "0:1e40"], "heads")


@case("r3-numbers", "bias --alpha 1e20 --heads 0:1e20 (each fits float32, their product does not)")
def _(t):
    return bias_grid(["--alpha", "1e20", "--heads", "0:1e20"], "alpha")


@case("r3-numbers", "FovealConfig(eps=0) on a one-token region (0/0 in the bump)")
def _(t):
    def run():
        config = falip.FovealConfig(eps=0.0)
        return falip.region_bias((0, 0, 16, 16), (224, 224), (14, 14), config)

    out = api(run, "eps")
    return out if isinstance(out, str) else ("silent" if not bool(torch.isfinite(out).all()) else "right")


@case("r3-numbers", "score --unleash 1:all:3e38: NaN embeddings blamed on the bias, not the weights")
def _(t):
    smooth_image(0).save(t / "p.png")
    argv = ["score", t / "p.png", "--box", "0,0,30,30", "--text", "a", "--model", tiny_checkpoint(t / "m.pt"),
            "--layers", "1", "--unleash", "1:all:3e38"]  # fmt: skip
    code, out, err = cli_capture(argv)
    if code == 0:
        return "silent" if "nan" in out.lower() else "right"
    return "clear error" if code == 2 and "bias settings" in err and len(err.strip().splitlines()) == 1 else "vague error"


@case("r3-api", "encode_regions(config={...}) with a dict of FovealConfig fields")
def _(t):
    model = falip.load(str(tiny_checkpoint(t / "m.pt")))
    image = np.asarray(smooth_image(0))
    out = api(lambda: model.encode_regions(image, [[0, 0, 30, 30]], config={"alpha": 2.0, "layers": [1]}))
    if isinstance(out, str):
        return out
    want = model.encode_regions(image, [[0, 0, 30, 30]], config=falip.FovealConfig(alpha=2.0, layers=(1,)))
    return "right" if torch.equal(out, want) else "silent"


@case("r3-api", "falip.load(config={'alpah': 2}) (a misspelt field)")
def _(t):
    out = api(lambda: falip.load(str(tiny_checkpoint(t / "m.pt")), config={"alpah": 2.0}), "alpah")
    return out if isinstance(out, str) else "silent"


@case("r3-api", "score_regions with a generator of boxes")
def _(t):
    model = falip.load(str(tiny_checkpoint(t / "m.pt")))
    image, boxes = np.asarray(smooth_image(0)), [[0, 0, 30, 30], [10, 10, 60, 40]]
    out = api(lambda: model.score_regions(image, (b for b in boxes), ["a", "b"]))
    if isinstance(out, str):
        return out
    return "right" if torch.equal(out, model.score_regions(image, boxes, ["a", "b"])) else "silent"


@case("r3-threads", "zero_shot_classifier from 16 threads on a cold cache, 4 rounds")
def _(t):
    from falip.zeroshot import zero_shot_classifier

    model = falip.load(str(tiny_checkpoint(t / "m.pt")))
    want = zero_shot_classifier(model, ["cat", "dog"], ["a {}."], use_cache=False)
    failures = 0
    old = os.environ.get("FALIP_CACHE_DIR")
    try:
        for round_ in range(4):
            os.environ["FALIP_CACHE_DIR"] = str(t / f"cache{round_}")

            def call(_):
                try:
                    return torch.allclose(zero_shot_classifier(model, ["cat", "dog"], ["a {}."]), want, atol=1e-6)
                except Exception:
                    return None

            with ThreadPoolExecutor(16) as pool:
                got = list(pool.map(call, range(16)))
            failures += sum(g is None for g in got)
            if not all(g is None or g for g in got):
                return "silent"
    finally:
        if old is None:
            os.environ.pop("FALIP_CACHE_DIR", None)
        else:
            os.environ["FALIP_CACHE_DIR"] = old
    return "traceback" if failures else "right"


@case("r3-cli", "score --box -20,-20,40,40 (a box starting left of and above the image)")
def _(t):
    smooth_image(0).save(t / "p.png")
    code, out, err = cli_capture(
        ["score", t / "p.png", "--box", "-20,-20,40,40", "--text", "a", "--model", tiny_checkpoint(t / "m.pt")]
    )
    if code != 0:
        return "vague error"
    lines = err.strip().splitlines()
    one_line = len(lines) == 1 and lines[0].startswith("falip: warning: box 0") and ".py:" not in err
    return "warning" if one_line else "silent"


@case("r3-cli", "score with a box outside the image and a model file that does not exist (regions first)")
def _(t):
    smooth_image(0).save(t / "p.png")
    return cli(["score", t / "p.png", "--box", "100,100,200,200", "--text", "a", "--model", t / "none.pt"], must_name="box 0")


@case("r3-cli", "bias --patch 0 (was silently the default 16)")
def _(t):
    return cli(["bias", "--image-size", "100,100", "--box", "0,0,50,50", "--patch", "0"], must_name="--patch")


@case("r3-cli", "score --json: method none ties every box; best is an index and the tie is flagged")
def _(t):
    smooth_image(0).save(t / "p.png")
    argv = ["score", t / "p.png", "--box", "0,0,30,30", "--box", "20,10,60,40", "--text", "a", "--text", "a",
            "--method", "none", "--json", "--model", tiny_checkpoint(t / "m.pt")]  # fmt: skip
    code, out, _ = cli_capture(argv)
    if code != 0:
        return "vague error"
    result = json.loads(out)
    return "right" if result["best"] == [0, 0] and result["tie"] == [True, True] and len(result["texts"]) == 2 else "silent"


@case("r3-cli", "--mode given to falip attention (prefix of --model)")
def _(t):
    smooth_image(0).save(t / "p.png")
    code, _, err = cli_capture(["attention", t / "p.png", "--box", "0,0,30,30", "--mode", "naive", "--output", t / "a.png"])
    if code == 0:
        return "silent"
    return "clear error" if code == 2 and "--mode" in err else "vague error"


# ----------------------------------------------------------------------------------------------
# Round 3, R3-D: the server: Host/Origin, time and size bounds, decoding as the CLI does (falip serve).
# (cases of this family go below this line, above the next section)


def _server_client(model, **limits):
    """A TestClient of the app ``falip serve`` runs (its guard included), addressed as http://127.0.0.1:7860."""
    from fastapi.testclient import TestClient

    from falip.app.server import create_app
    from falip.app.service import Limits

    return TestClient(create_app(model, Limits(**limits)), base_url="http://127.0.0.1:7860", raise_server_exceptions=False)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _score_post(client, image: bytes, boxes=((4, 4, 40, 30),), headers=None, **fields):
    data = dict(boxes=json.dumps([list(b) for b in boxes]), texts=json.dumps(["a cat"]), **fields)
    return client.post("/api/score", files={"image": ("p.png", image, "image/png")}, data=data, headers=headers or {})


def _refused(r, status: int, must_name: str) -> str:
    """``clear error`` for the expected status naming ``must_name``, ``silent`` for a 200, else by status."""
    if r.status_code == 200:
        return "silent"
    if r.status_code >= 500:
        return "traceback"
    return "clear error" if r.status_code == status and must_name in r.text else "vague error"


def _toy(t: Path, **kw):
    return falip.load(str(tiny_checkpoint(t / "m.pt")), **kw)


@case("r3-server", "GET /api/health with the Host of a rebinding domain")
def _(t):
    r = _server_client(_toy(t)).get("/api/health", headers={"host": "rebind.attacker.test"})
    return _refused(r, 400, "rebind.attacker.test")


@case("r3-server", "multipart POST from a page of another site (Origin header)")
def _(t):
    r = _score_post(_server_client(_toy(t)), _png_bytes(smooth_image(0)), headers={"origin": "https://attacker.test"})
    return _refused(r, 403, "cross-origin")


@case("r3-server", "POST from a sandboxed frame (Origin: null)")
def _(t):
    r = _score_post(_server_client(_toy(t)), _png_bytes(smooth_image(0)), headers={"origin": "null"})
    return _refused(r, 403, "cross-origin")


@case("r3-server", "bound to 0.0.0.0 with --allow-host: that name is served")
def _(t):
    from fastapi.testclient import TestClient

    from falip.app.server import allowed_hosts, create_app

    app = create_app(_toy(t), hosts=allowed_hosts("0.0.0.0", ["lab.example"]))
    r = TestClient(app, base_url="http://lab.example:7860").get("/api/health")
    return "right" if r.status_code == 200 else "vague error"


def _running_server(model, **limits):
    """A real ``falip serve`` server (uvicorn, its protocol bounds) in a thread: ``(port, stop)``."""
    import threading

    from falip.app.server import make_server
    from falip.app.service import Limits

    server, sock = make_server(model, "127.0.0.1", 0, Limits(**limits), "critical")
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(timeout=0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)

    return sock.getsockname()[1], stop


def _read_until_closed(conn, seconds: float) -> tuple[bytes, bool]:
    """What the server sends until it closes, and whether it closed within ``seconds``."""
    import socket

    conn.settimeout(seconds)
    data = b""
    try:
        while chunk := conn.recv(4096):
            data += chunk
    except socket.timeout:
        return data, False
    return data, True


@case("r3-server", "upload trickled one byte every 0.2 s (read timeout 1 s)")
def _(t):
    import socket

    port, stop = _running_server(_toy(t), read_timeout_s=1.0)
    try:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(f"POST /api/score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 5000\r\n\r\n".encode())
        for _ in range(15):  # 3 s of trickle: the server must have given up after 1 s
            try:
                conn.sendall(b"x")
            except OSError:
                break
            time.sleep(0.2)
        data, closed = _read_until_closed(conn, 10)
        conn.close()
    finally:
        stop()
    if not closed:
        return "hang"
    return "clear error" if b" 408 " in data.split(b"\r\n")[0] else "vague error"


@case("r3-server", "40 idle connections, then a health check (max 64 connections)")
def _(t):
    import socket

    import httpx

    port, stop = _running_server(_toy(t), read_timeout_s=1.0)
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        ok = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=10).status_code == 200
        closed = [_read_until_closed(c, 10)[1] for c in idle]
        for c in idle:
            c.close()
    finally:
        stop()
    return "right" if ok and all(closed) else ("hang" if not all(closed) else "vague error")


@case("r3-server", "8000x1 PNG under crop preprocessing (pixel limit 1 000 000)")
def _(t):
    client = _server_client(_toy(t, preprocess="crop"), max_pixels=1_000_000)
    r = _score_post(client, _png_bytes(Image.new("RGB", (8000, 1), "gray")), boxes=[(0, 0, 4000, 1)])
    return _refused(r, 413, "preprocessing")


@case("r3-server", "a 600x2 box under the crop edit (pixel limit 1 000 000)")
def _(t):
    client = _server_client(_toy(t, preprocess="crop"), max_pixels=1_000_000)
    r = _score_post(client, _png_bytes(smooth_image(1, 640, 480)), boxes=[(0, 100, 600, 102)], method="crop")
    return _refused(r, 413, "crop")


def _decoded_like_the_cli(t: Path, image: Image.Image, name: str) -> str:
    from falip.methods import score_with_method

    model = _toy(t)
    image.save(t / name)
    boxes = [[4, 4, 40, 30], [20, 10, 60, 44]]
    data = dict(boxes=json.dumps(boxes), texts=json.dumps(["a cat", "a dog"]))
    r = _server_client(model).post("/api/score", files={"image": (name, (t / name).read_bytes())}, data=data)
    if r.status_code != 200:
        return "vague error" if r.status_code < 500 else "traceback"
    want = score_with_method(model, t / name, boxes, ["a cat", "a dog"]).numpy()
    return "right" if np.allclose(r.json()["scores"], want, rtol=0, atol=1e-5) else "silent"


@case("r3-server", "12-bit camera data in a 16-bit PNG, scored as falip score scores the file")
def _(t):
    raw = np.random.default_rng(0).integers(0, 4096, (48, 64), dtype=np.uint16)
    return _decoded_like_the_cli(t, Image.fromarray(raw), "cam.png")


@case("r3-server", "32-bit integer TIFF, scored as falip score scores the file")
def _(t):
    raw = np.random.default_rng(1).integers(0, 60000, (48, 64)).astype(np.int32)
    return _decoded_like_the_cli(t, Image.fromarray(raw, mode="I"), "i32.tif")


@case("r3-server", "layers JSON nested 50 000 deep")
def _(t):
    r = _score_post(_server_client(_toy(t)), _png_bytes(smooth_image(0)), layers="[" * 50_000 + "]" * 50_000)
    return _refused(r, 400, "layers")


@case("r3-server", "a box coordinate written as a 320-digit integer")
def _(t):
    client = _server_client(_toy(t))
    data = dict(boxes="[[0, 0, 1" + "0" * 320 + ", 30]]", texts=json.dumps(["a cat"]))
    r = client.post("/api/score", files={"image": ("p.png", _png_bytes(smooth_image(0)))}, data=data)
    return _refused(r, 400, "box 0")


@case("r3-server", "/api/health of a model given by an absolute checkpoint path")
def _(t):
    info = _server_client(_toy(t)).get("/api/health").json()
    return "silent" if str(t) in json.dumps(info) else "right"


@case("r3-server", "mask upload of another size than the image")
def _(t):
    client = _server_client(_toy(t))
    files = [("image", ("p.png", _png_bytes(smooth_image(0)))), ("masks", ("m.png", _png_bytes(Image.new("L", (10, 10), 255))))]
    r = client.post("/api/score", files=files, data=dict(texts=json.dumps(["a cat"])))
    return _refused(r, 400, "m.png")


# ----------------------------------------------------------------------------------------------
# Round 3, R3-E: models that disagree with their weights (loading).
# (cases of this family go below this line, above the next section)


def _edited_checkpoint(t: Path, edit) -> Path:
    """tiny_checkpoint's state dict after ``edit(state)``, saved as t/e.pt."""
    state = torch.load(tiny_checkpoint(t / "base.pt"), weights_only=True)
    edit(state)
    torch.save(state, t / "e.pt")
    return t / "e.pt"


def _hf_dir(t: Path, edit_config=None, edit_tensors=None) -> Path:
    """tiny_checkpoint converted to a transformers CLIPModel directory (tools/openai_to_hf.py), then edited."""
    from safetensors.torch import load_file, save_file

    from falip.runtimes.open_clip_loading import infer_openai_config
    from openai_to_hf import save_hf_clip

    state = {k: v for k, v in torch.load(tiny_checkpoint(t / "base.pt"), weights_only=True).items() if k != "attn_mask"}
    with contextlib.redirect_stderr(io.StringIO()):
        save_hf_clip(state, infer_openai_config(state), t / "hf")
    if edit_config is not None:
        config = json.loads((t / "hf" / "config.json").read_text())
        edit_config(config)
        (t / "hf" / "config.json").write_text(json.dumps(config))
    if edit_tensors is not None:
        tensors = load_file(str(t / "hf" / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(t / "hf" / "model.safetensors"))
    return t / "hf"


def _score_argv(t: Path, model: Path) -> list:
    return ["score", *_photo(t), "--box", "4,4,40,30", "--text", "a cat", "--model", model, "--json"]


def _refuses_model(argv, must_name: str) -> str:
    """A command that must refuse its model: ``clear error`` naming ``must_name``, or ``silent`` when it scores."""
    out = cli(argv, must_name=must_name)
    return "silent" if out == "ok" else out


def _loads_right(t: Path, model: Path) -> str:
    """The CLI scores with ``model`` and its scores equal the untouched checkpoint's (right) or not (silent)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main([str(a) for a in _score_argv(t, model)])
    if code:
        return "vague error"
    base = falip.load(str(t / "base.pt")).score_regions(t / "p.png", [(4, 4, 40, 30)], ["a cat"])
    return "right" if abs(json.loads(out.getvalue())["scores"][0][0] - float(base[0, 0])) < 1e-3 else "silent"


@case("r3-weights", "HF config with another hidden_size than its weights")
def _(t):
    directory = _hf_dir(t, edit_config=lambda c: c["vision_config"].update(hidden_size=128, intermediate_size=512))
    return _refuses_model(_score_argv(t, directory), "model.safetensors")


@case("r3-weights", "HF model.safetensors with an extra tensor")
def _(t):
    directory = _hf_dir(t, edit_tensors=lambda d: d.update({"vision_model.extra.weight": torch.ones(4)}))
    return _refuses_model(_score_argv(t, directory), "vision_model.extra.weight")


@case("r3-weights", "HF logit_scale of 100 (exp overflows)")
def _(t):
    directory = _hf_dir(t, edit_tensors=lambda d: d["logit_scale"].fill_(100.0))
    return _refuses_model(_score_argv(t, directory), "logit_scale")


@case("r3-weights", "uint8 layer norm in an OpenAI-layout .pt")
def _(t):
    path = _edited_checkpoint(t, lambda s: s.update({"visual.ln_post.weight": s["visual.ln_post.weight"].to(torch.uint8)}))
    return _refuses_model(_score_argv(t, path), "visual.ln_post.weight")


@case("r3-weights", "named architecture + file without logit_scale")
def _(t):
    torch.manual_seed(0)
    state = open_clip.create_model("ViT-S-32").state_dict()
    del state["logit_scale"]
    torch.save(state, t / "s32.bin")
    argv = ["score", *_photo(t), "--box", "4,4,40,30", "--text", "a cat", "--model", "ViT-S-32", "--pretrained", t / "s32.bin"]
    return _refuses_model(argv, "logit_scale")


@case("r3-weights", "logit_scale of 89 in an OpenAI-layout .pt (exp overflows float32)")
def _(t):
    path = _edited_checkpoint(t, lambda s: s["logit_scale"].fill_(89.0))
    return _refuses_model(_score_argv(t, path), "logit_scale")


@case("r3-weights", "float64 OpenAI-layout .pt (cast, same scores)")
def _(t):
    return _loads_right(t, _edited_checkpoint(t, lambda s: s.update({k: v.double() for k, v in s.items()})))


@case("r3-weights", "fp16 OpenAI-layout .pt, as OpenAI distributes (cast, same scores)")
def _(t):
    return _loads_right(
        t, _edited_checkpoint(t, lambda s: s.update({k: v.half() if k != "logit_scale" else v for k, v in s.items()}))
    )


def run_all() -> list[tuple[str, str, str]]:
    rows = []
    for group, name, fn in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["FALIP_CACHE_DIR"] = str(Path(tmp) / "cache")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outcome = fn(Path(tmp))
            except Exception:
                traceback.print_exc(limit=1, file=sys.stderr)
                outcome = "traceback"
        rows.append((group, name, outcome))
        print(f"{outcome:>12}  {group:<8} {name}", file=sys.stderr, flush=True)
    return rows


def main_cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the table of docs/reliability.md")
    parser.add_argument(
        "--groups", default="", help="comma-separated group names or prefixes to run (e.g. r3 for round 3); default: all"
    )
    args = parser.parse_args()
    wanted = [g for g in args.groups.split(",") if g]
    if wanted:
        CASES[:] = [c for c in CASES if any(c[0].startswith(g) for g in wanted)]
        if not CASES:
            parser.error(f"no case is in a group starting with {', '.join(wanted)}")
    rows = run_all()
    counts = Counter(o for _, _, o in rows)
    summary = f"{len(rows)} cases: " + ", ".join(f"{n} {k}" for k, n in counts.most_common())
    if args.markdown:
        print("| area | case | outcome |\n|---|---|---|")
        for group, name, outcome in rows:
            print(f"| {group} | {name} | {outcome} |")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
