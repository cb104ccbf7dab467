"""Warnings: attributed to the caller's frame in the library, one ``falip: warning:`` line each in the CLI,
and other libraries' log lines while falip loads a model folded into falip's own message."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

import falip
from conftest import random_image, tiny_clip, wrap
from falip.cli import main
from falip.errors import RegionClampWarning
from falip.notices import cli_warning_line, folded_logs


def test_a_library_warning_points_at_the_callers_line():
    model = wrap(tiny_clip(64, 16, layers=2, width=64))
    image = random_image(np.random.default_rng(0), 64, 48)
    with pytest.warns(RegionClampWarning) as caught:
        model.encode_regions(image, [(-10, 0, 30, 30)])  # through encode_regions_batch, region_biases, geometry
    assert [w.filename for w in caught] == [__file__]
    with pytest.warns(UserWarning, match="random initialisation") as caught:
        falip.load("ViT-S-32")
    assert [w.filename for w in caught] == [__file__]  # through falip.load, the registry and the open_clip adapter


def test_open_clips_root_log_lines_are_folded_into_one_falip_warning(capfd):
    root = logging.getLogger()
    handlers = list(root.handlers)
    with pytest.warns(UserWarning) as caught:
        falip.load("ViT-S-32")
    assert len(caught) == 1 and "ViT-S-32 has no pretrained weights: using random initialisation" in str(caught[0].message)
    assert "initialized randomly" not in str(caught[0].message)  # open_clip's line says the same: folded
    assert "WARNING" not in capfd.readouterr().err and root.handlers == handlers  # no basicConfig side effect


def test_folded_logs_takes_only_the_named_packages_records(tmp_path, monkeypatch, caplog):
    pkg = tmp_path / "chatty"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import logging\ndef load():\n    logging.warning('weights %s', 'initialised')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import chatty

    with caplog.at_level(logging.WARNING), folded_logs("chatty") as logs:
        chatty.load()
        logging.getLogger("someone.else").warning("kept")
    assert logs == ["weights initialised"] and [r.getMessage() for r in caplog.records] == ["kept"]


def test_cli_warnings_are_one_line_without_a_path(tmp_path, capsys):
    import torch
    from PIL import Image

    torch.save(tiny_clip(224, 32, layers=2).state_dict(), tmp_path / "tiny.pt")
    Image.fromarray(random_image(np.random.default_rng(0), 320, 240)).save(tmp_path / "photo.png")
    argv = ["score", str(tmp_path / "photo.png"), "--box", "-20,0,100,100", "--text", "a", "--model", str(tmp_path / "tiny.pt")]
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["falip: warning: box 0 (-20, 0, 100, 100) extends outside the 320x240 image; clamped to it"]
    assert cli_warning_line("two\n  lines") == "falip: warning: two lines"
