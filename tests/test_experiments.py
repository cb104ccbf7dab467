"""falip aggregate: a column for every setting that differs between the runs (and only those), the format from
the output's extension, and files that are not results skipped with a notice."""

from __future__ import annotations

import csv
import io
import json

import pytest

from falip.cli import main
from falip.errors import FalipError
from falip.experiments import aggregate


def result(rows: str, acc, alpha: float = 4.0, limit: int = 10) -> dict:
    bias = {"alpha": alpha, "rows": rows, "sigma": 100.0}
    config = {"bias": [bias], "models": [{"name": "toy", "config": bias}], "limit": limit, "templates": "simple", "mode": "exact"}
    return {"task": "rec", "dataset": "synthetic", "split": "val", "model": "toy", "method": "falip",
            "metrics": {"acc": acc, "n": 40}, "config": config, "skipped": {"count": 0}}  # fmt: skip


@pytest.fixture
def runs(tmp_path):
    for name, rows, acc in (("cls", "cls", 70.0), ("all", "all", None), ("diagonal", "diagonal", 65.5)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result(rows, acc)))
    return [tmp_path / f"{n}.json" for n in ("cls", "all", "diagonal")]


def test_only_the_settings_that_differ_get_a_column(runs):
    rows = json.loads(aggregate(runs, "json"))
    assert [r["rows"] for r in rows] == ["cls", "all", "diagonal"]  # bias[0].rows and models[0].config.rows: one column
    assert list(rows[0]) == ["task", "dataset", "split", "method", "model", "rows", "acc", "n", "skipped", "file"]
    assert rows[1]["acc"] is None  # a null metric is missing, not 0
    table = aggregate(runs).splitlines()
    assert table[0] == "| task | dataset | split | method | model | rows | acc | n | skipped | file |"
    assert "| all |  | 40 |" in table[3]


def test_two_settings_with_one_last_name_keep_their_full_names(tmp_path):
    a, b = result("cls", 1.0), result("cls", 2.0)
    b["config"]["models"][0]["config"] = dict(b["config"]["bias"][0], alpha=9.0)  # model alpha differs from bias alpha
    b["config"]["bias"][0] = dict(b["config"]["bias"][0], alpha=8.0)
    for name, r in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    rows = json.loads(aggregate([tmp_path / "a.json", tmp_path / "b.json"], "json"))
    assert rows[1]["bias[0].alpha"] == "8.0" and rows[1]["models[0].config.alpha"] == "9.0" and "alpha" not in rows[1]


def test_files_that_are_not_results_are_skipped_with_a_notice(runs, tmp_path, capsys):
    (tmp_path / "detections.json").write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1]}]))
    (tmp_path / "odd.json").write_text(json.dumps({"metrics": {"acc": 1}, "config": "rows=all"}))
    (tmp_path / "odd2.json").write_text(json.dumps({"metrics": [1, 2]}))
    extra = [tmp_path / "detections.json", tmp_path / "odd.json", tmp_path / "odd2.json"]
    assert main(["aggregate", *map(str, runs + extra)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"falip: skipped {extra[0]} has no 'metrics': not a falip results file",
        f"falip: skipped {extra[1]} has a str as 'config', not an object",
        f"falip: skipped {extra[2]} has a list as 'metrics', not an object",
    ]
    assert captured.out.count("\n") == 5
    with pytest.raises(FalipError, match="none of the 3 files given"):
        aggregate(extra)


def test_the_format_follows_the_output_extension(runs, tmp_path, capsys):
    for ext in ("csv", "md", "json"):
        assert main(["aggregate", *map(str, runs), "--output", str(tmp_path / f"t.{ext}")]) == 0
    assert next(csv.reader(io.StringIO((tmp_path / "t.csv").read_text())))[5] == "rows"
    assert (tmp_path / "t.md").read_text().startswith("| task |")
    assert len(json.loads((tmp_path / "t.json").read_text())) == 3
    capsys.readouterr()
    assert main(["aggregate", *map(str, runs), "--output", str(tmp_path / "t.txt")]) == 2
    assert "name it .md, .csv or .json" in capsys.readouterr().err
    assert main(["aggregate", *map(str, runs), "--output", str(tmp_path / "t.csv"), "--format", "markdown"]) == 2
    assert main(["aggregate", *map(str, runs), "--output", str(runs[0])]) == 2  # never over an input
    assert json.loads(runs[0].read_text())["metrics"]["acc"] == 70.0
