"""Differentiable CLIP preprocessing on tensors and a transformers-CLIP tower (REWARDS_AND_EVAL.md §1).

Tensor path (differentiable, used by default):
  1. resize the shortest side to ``size`` (bicubic, antialias, align_corners=False), clamp to [0, 1] (also when no
     resize is needed);
  2. centre-crop ``crop × crop`` with the offsets of the library whose processor the reward reproduces: torchvision's
     ``CenterCrop`` (round((h − crop)/2); open_clip for HPS, BLIP for ImageReward) or transformers'
     ``CLIPImageProcessor`` ((h − crop)//2; PickScore, CLIPScore, aesthetic). See ``CROP_STARTS``;
  3. normalise with the CLIP mean/std.
Parity path (``parity=True`` on a reward; not differentiable): q = round(255·clamp(x, 0, 1)) → uint8 HWC → PIL → the
library's own processor, as flow_grpo does. ``tests/test_rewards_learned.py`` checks that both paths agree (Spearman
ρ > 0.99, max |Δ| < 2 % of the score spread on synthetic images). uint8 cannot hold NaN, so the parity path makes
the pixels of an image with any non-finite value NaN after quantising: such an image scores NaN on both paths.

transformers ≥ 5 returns an output object from ``get_image_features`` / ``get_text_features``; ``features`` accepts both.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from flowalign.rewards.base import TOKENIZER_FILES, finite_images, freeze, hub_errors, resolve_source, torch_dtype

logger = logging.getLogger("flowalign.rewards")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_shortest(images: Tensor, size: int) -> Tensor:
    """Bicubic + antialias resize so that the shortest side is ``size`` (long side ``int(size·long/short)``, as
    torchvision and transformers compute it); output clamped to [0, 1] because bicubic overshoots, and also when the
    shortest side is ``size`` already (spec §1 step 1: the tower never sees values outside [0, 1])."""
    h, w = images.shape[-2:]
    if min(h, w) == size:
        return images.clamp(0.0, 1.0)
    if h <= w:
        out_h, out_w = size, int(size * w / h)
    else:
        out_h, out_w = int(size * h / w), size
    x = F.interpolate(images, size=(out_h, out_w), mode="bicubic", antialias=True, align_corners=False)  # [B,3,h',w']
    return x.clamp(0.0, 1.0)


def torchvision_start(excess: int) -> int:
    """Where torchvision's ``CenterCrop`` starts its window along an axis ``excess`` = length − crop pixels longer:
    round(excess/2) (Python's rounding, half to even); a shorter axis (excess < 0) is zero-padded with
    (−excess)//2 pixels before it, i.e. the window starts −((−excess)//2) pixels before the image."""
    return int(round(excess / 2.0)) if excess >= 0 else -((-excess) // 2)


def transformers_start(excess: int) -> int:
    """Where transformers' image processors (``CLIPImageProcessor``, its PIL variant; ``image_transforms.center_crop``)
    start the crop window: excess//2, which for a shorter axis is the ceil((−excess)/2) pixels of zero padding
    before the image that transformers adds."""
    return excess // 2


CROP_STARTS = {"torchvision": torchvision_start, "transformers": transformers_start}


def center_crop(images: Tensor, size: int, start: Callable[[int], int] = torchvision_start) -> Tensor:
    """``size × size`` centre crop; ``start(length − size)`` gives the window's first pixel along each axis (one of
    ``CROP_STARTS``; default torchvision's offsets); an axis shorter than ``size`` is zero-padded."""
    h, w = images.shape[-2:]
    top, left = start(h - size), start(w - size)
    pad_top, pad_left = max(-top, 0), max(-left, 0)
    pad_bottom, pad_right = max(size - h - pad_top, 0), max(size - w - pad_left, 0)
    if pad_top or pad_left or pad_bottom or pad_right:
        images = F.pad(images, (pad_left, pad_right, pad_top, pad_bottom))
        top, left = top + pad_top, left + pad_left
    return images[..., top : top + size, left : left + size]


def clip_preprocess(
    images: Tensor,
    size: int = 224,
    crop: Optional[int] = None,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop_start: Callable[[int], int] = torchvision_start,
) -> Tensor:
    """[B,3,H,W] in [0,1] (any float dtype) → normalised fp32 [B,3,crop,crop]; differentiable w.r.t. ``images``.
    ``crop_start``: the centre crop's offsets (``CROP_STARTS``), those of the processor the reward reproduces.

    Upcast to fp32 because CPU bicubic/antialias kernels do not take half precision and the resize is the
    step where low precision would shift scores.
    """
    x = images.float()  # [B,3,H,W]
    x = resize_shortest(x, int(size))
    x = center_crop(x, int(crop or size), crop_start)  # [B,3,c,c]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def quantize(images: Tensor) -> Tensor:
    """round(255·clamp(x, 0, 1)) as uint8, same layout. uint8 has no NaN: a non-finite value becomes some pixel value,
    so callers mark those images themselves (``finite_images``, ``nan_images``)."""
    return (images.detach().float().nan_to_num(0.0).clamp(0, 1) * 255.0).round().to(torch.uint8)


def nan_images(pixels: Tensor, finite: Tensor) -> Tensor:
    """``pixels`` [B,...] with every value of image b NaN where ``finite[b]`` is False: the quantised parity paths lose
    the NaN of a failed sample, this puts it back so the tower scores it NaN (spec §1: a failed sample is NaN)."""
    keep = finite.to(pixels.device).view(-1, *([1] * (pixels.dim() - 1)))  # [B,1,...]
    return torch.where(keep, pixels, torch.full_like(pixels, float("nan")))


def to_pil(images: Tensor) -> list:
    """[B,3,H,W] in [0,1] → list of RGB PIL images (the parity path's quantisation)."""
    from PIL import Image

    q = quantize(images).permute(0, 2, 3, 1).cpu().numpy()  # [B,H,W,3] uint8
    return [Image.fromarray(a, mode="RGB") for a in q]


def pil_pixels(images: Tensor, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Tensor:
    """Parity path of open_clip (HPS) and BLIP (ImageReward), without torchvision: [B,3,H,W] in [0,1] → uint8 → PIL →
    shortest side to ``size`` (PIL bicubic; long side ``int(size·long/short)``) → centre ``size × size`` crop
    (offsets round((h − size)/2)) → /255 → normalise; fp32 [B,3,size,size], all NaN for an image with a non-finite
    value. The same numbers as torchvision's ``Resize(size, BICUBIC)``, ``CenterCrop(size)``, ``ToTensor()``,
    ``Normalize(mean, std)`` that those libraries use (checked against open_clip's transform in
    tests/test_rewards_learned.py)."""
    import numpy as np
    from PIL import Image

    size = int(size)
    out = []
    for im in to_pil(images):
        w, h = im.size
        if (w, h) != (size, size) and min(w, h) != size:
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3,h,w] uint8
        out.append(center_crop(a.float().unsqueeze(0) / 255.0, size)[0])  # [3,size,size]
    x = torch.stack(out)  # [B,3,size,size]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return nan_images((x - m) / s, finite_images(images))


def features(out) -> Tensor:
    """The projected embedding from ``get_*_features``: a tensor (transformers 4) or ``.pooler_output`` (5)."""
    if torch.is_tensor(out):
        return out
    if getattr(out, "image_embeds", None) is not None:
        return out.image_embeds
    if getattr(out, "text_embeds", None) is not None:
        return out.text_embeds
    return out.pooler_output


def l2n(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def unique_index(prompts: Sequence[str]) -> tuple[list[str], Tensor]:
    """(unique prompts in first-seen order, index [B] into them): a GRPO batch repeats each prompt G times."""
    uniq = list(dict.fromkeys(prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    return uniq, torch.tensor([pos[p] for p in prompts], dtype=torch.long)


class HFClip:
    """A frozen transformers CLIP tower with its processor (PickScore, CLIPScore, aesthetic backbone).

    ``path``: model directory or hub id; ``processor_path``: processor directory or hub id (default: ``path``).
    ``what``: the reward's registry name ("pickscore"), used in error messages to name its arguments.
    ``vision_only``: no tokenizer (aesthetic ignores the prompt). The whole ``CLIPModel`` is still loaded: loading
    ``CLIPVisionModelWithProjection`` from a ``CLIPModel`` checkpoint depends on the vision sub-config's projection_dim.
    ``logit_scale``: the checkpoint's logit scale as an fp32 scalar on ``device``, whatever ``dtype`` the tower runs in.
    """

    def __init__(self, path: str, processor_path: Optional[str], what: str, device="cpu", dtype=torch.float32,
                 vision_only: bool = False, text_max_length: int = 77):
        import transformers
        from transformers import AutoTokenizer, CLIPModel

        # only the processor's settings are read (size, crop, mean, std); its PIL class needs no torchvision (the
        # default class warns that it falls back to it when torchvision is missing, which flowalign does not install)
        image_processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        given = processor_path is not None  # else the processor is read from ``path``: a missing one is path's fault
        path = resolve_source(path, f"{what} model", "path", reward=what)
        processor_path = resolve_source(processor_path or path, f"{what} processor",
                                        "processor_path" if given else "path", reward=what)
        with hub_errors(path, f"{what} model", "path", reward=what):  # ``what`` is the reward's registry name
            model = CLIPModel.from_pretrained(path, dtype=torch.float32)  # cast below, after logit_scale is read
        # exp(logit_scale) ≈ 100 multiplies every score: read in fp32 before the cast (bf16 rounds log 100 = 4.6052
        # to 4.59375, i.e. every PickScore 1.1% low)
        self.logit_scale = model.logit_scale.detach().float().clone().to(self.device)  # [] fp32
        self.model = freeze(model).to(self.device, self.dtype)
        with hub_errors(processor_path, f"{what} processor", "processor_path", reward=what, include=TOKENIZER_FILES):
            self.tokenizer = None if vision_only else AutoTokenizer.from_pretrained(processor_path)
            self.image_processor = image_processor_cls.from_pretrained(processor_path)
        self.processor_path = processor_path
        ip = self.image_processor
        self.size = int(_get(ip.size, "shortest_edge") or _get(ip.size, "height"))
        self.crop = int(_get(ip.crop_size, "height") or self.size) if getattr(ip, "do_center_crop", True) else self.size
        self.mean = tuple(ip.image_mean)
        self.std = tuple(ip.image_std)
        max_pos = getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", text_max_length)
        self.text_max_length = min(int(text_max_length), int(max_pos))
        self._pil_processor = None

    # -- images -------------------------------------------------------------------------------------------------
    def pixels(self, images: Tensor) -> Tensor:
        """Tensor path: [B,3,H,W] in [0,1] → model pixels [B,3,c,c] on the model's device/dtype (the processor's
        crop offsets, ``transformers_start``)."""
        x = clip_preprocess(images.to(self.device), self.size, self.crop, self.mean, self.std, transformers_start)
        return x.to(self.dtype)

    def pixels_pil(self, images: Tensor) -> Tensor:
        """Parity path: uint8 → PIL → the PIL image processor (transformers' ``CLIPImageProcessorPil`` when present,
        i.e. the processor flow_grpo used with transformers 4)."""
        if self._pil_processor is None:
            import transformers

            cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
            self._pil_processor = cls.from_pretrained(self.processor_path)
        out = self._pil_processor(images=to_pil(images), return_tensors="pt")
        return nan_images(out["pixel_values"], finite_images(images)).to(self.device, self.dtype)

    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """[N,3,c,c] → L2-normalised fp32 image embeddings [N,D]."""
        return l2n(features(self.model.get_image_features(pixel_values=pixels)).float())

    # -- text ---------------------------------------------------------------------------------------------------
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompts → L2-normalised fp32 text embeddings [N,D] (padding="max_length", 77 tokens, truncation)."""
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.text_max_length, truncation=True,
                             return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return l2n(features(out).float())


def _get(obj, key):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    try:
        return obj[key]
    except (KeyError, TypeError):
        return getattr(obj, key, None)


def batched(n: int, batch_size: int):
    """Slices covering range(n) in chunks of ``batch_size``."""
    bs = max(1, int(batch_size))
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


class ClipImageReward:
    """Mixin: image embeddings of an ``HFClip`` tower, batched, on the caller's device.

    Subclasses set ``self.clip`` (an ``HFClip``), ``self.batch_size``, ``self.parity`` and turn embeddings into scores.
    """

    clip: HFClip
    batch_size: int = 32
    parity: bool = False

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def embed_images(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] → L2-normalised fp32 image embeddings [N,D] (used by the video temporal term)."""
        prep = self.clip.pixels_pil if self.parity else self.clip.pixels
        return torch.cat([self.clip.encode_pixels(prep(images[s])) for s in batched(images.shape[0], self.batch_size)])


class ClipPairReward(ClipImageReward):
    """Mixin: cosine between a prompt and an image with an ``HFClip`` tower (text and vision), batched."""

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(e_img, e_txt) fp32 [B] on the model's device; text encoded once per distinct prompt."""
        uniq, index = unique_index(prompts)
        txt = self.clip.encode_text(uniq)[index.to(self.clip.device)]  # [B, D]
        img = self.embed_images(images)  # [B, D]
        return (img * txt).sum(-1)  # [B]
