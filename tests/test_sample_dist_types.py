"""Contracts of the plumbing modules that no other test pinned: ``flowalign sample`` (seeds, prompt rows, grid
layout, argument checks), ``dist`` (timeout bound, device index, rank-0 failures), ``types`` (option ranges) and
``bench_memory`` (preflight threshold, what ``measure`` times and reports). All in process, on tiny stand-ins."""

from __future__ import annotations

import logging
import types as pytypes
import typing

import pytest
import torch
from torch import nn

from flowalign.errors import UserError


class _ToyFlow:
    """A flow model of 4-dim latents: v = x − c(prompt), c a per-prompt constant; decode shows the latent as 2x2."""

    device = torch.device("cpu")
    default_steps = 3

    def __init__(self):
        self.guidance_scale = 1.0
        self.encoded: list[list[str]] = []

    def schedule(self, steps):
        return torch.linspace(1.0, 0.0, steps + 1)  # [T+1]

    def encode(self, prompts):
        self.encoded.append(list(prompts))
        return {"c": torch.tensor([[float(len(p))] * 4 for p in prompts])}  # [P, 4]

    def init_noise(self, n, generator=None):
        return torch.randn((n, 4), generator=generator)  # [n, 4]

    def velocity(self, x, sigma, cond):
        return x - cond["c"]  # [B, 4]

    def decode(self, x):
        return x.view(-1, 1, 2, 2).expand(-1, 3, 2, 2)  # [B, 3, 2, 2]


# ------------------------------------------------------------------------------------------------ sample.generate

def test_generate_gives_each_prompt_its_own_row_and_seed_whatever_the_batch():
    """Image i is prompts[i] drawn from init_noise(1, Generator().manual_seed(seeds[i])) by the ODE: the same pixels
    alone, in a batch of other prompts, or split into batches of 1 (module docstring: before/after grids compare like
    with like)."""
    from flowalign.sample import generate

    m = _ToyFlow()
    prompts, seeds = ["a b", "a", "a b c d", "a"], [7, 3, 11, 5]  # a repeated prompt: one cond row, two images
    together = generate(m, prompts, seeds, steps=3)  # [4, 3, 2, 2]
    split = generate(m, prompts, seeds, steps=3, batch_size=3)  # batches [0:3], [3:4]
    assert together.shape == (4, 3, 2, 2)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = generate(m, [p], [s], steps=3)  # [1, 3, 2, 2]
        assert torch.allclose(together[i:i + 1], alone, atol=1e-6) and torch.allclose(split[i:i + 1], alone, atol=1e-6)
    # by hand: Euler steps x ← x + (σ_{t+1} − σ_t)·(x − c) from x_0 = ε, c("a b") = 3
    eps = m.init_noise(1, torch.Generator().manual_seed(7))  # [1, 4]
    x = eps.clone()
    sig = m.schedule(3)
    for t in range(3):
        x = x + (sig[t + 1] - sig[t]) * (x - 3.0)  # [1, 4]
    assert torch.allclose(together[0, 0].flatten(), x.flatten(), atol=1e-5)


def test_sde_generate_draws_the_step_noise_from_the_images_own_stream():
    """With eta > 0 the step noise of image i comes from Generator().manual_seed(step_noise_seed(seeds[i]))
    (``evaluate.step_noise_seed``), the stream steer and eval regenerate an image from, and eta is the one passed."""
    from flowalign.evaluate import step_noise_seed
    from flowalign.sample import generate
    from flowalign.samplers import eta_schedule, sample

    m = _ToyFlow()
    got = generate(m, ["a", "a b"], [4, 9], steps=3, kernel="flow_sde", eta=0.8)  # [2, 3, 2, 2]
    for i, (p, s) in enumerate([("a", 4), ("a b", 9)]):
        x = m.init_noise(1, torch.Generator().manual_seed(s))  # [1, 4]
        ref = sample(m.velocity, x, m.schedule(3), m.encode([p]), eta=eta_schedule(3, 0.8), kernel="flow_sde",
                     generator=torch.Generator().manual_seed(step_noise_seed(s))).final  # [1, 4]
        assert torch.allclose(got[i, 0].flatten(), ref.flatten(), atol=1e-6)
    ode = generate(m, ["a", "a b"], [4, 9], steps=3, kernel="flow_sde", eta=0.0)
    assert not torch.allclose(got, ode, atol=1e-3)  # the noise is really drawn


