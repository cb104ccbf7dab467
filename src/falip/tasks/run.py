"""The skeleton every evaluation run shares (rec, classify, pointcloud, heads).

A task describes its work as *units* (lists of samples that stay together: an image and its
sentences, an image's regions, one cloud) and keeps only what is its own: how to load and score a
batch, and its metrics. :class:`Run` does the rest:

1. the fingerprint (:func:`fingerprint`: what the scorer describes about itself, merged with the
   caller's extras), the recorder (:func:`falip.distributed.open_recorder`: resume, locks, shards);
2. :meth:`Run.plan`: this rank's units, each cut to its pending samples (not done yet; a skipped one
   again when the task retries skips; one whose image file changed since: ``image_stamp``), the
   progress bar;
3. :meth:`Run.batches`: the DataLoader; :meth:`Run.advance`: progress and running accuracy;
4. :meth:`Run.totals` / :meth:`Run.seconds`: counters over all ranks;
5. :meth:`Run.finish`: on rank 0, the task's :class:`Summary` of every record, the one rule for
   "this run lost most of its inputs" (:func:`lost_inputs`), and the results JSON.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, TypeVar

from tqdm.auto import tqdm

from .. import distributed
from ..digests import file_stamp
from ..errors import FalipError
from ..images import RotationNotice
from ..notices import warn
from ..results import RunRecorder
from .loader import default_workers, load_batches

S = TypeVar("S")
LOST_SHARE = 0.5  # a run that lost more than this share of its items refuses to write results unless allowed


class LostInputsError(FalipError):
    """A run lost more than :data:`LOST_SHARE` of its items (skipped, or scored without their region)."""


class LostInputsWarning(UserWarning):
    """Some of a run's items were skipped or scored without their region (one counted line)."""


def digest(obj) -> str:
    """SHA-256 (hex, 16 chars) of a JSON-able value's canonical form: templates, class lists, prompts."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(described: dict, extra: Optional[dict] = None) -> dict:
    """What identifies a run: ``described`` (what the scorer or classifier says about itself: model,
    config, method, mode, preprocessing, templates …) merged with the caller's ``extra`` fields. The
    caller adds, never replaces: an extra that contradicts the description is a :class:`FalipError`."""
    extra = dict(extra or {})
    for key, value in extra.items():
        if key in described and json.dumps(value, sort_keys=True, default=str) != json.dumps(
            described[key], sort_keys=True, default=str
        ):
            raise FalipError(
                f"run_config[{key!r}] = {value!r} contradicts what the run uses ({described[key]!r}); "
                "run_config adds fields to the fingerprint, it cannot change them"
            )
    return {**extra, **described}


@dataclass
class Summary:
    """What a task reports at the end, from every rank's records.

    ``items``: how many items the run covers; ``lost``: ``{reason: count}`` of those skipped or scored
    without their region (each item counted once); ``notes``: other counted lines worth a warning
    (e.g. ``{"proposals dropped (no area inside the image)": (12, 40)}``)."""

    metrics: dict
    order: Sequence[str]
    items: int
    lost: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)


def lost_inputs(items: int, lost: dict, unit: str, allowed: bool) -> dict:
    """The one rule for lost inputs: a counted warning line when any item was lost, and past
    :data:`LOST_SHARE` a :class:`LostInputsError` unless ``allowed``. Returns the results' record of it."""
    n = sum(lost.values())
    record = dict(count=n, of=items, by_reason={k: v for k, v in lost.items() if v}, threshold=LOST_SHARE, allowed=allowed)
    if not n:
        return record
    reasons = ", ".join(f"{v} {k}" for k, v in record["by_reason"].items())
    line = f"{n} of {items} {unit}s lost ({reasons})"
    if n > LOST_SHARE * items and not allowed:
        raise LostInputsError(
            f"{line}: more than {LOST_SHARE:.0%} of the run; check the inputs, or pass --allow-lost-inputs "
            "(allow_lost_inputs=True) to write results from what is left (the predictions file keeps every record)"
        )
    warn(line, LostInputsWarning)
    return record


def weights_files(models) -> list[Path]:
    """The weights files the models were loaded from (inputs a run must never overwrite)."""
    return [Path(m.weights_file) for m in models if getattr(m, "weights_file", None) is not None]


def skip_reasons(records: Iterable[dict]) -> dict:
    """``{"skipped: <reason>": count}`` of the skipped records."""
    return {f"skipped: {k}": v for k, v in Counter(r["skipped"] for r in records if "skipped" in r).items()}


