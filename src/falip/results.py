"""Results of evaluation runs: one JSON per run, per-sample JSONL, resume, and aggregation.

Layout (the clip_benchmark convention, plus what a long run needs)::

    results.json                  {"task", "metrics", "config", "skipped", "n_predictions",
                                   "predictions", "falip_version", "created", "elapsed_s"}
    results.predictions.jsonl     line 1: {"config": ...}; then one record per sample:
                                   {"id": ..., ...} or {"id": ..., "skipped": reason, "detail": ...}

A run re-started with the same ``--output``, the same config and the same inputs (weights digest,
annotation files, image root) resumes: samples already in the JSONL are not computed again. A
different config or input refuses to mix results and names what differs (start a new output or
pass ``resume=False`` to overwrite).

A distributed run (:mod:`falip.distributed`) has each rank write its records to a *shard*
``<predictions>.rank{r}-of-{w}`` (same header, then that rank's records); rank 0 merges the shards
into the predictions file at the end and deletes them. A recorder opened on a predictions file
first absorbs any shards left next to it by an interrupted run (of any world size, validated like
the file itself), so an interrupted distributed run resumes with or without torchrun.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional

from .errors import FalipError
from .files import atomic_write
from .notices import warn
from .version import __version__

MAX_SKIP_EXAMPLES = 50
MAX_DIFFERENCES = 6


class ResumeMismatchError(FalipError):
    """Existing predictions were produced with a different configuration or different inputs."""


class OutputInUseError(FalipError):
    """Another live process (or recorder) is writing the same outputs."""


class OutputWriteError(FalipError, OSError):
    """Writing an output failed (full disk, file-size limit, I/O error); the message names the file."""

    def __init__(self, path, exc: OSError):
        OSError.__init__(self, exc.errno, exc.strerror, str(path))
        self.message = (
            f"cannot write {path}: {exc.strerror or exc}"
            + (" (free some space, or write the outputs elsewhere)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "")
            + (" (the file-size limit, ulimit -f, or the file system's largest file)" if exc.errno == errno.EFBIG else "")
            + "; what was written before is kept and a rerun resumes from it"
        )

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def writing(path):
    """Turn an ``OSError`` while writing ``path`` into an :class:`OutputWriteError` that names it."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError(path, exc) from exc


def predictions_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".predictions.jsonl")


def shard_path(predictions: Path, rank: int, world_size: int) -> Path:
    """``<predictions>.rank{rank}-of-{world_size}``: the records one rank of a distributed run writes."""
    predictions = Path(predictions)
    return predictions.with_name(f"{predictions.name}.rank{rank}-of-{world_size}")


def shard_files(predictions: Path) -> list[Path]:
    """The shard files next to ``predictions`` (any world size), sorted by (world size, rank)."""
    predictions = Path(predictions)
    pattern = re.compile(re.escape(predictions.name) + r"\.rank(\d+)-of-(\d+)")
    found = []
    if predictions.parent.is_dir():
        for path in predictions.parent.iterdir():
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                found.append(((int(match.group(2)), int(match.group(1))), path))
    return [path for _, path in sorted(found)]


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def flatten(obj, prefix: str = "") -> dict:
    """``{"a": {"b": [1, {"c": 2}]}}`` → ``{"a.b[0]": 1, "a.b[1].c": 2}`` (lists of scalars stay whole)."""
    if isinstance(obj, dict):
        items = {}
        for k, v in obj.items():
            items.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return items or {prefix: {}}
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        items = {}
        for i, v in enumerate(obj):
            items.update(flatten(v, f"{prefix}[{i}]"))
        return items
    return {prefix: obj}


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_differences(old: dict, new: dict) -> str:
    """``"image_root: '/a' → '/b'; weights[0]: ..."``: the settings that differ between two fingerprints."""
    a, b = flatten(old), flatten(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if _canonical(a.get(k, "<unset>")) != _canonical(b.get(k, "<unset>"))]
    parts = [f"{k}: {_short(a.get(k, '<unset>'))} -> {_short(b.get(k, '<unset>'))}" for k in keys[:MAX_DIFFERENCES]]
    if len(keys) > MAX_DIFFERENCES:
        parts.append(f"and {len(keys) - MAX_DIFFERENCES} more")
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Output files: checks before work, locks


