"""Data-parallel runs under torchrun (``falip.distributed``): 2 CPU ranks (gloo) ≡ 1 process.

Each torchrun test starts 2 Python processes that import torch and open_clip and load falip-toy,
so it takes several seconds: the work is kept to a handful of images and clouds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import falip
from falip.cli import main
from falip.distributed import DistributedError, Rank, from_env, rank_device, shard
from falip.results import OutputInUseError, predictions_path, shard_files, shard_path
from falip.synthetic import write_all

SRC = Path(falip.__file__).resolve().parents[1]
TIMING = {"created", "elapsed_s", "world_size"}  # what may differ between a 1- and a 2-process run
TIMING_FIELDS = {"expr_per_s", "images_per_s", "regions_per_s", "seconds"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic REC/classification scenes (one image missing: its samples are skipped) and 7 point clouds (one NaN)."""
    root = tmp_path_factory.mktemp("dist")
    paths = write_all(root / "synth", seed=3, n_images=6, n_objects=(2, 3), size=96)
    (paths["image_root"] / "COCO_train2014_000000000002.jpg").unlink()
    with open(paths["regions"], "a") as f:
        f.write(json.dumps({"image": "COCO_train2014_000000000003.jpg", "label": "purple blob", "box": [1, 1, 9, 9]}) + "\n")
    pc = root / "pc" / "modelnet40_ply_hdf5_2048"
    pc.mkdir(parents=True)
    (pc / "shape_names.txt").write_text("airplane\nbathtub\nbed\n")
    rng = np.random.default_rng(0)
    names = []
    for i, n in enumerate((4, 3)):
        clouds = rng.normal(size=(n, 64, 3)).astype(np.float32)
        if i == 0:
            clouds[1, 3] = np.nan
        with h5py.File(pc / f"ply_data_test{i}.h5", "w") as f:
            f.create_dataset("data", data=clouds)
            f.create_dataset("label", data=(np.arange(n) % 3).reshape(n, 1).astype(np.uint8))
        names.append(f"data/modelnet40_ply_hdf5_2048/ply_data_test{i}.h5")
    (pc / "test_files.txt").write_text("\n".join(names) + "\n")
    return dict(pc=root / "pc", **paths)


def command(task: str, data: dict, output: Path) -> list[str]:
    """``falip <task>`` on the test data with falip-toy, writing ``output``."""
    common = ["--model", "falip-toy", "--output", str(output)]
    if task == "rec":
        refer = ["--dataset", "synthetic", "--split", "val", "--data-root", str(data["data_root"])]
        return ["rec", *refer, "--image-root", str(data["image_root"]), "--quiet", *common]
    if task == "classify":
        files = [
            "--annotations",
            str(data["regions"]),
            "--classes",
            str(data["classes"]),
            "--image-root",
            str(data["image_root"]),
        ]
        return ["classify", *files, "--templates", "simple", "--workers", "0", *common]
    return ["pointcloud", "--dataset", "modelnet40", "--data-root", str(data["pc"]), "--batch-size", "2", *common]


