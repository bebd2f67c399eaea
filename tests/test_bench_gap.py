"""`flowalign bench sample-gap`: the denoising-error measure and the command line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign.bench_gap import denoise_error


def test_denoise_error_is_zero_for_the_exact_velocity_and_grows_as_t_squared():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1  # [B, 3, H, W]
    eps = torch.randn(4, 3, 8, 8, generator=g)
    levels = [0.05, 0.3, 0.9]
    # the exact velocity of a point mass at x0: x_t = (1 − t)x0 + tε ⇒ v = (x_t − x0)/t = ε − x0
    exact = lambda x, s, c: (x - x0) / s.view(-1, 1, 1, 1)  # noqa: E731
    assert denoise_error(exact, x0, None, levels, eps) == pytest.approx([0.0] * 3, abs=1e-10)
    # a velocity off by a constant δ everywhere: x̂0 = x0 − tδ, so the error is t²·δ²
    off = lambda x, s, c: exact(x, s, c) + 0.5  # noqa: E731
    assert denoise_error(off, x0, None, levels, eps) == pytest.approx([t * t * 0.25 for t in levels], rel=1e-5)


def test_bench_sample_gap_from_the_command_line(tmp_path):
    out = tmp_path / "gap.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "flowalign.cli", "bench", "sample-gap", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    r = run("--prompts", "3", "--steps", "2,3", "--levels", "0.2,0.9", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [s["source"] for s in res["sources"]] == ["renders", "ode 2 steps", "ode 3 steps"]
    renders = res["sources"][0]
    assert renders["strict"] == 1.0  # every rendered scene satisfies its prompt
    assert all(set(s["x0_error"]) == {"0.2", "0.9"} and all(e >= 0 for e in s["x0_error"].values())
               for s in res["sources"])
    assert "renders" in r.stdout and "ode 3 steps" in r.stdout
    for bad, needle in ((("--levels", "0.5,1.0"), "--levels=0.5,1.0: every noise level must lie in (0, 1)"),
                        (("--lora", str(tmp_path)), "no pytorch_lora_weights.safetensors")):
        b = run(*bad, "--json", str(tmp_path / "bad.json"))
        assert b.returncode == 2 and needle in b.stderr, b.stderr[-1000:]
        assert sum("error" in ln.lower() for ln in b.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad.json").exists()


def test_sample_gap_refuses_fractional_step_counts(capsys, no_model):
    """`--steps 2.5` was truncated to 2 and reported as 'ode 2 steps'."""
    _fails(capsys, ["bench", "sample-gap", "--steps", "2.5"], "2.5")


def test_sample_gap_refuses_a_lora_of_another_model_in_one_line(capsys, tmp_path):
    """A readable LoRA whose keys do not fit the shapes model ended in `ValueError: LoRA keys do not match` (a
    traceback, exit code 1); it now goes through `flowalign sample`'s load_lora_checked."""
    from safetensors.torch import save_file

    lora = tmp_path / "other"
    lora.mkdir()
    save_file({"transformer.nope.lora_A.weight": torch.zeros(2, 2)}, str(lora / "pytorch_lora_weights.safetensors"))
    out = tmp_path / "gap.json"
    _fails(capsys, ["bench", "sample-gap", "--prompts", "1", "--steps", "1", "--levels", "0.5", "--threads", "1",
                    "--lora", str(lora), "--json", str(out)], f"--lora {str(lora)!r} does not fit this model")
    assert not out.exists()


def test_denoise_error_noises_x0_along_the_straight_path():
    """x_t = (1 − t)·x₀ + t·ε at σ = t (the rectified-flow path of the module doc), shared ε for every level: a
    velocity that ignores x_t and returns the true ε − x₀ has zero error only on that path."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1  # [B, 3, H, W]
    eps = torch.randn(3, 3, 4, 4, generator=g)
    seen = []

    def const(x, s, c):
        seen.append((x.clone(), s.clone()))
        return eps - x0

    levels = [0.1, 0.6]
    assert denoise_error(const, x0, None, levels, eps) == pytest.approx([0.0, 0.0], abs=1e-12)
    for (x, s), t in zip(seen, levels):
        assert torch.allclose(x, (1 - t) * x0 + t * eps) and torch.equal(s, torch.full((3,), t))


def test_sample_gap_scores_every_source_in_the_data_range_on_one_shared_noise(monkeypatch, tmp_path):
    """Every source is denoised from x₀ = 2·image − 1 (the model's data range [−1, 1], not the [0, 1] pixels) with
    the same ε, so the sources differ only in their images; the pixel figures are of the [0, 1] images."""
    import flowalign.bench_gap as BG

    seen, real = [], BG.denoise_error

    def spy(velocity, x0, cond, levels, eps):
        seen.append((x0.clone(), eps.clone()))
        return real(velocity, x0, cond, levels, eps)

    monkeypatch.setattr(BG, "denoise_error", spy)
    out = tmp_path / "gap.json"
    BG.bench_sample_gap(["--prompts", "2", "--steps", "1", "--levels", "0.5", "--threads", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert [s["source"] for s in res["sources"]] == ["renders", "ode 1 steps"] and len(seen) == 2
    assert torch.equal(seen[0][1], seen[1][1])  # one ε for every source
    for (x0, _), row in zip(seen, res["sources"]):
        img = (x0 + 1) / 2  # [n, 3, H, W] back in [0, 1]
        assert float(x0.min()) >= -1 and float(x0.max()) <= 1
        assert row["pixel_mean"] == round(float(img.mean()), 4) and row["pixel_std"] == round(float(img.std()), 4)
    assert float(seen[0][0].min()) < -0.5  # the renders' dark background sits near −1
