"""Model-free image quality rewards (REWARDS_AND_EVAL.md §2.6; SHAPES_WORLD.md §3).

All take images [B, 3, H, W] in [0, 1] and return float32 [B] on the images' device, at raw scale
(scaling lives in a wrapper). Each image is scored on its own, so a score never depends on its batch; an
image with a non-finite value (a diverged sample) scores NaN.

* ``JpegCompressibility`` / ``JpegIncompressibility`` — DDPO's (Black et al. 2023, §6.1) classic
  objective: the JPEG file size of the image at quality 95 in kB (bytes / 1000), negated for
  compressibility. flow_grpo uses −kB/500; apply that as ``Scaled(reward, 1/500)`` if you need it.
  Not differentiable (PIL). Optimising it drives images to flat (or noisy) canvases.
* ``EdgeCrispness`` — the variance of the Laplacian of the luminance (the "variance of Laplacian" focus
  measure, Pech-Pacheco et al. 2000): high for crisp edges, low for blur. Torch ops only, so it is
  differentiable. Optimised alone it rewards high-frequency texture, a reward-hacking demonstration.
* ``Saturation`` — mean HSV saturation (max − min) / max over pixels; differentiable (almost everywhere).
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import torch
from torch import Tensor

from flowalign.rewards.base import nan_unless_finite


def _check_images(images: Tensor, who: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who} takes images [B,3,H,W], got shape {tuple(images.shape)}")


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG size in kB (1 kB = 1000 bytes) of each image: uint8 HWC → PIL → JPEG ``quality`` in memory.

    images [B,3,H,W] in [0,1] → float32 [B] on the CPU. Non-finite images give NaN.
    """
    from PIL import Image

    x = images.detach().to("cpu", torch.float32)  # [B, 3, H, W]
    finite = torch.isfinite(x).flatten(1).all(1)  # [B]
    q = (x.nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    out = torch.empty(q.shape[0], dtype=torch.float32)
    for i in range(q.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(q[i]).save(buf, format="JPEG", quality=quality)
        out[i] = buf.tell() / 1000.0 if finite[i] else float("nan")
    return out


class JpegCompressibility:
    """−(JPEG size in kB at quality 95): higher for images that compress well (DDPO)."""

    name = "jpeg_compressibility"
    differentiable = False
    kind = "image"

    def __init__(self, quality: int = 95) -> None:
        self.quality = int(quality)

    def __call__(self, images: Tensor, prompts: Sequence[str] = (), metadata: Optional[Sequence[dict]] = None) -> Tensor:
        _check_images(images, type(self).__name__)
        return (-jpeg_size_kb(images, self.quality)).to(images.device)  # [B]


class JpegIncompressibility(JpegCompressibility):
    """+(JPEG size in kB at quality 95): higher for images that compress badly (DDPO)."""

    name = "jpeg_incompressibility"

    def __call__(self, images: Tensor, prompts: Sequence[str] = (), metadata: Optional[Sequence[dict]] = None) -> Tensor:
        _check_images(images, type(self).__name__)
        return jpeg_size_kb(images, self.quality).to(images.device)  # [B]


def laplacian_variance(images: Tensor) -> Tensor:
    """Variance of the 4-neighbour Laplacian of the luminance (ITU-R BT.601 weights), per image.

    images [B,3,H,W] → [B] in the images' dtype; ``valid`` convolution so borders do not add fake edges.
    """
    w = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    y = (images * w).sum(1, keepdim=True)  # [B, 1, H, W]
    k = images.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    lap = torch.nn.functional.conv2d(y, k)  # [B, 1, H-2, W-2]
    return lap.flatten(1).var(dim=1, unbiased=False)  # [B]


class EdgeCrispness:
    """Variance of the Laplacian of the luminance (a standard sharpness / focus measure)."""

    name = "edge_crispness"
    differentiable = True
    kind = "image"

    def __call__(self, images: Tensor, prompts: Sequence[str] = (), metadata: Optional[Sequence[dict]] = None) -> Tensor:
        _check_images(images, type(self).__name__)
        # fp32: squared second differences of [0,1] values lose precision in half precision
        return nan_unless_finite(laplacian_variance(images.float()), images)  # [B]


def hsv_saturation(images: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-pixel HSV saturation (max − min) / max of RGB in [0,1]; 0 where max = 0. [B,3,H,W] → [B,H,W]."""
    mx = images.amax(dim=1)  # [B, H, W]
    mn = images.amin(dim=1)  # [B, H, W]
    return torch.where(mx > eps, (mx - mn) / mx.clamp_min(eps), torch.zeros_like(mx))


class Saturation:
    """Mean HSV saturation over the image's pixels, in [0, 1]."""

    name = "saturation"
    differentiable = True
    kind = "image"

    def __call__(self, images: Tensor, prompts: Sequence[str] = (), metadata: Optional[Sequence[dict]] = None) -> Tensor:
        _check_images(images, type(self).__name__)
        # the clamp maps ±inf into [0, 1] and hsv_saturation's max > eps test reads NaN as 0: mark those images
        return nan_unless_finite(hsv_saturation(images.float().clamp(0, 1)).flatten(1).mean(1), images)  # [B]
