"""``falip serve``: the JSON API through a real HTTP client against a real server, and the page in a real browser.

The server is the real command (``python -m falip serve --port 0``) in a subprocess on 127.0.0.1,
with the shipped ``falip-toy`` model and small limits so that over-limit inputs are cheap to send.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from falip import RegionClampWarning
from falip.cli import main
from falip.loading import shipped_model
from falip.ranking import winners
from falip.synthetic import make_scene

httpx = pytest.importorskip("httpx", reason="the test extra is not installed: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="the app extra is not installed: pip install -e '.[app]'")

MAX_PIXELS = 300 * 300
MAX_UPLOAD_MB = 1
MAX_BOXES = 8
SCENE_SEED = 7  # a 3-object 256×256 scene; falip-toy's FALIP picks the right box for each object's name


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_args)
    return buf.getvalue()


@pytest.fixture(scope="module")
def scene():
    return make_scene(np.random.default_rng(SCENE_SEED), 3, 256)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(base_url, path of the server's stderr log)`` of a running ``falip serve``."""
    root = tmp_path_factory.mktemp("serve")
    out, err = root / "stdout.log", root / "stderr.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "falip", "serve", "--port", "0", "--max-pixels", str(MAX_PIXELS)]
    cmd += ["--max-upload-mb", str(MAX_UPLOAD_MB), "--max-boxes", str(MAX_BOXES)]
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            assert proc.poll() is None, f"falip serve exited with {proc.returncode}: {err.read_text()}"
            for line in out.read_text().splitlines():
                if line.startswith("falip serve:") and "open http://" in line:
                    url = line.split("open ")[1].split()[0]
            time.sleep(0.1)
        assert url and url.startswith("http://127.0.0.1:"), f"no URL printed: {out.read_text()} {err.read_text()}"
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "api/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, err
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=120) as c:
        yield c


def score(client, image: bytes, boxes, texts, **fields):
    data = dict(boxes=json.dumps(boxes), texts=json.dumps(texts), **fields)
    return client.post("/api/score", files={"image": ("image.png", image, "image/png")}, data=data)


def test_health_names_the_model_and_its_settings(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    info = r.json()
    card = shipped_model("falip-toy")[1]["falip"]  # the model card's own settings
    assert info["model"] == "falip-toy" and info["bias_layers"] == card["layers"] and info["config"]["alpha"] == card["alpha"]
    assert info["limits"]["max_pixels"] == MAX_PIXELS and info["limits"]["max_boxes"] == MAX_BOXES
    assert "falip" in info["methods"] and "exact" in info["modes"] and info["examples"]


def cli_score(capsys, image_path: Path, boxes, texts, method: str, mode: str, response: dict) -> dict:
    """What ``falip score --json`` prints with the model, preprocessing and bias settings the API reported."""
    argv = ["score", str(image_path), "--model", "falip-toy", "--json"]
    for b in boxes:
        argv += ["--box", ",".join(repr(float(v)) for v in b)]
    for t in texts:
        argv += ["--text", t]
    config = response["config"]
    argv += ["--method", method, "--mode", mode]  # the model's own preprocessing, as the server's
    argv += ["--alpha", repr(config["alpha"]), "--sigma", repr(config["sigma"]), "--shape", config["shape"]]
    argv += ["--rows", config["rows"], "--layers", ",".join(str(i) for i in response["bias_layers"])]
    if "numerics" in config:  # to_dict() leaves out the default (float64), as the CLI's default
        argv += ["--numerics", config["numerics"]]
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegionClampWarning)  # the box sticking out of the image
        assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "method,mode,options",
    [
        ("falip", "exact", {}),  # the model's own FALIP settings (α 4 on blocks 2–5)
        ("falip+blur", "naive", {"alpha": "0.7", "layers": "[3, 5]"}),
    ],
)
def test_score_equals_falip_score_json_for_the_same_inputs(client, scene, tmp_path, capsys, method, mode, options):
    path = tmp_path / "scene.png"
    scene.image.save(path)
    # Float coordinates, and a box that sticks out of the image (clamped by both).
    boxes = [list(o.box) for o in scene.objects] + [[200.5, 180.25, 300.0, 270.0]]
    texts = [f"the {o.name}" for o in scene.objects]
    r = score(client, path.read_bytes(), boxes, texts, method=method, mode=mode, **options)
    assert r.status_code == 200, r.text
    api = r.json()
    if "alpha" in options:
        assert api["config"]["alpha"] == 0.7 and api["bias_layers"] == [3, 5]
    cli = cli_score(capsys, path, boxes, texts, method, mode, api)
    assert cli["method"] == api["method"] == method and cli["mode"] == mode
    scores = np.array(api["scores"])
    assert scores.shape == (len(boxes), len(texts))
    np.testing.assert_allclose(scores, np.array(cli["scores"]), rtol=1e-5, atol=1e-5)
    assert api["best"] == winners(torch.tensor(cli["scores"])).best
    if method == "falip":  # a sanity check of the semantics, not only of the plumbing
        assert api["best"] == [0, 1, 2]


