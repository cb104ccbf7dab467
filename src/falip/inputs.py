"""Reading what users give: paths checked for what they are, text files, the structure of records, bounded sizes.

One helper per concern, used by every reader of the package (images, masks, annotation formats, point clouds):

- :func:`check_path`: a path that is not the expected regular file (or folder) is an error saying what it
  is — missing, a folder, a named pipe, a device, a broken symlink, a symlink loop, unreadable;
- :func:`read_text`: UTF-8 text (a leading byte-order mark is dropped, as Windows editors write one); a
  file that is not UTF-8 is an error naming the file, line and column;
- :func:`require` / :func:`field_of` / :func:`check`: a JSON object's keys, and its values checked as one :data:`Kind` — errors
  name the file, the line or record, and the field; booleans are never numbers;
- :func:`check_count` / :func:`check_claim`: a size that a user or a file states is checked against a
  bound and against what the file holds before anything is allocated;
- :func:`warn_overlong`: texts longer than the model's text context (which its tokenizer cuts) are
  counted and warned about (:class:`TextTruncatedWarning`).

The checks raise :class:`falip.errors.InputFileError` (or the error class a caller passes).
"""

from __future__ import annotations

import errno
import math
import numbers
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

from .errors import FalipError, InputFileError
from .notices import warn

PathLike = Union[str, os.PathLike]
PathKind = Literal["file", "folder"]
Kind = Literal["str", "id", "number", "box", "list", "dict"]

# The largest array one input file may make falip allocate (points, HDF5 datasets, .npy), in bytes.
MAX_ARRAY_BYTES = 4 * 2**30

REQUIRED = object()


# ----------------------------------------------------------------------------------------------
# Paths


def check_path(path: PathLike, what: str, kind: PathKind = "file", error: type[FalipError] = InputFileError) -> Path:
    """``path`` when it is a readable regular file (or a folder); else ``error`` saying what it is.

    ``what`` names the input in the message (``"mask file"``, ``"annotations file"``)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise error(_stat_problem(path, what, exc)) from None
    if kind == "folder":
        if not stat.S_ISDIR(st.st_mode):
            raise error(f"{what} {path} is {_kind_of(st.st_mode)}, not a folder")
        return path
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {_kind_of(st.st_mode)}, not a regular file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} is not readable (permission denied)")
    return path


def _stat_problem(path: Path, what: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        if path.is_symlink():
            return f"{what} {path} is a broken symlink (to {os.readlink(path)}, which does not exist)"
        folder = path.parent
        return f"{what} not found: {path}" + ("" if folder.is_dir() else f" (its folder {folder} does not exist)")
    if exc.errno == errno.ELOOP:
        problem = "is a symlink loop (links that point back to each other)"
    elif exc.errno == errno.ENOTDIR:
        problem = "cannot exist: a part of its path is a file, not a folder"
    elif exc.errno == errno.EACCES:
        problem = "cannot be reached (permission denied on a folder of the path)"
    elif exc.errno == errno.ENAMETOOLONG:
        problem = "is too long a path name"
    else:
        problem = f"cannot be read ({exc.strerror or exc})"
    return f"{what} {path} {problem}"


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


# ----------------------------------------------------------------------------------------------
# Text files


def read_text(path: PathLike, what: str) -> str:
    """The UTF-8 text of a file (a byte-order mark at its start is dropped; line ends are kept).

    Raises InputFileError naming the file, line and column of the first byte that is not UTF-8."""
    path = check_path(path, what)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise InputFileError(
            f"{what} {path}:{line}: not UTF-8 text (byte 0x{data[start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def text_lines(path: PathLike, what: str) -> list[str]:
    """The lines of a UTF-8 text file (see :func:`read_text`), split on ``\\n`` only, without ``\\r``/``\\n``.

    Only ``\\n`` ends a line, so line numbers are those of editors and a JSON string holding U+2028 stays whole."""
    return [line.removesuffix("\r") for line in read_text(path, what).split("\n")]


# ----------------------------------------------------------------------------------------------
# Records: values of JSON objects, JSONL lines and pickles, checked by kind

_KIND_TEXT = {
    "str": "a string",
    "id": "an id (a string or an integer)",
    "number": "a finite number",
    "box": "a box of 4 finite numbers",
    "list": "a list",
    "dict": "a JSON object",
}


def describe(value: Any) -> str:
    """A short phrase for a value of the wrong kind: ``"true"``, ``"the number 3"``, ``"a string 'x'"``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, numbers.Number):
        return f"the number {value!r}" if len(repr(value)) <= 40 else "a number too large to use"
    if isinstance(value, str):
        return f"a string {value[:40]!r}"
    if isinstance(value, dict):
        return f"an object with keys {sorted(map(str, value))[:5]}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise TypeError
    out = float(value)  # OverflowError for integers beyond the float range
    if not math.isfinite(out):
        raise OverflowError
    return out