def check_output_path(path, what: str = "output") -> Path:
    """``path`` as a Path after checking it can be written (not a folder, its folder creatable and writable)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FalipError(f"{what} {path} is a folder; give a file name (e.g. {path / 'results.json'})")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FalipError(f"cannot create the folder of {what} {path}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise FalipError(f"{what} {path} is not writable (permission denied)")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_apart(outputs: dict, reads: Iterable) -> None:
    """:class:`FalipError` when an output (``{what: path}``, e.g. ``--output``) is one of the files the run
    ``reads`` (annotations, classes, templates, detections, weights, images …): it would be destroyed."""
    reads = [Path(r).expanduser() for r in reads if r is not None]
    for what, out in outputs.items():
        if out is None:
            continue
        out = Path(out).expanduser()
        for r in reads:
            if _same_file(out, r):
                raise FalipError(
                    f"{what} {out} is an input of this run ({r}); writing it would destroy it: choose another {what}"
                )


def _written_by_falip(path: Path, kind: Literal["results", "predictions"]) -> bool:
    """True when ``path`` is missing, empty, or a file falip writes (a results JSON, or a predictions file:
    its first line is the ``{"config": ...}`` header); falip never replaces any other file."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return not path.exists() or path.is_file()
        if kind == "predictions":
            with open(path, "rb") as f:
                return f.read(len(_HEADER_START)) == _HEADER_START
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and "task" in result and "metrics" in result


_HEADER_START = b'{"config": '


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_text(path: str) -> Optional[str]:
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def process_identity() -> dict:
    """Where this process runs: ``{pid, host, boot_id, pid_ns}`` — the host name, the kernel's boot id
    (``/proc/sys/kernel/random/boot_id``) and the PID namespace (the inode of ``/proc/self/ns/pid``).
    A PID means something only to a reader with the same host, boot id and PID namespace."""
    try:
        pid_ns: Optional[str] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": pid_ns,
    }


_PLACE = ("host", "boot_id", "pid_ns")
_HOLDERS: dict[str, weakref.ref] = {}  # lock path -> the recorder of this process holding it


class _OutputLock:
    """``<file>.lock`` holding the writer's :func:`process_identity`: a second live writer is refused; a
    lock is taken over as stale only when it was written on this host, in this boot and PID namespace,
    by a process that is gone (a lock from elsewhere, or one that cannot be read, is refused with how to
    remove it); within one process a newer recorder supersedes an older one."""

    def __init__(self, target: Path, owner: RunRecorder):
        self.path = target.with_name(target.name + ".lock")
        me = process_identity()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                here = holder is not None and all(holder.get(k) == me[k] for k in _PLACE)
                if here and holder["pid"] == me["pid"]:
                    previous = _HOLDERS.get(str(self.path))
                    previous = previous() if previous else None
                    if previous is not None and previous is not owner:
                        previous._superseded = True
                    break
                if here and _pid_alive(holder["pid"]):
                    raise OutputInUseError(
                        f"{target} is being written by another falip process (PID {holder['pid']}, lock {self.path}); "
                        "wait for it to finish or choose another --output"
                    ) from None
                if not here:
                    raise OutputInUseError(self._foreign(target, holder, me)) from None
                self.path.unlink(missing_ok=True)  # stale: its process, on this host and namespace, is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            break
        else:
            raise OutputInUseError(f"cannot take the lock {self.path} on {target}")
        _HOLDERS[str(self.path)] = weakref.ref(owner)

    def _foreign(self, target: Path, holder: Optional[dict], me: dict) -> str:
        """Why a lock this process cannot check is refused, and how to remove it."""
        if holder is None:
            who = "another falip process (its lock cannot be read"
        elif set(_PLACE) - set(holder):
            who = f"another falip process (PID {holder['pid']}, a lock without its host and PID namespace"
        else:
            where = ", ".join(f"{k} {holder[k]}" for k in _PLACE if holder.get(k) != me[k])
            who = f"another falip process (PID {holder['pid']} of another host or PID namespace: {where}"
        return (
            f"{target} is being written by {who}; lock {self.path}); falip cannot tell from here whether it still runs: "
            f"wait for it to finish or choose another --output; if no falip process is writing it, delete {self.path} "
            "and run again"
        )

    def _holder(self) -> Optional[dict]:
        """The lock's identity (a bare PID from an older falip: ``{"pid": n}``); None when it cannot be read."""
        for attempt in range(5):  # a lock just created may not hold its identity yet
            text = _read_text(str(self.path))
            if text is not None:
                try:
                    value = json.loads(text)
                except ValueError:
                    value = None
                if isinstance(value, int) and not isinstance(value, bool):
                    return {"pid": value}
                if isinstance(value, dict) and isinstance(value.get("pid"), int):
                    return value
            time.sleep(0.02 * (attempt + 1))
        return None

    def held(self) -> bool:
        holder = self._holder()
        me = process_identity()
        return holder is not None and all(holder.get(k) == me[k] for k in ("pid", *_PLACE))

    def release(self, owner: RunRecorder) -> None:
        ref = _HOLDERS.get(str(self.path))
        if ref is not None and ref() is owner:
            del _HOLDERS[str(self.path)]
            if self.held():
                self.path.unlink(missing_ok=True)


