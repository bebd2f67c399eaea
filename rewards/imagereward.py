"""ImageReward v1.0 (Xu et al. 2023, "ImageReward"; REWARDS_AND_EVAL.md §2.3), reimplemented on tensors.

The original model (PyPI ``image-reward``) is BLIP: a ViT-L/16 image encoder at 224 px, a BERT-base text encoder with
cross-attention to every image token (BLIP's ``med.py``), and an MLP 768→1024→128→64→16→1 on the [CLS] state:

    raw   = MLP(text_encoder(prompt_ids, encoder_hidden_states=ViT(image)).last_hidden_state[:, 0])
    score = (raw − 0.16717362830052426) / 1.0333394966054072

flowalign loads ``ImageReward.pt`` into transformers' ``BlipVisionModel`` and ``BlipTextModel`` (which were ported from
BLIP's ``vit.py``/``med.py``: identical maths, renamed vision keys, identical text keys) plus the shared MLP head, and
scores a whole batch in one forward with the differentiable tensor preprocessing (as DAS and ReFL do). The vision
config is read from the checkpoint's shapes (heads = width/64, as in BLIP's ViT-B/L), the text config from
``med_config.json``; text: the ``bert-base-uncased`` tokenizer, padding="max_length", max_length=35, truncation.
No package import, no ``clip`` module, no download at call time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import UserError
from flowalign.rewards.base import (TOKENIZER_FILES, Checkpoint, Reward, check_inputs, freeze, hub_errors, hub_file,
                                    nan_unless_finite, resolve_source, torch_dtype)
from flowalign.rewards.clip_common import CLIP_MEAN, CLIP_STD, batched, clip_preprocess, pil_pixels, unique_index

logger = logging.getLogger("flowalign.rewards")

IR_REPO = "THUDM/ImageReward"
IR_FILE = "ImageReward.pt"
MED_FILE = "med_config.json"
BERT = "bert-base-uncased"
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072

# BLIP vit.py name → transformers BlipVisionModel name (per block i)
_VIT_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}


def blip_vit_to_hf(state: dict) -> dict:
    """BLIP ``visual_encoder.*`` keys (prefix removed) → ``BlipVisionModel`` keys; unknown keys raise."""
    out = {}
    for k, v in state.items():
        if k in _VIT_TOP:
            out[_VIT_TOP[k]] = v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m and m.group(2) in _VIT_BLOCK:
            out[f"encoder.layers.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}.{m.group(3)}"] = v
            continue
        raise UserError(f"imagereward: unexpected vision key {k!r} in the checkpoint (not a BLIP ViT)")
    return out


def split_checkpoint(state: dict) -> tuple[dict, dict, dict]:
    """ImageReward.pt → (BLIP ViT state, BERT text-encoder state, MLP head state), prefixes removed."""
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    parts: dict[str, dict] = {"blip.visual_encoder.": {}, "blip.text_encoder.": {}, "mlp.": {}}
    for k, v in state.items():
        for p, d in parts.items():
            if k.startswith(p):
                d[k[len(p):]] = v
    vit, txt, mlp = parts.values()
    if not vit or not txt or not mlp:
        raise UserError("imagereward: checkpoint lacks blip.visual_encoder / blip.text_encoder / mlp weights "
                        "(expected THUDM/ImageReward ImageReward.pt)")
    return vit, txt, mlp


def vision_config(vit: dict, heads: Optional[int] = None):
    """A ``BlipVisionConfig`` read from BLIP ViT weights (width, depth, patch, image size, MLP width)."""
    from transformers import BlipVisionConfig

    width = int(vit["pos_embed"].shape[-1])
    patch = int(vit["patch_embed.proj.weight"].shape[-1])
    n_tokens = int(vit["pos_embed"].shape[1]) - 1
    side = math.isqrt(n_tokens)
    depth = 1 + max(int(m.group(1)) for k in vit if (m := re.match(r"blocks\.(\d+)\.", k)))
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=int(vit["blocks.0.mlp.fc1.weight"].shape[0]), num_hidden_layers=depth,
        num_attention_heads=int(heads or max(1, width // 64)), image_size=side * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6), exact GELU
    )


def text_config(med: dict, encoder_width: int):
    """A ``BlipTextConfig`` from BLIP's ``med_config.json`` (a BertConfig with cross-attention)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), is_decoder=True,  # is_decoder builds the cross-attention layers
        # generation-only ids; BLIP's [DEC] = 30522 exists only in the full vocabulary
        bos_token_id=30522 if med["vocab_size"] > 30522 else None, sep_token_id=102 if med["vocab_size"] > 102 else None,
        eos_token_id=2,
    )