def test_guidance_is_restored_after_sampling_even_on_error():
    """``guidance`` sets the model's CFG scale for the sampling only (quirk Q8), also when sampling raises."""
    from flowalign.sample import generate, guidance

    m = _ToyFlow()
    m.guidance_scale = 4.5
    seen = []
    real = m.velocity
    m.velocity = lambda x, s, c: seen.append(m.guidance_scale) or real(x, s, c)
    generate(m, ["a"], [0], steps=2, guidance_scale=7.0)
    assert seen == [7.0, 7.0] and m.guidance_scale == 4.5
    with pytest.raises(RuntimeError, match="boom"):
        with guidance(m, 2.0):
            raise RuntimeError("boom")
    assert m.guidance_scale == 4.5


# --------------------------------------------------------------------------------------------- sample.sample_grid

def test_sample_grid_rows_are_prompts_columns_are_seed_plus_j_and_only_column_0_is_captioned(monkeypatch, tmp_path):
    """One row per prompt, one column per seed: image j of every prompt starts from ``seed + j`` (``--seed``'s help),
    so column j of two grids of other prompts shares the noise; nrow = seeds per prompt; the caption is the prompt,
    on its row's first tile only."""
    import flowalign.sample as S

    calls = {}
    monkeypatch.setattr(S, "generate", lambda model, prompts, seeds, **kw: calls.update(
        prompts=list(prompts), seeds=list(seeds)) or torch.zeros(len(prompts), 3, 2, 2))  # [N, 3, 2, 2]
    monkeypatch.setattr(S, "save_grid", lambda images, path, nrow, labels=None, fps=None: calls.update(
        n=images.shape[0], nrow=nrow, labels=list(labels)) or path)
    S.sample_grid(_ToyFlow(), ["p", "q"], tmp_path / "g.png", steps=2, seed=10, seeds_per_prompt=3)
    assert calls["prompts"] == ["p", "p", "p", "q", "q", "q"]
    assert calls["seeds"] == [10, 11, 12, 10, 11, 12]
    assert calls["nrow"] == 3 and calls["n"] == 6
    assert calls["labels"] == ["p", "", "", "q", "", ""]


# ----------------------------------------------------------------------------------------- sample: argument checks

def test_check_seed_accepts_exactly_the_open_interval_of_2_to_the_32():
    """``check_seed``: between -2**32 and 2**32, exclusive (its message), so both ends are refused."""
    from flowalign.sample import check_seed

    for ok in (0, (1 << 32) - 1, -(1 << 32) + 1):
        assert check_seed(ok) == ok
    for bad in (1 << 32, -(1 << 32)):
        with pytest.raises(UserError, match="between -2\\*\\*32 and 2\\*\\*32"):
            check_seed(bad)


def test_max_prompts_zero_means_every_prompt_and_counts_below_one_are_refused():
    """``check_max_prompts``: 0 = every prompt (accepted), -1 refused; ``check_positive``: 1 is the least count,
    and ``steps`` is also capped at ``config.MAX_STEPS``."""
    from flowalign.config import MAX_STEPS
    from flowalign.sample import check_max_prompts, check_positive

    assert check_max_prompts(0) == 0 and check_max_prompts(3) == 3
    with pytest.raises(UserError, match="--max-prompts must be >= 0"):
        check_max_prompts(-1)
    check_positive(seeds=1, steps=MAX_STEPS, batch_size=None)
    for kw, needle in ((dict(seeds=0), "--seeds must be at least 1, got 0"),
                       (dict(batch_size=0), "--batch-size must be at least 1"),
                       (dict(steps=MAX_STEPS + 1), f"--steps {MAX_STEPS + 1} is above the limit")):
        with pytest.raises(UserError, match=needle):
            check_positive(**kw)


