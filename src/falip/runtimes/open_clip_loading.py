"""Loading open_clip models: open_clip names and tags, and local OpenAI-layout checkpoint files.

- ``load("ViT-B-16", pretrained="openai")``: an open_clip architecture with a pretrained tag. The
  weights are looked up in the local caches first; if they are missing and the hub cannot be
  reached (or ``HF_HUB_OFFLINE=1``), loading fails at once with what was tried.
- ``load("ViT-B/16")``, ``load("ViT-L/14@336px")``: OpenAI spellings, normalised to open_clip's.
- ``load("/path/ViT-B-16.pt")``: a local OpenAI-layout checkpoint — a TorchScript archive as
  OpenAI distributes, a ``torch.save``-d state dict (also open_clip training checkpoints with
  ``state_dict``/``module.``), or ``.safetensors`` — architecture inferred from the tensors.
- ``load("ViT-B-16", pretrained="/path/open_clip_pytorch_model.bin")``: a named architecture with
  weights from a local file.

The runtime class is chosen by the image tower's type (:data:`VISUAL_RUNTIMES`); the model's own
tokenizer comes with it (a tokenizer that needs the hub while offline leaves text unavailable, the
image side still works).
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from ..loading import (
    PRECISIONS,
    SHIPPED_MODELS,
    assign_checked,
    check_finite,
    check_logit_scale,
    first_line,
    hub_offline,
    looks_like_path,
    reachable,
    shipped_model,
)
from ..notices import folded_logs, warn
from .open_clip import OpenClipRuntime, catalog
from .registry import Adapter, LoadedModel

OPENAI_HEAD_WIDTH = 64

# Keys every OpenAI-layout CLIP ViT checkpoint has (resblock 0 stands for all blocks).
REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.ln_pre.weight",
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "visual.ln_post.weight",
    "visual.proj",
    "token_embedding.weight",
    "positional_embedding",
    "transformer.resblocks.0.attn.in_proj_weight",
    "ln_final.weight",
    "text_projection",
    "logit_scale",
)


def normalize_model_name(name: str) -> str:
    """OpenAI spellings to open_clip's: ``ViT-B/16`` → ``ViT-B-16``, ``ViT-L/14@336px`` → ``ViT-L-14-336``."""
    name = name.strip()
    match = re.fullmatch(r"(.+?)@(\d+)px", name)
    if match:
        name = f"{match.group(1)}-{match.group(2)}"
    return name.replace("/", "-")


