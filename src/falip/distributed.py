"""Data-parallel evaluation under ``torchrun``: each rank evaluates its share, rank 0 writes the results.

``torchrun --nproc-per-node N -m falip rec|classify|pointcloud ...`` starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. The CLI then opens a process group
(:func:`session`: ``gloo`` on CPU; on CUDA ``cuda:nccl`` for tensors and ``cpu:gloo`` for the
small objects exchanged here, each rank on ``cuda:<LOCAL_RANK>``) and the tasks:

1. share the work by units that stay together (REC: an image and its sentences; classification:
   an image's regions; point clouds: one cloud): unit ``i`` of the task's ordered list goes to
   rank ``i % WORLD_SIZE`` (:func:`shard`), so every unit is on exactly one rank;
2. open their recorder with :func:`open_recorder`: rank 0 first absorbs what an interrupted run
   left (the predictions file and the shards of any world size) into the predictions file, then
   every rank writes its records to its shard ``<predictions>.rank{r}-of-{w}`` and resumes from
   the predictions file;
3. add up their counters (:func:`all_gather`, :func:`sum_counts`) and end with :func:`finish`:
   every shard is closed, rank 0 merges them into the predictions file in the task's order, writes
   the results JSON a single process would write (plus ``world_size``), deletes the shards, and
   every rank returns that results dict.

A step that raises on one rank raises on every rank (:func:`checked`): that rank's own error, the
others a :class:`DistributedError` naming it; a rank that dies makes torchrun stop the others.
Blocking calls time out after ``FALIP_DIST_TIMEOUT`` seconds (default 6 h, long enough for ranks
that finish their share early to wait for the slowest).

Outside a process group (no torchrun, or one process) every function here is the identity: the
tasks run exactly as in a single process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist

from .errors import FalipError
from .results import RunRecorder

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 6 * 3600


class DistributedError(FalipError):
    """A distributed run cannot start or continue (bad launch settings, or another rank failed)."""


@dataclass(frozen=True)
class Rank:
    """This process's place in a distributed run of ``world_size`` > 1 processes."""

    rank: int
    world_size: int
    local_rank: int = 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def _env_int(name: str, environ) -> int:
    value = environ.get(name)
    if value is None:
        raise DistributedError(
            f"{name} is not set but WORLD_SIZE is: launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK"
        )
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def from_env(environ=None) -> Optional[Rank]:
    """The launch torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; None without them or for one process."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    world, rank = _env_int("WORLD_SIZE", environ), _env_int("RANK", environ)
    local = _env_int("LOCAL_RANK", environ) if "LOCAL_RANK" in environ else rank
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"inconsistent launch: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return Rank(rank, world, local) if world > 1 else None


def rank_device(device: str, rank: Rank) -> str:
    """The device of ``rank`` for ``--device``: ``cpu``, or ``cuda`` → ``cuda:<LOCAL_RANK>``."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise DistributedError(f"--device {device!r} is not a torch device") from None
    if kind.type == "cpu":
        return "cpu"
    if kind.type != "cuda":
        raise DistributedError(f"--device {device}: distributed runs use cpu (gloo) or cuda (nccl)")
    if kind.index is not None:
        raise DistributedError(f"--device {device}: under torchrun give --device cuda; each rank uses cuda:<LOCAL_RANK>")
    if not torch.cuda.is_available() or rank.local_rank >= torch.cuda.device_count():
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise DistributedError(f"{rank} needs cuda:{rank.local_rank} (LOCAL_RANK) but this machine has {found} CUDA device(s)")
    return f"cuda:{rank.local_rank}"


def timeout() -> timedelta:
    """How long a rank waits for the others (``FALIP_DIST_TIMEOUT`` seconds, default 6 h)."""
    value = os.environ.get("FALIP_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"FALIP_DIST_TIMEOUT={value!r}: give a number of seconds > 0")
    return timedelta(seconds=seconds)


@contextmanager
def session(device: str) -> Iterator[str]:
    """Open the process group of a torchrun launch for ``device`` and yield this rank's device; outside
    torchrun (or for one process) yield ``device`` unchanged. The group is destroyed on exit; a group
    that is already open (a script running several commands in one session) is used as it is."""
    rank = from_env()
    if rank is None:
        yield device
        return
    local = rank_device(device, rank)
    if dist.is_initialized():
        yield local
        return
    if local.startswith("cuda"):
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=timeout())
    try:
        yield local
    finally:
        dist.destroy_process_group()


