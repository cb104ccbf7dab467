"""HF transformers adapter: ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` (tested with transformers 5.x).

It relies only on these seams of the transformers models:

- the image tower is ``vision_model.embeddings`` (+ ``pre_layrnorm`` for CLIP) → the layers
  ``vision_model.encoder.layers[i]`` → the pooling head: ``post_layernorm`` on token 0 and
  ``visual_projection`` (CLIP), or ``post_layernorm`` on every token and the attention probe
  ``vision_model.head`` (SigLIP's MAP head). A biased call runs the stem, our trunk and the head
  through these seams, so the shared model is never modified (checked against the model's own
  ``get_image_features`` when the adapter is built);
- a layer called as ``layer(x, attention_mask)``: its mask reaches the attention interface (eager or
  sdpa) as an additive float bias ``(B, H, Q, L)`` — falip's ``(B·H, Q, L)`` masks are reshaped to it;
- the layer's submodules ``layer_norm1``, ``self_attn.q_proj/k_proj/v_proj/out_proj`` (and ``scale``),
  ``layer_norm2``, ``mlp`` for evaluating a layer at chosen queries only, head by head, or with a
  bias on the [CLS] row alone; checked numerically against the layer's own forward;
- the probe's ``nn.MultiheadAttention`` (``head.attention``), called with an ``attn_mask`` of shape
  ``(B·H, 1, L)`` to put the foveal bias on the probe's logits, then the head's ``layernorm`` and
  ``mlp``; checked against the head's own forward with a zero bias.

SigLIP2 (``model_type`` ``siglip2``, the NaFlex checkpoints) takes patchified, variable-resolution
input; falip runs it only at its native square grid (``√num_patches`` patches a side), the fixed-
resolution form, with no padding patches. (The fixed-resolution SigLIP2 checkpoints are ``siglip``.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..version import install_command
from .contract import BlockRuntime
from .open_clip import OPENAI_MEAN, OPENAI_STD
from .registry import Adapter

MODEL_TYPES = ("clip", "siglip", "siglip2")
FAMILIES = {"clip": "hf-clip", "siglip": "hf-siglip", "siglip2": "hf-siglip2"}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # the ones whose layers take an additive float mask


def model_type_of(model: nn.Module) -> str:
    """``clip`` / ``siglip`` / ``siglip2`` for the transformers models falip runs, else UnsupportedModelError."""
    from transformers import CLIPModel, Siglip2Model, SiglipModel

    for cls, kind in ((CLIPModel, "clip"), (SiglipModel, "siglip"), (Siglip2Model, "siglip2")):
        if isinstance(model, cls):
            return kind
    raise UnsupportedModelError(
        f"falip runs transformers' CLIPModel, SiglipModel and Siglip2Model (image and text towers), got {type(model).__name__}"
    )


class HFRuntime(BlockRuntime):
    """Runs the vision tower of a transformers CLIP / SigLIP / SigLIP2 model with attention biases.

    ``tokenizer``: the model's own tokenizer, or None with ``text_missing`` saying why (text calls
    then raise :class:`TextUnavailableError`). ``mean``/``std``: the directory's
    ``preprocessor_config.json`` values, else the family's defaults (``mean_std_source`` says which).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        text_missing: Optional[str] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ):
        self.kind = model_type_of(model)
        impl = model.config._attn_implementation
        if impl not in ATTN_IMPLEMENTATIONS:
            raise UnsupportedModelError(
                f"this model runs attention with {impl!r}; falip's biases need an additive float mask, which "
                f"{' and '.join(ATTN_IMPLEMENTATIONS)} take: load it with attn_implementation='sdpa'"
            )
        model.eval()
        self.model = model
        self.vision = model.vision_model
        self.layers = self.vision.encoder.layers
        vcfg = model.config.vision_config
        self.family = FAMILIES[self.kind]
        self.patch_size = int(vcfg.patch_size)
        if self.kind == "siglip2":
            side = int(round(vcfg.num_patches**0.5))
            if side * side != vcfg.num_patches:
                raise UnsupportedModelError(f"SigLIP2 with {vcfg.num_patches} position embeddings has no square native grid")
            self.image_size = side * self.patch_size
        else:
            self.image_size = int(vcfg.image_size)
        g = self.image_size // self.patch_size
        self.grid = (g, g)
        self.num_layers = len(self.layers)
        self.num_heads = int(vcfg.num_attention_heads)
        self.width = int(vcfg.hidden_size)
        if self.kind == "clip":
            self.num_prefix, self.pool = 1, "cls"
            default_mean, default_std = OPENAI_MEAN, OPENAI_STD
        else:
            if not getattr(self.vision, "use_head", False):
                raise UnsupportedModelError(
                    f"this {type(model).__name__} has no attention-pooling head (vision_use_head=False): no image embedding to steer"
                )
            self.num_prefix, self.pool = 0, "attention_pool"
            default_mean, default_std = SIGLIP_MEAN, SIGLIP_STD
        self.mean = tuple(float(v) for v in (mean or default_mean))
        self.std = tuple(float(v) for v in (std or default_std))
        self.mean_std_source = "preprocessor_config.json" if mean else f"{self.kind} defaults (no preprocessor_config.json)"
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self._init_text(tokenizer, text_missing)
        self._check_seams()

    @property
    def dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision.embeddings.patch_embedding.weight.device

    def _info_extra(self) -> dict:
        impl = self.model.config._attn_implementation
        return dict(model_class=type(self.model).__name__, attn_implementation=impl, context_length=self.context_length)

    # -- image tower ----------------------------------------------------------------------------
    def _own_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's own ``get_image_features`` ``(B, E)`` of normalised pixels ``(B, 3, S, S)``."""
        if self.kind == "siglip2":
            patches, spatial = self._patchify(pixels)
            mask = torch.ones(patches.shape[:2], dtype=torch.long, device=self.device)
            out = self.model.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=spatial)
        else:
            out = self.model.get_image_features(pixel_values=pixels)
        return out.pooler_output

    def _patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SigLIP2's input: patches ``(B, gh·gw, p·p·3)`` row-major, each patch (row, col, channel)-ordered as its
        image processor writes them, and ``spatial_shapes (B, 2)``."""
        B, C, S, _ = pixels.shape
        p, g = self.patch_size, self.grid[0]
        patches = pixels.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * C)
        spatial = torch.tensor([[g, g]] * B, dtype=torch.long, device=pixels.device)
        return patches, spatial

    def _stem(self, pixels: torch.Tensor) -> torch.Tensor:
        emb = self.vision.embeddings
        if self.kind == "clip":
            return self.vision.pre_layrnorm(emb(pixels))
        if self.kind == "siglip2":
            return emb(*self._patchify(pixels))
        return emb(pixels)

    def _model_blocks(self):
        return self.layers

    def _head(self, tokens: torch.Tensor, pool_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embeddings ``(B, E)`` of trunk outputs ``(B, L', D)``: the model's own pooling and projection."""
        if self.kind == "clip":
            return self.model.visual_projection(self.vision.post_layernorm(tokens[:, 0]))
        tokens = self.vision.post_layernorm(tokens)
        if pool_bias is None:
            return self.vision.head(tokens)
        return self._probe(tokens, pool_bias)

    def _probe(self, tokens: torch.Tensor, pool_bias: torch.Tensor) -> torch.Tensor:
        """The MAP head on normalised tokens ``(B, L, D)`` with ``pool_bias (B, L)`` added to every probe head's logits."""
        head = self.vision.head
        B, L, D = tokens.shape
        if pool_bias.shape != (B, L):
            raise ValueError(f"pool_bias of shape {tuple(pool_bias.shape)} does not fit the tokens (B={B}, L={L})")
        mask = pool_bias.to(device=tokens.device, dtype=tokens.dtype)[:, None, None, :]
        mask = mask.expand(B, self.num_heads, 1, L).reshape(B * self.num_heads, 1, L)
        x = head.attention(head.probe.expand(B, 1, D), tokens, tokens, attn_mask=mask, need_weights=False)[0]
        x = x + head.mlp(head.layernorm(x))
        return x[:, 0]

    # -- blocks ---------------------------------------------------------------------------------
    def _own_block(self, index: int, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, _ = x.shape
        mask = self._mask(attn_mask, B, L, L, x.dtype)
        if mask is not None:
            mask = mask.expand(B, self.num_heads, L, L)
        return self.layers[index](x, mask)

    def _qkv(self, index: int, query: torch.Tensor, context: Optional[torch.Tensor], query_at: Optional[int]):
        layer = self.layers[index]
        attn = layer.self_attn
        q_x = layer.layer_norm1(query)
        kv_x = q_x if context is None else layer.layer_norm1(context)
        B, Q, _ = q_x.shape
        L, H = kv_x.shape[1], self.num_heads
        q = attn.q_proj(q_x).view(B, Q, H, -1).transpose(1, 2)
        k = attn.k_proj(kv_x).view(B, L, H, -1).transpose(1, 2)
        v = attn.v_proj(kv_x).view(B, L, H, -1).transpose(1, 2)
        return q, k, v

    def _scale(self, index: int) -> float:
        return self.layers[index].self_attn.scale

    def _out_linear(self, index: int):
        out = self.layers[index].self_attn.out_proj
        return out.weight, out.bias

    def _attn_out(self, index: int, heads: torch.Tensor) -> torch.Tensor:
        B, H, Q, dh = heads.shape
        return self.layers[index].self_attn.out_proj(heads.transpose(1, 2).reshape(B, Q, H * dh))

    def _tail(self, index: int, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        layer = self.layers[index]
        x = query + attended
        return x + layer.mlp(layer.layer_norm2(x))

    # -- text tower and score -------------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str]) -> dict:
        # Padded to the model's full context: SigLIP pools the last position and was trained that way;
        # CLIP's causal text tower ignores what follows its end-of-text token.
        tokens = self.tokenizer(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return {k: tokens[k] for k in ("input_ids", "attention_mask") if k in tokens}

    def _encode_tokens(self, tokens: dict) -> torch.Tensor:
        return self.model.get_text_features(**tokens).pooler_output

    def _logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    def _logit_bias(self) -> Optional[torch.Tensor]:
        return getattr(self.model, "logit_bias", None) if self.kind != "clip" else None

    def _state(self) -> dict:
        return self.model.state_dict()

    def _is_text_tensor(self, name: str) -> bool:
        return name.startswith(("text_model.", "text_projection."))

    def _subject(self) -> str:
        import transformers

        return f"transformers {transformers.__version__}'s {type(self.model).__name__}"

    def _tested(self) -> str:
        return "transformers 5.x"


def read_preprocessor_stats(directory: Path) -> tuple[Optional[list], Optional[list]]:
    """``image_mean``/``image_std`` from ``directory/preprocessor_config.json``, or (None, None) without one."""
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return cfg.get("image_mean"), cfg.get("image_std")


# ----------------------------------------------------------------------------------------------
# Loading: a save_pretrained directory, or a hub id spelled "hf:<org>/<name>"

HUB_PREFIX = "hf:"
# What a CLIP/SigLIP repository needs, and nothing else (hub repos also hold PyTorch/Flax/TF/open_clip copies).
HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
]
HUB_BIN_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")


def claims(name_or_path: str, pretrained: Optional[str] = None) -> bool:
    """A hub id ``hf:<org>/<name>``, or a directory holding a transformers ``config.json``."""
    name = str(name_or_path)
    if name.startswith(HUB_PREFIX):
        return True
    path = Path(name).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


def resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot of hub repo ``repo_id``: the cache first, then a download when the hub answers."""
    from huggingface_hub import snapshot_download

    from ..errors import ModelLoadError
    from ..loading import hub_offline, reachable

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelLoadError(
            f"hub id '{HUB_PREFIX}{repo_id}' is not of the form hf:<org>/<name>, e.g. hf:openai/clip-vit-base-patch16"
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or a broken cache entry
        pass
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else reachable("https://huggingface.co")
    if reason is None:
        try:
            snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
            if not any(snapshot.glob("*.safetensors")):  # an older repo with PyTorch pickles only
                snapshot = Path(snapshot_download(repo_id, allow_patterns=HUB_BIN_FILES))
            return snapshot
        except Exception as exc:  # unknown repo, gated repo, network errors
            reason = f"the download failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    raise ModelLoadError(
        f"cannot load {HUB_PREFIX}{repo_id}: it is not in the local Hugging Face cache and {reason}. Download it where "
        f"you have internet (huggingface-cli download {repo_id}, or save_pretrained) and pass the directory: falip.load('/path/to/dir')"
    )


def load_hf(name_or_path: str, pretrained: Optional[str], device: str, precision: str, quick_gelu: Optional[bool]):
    """:class:`~falip.runtimes.registry.LoadedModel` of a transformers CLIP / SigLIP / SigLIP2 directory or hub id."""
    from ..errors import ModelLoadError
    from ..loading import PRECISIONS, check_finite, check_logit_scale, first_line
    from .registry import LoadedModel

    name = str(name_or_path)
    if pretrained is not None:
        raise ValueError(f"{name} is a transformers model with its own weights; do not pass pretrained=")
    if quick_gelu is not None:
        raise ValueError(
            f"{name} is a transformers model: its activation is in its config.json (hidden_act); do not pass quick_gelu"
        )
    try:
        import transformers
    except ImportError:
        raise ModelLoadError(
            f"{name} is a transformers model: install the hf extra ({install_command('hf')}: transformers 5.x)"
        ) from None
    directory = resolve_hub_id(name[len(HUB_PREFIX) :]) if name.startswith(HUB_PREFIX) else Path(name).expanduser()
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {directory / 'config.json'}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        raise UnsupportedModelError(
            f"{directory / 'config.json'} has no model_type: not a transformers model; falip runs transformers "
            f"model_type {' / '.join(MODEL_TYPES)} directories, open_clip names and OpenAI-layout checkpoint files"
        )
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{name} is a transformers {model_type!r} model; falip runs model_type {' / '.join(MODEL_TYPES)} "
            "(CLIPModel, SiglipModel, Siglip2Model with image and text towers)"
        )
    cls = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel, "siglip2": transformers.Siglip2Model}[model_type]
    report = _DropLoadReport()
    logging.getLogger("transformers.modeling_utils").addFilter(report)
    bars = transformers.utils.logging.is_progress_bar_enabled()  # a local directory loads in a moment: no bar
    transformers.utils.logging.disable_progress_bar()
    try:
        # eager attention: its float-mask path is the plain softmax(s·QKᵀ + M) that open_clip's attention computes too,
        # so the same weights give the same numbers in both runtimes (sdpa's CPU kernel drifts by ~1e-5).
        # Mismatched shapes are loaded as transformers reports them, then refused by check_hf_weights with the rest.
        model, loading_info = cls.from_pretrained(
            directory,
            dtype=PRECISIONS[precision],
            attn_implementation="eager",
            output_loading_info=True,
            ignore_mismatched_sizes=True,
        )
    except Exception as exc:  # transformers raises many types for missing or foreign files
        raise ModelLoadError(f"cannot load {name} as a {cls.__name__}: {type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        logging.getLogger("transformers.modeling_utils").removeFilter(report)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    check_hf_weights(model, loading_info, directory)
    check_finite(model, name)
    check_logit_scale(model, name)
    model.to(device)
    tokenizer, text_missing = _tokenizer(directory)
    mean, std = read_preprocessor_stats(directory)
    runtime = HFRuntime(model, tokenizer, text_missing, mean, std)
    single = directory / "model.safetensors"  # sharded weights: none (run fingerprints then hash the tensors)
    return LoadedModel(
        runtime=runtime, name=name, pretrained=str(directory), weights_file=single if single.is_file() else None, card=None
    )


class _DropLoadReport(logging.Filter):
    """transformers' load report (missing/unexpected keys): falip refuses those with its own one-line error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


# safetensors' dtype names → torch dtypes (check_weights compares their kinds).
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a save_pretrained directory: model.safetensors, its shards, or PyTorch pickles."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            shards = json.loads((directory / index).read_text(encoding="utf-8")).get("weight_map", {}).values()
            return [directory / shard for shard in dict.fromkeys(shards)]
    return [p for p in (directory / "model.safetensors", directory / "pytorch_model.bin") if p.is_file()][:1]


def file_tensor_specs(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name → (shape, dtype) of every tensor in a weights file, read from its header (no tensor data is read)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        specs = {}
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                name = piece.get_dtype()
                if name not in SAFETENSORS_DTYPES:
                    raise UnsupportedModelError(f"{path}: tensor {key} has dtype {name}, which falip does not read")
                specs[key] = (tuple(piece.get_shape()), SAFETENSORS_DTYPES[name])
        return specs
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _layer_counts(keys, config) -> str:
    """What config.json says against what the weights hold, for each tower whose layer counts differ."""
    import re

    notes = []
    for tower in ("vision", "text"):
        found = {int(m.group(1)) for k in keys if (m := re.match(rf"{tower}_model\.encoder\.layers\.(\d+)\.", k))}
        said = getattr(getattr(config, f"{tower}_config", None), "num_hidden_layers", None)
        if found and said is not None and len(found) != said:
            notes.append(f"config.json gives the {tower} tower {said} layers, the weights hold {len(found)}")
    return "; ".join(notes)


def check_hf_weights(model: nn.Module, loading_info: dict, directory: Path) -> None:
    """Refuse (ModelLoadError, one line naming the weights file) a directory whose weights do not fit the model its
    config.json describes: :func:`falip.loading.check_weights` on the tensors transformers matched by name, the
    keys it found missing or unexpected (after its own renames and ignore lists), shapes and dtype kinds."""
    from ..loading import check_weights, tensor_specs

    files = weight_files(directory)
    found: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in files:
        found.update(file_tensor_specs(path))
    expected = tensor_specs(model.state_dict())
    missing, unexpected = set(loading_info.get("missing_keys", ())), set(loading_info.get("unexpected_keys", ()))
    # names transformers renamed or deliberately ignores are left to it; the rest are compared here
    found = {k: v for k, v in found.items() if k in expected or k in unexpected}
    expected = {k: v for k, v in expected.items() if k in found or k in missing}
    source = files[0] if len(files) == 1 else f"{directory} (weights {', '.join(p.name for p in files)})"
    check_weights(
        expected, found, source, f"the {type(model).__name__} its config.json describes", _layer_counts(found, model.config)
    )


def _tokenizer(directory: Path):
    """(the directory's own tokenizer, "") or (None, what is missing)."""
    from transformers import AutoTokenizer

    from ..loading import first_line

    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None, f"{directory} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
    try:
        return AutoTokenizer.from_pretrained(directory), ""
    except Exception as exc:  # no tokenizer files, or a tokenizer library that is not installed
        return None, f"no usable tokenizer in {directory} ({type(exc).__name__}: {first_line(exc)})"


def catalog() -> list[tuple[str, str]]:
    """``(what, "runs")`` for each transformers model type falip runs (loaded from a directory or ``hf:<org>/<name>``)."""
    classes = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model (at its native square grid)"}
    return [(f"transformers model_type {kind!r} ({classes[kind]})", "runs") for kind in MODEL_TYPES]


ADAPTER = Adapter(name="hf", claims=claims, load=load_hf, catalog=catalog)
