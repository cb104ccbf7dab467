"""HF transformers runtime: the same weights in OpenAI layout (open_clip runtime) and in HF ``CLIPModel`` layout
(``tools/openai_to_hf.py``) give the same region embeddings, text embeddings and logits in every mode; SigLIP /
SigLIP2 with the bias on their attention probe; loading and its errors. CPU, tiny random models, offline. The contract every
adapter meets (zero bias, exact ≡ naive, batching, digests, half precision) is tests/test_conformance.py."""

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import falip
from adapters import openai_to_hf, tiny_siglip
from conftest import random_boxes, random_image, tiny_clip
from falip import FovealConfig, ModelLoadError, Unleash, UnsupportedModelError
from falip.errors import TextUnavailableError
from falip.runtimes.hf import HFRuntime, claims, load_hf
from falip.runtimes.open_clip_loading import infer_openai_config

transformers = pytest.importorskip("transformers")


TOL = 1e-5
TEXTS = ["a photo of a cat", "the big red dog on the left, running!", "two mugs: one blue & one white"]


def load_model(path) -> falip.FalipModel:
    return falip.load(str(path), preprocess="squash")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(open_clip model from an OpenAI-layout .safetensors, HF model from its conversion): 12 blocks, 6×6 patches."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hf-pair")
    clip = tiny_clip(image_size=96, patch_size=16, layers=12, width=128, seed=7)
    state = {k: v.contiguous() for k, v in clip.state_dict().items() if k != "attn_mask"}
    save_file(state, str(root / "tiny.safetensors"))
    openai_to_hf.save_hf_clip(state, infer_openai_config(state), root / "hf")
    return load_model(root / "tiny.safetensors"), load_model(root / "hf"), root / "hf"


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(5)
    image = random_image(rng, 160, 120)
    return image, random_boxes(rng, 160, 120, 3)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- conversion and the model's own forward ---------------------------------------------------------


def test_converted_hf_model_reproduces_open_clip_image_and_text_features(pair):
    oc, hf, _ = pair
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf.runtime.model.get_image_features(pixel_values=pixels).pooler_output
        ours = oc.runtime.run(pixels)
    assert max_diff(F.normalize(theirs, dim=-1), F.normalize(ours, dim=-1)) < TOL


