"""`flowalign bench motion-prior`: the travel measure, the x̂₀ probe with a known answer, and the command."""

from __future__ import annotations

import json

import pytest
import torch

from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)
from flowalign.bench_motion import motion_travel, xhat_travel

RED = (0.84, 0.06, 0.10)


def _clip(xs, ys, color=RED, size=32, side=6):
    """[1, F, 3, H, W]: a gray canvas with a colour square whose top-left corner is at (xs[f], ys[f])."""
    f = torch.full((1, len(xs), 3, size, size), 0.8)
    for i, (x, y) in enumerate(zip(xs, ys)):
        f[0, i, :, y:y + side, x:x + side] = torch.tensor(color).view(3, 1, 1)
    return f


def test_travel_is_the_centroid_shift_along_the_direction():
    clip = _clip([4, 5, 6, 7, 9, 10, 11, 12], [10] * 8)  # 8 px to the right
    assert motion_travel(clip, RED, (1.0, 0.0)).item() == pytest.approx(8.0, abs=1e-4)
    assert motion_travel(clip, RED, (-1.0, 0.0)).item() == pytest.approx(-8.0, abs=1e-4)
    assert motion_travel(clip, RED, (0.0, 1.0)).item() == pytest.approx(0.0, abs=1e-4)  # no vertical motion
    assert motion_travel(clip.flip(1), RED, (1.0, 0.0)).item() == pytest.approx(-8.0, abs=1e-4)  # reversed in time
    # a blurred, low-contrast version (what x̂₀ looks like at high noise) is located as well
    faint = 0.8 + 0.2 * (clip - 0.8)
    assert motion_travel(faint, RED, (1.0, 0.0)).item() == pytest.approx(8.0, abs=0.5)
    # another colour's object does not count
    both = _clip([4] * 8, [22] * 8, color=(0.10, 0.22, 0.90))  # a static blue square in rows 22–27
    both[:, :, :, 8:18] = clip[:, :, :, 8:18]  # plus the moving red square (rows 10–15)
    assert motion_travel(both, RED, (1.0, 0.0)).item() == pytest.approx(8.0, abs=0.5)


class _Oracle:
    """The exact velocity of known clean clips: v = (x_σ − x0)/σ, so x̂₀ = x0 at every σ."""

    def __init__(self, x0):
        self.x0 = x0

    def velocity(self, x, sigma, cond):
        return (x - self.x0) / sigma.view(-1, 1, 1, 1, 1)

    @staticmethod
    def decode(x):
        return ((x.permute(0, 2, 1, 3, 4) + 1) / 2).clamp(0, 1)


def test_an_exact_velocity_gives_the_clips_own_travel_at_every_level():
    clip = _clip([4, 5, 6, 7, 9, 10, 11, 12], [10] * 8)  # [1, F, 3, H, W]
    x0 = clip.permute(0, 2, 1, 3, 4) * 2 - 1  # [1, C, F, H, W]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    out = xhat_travel(_Oracle(x0), x0, None, [1.0, 0.9, 0.5], eps, RED, (1.0, 0.0))
    assert out == pytest.approx([8.0] * 3, abs=1e-3)


def test_the_command_on_the_shipped_video_model(tmp_path, capsys):
    """Every direction's renders travel 5.6–9.8 px (the renderer's range) and so does their mean; the figures go to
    --json. From σ = 0.5 the shipped model's x̂₀ follows the visible motion (docs/shapes.md)."""
    from flowalign.bench_motion import bench_motion_prior

    out = tmp_path / "m.json"
    bench_motion_prior(["--clips", "2", "--mean-clips", "50", "--levels", "1.0,0.5", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["direction"] for r in rows] == ["left", "right", "up", "down"]
    for r in rows:
        assert 5.0 < r["clips"] < 10.5 and 5.0 < r["mean_clip"] < 10.5, r
        assert r["xhat"]["0.5"] > 4.0, r
    assert "σ=0.5" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--levels", "0,0.5"], "--levels"),
    (["--levels", "1.5"], "--levels"),
    (["--color", "pink"], "pink"),
    (["--clips", "0"], "--clips"),
    (["--threads", "0"], "--threads"),
    (["--mean-clips", "0"], "--mean-clips"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(1 << 32)], "--seed"),
])
def test_motion_prior_refuses_bad_input_before_loading(capsys, no_model, tmp_path, extra, needle):
    out = tmp_path / "m.json"
    _fails(capsys, ["bench", "motion-prior", "--json", str(out), *extra], needle)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# mutation audit: the travel formula, the noising and the batch mean pinned exactly


