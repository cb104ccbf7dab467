import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

import numpy as np
import open_clip
import pytest
import torch

from falip import FalipModel, FovealConfig
from falip.runtimes import OpenClipRuntime


def tiny_clip(image_size=224, patch_size=16, layers=6, width=128, seed=0) -> torch.nn.Module:
    """A random OpenAI-layout CLIP ViT (head width 64, QuickGELU) that runs in milliseconds."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=dict(layers=layers, width=width, head_width=64, patch_size=patch_size, image_size=image_size),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=True,
    )
    # Larger attention logits than the default init, so that a small bias visibly matters.
    with torch.no_grad():
        for blk in model.visual.transformer.resblocks:
            blk.attn.in_proj_weight.mul_(3.0)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Zero-shot classifiers are cached under a temporary folder, never in the user's ~/.cache/falip."""
    patch = pytest.MonkeyPatch()
    patch.setenv("FALIP_CACHE_DIR", str(tmp_path_factory.mktemp("falip-cache")))
    yield
    patch.undo()


def wrap(clip, preprocess="crop", config=None) -> FalipModel:
    runtime = OpenClipRuntime(clip, tokenizer=open_clip.SimpleTokenizer(context_length=77))
    return FalipModel(runtime, preprocess=preprocess, config=config)


@pytest.fixture(scope="session")
def b16_tiny():
    """B/16-shaped grid (224/16 = 14×14), 12 blocks like ViT-B/16, narrow width."""
    return tiny_clip(224, 16, layers=12)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_image(rng, w=320, h=240) -> np.ndarray:
    """A smooth random RGB image (uint8, (H, W, 3)) so that resampling differences stay meaningful."""
    small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def random_boxes(rng, w, h, k) -> np.ndarray:
    x0 = rng.uniform(0, w * 0.8, k)
    y0 = rng.uniform(0, h * 0.8, k)
    x1 = x0 + rng.uniform(4, w - x0 + 1e-3, k).clip(4, None)
    y1 = y0 + rng.uniform(4, h - y0 + 1e-3, k).clip(4, None)
    return np.stack([x0, y0, np.minimum(x1, w), np.minimum(y1, h)], axis=1)


@pytest.fixture(scope="session")
def official():
    return FovealConfig.official()


def modelnet40_split(root, clouds):
    """A ModelNet40-layout HDF5 test split under ``root/modelnet40_ply_hdf5_2048`` of ``clouds (N, P, 3)``, labelled
    0, 1, 2, 0, … over three classes; returns ``root``."""
    import h5py

    folder = root / "modelnet40_ply_hdf5_2048"
    folder.mkdir(parents=True)
    (folder / "shape_names.txt").write_text("airplane\nbathtub\nflower_pot\n")
    with h5py.File(folder / "ply_data_test0.h5", "w") as f:
        f.create_dataset("data", data=np.asarray(clouds, dtype=np.float32))
        f.create_dataset("label", data=(np.arange(len(clouds)) % 3).reshape(-1, 1).astype(np.uint8))
    (folder / "test_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_test0.h5\n")
    return root
