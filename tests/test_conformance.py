"""The adapter contract, checked the same way on every adapter (one fixture each, tests/adapters.py).

zero bias ≡ the model's own image features; exact ≡ naive in every rows setting (with head scales and
unleashing), approx where it is exact by construction; batched ≡ one by one; per-head terms sum to the block;
fp16/bf16 within a per-dtype tolerance of fp32; one digest, score and tokenizer contract. Tiny random models, CPU.
"""

import functools
import hashlib

import pytest
import torch
import torch.nn.functional as F

from adapters import CASES
from falip.encode import BiasPlan, encode_biased
from falip.errors import TextUnavailableError

ATOL = 1e-5  # fp32: batched vs per-sample kernels, sdpa vs explicit softmax
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}  # max |Δ| of normalised embeddings vs the fp32 model
MATTERS = 1e-3  # a bias "changes" normalised embeddings by at least 100× ATOL

NAMES = list(CASES)


@functools.cache
def built(name: str, dtype: torch.dtype = torch.float32):
    """(model, runtime with the model's tokenizer where it has one) of case ``name``, once per dtype."""
    case = CASES[name]
    model = case.model().to(dtype)
    return model, case.runtime(model)


def pixels(rt, batch=1, seed=0) -> torch.Tensor:
    return torch.randn(batch, 3, rt.image_size, rt.image_size, generator=torch.Generator().manual_seed(seed))


def biases(rt, k: int, seed: int = 1, alpha: float = 6.0) -> torch.Tensor:
    """``(k, L)``: 0 on the prefix tokens, in [0, alpha] on the patches."""
    gen = torch.Generator().manual_seed(seed)
    b = torch.zeros(k, rt.num_prefix + rt.grid[0] * rt.grid[1])
    b[:, rt.num_prefix :] = alpha * torch.rand(k, rt.grid[0] * rt.grid[1], generator=gen)
    return b


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)


def moved(a, b) -> float:
    return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).abs().max().item()


def plans(rt) -> dict:
    """Every rows setting the model takes, with head scales and unleashing (blocks 1 and 2 of 3)."""
    H, n = rt.num_heads, rt.num_layers
    layers = (n - 2, n - 1)
    scales = torch.linspace(0.0, 2.0, H)
    gain = {n - 1: torch.linspace(1.0, 0.0, H)}
    probe = rt.pool == "attention_pool"
    out = {
        "all": BiasPlan(layers=layers, rows="all", probe=probe),
        "diagonal": BiasPlan(layers=layers, rows="diagonal", probe=probe, head_scales=scales),
        "all-unleashed": BiasPlan(layers=layers, rows="all", probe=probe, unleash=gain),
    }
    if probe:
        out["probe"] = BiasPlan(layers=(), rows="cls", probe=True)
    else:
        out["cls"] = BiasPlan(layers=(0,) + layers, rows="cls")
        out["cls-heads"] = BiasPlan(layers=layers, rows="cls", head_scales=scales)
        out["cls-unleashed"] = BiasPlan(layers=layers, rows="cls", unleash=gain)
    return out


def approx_is_exact(plan: BiasPlan, rt) -> bool:
    """approx equals exact by construction: the probe alone, or [CLS] biased in the last two blocks only."""
    if rt.pool == "attention_pool":
        return not plan.layers
    return plan.rows == "cls" and plan.layers == (rt.num_layers - 2, rt.num_layers - 1) and not plan.unleash


@pytest.mark.parametrize("name", NAMES)
def test_zero_bias_is_the_models_own_image_features(name):
    model, rt = built(name)
    px = pixels(rt, batch=2)
    with torch.no_grad():
        own = CASES[name].own(model, px)
    close(rt.run(px), own)
    zero = torch.zeros(3, biases(rt, 1).shape[1])
    for plan_name, plan in plans(rt).items():
        for mode in ("naive", "exact", "approx"):
            if mode == "approx" and not approx_is_exact(plan, rt) and (plan.rows != "cls" or rt.pool != "cls"):
                continue
            out = encode_biased(rt, px, zero, plan, mode, image_index=torch.tensor([1, 0, 1]))
            close(out, own[[1, 0, 1]]), (plan_name, mode)


