"""Loading helpers every runtime adapter shares: precisions, devices, the models shipped with falip,
hub reachability, and checks on loaded weights. The adapters' own loaders live in ``falip.runtimes``
(open_clip names, tags and OpenAI-layout checkpoint files: ``runtimes/open_clip_loading.py``).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlparse

import torch

from .errors import ModelLoadError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHIPPED_MODELS = ("falip-toy",)  # weights in falip/assets/<name>.safetensors, card in <name>.json
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def looks_like_path(name: str) -> bool:
    """True for strings meant as files (OpenAI names like ``ViT-B/16`` contain a slash too)."""
    return name.startswith(("/", ".", "~")) or name.lower().endswith(CHECKPOINT_SUFFIXES)


def shipped_model(name: str) -> tuple[Path, dict]:
    """(weights file, metadata) of a model that ships inside the package."""
    assets = Path(__file__).parent / "assets"
    weights, card = assets / f"{name}.safetensors", assets / f"{name}.json"
    if not weights.is_file() or not card.is_file():
        raise ModelLoadError(f"the shipped model {name!r} is missing from {assets}; reinstall falip")
    return weights, json.loads(card.read_text(encoding="utf-8"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def reachable(url: str, timeout: float = 3.0) -> Optional[str]:
    """None if a TCP connection to the URL's host opens within ``timeout``, else the reason."""
    host = urlparse(url).hostname or url
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host} is unreachable ({exc})"


def check_device(device) -> None:
    """Raise ModelLoadError when ``device`` is not a torch device, or one this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but Apple MPS is not available here")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or mps")


def check_precision(precision: str, device) -> None:
    """Raise ModelLoadError naming the precision and the device when this torch cannot run a ViT's operations
    (patch convolution, layer norm, linear, GELU, attention) in that dtype there. fp32 runs everywhere."""
    if precision == "fp32":
        return
    dtype = PRECISIONS[precision]
    try:
        x = torch.nn.functional.conv2d(
            torch.ones(1, 3, 4, 4, device=device, dtype=dtype), torch.ones(8, 3, 2, 2, device=device, dtype=dtype), stride=2
        )
        t = torch.nn.functional.layer_norm(x.flatten(2).transpose(1, 2), (8,))  # (1, 4, 8)
        t = torch.nn.functional.gelu(torch.nn.functional.linear(t, torch.ones(8, 8, device=device, dtype=dtype)))
        q = t.view(1, 1, 4, 8)
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 4, 4, device=device, dtype=dtype))
        torch.softmax(t, dim=-1)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise ModelLoadError(
            f"precision {precision} is not supported on device {device} by torch {torch.__version__} "
            f"({first_line(exc)}); use --precision fp32" + (" or bf16" if precision == "fp16" else "")
        ) from None


def first_line(exc: BaseException) -> str:
    """An exception as one short line (torch's size-mismatch reports run over many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:3]) if lines else type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def check_finite(model: torch.nn.Module, source) -> None:
    """Raise ModelLoadError naming ``source`` when any parameter holds NaN or infinity (buffers such as
    the text causal mask hold -inf by design). One fused pass: a tensor's largest magnitude is finite
    exactly when all its values are."""
    named = [(name, p.detach()) for name, p in model.named_parameters() if p.is_floating_point() and p.numel()]
    if not named:
        return
    maxima = torch.stack([m.float() for m in torch._foreach_norm([t for _, t in named], float("inf"))]).cpu()
    bad = (~torch.isfinite(maxima)).nonzero().flatten().tolist()
    if bad:
        raise ModelLoadError(f"checkpoint {source} holds NaN or infinite values (in {named[bad[0]][0]}); the file is corrupt")


def check_logit_scale(model: torch.nn.Module, source) -> None:
    """Raise ModelLoadError naming ``source`` when the model's ``exp(logit_scale)`` (in its own dtype, as scores
    compute it) overflows: every score would be infinite or NaN."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor) and not bool(torch.isfinite(scale.detach().exp()).all()):
        raise ModelLoadError(
            f"checkpoint {source} has logit_scale {scale.detach().flatten()[0].item():.6g}: exp(logit_scale) overflows "
            f"{str(scale.dtype).removeprefix('torch.')}, so every score would be infinite; the weights are broken"
        )


TensorKind = Literal["float", "integer", "bool", "complex"]


def tensor_kind(dtype: torch.dtype) -> TensorKind:
    """The kind of values a dtype holds; a tensor may be cast into a parameter of the same kind only."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_weights(
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    found: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    source,
    model: str,
    hint: str = "",
) -> None:
    """Raise ModelLoadError (one line naming ``source`` and ``model``) unless the tensors ``found`` in the
    weights are exactly those the model ``expected``: no name missing, none unexpected, every shape equal
    and every dtype of the same kind (:func:`tensor_kind`: an int8 tensor is never cast into a float
    parameter). Both map name → (shape, dtype)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k][0]) != tuple(expected[k][0])]
    kinds = [k for k in expected if k in found and tensor_kind(found[k][1]) != tensor_kind(expected[k][1])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({_few(unexpected)})")
    for k in shapes[:3]:
        problems.append(f"{k} has shape {tuple(found[k][0])} where the model needs {tuple(expected[k][0])}")
    if len(shapes) > 3:
        problems.append(f"{len(shapes) - 3} more shape mismatches")
    for k in kinds[:3]:
        have, need = str(found[k][1]).removeprefix("torch."), tensor_kind(expected[k][1])
        problems.append(f"{k} is {have} where the model needs a {need} tensor")
    if len(kinds) > 3:
        problems.append(f"{len(kinds) - 3} more dtype mismatches")
    if problems:
        raise ModelLoadError(f"{source} does not match {model}: " + "; ".join(problems) + (f" ({hint})" if hint else ""))


def tensor_specs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name → (shape, dtype) of a state dict, for :func:`check_weights`."""
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


def assign_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source, model: str) -> None:
    """Load ``state`` into ``module`` (built on any device, the meta device included: its tensors are replaced,
    not copied into) after :func:`check_weights`; each tensor is cast to the dtype of the one it replaces."""
    expected = module.state_dict(keep_vars=True)
    check_weights(tensor_specs(expected), tensor_specs(state), source, model)
    cast = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)
