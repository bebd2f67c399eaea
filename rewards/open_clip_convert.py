"""open_clip CLIP checkpoints (HPS v2 / v2.1) as a transformers ``CLIPModel``, without open_clip or torchvision.

HPS v2 (Wu et al. 2023; REWARDS_AND_EVAL.md §2.2) fine-tunes open_clip's ``ViT-H-14``. open_clip's plain ViT CLIP and
transformers' ``CLIPModel`` are the same network (pre-LN transformer, class token, ``ln_post`` on the class token, bias-
free projections, causal text transformer pooled at the end-of-text token); only the parameter names and the fused
q/k/v projection differ. ``open_clip_to_hf`` renames and splits them, so the reward needs neither open_clip nor its
torchvision dependency. ``tests/test_rewards_learned.py`` checks the converted tower against features that open_clip
itself computed (``tests/fixtures/open_clip_tiny``, written by ``tests/fixtures/make_open_clip_tiny.py``).

Architectures are open_clip model configs (the schema of open_clip's ``model_configs/*.json``): a known name in
``OPEN_CLIP_ARCHS`` or the path of such a JSON file. Options that change the network (layer scale, attentional pooling,
no ``ln_pre``, timm / HF towers, …) are refused with a clear error rather than converted wrongly.
"""

from __future__ import annotations

import json
import os
import re
from typing import Union

from torch import Tensor

from flowalign.errors import UserError

# open_clip/model_configs/ViT-H-14.json (open_clip 3.3.0), the architecture of HPS v2 and v2.1.
OPEN_CLIP_ARCHS: dict[str, dict] = {
    "ViT-H-14": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    },
}

# Config keys the conversion understands, with the values that leave the network a plain CLIP ViT.
_VISION_OK = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_TEXT_OK = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_NEUTRAL = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "final_ln_after_pool": False,
            "timm_model_name": None, "hf_model_name": None, "patch_dropout": 0.0, "proj_bias": False,
            "embed_cls": False, "pad_id": 0, "output_tokens": False}


def load_arch(arch: Union[str, dict]) -> dict:
    """An open_clip model config: a dict, a name in ``OPEN_CLIP_ARCHS`` or a path to a model-config JSON."""
    if isinstance(arch, dict):
        return arch
    if arch in OPEN_CLIP_ARCHS:
        return OPEN_CLIP_ARCHS[arch]
    path = os.path.expanduser(str(arch))
    if os.path.isfile(path):
        with open(path) as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as err:
                raise UserError(f"hps: arch file {path!r} is not JSON ({err})") from err
    raise UserError(f"hps: unknown open_clip architecture {arch!r}: use one of {sorted(OPEN_CLIP_ARCHS)} or the path "
                    "of an open_clip model-config JSON")


def _check_cfg(cfg: dict) -> None:
    for tower, ok in (("vision_cfg", _VISION_OK), ("text_cfg", _TEXT_OK)):
        sub = cfg.get(tower)
        if not isinstance(sub, dict):
            raise UserError(f"hps: the open_clip config has no {tower!r} section")
        for k, v in sub.items():
            if k in ok:
                continue
            if k in _NEUTRAL and v == _NEUTRAL[k]:
                continue
            if k == "pool_type" and v == ("tok" if tower == "vision_cfg" else "argmax"):
                continue
            raise UserError(f"hps: open_clip option {tower}.{k}={v!r} is not supported by the transformers conversion "
                            "(plain CLIP ViTs only)")


def hf_clip_config(cfg: dict):
    """transformers ``CLIPConfig`` equal to the open_clip model config ``cfg``."""
    from transformers import CLIPConfig

    _check_cfg(cfg)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"  # open_clip: nn.GELU (erf) unless quick_gelu
    vw, tw = int(v["width"]), int(t["width"])
    vocab = int(t.get("vocab_size", 49408))
    return CLIPConfig(
        vision_config=dict(hidden_size=vw, intermediate_size=int(vw * float(v.get("mlp_ratio", 4.0))),
                           num_hidden_layers=int(v["layers"]), num_attention_heads=vw // int(v.get("head_width", 64)),
                           image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), hidden_act=act,
                           layer_norm_eps=1e-5),
        text_config=dict(hidden_size=tw, intermediate_size=int(tw * float(t.get("mlp_ratio", 4.0))),
                         num_hidden_layers=int(t["layers"]), num_attention_heads=int(t.get("heads", 8)),
                         max_position_embeddings=int(t.get("context_length", 77)), vocab_size=vocab, hidden_act=act,
                         layer_norm_eps=1e-5, eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0),
        projection_dim=int(cfg["embed_dim"]),
    )


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}
_DIRECT = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
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
_IGNORED = {"attn_mask", "visual.attn_mask"}  # causal-mask buffers some open_clip versions save


def open_clip_to_hf(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an open_clip CLIP ``state_dict`` to transformers ``CLIPModel`` names.

    The fused attention input projection ``in_proj_weight`` [3W, W] / ``in_proj_bias`` [3W] is split into q, k, v (in
    that order, as ``nn.MultiheadAttention`` stacks them); the projections ``visual.proj`` / ``text_projection``
    [W, D] (applied as ``x @ P``) become ``Linear`` weights ``P.T`` [D, W]. Returns (converted state, keys it did not
    recognise); tensors are shared with ``state`` where no transpose or split is needed.
    """
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in _DIRECT:
            out[_DIRECT[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()  # [D, Wv]
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()  # [D, Wt]
        elif (m := _BLOCK.match(key)) is not None:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                q, k, v = value.chunk(3, dim=0)  # [W, W] or [W] each
                for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            else:
                mod, _, leaf = rest.rpartition(".")
                if mod in _BLOCK_PARTS:
                    out[f"{prefix}{_BLOCK_PARTS[mod]}.{leaf}"] = value
                else:
                    unknown.append(key)
        elif key not in _IGNORED:
            unknown.append(key)
    return out, unknown


def build_hf_clip(state: dict[str, Tensor], arch: Union[str, dict], what: str = "hps", label: str = ""):
    """A transformers ``CLIPModel`` (fp32, eval) holding the open_clip ``state``; clear errors when it does not fit.
    ``label`` names the architecture in messages (default: ``arch`` when it is a name or path)."""
    from transformers import CLIPModel

    cfg = load_arch(arch)
    arch = label or (arch if isinstance(arch, str) else "config")
    model = CLIPModel(hf_clip_config(cfg)).eval()
    converted, unknown = open_clip_to_hf(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted and not k.endswith("position_ids")]
    if len(missing) > len(expected) // 2:
        raise UserError(f"{what}: the checkpoint does not fit open_clip {arch!r} ({len(missing)}/{len(expected)} "
                        "weights missing): is it an HPS / open_clip CLIP checkpoint?")
    if unknown:
        raise UserError(f"{what}: the checkpoint has open_clip weights the conversion does not know: {unknown[:4]} "
                        "(only plain CLIP ViTs are supported)")
    if missing:
        raise UserError(f"{what}: the checkpoint lacks weights of open_clip {arch!r}: {missing[:4]}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in converted.items()
           if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise UserError(f"{what}: the checkpoint does not fit open_clip {arch!r}: {bad[:3]} (pass the right arch=)")
    model.load_state_dict(converted, strict=False)
    return model