@pytest.mark.parametrize("name", NAMES)
def test_exact_equals_naive_in_every_rows_setting_and_the_bias_matters(name):
    model, rt = built(name)
    px, b = pixels(rt), biases(rt, 3)
    plain = rt.run(px)
    for plan_name, plan in plans(rt).items():
        naive = encode_biased(rt, px, b, plan, "naive")
        assert moved(naive, plain) > MATTERS, plan_name
        assert moved(naive[0], naive[1]) > MATTERS, plan_name  # two regions, two embeddings
        close(encode_biased(rt, px, b, plan, "exact", chunk_size=2), naive)
        if approx_is_exact(plan, rt):
            close(encode_biased(rt, px, b, plan, "approx"), naive)


@pytest.mark.parametrize("name", NAMES)
def test_regions_of_several_images_batched_equal_each_alone(name):
    model, rt = built(name)
    px, b = pixels(rt, batch=3), biases(rt, 5)
    index = torch.tensor([2, 0, 2, 1, 0])
    plan = plans(rt)["cls" if rt.pool == "cls" else "all"]
    alone = torch.cat([encode_biased(rt, px[n : n + 1], b[k : k + 1], plan, "naive") for k, n in enumerate(index.tolist())])
    for chunk in (1, 2, 5):
        close(encode_biased(rt, px, b, plan, "exact", chunk_size=chunk, image_index=index), alone)


@pytest.mark.parametrize("name", NAMES)
def test_per_head_terms_sum_to_the_block(name):
    model, rt = built(name)
    L = rt.num_prefix + rt.grid[0] * rt.grid[1]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, L, rt.width, generator=gen)
    mask = 0.5 * torch.randn(2 * rt.num_heads, L, L, generator=gen)
    with torch.no_grad():
        for i in range(rt.num_layers):
            heads = rt.block_heads(i, x, x, mask, keep_terms=True)
            assert heads.terms.shape == (2, L, rt.num_heads, rt.width) and heads.probs.shape == (2, rt.num_heads, L, L)
            close(heads.probs.sum(-1), torch.ones(2, rt.num_heads, L))
            close(heads.out, rt.block(i, x, mask))
            close(rt.block_tail(i, x, heads.terms.sum(2) + heads.out_bias), heads.out)
            if i == 0:
                assert (heads.terms[:, :, 0] - heads.terms[:, :, 1]).abs().max() > MATTERS  # the heads differ