# ----------------------------------------------------------------------------------------------
# Local checkpoint files


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (TorchScript archive, torch.save file or safetensors)."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"checkpoint file {path} is empty")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # torch/safetensors raise many types for corrupt or foreign files
        raise ModelLoadError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ModelLoadError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    # OpenAI's TorchScript archives carry these as tensors; they are not parameters.
    for key in ("input_resolution", "context_length", "vocab_size"):
        state.pop(key, None)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _count_blocks(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if found != set(range(len(found))):
        raise UnsupportedModelError(f"checkpoint blocks under {prefix!r} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def infer_openai_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """open_clip ``CLIP`` kwargs (embed_dim, vision_cfg, text_cfg) inferred from an OpenAI-layout state dict.

    Head counts cannot be read from tensors; they follow OpenAI's fixed head width of 64.
    """
    if "visual.layer1.0.conv1.weight" in state:
        raise UnsupportedModelError(f"{source} is a ResNet CLIP; FALIP needs a vision transformer (ViT)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise UnsupportedModelError(f"{source} is not an OpenAI-layout CLIP ViT checkpoint: missing keys {missing}")
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    n_pos = state["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid != n_pos - 1:
        raise UnsupportedModelError(f"{source}: {n_pos - 1} patch positions do not form a square grid")
    text_width = state["ln_final.weight"].shape[0]
    for label, w in (("vision", width), ("text", text_width)):
        if w % OPENAI_HEAD_WIDTH:
            raise UnsupportedModelError(
                f"{source}: {label} width {w} is not a multiple of OpenAI's head width {OPENAI_HEAD_WIDTH}; "
                "the head count cannot be inferred"
            )
    vision_cfg = dict(
        layers=_count_blocks(state, "visual.transformer.resblocks."),
        width=width,
        head_width=OPENAI_HEAD_WIDTH,
        mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        patch_size=patch,
        image_size=grid * patch,
    )
    text_cfg = dict(
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        width=text_width,
        heads=text_width // OPENAI_HEAD_WIDTH,
        layers=_count_blocks(state, "transformer.resblocks."),
        mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    return dict(embed_dim=state["text_projection"].shape[1], vision_cfg=vision_cfg, text_cfg=text_cfg)


def build_from_state_dict(state: dict, precision: str, device: str, quick_gelu: bool, source: str):
    """An open_clip ``CLIP`` with the inferred architecture and ``state`` loaded strictly (:func:`load_built`)."""
    import open_clip
    from open_clip.model import convert_weights_to_lp, get_cast_dtype

    cfg = infer_openai_config(state, source)

    def build(on: str):
        return open_clip.CLIP(**cfg, quick_gelu=quick_gelu, cast_dtype=get_cast_dtype(precision))

    def load(model):
        # TorchScript archives also store non-persistent buffers (the text causal mask).
        kept = model.state_dict().keys()
        buffers = {name for name, _ in model.named_buffers()}
        assign_checked(
            model, {k: v for k, v in state.items() if k in kept or k not in buffers}, source, "the CLIP ViT inferred from it"
        )

    model = load_built(build, load)
    model.to(device)
    if precision != "fp32":
        convert_weights_to_lp(model, PRECISIONS[precision])
    return model, cfg


def _rebuild_causal_masks(model: torch.nn.Module) -> None:
    """The text causal masks (open_clip's non-persistent ``attn_mask`` buffers) of a model built on the meta
    device, made by open_clip's own ``build_causal_mask``."""
    from types import SimpleNamespace

    from open_clip.transformer import TextTransformer

    for module in model.modules():
        mask = module._buffers.get("attn_mask")
        if mask is not None and mask.is_meta and "attn_mask" in module._non_persistent_buffers_set and mask.ndim == 2:
            module._buffers["attn_mask"] = TextTransformer.build_causal_mask(SimpleNamespace(num_pos=mask.shape[0]))


def load_built(build: Callable[[str], torch.nn.Module], load: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """``build(device)`` the model on the meta device (no random initialisation that the weights would overwrite),
    then ``load(model)`` its weights in (replacing every parameter and persistent buffer). An architecture whose
    constructor cannot run on the meta device, or that leaves other non-persistent buffers there, is built on the
    CPU instead (random initialisation, then the same ``load``)."""
    try:
        with torch.device("meta"):
            model = build("meta")
    except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values; the CPU build says why
        model = None
    if model is not None:
        load(model)
        _rebuild_causal_masks(model)
        if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return model
    model = build("cpu")
    load(model)
    return model


# ----------------------------------------------------------------------------------------------
# Pretrained tags


def _cached_weights(cfg: dict) -> tuple[Optional[str], list[str]]:
    """(local path of the tag's weights or None, the places that were looked at)."""
    looked = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename.replace("open_clip_pytorch_model.bin", "open_clip_model.safetensors")]
        names += [filename.replace(".bin", ".safetensors"), filename]
        for name in dict.fromkeys(names):
            looked.append(f"Hugging Face cache: {repo}/{name}")
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit, looked
    url = cfg.get("url", "")
    if url:
        path = Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)
        looked.append(str(path))
        if path.is_file():
            return str(path), looked
    return None, looked


def resolve_pretrained(name: str, tag: str) -> tuple[str, dict]:
    """Local weights file for an open_clip (name, tag), downloading it only if the hub answers."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        hint = difflib.get_close_matches(tag, tags, n=3)
        raise ModelLoadError(
            f"unknown pretrained tag {tag!r} for {name}"
            + (f"; did you mean {hint}?" if hint else "")
            + f" Available tags: {tags}. A local weights file path is accepted too."
        )
    path, looked = _cached_weights(cfg)
    if path:
        return path, cfg
    source = f"https://huggingface.co/{os.path.split(cfg['hf_hub'])[0]}" if cfg.get("hf_hub") else cfg.get("url", "")
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else reachable(source)
    if reason is None:
        try:
            return download_pretrained(cfg), cfg
        except Exception as exc:  # network errors come in many types
            reason = f"the download failed: {exc}"
    raise ModelLoadError(
        f"cannot get pretrained weights for {name} (tag {tag!r}): not in the local caches "
        f"(looked at: {'; '.join(looked)}) and {reason}. Download them where you have internet, "
        f"then pass the file: falip.load({name!r}, pretrained='/path/to/open_clip_pytorch_model.bin') "
        "or, for an OpenAI checkpoint, falip.load('/path/to/ViT-B-16.pt')."
    )


def _unknown_model(name: str) -> ModelLoadError:
    import open_clip

    models = open_clip.list_models()
    hint = difflib.get_close_matches(name, models, n=3)
    return ModelLoadError(
        f"unknown model {name!r}"
        + (f"; did you mean {hint}?" if hint else "")
        + " Use an open_clip name (falip.list_models()), an OpenAI name such as 'ViT-B/16', "
        "or the path of a checkpoint file."
    )


def create_with_weights(name: str, weights: str, precision: str, device: str, quick_gelu: bool):
    """open_clip's ``name`` with the weights file ``weights``, read and converted by open_clip's own
    ``load_checkpoint``, put in by :func:`~falip.loading.assign_checked` (built on the meta device: :func:`load_built`)."""
    import open_clip

    def build(on: str):
        with folded_logs("open_clip") as logs:  # "Model initialized randomly": falip loads the weights right after
            model = open_clip.create_model(name, precision=precision, device=on, force_quick_gelu=quick_gelu)
        notes = [f"open_clip: {m}" for m in logs if "initialized randomly" not in m]
        if notes:
            warn("; ".join(notes))
        return model

    def load(model):
        def checked_load_state_dict(state_dict, strict=True, assign=False):
            del model.load_state_dict  # the class's own, for assign_checked
            assign_checked(model, state_dict, weights, f"open_clip's {name}")

        model.load_state_dict = checked_load_state_dict  # what open_clip's load_checkpoint calls, on this instance only
        try:
            open_clip.load_checkpoint(model, weights, strict=True)
        except ModelLoadError:
            raise
        except Exception as exc:  # torch/open_clip raise many types for corrupt or foreign files
            raise ModelLoadError(f"cannot load {name} with weights {weights}: {type(exc).__name__}: {first_line(exc)}") from exc
        finally:
            model.__dict__.pop("load_state_dict", None)

    model = load_built(build, load)
    return model.to(device)


def create_clip(
    name_or_path: str,
    pretrained: Optional[str],
    device: str,
    precision: str,
    quick_gelu: Optional[bool],
):
    """Build the open_clip model. Returns ``(model, info)``: name, pretrained, mean, std, arch (inferred
    architecture of a file, else None) and card (metadata of a shipped model, else None)."""
    import open_clip

    name_or_path = str(name_or_path)
    if name_or_path in SHIPPED_MODELS:
        if pretrained is not None:
            raise ValueError(f"{name_or_path} ships with its weights; do not pass pretrained=")
        weights, card = shipped_model(name_or_path)
        model, cfg = build_from_state_dict(
            read_checkpoint(weights), precision, device, card.get("quick_gelu", True), name_or_path
        )
        check_finite(model, name_or_path)
        check_logit_scale(model, name_or_path)
        return model, dict(
            name=name_or_path, pretrained="shipped", mean=None, std=None, arch=cfg, card=card, weights_file=weights
        )
    path = Path(name_or_path).expanduser()
    if path.is_file() or (looks_like_path(name_or_path) and not name_or_path.startswith("hf-hub:")):
        if pretrained is not None:
            raise ValueError("pass either a checkpoint path or a model name with pretrained=..., not both")
        model, cfg = build_from_state_dict(
            read_checkpoint(path), precision, device, True if quick_gelu is None else quick_gelu, str(path)
        )
        check_finite(model, str(path))
        check_logit_scale(model, str(path))
        return model, dict(name=str(path), pretrained=None, mean=None, std=None, arch=cfg, card=None, weights_file=path)

    if name_or_path.startswith("hf-hub:"):
        reason = "HF_HUB_OFFLINE is set" if hub_offline() else reachable("https://huggingface.co")
        if reason:
            raise ModelLoadError(f"cannot load {name_or_path}: {reason}. Download it and pass a local file.")
        with folded_logs("open_clip") as logs:
            model = open_clip.create_model(name_or_path, precision=precision, device=device)
        if logs:
            warn("; ".join(f"open_clip: {m}" for m in logs))
        check_finite(model, name_or_path)
        check_logit_scale(model, name_or_path)
        return model, dict(name=name_or_path, pretrained=None, mean=None, std=None, arch=None, card=None, weights_file=None)

    name = normalize_model_name(name_or_path)
    if name not in open_clip.list_models():
        raise _unknown_model(name_or_path)
    mean = std = None
    tag_quick_gelu = False
    if pretrained is None:
        weights = None
    elif Path(pretrained).expanduser().is_file():
        weights = str(Path(pretrained).expanduser())
        if Path(weights).stat().st_size == 0:
            raise ModelLoadError(f"pretrained weights file {weights} is empty")
    elif looks_like_path(pretrained):
        raise ModelLoadError(f"pretrained weights file not found: {pretrained}")
    else:
        weights, cfg = resolve_pretrained(name, pretrained)
        mean, std = cfg.get("mean"), cfg.get("std")
        # open_clip 3.x only warns on a QuickGELU mismatch; OpenAI weights need QuickGELU.
        tag_quick_gelu = bool(cfg.get("quick_gelu", False))
    force_quick_gelu = tag_quick_gelu if quick_gelu is None else quick_gelu
    if weights is None:
        with folded_logs("open_clip") as logs:
            model = open_clip.create_model(name, precision=precision, device=device, force_quick_gelu=force_quick_gelu)
        notes = [f"open_clip: {m}" for m in logs if "initialized randomly" not in m]  # falip's own line says so
        warn("; ".join([f"{name} has no pretrained weights: using random initialisation", *notes]))
    else:
        model = create_with_weights(name, weights, precision, device, force_quick_gelu)
        check_finite(model, weights)
        check_logit_scale(model, weights)
    return model, dict(name=name, pretrained=pretrained, mean=mean, std=std, arch=None, card=None, weights_file=weights)


# ----------------------------------------------------------------------------------------------
# The adapter

# open_clip image tower type name → the runtime class that runs it: ``cls(clip, mean=, std=, tokenizer=,
# text_missing=)``. open_clip's timm towers (``TimmModel``) add their class here (runtimes/open_clip_eva.py,
# via :func:`register_visual_runtime`); any other tower (ModifiedResNet …) is refused with the support table's hint.
VISUAL_RUNTIMES: dict[str, Callable[..., object]] = {"VisionTransformer": OpenClipRuntime}


def register_visual_runtime(visual_type: str, runtime_class: Callable[..., object]) -> None:
    """Run open_clip models whose ``visual`` is of type (class name) ``visual_type`` with ``runtime_class``."""
    if visual_type in VISUAL_RUNTIMES:
        raise ValueError(f"open_clip image towers of type {visual_type!r} already have a runtime")
    VISUAL_RUNTIMES[visual_type] = runtime_class


def model_tokenizer(info: dict) -> tuple[Optional[Callable], Optional[str]]:
    """``(tokenizer, None)`` — the model's own tokenizer: CLIP's BPE at the inferred context length for a
    checkpoint file, open_clip's for a name — or ``(None, why)`` when it cannot be had (a hub tokenizer offline)."""
    import open_clip

    if info["arch"] is not None:
        return open_clip.SimpleTokenizer(context_length=info["arch"]["text_cfg"]["context_length"]), None
    try:
        return open_clip.get_tokenizer(info["name"]), None
    except Exception as exc:  # hub tokenizers fail offline with OSError, ValueError … depending on the library
        return None, f"open_clip's tokenizer for {info['name']} could not be loaded ({type(exc).__name__}: {first_line(exc)})"


def load_open_clip(
    name_or_path: str, pretrained: Optional[str], device: str, precision: str, quick_gelu: Optional[bool]
) -> LoadedModel:
    """The open_clip adapter's loader: the model, its runtime (by image tower type) and its tokenizer."""
    clip, info = create_clip(name_or_path, pretrained, device, precision, quick_gelu)
    visual = type(getattr(clip, "visual", None)).__name__
    runtime_class = VISUAL_RUNTIMES.get(visual)
    if runtime_class is None:
        raise UnsupportedModelError(
            f"FALIP needs a CLIP vision transformer; {info['name']}'s image tower is {visual} "
            f"(supported open_clip towers: {sorted(VISUAL_RUNTIMES)}; ResNet towers have no attention to bias). "
            "See the README's 'Supported models'."
        )
    tokenizer, text_missing = model_tokenizer(info)
    runtime = runtime_class(clip, mean=info["mean"], std=info["std"], tokenizer=tokenizer, text_missing=text_missing)
    weights = info["weights_file"]
    return LoadedModel(
        runtime=runtime,
        name=info["name"],
        pretrained=info["pretrained"],
        weights_file=None if weights is None else Path(weights),
        card=info["card"],
    )


def list_open_clip_models() -> list[str]:
    """open_clip architecture names that falip can load (ViTs)."""
    import open_clip

    return [m for m in open_clip.list_models() if "ViT" in m]


# Claims every input: registered last, so a name no other adapter knows ends in open_clip's
# "unknown model" error with suggestions.
ADAPTER = Adapter(
    name="open_clip",
    claims=lambda name_or_path, pretrained: True,
    load=load_open_clip,
    list_models=list_open_clip_models,
    catalog=catalog,
    catch_all=True,
)