class Run:
    """One evaluation run: recorder, per-record identity, changed inputs, progress, loader, ranks, counts, finish.

    ``fingerprint``: the run's config (:func:`fingerprint`); ``inputs``: what else its answers depend on
    (:func:`falip.digests.describe_inputs`); ``reads``: every file it reads (an output naming one is
    refused); ``retry_skipped``: a resumed run computes its skipped samples again; ``allow_lost_inputs``:
    write results even when most items were lost; ``unit``: what an item is called (``expression``,
    ``region``, ``cloud``)."""

    def __init__(
        self,
        task: str,
        output,
        fingerprint: dict,
        *,
        inputs: dict,
        reads: Iterable = (),
        resume: bool = True,
        predictions=None,
        retry_skipped: bool = False,
        allow_lost_inputs: bool = False,
        progress: bool = True,
        desc: Optional[str] = None,
        unit: str = "sample",
    ):
        self.rec = distributed.open_recorder(
            output, task, fingerprint, resume=resume, predictions=predictions, inputs=inputs, reads=reads
        )
        self.task, self.unit, self.desc = task, unit, desc or task
        self.retry_skipped, self.allow_lost_inputs, self.progress = retry_skipped, allow_lost_inputs, progress
        self.rotated = RotationNotice()  # dataset images keep their stored orientation; tagged ones are counted
        self.changed = 0  # resumed records computed again because their image file changed (all ranks)
        self._stamps: dict[Path, Optional[str]] = {}
        self._counts: Counter = Counter()
        self._scored = self._correct = 0
        self._bar = None
        self._started = time.perf_counter()

    # -- per-record identity

    def stamp(self, *files) -> Optional[str]:
        """The identity of a record's own files (its image, and its mask where it has one): size, mtime,
        ctime and inode of each (:func:`falip.digests.file_stamp`), read once per run (``image_stamp``)."""
        stamps = []
        for f in files:
            if f is None:
                continue
            path = Path(f)
            if path not in self._stamps:
                self._stamps[path] = file_stamp(path)
            stamps.append(str(self._stamps[path]))
        return "|".join(stamps) if stamps else None

    def is_changed(self, sample_id: str, files=(), key: Optional[str] = None) -> bool:
        """A resumed record whose files (a path or a tuple of paths) were replaced or rewritten since, or
        whose sample now reads differently (``key``: the digest of what the reader made of it, e.g. its
        label and box, stored as the record's ``sample``)."""
        done = self.rec.done.get(sample_id)
        if done is None:
            return False
        files = files if isinstance(files, tuple) else (files,)
        return done.get("image_stamp") not in (None, self.stamp(*files)) or done.get("sample") not in (None, key)

    def pending(self, sample_id: str, files=(), key: Optional[str] = None) -> bool:
        """Not done yet, skipped (when skips are retried), or done on files or a sample that changed since."""
        done = self.rec.done.get(sample_id)
        if done is None or (self.retry_skipped and "skipped" in done):
            return True
        return self.is_changed(sample_id, files, key)

    # -- the work of this rank

    def plan(self, units: Sequence[Sequence[S]], identity: Callable[[S], tuple]) -> list[list[S]]:
        """This rank's share of ``units``, each cut to its pending samples (empty ones dropped); opens the
        progress bar. ``identity(sample)`` is ``(sample id, its file or a tuple of its files[, its key])``."""
        mine = distributed.shard(list(units))
        own = [s for unit in mine for s in unit]
        work = [[s for s in unit if self.pending(*identity(s))] for unit in mine]
        self.changed = distributed.sum_counts({"changed": sum(self.is_changed(*identity(s)) for s in own)})["changed"]
        if self.changed and distributed.is_main():
            warn(f"{self.changed} resumed predictions are computed again: their image files or their samples changed")
        resumed = [identity(s)[0] for s in own if not self.pending(*identity(s))]
        self._bar = tqdm(
            total=len(own),
            initial=len(resumed),
            desc=self.desc,
            unit=self.unit,
            disable=not self.progress or not distributed.is_main(),
        )
        self._tally(resumed)
        return [w for w in work if w]

    def batches(self, work: Sequence, load: Callable, batch_size: int, workers: Optional[int], device) -> Iterator[list]:
        """``load`` applied to the work in order, ``batch_size`` at a time, by ``workers`` DataLoader processes
        (default :func:`falip.tasks.loader.default_workers`; 0: inline)."""
        yield from load_batches(work, load, batch_size, default_workers() if workers is None else workers, device)

    def advance(self, sample_ids: Sequence[str]) -> None:
        """Move the progress bar past samples just recorded (running accuracy where records have ``correct``)."""
        if self._bar is not None:
            self._bar.update(len(sample_ids))
        self._tally(sample_ids)

    def _tally(self, sample_ids: Sequence[str]) -> None:
        scored = [self.rec.done[i] for i in sample_ids if "correct" in self.rec.done.get(i, {})]
        self._scored += len(scored)
        self._correct += sum(bool(r["correct"]) for r in scored)
        if scored and self._bar is not None:
            self._bar.set_postfix(acc=f"{100.0 * self._correct / self._scored:.2f}")

    def count(self, **counts: int) -> None:
        """Add to this rank's counters (summed over ranks by :meth:`totals`)."""
        self._counts.update(counts)

    # -- the end

    def seconds(self) -> float:
        """Wall time of the work, the slowest rank's."""
        return max(distributed.all_gather(time.perf_counter() - self._started, f"{self.task} elapsed"))

    def totals(self, *names: str) -> dict:
        """The counters ``names`` (and ``rotated``: EXIF-tagged images) summed over all ranks."""
        if self._bar is not None:
            self._bar.close()
        return distributed.sum_counts({**{n: self._counts[n] for n in names}, "rotated": self.rotated.count})

    def finish(self, summarize: Callable[[RunRecorder], Summary]) -> dict:
        """The results: ``summarize`` the records of every rank (on rank 0), apply :func:`lost_inputs`, and
        write the results JSON; every rank returns it."""
        if self._bar is not None:
            self._bar.close()

        def write(rec: RunRecorder) -> dict:
            summary = summarize(rec)
            for what, (n, of) in summary.notes.items():
                if n:
                    warn(f"{n} of {of} {what}", LostInputsWarning)
            lost = lost_inputs(summary.items, summary.lost, self.unit, self.allow_lost_inputs)
            return rec.finish(summary.metrics, order=summary.order, **summary.fields, lost_inputs=lost)

        return distributed.finish(self.rec, write)
