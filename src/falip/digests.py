"""What a run's answers depend on: file digests (cached), file stamps, and the description of a run's inputs."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Optional

from .files import atomic_write


def _digest_cache() -> Path:
    return Path(os.environ.get("FALIP_CACHE_DIR", "~/.cache/falip")).expanduser() / "digests.json"


_DIGEST_LOCK = threading.Lock()


def file_digest(path) -> str:
    """SHA-256 (hex, 16 chars) of a file's bytes, cached per (absolute path, size, mtime, ctime, inode) so
    large weights files are hashed once, not on every run (a file rewritten with its old size and mtime
    still has a new ctime: the kernel sets it on every change, no user can)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    cache_file = _digest_cache()
    with _DIGEST_LOCK:
        try:
            cache = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
        hit = cache.get(key) if isinstance(cache, dict) else None
        if isinstance(hit, dict) and hit.get("stamp") == stamp:
            return hit["sha256"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        digest = h.hexdigest()[:16]
        cache = cache if isinstance(cache, dict) else {}
        cache[key] = {"stamp": stamp, "sha256": digest}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_file, json.dumps(cache))
        except OSError:
            pass  # an unwritable cache only costs re-hashing next time
        return digest


def file_stamp(path) -> Optional[str]:
    """``"<size>:<mtime_ns>:<ctime_ns>:<inode>"`` of a file (None when it is missing): a cheap per-record
    identity of an image, so a resume recomputes the samples whose image file was replaced or rewritten
    (even with its old size and mtime restored: the ctime changes)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def describe_inputs(models=(), files: Optional[dict] = None, image_root=None) -> dict:
    """The inputs that determine a run's answers besides its settings (stored and checked on resume).

    models: FalipModels (their weights digest; None for a stand-in without one); files: ``{name: path}`` of annotation files (a
    digest each; folders by absolute path); image_root: by absolute path.
    """
    out: dict = {"weights": [m.weights_digest() if hasattr(m, "weights_digest") else None for m in models]}
    for name, path in sorted((files or {}).items()):
        if path is None:
            continue
        p = Path(path).expanduser()
        out[name] = file_digest(p) if p.is_file() else str(p.resolve())
    if image_root is not None:
        out["image_root"] = str(Path(image_root).expanduser().resolve())
    return out
