"""`flowalign calibrate` (DenseGRPO noise calibration): bad input is one line and exit 2 before the model loads (or,
for prompt text only the model or the reward can read, before any rollout); the update rule does not raise ψ on a
step it has no evidence about; the step noise is not the initial noise; progress is shown."""

from __future__ import annotations

import pytest
import torch

from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)


# ------------------------------------------------------------------------------------------------------- bad input

TINY = ["--steps", "2", "--n", "2", "--group-size", "1", "--iterations", "1", "--probe", "x0"]


def test_calibrate_refuses_an_out_below_a_file_before_loading(capsys, no_model, tmp_path):
    """`--out FILE/eta.json` ran the whole calibration (minutes at the defaults) and then failed on the write."""
    f = tmp_path / "afile"
    f.write_text("x")
    _fails(capsys, ["calibrate", "--out", str(f / "eta.json")], str(f), "not a directory")


def test_calibrate_refuses_an_out_it_cannot_write_before_loading(capsys, no_model):
    """`--out /sys/eta.json` (even root cannot create files there) or under a directory that cannot be made failed
    with a traceback after the whole calibration."""
    for out in ("/sys/eta.json", "/proc/sub/eta.json"):
        _fails(capsys, ["calibrate", "--out", out], f"--out {out!r}", "cannot be written")


def test_calibrate_bounds_the_trajectories_per_iteration_before_loading(capsys, no_model, tmp_path):
    """`--n 200000` (a typo) was accepted and the process was killed for memory (rc 137) with its bar at 0/1; the
    trainer's rollout limit (config.MAX_ROLLOUTS) now bounds --n too, before the model loads."""
    from flowalign.config import MAX_ROLLOUTS

    n = 2 * MAX_ROLLOUTS
    _fails(capsys, ["calibrate", "--n", str(n), "--group-size", "2", "--out", str(tmp_path / "eta.json")],
           f"--n {n} trajectories per iteration is above the limit of {MAX_ROLLOUTS}")
    assert not (tmp_path / "eta.json").exists()


def test_calibrate_keeps_an_earlier_calibration_unless_overwrite(capsys, no_model, tmp_path):
    """An existing --out (the result of an earlier, long calibration) was silently replaced."""
    from flowalign.cli import main

    out = tmp_path / "eta.json"
    out.write_text('{"eta": [0.5]}')
    _fails(capsys, ["calibrate", "--out", str(out)], f"--out {str(out)!r}", "exists", "--overwrite")
    assert out.read_text() == '{"eta": [0.5]}'
    with pytest.raises(AssertionError, match="model was loaded"):  # --overwrite passes every check
        main(["calibrate", "--out", str(out), "--overwrite"])
    assert out.read_text() == '{"eta": [0.5]}'


def test_calibrate_reads_the_prompt_set_before_the_model(capsys, no_model, tmp_path):
    """A missing --prompts file was reported only after the model had loaded (slow for SD3/FLUX)."""
    _fails(capsys, ["calibrate", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "e.json")],
           "none.txt")


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "1"], "--steps"),  # the only step is the deterministic last one: I iterations for an eta of [0.0]
    (["--guidance", "nan"], "--guidance"),  # every gain NaN: every step 'balanced', ψ rose by I·ε2, exit 0
    (["--guidance", "-1"], "--guidance"),  # the trainer refuses model.guidance < 0, so the file is unusable
    (["--seed", "99999999999999999999"], "--seed"),  # a ValueError traceback after the model had loaded
])
def test_calibrate_refuses_bad_settings_before_loading(capsys, no_model, tmp_path, extra, needle):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--out", str(out), *extra], needle)
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    (["--init-a", "-1"], "--init-a"),  # negative ψ rolled out, then clamped to an all-zero result
    (["--eps1", "0"], "--eps1"),  # no step can be balanced: ψ only falls
    (["--eps2", "-0.5"], "--eps2"),  # inverts the update
    (["--reward", "shapes_partial=nan"], "shapes_partial=nan"),  # every gain NaN: every step 'balanced'
])
def test_calibrate_refuses_bad_settings(capsys, no_model, tmp_path, extra, needle):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--out", str(out), *extra], needle)
    assert not out.exists()


