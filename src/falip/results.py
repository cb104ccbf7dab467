"""Results of evaluation runs: one JSON per run, per-sample JSONL, resume, and aggregation.

Layout (the clip_benchmark convention, plus what a long run needs)::

    results.json                  {"task", "metrics", "config", "skipped", "n_predictions",
                                   "predictions", "falip_version", "created", "elapsed_s"}
    results.predictions.jsonl     line 1: {"config": ...}; then one record per sample:
                                   {"id": ..., ...} or {"id": ..., "skipped": reason, "detail": ...}

A run re-started with the same ``--output`` and the same config resumes: samples already in the
JSONL are not computed again. A different config refuses to mix results (start a new output or
pass ``resume=False`` to overwrite).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from .errors import FalipError

MAX_SKIP_EXAMPLES = 50


class ResumeMismatchError(FalipError):
    """Existing predictions were produced with a different configuration."""


def predictions_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".predictions.jsonl")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class RunRecorder:
    """Records one evaluation run.

    >>> rec = RunRecorder("out/rec.json", task="rec", config={...})
    >>> for sample in data:
    ...     if sample.id in rec.done: continue
    ...     try: rec.add(sample.id, correct=..., pred=...)
    ...     except SomeInputError as e: rec.skip(sample.id, "missing image", str(e))
    >>> rec.finish(metrics={"acc": ...})

    ``done`` maps sample id → its record (including those loaded from a previous run).
    ``predictions``: the JSONL path (default: ``<output stem>.predictions.jsonl`` next to ``output``).
    """

    def __init__(self, output, task: str, config: dict, resume: bool = True, predictions=None):
        self.output = Path(output)
        self.task = task
        self.config = json.loads(_canonical(config))
        self.pred_path = Path(predictions) if predictions is not None else predictions_path(self.output)
        self.done: dict[str, dict] = {}
        self.resumed = 0  # how many records came from an earlier run
        self.started = time.time()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.pred_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.pred_path.is_file():
            self._load_previous()
            self._file = open(self.pred_path, "a", encoding="utf-8")
            if self._file.tell() and not self.pred_path.read_bytes().endswith(b"\n"):
                self._file.write("\n")  # end a line cut short by an interrupted run
        else:
            self._file = open(self.pred_path, "w", encoding="utf-8")
            self._write({"config": self.config, "task": task})

    def _load_previous(self) -> None:
        with open(self.pred_path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
        header = json.loads(lines[0]) if lines else {}
        if _canonical(header.get("config")) != _canonical(self.config):
            raise ResumeMismatchError(
                f"{self.pred_path} holds predictions made with a different configuration; "
                "use another --output, or --no-resume to overwrite it"
            )
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run: that sample is recomputed
            self.done[str(record["id"])] = record
        self.resumed = len(self.done)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def add(self, sample_id, **fields) -> dict:
        record = {"id": str(sample_id), **fields}
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

    def finish(self, metrics: dict, **extra) -> dict:
        """Write the results JSON and return it."""
        self._file.close()
        from . import __version__

        result = {
            "task": self.task,
            "metrics": metrics,
            "config": self.config,
            "skipped": self.skipped_summary(),
            "n_predictions": len(self.records()),
            "predictions": self.pred_path.name if self.pred_path.parent == self.output.parent else str(self.pred_path),
            **extra,
            "falip_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - self.started, 2),
        }
        with open(self.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, default=str)
        return result


# ----------------------------------------------------------------------------------------------
# Aggregation

# What distinguishes runs: a column appears when any aggregated result has it (top level or config).
ROW_KEYS = ("task", "dataset", "variant", "split", "method", "model", "pretrained", "proposals", "region", "views", "projection")


def _describe(result: dict) -> dict:
    config = result.get("config", {})
    row = {}
    for key in ROW_KEYS:
        value = result.get(key, config.get(key))
        if isinstance(value, (list, tuple)):
            value = "+".join(str(v) for v in value)
        row[key] = "" if value is None else str(value)
    return row


def aggregate(paths: Iterable, fmt: str = "markdown") -> str:
    """One row per results file: what was run, and its metrics (numbers rounded to 2 decimals)."""
    rows, metric_names = [], []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        if "metrics" not in result:
            raise FalipError(f"{path} is not a falip results file (no 'metrics')")
        row = _describe(result)
        for name, value in result["metrics"].items():
            if isinstance(value, (int, float)) and name != "skipped":  # skipped has its own column
                if name not in metric_names:
                    metric_names.append(name)
                row[name] = value
        row["skipped"] = result.get("skipped", {}).get("count", 0)
        row["file"] = str(path)
        rows.append(row)
    columns = [k for k in ROW_KEYS if any(r.get(k) for r in rows)] + metric_names + ["skipped", "file"]

    def fmt_value(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in columns})
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"format must be markdown or csv, got {fmt!r}")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt_value(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