def test_travel_follows_the_documented_weighting_exactly():
    """motion_travel's docstring formula on arbitrary frames: per frame w = relu(s − q₇₅(s)), s = −‖pixel − color‖₂
    (Euclidean over RGB), q₇₅ the frame's 75th percentile (linear interpolation); centroid = Σw·(x, y)/Σw; travel =
    (centroid_last − centroid_first)·direction."""
    import numpy as np

    g = torch.Generator().manual_seed(3)
    frames = torch.rand(2, 4, 3, 6, 7, generator=g, dtype=torch.float64)  # [B, F, 3, H, W]
    direction = (0.6, 0.8)
    want = []
    for b in range(2):
        cent = []
        for f in (0, 3):
            px = frames[b, f].permute(1, 2, 0).numpy()  # [H, W, 3]
            s = -np.sqrt(((px - np.asarray(RED)) ** 2).sum(-1))  # [H, W]
            w = np.maximum(s - np.quantile(s, 0.75), 0.0)  # [H, W]
            ys, xs = np.mgrid[0:6, 0:7]
            cent.append(((w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()))
        want.append((cent[1][0] - cent[0][0]) * 0.6 + (cent[1][1] - cent[0][1]) * 0.8)
    torch.testing.assert_close(motion_travel(frames, RED, direction), torch.tensor(want, dtype=torch.float64))


def test_travel_of_a_uniform_clip_is_zero_not_nan():
    """A prediction with no colour contrast at all (a uniform x̂₀, as an untrained model may give at σ = 1) has no
    weight anywhere: its travel is 0 (mass clamped), not the NaN that would poison the table and the --json."""
    flat = torch.full((2, 8, 3, 16, 16), 0.5)  # [B, F, 3, H, W]
    assert motion_travel(flat, RED, (1.0, 0.0)).tolist() == [0.0, 0.0]


class _Recorder:
    """The exact rectified-flow velocity v = ε − x0 (independent of the input), recording each call's x_σ and σ."""

    def __init__(self, x0, eps):
        self.x0, self.eps, self.calls = x0, eps, []

    def velocity(self, x, sigma, cond):
        self.calls.append((x.clone(), sigma.clone()))
        return self.eps - self.x0

    decode = staticmethod(_Oracle.decode)


def test_xhat_probe_noises_to_x_sigma_and_averages_the_batch():
    """xhat_travel feeds the model x_σ = (1 − σ)·x0 + σ·ε with σ per clip, and with the exact velocity v = ε − x0
    (its docstring) returns the clips' own travel, averaged over the batch (here 8 px and 4 px → 6)."""
    clip = torch.cat([_clip([4, 5, 6, 7, 9, 10, 11, 12], [10] * 8),
                      _clip([4, 4, 5, 5, 6, 6, 7, 8], [10] * 8)])  # [2, F, 3, H, W]: 8 px and 4 px to the right
    x0 = clip.permute(0, 2, 1, 3, 4) * 2 - 1  # [2, C, F, H, W]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    levels = [1.0, 0.7, 0.3]
    model = _Recorder(x0, eps)
    out = xhat_travel(model, x0, None, levels, eps, RED, (1.0, 0.0))
    assert out == pytest.approx([6.0] * 3, abs=1e-3)
    assert len(model.calls) == 3
    for (x, sigma), s in zip(model.calls, levels):
        torch.testing.assert_close(x, (1 - s) * x0 + s * eps)
        assert sigma.tolist() == pytest.approx([s, s])