def test_score_answers_with_the_score_table_shape_ties_and_the_score_name(client, scene):
    boxes, texts = [list(o.box) for o in scene.objects], [f"the {o.name}" for o in scene.objects]
    r = score(client, png_bytes(scene.image), boxes, texts, method="none")
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body)[:6] == ["texts", "scores", "best", "tie", "tied", "score"]
    assert body["score"] == {"kind": "softmax", "name": "logit scale · cosine"}
    assert body["tie"] == [True] * 3 and body["tied"] == [[0, 1, 2]] * 3 and body["best"] == [0, 0, 0]  # none: every box ties
    assert body["regions"] == [",".join(f"{v:g}" for v in b) for b in boxes] and body["masks"] == []
    assert client.get("/api/health").json()["score"] == body["score"]


def test_a_sigmoid_model_is_served_with_its_own_score_name(scene):
    from fastapi.testclient import TestClient

    from falip import FalipModel
    from falip.app.server import create_app
    from test_timm import runtime

    model = FalipModel(runtime("falip_test_vit_map"), preprocess="squash")  # attention-pooled, sigmoid scores
    client = TestClient(create_app(model), base_url="http://127.0.0.1:7860")
    want = {"kind": "sigmoid", "name": "logit scale · cosine + logit bias (sigmoid logit)"}
    assert client.get("/api/health").json()["score"] == want
    r = score(client, png_bytes(scene.image), [list(o.box) for o in scene.objects], ["the blue star"])
    assert r.status_code == 200 and r.json()["score"] == want, r.text


def mask_png(size, box) -> bytes:
    m = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = (int(v) for v in box)
    m[y0:y1, x0:x1] = 255
    return png_bytes(Image.fromarray(m))


def test_masks_are_regions_scored_as_falip_score_mask_scores_them(client, scene, tmp_path, capsys):
    path = tmp_path / "scene.png"
    scene.image.save(path)
    texts = [f"the {o.name}" for o in scene.objects]
    masks = [mask_png(scene.image.size, o.box) for o in scene.objects[:2]]
    for k, m in enumerate(masks):
        (tmp_path / f"m{k}.png").write_bytes(m)
    files = [("image", ("s.png", path.read_bytes(), "image/png"))] + [
        ("masks", (f"m{k}.png", m, "image/png")) for k, m in enumerate(masks)
    ]
    box = list(scene.objects[2].box)
    r = client.post("/api/score", files=files, data=dict(texts=json.dumps(texts), boxes=json.dumps([box])))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["regions"][1:] == ["m0.png", "m1.png"] and body["masks"] == ["m0.png", "m1.png"] and body["boxes"] == [box]
    capsys.readouterr()
    argv = [
        "score",
        str(path),
        "--model",
        "falip-toy",
        "--json",
        "--mask",
        str(tmp_path / "m0.png"),
        "--mask",
        str(tmp_path / "m1.png"),
    ]
    assert main(argv + [a for t in texts for a in ("--text", t)]) == 0
    cli = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(np.array(body["scores"])[1:], cli["scores"], rtol=1e-5, atol=1e-5)  # the mask rows
    alone = score(client, path.read_bytes(), [box], texts).json()
    np.testing.assert_allclose(np.array(body["scores"])[:1], alone["scores"], rtol=0, atol=1e-6)  # the box row


