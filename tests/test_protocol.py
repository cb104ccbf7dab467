"""The runtime protocol on the open_clip adapter: text, the model's own logits, digests, the registry,
and bias vectors with more than one prefix token (register tokens riding with the patches)."""

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import falip
from conftest import random_boxes, random_image, tiny_clip, wrap
from falip import FovealConfig, TextUnavailableError, UnsupportedModelError
from falip.bias import bias_from_weights, region_biases
from falip.geometry import make_transform
from falip.model import FalipModel
from falip.runtimes import OpenClipRuntime, registry
from falip.runtimes.registry import Adapter, LoadedModel

ATOL = 1e-5


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(64, 16, layers=4, seed=7)


def test_runtime_describes_itself_as_the_protocol_says(clip):
    rt = OpenClipRuntime(clip, tokenizer=open_clip.SimpleTokenizer())
    assert (rt.family, rt.num_prefix, rt.pool, rt.score_kind) == ("open_clip", 1, "cls", "softmax")
    assert (rt.width, rt.embed_dim, rt.grid) == (128, 64, (4, 4))
    info = rt.info()
    assert info["family"] == "open_clip" and info["num_prefix"] == 1 and info["embed_dim"] == 64 and info["text"]
    assert wrap(clip).info()["runtime"] == info


def test_logits_are_logit_scale_times_cosine_plus_the_bias_when_the_model_has_one(clip):
    rt = OpenClipRuntime(clip, tokenizer=open_clip.SimpleTokenizer())
    image = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = F.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    expected = clip.logit_scale.exp() * image @ text.T
    torch.testing.assert_close(rt.logits(image, text), expected, atol=ATOL, rtol=0)
    biased = tiny_clip(64, 16, layers=4, seed=7)
    biased.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))  # as open_clip's SigLIP models carry it
    torch.testing.assert_close(OpenClipRuntime(biased, tokenizer=open_clip.SimpleTokenizer()).logits(image, text), expected - 10)


def test_run_refuses_a_pool_bias_on_a_cls_pooled_model(clip):
    rt = OpenClipRuntime(clip, tokenizer=open_clip.SimpleTokenizer())
    with pytest.raises(ValueError, match="pool_bias"):
        rt.run(torch.zeros(1, 3, 64, 64), pool_bias=torch.zeros(1, 17))


def test_encode_text_without_a_tokenizer_raises_but_images_still_work(clip, rng):
    rt = OpenClipRuntime(clip, text_missing="no tokenizer files in /somewhere")
    model = FalipModel(rt)
    with pytest.raises(TextUnavailableError, match="no tokenizer files in /somewhere"):
        model.encode_text(["a dog"])
    assert model.encode_regions(random_image(rng, 64, 64), [(0, 0, 32, 32)]).shape == (1, 64)
    with pytest.raises(ValueError, match="tokenizer"):
        OpenClipRuntime(clip)  # neither a tokenizer nor why there is none


def test_a_named_model_whose_tokenizer_cannot_be_had_loads_for_images(monkeypatch, rng):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip, "get_tokenizer", offline)
    with pytest.warns(UserWarning, match="random"):
        model = falip.load("ViT-S-32")
    assert model.encode_image(random_image(rng, 48, 48)).shape == (1, 384)
    with pytest.raises(TextUnavailableError, match="tokenizer for ViT-S-32 could not be loaded .*huggingface"):
        model.encode_text("a dog")


def test_digest_is_stable_across_loads_of_one_file_and_differs_for_other_weights(tmp_path, clip):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(clip.state_dict(), a)
    torch.save(tiny_clip(64, 16, layers=4, seed=8).state_dict(), b)
    first, again, other = (falip.load(str(p)).runtime for p in (a, a, b))
    assert first.digest("all") == again.digest("all") and first.digest("text") == again.digest("text")
    assert first.digest("all") != other.digest("all") and first.digest("text") != other.digest("text")
    assert first.digest("all") != first.digest("text")
    with pytest.raises(ValueError, match="digest part"):
        first.digest("image")


def test_resnet_towers_are_refused_with_the_support_table_hint():
    with (
        pytest.warns(UserWarning, match="random"),
        pytest.raises(UnsupportedModelError, match="ModifiedResNet.*Supported models"),
    ):
        falip.load("RN50")


def test_load_asks_the_registered_adapters_in_order_and_honours_the_card(monkeypatch, clip):
    runtime = OpenClipRuntime(clip, tokenizer=open_clip.SimpleTokenizer())
    card = dict(preprocess="pad", falip=dict(alpha=0.7, layers=[-1]))
    calls = []

    def load(name, pretrained, device, precision, quick_gelu):
        calls.append((name, pretrained, device, precision, quick_gelu))
        return LoadedModel(runtime=runtime, name=name, pretrained=None, weights_file=None, card=card)

    fake = Adapter(name="fake", claims=lambda name, pretrained: name.startswith("fake:"), load=load)
    monkeypatch.setattr(registry, "ADAPTERS", list(registry.ADAPTERS))  # restored after the test
    registry.register(fake)  # registered after the catch-all open_clip adapter, asked before it
    assert [a.name for a in registry.ADAPTERS] == ["hf", "fake", "open_clip"]
    model = falip.load("fake:tiny", precision="fp32")
    assert model.runtime is runtime and model.name == "fake:tiny" and calls == [("fake:tiny", None, "cpu", "fp32", None)]
    assert model.preprocess == "pad" and model.config.alpha == 0.7 and model.config.layers == (-1,)
    assert falip.load("falip-toy").runtime.family == "open_clip"  # not claimed by fake: the next adapter
    with pytest.raises(ValueError, match="already registered"):
        registry.register(fake)
    first = Adapter(name="first", claims=lambda name, pretrained: name.startswith("fake:"), load=load)
    registry.register(first, before="hf")  # the caller's order: asked first
    assert [a.name for a in registry.ADAPTERS] == ["first", "hf", "fake", "open_clip"]
    calls.clear()
    falip.load("fake:again")
    assert calls[0][0] == "fake:again"
    with pytest.raises(ValueError, match="no runtime adapter named 'nope'"):
        registry.register(Adapter(name="late", claims=lambda n, p: False, load=load), before="nope")