def _release_if_abandoned(lock_path: str) -> None:
    """When a recorder is garbage-collected without finishing, remove its lock (if no newer recorder holds it)."""
    ref = _HOLDERS.get(lock_path)
    if ref is not None and ref() is not None:
        return
    _HOLDERS.pop(lock_path, None)
    try:
        held = json.loads(Path(lock_path).read_text()) == process_identity()
    except (OSError, ValueError):
        held = False
    if held:
        Path(lock_path).unlink(missing_ok=True)


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(records of the complete, parseable lines, number of lines dropped: cut or garbled)."""
    records, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not line.endswith("\n") or not isinstance(record, dict):
                bad += 1  # a last line without its newline was cut short, even if it parses
                continue
            records.append(record)
    return records, bad


class RunRecorder:
    """Records one evaluation run.

    >>> rec = RunRecorder("out/rec.json", task="rec", config={...}, inputs=describe_inputs([model], ...))
    >>> for sample in data:
    ...     if sample.id in rec.done: continue
    ...     try: rec.add(sample.id, correct=..., pred=...)
    ...     except SomeInputError as e: rec.skip(sample.id, "missing image", str(e))
    >>> rec.finish(metrics={"acc": ...})

    ``done`` maps sample id → its record (including those loaded from a previous run).
    ``predictions``: the JSONL path (default: ``<output stem>.predictions.jsonl`` next to ``output``).
    ``inputs``: what besides ``config`` determines the answers (:func:`describe_inputs`); a resume
    with different config or inputs is refused, naming what differs.

    Both paths are checked before any work; the predictions file is locked against a second
    process; cut or garbled lines left by a crash are dropped on resume (those samples are
    recomputed) and the final JSONL holds one parseable line per sample; the results JSON is
    replaced atomically.

    ``shard=(rank, world_size)``: the recorder of one rank of a distributed run. It writes a fresh
    shard file :func:`shard_path` (locked like a predictions file), takes the records of the
    predictions file as done (read, checked, never written) and has no :meth:`finish` (rank 0
    merges, see :mod:`falip.distributed`). Without ``shard``, a resuming recorder absorbs the shard
    files of an interrupted distributed run into the predictions file; ``resume=False`` deletes them.
    """

    def __init__(
        self,
        output,
        task: str,
        config: dict,
        resume: bool = True,
        predictions=None,
        inputs: Optional[dict] = None,
        shard: Optional[tuple[int, int]] = None,
        reads: Iterable = (),
    ):
        self.output = check_output_path(output, "output")
        self.task = task
        self.config = json.loads(_canonical(config))
        self.inputs = json.loads(_canonical(inputs or {}))
        self.main_path = check_output_path(
            Path(predictions) if predictions is not None else predictions_path(self.output), "predictions file"
        )
        if self.main_path.resolve() == self.output.resolve():
            raise FalipError(f"the results JSON and the predictions file are the same file: {self.output}")
        check_apart({"--output": self.output, "--predictions": self.main_path}, reads)
        for path, kind, what in (
            (self.output, "results", "a falip results JSON"),
            (self.main_path, "predictions", "a falip predictions file"),
        ):
            if not _written_by_falip(path, kind):
                raise FalipError(
                    f"{path} exists and is not {what}; falip does not replace it: choose another "
                    f"{'--output' if kind == 'results' else '--predictions'} (or move that file away)"
                )
        self.shard = shard
        self.pred_path = self.main_path if shard is None else shard_path(self.main_path, *shard)
        self.done: dict[str, dict] = {}
        self.resumed = 0  # how many records came from an earlier run
        self.started = time.time()
        self._superseded = False
        self._rewrite = False  # ids written more than once: compact the JSONL at the end
        self.fields: dict = {}  # added to the results JSON by whoever opened the recorder (e.g. a run's world size)
        if shard is None:
            self._check_results_owner()
        self._locks = [_OutputLock(self.pred_path, self)]
        try:
            if shard is None:
                self._locks.append(_OutputLock(self.output, self))  # one writer of the results JSON too
        except BaseException:
            self._release()
            raise
        for lock in self._locks:
            weakref.finalize(self, _release_if_abandoned, str(lock.path))
        try:
            if shard is not None:
                if resume and self.main_path.is_file():
                    self._load(self.main_path)
                with writing(self.pred_path):
                    self._file = open(self.pred_path, "w", encoding="utf-8")
                self._write(self._header())
            else:
                self._open_predictions(resume)
            self.resumed = len(self.done)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        for lock in self._locks:
            lock.release(self)

    def _open_predictions(self, resume: bool) -> None:
        """Load (``resume``) the predictions file and the shards left next to it, then open it for appending."""
        loaded = resume and self.pred_path.is_file() and self._load(self.pred_path)
        shards = shard_files(self.pred_path)
        locks: list[_OutputLock] = []
        try:
            for path in shards:
                locks.append(_OutputLock(path, self))  # refuses a shard that a live rank is writing
            absorbed = [self._load(path) for path in shards] if resume else []
            if any(absorbed) or (loaded and self._rewrite):
                self._compact()  # the shards' records are safely in the predictions file before the shards go
                loaded = True
            for path in shards:
                path.unlink(missing_ok=True)
        finally:
            for lock in locks:
                lock.release(self)
        self._rewrite = False
        with writing(self.pred_path):
            self._file = open(self.pred_path, "a" if loaded else "w", encoding="utf-8")
        if not loaded:
            self._write(self._header())

    def _header(self) -> dict:
        return {"config": self.config, "inputs": self.inputs, "task": self.task}

    def _check_results_owner(self) -> None:
        """One results JSON belongs to one predictions file."""
        if not self.output.is_file():
            return
        try:
            previous = json.loads(self.output.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # not a results file we wrote; it will be replaced
        name = previous.get("predictions") if isinstance(previous, dict) else None
        if isinstance(name, str) and (self.output.parent / name).resolve() != self.pred_path.resolve():
            raise ResumeMismatchError(
                f"{self.output} holds the results of predictions {self.output.parent / name}, not of {self.pred_path}; "
                f"use another --output for these predictions, or delete {self.output} if those results are not needed"
            )

    def _load(self, path: Path) -> bool:
        """Add the records of an earlier run's predictions file (or shard) to ``done``, later lines replacing
        earlier ones; False when it holds no complete line. Sets ``_rewrite`` when the file needs compacting."""
        records, bad = _read_jsonl(path)
        if not records:
            return False
        header = records[0] if records and "config" in records[0] else None
        if header is None:
            raise ResumeMismatchError(f"{path} is not a falip predictions file (no config header); use another --output")
        old = {"config": header.get("config"), "inputs": header.get("inputs", {})}
        new = {"config": self.config, "inputs": self.inputs}
        if _canonical(old) != _canonical(new):
            hint = ""
            if any(w is None or str(w).startswith("random:") for w in self.inputs.get("weights", [])):
                hint = " (a model with random weights differs on every load unless torch is seeded before loading)"
            raise ResumeMismatchError(
                f"{path} holds predictions made with a different configuration or inputs: "
                f"{describe_differences(old, new)}{hint}; use another --output, or --no-resume to overwrite it"
            )
        ids = [str(r["id"]) for r in records[1:] if "id" in r]
        for record in records[1:]:
            if "id" in record:
                self.done[str(record["id"])] = record
        if bad:
            warn(f"{path}: dropped {bad} cut or garbled line(s) left by an interrupted run; those samples are computed again")
        self._rewrite |= bool(bad) or len(ids) != len(set(ids))
        return True

    def _compact(self) -> None:
        """Rewrite the JSONL atomically: the header, then one parseable line per sample (the latest)."""
        lines = [self._header(), *self.done.values()]
        with writing(self.pred_path):
            atomic_write(self.pred_path, "".join(json.dumps(r, default=str) + "\n" for r in lines))

    def _write(self, record: dict) -> None:
        if self._superseded:
            raise OutputInUseError(f"{self.pred_path} was opened again by a newer run in this process; this one stopped")
        with writing(self.pred_path):
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()

    def add(self, sample_id, **fields) -> dict:
        record = {"id": str(sample_id), **fields}
        self._rewrite |= record["id"] in self.done
        self.done[record["id"]] = record
        self._write(record)
        return record

    def skip(self, sample_id, reason: str, detail: str = "") -> dict:
        return self.add(sample_id, skipped=reason, detail=detail)

    def records(self) -> list[dict]:
        """Records of samples that were not skipped."""
        return [r for r in self.done.values() if "skipped" not in r]

    def skipped_summary(self) -> dict:
        skipped = [r for r in self.done.values() if "skipped" in r]
        return {
            "count": len(skipped),
            "by_reason": dict(Counter(r["skipped"] for r in skipped)),
            "examples": [
                {"id": r["id"], "reason": r["skipped"], "detail": r.get("detail", "")} for r in skipped[:MAX_SKIP_EXAMPLES]
            ],
        }

    def close(self) -> None:
        """Close the predictions file and release its lock (``finish`` does this too)."""
        if not self._file.closed:
            with writing(self.pred_path):
                self._file.close()
        self._release()

    def finish(self, metrics: dict, *, order: Optional[Sequence[str]] = None, **extra) -> dict:
        """Write the results JSON (atomically) and return it.

        ``order``: sample ids in the order the predictions file lists them at the end (records of
        other ids follow, as they were); without it, the order they were added in."""
        if self.shard is not None:
            raise FalipError(f"{self.pred_path} is the shard of rank {self.shard[0]}: close it; rank 0 merges the shards")
        if self._superseded:
            raise OutputInUseError(f"{self.pred_path} was opened again by a newer run in this process; this one stopped")
        with writing(self.pred_path):
            self._file.close()
        if order is not None:
            ordered = {i: self.done[i] for i in map(str, order) if i in self.done}
            ordered.update(self.done)
            self._rewrite |= list(ordered) != list(self.done)
            self.done = ordered
        if self._rewrite:
            self._compact()  # a retried sample's new record replaces its old one; the order asked for
        result = {
            "task": self.task,
            "metrics": metrics,
            "config": self.config,
            "inputs": self.inputs,
            "skipped": self.skipped_summary(),
            "n_predictions": len(self.records()),
            "predictions": self.pred_path.name if self.pred_path.parent == self.output.parent else str(self.pred_path),
            **extra,
            **self.fields,
            "falip_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - self.started, 2),
        }
        try:
            with writing(self.output):
                atomic_write(self.output, json.dumps(result, indent=2, default=str))
        finally:
            self._release()
        return result