class ImageReward(Reward):
    """ImageReward v1.0 as a batched, differentiable scorer.

    Args:
        path: a directory holding ``ImageReward.pt`` and ``med_config.json``, the ``.pt`` file itself (with
            ``med_config.json`` next to it), or a hub id (default ``THUDM/ImageReward``).
        tokenizer_path: BERT tokenizer directory or hub id (default ``bert-base-uncased``).
        vision_heads: ViT attention heads (default width/64 = 16 for ViT-L; only tiny test models need it).
        device, dtype, batch_size, parity: as for ``PickScore`` (parity: uint8 → PIL → BLIP's validation transform).
    """

    name = "imagereward"
    differentiable = True
    kind = "image"
    measures = "human preference (ImageRewardDB): BLIP image-text encoder + MLP, standardised"
    typical_range = "≈ N(0, 1); good images ~0.5–1.5"
    checkpoints = (
        Checkpoint("path", IR_REPO, f"hf download {IR_REPO} {IR_FILE} {MED_FILE} --local-dir DIR; path=DIR"),
        Checkpoint("tokenizer_path", BERT, f"hf download {BERT} --include '*.json' '*.txt' --local-dir DIR; tokenizer_path=DIR"),
    )

    def __init__(self, path: str = IR_REPO, tokenizer_path: str = BERT, device="cpu", dtype=torch.float32,
                 batch_size: int = 32, vision_heads: Optional[int] = None, parity: bool = False,
                 text_max_length: int = 35):
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

        src = os.path.expanduser(str(path))
        if os.path.isfile(src):
            ckpt_file, med_file = src, os.path.join(os.path.dirname(src), MED_FILE)
        else:
            ckpt_file = hub_file(path, IR_REPO, IR_FILE, "imagereward", "path", reward=self.name)
            med_file = hub_file(path, IR_REPO, MED_FILE, "imagereward", "path", reward=self.name)
        if not os.path.isfile(med_file):
            raise UserError(f"imagereward: {MED_FILE} not found next to {ckpt_file!r} (download it from {IR_REPO})")
        with open(med_file) as f:
            med = json.load(f)
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        vit, txt, mlp = split_checkpoint(torch.load(ckpt_file, map_location="cpu", weights_only=True))

        vcfg = vision_config(vit, vision_heads)
        self.vision = BlipVisionModel(vcfg)
        self.vision.load_state_dict(blip_vit_to_hf(vit), strict=True)
        tcfg = text_config(med, vcfg.hidden_size)
        self.text = BlipTextModel(tcfg, add_pooling_layer=False)
        txt = {k: v for k, v in txt.items() if not k.startswith("pooler.")}
        missing, unexpected = self.text.load_state_dict(txt, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing:
            raise UserError(f"imagereward: text-encoder weights missing from the checkpoint: {missing[:4]}")
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
        if unexpected:
            logger.warning("imagereward: ignoring unexpected text-encoder keys %s", unexpected[:8])
        from flowalign.rewards.aesthetic import mlp_head

        self.head = mlp_head(mlp, "imagereward").to(self.device)
        self.vision = freeze(self.vision).to(self.device, self.dtype)
        self.text = freeze(self.text).to(self.device, self.dtype)
        tp = resolve_source(tokenizer_path, "imagereward tokenizer", "tokenizer_path", reward=self.name)
        with hub_errors(tp, "imagereward tokenizer", "tokenizer_path", reward=self.name, include=TOKENIZER_FILES):
            self.tokenizer = AutoTokenizer.from_pretrained(tp)
        self.size = int(vcfg.image_size)
        self.text_max_length = int(text_max_length)
        self.batch_size = int(batch_size)
        self.parity = bool(parity)
        self.differentiable = not self.parity

    def _pixels(self, images: Tensor) -> Tensor:
        if self.parity:  # BLIP's validation transform: Resize(size, bicubic), CenterCrop, ToTensor, Normalize
            return pil_pixels(images, self.size, CLIP_MEAN, CLIP_STD).to(self.device, self.dtype)
        return clip_preprocess(images.to(self.device), self.size, self.size, CLIP_MEAN, CLIP_STD).to(self.dtype)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> Tensor:
        check_inputs(images, prompts, self.kind)
        uniq, index = unique_index(prompts)
        tok = self.tokenizer(uniq, padding="max_length", truncation=True, max_length=self.text_max_length,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)  # [U, L]
        index = index.to(self.device)
        out = []
        for s in batched(images.shape[0], self.batch_size):
            img = self.vision(pixel_values=self._pixels(images[s])).last_hidden_state  # [n, N+1, Dv]
            atts = torch.ones(img.shape[:-1], dtype=torch.long, device=self.device)  # [n, N+1]
            h = self.text(input_ids=ids[index[s]], attention_mask=mask[index[s]], encoder_hidden_states=img,
                          encoder_attention_mask=atts, is_decoder=False).last_hidden_state[:, 0]  # [n, Dt]
            out.append(self.head(h.float()).squeeze(-1))  # [n]
        raw = torch.cat(out)  # [B]
        return nan_unless_finite(((raw - IR_MEAN) / IR_STD).float().to(images.device), images)  # [B]