# ----------------------------------------------------------------------------------------------
# More than one prefix token


def test_bias_vectors_put_num_prefix_zeros_before_the_patches():
    weights = np.zeros((3, 3))
    weights[1, 1:] = 1.0
    one = bias_from_weights(weights, FovealConfig(shape="uniform", alpha=0.5))
    five = bias_from_weights(weights, FovealConfig(shape="uniform", alpha=0.5), num_prefix=5)
    none = bias_from_weights(weights, FovealConfig(shape="uniform", alpha=0.5), num_prefix=0)
    assert one.shape == (10,) and five.shape == (14,) and none.shape == (9,)
    assert (five[:5] == 0).all() and torch.equal(five[5:], one[1:]) and torch.equal(none, one[1:])
    transform = make_transform("squash", (90, 90), 48)
    many = region_biases(transform, (3, 3), 16, FovealConfig(), boxes=[(0, 0, 60, 60), (30, 30, 90, 90)], num_prefix=4)
    ones = region_biases(transform, (3, 3), 16, FovealConfig(), boxes=[(0, 0, 60, 60), (30, 30, 90, 90)])
    assert many.shape == (2, 13) and (many[:, :4] == 0).all() and torch.equal(many[:, 4:], ones[:, 1:])


class RegisterRuntime(OpenClipRuntime):
    """An open_clip ViT with R fixed random register tokens inserted after [CLS] (a num_prefix > 1 runtime)."""

    def __init__(self, clip, registers: int):
        super().__init__(clip, tokenizer=open_clip.SimpleTokenizer())
        self.num_prefix = 1 + registers
        self.registers = torch.randn(1, registers, self.width, generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def run(self, pixels, trunk=None, pool_bias=None):
        x = self.visual._embeds(pixels.to(self.device, self.dtype))
        x = torch.cat([x[:, :1], self.registers.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return self._head((trunk or self.visual.transformer)(x))


@pytest.mark.parametrize(
    "config",
    [
        FovealConfig(alpha=2.0, layers=(1, 2, 3)),
        FovealConfig(alpha=2.0, layers=(2,), rows="all"),
        FovealConfig(alpha=2.0, layers=(1, 3), unleash=(falip.Unleash(layers=(3,)),)),
    ],
    ids=["cls", "all", "unleashed"],
)
def test_exact_equals_naive_with_register_tokens(rng, clip, config):
    runtime = RegisterRuntime(clip, registers=3)
    model = FalipModel(runtime, preprocess="squash", config=config)
    image = random_image(rng, 80, 64)
    boxes = random_boxes(rng, 80, 64, 3)
    assert model.region_biases(model.transform_for((80, 64)), boxes=boxes).shape == (3, 4 + 16)
    naive = model.encode_regions(image, boxes, mode="naive")
    torch.testing.assert_close(model.encode_regions(image, boxes, mode="exact", chunk_size=2), naive, atol=ATOL, rtol=0)
    plain = FalipModel(runtime, config=FovealConfig(alpha=0.0))
    zero = plain.encode_regions(image, boxes[:1], mode="exact", preprocess="squash")
    torch.testing.assert_close(zero, plain.encode_image(image, preprocess="squash"), atol=ATOL, rtol=0)
    assert (naive[0] - zero[0]).abs().max() > 1e-3  # the bias matters
    if config.rows == "cls" and not config.unleash:
        approx = model.encode_regions(image, boxes, mode="approx")
        assert approx.shape == naive.shape and (approx - naive).abs().max() < 0.1


def test_biases_of_the_wrong_width_are_refused(rng, clip):
    model = FalipModel(RegisterRuntime(clip, registers=2))
    pixels, transform = model.preprocess_image(random_image(rng, 64, 64))
    one_prefix = region_biases(transform, model.grid, model.patch_size, model.config, boxes=[(0, 0, 30, 30)])
    with pytest.raises(ValueError, match=r"\(K, 19\).*\(1, 17\)"):
        falip.encode_biased(model.runtime, pixels, one_prefix, model.plan())


def test_a_coca_tower_that_returns_its_tokens_is_refused():
    clip = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(layers=1, width=64, head_width=32, patch_size=16, image_size=32, output_tokens=True),
        text_cfg=dict(context_length=16, width=32, heads=1, layers=1),
    )
    with pytest.raises(UnsupportedModelError, match="CoCa image tower"):
        OpenClipRuntime(clip, text_missing="no tokenizer in this test")