def test_a_whitespace_prompt_argument_is_refused():
    """``check_prompt_args`` refuses a prompt that is empty after stripping (it would sample unconditionally)."""
    from flowalign.sample import check_prompt_args

    assert check_prompt_args(["a red circle"]) == ["a red circle"]
    for bad in ("", "  ", "\t"):
        with pytest.raises(UserError, match="prompt argument 2 is empty"):
            check_prompt_args(["a red circle", bad])


def test_check_new_dir_refuses_a_non_empty_directory_and_a_file(tmp_path):
    """Nothing of an earlier run is overwritten: a new or empty directory passes, a non-empty one or a file does not."""
    from flowalign.sample import check_new_dir

    assert check_new_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_new_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(UserError, match="is not empty"):
        check_new_dir(tmp_path / "full")
    with pytest.raises(UserError, match="is a file"):
        check_new_dir(tmp_path / "full" / "x")


def test_check_out_dir_counts_the_journals_of_other_ranks(tmp_path):
    """A run killed before rank 0 wrote its journal still resumes from another rank's ``<stem>.rank<r><suffix>``
    (``check_out_dir``), and without --resume such a directory is refused with the hint to resume it."""
    from flowalign.sample import check_out_dir

    out = tmp_path / "run"
    out.mkdir()
    (out / "partial.rank1.jsonl").write_text("{}\n")
    assert check_out_dir(out, True, "partial.jsonl") == out
    with pytest.raises(UserError, match=r"interrupted run \(partial.rank1.jsonl\); continue it with --resume"):
        check_out_dir(out, False, "partial.jsonl")
    with pytest.raises(UserError, match="holds no interrupted run"):
        check_out_dir(tmp_path / "other", True, "partial.jsonl")


def test_sample_takes_8_evenly_spaced_prompts_of_a_prompt_file_by_default(monkeypatch, tmp_path):
    """``--max-prompts``' help: of --prompt-file's prompts the default is an evenly spaced subset of 8."""
    import flowalign.models
    import flowalign.sample as S
    from flowalign import data as D

    f = tmp_path / "p.txt"
    f.write_text("".join(f"a red circle {i}\n" for i in range(20)))
    monkeypatch.setattr(flowalign.models, "load_model", lambda *a, **k: _ToyFlow())
    seen = {}
    monkeypatch.setattr(S, "sample_grid", lambda model, prompts, out, **kw: seen.update(prompts=list(prompts)) or out)
    assert S.cli_main(["--prompt-file", str(f), "--out", str(tmp_path / "g.png")]) == 0
    assert seen["prompts"] == [r.prompt for r in D.spaced_subset(D.load_prompts(f), 8)] and len(seen["prompts"]) == 8


# ----------------------------------------------------------------------------------------------------------- dist

def test_the_collective_timeout_accepts_its_documented_maximum_in_minutes(monkeypatch):
    """``FLOWALIGN_DIST_TIMEOUT_MIN``: positive minutes, at most ``MAX_TIMEOUT_MIN`` inclusive ("at most")."""
    from flowalign.dist import MAX_TIMEOUT_MIN, TIMEOUT_ENV, _timeout

    monkeypatch.setenv(TIMEOUT_ENV, f"{MAX_TIMEOUT_MIN:g}")
    assert _timeout().total_seconds() == MAX_TIMEOUT_MIN * 60
    monkeypatch.setenv(TIMEOUT_ENV, f"{MAX_TIMEOUT_MIN * 1.5:g}")
    with pytest.raises(UserError, match="at most"):
        _timeout()


def test_a_cuda_index_equal_to_the_device_count_is_unavailable(monkeypatch):
    """Indices run below ``device_count``: with one GPU, cuda:0 is usable and cuda:1 is not."""
    from flowalign.dist import device_unavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_unavailable(torch.device("cuda:0")) == "" and device_unavailable(torch.device("cuda")) == ""
    assert device_unavailable(torch.device("cuda:1")) == "1 CUDA device(s) are visible here (indices below 1)"