@pytest.mark.parametrize(
    "mask,status,fragment",
    [
        (b"not a png", 415, "masks: mask 0 (bad.png): not an image file"),
        ("small", 400, "masks: mask 0 (bad.png) is 10x10 but the image is 256x256"),
        ("empty", 400, "bad.png is empty: no pixel inside"),
    ],
)
def test_bad_masks_are_a_4xx_naming_the_mask(client, scene, mask, status, fragment):
    if mask == "small":
        mask = mask_png((10, 10), (0, 0, 5, 5))
    elif mask == "empty":
        mask = png_bytes(Image.new("L", scene.image.size, 100))
    files = [("image", ("s.png", png_bytes(scene.image), "image/png")), ("masks", ("bad.png", mask, "image/png"))]
    r = client.post("/api/score", files=files, data=dict(texts=GOOD_TEXTS))
    assert r.status_code == status and fragment in r.json()["error"], r.text


def test_score_applies_exif_orientation_so_boxes_refer_to_the_displayed_image(client, scene):
    displayed = scene.image.crop((0, 40, 256, 200))  # 256×160 as displayed
    stored = displayed.transpose(Image.Transpose.ROTATE_90)  # 160×256 in the file, EXIF says "rotate 90° CW"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image must be rotated 90° clockwise to display
    boxes = [[150.0, 10.0, 250.0, 120.0], [10.0, 20.0, 120.0, 150.0]]  # box 0 lies outside the stored 160-px width
    texts = ["the red triangle", "the blue square"]
    plain = score(client, png_bytes(displayed), boxes, texts)
    rotated = score(client, png_bytes(stored, exif=exif), boxes, texts)
    assert plain.status_code == 200 and rotated.status_code == 200, rotated.text
    assert rotated.json()["image_size"] == [256, 160]
    np.testing.assert_allclose(rotated.json()["scores"], plain.json()["scores"], rtol=0, atol=1e-6)


def _big_noise() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, size=(700, 700, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(noise))  # ~1.5 MB, over the 1 MB upload limit


