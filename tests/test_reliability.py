"""Fault injection: the bad-input, concurrency and crash cases of issue 14 (README "Reliability").

Each test names the case and its expected outcome: the right answer, a clear error, or a warning.
Tiny random models and tiny images keep the whole file fast.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import random_boxes, random_image, tiny_clip, wrap
from falip import FovealConfig
from falip.bias import Unleash
from falip.errors import InvalidRegionError


@pytest.fixture(scope="module")
def tiny_model():
    return wrap(tiny_clip(64, 16, layers=4, width=64), config=FovealConfig(layers=(2, 3)))


# ----------------------------------------------------------------------------------------------
# 1. Threads: one model, many threads


def test_threads_on_one_model_give_the_single_threaded_results_and_leave_nothing_swapped(tiny_model):
    rng = np.random.default_rng(0)
    images = [random_image(rng, 64 + 8 * i, 48 + 4 * i) for i in range(4)]
    boxes = [random_boxes(rng, im.shape[1], im.shape[0], 1 + i) for i, im in enumerate(images)]
    unleash = FovealConfig(layers=(2, 3), unleash=(Unleash(layers=(3,), heads=None, lam=1.0),))
    calls = []
    for i in range(4):
        for mode in ("exact", "naive", "approx"):
            calls.append(("regions", i, dict(mode=mode)))
        calls.append(("regions", i, dict(mode="exact", config=unleash)))
        calls.append(("image", i, {}))
        calls.append(("score", i, dict(mode="approx")))
    transformer = tiny_model.runtime.visual.transformer

    def call(job):
        kind, i, kw = job
        if kind == "regions":
            return tiny_model.encode_regions(images[i], boxes[i], **kw)
        if kind == "image":
            return tiny_model.encode_image(images[i])
        return tiny_model.score_regions(images[i], boxes[i], texts=["a cat", "a dog"], **kw)

    expected = [call(job) for job in calls]
    jobs = calls * 6
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(call, jobs))
    for job, out in zip(jobs, got):
        want = expected[calls.index(job)]
        assert out.shape == want.shape, job
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5, msg=lambda m, job=job: f"{job}: {m}")
    assert tiny_model.runtime.visual.transformer is transformer
    assert tiny_model.encode_image(images[0]).shape[0] == 1


def test_a_call_that_raises_leaves_the_model_intact(tiny_model):
    rng = np.random.default_rng(1)
    image = random_image(rng, 64, 64)
    before = tiny_model.encode_regions(image, [[0, 0, 32, 32]])
    with pytest.raises(InvalidRegionError):
        tiny_model.encode_regions(image, [[0, 0, 32, 32], [100, 100, 120, 120]])

    def failing(x):
        raise RuntimeError("trunk failed")

    with pytest.raises(RuntimeError):
        tiny_model.runtime.run(torch.zeros(1, 3, 64, 64), failing)
    assert type(tiny_model.runtime.visual.transformer).__name__ == "Transformer"
    torch.testing.assert_close(tiny_model.encode_regions(image, [[0, 0, 32, 32]]), before, rtol=0, atol=0)


def test_score_regions_returns_no_grad_tensors(tiny_model):
    scores = tiny_model.score_regions(random_image(np.random.default_rng(2), 64, 64), [[0, 0, 30, 30]], texts=["x"])
    assert not scores.requires_grad