def test_calibrate_checks_prompt_text_before_any_rollout(capsys, monkeypatch, tmp_path):
    """A prompt outside the reward's grammar failed inside the first probe's scoring, after the rollouts (and with a
    mixed file, only at whichever iteration first drew it)."""
    import flowalign.calibrate as C

    calls = []
    real = C.sample
    monkeypatch.setattr(C, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompts = tmp_path / "p.txt"
    prompts.write_text("circle circle\n")  # in the model's vocabulary, not in the verifier's grammar
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", *TINY, "--prompts", str(prompts), "--out", str(out)], "circle circle")
    assert calls == [] and not out.exists()



@pytest.mark.parametrize("extra, needles", [
    # RemoteReward() without its url: a TypeError traceback after the model had loaded
    (["--reward", "remote"], ["'remote'", "url"]),
    (["--reward", "remote", "--reward-arg", "remote.url=ftp://host"], ["url must start with http"]),
    (["--reward-arg", "pickscore.path=/w"], ["pickscore.path=/w", "shapes_partial"]),  # not a --reward
    (["--reward", "shapes_partial", "--reward-arg", "shapes_partial.bogus=1"], ["bogus"]),
    (["--reward", "shapes_motion_partial"], ["'shapes_motion_partial'", "videos"]),  # a video reward, image model
    (["--reward", "shapes_motion_partial:2"], ["'shapes_motion_partial'", "videos"]),  # steer's NAME:W form reads too
    (["--model", "shapes_video", "--reward", "saturation", "--per-frame", "reduce=bogus"], ["--per-frame", "bogus"]),
    (["--model-arg", "bogus=1"], ["--model-arg", "bogus"]),  # the adapter's options are checked as eval checks them
    (["--guidance", "3", "--model-arg", "guidance_scale=2"], ["disagree"]),
])
def test_calibrate_builds_its_rewards_before_loading(capsys, no_model, tmp_path, extra, needles):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--out", str(out), *extra], *needles)
    assert not out.exists()


def test_calibrate_scores_a_video_model_frame_by_frame_and_records_how_it_was_made(tmp_path):
    """An image reward on the video model got [B, F, 3, H, W] videos (a ValueError traceback after the first rollout);
    the file did not say which prompts, seed, CFG scale or initial a it was calibrated with."""
    import json

    from flowalign.cli import main

    out = tmp_path / "v.json"
    assert main(["calibrate", *TINY, "--model", "shapes_video", "--prompts", "shapes-motion-train", "--reward",
                 "saturation", "--per-frame", "reduce=first", "--guidance", "3", "--seed", "5", "--init-a", "0.5",
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert len(d["eta"]) == 2 and d["rewards"] == {"saturation": 1.0} and d["per_frame"] == {"reduce": "first"}
    assert (d["prompts"], d["seed"], d["guidance"], d["init_a"]) == ("shapes-motion-train", 5, 3.0, 0.5)
    out2 = tmp_path / "i.json"  # without --guidance: the model's own scale, as used
    assert main(["calibrate", *TINY, "--out", str(out2)]) == 0
    from flowalign.models import load_model

    d2 = json.loads(out2.read_text())
    assert d2["guidance"] == load_model("shapes", "").guidance_scale and d2["prompts"] == "shapes-train"
    assert d2["seed"] == 0 and d2["init_a"] == 0.7 and "per_frame" not in d2 and "reward_args" not in d2


# -------------------------------------------------------------------------------------------- the calibration loop


def test_calibration_update_keeps_psi_on_a_step_without_a_finite_gain():
    """NaN gains are ignored, so a step whose gains were all NaN counted 0 positive and 0 negative: 'balanced', and
    ψ rose by ε2 on no evidence at all (every step, every iteration when the rewards were NaN)."""
    from flowalign.calibrate import calibration_update

    psi = torch.tensor([0.5, 0.5, 0.5])
    nan = float("nan")
    gains = torch.tensor([[nan, 1.0, 0.0], [nan, -1.0, 0.0]])
    new, imb = calibration_update(psi, gains, eps1=2, eps2=0.01)
    assert imb.tolist() == [0, 0, 0]
    assert new[0] == psi[0]  # no evidence: unchanged
    assert torch.allclose(new[1:], torch.tensor([0.51, 0.51]))  # balanced and all-zero gains still rise (spec)


def test_calibrate_step_noise_is_not_the_initial_noise(monkeypatch, tmp_path):
    """With the default --seed 0 the rollout's SDE generator was seeded like the initial noise, so the first
    step's noise ξ_0 was exactly x_0 (same shape, same stream): the calibrated gains came from correlated noise."""
    import flowalign.calibrate as C

    seen = {}

    class Stop(Exception):
        pass

    def fake_sample(velocity, noise, sigmas, cond, *, generator=None, **kw):
        seen["noise"], seen["xi"] = noise.clone(), torch.randn(noise.shape, generator=generator)
        raise Stop

    monkeypatch.setattr(C, "sample", fake_sample)
    with pytest.raises(Stop):
        C.cli_main(["--steps", "2", "--n", "2", "--group-size", "1", "--iterations", "1", "--probe", "x0",
                    "--out", str(tmp_path / "eta.json")])
    assert not torch.equal(seen["noise"], seen["xi"])


def test_calibrate_shows_progress(monkeypatch, capsys):
    """The calibration loop (minutes at the defaults) shows a progress bar."""
    import flowalign.calibrate as C

    monkeypatch.setattr(C, "reward_gains", lambda *a, **k: torch.tensor([[0.1, -0.1], [0.2, 0.3]]))
    C.calibrate_noise(lambda it: (torch.zeros(2, 1), {}, torch.zeros(2, dtype=torch.long)), None,
                      torch.tensor([1.0, 0.5, 0.0]), None, {"r": 1.0}, iterations=3, progress=True)
    err = capsys.readouterr().err
    assert "calibrat" in err and "3/3" in err


def test_calibration_update_needs_an_imbalance_strictly_below_eps1():
    """DenseGRPO §4.1 (METHODS.md): ψ_t rises only if |#pos − #neg| < ε1; |#pos − #neg| = ε1 is unbalanced and
    falls by ε2."""
    from flowalign.calibrate import calibration_update

    psi = torch.tensor([0.5, 0.5, 0.5])
    gains = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 0.0, -1.0]])  # [N=3, T=3]
    new, imb = calibration_update(psi, gains, eps1=2, eps2=0.01)
    assert imb.tolist() == [3, 0, 1]
    torch.testing.assert_close(new, torch.tensor([0.49, 0.51, 0.51]))
    new, imb = calibration_update(psi, gains[:2], eps1=2, eps2=0.01)  # [N=2, T=3]: imbalances 2, 0, 2
    assert imb.tolist() == [2, 0, 2]
    torch.testing.assert_close(new, torch.tensor([0.49, 0.51, 0.49]))


