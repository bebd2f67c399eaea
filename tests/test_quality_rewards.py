"""Model-free quality rewards: JPEG (in)compressibility, edge crispness, saturation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowalign.rewards import build_reward
from flowalign.rewards.quality import hsv_saturation, jpeg_size_kb

NAMES = ["jpeg_compressibility", "jpeg_incompressibility", "edge_crispness", "saturation"]


def _scenes(n=8, size=32):
    from flowalign.shapes.grammar import sample_spec
    from flowalign.shapes.render import render_batch

    rng = np.random.default_rng(0)
    return torch.from_numpy(render_batch([sample_spec(rng) for _ in range(n)], size, seed=1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", NAMES)
def test_interface_dtype_shape_and_batch_independence(name):
    r = build_reward(name)
    assert r.name == name and r.kind == "image" and isinstance(r.differentiable, bool)
    x = torch.cat([_scenes(6), torch.rand(2, 3, 32, 32)])  # [8, 3, 32, 32]
    out = r(x, ["a red circle"] * 8)
    assert out.dtype == torch.float32 and out.shape == (8,) and out.device == x.device
    assert torch.isfinite(out).all()
    alone = torch.stack([r(x[i : i + 1], ["a red circle"])[0] for i in range(8)])
    torch.testing.assert_close(alone, out, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        r(x[0], ["a red circle"])  # [3, H, W] is not a batch


def test_jpeg_orders_flat_above_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    scene = _scenes(1, 64)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = torch.cat([flat, scene, noise])
    comp = build_reward("jpeg_compressibility")(x, [""] * 3)
    inc = build_reward("jpeg_incompressibility")(x, [""] * 3)
    assert comp[0] > comp[1] > comp[2]
    torch.testing.assert_close(inc, -comp)
    kb = jpeg_size_kb(x)
    assert 0 < kb[0] < 1.5 and kb[2] > 5 * kb[0]  # kB = bytes / 1000
    # lower JPEG quality → smaller files, so the scorer really uses its quality setting
    assert build_reward("jpeg_incompressibility", quality=50)(noise, [""])[0] < inc[2]
    bad = x.clone()
    bad[1] = float("nan")
    assert torch.isnan(build_reward("jpeg_compressibility")(bad, [""] * 3)[1])


def test_edge_crispness_prefers_sharp_and_is_differentiable():
    from scipy import ndimage

    sharp = _scenes(4)
    blurred = torch.from_numpy(ndimage.gaussian_filter(sharp.numpy(), (0, 0, 1.0, 1.0))).float()
    r = build_reward("edge_crispness")
    assert r.differentiable
    assert (r(sharp, [""] * 4) > 2 * r(blurred, [""] * 4)).all()
    assert r(torch.full((1, 3, 16, 16), 0.3), [""]).item() == 0.0
    x = sharp.clone().requires_grad_(True)
    r(x, [""] * 4).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_saturation_values_and_gradient():
    r = build_reward("saturation")
    gray = torch.full((1, 3, 8, 8), 0.6)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 0.9
    half = torch.zeros(1, 3, 8, 8)
    half[:, 0], half[:, 1], half[:, 2] = 0.8, 0.4, 0.4
    out = r(torch.cat([gray, red, half, torch.zeros(1, 3, 8, 8)]), [""] * 4)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.5, 0.0]))
    assert hsv_saturation(torch.rand(2, 3, 5, 5)).shape == (2, 5, 5)
    x = _scenes(2).requires_grad_(True)
    r(x, [""] * 2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_an_image_with_a_non_finite_pixel_scores_nan(name):
    """Spec §1: a failed sample is NaN so training masks it. Saturation read a NaN pixel as saturation 0 and clamped
    ±inf into [0, 1], so a diverged sample got a finite score."""
    x = _scenes(4)
    x[0, :, 3:9, 3:9] = float("nan")
    x[1, 2, 5, 5] = float("inf")
    x[2, 0, 0, 0] = float("-inf")
    out = build_reward(name)(x, [""] * 4)
    assert torch.isnan(out[:3]).all() and torch.isfinite(out[3]), out
    torch.testing.assert_close(out[3:], build_reward(name)(x[3:], [""]), atol=1e-6, rtol=0)


def test_jpeg_size_is_the_pil_file_size_of_the_rounded_uint8_image_in_kilobytes():
    """REWARDS_AND_EVAL.md §2.6: uint8 HWC (round(255·clamp(x, 0, 1))) → PIL → JPEG quality 95 in memory;
    size_kB = bytes / 1000 (not 1024)."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(3)
    x = torch.cat([_scenes(2), torch.rand(1, 3, 32, 32, generator=g)])  # [3, 3, 32, 32]
    want = []
    for img in x:
        q = np.rint(img.permute(1, 2, 0).numpy() * np.float32(255)).astype(np.uint8)  # [H, W, 3], half to even
        buf = io.BytesIO()
        Image.fromarray(q).save(buf, format="JPEG", quality=95)
        want.append(len(buf.getvalue()) / 1000.0)
    torch.testing.assert_close(jpeg_size_kb(x), torch.tensor(want), atol=0, rtol=0)


def test_laplacian_variance_matches_a_numpy_reference():
    """Pech-Pacheco et al. 2000 focus measure as documented: BT.601 luminance 0.299 R + 0.587 G + 0.114 B, 4-neighbour
    Laplacian on the valid interior, population variance (ddof = 0)."""
    from flowalign.rewards.quality import laplacian_variance

    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 9, 11, generator=g, dtype=torch.float64)  # [2, 3, 9, 11]
    y = 0.299 * x[:, 0].numpy() + 0.587 * x[:, 1].numpy() + 0.114 * x[:, 2].numpy()  # [2, 9, 11]
    lap = y[:, :-2, 1:-1] + y[:, 2:, 1:-1] + y[:, 1:-1, :-2] + y[:, 1:-1, 2:] - 4 * y[:, 1:-1, 1:-1]  # [2, 7, 9]
    want = lap.reshape(2, -1).var(axis=1, ddof=0)  # [2]
    torch.testing.assert_close(laplacian_variance(x), torch.from_numpy(want), atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(build_reward("edge_crispness")(x.float(), [""] * 2), torch.from_numpy(want).float(),
                               atol=1e-6, rtol=1e-5)
