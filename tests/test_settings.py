"""Every command runs ``falip-toy`` with the model's own settings (its card), unless an option overrides a field."""

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

import falip
from falip.bias import FovealConfig
from falip.cli import main
from falip.loading import shipped_model
from falip.synthetic import write_all

CARD = shipped_model("falip-toy")[1]
OWN = json.loads(json.dumps(FovealConfig(**CARD["falip"]).to_dict()))  # alpha 4 on blocks 2-5, as JSON
OWN_PREPROCESS = CARD["preprocess"]  # squash


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FALIP_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    paths = write_all(root / "synth", seed=5, n_images=2, size=128)
    pc = root / "pc" / "modelnet40_ply_hdf5_2048"
    pc.mkdir(parents=True)
    (pc / "shape_names.txt").write_text("airplane\nbathtub\n")
    with h5py.File(pc / "ply_data_test0.h5", "w") as f:
        f.create_dataset("data", data=np.random.default_rng(0).normal(size=(2, 64, 3)).astype(np.float32))
        f.create_dataset("label", data=np.array([[0], [1]], np.uint8))
    (pc / "test_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_test0.h5\n")
    return dict(root=root, pc=root / "pc", **paths)


def printed_settings(out: str) -> tuple[str, dict]:
    """``(preprocess, bias dict)`` of the ``settings: preprocess P, bias {...}`` line a command prints."""
    line = next(ln for ln in out.splitlines() if "settings: preprocess " in ln)
    rest = line.split("settings: preprocess ", 1)[1]
    preprocess, bias = rest.split(", bias ", 1)
    return preprocess, json.loads(bias)


def commands(data, out):
    """Each model command on falip-toy, with where it records the config: ``{name: (argv, recorded)}``."""
    image = str(data["image_root"] / "COCO_train2014_000000000001.jpg")
    synth_rec = ["--dataset", "synthetic", "--split", "val", "--data-root", str(data["data_root"])]
    return {
        "score": (["score", image, "--box", "10,10,60,60", "--box", "60,60,120,120", "--text", "a red circle", "--json"], None),
        "rec": (
            ["rec", *synth_rec, "--image-root", str(data["image_root"]), "--quiet", "--output", str(out / "rec.json")],
            lambda: (lambda c: (c["preprocess"][0], c["bias"][0]))(json.loads((out / "rec.json").read_text())["config"]),
        ),
        "classify": (
            [
                "classify",
                "--annotations",
                str(data["regions"]),
                "--classes",
                str(data["classes"]),
                "--image-root",
                str(data["image_root"]),
                "--templates",
                "simple",
                "--limit",
                "2",
                "--workers",
                "0",
                "--output",
                str(out / "c.json"),
            ],
            lambda: (lambda c: (c["preprocess"], c["bias"]))(json.loads((out / "c.json").read_text())["config"]),
        ),
        "pointcloud": (
            ["pointcloud", "--dataset", "modelnet40", "--data-root", str(data["pc"]), "--output", str(out / "p.json")],
            lambda: (lambda c: (c["preprocess"], c["bias"]))(json.loads((out / "p.json").read_text())["config"]),
        ),
        "heads": (
            [
                "heads",
                "--annotations",
                str(data["regions"]),
                "--image-root",
                str(data["image_root"]),
                "--prompt",
                "falip",
                "--limit",
                "1",
                "--output",
                str(out / "heads"),
            ],
            lambda: (lambda c: (c["preprocess"], c["falip"]))(json.loads((out / "heads" / "heads.json").read_text())["config"]),
        ),
        "attention": (["attention", image, "--box", "10,10,60,60", "--output", str(out / "a.png")], None),
        "demo": (["demo", "--methods", "none,falip", "--output", str(out / "demo")], None),
        "bias": (["bias", "--image-size", "128,128", "--box", "10,10,60,60"], None),
    }


COMMANDS = ("score", "rec", "classify", "pointcloud", "heads", "attention", "demo", "bias")


def run(name, data, out, capsys, extra=()):
    argv, recorded = commands(data, out)[name]
    model = [] if name == "demo" else ["--model", "falip-toy"]  # demo's default model is falip-toy
    assert main(argv + model + list(extra)) == 0
    printed = capsys.readouterr().out
    if name == "score":
        info = json.loads(printed)["model"]
        return (info["preprocess"], info["config"]), (info["preprocess"], info["config"])
    return printed_settings(printed), recorded() if recorded else None


