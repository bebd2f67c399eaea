"""Review of flowalign.steer: dead particles stay dead, guided cost counts its reward rows, and the CLI refuses
bad guidance/probe arguments before the model loads."""

from __future__ import annotations

import pytest
import torch
from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign import steer as S
from flowalign.samplers import eta_schedule, schedules

from test_samplers import gaussian_world_velocity  # noqa: E402


@pytest.mark.parametrize("potential", list(S.POTENTIALS))
def test_a_particle_killed_by_a_nonfinite_reward_stays_dead(potential):
    """Particle 0 scores NaN at the first resampling step only; every other reward is 0. It must keep zero weight:
    ESS 3 of 4 afterwards, and the forced resampling at the last step drops it. (torch.nan_to_num turned its
    ℓw = −∞ into −1.8e308 and `diff`'s next log G = λ·(r − (−∞)) into +1.8e308, so it came back with ℓw = 0.)"""
    T, k = 6, 4
    sig = schedules.shifted_linear(T, 1.0)
    calls = []

    def reward(z, rows):
        r = torch.zeros(z.shape[0])
        if not calls:
            r[0] = float("nan")
        calls.append(1)
        return r

    res = S.fk_steer(gaussian_world_velocity, torch.randn(k, 1, generator=torch.Generator().manual_seed(0)), sig, {},
                     reward, k=k, lam=1.0, cond_index=torch.zeros(k, dtype=torch.long), steps_s=[2, 4, 5],
                     potential=potential, eta=eta_schedule(T, 0.7), generator=torch.Generator().manual_seed(0),
                     resample_generator=torch.Generator().manual_seed(1))
    assert res.ess[:, 0].tolist() == pytest.approx([3.0, 3.0, 3.0])
    assert res.resampled[-1, 0] and 0 not in res.origin.tolist()
    assert torch.isfinite(res.log_weight).all()


def test_guided_cost_counts_the_reward_rows_of_every_guided_step():
    """Guidance scores the steering reward (and backpropagates through it) at every guided step; the reported
    steering-reward rows per image must count them, not only the final score."""
    from flowalign.models import load_model
    from flowalign.rewards import build_reward

    model = load_model("shapes", "")
    steer = {"saturation": (build_reward("saturation"), 1.0)}
    steps = 6
    sig = model.schedule(steps)
    guided = sum(1 for t in range(steps) if 0.05 <= float(sig[t]) <= 0.8 and float(sig[t]) < 1.0)
    assert guided > 0
    _, _, cost = S.steer_prompts(model, [{"prompt": "two red circles"}], steer, {}, method="guided", steps=steps,
                                 beta=0.02, seeds_per_prompt=2)
    assert cost["steer_reward_rows_per_image"] == 1 + guided


@pytest.mark.parametrize("extra, needles", [
    (["--method", "fk", "--probe", "ode:00"], ["--probe 'ode:00'"]),
    (["--method", "guided", "--reward", "saturation", "--normalize", "-0.1"], ["--normalize"]),
    (["--method", "guided", "--reward", "saturation", "--normalize", "nan"], ["--normalize"]),
    (["--method", "guided", "--reward", "saturation", "--clip", "0"], ["--clip"]),
])
def test_steer_refuses_bad_probe_and_gradient_scale_before_loading_the_model(tmp_path, capsys, no_model, extra,
                                                                            needles):
    fails(capsys, ["steer", "a red circle", *extra, "--out", str(tmp_path / "o")], *needles)
    assert list(tmp_path.iterdir()) == []


def test_tilt_guidance_refuses_a_nonpositive_gradient_scale():
    with pytest.raises(ValueError, match="normalize"):
        S.TiltGuidance(grad_fn=lambda *a: a[0], normalize=-0.1)
    with pytest.raises(ValueError, match="clip"):
        S.TiltGuidance(grad_fn=lambda *a: a[0], clip=float("nan"))