def test_reward_gains_are_the_forward_differences_of_the_weighted_values(monkeypatch):
    """ΔR_it = V(x_{t+1}) − V(x_t) of the weighted value Σ_k w_k·V_k (METHODS.md §4.1), of a dance_sde rollout with
    per-step η = ψ (the ψ being calibrated)."""
    import flowalign.calibrate as C

    a = torch.tensor([[0.0, 0.2, 0.5, 0.4], [1.0, 1.0, 0.0, 2.0]])  # [N=2, T+1=4]
    b = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.5, 0.5]])  # [N, T+1]
    seen = {}

    class Traj:
        batch_size, steps = 2, 3

    def fake_sample(velocity, noise, sigmas, cond, **kw):
        seen.update(kw)
        return Traj()

    monkeypatch.setattr(C, "sample", fake_sample)
    monkeypatch.setattr(C, "probe_values", lambda *args, **kw: {"a": a, "b": b})
    psi = torch.tensor([0.3, 0.2, 0.0])
    gains = C.reward_gains(None, torch.zeros(2, 1), torch.tensor([1.0, 0.6, 0.3, 0.0]), {}, torch.zeros(2), psi, None,
                           {"a": 2.0, "b": -1.0})  # [N, T]
    v = (2.0 * a - b).to(torch.float64)  # [N, T+1]
    torch.testing.assert_close(gains, v[:, 1:] - v[:, :-1], rtol=0, atol=1e-12)
    assert seen["kernel"] == "dance_sde" and seen["eta"] is psi


