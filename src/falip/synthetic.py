"""Seeded synthetic scenes: coloured shapes with boxes and referring expressions.

Used to train the small CLIP shipped with the package (``falip-toy``), for semantic tests that
catch coordinate bugs (a box read with x and y swapped points at another object), and for the
offline demo and synthetic benchmarks.

A scene holds 1–4 objects; within a scene every object has a unique (colour, shape) pair, so
``"the red circle"`` names exactly one object. Expressions per object: ``"red circle"``,
``"the red circle"``, ``"the small red circle"`` / ``"a small red circle"`` (size words only when
the size is unambiguous),
and, when another object lies clearly to its left/right, ``"the circle left of the square"``
(only when both shapes are unique in the scene).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from .inputs import check_count

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 35),
}
LAYOUT_ATTEMPTS = 20
SIZES = {"small": (0.16, 0.22), "large": (0.28, 0.36)}  # object diameter as a fraction of the image side


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    background: str
    expressions: list[list[str]] = field(default_factory=list)  # per object


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]
    points = []  # five-pointed star
    for k in range(10):
        a = math.pi / 2 + k * math.pi / 5
        rad = r if k % 2 == 0 else 0.45 * r
        points.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], box) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon(_polygon(shape, (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2), fill=colour)


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    if rng.random() < 0.5:
        level = int(rng.integers(90, 200))
        return Image.new("RGB", (size, size), (level, level, level)), "plain"
    base = rng.integers(80, 200, size=3)
    noise = rng.normal(0, 18, size=(size // 8 + 1, size // 8 + 1, 1))
    small = np.clip(base[None, None] + noise, 0, 255).astype(np.uint8)
    gray = small.mean(axis=2, keepdims=True).repeat(3, axis=2).astype(np.uint8)  # textured, colourless
    return Image.fromarray(gray).resize((size, size), Image.BICUBIC), "textured"


def _overlaps(box, boxes, margin: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin for b in boxes)


def _place(rng: np.random.Generator, boxes: list, size: int, size_names: list[str], tries: int):
    """``(size name, box)`` of a square that overlaps none of ``boxes``, or None after ``tries`` draws."""
    for _ in range(tries):
        size_name = str(rng.choice(size_names))
        lo, hi = SIZES[size_name]
        d = rng.uniform(lo, hi) * size
        x0, y0 = rng.uniform(1, size - d - 1, 2)
        box = (float(x0), float(y0), float(x0 + d), float(y0 + d))
        if not _overlaps(box, boxes, margin=0.03 * size):
            return size_name, box
    return None


def _layout(rng: np.random.Generator, n_objects: int, size: int, attempts: int = LAYOUT_ATTEMPTS) -> list:
    """``n_objects`` non-overlapping ``(size name, box)`` placed one after another at random.

    When an object does not fit, it is retried as a small one; when that fails too, the layout starts
    over (up to ``attempts`` layouts). A scene that fits at once draws the same random numbers as a
    single pass, so existing data sets are unchanged; crowded ones (up to ~10 objects) still place.
    """
    for _ in range(attempts):
        placed: list = []
        for _ in range(n_objects):
            boxes = [box for _, box in placed]
            spot = _place(rng, boxes, size, list(SIZES), tries=200) or _place(rng, boxes, size, ["small"], tries=5000)
            if spot is None:
                break
            placed.append(spot)
        else:
            return placed
    raise ValueError(
        f"could not place {n_objects} non-overlapping objects in a scene in {attempts} layouts (object sizes are "
        "fractions of the image side, so a larger image does not help); use fewer objects per image (--objects)"
    )


def make_scene(
    rng: np.random.Generator,
    n_objects: int,
    size: int = 128,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
) -> Scene:
    """A ``size×size`` scene with ``n_objects`` non-overlapping objects of distinct (colour, shape)."""
    pairs = [(c, s) for c in colours for s in shapes]
    if not 1 <= n_objects <= len(pairs):
        raise ValueError(f"a scene holds 1 to {len(pairs)} objects of distinct colour and shape, asked for {n_objects}")
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n_objects, replace=False)]
    image, background = _background(rng, size)
    draw = ImageDraw.Draw(image)
    objects: list[SceneObject] = []
    for (colour, shape), (size_name, box) in zip(chosen, _layout(rng, n_objects, size)):
        draw_shape(draw, shape, COLOURS[colour], box)
        objects.append(SceneObject(shape, colour, size_name, box))
    scene = Scene(image, objects, background)
    scene.expressions = [expressions(scene, i) for i in range(len(objects))]
    return scene


def expressions(scene: Scene, index: int) -> list[str]:
    """Referring expressions that name object ``index`` unambiguously."""
    obj = scene.objects[index]
    out = [obj.name, f"the {obj.name}"]
    same_size = [o for o in scene.objects if o.size == obj.size]
    if len(scene.objects) > 1 and len(same_size) == 1:
        out.append(f"the {obj.size} {obj.name}")
        out.append(f"{article(obj.size)} {obj.size} {obj.name}")
    shape_count = {s: sum(o.shape == s for o in scene.objects) for s in SHAPES}
    if shape_count[obj.shape] == 1:
        cx = (obj.box[0] + obj.box[2]) / 2
        for other in scene.objects:
            if other is obj or shape_count[other.shape] != 1:
                continue
            ox = (other.box[0] + other.box[2]) / 2
            if ox - cx > 0.15 * scene.image.width:
                out.append(f"the {obj.shape} left of the {other.shape}")
            elif cx - ox > 0.15 * scene.image.width:
                out.append(f"the {obj.shape} right of the {other.shape}")
    return out


def article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def scene_caption(scene: Scene, rng: Optional[np.random.Generator] = None) -> str:
    """A whole-image caption: ``"a red circle"``, ``"a red circle and a blue square"`` (random order)."""
    names = [f"{article(o.name)} {o.name}" for o in scene.objects]
    if rng is not None:
        names = [names[i] for i in rng.permutation(len(names))]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def mirror(scene: Scene) -> Scene:
    """The scene flipped left–right, with boxes and left/right expressions mirrored."""
    W = scene.image.width
    image = scene.image.transpose(Image.FLIP_LEFT_RIGHT)
    objects = [SceneObject(o.shape, o.colour, o.size, (W - o.box[2], o.box[1], W - o.box[0], o.box[3])) for o in scene.objects]
    flipped = Scene(image, objects, scene.background)
    flipped.expressions = [expressions(flipped, i) for i in range(len(objects))]
    return flipped


# ----------------------------------------------------------------------------------------------
# Writers: the generated scenes in the formats the task pipelines read


MAX_IMAGES = 1_000_000
SIZE_RANGE = (32, 4096)  # image side in pixels: smaller leaves no room for the objects' sizes and margins


def generate(seed: int, n_images: int, n_objects: tuple[int, int] = (3, 3), size: int = 256) -> list[Scene]:
    """``n_images`` scenes with ``n_objects[0]..n_objects[1]`` objects each, reproducible from ``seed``.

    Sizes are checked before anything is drawn: 1 to :data:`MAX_IMAGES` images, sides in :data:`SIZE_RANGE`,
    1 to 16 objects (one per colour and shape) with ``n_objects[0] <= n_objects[1]``."""
    check_count(n_images, "the number of images (--images)", 1, MAX_IMAGES)
    check_count(size, "the image side (--size, pixels)", *SIZE_RANGE)
    high = len(COLOURS) * len(SHAPES)
    low = check_count(n_objects[0], "the fewest objects per image (--objects)", 1, high)
    check_count(n_objects[1], f"the most objects per image (--objects, at least {low})", low, high)
    rng = np.random.default_rng(seed)
    return [make_scene(rng, int(rng.integers(n_objects[0], n_objects[1] + 1)), size) for _ in range(n_images)]


def image_file_name(image_id: int) -> str:
    """COCO train2014 naming, as RefCOCO and ReCLIP expect."""
    return f"COCO_train2014_{image_id:012d}.jpg"


def _xywh(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def write_images(scenes: list[Scene], image_root) -> None:
    from pathlib import Path

    image_root = Path(image_root)
    image_root.mkdir(parents=True, exist_ok=True)
    for image_id, scene in enumerate(scenes, start=1):
        scene.image.save(image_root / image_file_name(image_id), quality=95)


def _refs(scenes: list[Scene], split: str):
    """(ref dicts in the refer layout, COCO instances dict, categories)."""
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    images, annotations, refs = [], [], []
    ann_id = sent_id = 0
    for image_id, scene in enumerate(scenes, start=1):
        images.append(
            {"id": image_id, "file_name": image_file_name(image_id), "width": scene.image.width, "height": scene.image.height}
        )
        for obj, exprs in zip(scene.objects, scene.expressions):
            ann_id += 1
            x, y, w, h = _xywh(obj.box)
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "bbox": [x, y, w, h],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                    "category_id": SHAPES.index(obj.shape) + 1,
                }
            )
            sentences = []
            for raw in exprs:
                sent_id += 1
                sentences.append({"raw": raw, "sent": raw.lower(), "tokens": raw.lower().split(), "sent_id": sent_id})
            refs.append(
                {
                    "ref_id": ann_id,
                    "ann_id": ann_id,
                    "image_id": image_id,
                    "split": split,
                    "category_id": SHAPES.index(obj.shape) + 1,
                    "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "sentences": sentences,
                }
            )
    return refs, {"images": images, "annotations": annotations, "categories": categories}


def write_refer(scenes: list[Scene], data_root, dataset: str = "synthetic", split: str = "val", split_by: str = "unc") -> None:
    """``data_root/<dataset>/refs(<split_by>).p`` and ``instances.json`` (the `refer` layout)."""
    import pickle
    from pathlib import Path

    folder = Path(data_root) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    refs, instances = _refs(scenes, split)
    with open(folder / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f)
    (folder / "instances.json").write_text(json.dumps(instances))


def write_reclip(scenes: list[Scene], path, dets_path=None) -> None:
    """ReCLIP JSONL (one line per referred object) and, optionally, a detections file with the gold boxes."""
    from pathlib import Path

    refs, instances = _refs(scenes, "val")
    anns_by_image: dict[int, list] = {}
    for ann in instances["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append({"id": ann["id"], "bbox": ann["bbox"]})
    with open(path, "w", encoding="utf-8") as f:
        for ref in refs:
            line = {
                "file_name": ref["file_name"],
                "image_id": ref["image_id"],
                "anns": anns_by_image[ref["image_id"]],
                "ann_id": ref["ann_id"],
                "sentences": [{"raw": s["raw"]} for s in ref["sentences"]],
            }
            f.write(json.dumps(line) + "\n")
    if dets_path is not None:
        dets = {str(i): [a["bbox"] for a in anns] for i, anns in anns_by_image.items()}
        Path(dets_path).write_text(json.dumps(dets))


def write_regions(scenes: list[Scene], path, classes_path) -> None:
    """Generic region-classification JSONL (``image``, ``label`` = "<colour> <shape>", ``box``) + classes file."""
    from pathlib import Path

    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    with open(path, "w", encoding="utf-8") as f:
        for image_id, scene in enumerate(scenes, start=1):
            for obj in scene.objects:
                line = {"image": image_file_name(image_id), "label": obj.name, "box": [round(v, 2) for v in obj.box]}
                f.write(json.dumps(line) + "\n")
    Path(classes_path).write_text("\n".join(names) + "\n")


def write_all(output, seed: int = 0, n_images: int = 100, n_objects: tuple[int, int] = (3, 3), size: int = 256) -> dict:
    """Generate scenes and write every format under ``output``; returns the paths."""
    from pathlib import Path

    out = Path(output)
    scenes = generate(seed, n_images, n_objects, size)
    paths = dict(
        image_root=out / "images",
        data_root=out / "refer",
        reclip=out / "reclip_val.jsonl",
        detections=out / "synthetic_dets_dict.json",
        regions=out / "regions.jsonl",
        classes=out / "classes.txt",
    )
    out.mkdir(parents=True, exist_ok=True)
    write_images(scenes, paths["image_root"])
    write_refer(scenes, paths["data_root"])
    write_reclip(scenes, paths["reclip"], paths["detections"])
    write_regions(scenes, paths["regions"], paths["classes"])
    return paths