def test_world_size_env_takes_a_positive_process_count(monkeypatch):
    """``WORLD_SIZE`` unset or blank = 1; 0 is not a process count."""
    from flowalign.dist import world_size_env

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size_env() == 1
    monkeypatch.setenv("WORLD_SIZE", " 3 ")
    assert world_size_env() == 3
    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(UserError, match="is not a process count"):
        world_size_env()


@pytest.fixture
def one_rank_group(tmp_path):
    """A real (gloo, one-process) process group, so ``once_on_rank0`` takes its collective path in process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_once_on_rank0_shares_a_value_or_a_user_error_and_reraises_rank0s_own_failure(one_rank_group):
    """Through the broadcast: the value comes back, a ``UserError`` comes back as one with the same message, and any
    other failure on rank 0 is re-raised as itself (its traceback), not as the others' one-line summary."""
    from flowalign.dist import once_on_rank0

    assert once_on_rank0(lambda: {"a": 1}, 0, 2) == {"a": 1}

    def user():
        raise UserError("no room")

    with pytest.raises(UserError, match="^no room$"):
        once_on_rank0(user, 0, 2)
    err = OSError("disk")

    def fail():
        raise err

    with pytest.raises(OSError) as info:
        once_on_rank0(fail, 0, 2)
    assert info.value is err


# ---------------------------------------------------------------------------------------------------------- types

def test_interval_ends_are_open_or_closed_as_declared():
    """``Interval.contains``: a closed end includes its bound, an open end excludes it (``[0, 1)``, ``(0, 1]``)."""
    from flowalign.types import Interval

    right_open = Interval(0.0, 1.0, high_open=True)  # [0, 1)
    assert right_open.contains(0.0) and right_open.contains(0.999) and not right_open.contains(1.0)
    left_open = Interval(0.0, 1.0, low_open=True)  # (0, 1]
    assert left_open.contains(1.0) and not left_open.contains(0.0)
    assert Interval().contains(-1e300) and Interval().contains(1e300)


def test_a_list_of_ints_refuses_bools_and_non_empty_refuses_an_empty_tuple():
    """``option_value_error``: ``True`` is not an integer element (as for a scalar int option), and ``NonEmpty``
    refuses ``()`` as it refuses ``[]`` (a direct call passes tuples)."""
    from flowalign.types import Interval, NonEmpty, option_value_error

    assert option_value_error(typing.Sequence[int], [1, 2]) is None
    assert option_value_error(typing.Sequence[int], [1, True]) == "expected a list of integers, e.g. [1, 4]"
    hint = typing.Annotated[typing.Sequence[int], Interval(1), NonEmpty("[1, 2]")]
    assert option_value_error(hint, ()) == "expected a non-empty list, e.g. [1, 2]"
    assert option_value_error(hint, (1, 2)) is None


def test_trajectory_helpers_follow_the_index_convention():
    """``steps`` = len(sigmas) − 1, ``final`` = latents[:, -1] (x_T, data end), ``batch_size`` = B."""
    from flowalign.types import Trajectory

    lat = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)  # [B=2, T+1=4, 3]
    traj = Trajectory(latents=lat, sigmas=torch.linspace(1, 0, 4), eta=torch.zeros(3), log_probs=torch.zeros(2, 3),
                      cond={}, cond_index=torch.zeros(2, dtype=torch.long), group=torch.zeros(2, dtype=torch.long),
                      prompts=("p",))
    assert traj.steps == 3 and traj.batch_size == 2 and torch.equal(traj.final, lat[:, 3])  # [2, 3]


# --------------------------------------------------------------------------------------------------- bench_memory

class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = {"in_channels": 2, "_class_name": "X"}


class _PreflightModel:
    transformer = _Transformer()
    height = width = 32
    dtype = torch.float32
    max_sequence_length = 8
    guidance_scale = 4.0
    device = torch.device("cpu")