def test_tokenizer_built_from_open_clip_bpe_gives_open_clip_token_ids(pair):
    _, hf, _ = pair
    ours = open_clip.SimpleTokenizer(context_length=77)(TEXTS)
    theirs = hf.runtime.tokenizer(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    eot = ours.argmax(dim=1)  # <|endoftext|> has the largest id; after it open_clip pads 0, HF pads <|endoftext|>
    for row, end in enumerate(eot):
        assert torch.equal(ours[row, : end + 1], theirs[row, : end + 1])


def test_text_embeddings_agree_across_runtimes(pair):
    oc, hf, _ = pair
    assert max_diff(hf.encode_text(TEXTS), oc.encode_text(TEXTS)) < TOL


def test_logits_are_logit_scale_times_cosine(pair):
    oc, hf, _ = pair
    image, text = F.normalize(torch.randn(3, 64), dim=-1), F.normalize(torch.randn(2, 64), dim=-1)
    expected = hf.runtime.model.logit_scale.exp().item() * image @ text.T
    assert max_diff(hf.runtime.logits(image, text), expected) < TOL
    assert max_diff(hf.runtime.logits(image, text), oc.runtime.logits(image, text)) < TOL


# -- regions: every mode, rows, unleash, official settings ------------------------------------------

CONFIGS = {
    "official": FovealConfig.official(),
    "alpha4-blocks2-11": FovealConfig(alpha=4.0, layers=tuple(range(2, 12))),
    "rows-all": FovealConfig(alpha=2.0, rows="all", layers=(9, 10, 11)),
    "heads-unleash": FovealConfig(alpha=2.0, layers=(8, 9, 10, 11), heads=(0,), unleash=(Unleash(layers=(10, 11), lam=1.0),)),
}


@pytest.mark.parametrize("mode", ["naive", "exact", "approx"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_region_embeddings_and_logits_agree_across_runtimes(pair, scene, mode, name):
    config = CONFIGS[name]
    if mode == "approx" and config.rows != "cls":
        pytest.skip("approx exists for rows=cls only")
    oc, hf, _ = pair
    image, boxes = scene
    ours = hf.encode_regions(image, boxes, config=config, mode=mode)
    theirs = oc.encode_regions(image, boxes, config=config, mode=mode)
    assert max_diff(ours, theirs) < TOL
    text = oc.encode_text(TEXTS)
    assert max_diff(hf.runtime.logits(ours, text), oc.runtime.logits(theirs, text)) < 20 * TOL  # logit_scale ≈ 14.3
    plain = oc.encode_image(image)
    assert max_diff(theirs, plain.expand_as(theirs)) > 1e-3  # the bias matters: the comparison can fail


def test_head_analysis_agrees_across_runtimes(pair):
    oc, hf, _ = pair
    L, H = 1 + 36, hf.num_heads
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, L, 128, generator=gen)
    mask = 0.5 * torch.randn(2 * H, L, L, generator=gen)
    gain = torch.tensor([1.0, 0.5])
    ours = hf.runtime.block_heads(5, x, x, mask, gain=gain, keep_terms=True)
    theirs = oc.runtime.block_heads(5, x, x, mask, gain=gain, keep_terms=True)
    for a, b in ((ours.out, theirs.out), (ours.probs, theirs.probs), (ours.terms, theirs.terms)):
        assert max_diff(a, b) < TOL


@pytest.mark.parametrize("method", ["falip+blur"])  # the bias and an image edit at once
def test_head_response_agrees_across_runtimes(pair, scene, method):
    from falip.heads import prompt_response

    oc, hf, _ = pair
    image, boxes = scene
    config = FovealConfig(alpha=2.0, layers=(8, 9, 10, 11))
    ours = prompt_response(hf, image, boxes[0], method=method, config=config)
    theirs = prompt_response(oc, image, boxes[0], method=method, config=config)
    assert ours.shape == (12, 2) and theirs.abs().max() > 1e-3
    assert max_diff(ours, theirs) < 1e-4 * max(1.0, theirs.abs().max().item())


def test_sdpa_and_eager_attention_give_the_same_blocks(pair):
    _, hf, directory = pair
    sdpa = transformers.CLIPModel.from_pretrained(directory, attn_implementation="sdpa")
    a, b = (
        hf.runtime,
        HFRuntime(sdpa, text_missing="no tokenizer in this test"),
    )  # eager (falip's choice) and sdpa both pass the seam checks
    L, H = 37, a.num_heads
    gen = torch.Generator().manual_seed(4)
    x, mask = torch.randn(3, L, 128, generator=gen), torch.randn(3 * H, L, L, generator=gen)
    with torch.no_grad():
        assert max_diff(a.block(3, x, mask), b.block(3, x, mask)) < 1e-4
        assert max_diff(a.block(3, x, mask), a.block(3, x)) > 1e-2  # the mask reaches the attention


def test_info_names_family_prefix_pooling_and_normalisation_source(pair):
    _, hf, directory = pair
    assert hf.pretrained == str(directory) and hf.weights_digest().startswith("file:")  # model.safetensors
    info = hf.runtime.info()
    assert info["family"] == "hf-clip" and info["num_prefix"] == 1 and info["pool"] == "cls"
    assert info["mean_std_source"] == "preprocessor_config.json" and info["score_kind"] == "softmax"
    assert info["attn_implementation"] == "eager"


# -- SigLIP / SigLIP2: the bias on the attention probe ----------------------------------------------


def save_siglip_tokenizer(directory: Path, max_length: int) -> None:
    """transformers' own SiglipTokenizer on a tiny SentencePiece model trained here (SigLIP's is 32k pieces)."""
    import io

    spm = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    sentences = ["a photo of a cat", "the red dog", "a picture of two mugs", "one blue and one white"] * 10
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=40, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    (directory / "spiece.model").write_bytes(buffer.getvalue())
    transformers.SiglipTokenizer(vocab_file=str(directory / "spiece.model"), model_max_length=max_length).save_pretrained(
        directory
    )


@pytest.fixture(scope="module", params=["siglip", "siglip2"])
def siglip_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    tiny_siglip(request.param).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def siglip_model(siglip_dir):
    return load_model(siglip_dir)


def test_siglip_loads_without_tokenizer_and_text_calls_name_what_is_missing(siglip_model):
    model = siglip_model
    assert model.runtime.info()["pool"] == "attention_pool" and model.runtime.num_prefix == 0
    with pytest.raises(TextUnavailableError, match="no tokenizer files"):
        model.runtime.encode_text(["a photo of a cat"])


def test_siglip_pool_bias_changes_the_embedding_as_an_added_probe_logit(siglip_model):
    runtime = siglip_model.runtime
    gen = torch.Generator().manual_seed(2)
    pixels, bias = torch.randn(1, 3, 32, 32, generator=gen), 3 * torch.rand(1, 16, generator=gen)
    biased = runtime.run(pixels, pool_bias=bias)
    assert max_diff(biased, runtime.run(pixels)) > 1e-3
    # The same probe written out: softmax(q·kᵀ/√dh + bias) per head, then the head's out projection, norm and MLP.
    head, vision = runtime.vision.head, runtime.vision
    with torch.no_grad():
        tokens = vision.post_layernorm(runtime._blocks(runtime._stem(pixels)))
        w, b = head.attention.in_proj_weight, head.attention.in_proj_bias
        D, H = runtime.width, runtime.num_heads
        q = F.linear(head.probe, w[:D], b[:D]).view(1, 1, H, -1).transpose(1, 2)
        k = F.linear(tokens, w[D : 2 * D], b[D : 2 * D]).view(1, 16, H, -1).transpose(1, 2)
        v = F.linear(tokens, w[2 * D :], b[2 * D :]).view(1, 16, H, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / (D // H) ** 0.5 + bias[:, None, None], dim=-1)
        x = head.attention.out_proj((probs @ v).transpose(1, 2).reshape(1, 1, D))
        expected = (x + head.mlp(head.layernorm(x)))[:, 0]
    assert max_diff(biased, expected) < TOL


def test_siglip_text_uses_its_own_tokenizer_padded_to_max_length_and_sigmoid_logits(siglip_dir, tmp_path):
    import shutil

    directory = tmp_path / "with-tokenizer"
    shutil.copytree(siglip_dir, directory)
    save_siglip_tokenizer(directory, 16)
    runtime = load_model(directory).runtime
    texts = ["a photo of a cat", "the red dog"]
    tokens = runtime.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        own = runtime.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    assert max_diff(runtime.encode_text(texts), own.pooler_output) < TOL
    image, text = F.normalize(torch.randn(2, 64), dim=-1), F.normalize(torch.randn(2, 64), dim=-1)
    model = runtime.model
    expected = model.logit_scale.exp().item() * image @ text.T + model.logit_bias.item()
    assert runtime.score_kind == "sigmoid" and max_diff(runtime.logits(image, text), expected) < TOL


# -- loading and its errors -------------------------------------------------------------------------


def test_the_adapter_claims_hub_ids_and_transformers_directories(pair, tmp_path):
    _, _, directory = pair
    assert claims("hf:openai/clip-vit-base-patch16") and claims(str(directory))
    assert not claims(str(tmp_path)) and not claims("ViT-B-16")


def test_unknown_model_type_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="transformers 'bert' model; falip runs model_type clip / siglip / siglip2"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))  # e.g. a timm directory
    with pytest.raises(UnsupportedModelError, match="has no model_type"):
        load_model(tmp_path)


def test_uncached_hub_id_fails_at_once_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("hf:openai/clip-vit-base-patch16")


def test_cached_hub_id_loads_offline_from_the_local_cache(monkeypatch, tmp_path, siglip_dir):
    import shutil

    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "models--tiny-org--tiny-siglip"
    shutil.copytree(siglip_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_model("hf:tiny-org/tiny-siglip")
    assert model.runtime.family in ("hf-siglip", "hf-siglip2") and model.name == "hf:tiny-org/tiny-siglip"


def test_malformed_hub_id_is_reported(tmp_path):
    with pytest.raises(ModelLoadError, match="hf:<org>/<name>"):
        load_model("hf:clip")


def test_pretrained_and_quick_gelu_do_not_apply_to_transformers_models(pair):
    _, _, directory = pair
    with pytest.raises(ValueError, match="pretrained"):
        load_hf(str(directory), "openai", "cpu", "fp32", None)
    with pytest.raises(ValueError, match="hidden_act"):
        load_hf(str(directory), None, "cpu", "fp32", True)


@pytest.mark.parametrize("precision, dtype, min_cos", [("fp16", torch.float16, 0.999), ("bf16", torch.bfloat16, 0.95)])
def test_half_precision_loads_and_encodes_close_to_fp32(pair, scene, precision, dtype, min_cos):
    _, hf, directory = pair
    image, boxes = scene
    model = falip.load(str(directory), precision=precision, preprocess="squash")
    assert model.runtime.dtype == dtype
    half = model.encode_regions(image, boxes[:2])
    assert ((half * hf.encode_regions(image, boxes[:2])).sum(-1) > min_cos).all()  # cosine to the fp32 embeddings


def test_siglip2_patches_are_laid_out_as_its_image_processor_writes_them():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    runtime = HFRuntime(tiny_siglip("siglip2"), text_missing="no tokenizer in this test")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    patches, spatial = runtime._patchify(pixels)
    assert spatial.tolist() == [[4, 4], [4, 4]]
    for b in range(2):
        assert torch.equal(patches[b], convert_image_to_patches(pixels[b], 8))