@pytest.mark.parametrize("dtype", list(HALF_TOL), ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_is_within_its_tolerance_of_fp32(name, dtype):
    _, full = built(name)
    _, half = built(name, dtype)  # the seam checks ran at this dtype
    assert half.dtype == dtype
    px, b = pixels(full), biases(full, 2)
    for plan_name, plan in plans(full).items():
        reference = encode_biased(full, px, b, plan, "naive")
        for mode in ("naive", "exact"):
            assert moved(encode_biased(half, px, b, plan, mode), reference) < HALF_TOL[dtype], (plan_name, mode)


def reference_digest(state: dict, keep=lambda name: True) -> str:
    h = hashlib.sha256()
    for name, t in state.items():
        if keep(name):
            t = t.detach().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_digest_and_score_follow_one_contract(name):
    case = CASES[name]
    model = case.model()
    rt = case.runtime(model)
    all_, text = rt.digest("all"), rt.digest("text")
    assert all_ == reference_digest(model.state_dict()) and len(text) == 64 and text != all_
    assert case.runtime(model).digest("text") == text  # stable
    state = dict(model.named_parameters())
    with torch.no_grad():
        state[case.image_tensor].mul_(2.0)
    assert rt.digest("all") != all_ and rt.digest("text") == text
    with torch.no_grad():
        state[case.text_tensor].mul_(2.0)
    assert rt.digest("text") != text
    with pytest.raises(ValueError, match="digest part must be 'all' or 'text'"):
        rt.digest("image")
    bias = getattr(model, "logit_bias", None)
    assert rt.score_kind == ("softmax" if bias is None or rt.family == "hf-clip" else "sigmoid")
    image, txt = F.normalize(torch.randn(3, rt.embed_dim), dim=-1), F.normalize(torch.randn(2, rt.embed_dim), dim=-1)
    expected = model.logit_scale.exp().item() * image @ txt.T + (0.0 if rt.score_kind == "softmax" else bias.item())
    close(rt.logits(image, txt), expected, atol=1e-4)
    info = rt.info()
    assert info["score_kind"] == rt.score_kind and info["logit_bias"] == (rt.score_kind == "sigmoid")
    assert info["mean_std_source"] and info["bias_acts_on"] and info["pool"] == rt.pool


@pytest.mark.parametrize("name", NAMES)
def test_the_no_tokenizer_contract(name):
    case = CASES[name]
    model, rt = built(name)
    without = case.runtime(model, tokenizer=False, text_missing="its tokenizer files are elsewhere (test)")
    with pytest.raises(TextUnavailableError, match=f"this {rt.family} model has no tokenizer: its tokenizer files are elsewhere"):
        without.encode_text(["a dog"])
    assert without.info()["text"] is False and without.info()["text_missing"].startswith("its tokenizer")
    assert without.digest("text") != rt.digest("text") or rt.tokenizer is None
    with pytest.raises(ValueError, match="give the model's tokenizer, or text_missing"):
        case.runtime(model, tokenizer=False, text_missing=None)
    if rt.tokenizer is not None:
        assert rt.encode_text(["a dog", "two cats"]).shape == (2, rt.embed_dim) and rt.info()["text"] is True


# -- full size: EVA02-B-16 and PE-Core-S-16-384 with random weights from a file (the slow tests) -------------

FULL_TOL = 2e-5


@pytest.fixture(scope="module", params=["EVA02-B-16", "PE-Core-S-16-384"])
def full_size(request, tmp_path_factory):
    """(open_clip model, falip.load(name, pretrained=FILE)) on the same random weights, saved as a state-dict file."""
    import warnings

    import open_clip

    import falip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        clip = open_clip.create_model(request.param).eval()
    path = tmp_path_factory.mktemp("full") / f"{request.param}.pt"
    torch.save(clip.state_dict(), path)
    return clip, falip.load(request.param, pretrained=str(path), preprocess="squash")


@pytest.mark.slow
def test_full_size_eva_towers_from_a_file(full_size):
    import numpy as np

    from falip import FovealConfig

    clip, model = full_size
    assert model.runtime.family == "open_clip-eva" and model.runtime.positional
    image = np.random.default_rng(0).integers(0, 255, (200, 260, 3), dtype=np.uint8)
    boxes = [(10, 10, 120, 150), (130, 40, 250, 190)]
    with torch.no_grad():
        own = F.normalize(clip.encode_image(model.preprocess_image(image)[0]), dim=-1)
    zero = model.encode_regions(image, boxes, config=FovealConfig(alpha=0.0), mode="exact")
    close(zero, own.expand(2, -1), atol=FULL_TOL)
    naive = model.encode_regions(image, boxes, mode="naive")
    close(model.encode_regions(image, boxes, mode="exact"), naive, atol=FULL_TOL)
    assert (naive - own).abs().max() > 5 * FULL_TOL  # the bias changes the embedding
    assert (naive[0] - naive[1]).abs().max() > 5 * FULL_TOL  # two boxes, two embeddings


# -- the supported-models table ---------------------------------------------------------------


def test_docs_models_md_is_what_falip_models_prints():
    """In a fresh process (other tests register configs of their own with open_clip)."""
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from falip.cli.models import versions

    doc = (Path(__file__).parents[1] / "docs" / "models.md").read_text(encoding="utf-8")
    table = re.search(r"<!-- falip models: begin -->\n(.*)\n<!-- falip models: end -->", doc, re.S).group(1)
    if not table.startswith(f"With {versions()}:"):
        pytest.skip(f"docs/models.md was generated with other library versions than {versions()}")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    run = [sys.executable, "-m", "falip", "models", "--format"]
    out = subprocess.run([*run, "markdown"], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert table == out, "docs/models.md is stale: regenerate it with `falip models --format markdown`"
    rows = json.loads(subprocess.run([*run, "json"], capture_output=True, text=True, env=env, check=True).stdout)
    status = {r["model"]: r["status"] for r in rows}
    for name in ("ViT-B-16", "falip-toy", "ViT-B-16-SigLIP2", "MobileCLIP2-L-14", "EVA02-B-16", "PE-Core-S-16-384", "EVA01-g-14"):
        assert status[name] == "runs", name
    for name, why in (
        ("RN50", "ResNet"),
        ("coca_ViT-B-32", "attentional pooler"),
        ("coca_base", "CoCa"),
        ("ViTamin-S", "not a ViT"),
    ):
        assert status[name].startswith("refused: ") and why in status[name], name
    assert status["vit_medium_patch16_gap_256"].startswith("refused: ") and "avg" in status["vit_medium_patch16_gap_256"]
