"""Convert an OpenAI-layout CLIP ViT checkpoint (``.pt``/``.safetensors``, as ``falip.load`` reads it) into a
transformers ``CLIPModel`` directory (``save_pretrained`` + tokenizer + preprocessor_config.json).

    python tools/openai_to_hf.py /path/ViT-B-16.pt /path/out_dir [--gelu]

Key mapping (written for falip's cross-runtime tests; ``--gelu`` for checkpoints trained with GELU, the
default is OpenAI's QuickGELU):

- ``visual.conv1`` → ``vision_model.embeddings.patch_embedding``; ``visual.class_embedding`` and
  ``visual.positional_embedding`` → the embeddings' ``class_embedding`` and ``position_embedding``;
- ``ln_pre``/``ln_post`` → ``pre_layrnorm``/``post_layernorm``; ``ln_final`` → ``text_model.final_layer_norm``;
- each block: the packed ``attn.in_proj_weight/bias`` (rows q, k, v) splits into ``self_attn.q_proj/k_proj/v_proj``;
  ``attn.out_proj`` → ``self_attn.out_proj``; ``ln_1``/``ln_2`` → ``layer_norm1``/``layer_norm2``;
  ``mlp.c_fc``/``mlp.c_proj`` → ``mlp.fc1``/``mlp.fc2``;
- ``visual.proj (D, E)`` and ``text_projection (W, E)`` are used as ``x @ P``: transposed, they are the
  weights of the bias-free ``visual_projection``/``text_projection`` Linear layers.

Layer norms keep OpenAI's eps 1e-5 (``layer_norm_eps``). The tokenizer is open_clip's byte-level BPE
(``SimpleTokenizer``'s vocabulary and merges written as vocab.json/merges.txt), so both runtimes give the same
token ids for ordinary text; they differ only where open_clip's ``ftfy``/HTML-unescape clean-up changes the text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
BLOCK_RENAMES = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
TOWERS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` state dict of an OpenAI-layout one (every key mapped; an unknown key is an error)."""
    out = {}
    for key, value in state.items():
        if key in RENAMES:
            out[RENAMES[key]] = value
        elif key in TRANSPOSED:
            out[TRANSPOSED[key]] = value.T.contiguous()
        else:
            prefix, hf_prefix = next(((p, h) for p, h in TOWERS if key.startswith(p)), (None, None))
            if prefix is None:
                raise KeyError(f"no HF name for OpenAI key {key!r}")
            index, rest = key[len(prefix) :].split(".", 1)
            block = f"{hf_prefix}{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{block}self_attn.{name}.{kind}"] = part.contiguous()
            elif rest in BLOCK_RENAMES:
                out[block + BLOCK_RENAMES[rest]] = value
            else:
                raise KeyError(f"no HF name for OpenAI key {key!r}")
    return out


def hf_clip_config(arch: dict, quick_gelu: bool = True):
    """A transformers ``CLIPConfig`` for open_clip ``CLIP`` kwargs ``arch`` (as falip infers them from a checkpoint)."""
    from transformers import CLIPConfig

    v, t = arch["vision_cfg"], arch["text_cfg"]
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = dict(
        hidden_size=v["width"],
        intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"],
        num_attention_heads=v["width"] // v["head_width"],
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        hidden_act=act,
        layer_norm_eps=1e-5,
    )
    text = dict(
        vocab_size=t["vocab_size"],
        hidden_size=t["width"],
        intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        max_position_embeddings=t["context_length"],
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=t["vocab_size"] - 2,  # <|startoftext|>
        eos_token_id=t["vocab_size"] - 1,  # <|endoftext|>: the text tower pools its first occurrence
        pad_token_id=t["vocab_size"] - 1,
    )
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=arch["embed_dim"])


def clip_tokenizer(context_length: int):
    """A transformers ``CLIPTokenizer`` with open_clip's BPE vocabulary and merges (``SimpleTokenizer``'s data)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    # open_clip spells the special tokens <start_of_text>/<end_of_text>; HF (like OpenAI) <|startoftext|>/<|endoftext|>.
    names = {simple.sot_token_id: "<|startoftext|>", simple.eot_token_id: "<|endoftext|>"}
    vocab = {names.get(i, token): i for token, i in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def save_hf_clip(state: dict[str, torch.Tensor], arch: dict, directory: Path, quick_gelu: bool = True) -> Path:
    """Write the converted model, its tokenizer and preprocessor_config.json to ``directory``."""
    from transformers import CLIPModel

    config = hf_clip_config(arch, quick_gelu)
    model = CLIPModel(config)
    model.load_state_dict({k: v.float() for k, v in convert_state_dict(state).items()}, strict=True)
    directory = Path(directory)
    model.save_pretrained(directory)
    clip_tokenizer(config.text_config.max_position_embeddings).save_pretrained(directory)
    size = config.vision_config.image_size
    preprocessor = dict(image_mean=OPENAI_MEAN, image_std=OPENAI_STD, size={"shortest_edge": size}, crop_size=size)
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    return directory


def main(argv=None) -> None:
    from falip.runtimes.open_clip_loading import infer_openai_config, read_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--gelu", action="store_true", help="the checkpoint uses GELU (default: OpenAI's QuickGELU)")
    args = parser.parse_args(argv)
    state = read_checkpoint(args.checkpoint)
    save_hf_clip(state, infer_openai_config(state, str(args.checkpoint)), args.output, quick_gelu=not args.gelu)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