def torchrun(argv: list[str], module: str = "falip", path: tuple = ()) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 --standalone -m MODULE ARGV`` with this checkout's falip (``path``: more import folders)."""
    python_path = os.pathsep.join([*map(str, path), str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", module, *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def comparable(result: dict) -> dict:
    """A results JSON without what depends on timing or on the number of processes."""
    out = {k: v for k, v in result.items() if k not in TIMING}
    for key in ("metrics", "speed"):
        if isinstance(out.get(key), dict):
            out[key] = {k: v for k, v in out[key].items() if k not in TIMING_FIELDS}
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread per process, as torchrun gives each rank: a busy 2-core machine runs much faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """``single(task)``: the results JSON and predictions file text of a one-process run (run once per task)."""
    runs: dict = {}

    def run(task: str) -> tuple[dict, str]:
        if task not in runs:
            folder = tmp_path_factory.mktemp(f"one-{task}")
            assert main(command(task, data, folder / "r.json")) == 0
            runs[task] = json.loads((folder / "r.json").read_text()), predictions_path(folder / "r.json").read_text()
        return runs[task]

    return run


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def partial_shards(predictions: str, world_size: int, folder: Path, per_shard: int = 2) -> set[str]:
    """Write the shards an interrupted run of ``world_size`` ranks leaves: the header, ``per_shard`` finished
    records (marked, to tell a resumed record from a recomputed one) and a cut last line; returns the marked ids."""
    header, *records = lines(predictions)
    done = [r for r in records if "skipped" not in r]
    marked = set()
    target = predictions_path(folder / "r.json")
    for rank in range(world_size):
        mine = done[rank * per_shard : (rank + 1) * per_shard]
        marked |= {r["id"] for r in mine}
        text = "".join(json.dumps(line) + "\n" for line in [header, *({**r, "marker": 1} for r in mine)])
        shard_path(target, rank, world_size).write_text(text + '{"id": "cut sho')
    return marked


def unmarked(text: str) -> tuple[list[dict], set[str]]:
    """The records without their markers, and the ids that carried one."""
    records = lines(text)
    return [{k: v for k, v in r.items() if k != "marker"} for r in records], {r["id"] for r in records if "marker" in r}


DRIVER = """
import json, sys
from pathlib import Path
from falip import distributed
from falip.cli import main
from falip.errors import FalipError

folder = Path(sys.argv[1])
plan = json.loads((folder / "plan.json").read_text())
with distributed.session("cpu"):  # one process group for every command: the processes start once
    r = distributed.current()
    out = {"rank": r.rank, "codes": {name: main(argv) for name, argv in plan}}
    out.update(mine=distributed.shard(list(range(5))), main=distributed.is_main(),
               sum=distributed.sum_counts({"a": r.rank + 1, "b": 10}), gathered=distributed.all_gather(r.rank * 2))

    def fail_on_rank_1():
        if r.rank == 1:
            raise FalipError("image x.png is unreadable")
        return "fine"

    try:
        distributed.checked(fail_on_rank_1)
    except FalipError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["after"] = distributed.checked(lambda: "both ok")
    try:  # as if rank 1 had left a command early: the next meeting points differ
        distributed.all_gather(1, "rec elapsed" if r.rank == 0 else "checked")
    except distributed.DistributedError as exc:
        out["out_of_step"] = str(exc)
    (folder / f"result{r.rank}.json").write_text(json.dumps(out))
"""


@pytest.fixture(scope="module")
def launch(data, single, tmp_path_factory):
    """One torchrun launch of 2 ranks running every distributed scenario of this file (``falip.cli.main`` per
    command, in one process group): ``(root folder, stdout, stderr, per-rank results, marked ids)``."""
    root = tmp_path_factory.mktemp("two")
    plan = [(task, command(task, data, root / task / "r.json")) for task in ("rec", "classify", "pointcloud")]
    (root / "resumed").mkdir()
    marked = partial_shards(single("rec")[1], 2, root / "resumed")
    plan.append(("resumed", command("rec", data, root / "resumed" / "r.json")))
    (root / "fail").mkdir()
    Path(f"{shard_path(predictions_path(root / 'fail' / 'r.json'), 1, 2)}.lock").write_text(str(os.getpid()))  # a live writer
    plan.append(("fail", command("pointcloud", data, root / "fail" / "r.json")))
    (root / "driver.py").write_text(DRIVER)
    (root / "plan.json").write_text(json.dumps(plan))
    run = torchrun([str(root)], module="driver", path=(root,))
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((root / f"result{rank}.json").read_text()) for rank in (0, 1)]
    return root, run.stdout, run.stderr, results, marked


@pytest.mark.parametrize("task", ["rec", "classify", "pointcloud"])
def test_two_ranks_write_the_results_and_predictions_of_one_process(task, single, launch):
    one, one_predictions = single(task)
    assert one["metrics"]["skipped"] >= 1 and one["metrics"]["n"] >= 5  # skips are part of what must match
    root, stdout, _, results, _ = launch
    assert [r["codes"][task] for r in results] == [0, 0]
    two = json.loads((root / task / "r.json").read_text())
    assert two["world_size"] == 2
    assert comparable(two) == comparable(one)
    assert predictions_path(root / task / "r.json").read_text() == one_predictions
    assert shard_files(predictions_path(root / task / "r.json")) == []  # merged, then removed
    assert stdout.count(str(root / task / "r.json")) == 1  # rank 0 prints its summary, rank 1 does not


def test_an_interrupted_two_rank_run_resumes_from_its_shards(single, launch):
    one, one_predictions = single("rec")
    root, _, stderr, results, marked = launch
    folder = root / "resumed"
    assert [r["codes"]["resumed"] for r in results] == [0, 0]
    assert "rank0-of-2: dropped 1 cut or garbled line" in stderr and "rank1-of-2: dropped 1 cut or garbled line" in stderr
    two = json.loads((folder / "r.json").read_text())
    assert two["run"]["resumed"] == len(marked) == 4
    assert two["run"]["computed"] == one["run"]["computed"] - len(marked)
    assert {k: v for k, v in two["metrics"].items() if k not in TIMING_FIELDS} == {
        k: v for k, v in one["metrics"].items() if k not in TIMING_FIELDS
    }
    records, carried = unmarked(predictions_path(folder / "r.json").read_text())
    assert carried == marked  # resumed, not recomputed
    assert records == lines(one_predictions)
    assert shard_files(predictions_path(folder / "r.json")) == []


def test_a_rank_that_fails_ends_the_command_on_every_rank_with_its_error(launch):
    """Rank 1 cannot open its shard (a live process holds its lock): both ranks end the command with an error."""
    root, _, stderr, results, _ = launch
    assert [r["codes"]["fail"] for r in results] == [2, 2]
    assert "falip: error: [rank 1 of 2] " in stderr and "is being written by another falip process" in stderr
    assert "falip: error: [rank 0 of 2] rank 1 of 2 failed: OutputInUseError: " in stderr
    assert not (root / "fail" / "r.json").exists()


def test_rank_helpers_share_work_and_report_a_failure_on_every_rank(launch):
    results = launch[3]
    assert [r["mine"] for r in results] == [[0, 2, 4], [1, 3]]  # every item on exactly one rank
    assert [r["main"] for r in results] == [True, False]
    assert all(r["sum"] == {"a": 3, "b": 20} and r["gathered"] == [0, 2] for r in results)
    assert results[1]["error"] == "FalipError: image x.png is unreadable"  # its own error
    assert results[0]["error"] == "DistributedError: rank 1 of 2 failed: FalipError: image x.png is unreadable"
    assert all(r["after"] == "both ok" for r in results)  # the group is still usable: nothing hangs
    assert all(r["out_of_step"].startswith("the ranks are out of step (rank 0: rec elapsed, rank 1: checked)") for r in results)


def test_torchrun_runs_the_falip_module(data, single, tmp_path):
    """What users type: ``torchrun --nproc-per-node 2 --standalone -m falip pointcloud ...``."""
    one, one_predictions = single("pointcloud")
    run = torchrun(command("pointcloud", data, tmp_path / "r.json"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert comparable(json.loads((tmp_path / "r.json").read_text())) == comparable(one)
    assert predictions_path(tmp_path / "r.json").read_text() == one_predictions
    assert run.stdout.count("acc ") == 1  # only rank 0 prints


@pytest.mark.parametrize("task", ["rec", "classify", "pointcloud"])
def test_one_process_resumes_the_shards_of_a_three_rank_run(task, data, single, tmp_path, capsys):
    """A resumed run may use another world size: the shards left by 3 ranks are absorbed by 1 process."""
    one, one_predictions = single(task)
    folder = tmp_path / "again"
    folder.mkdir()
    marked = partial_shards(one_predictions, 3, folder, per_shard=1)
    assert main(command(task, data, folder / "r.json")) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "cut or garbled" in line]
    assert warned and all(line.startswith("falip: warning: ") for line in warned)
    again = json.loads((folder / "r.json").read_text())
    assert comparable({**again, "run": None, "speed": None}) == comparable({**one, "run": None, "speed": None})
    records, carried = unmarked(predictions_path(folder / "r.json").read_text())
    assert carried == marked and len(marked) == 3
    assert records == lines(one_predictions)
    assert shard_files(predictions_path(folder / "r.json")) == []


def test_no_resume_deletes_the_shards_and_a_live_ranks_shard_is_refused(data, single, tmp_path):
    one, one_predictions = single("pointcloud")
    target = predictions_path(tmp_path / "r.json")
    partial_shards(one_predictions, 2, tmp_path)
    assert main([*command("pointcloud", data, tmp_path / "r.json"), "--no-resume"]) == 0
    assert shard_files(target) == [] and "marker" not in target.read_text()

    shard = shard_path(target, 1, 2)
    shard.write_text(one_predictions)
    Path(f"{shard}.lock").write_text(str(os.getppid()))  # a live process writes this shard
    with pytest.raises(OutputInUseError, match=r"rank1-of-2"):
        falip.results.RunRecorder(tmp_path / "r.json", "pointcloud", one["config"], inputs=one["inputs"])


def test_launch_settings_are_checked():
    assert from_env({}) is None
    assert from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None  # one process: as without torchrun
    assert from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Rank(3, 4, 1)
    with pytest.raises(DistributedError, match="RANK='x' is not an integer"):
        from_env({"WORLD_SIZE": "2", "RANK": "x"})
    with pytest.raises(DistributedError, match="RANK is not set"):
        from_env({"WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="inconsistent launch: RANK=2, WORLD_SIZE=2"):
        from_env({"WORLD_SIZE": "2", "RANK": "2"})
    rank = Rank(1, 2, 1)
    assert rank_device("cpu", rank) == "cpu"
    with pytest.raises(DistributedError, match="give --device cuda"):
        rank_device("cuda:1", rank)
    with pytest.raises(DistributedError, match="cpu \\(gloo\\) or cuda \\(nccl\\)"):
        rank_device("meta", rank)
    assert shard(range(5)) == [0, 1, 2, 3, 4]  # no process group: everything


def test_commands_without_a_distributed_mode_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["bias", "--image-size", "64,64", "--box", "1,1,9,9"]) == 2
    assert "falip: error: [rank 1 of 2] falip bias runs in one process; start it without torchrun" in capsys.readouterr().err