def _fake_gains(monkeypatch):
    """reward_gains replaced by constant gains [N=2, T]; records the η and generator seed of each call."""
    import flowalign.calibrate as C

    calls = []

    def gains(velocity, noise, sigmas, cond, cond_index, psi, score, weights, *, generator=None, **kw):
        calls.append((psi.clone(), generator.initial_seed()))
        t = sigmas.shape[0] - 1
        return torch.tensor([[1.0] * t, [-1.0] * t], dtype=torch.float64)  # balanced everywhere: ψ rises

    monkeypatch.setattr(C, "reward_gains", gains)
    return calls


def test_calibrate_noise_starts_at_flow_grpo_g_and_keeps_the_last_step_deterministic(monkeypatch):
    """Defaults (DenseGRPO §4.1, METHODS.md): ψ starts at Flow-GRPO's g_t with a = 0.7, every step but the last is
    calibrated, and a step left out of ``steps`` (the last by default) is ψ = 0 throughout, whatever ``psi0`` says."""
    from flowalign.calibrate import calibrate_noise, initial_psi

    calls = _fake_gains(monkeypatch)
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])  # T = 4
    batch = lambda it: (torch.zeros(2, 1), {}, torch.zeros(2, dtype=torch.long))  # noqa: E731
    psi, hist = calibrate_noise(batch, None, sig, None, {"r": 1.0}, iterations=2)
    g = initial_psi(sig, 0.7)  # [T], last 0
    torch.testing.assert_close(torch.tensor(hist[0]["psi"]), g)
    torch.testing.assert_close(psi, g + torch.tensor([0.02, 0.02, 0.02, 0.0]))
    psi, _ = calibrate_noise(batch, None, sig, None, {"r": 1.0}, psi0=torch.full((4,), 0.5), iterations=1)
    torch.testing.assert_close(calls[-1][0], torch.tensor([0.5, 0.5, 0.5, 0.0]))  # the rollout ran the last step as ODE
    torch.testing.assert_close(psi, torch.tensor([0.51, 0.51, 0.51, 0.0]))
    psi, _ = calibrate_noise(batch, None, sig, None, {"r": 1.0}, psi0=torch.full((4,), 0.5), iterations=1,
                             steps=torch.tensor([False, True, False, True]))
    torch.testing.assert_close(psi, torch.tensor([0.0, 0.51, 0.0, 0.51]))


def test_calibrate_noise_draws_fresh_sde_noise_each_iteration_and_per_seed(monkeypatch):
    """Iteration i's rollout generator is seeded with seed·1000003 + i: the I iterations are I independent samples of
    the gains (one seed for all repeated the same SDE noise), and another --seed is another calibration."""
    from flowalign.calibrate import calibrate_noise

    calls = _fake_gains(monkeypatch)
    sig = torch.tensor([1.0, 0.5, 0.0])
    batch = lambda it: (torch.zeros(2, 1), {}, torch.zeros(2, dtype=torch.long))  # noqa: E731
    calibrate_noise(batch, None, sig, None, {"r": 1.0}, iterations=3, seed=0)
    calibrate_noise(batch, None, sig, None, {"r": 1.0}, iterations=3, seed=4)
    assert [c[1] for c in calls] == [0, 1, 2, 4 * 1000003, 4 * 1000003 + 1, 4 * 1000003 + 2]


def test_calibrate_scores_each_rollout_against_the_prompt_it_was_conditioned_on(monkeypatch, tmp_path):
    """Rollout r of the N = n_groups·group_size is conditioned on cond row cond_index[r] (group r // group_size) and
    its reward must score it against that same prompt: a mismatch balances the gains of the wrong prompt."""
    import flowalign.calibrate as C
    import flowalign.rewards.catalog as catalog

    scored = []

    class Recorder:
        def __call__(self, images, prompts):
            scored.append(list(prompts))
            return torch.zeros(len(prompts))

    monkeypatch.setattr(catalog, "build_reward_checked", lambda *a, **k: Recorder())
    got = {}

    def fake_calibrate(make_batch, velocity, sigmas, score, weights, **kw):
        noise, cond, cond_index = make_batch(0)
        got["index"], got["prompts"] = cond_index.tolist(), list(make_batch.prompts)
        score(noise, torch.arange(noise.shape[0]))  # decode + reward every rollout
        return torch.zeros(sigmas.shape[0] - 1), []

    monkeypatch.setattr(C, "calibrate_noise", fake_calibrate)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    assert C.cli_main(["--steps", "2", "--n", "6", "--group-size", "2", "--iterations", "1", "--prompts", str(prompts),
                       "--seed", "1", "--out", str(tmp_path / "eta.json")]) == 0
    assert got["index"] == [0, 0, 1, 1, 2, 2]  # [N]: each group's rollouts share their cond row
    assert len(set(got["prompts"])) > 1  # the draw holds different prompts, so a mismatch shows
    assert scored == [[got["prompts"][i] for i in got["index"]]]