GOOD_BOXES = json.dumps([[10, 10, 100, 100]])
GOOD_TEXTS = json.dumps(["the red circle"])
BAD_REQUESTS = {
    # name: (form fields other than the image, image bytes or None for the scene, status, fragment of the message)
    "not an image": ({}, b"this is not an image", 415, "image: cannot read image upload.png: not an image file"),
    "truncated PNG": ({}, "truncated", 400, "upload.png: damaged or truncated file"),
    "empty file": ({}, b"", 400, "image: the uploaded file is empty"),
    "over the pixel limit": ({}, "big", 413, f"upload.png is 400x400 = 160000 pixels, over the limit of {MAX_PIXELS}"),
    "over the upload limit": ({}, "huge", 413, "over the upload limit"),
    "no image field": ({}, "missing", 400, "image: Field required"),
    "no boxes field and no masks": ({"boxes": None}, None, 400, "boxes: Field required"),
    "boxes not JSON": ({"boxes": "[[1, 2, 3"}, None, 400, "boxes: not valid JSON"),
    "boxes not a list": ({"boxes": '{"x": 1}'}, None, 400, "boxes: give a non-empty JSON list"),
    "no boxes": ({"boxes": "[]"}, None, 400, "boxes: give a non-empty JSON list"),
    "box with three numbers": ({"boxes": "[[1, 2, 3]]"}, None, 400, "box 0 must be [x0, y0, x1, y1]"),
    "box with a string": ({"boxes": '[[1, 2, "3", 4]]'}, None, 400, "box 0 must be [x0, y0, x1, y1]"),
    "box with NaN": ({"boxes": "[[1, 2, NaN, 4]]"}, None, 400, "NaN or infinite"),
    "zero-width box": ({"boxes": "[[10, 10, 10, 50]]"}, None, 400, "box 0 [10, 10, 10, 50] is empty"),
    "inverted box": ({"boxes": "[[10, 10, 50, 50], [60, 50, 20, 90]]"}, None, 400, "box 1 [60, 50, 20, 90] is empty"),
    "box outside the image": ({"boxes": "[[300, 10, 400, 50]]"}, None, 400, "entirely outside the 256x256 image"),
    "too many boxes": ({"boxes": json.dumps([[0, 0, 10, 10]] * (MAX_BOXES + 1))}, None, 400, f"over the limit of {MAX_BOXES}"),
    "no texts": ({"texts": "[]"}, None, 400, "texts: give a non-empty JSON list"),
    "blank text": ({"texts": '["a", "  "]'}, None, 400, "texts: text 1 must be a non-blank string"),
    "lone surrogate in a text": ({"texts": '["a", "\\ud800"]'}, None, 400, "texts: text 1 is not valid Unicode"),
    "texts field missing": ({"texts": None}, None, 400, "texts: Field required"),
    "unknown method": ({"method": "sharpen"}, None, 400, "method: unknown method 'sharpen'"),
    "bad mode": ({"mode": "fast"}, None, 400, "mode: unknown mode 'fast'"),
    "a long bad mode is not echoed whole": ({"mode": "x" * 10_000}, None, 400, "mode: unknown mode '" + "x" * 80 + "'; use"),
    "alpha not a number": ({"alpha": "lots"}, None, 400, "alpha:"),
    "layer out of range": ({"layers": "[9]"}, None, 400, "layer 9 is out of range"),
    "negative sigma": ({"sigma": "-1"}, None, 400, "sigma must be > 0"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_json_error_naming_the_problem(client, scene, name):
    fields, image, status, fragment = BAD_REQUESTS[name]
    data = {"boxes": GOOD_BOXES, "texts": GOOD_TEXTS, **fields}
    data = {k: v for k, v in data.items() if v is not None}
    if image == "big":
        image = png_bytes(Image.new("RGB", (400, 400), "gray"))  # 160 000 pixels, small file
    elif image == "huge":
        image = _big_noise()
    elif image == "truncated":
        image = png_bytes(scene.image)[: len(png_bytes(scene.image)) // 2]
    elif image is None:
        image = png_bytes(scene.image)
    files = {} if image == "missing" else {"image": ("upload.png", image, "image/png")}
    r = client.post("/api/score", files=files, data=data)
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and fragment in body["error"], body
    assert "Traceback" not in r.text


def test_attention_maps_for_a_box_and_bad_box_index(client, scene):
    image = png_bytes(scene.image)
    boxes = json.dumps([list(o.box) for o in scene.objects])
    r = client.post("/api/attention", files={"image": ("s.png", image)}, data={"boxes": boxes, "box": "1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["box"] == 1 and body["layers"] == [2, 3, 4, 5] and body["png"].startswith("data:image/png;base64,")
    assert body["box_mass"]["with_falip"] > body["box_mass"]["without"]  # FALIP moves attention into the box
    r = client.post("/api/attention", files={"image": ("s.png", image)}, data={"boxes": boxes, "box": "3"})
    assert r.status_code == 400 and "index 3 is out of range for 3 boxes" in r.json()["error"]


def test_attention_figure_labels_rows_with_the_callers_box_numbers(scene):
    from falip import load
    from falip.viz import attention_maps, draw_attention

    maps = attention_maps(load("falip-toy"), scene.image, [scene.objects[1].box])
    default, numbered = np.asarray(draw_attention(maps)), np.asarray(draw_attention(maps, box_numbers=[2]))
    assert default.shape == numbered.shape
    differs = np.nonzero((default != numbered).any(axis=(1, 2)))[0]
    assert differs.size and differs.min() > 0  # only the row label changes ("FALIP box 2" instead of "box 1")


def concurrent_requests(scene) -> list[dict]:
    """16 different requests: every method class, every mode, several box sets and text sets."""
    rng = np.random.default_rng(1)
    image = png_bytes(scene.image)
    methods = ["falip", "crop", "none", "falip+circle", "blur", "falip"]
    modes = ["exact", "naive", "approx"]
    out = []
    for i in range(16):
        k = int(rng.integers(1, 5))
        x0, y0 = rng.uniform(0, 180, (2, k))
        w, h = rng.uniform(20, 70, (2, k))
        boxes = [[float(a), float(b), float(a + c), float(b + d)] for a, b, c, d in zip(x0, y0, w, h)]
        texts = [f"the {o.name}" for o in scene.objects][: 1 + i % 3]
        out.append(dict(image=image, boxes=boxes, texts=texts, method=methods[i % len(methods)], mode=modes[i % 3]))
    return out


def test_16_concurrent_requests_each_get_their_solo_answer(server, scene):
    url = server[0]
    requests = concurrent_requests(scene)
    with httpx.Client(base_url=url, timeout=300) as c:
        solo = [score(c, **req) for req in requests]
    assert all(r.status_code == 200 for r in solo), [r.text for r in solo]
    barrier = threading.Barrier(len(requests))

    def send(req):
        with httpx.Client(base_url=url, timeout=300) as c:
            barrier.wait()
            return score(c, **req)

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(send, req) for req in requests]
        with httpx.Client(base_url=url, timeout=300) as c:
            health_during = c.get("/api/health")  # the event loop answers while the model is busy
        together = [f.result() for f in futures]
    assert health_during.status_code == 200
    for req, a, b in zip(requests, solo, together):
        assert b.status_code == 200, b.text
        assert b.json()["method"] == req["method"] and b.json()["boxes"] == req["boxes"]
        np.testing.assert_allclose(b.json()["scores"], a.json()["scores"], rtol=0, atol=1e-6)
        assert b.json()["best"] == a.json()["best"]


def test_server_still_serves_after_bad_input_and_load_and_logs_no_traceback(client, server, scene):
    for _ in range(3):
        assert (
            client.post("/api/score", files={"image": ("x.png", b"junk")}, data={"boxes": "[", "texts": "["}).status_code == 400
        )
    assert client.get("/no/such/page").json() == {"error": "Not Found"}
    r = score(client, png_bytes(scene.image), [list(scene.objects[0].box)], ["the thing"])
    assert r.status_code == 200 and len(r.json()["scores"]) == 1
    assert client.get("/api/health").status_code == 200
    assert "Traceback" not in server[1].read_text()


# ---- the page in a real browser -----------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def find_chromium():
    for candidate in (
        os.environ.get("FALIP_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
def open_page(tmp_path):
    """``open_page(**context options)`` → a page of the system chromium (never a downloaded browser), headless,
    with a fresh profile; the page records failed responses (``page.failed``) and script errors (``page.errors``)."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium not found (apt-get install -y chromium, or set FALIP_CHROMIUM=/path/to/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")
    contexts = []
    with sync_api.sync_playwright() as p:

        def open_page(**options):
            options.setdefault("viewport", {"width": 1400, "height": 1000})
            context = p.chromium.launch_persistent_context(
                str(tmp_path / f"profile{len(contexts)}"),
                executable_path=chromium,
                headless=True,
                args=["--headless", *CHROMIUM_FLAGS],
                accept_downloads=True,
                **options,
            )
            contexts.append(context)
            page = context.pages[0] if context.pages else context.new_page()
            page.failed, page.errors = [], []
            page.on("response", lambda r: r.status >= 400 and page.failed.append(f"{r.status} {r.url}"))
            page.on("pageerror", lambda exc: page.errors.append(str(exc)))
            return page

        try:
            yield open_page
        finally:
            for context in contexts:
                context.close()


def drag(page, canvas_box, scale, start, end):
    """Mouse drag on the canvas from image point ``start`` to image point ``end``."""
    page.mouse.move(canvas_box["x"] + start[0] * scale, canvas_box["y"] + start[1] * scale)
    page.mouse.down()
    page.mouse.move(canvas_box["x"] + end[0] * scale, canvas_box["y"] + end[1] * scale, steps=5)
    page.mouse.up()


def touch_drag(page, canvas_box, scale, start, end):
    """A one-finger touch drag (real touch events through the DevTools protocol) between image points."""
    cdp = page.context.new_cdp_session(page)
    points = [start + (end - start) * t for t in np.linspace(0, 1, 6)]
    for i, (x, y) in enumerate(points):
        kind = "touchStart" if i == 0 else "touchMove"
        at = {"x": canvas_box["x"] + x * scale, "y": canvas_box["y"] + y * scale}
        cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [at]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def load_scene_in_page(page, url, path):
    page.goto(url)
    page.wait_for_function("document.getElementById('model-name').textContent.includes('falip-toy')")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#canvas[data-ready='1']")
    canvas_box = page.locator("#canvas").bounding_box()
    return canvas_box, canvas_box["width"] / Image.open(path).width


def region_coords(page, k: int) -> list[float]:
    return [float(page.locator(f"#regions li[data-box='{k}'] input").nth(i).input_value()) for i in range(4)]


def test_browser_draw_inside_a_box_run_read_ties_and_download(open_page, server, client, scene, tmp_path):
    page, url = open_page(), server[0]
    path = tmp_path / "scene.png"
    scene.image.save(path)
    canvas_box, scale = load_scene_in_page(page, url, path)

    # Box 1 on object 0, box 2 on object 2; box 3 drawn inside box 1 (draw mode), a click selects it (the
    # smallest box under the pointer, not box 1) and Delete removes it.
    targets = [scene.objects[0].box, scene.objects[2].box]
    for b in targets:
        drag(page, canvas_box, scale, b[:2], b[2:])
    x0, y0, x1, y1 = targets[0]
    inner = (x0 + 0.3 * (x1 - x0), y0 + 0.3 * (y1 - y0), x0 + 0.6 * (x1 - x0), y0 + 0.6 * (y1 - y0))
    drag(page, canvas_box, scale, inner[:2], inner[2:])
    assert page.locator("#regions li").count() == 3
    assert np.allclose(region_coords(page, 2), inner, atol=1.0)
    page.mouse.click(canvas_box["x"] + (inner[0] + 2) * scale, canvas_box["y"] + (inner[1] + 2) * scale)
    assert page.locator("#regions li.selected").get_attribute("data-box") == "2"
    page.keyboard.press("Shift+ArrowRight")  # nudge by 10 px, then delete
    assert region_coords(page, 2)[0] == pytest.approx(round(inner[0]) + 10, abs=1.0)
    page.keyboard.press("Delete")
    assert page.locator("#regions li").count() == 2
    drawn = [region_coords(page, k) for k in range(2)]
    for got, want in zip(drawn, targets):
        assert np.allclose(got, want, atol=1.0), (got, want)  # the boxes are in image pixels, not screen pixels
    page.locator("#regions li[data-box='1'] input").nth(3).fill(str(targets[1][3]))  # typed coordinates
    page.locator("#regions li[data-box='1'] input").nth(3).dispatch_event("change")
    drawn[1][3] = targets[1][3]

    texts = [f"the {scene.objects[2].name}", f"the {scene.objects[0].name}"]
    page.fill("#texts", "\n".join(texts))
    page.click("#run")
    winners = [page.locator(f'#summary td[data-method="falip"][data-text="{j}"]') for j in range(2)]
    winners[1].wait_for(timeout=60_000)
    assert page.locator("#error").inner_text() == ""
    assert winners[0].get_attribute("data-box") == "1" and winners[0].inner_text() == "region 2"
    assert winners[1].get_attribute("data-box") == "0" and winners[1].inner_text() == "region 1"
    assert "score = logit scale · cosine" in page.locator("#results").inner_text()

    # The page shows the API's numbers for the boxes it drew (row k, column j = box k, text j).
    api = score(client, path.read_bytes(), drawn, texts).json()
    cells = page.locator('table.scores[data-method="falip"] td')
    shown = np.array([float(cells.nth(i).inner_text()) for i in range(4)]).reshape(2, 2)
    np.testing.assert_allclose(shown, api["scores"], rtol=0, atol=0.0051)  # shown with 2 decimals
    none = page.locator('#summary td[data-method="none"]').first
    assert none.inner_text() == "tie (1, 2)" and none.get_attribute("data-tie") == "true"
    assert page.locator('table.scores[data-method="none"] td.best').count() == 0  # a tie has no "best" cell
    assert page.locator('table.scores[data-method="none"] td.tied').count() == 4
    assert page.locator("#summary td.winner").count() == 2 * 5  # every default method ran
    page.wait_for_selector("#attention-img")  # attention maps of the winner, no box being selected
    assert page.locator("#attention-img").get_attribute("data-box") == "1"

    with page.expect_download() as download:
        page.click("#download-json")
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["results"]["falip"]["scores"] == page.evaluate("state.results.falip.scores")
    with page.expect_download() as download:
        page.click("#download-csv")
    rows = Path(download.value.path()).read_text().splitlines()
    assert rows[0] == "method,text,region,region_name,score,score_name,best,tie" and len(rows) == 1 + 5 * 2 * 2

    shot = os.environ.get("FALIP_SERVE_SCREENSHOT")
    if shot:  # FALIP_SERVE_SCREENSHOT=docs/images/serve.png python -m pytest tests/test_serve.py -k browser_draw
        page.screenshot(path=shot, full_page=True)

    # A bundled example brings its image, its boxes and one expression per object, and clears the old results.
    example = client.get("/api/health").json()["examples"][0]
    page.select_option("#example", example["name"])
    page.wait_for_function(f"document.querySelectorAll('#regions li').length === {len(example['boxes'])}")
    assert page.input_value("#texts").splitlines() == example["texts"]
    assert page.locator("#summary").count() == 0
    assert page.errors == [] and page.failed == []  # no script error, no 404 (the favicon is inline)


def test_browser_phone_touch_draws_a_box_inside_another_and_a_mask_is_a_region(open_page, server, scene, tmp_path):
    page = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, device_scale_factor=2)
    path, mask = tmp_path / "scene.png", tmp_path / "spoon.png"
    scene.image.save(path)
    mask.write_bytes(mask_png(scene.image.size, scene.objects[1].box))
    canvas_box, scale = load_scene_in_page(page, server[0], path)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling at phone width

    outer = np.array(scene.objects[0].box, dtype=float)
    drag(page, canvas_box, scale, outer[:2], outer[2:])  # (a mouse box first, to draw inside it by touch)
    inner = outer[:2] + (outer[2:] - outer[:2]) * np.array([[0.25], [0.7]])
    touch_drag(page, canvas_box, scale, inner[0], inner[1])
    assert page.locator("#regions li").count() == 2
    assert np.allclose(region_coords(page, 1), inner.flatten(), atol=1.5)

    page.set_input_files("#masks", str(mask))
    page.wait_for_function("document.querySelectorAll('#regions li').length === 3")
    assert page.locator("#regions li[data-mask='0'] .mask-name").inner_text() == "spoon.png"
    page.fill("#texts", f"the {scene.objects[1].name}")
    for m in ("none", "crop", "blur", "circle"):
        page.uncheck(f'#methods input[value="{m}"]')
    page.click("#run")
    page.locator('#summary td[data-method="falip"]').wait_for(timeout=60_000)
    assert page.locator("#error").inner_text() == ""
    assert page.locator('table.scores[data-method="falip"] tr').count() == 1 + 3  # box, box drawn by touch, mask
    assert page.evaluate("state.results.falip.regions[2]") == "spoon.png"
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shot = os.environ.get("FALIP_SERVE_TOUCH_SCREENSHOT")
    if shot:  # FALIP_SERVE_TOUCH_SCREENSHOT=docs/images/serve-touch.png python -m pytest tests/test_serve.py -k browser_phone
        page.screenshot(path=shot, full_page=True)
    assert page.errors == [] and page.failed == []
