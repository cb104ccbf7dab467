"""Tables of runs (``falip aggregate``): one row per results JSON, a column for what identifies each run, one
for every setting that differs between the runs given (and only those), and the metrics.

A setting is a leaf of a run's ``config`` (``bias[0].rows``, ``templates``, ``edit_style``, ``limit`` …); of the
description of each model (``models[i]``) only its ``config`` and ``preprocess`` are settings, the rest (layers,
widths, runtime) describes the model the ``model`` column names. Columns
whose values repeat another column's in every row (the same α read in two places) are shown once, under the
shorter name; a name is its last component (``rows``) unless two columns would share it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Optional

from .errors import FalipError
from .results import flatten

Format = Literal["markdown", "csv", "json"]
FORMATS: tuple[Format, ...] = ("markdown", "csv", "json")
EXTENSIONS: dict[str, Format] = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".json": "json"}

# What identifies a run: a column appears when any aggregated result has it (top level or config).
ROW_KEYS = ("task", "dataset", "variant", "split", "method", "model", "pretrained", "proposals", "region", "views", "projection")


def format_for(path, fmt: Optional[str] = None) -> Format:
    """The table format: ``fmt`` when given, else from ``path``'s extension (``.md``, ``.csv``, ``.json``), else markdown."""
    by_extension = EXTENSIONS.get(Path(path).suffix.lower()) if path is not None else None
    if fmt is None:
        if path is not None and by_extension is None:
            raise FalipError(f"cannot tell the table format from {path}: name it .md, .csv or .json, or give --format")
        return by_extension or "markdown"
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if by_extension is not None and by_extension != fmt:
        raise FalipError(f"--format {fmt} but {path} names a {by_extension} file: drop one of them")
    return fmt  # type: ignore[return-value]


def read_result(path) -> tuple[Optional[dict], str]:
    """``(results dict, "")`` for a falip results JSON file, else ``(None, why it is not one)`` (``"<path> <why>"`` reads)."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except FileNotFoundError:
        raise FalipError(f"results file not found: {path}") from None
    except IsADirectoryError:
        return None, "is a folder, not a results JSON file"
    except OSError as exc:
        raise FalipError(f"cannot read results file {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return None, f"is not valid JSON ({type(exc).__name__})"
    if not isinstance(result, dict) or "metrics" not in result:
        return None, "has no 'metrics': not a falip results file"
    if not isinstance(result["metrics"], dict):
        return None, f"has a {type(result['metrics']).__name__} as 'metrics', not an object"
    if not isinstance(result.get("config", {}), dict):
        return None, f"has a {type(result['config']).__name__} as 'config', not an object"
    return result, ""


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return "+".join(str(v) for v in value)
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _identity(result: dict) -> dict:
    config = result.get("config", {})
    return {key: _text(result.get(key, config.get(key))) for key in ROW_KEYS}


MODEL_DESCRIPTION = re.compile(r"models\[\d+\]\.(?!config\.|preprocess$)")  # what a model is, not how it was run


def _settings_that_differ(configs: list[dict], taken: dict[str, list[str]]) -> dict[str, list[str]]:
    """``{column name: value per run}`` for the config leaves whose values are not all the same and repeat no
    column of ``taken`` (``{name: value per run}``, the identity columns)."""
    flat = [{k: _text(v) for k, v in flatten(c).items() if not MODEL_DESCRIPTION.match(k)} for c in configs]
    keys = sorted({k for f in flat for k in f}, key=lambda k: (len(k), k))
    chosen: dict[str, list[str]] = {}
    for key in keys:
        values = [f.get(key, "") for f in flat]
        if key in taken or len(set(values)) == 1 or values in chosen.values() or values in taken.values():
            continue
        chosen[key] = values
    short = {k: k.rsplit(".", 1)[-1].split("[", 1)[0] for k in chosen}
    names = {k: short[k] if list(short.values()).count(short[k]) == 1 and short[k] not in taken else k for k in chosen}
    return {names[k]: chosen[k] for k in sorted(chosen)}


def aggregate(paths: Iterable, fmt: Format = "markdown", notice=None) -> str:
    """The table of the results files among ``paths`` (numbers to 2 decimals in markdown; a missing metric is empty).

    notice: called with one line for each file that is not a results file (it is skipped); default: ignored.
    Without any results file among them, a FalipError says why each one is not."""
    paths = list(paths)
    results, files, skipped = [], [], []
    for path in paths:
        result, why = read_result(path)
        if result is None:
            skipped.append(f"{path} {why}")
            continue
        results.append(result)
        files.append(str(path))
    if not results:
        many = f"none of the {len(paths)} files given is a falip results JSON file: " if len(paths) > 1 else ""
        raise FalipError(many + "; ".join(skipped))
    for line in skipped if notice is not None else ():
        notice(f"skipped {line}")
    rows = [_identity(r) for r in results]
    identity = [k for k in ROW_KEYS if any(row[k] for row in rows)]
    settings = _settings_that_differ([r.get("config", {}) for r in results], {k: [row[k] for row in rows] for k in identity})
    for name, values in settings.items():
        for row, value in zip(rows, values):
            row[name] = value
    metric_names: list[str] = []
    for row, result in zip(rows, results):
        for name, value in result["metrics"].items():
            if name != "skipped" and (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))):
                if name not in metric_names:
                    metric_names.append(name)
                row[name] = value
        skipped = result.get("skipped")
        row["skipped"] = skipped.get("count", 0) if isinstance(skipped, dict) else skipped
    for row, file in zip(rows, files):
        row["file"] = file
    columns = identity + list(settings) + metric_names + ["skipped", "file"]
    table = [{c: row.get(c) for c in columns} for row in rows]
    if fmt == "json":
        return json.dumps(table, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: "" if v is None else v for c, v in r.items()} for r in table)
        return buf.getvalue()
    if fmt != "markdown":
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")

    def cell(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else "" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in table]
    return "\n".join(lines) + "\n"