# ------------------------------------------------------------------------------------ the file, read by sample


def test_sample_draws_with_a_calibrated_eta_file(tmp_path, capsys):
    """calibrate's file was readable by `train` alone (`sample --eta psi.json`: invalid float), so the calibrated
    noise could not be looked at. `sample --eta-file` takes the file's kernel and step count: a file of one level on
    every step draws exactly the grid of `--kernel dance_sde --eta` at that level, another level draws another grid,
    and the file's grid is checked against the model's."""
    import json

    from cli_checks import fails
    from flowalign.cli import main
    from flowalign.models import load_model

    grid = load_model("shapes").schedule(4).tolist()

    def write(name, eta, **extra):
        f = tmp_path / name
        f.write_text(json.dumps({"kernel": "dance_sde", "eta": eta, "sigmas": grid, **extra}))
        return str(f)

    common = ["sample", "a red circle", "--seeds", "2"]
    flat = write("flat.json", [0.5, 0.5, 0.5, 0.0])
    assert main([*common, "--eta-file", flat, "--out", str(tmp_path / "file.png")]) == 0
    assert main([*common, "--kernel", "dance_sde", "--eta", "0.5", "--steps", "4",
                 "--out", str(tmp_path / "flag.png")]) == 0
    assert (tmp_path / "file.png").read_bytes() == (tmp_path / "flag.png").read_bytes()
    other = write("other.json", [0.9, 0.1, 0.5, 0.0])
    assert main([*common, "--eta-file", other, "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").read_bytes() != (tmp_path / "flag.png").read_bytes()
    capsys.readouterr()
    fails(capsys, [*common, "--eta-file", flat, "--kernel", "flow_sde", "--out", str(tmp_path / "x.png")],
          "holds dance_sde noise levels but --kernel flow_sde; set --kernel dance_sde")
    fails(capsys, [*common, "--eta-file", flat, "--steps", "10", "--out", str(tmp_path / "x.png")],
          "has 4 etas but --steps 10; they must match (set --steps 4")
    fails(capsys, [*common, "--eta-file", flat, "--eta", "0.3", "--kernel", "dance_sde", "--out", str(tmp_path / "x.png")],
          "not both")
    # without --kernel too: the conflict is named, not '--eta > 0 needs a stochastic kernel' (the file fixes it)
    fails(capsys, [*common, "--eta-file", flat, "--eta", "0.3", "--out", str(tmp_path / "x.png")],
          "pass --eta 0.3 or --eta-file", "not both")
    bad = tmp_path / "grid.json"
    bad.write_text(json.dumps({"kernel": "dance_sde", "eta": [0.5, 0.5, 0.5, 0.0], "sigmas": [1, 0.9, 0.5, 0.2, 0]}))
    fails(capsys, [*common, "--eta-file", str(bad), "--out", str(tmp_path / "x.png")], "another sigma grid")
    assert not (tmp_path / "x.png").exists()


def test_calibrate_takes_model_args_and_records_them(tmp_path):
    """The audit's FLUX case: the sigma grid depends on the resolution, and calibrate had no --model-arg (its own
    error advised one), so every file was made at the adapter's default size. The options reach the model (here
    the CFG scale: the file's guidance) and are recorded in the file."""
    import json

    from flowalign.cli import main

    out = tmp_path / "m.json"
    assert main(["calibrate", *TINY, "--model-arg", "guidance_scale=2", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["guidance"] == 2.0 and d["model_args"] == {"guidance_scale": 2}
