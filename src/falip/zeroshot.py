"""Zero-shot classifiers: class names × prompt templates → averaged, normalised text embeddings.

Templates are strings with a ``{}`` placeholder. Built-in sets: ``openai`` (the 80 OpenAI
ImageNet templates shipped with open_clip) and ``simple`` (``"a photo of a {}."``). A user file
is either a JSON list of templates, a JSON object ``{class: [prompt, ...]}`` with ready prompts
per class, or a text file with one template per line.

Classifiers are cached on disk (``$FALIP_CACHE_DIR`` or ``~/.cache/falip``), keyed by a hash of
the runtime's text digest (the full text tower's weights, its dtype, the tokenizer), the class names
and the prompts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .errors import FalipError
from .files import atomic_write
from .inputs import read_text

Templates = Union[list, dict]


def builtin_templates(name: str) -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if name == "openai":
        return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    if name == "simple":
        return ["a photo of a {}."]
    if name == "simple-openai":
        return [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    raise FalipError(f"unknown template set {name!r}: use openai, simple, simple-openai or a file")


def load_templates(spec: Optional[str] = None) -> Templates:
    """Templates from a built-in name (default ``openai``) or a file (see module docstring)."""
    if spec is None or spec in ("openai", "simple", "simple-openai"):
        return builtin_templates(spec or "openai")
    path = Path(spec)
    if not (path.exists() or path.is_symlink()):
        raise FalipError(f"template file not found: {path} (built-in sets: openai, simple, simple-openai)")
    text = read_text(path, "template file")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FalipError(f"{path} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and all(isinstance(v, list) and v for v in data.values()):
            return {str(k): [str(p) for p in v] for k, v in data.items()}
        if isinstance(data, list) and data and all(isinstance(t, str) for t in data):
            templates = data
        else:
            raise FalipError(f"{path} must hold a list of templates or {{class: [prompts]}}")
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise FalipError(f"{path}: every template needs a '{{}}' placeholder for the class name; bad: {bad[:3]}")
    return templates


def class_prompts(classnames: Sequence[str], templates: Templates) -> list[list[str]]:
    """Prompts per class: ``templates`` filled with each class name, or looked up in a prompt dict."""
    if isinstance(templates, dict):
        missing = [c for c in classnames if c not in templates]
        if missing:
            raise FalipError(f"the prompt file has no prompts for classes {missing[:5]}")
        return [list(templates[c]) for c in classnames]
    return [[t.replace("{}", c) for t in templates] for c in classnames]


def text_fingerprint(model) -> str:
    """Hash of everything that determines text embeddings (``runtime.digest("text")``: every text-tower
    tensor, the model's dtype, and the tokenizer's identity)."""
    return model.runtime.digest("text")[:32]


def cache_dir() -> Path:
    return Path(os.environ.get("FALIP_CACHE_DIR", "~/.cache/falip")).expanduser() / "zeroshot"


@torch.no_grad()
def zero_shot_classifier(
    model,
    classnames: Sequence[str],
    templates: Optional[Templates] = None,
    use_cache: bool = True,
    batch_size: int = 256,
) -> torch.Tensor:
    """``(C, E)`` L2-normalised class embeddings: the mean of each class's normalised prompt embeddings."""
    classnames = [str(c) for c in classnames]
    if not classnames:
        raise FalipError("no class names given")
    if len(set(classnames)) != len(classnames):
        raise FalipError("class names must be unique")
    templates = load_templates() if templates is None else templates
    prompts = class_prompts(classnames, templates)
    key = hashlib.sha256(json.dumps([text_fingerprint(model), prompts]).encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.pt"
    if use_cache and path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    flat = [p for per_class in prompts for p in per_class]
    emb = torch.cat([model.encode_text(flat[i : i + batch_size]).cpu() for i in range(0, len(flat), batch_size)])
    weights, start = [], 0
    for per_class in prompts:
        weights.append(F.normalize(emb[start : start + len(per_class)].mean(0), dim=-1))
        start += len(per_class)
    classifier = torch.stack(weights)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(classifier, buffer)
        atomic_write(path, buffer.getvalue())  # a unique temporary file per call: threads and ranks fill the cache at once
    return classifier
