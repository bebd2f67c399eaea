"""`flowalign bench noise-variance`: the law-of-total-variance split and the command line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flowalign.bench_noise import step_std, variance_split
from flowalign.samplers.kernels import cps, flow_sde


def test_variance_split_adds_up_and_attributes_correctly():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(5, 4, 6, generator=g)  # [P, K, M]
    s = variance_split(r)
    assert s["within"] + s["between"] == pytest.approx(s["total"], rel=1e-12)
    assert s["mean"] == pytest.approx(float(r.double().mean()))
    # a reward fixed by the initial noise: the window's noise explains none of it
    by_init = torch.rand(5, 4, 1, generator=g).expand(5, 4, 6)
    s = variance_split(by_init)
    assert s["within"] == 0 and s["within_share"] == 0 and s["spread"] == 0 and s["between"] > 0
    # a reward that ignores the initial noise (every x_1 sees the same member pattern): all of it
    by_member = torch.rand(5, 1, 6, generator=g).expand(5, 4, 6)
    s = variance_split(by_member)
    assert s["between"] == pytest.approx(0, abs=1e-15) and s["within_share"] == pytest.approx(1) and s["spread"] == 1
    with pytest.raises(ValueError, match=r"\[P, K, M\]"):
        variance_split(torch.rand(3, 4))


def test_step_std_is_the_kernels_std():
    x = torch.randn(2, 3, 4, 4)
    v = torch.randn(2, 3, 4, 4)
    for kern, eta in ((flow_sde, 0.7), (cps, 0.5)):
        for s, sn in ((1.0, 0.9), (0.6, 0.5)):
            ref = kern(x, v, torch.tensor(s), torch.tensor(sn), torch.tensor(eta)).std
            got = step_std(kern.__name__, torch.tensor(s), torch.tensor(sn), torch.tensor(eta))
            assert float(got) == pytest.approx(float(torch.as_tensor(ref).reshape(-1)[0]), rel=1e-6)


def test_bench_noise_variance_from_the_command_line(tmp_path):
    out = tmp_path / "nv.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "flowalign.cli", "bench", "noise-variance", *a],  # noqa: E731
                                    capture_output=True, text=True, env=env, timeout=300)
    r = run("--prompts", "2", "--inits", "2", "--members", "2", "--steps", "4", "--windows", "0,3;2,3",
            "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [w["window"] for w in res["windows"]] == [[0, 3], [2, 3]]
    assert (res["seed"], res["guidance"], res["path"]) == (0, 4.0, None)  # what a rerun needs (they were missing)
    for w in res["windows"]:
        assert w["within"] + w["between"] == pytest.approx(w["total"], abs=1e-4)
        assert len(w["step_std"]) == w["window"][1] - w["window"][0]
    assert "steps 0..2" in r.stdout
    bad = run("--windows", "0,12", "--json", str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "--windows: 0,12 must satisfy" in bad.stderr
    assert sum("error" in ln.lower() for ln in bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.json").exists()
    badk = run("--kernel", "euler")  # no step noise: every member would be the same ODE sample
    assert badk.returncode == 2 and "invalid choice: 'euler'" in badk.stderr


def test_variance_split_needs_two_members_per_initial_noise():
    """With M = 1 the within-x_1 variance is 0 by construction (nothing to split), not a measurement."""
    with pytest.raises(ValueError, match="M >= 2"):
        variance_split(torch.rand(3, 4, 1))  # [P, K, 1]


def test_bench_noise_variance_shares_x1_in_a_cell_and_reseeds_the_step_noise_per_window(monkeypatch, tmp_path):
    """The rollouts the split is computed on: the M members of a (prompt, x_1) cell share their initial noise and
    form one group, the SDE noise is on exactly the window's steps LO … HI−1, and every window's step noise starts
    from the same generator state (the module doc: windows differ only in where the noise goes), a stream other
    than the initial noise's."""
    import flowalign.samplers.loop as L
    from flowalign.bench_noise import bench_noise_variance

    calls, real = [], L.sample

    def spy(velocity, noise, sigmas, cond, *, eta, generator, **kw):
        calls.append({"noise": noise.clone(), "eta": eta.clone(), "state": generator.get_state().clone(),
                      "group": kw["group"].clone()})
        return real(velocity, noise, sigmas, cond, eta=eta, generator=generator, **kw)

    monkeypatch.setattr(L, "sample", spy)
    out = tmp_path / "nv.json"
    p, k, m = 2, 2, 3
    bench_noise_variance(["--prompts", str(p), "--inits", str(k), "--members", str(m), "--steps", "4", "--windows",
                          "0,3;1,2", "--threads", "1", "--seed", "4", "--json", str(out)])
    assert len(calls) == 2
    for c, (lo, hi) in zip(calls, [(0, 3), (1, 2)]):
        cells = c["noise"].flatten(1).view(p * k, m, -1)  # [P·K, M, D]
        assert torch.equal(cells, cells[:, :1].expand_as(cells))  # members share x_1
        assert all(not torch.equal(cells[i, 0], cells[j, 0]) for i in range(p * k) for j in range(i))
        assert torch.equal(c["group"], torch.arange(p * k).repeat_interleave(m))  # [B] one group per cell
        assert (c["eta"] > 0).nonzero().flatten().tolist() == list(range(lo, hi))  # [T]
    assert torch.equal(calls[0]["state"], calls[1]["state"])
    assert not torch.equal(calls[0]["state"], torch.Generator().manual_seed(4).get_state())
    assert [len(w["step_std"]) for w in json.loads(out.read_text())["windows"]] == [3, 1]


def test_the_default_windows_fit_any_step_count():
    """`bench noise-variance --steps 4` failed on a flag the user never typed ("--windows: 0,9 must satisfy ... T-1 =
    3"): the default windows assumed T = 10. They are now derived from T, equal to the old default at T = 10, and
    every one of them passes the check for any T >= 2."""
    from flowalign.bench_noise import _parse_windows, default_windows

    assert default_windows(10) == "0,9;0,6;6,9;0,1;1,2;2,3;3,6"
    assert default_windows(4) == "0,3;0,2;2,3;0,1;1,2"
    for t in range(2, 60):
        wins = _parse_windows(default_windows(t), t)
        assert wins[0] == (0, t - 1) and len(set(wins)) == len(wins)