def check(value: Any, kind: Kind, where: str, name: str = "value", form: str = "") -> Any:
    """``value`` as ``kind`` (``"id"`` → str, ``"number"`` → float, ``"box"`` → tuple of 4 floats), else
    InputFileError ``"<where>: <name> must be <kind or form>, got <what it is>"``."""
    try:
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "id" and (isinstance(value, str) or (isinstance(value, numbers.Integral) and not isinstance(value, bool))):
            return str(value)
        if kind == "number":
            return _number(value)
        if kind == "box" and isinstance(value, (list, tuple)) and len(value) == 4:
            return tuple(_number(v) for v in value)
        if kind == "list" and isinstance(value, (list, tuple)):
            return list(value)
        if kind == "dict" and isinstance(value, dict):
            return value
    except (TypeError, ValueError, OverflowError):
        pass
    got = describe(value)
    if kind == "box" and isinstance(value, (list, tuple)) and len(value) == 4:
        bad = next(v for v in value if not _is_number(v))
        got = f"{list(value)!r:.80} ({describe(bad)} is not a finite number)"
    raise InputFileError(f"{where}: {name} must be {form or _KIND_TEXT[kind]}, got {got}")


def require(record: Any, keys: Sequence[str], where: str, expected: str = "") -> dict:
    """``record`` when it is a dict (a JSON object) holding every key of ``keys``; else InputFileError naming
    ``where`` and all the missing keys (``expected`` describes the format, e.g. ``"ReCLIP JSONL"``)."""
    hint = f" (expected {expected})" if expected else ""
    if not isinstance(record, dict):
        raise InputFileError(f"{where}: expected a JSON object, got {describe(record)}{hint}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputFileError(f"{where} lacks {', '.join(missing)}{hint}")
    return record


def field_of(record: Any, key: str, kind: Kind, where: str, default: Any = REQUIRED, form: str = "") -> Any:
    """``record[key]`` checked as ``kind`` (see :func:`check`; ``form`` describes the expected value); a missing
    key is ``default``, or an error. ``record`` must be a dict (a JSON object), see :func:`require`."""
    require(record, (), where)
    if key not in record:
        if default is REQUIRED:
            raise InputFileError(f"{where}: '{key}' is missing (keys: {', '.join(sorted(map(str, record))) or 'none'})")
        return default
    return check(record[key], kind, where, f"'{key}'", form)


def _is_number(value: Any) -> bool:
    try:
        _number(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Sizes


def check_count(value: Any, name: str, low: int, high: int) -> int:
    """An integer ``low <= value <= high`` (a user's or a file's size, count or side), else InputFileError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise InputFileError(f"{name} must be an integer from {low} to {high}, got {describe(value)}")
    return int(value)


def check_claim(claimed_bytes: int, available_bytes: int, where: str, what: str) -> None:
    """A header claiming ``claimed_bytes`` of data: refused when the file holds fewer bytes, or the claim is
    over :data:`MAX_ARRAY_BYTES` — before anything of that size is allocated."""
    if claimed_bytes > available_bytes:
        raise InputFileError(
            f"{where}: the header announces {what} ({claimed_bytes} bytes) but the file holds only {available_bytes} "
            "bytes after it; the file is truncated or its header is wrong"
        )
    check_array_bytes(claimed_bytes, where, what)


def check_array_bytes(nbytes: int, where: str, what: str) -> None:
    """Refuse an array of ``nbytes`` over :data:`MAX_ARRAY_BYTES` before it is allocated."""
    if nbytes > MAX_ARRAY_BYTES:
        raise InputFileError(
            f"{where}: {what} would take {nbytes / 2**30:.1f} GiB, over falip's limit of {MAX_ARRAY_BYTES / 2**30:.0f} GiB "
            "for one input array; split the file"
        )


# ----------------------------------------------------------------------------------------------
# Texts longer than the model's context


class TextTruncatedWarning(UserWarning):
    """Texts longer than the model's text context were cut to it (the authors' code refuses them)."""


def token_counts(runtime, texts: Sequence[str]) -> Optional[tuple[list[int], int]]:
    """``(tokens per text, with start/end tokens; the context length)`` from the runtime's own tokenizer
    (open_clip's BPE tokenizer, open_clip's HF wrapper, or an HF tokenizer), or None when it cannot tell."""
    tok = getattr(runtime, "tokenizer", None)
    if tok is None:
        return None
    if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip SimpleTokenizer: <sot> text <eot>
        return [len(tok.encode(t)) + 2 for t in texts], int(tok.context_length)
    hf, context = (tok.tokenizer, getattr(tok, "context_length", None)) if hasattr(tok, "tokenizer") else (tok, None)
    context = context or getattr(runtime, "context_length", None)
    if context is None or not callable(hf):
        return None
    return [len(ids) for ids in hf(list(texts), truncation=False, verbose=False)["input_ids"]], int(context)


def overlong_texts(model, texts: Sequence[str]) -> dict[str, int]:
    """``{text: tokens}`` of the distinct texts longer than ``model``'s text context (they are truncated when encoded)."""
    unique = list(dict.fromkeys(texts))
    counted = token_counts(model.runtime, unique)
    if counted is None:
        return {}
    counts, context = counted
    return {t: n for t, n in zip(unique, counts) if n > context}


def warn_overlong(model, texts: Sequence[str], what: str = "texts") -> int:
    """Warn once (:class:`TextTruncatedWarning`, counted) when texts exceed ``model``'s context; returns how many
    of ``texts`` (with repeats) do — the number a run records."""
    over = overlong_texts(model, texts)
    n = sum(1 for t in texts if t in over)
    if n:
        example, tokens = max(over.items(), key=lambda kv: kv[1])
        context = token_counts(model.runtime, [example])[1]
        warn(
            f"{n} of {len(texts)} {what} are longer than the model's text context of {context} tokens and are cut to it "
            f"(the authors' code refuses them); the longest has {tokens} tokens: {example[:60]!r}",
            TextTruncatedWarning,
        )
    return n