def _preflight(monkeypatch, caplog, free, checkpointing=False):
    import flowalign.bench_memory as BM

    monkeypatch.setattr(BM, "count_config", lambda *a, **k: {"saved_bytes_off": 1000, "saved_bytes_on": 100})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flowalign.bench_memory"):
        est = BM.preflight(_PreflightModel(), "sd3", 2, checkpointing=checkpointing, lora=((), 4, 8), free_bytes=free)
    return est, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_preflight_warns_above_90_percent_of_the_free_memory(monkeypatch, caplog):
    """``preflight`` warns when the update needs more than 90 % of what is free (its docstring), not only more than
    all of it: 1000 bytes needed warn at 1100 free (91 %), not at 1112 (89.9 %); with checkpointing the smaller
    count is the one compared."""
    est, warn = _preflight(monkeypatch, caplog, 1100)
    assert est["needed_bytes"] == 1000 and len(warn) == 1 and "model.gradient_checkpointing=true" in warn[0]
    assert _preflight(monkeypatch, caplog, 1112)[1] == []
    est, warn = _preflight(monkeypatch, caplog, 120, checkpointing=True)
    assert est["needed_bytes"] == 100 and warn == []
    assert len(_preflight(monkeypatch, caplog, 110, checkpointing=True)[1]) == 1


def test_preflight_compares_with_the_free_not_the_total_memory(monkeypatch, caplog):
    """Without ``free_bytes`` it reads ``torch.cuda.mem_get_info`` = (free, total): the free part."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (500, 10_000))
    est, warn = _preflight(monkeypatch, caplog, None)
    assert est["free_bytes"] == 500 and len(warn) == 1


class _MeasuredModel:
    """A LoRA stand-in W [2, 2]: v = W x, doubled with checkpointing on (so the two modes' gradients differ)."""

    device = torch.device("cpu")
    latent_shape = (2,)

    def __init__(self):
        self.transformer = nn.Linear(2, 2, bias=False)
        self.mode = False

    def lora_parameters(self):
        return [self.transformer.weight]

    def encode(self, prompts):
        return {}

    def set_gradient_checkpointing(self, mode):
        self.mode = mode

    def velocity(self, x, sig, cond):
        return self.transformer(x) * (2.0 if self.mode else 1.0)  # [B, 2]


def test_measure_times_after_the_warm_up_reports_medians_rows_and_the_max_gradient_gap(monkeypatch):
    """``measure``: per mode, the median of ``repeat`` timed passes after one untimed warm-up, the rows the
    transformer is fed per forward (not summed over passes), and the max |Δ| of the LoRA gradients against mode 1."""
    import flowalign.bench_memory as BM

    # per pass (forward s, backward s): a slow warm-up, then three timed passes with an outlier
    durations = iter([(100, 100), (1, 10), (2, 20), (9, 90), (100, 100), (4, 40), (5, 50), (6, 60)])
    clock = {"t": 0.0, "phase": 0, "cur": None}

    def perf_counter():  # called at t0, t1, t2 of every pass
        if clock["phase"] == 0:
            clock["cur"] = next(durations)
        elif clock["phase"] == 1:
            clock["t"] += clock["cur"][0]
        else:
            clock["t"] += clock["cur"][1]
        clock["phase"] = (clock["phase"] + 1) % 3
        return clock["t"]

    monkeypatch.setattr(BM, "time", pytypes.SimpleNamespace(perf_counter=perf_counter))
    torch.manual_seed(0)
    model = _MeasuredModel()
    off, on = BM.measure(model, "p", 3, repeat=3, seed=5)
    assert (off["forward_s"], off["backward_s"], on["forward_s"], on["backward_s"]) == (2, 20, 5, 50)
    assert off["rows_per_forward"] == on["rows_per_forward"] == 3 and off["cuda_peak_bytes"] is None
    x = torch.randn((3, 2), generator=torch.Generator().manual_seed(5))  # [3, 2], measure's input
    w = model.transformer.weight.detach().clone().requires_grad_(True)
    (g1,) = torch.autograd.grad((x @ w.T).pow(2).mean(), w)  # [2, 2]
    (g2,) = torch.autograd.grad((2 * (x @ w.T)).pow(2).mean(), w)  # [2, 2]
    assert off["grad_max_abs_diff"] == 0.0
    assert on["grad_max_abs_diff"] == pytest.approx(float((g2 - g1).abs().max()), rel=1e-6)
    assert model.mode is False  # checkpointing switched back off
