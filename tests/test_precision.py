"""Low precision on CPU: bf16 (and fp16 where torch runs it) against fp32 on falip-toy, and the error where it cannot run.

Tolerances (max |Δ| of L2-normalised region embeddings, falip-toy on a generated scene): bf16 5e-3
(8 mantissa bits: ≈ 1.4e-3 measured), fp16 1e-3 (11 bits: ≈ 2e-4 measured).
"""

import numpy as np
import pytest
import torch

import falip
import falip.loading
from falip.errors import ModelLoadError
from falip.synthetic import make_scene

TOLERANCE = {"bf16": 5e-3, "fp16": 1e-3}


@pytest.fixture(scope="module")
def fp32_toy():
    return falip.load("falip-toy")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_region_embeddings_match_fp32_on_cpu(fp32_toy, precision):
    try:
        low = falip.load("falip-toy", precision=precision)
    except ModelLoadError as exc:  # this torch cannot run the precision on CPU: the error says so
        assert precision in str(exc) and "cpu" in str(exc)
        pytest.skip(str(exc))
    assert low.runtime.dtype == falip.loading.PRECISIONS[precision]
    scene = make_scene(np.random.default_rng(3), 4, size=256)
    boxes = [o.box for o in scene.objects]
    texts = [e[0] for e in scene.expressions]
    for mode in ("exact", "approx"):  # naive ≡ exact is checked in fp32 (test_encode)
        ref = fp32_toy.encode_regions(scene.image, boxes, mode=mode)
        got = low.encode_regions(scene.image, boxes, mode=mode)
        assert got.dtype == torch.float32  # embeddings are returned in fp32 whatever the precision
        assert (got - ref).abs().max().item() < TOLERANCE[precision], mode
    best_ref = fp32_toy.score_regions(scene.image, boxes, texts).argmax(0)
    assert torch.equal(low.score_regions(scene.image, boxes, texts).argmax(0), best_ref)


def test_a_precision_torch_cannot_run_on_the_device_is_a_clear_error(monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", unsupported)
    with pytest.raises(ModelLoadError, match=r"precision fp16 is not supported on device cpu .*not implemented for 'Half'"):
        falip.load("falip-toy", precision="fp16")
    monkeypatch.undo()
    falip.loading.check_precision("fp16", "cpu")  # without the stub, this torch runs fp16 on CPU
    falip.loading.check_precision("bf16", "cpu")