def current() -> Optional[Rank]:
    """This process's rank in the active process group of more than one process, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    """True on rank 0 and in a single process: the one that prints progress, warnings and results."""
    rank = current()
    return rank is None or rank.rank == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: ``items[rank::world_size]`` (all of them outside a distributed run)."""
    rank = current()
    return list(items) if rank is None else list(items)[rank.rank :: rank.world_size]


def all_gather(value: T, step: str = "all_gather") -> list[T]:
    """``value`` of every rank, in rank order (``[value]`` outside a distributed run).

    ``step`` names the meeting point: ranks that meet at different steps (one of them left a
    command early on an error of its own) raise a :class:`DistributedError` instead of mixing values."""
    rank = current()
    if rank is None:
        return [value]
    out: list = [None] * rank.world_size
    dist.all_gather_object(out, (step, value))
    steps = [s for s, _ in out]
    if len(set(steps)) > 1:
        where = ", ".join(f"rank {r}: {s}" for r, s in enumerate(steps))
        raise DistributedError(f"the ranks are out of step ({where}): a rank left a command on an error; end every rank")
    return [v for _, v in out]


def sum_counts(counts: dict) -> dict:
    """``{name: number}`` added up over all ranks."""
    gathered = all_gather(counts, "sum_counts")
    return {k: sum(c[k] for c in gathered) for k in counts}


def checked(step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; if it raised anywhere, raise on every rank (that rank: its error; the
    others: a :class:`DistributedError` naming the rank and its error). Returns this rank's value."""
    rank = current()
    if rank is None:
        return step()
    try:
        value, error = step(), None
    except Exception as exc:  # every error is reported to the other ranks before it is raised here
        value, error = None, exc
    outcomes = all_gather(None if error is None else f"{type(error).__name__}: {error}", "checked")
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(outcomes) if message is not None]
    if failed:
        r, message = failed[0]
        raise DistributedError(f"rank {r} of {rank.world_size} failed: {message}")
    return value


def open_recorder(
    output, task: str, config: dict, *, resume: bool = True, predictions=None, inputs=None, reads=()
) -> RunRecorder:
    """The :class:`~falip.results.RunRecorder` of this rank: the plain recorder outside a distributed run;
    inside one, rank 0 first absorbs an interrupted run's shards into the predictions file (or, without
    ``resume``, empties it), then every rank opens its shard."""
    rank = current()
    options = dict(resume=resume, predictions=predictions, inputs=inputs, reads=list(reads))
    if rank is None:
        return RunRecorder(output, task, config, **options)
    checked(lambda: RunRecorder(output, task, config, **options).close() if rank.rank == 0 else None)
    return checked(lambda: RunRecorder(output, task, config, **options, shard=(rank.rank, rank.world_size)))


def finish(recorder: RunRecorder, write: Callable[[RunRecorder], dict]) -> dict:
    """The results of the run: ``write(recorder)`` (which computes the metrics and calls
    ``recorder.finish``) outside a distributed run; inside one, ``write`` on rank 0 with a recorder of
    the predictions file holding every rank's records, its result returned on every rank."""
    rank = current()
    if rank is None:
        return write(recorder)
    checked(recorder.close)  # every shard is complete before rank 0 reads them

    def merge() -> Optional[dict]:
        if rank.rank != 0:
            return None
        merged = RunRecorder(
            recorder.output, recorder.task, recorder.config, predictions=recorder.main_path, inputs=recorder.inputs
        )
        merged.started = recorder.started
        merged.resumed = recorder.resumed
        merged.fields["world_size"] = rank.world_size
        return write(merged)

    result = checked(merge)
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]