@pytest.mark.parametrize("name", COMMANDS)
def test_command_runs_falip_toy_with_the_cards_settings(name, data, tmp_path, capsys):
    printed, recorded = run(name, data, tmp_path, capsys)
    assert printed == (OWN_PREPROCESS, OWN)
    if recorded is not None:
        assert recorded == (OWN_PREPROCESS, OWN)


@pytest.mark.parametrize("name", ("rec", "classify", "pointcloud", "heads"))
def test_every_run_takes_quiet_and_names_where_its_predictions_went(name, data, tmp_path, capsys):
    argv, _ = commands(data, tmp_path)[name]
    assert main([*argv, "--model", "falip-toy", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "it/s" not in err and "%|" not in err  # no progress bar
    if name in ("rec", "classify"):
        output = Path(argv[argv.index("--output") + 1])
        assert f"wrote {output} and {output.parent / (output.stem + '.predictions.jsonl')}" in out


@pytest.mark.parametrize("name", ("score", "rec", "demo", "bias"))  # demo loads its model itself; the others share load_from_args
def test_an_option_overrides_one_field_of_the_cards_settings(name, data, tmp_path, capsys):
    printed, recorded = run(name, data, tmp_path, capsys, extra=["--alpha", "0.7", "--preprocess", "crop"])
    expected = ("crop", {**OWN, "alpha": 0.7})
    assert printed == expected and expected[1]["layers"] == [2, 3, 4, 5]
    if recorded is not None:
        assert recorded == expected


def test_bias_without_a_model_uses_the_library_defaults(capsys):
    assert main(["bias", "--image-size", "448,448", "--box", "33,33,64,64"]) == 0
    assert printed_settings(capsys.readouterr().out) == ("squash", json.loads(json.dumps(FovealConfig().to_dict())))


def test_bias_with_a_model_prints_the_bias_score_applies(capsys):
    model = falip.load("falip-toy")
    assert main(["bias", "--model", "falip-toy", "--image-size", "128,96", "--box", "10,20,70,80"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines()[2:]]
    printed = np.array([[0.0 if v == "." else float(v) for v in ln.split()] for ln in rows])
    transform = model.transform_for((128, 96))
    applied = model.region_biases(transform, boxes=[(10, 20, 70, 80)])[0, 1:].view(*model.grid).numpy()
    assert printed.shape == model.grid and np.abs(printed - applied).max() <= 5e-4  # printed with 3 decimals
    assert main(["bias", "--model", "falip-toy", "--grid", "14", "--image-size", "9,9", "--box", "1,1,5,5"]) == 2


def test_load_honours_the_card_and_explicit_arguments():
    model = falip.load("falip-toy")
    assert model.preprocess == OWN_PREPROCESS and model.config == FovealConfig(**CARD["falip"])
    other = falip.load("falip-toy", preprocess="crop", config=FovealConfig(alpha=0.3))
    assert other.preprocess == "crop" and other.config == FovealConfig(alpha=0.3)
    model.config = replace(model.config, alpha=0.5)
    assert model.config.layers == (2, 3, 4, 5) and model.config.alpha == 0.5
    with pytest.raises(ValueError, match="out of range"):
        model.config = FovealConfig(layers=(9,))


def test_rec_unleashes_an_edit_prompt_against_the_clean_image(data, tmp_path, capsys):
    base = ["rec", "--dataset", "synthetic", "--split", "val", "--data-root", str(data["data_root"]), "--image-root",
            str(data["image_root"]), "--model", "falip-toy", "--method", "circle", "--limit", "3", "--quiet"]  # fmt: skip
    assert main(base + ["--output", str(tmp_path / "plain.json")]) == 0
    assert main(base + ["--unleash", "4-5:all", "--output", str(tmp_path / "u.json")]) == 0
    capsys.readouterr()
    unleashed = json.loads((tmp_path / "u.json").read_text())
    assert unleashed["config"]["bias"][0]["unleash"] == [{"layers": [4, 5], "heads": None, "lam": 1.0}]

    def scores(name):
        lines = (tmp_path / f"{name}.predictions.jsonl").read_text().splitlines()[1:]
        return np.array([json.loads(line)["scores"] for line in lines])

    assert scores("u").shape == scores("plain").shape == (3, 3)
    assert np.abs(scores("u") - scores("plain")).max() > 1e-3  # Eq. 6 changed the red-circle embeddings
