"""The GRPO update path and its bookkeeping (flowalign/train.py): clipping off, on-policy ratio with kernel options,
metrics over pairs, EMA resume after a skipped step, the zero-std filter per rollout, empty updates, two ranks."""

import contextlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flowalign import config as C
from flowalign.models.lora import WEIGHT_NAME

ROOT = Path(__file__).resolve().parents[1]

SMALL = [
    "train.iterations=2", "train.groups_per_iter=2", "train.group_size=4", "train.micro_batch=8",
    "train.checkpoint_every=1", "train.keep_checkpoints=0", "sampler.steps=4", "eval.steps=4", "eval.max_prompts=2",
    "eval.seeds_per_prompt=1", "eval.grid_prompts=2", "output.tensorboard=false", "train.lr=1e-3",
    "eval.before=false", "eval.after=false", "train.optimizer_steps_per_iter=2",
]


def _cfg(run, *extra):
    return C.load_config(str(ROOT / "configs" / "shapes_grpo.yaml"), [*SMALL, f"output.run_dir={run}", *extra])


# ------------------------------------------------------------------ a tiny stand-in for the update's inputs


class _Lin(torch.nn.Module):
    """v(x) = w·x: one trainable scalar, so gradients and ratios are easy to read."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.ref = False

    def velocity(self, x, sigma, cond):
        return (0.5 if self.ref else self.w) * x  # [n, D]

    @contextlib.contextmanager
    def reference(self):
        self.ref = True
        try:
            yield
        finally:
            self.ref = False


def _update_inputs(B=3, T=2, D=4, shift=None):
    """A model, optimizer, trajectory and pairs whose stored log-probs are the on-policy ones (+ ``shift`` [B])."""
    from flowalign.samplers import step_log_prob
    from flowalign.values import NFECounter

    model = _Lin()
    nfe = NFECounter(model)
    opt = torch.optim.SGD([model.w], lr=0.1)
    # a local generator: the two-rank tests build these inputs on two threads at once (the global RNG would race)
    latents = torch.randn(B, T + 1, D, generator=torch.Generator().manual_seed(0))  # [B, T+1, D]
    sigmas = torch.tensor([1.0, 0.6, 0.0])  # [T+1]
    eta = torch.tensor([0.7, 0.0])  # [T]
    cond = {"c": torch.zeros(B, 1)}
    b = torch.arange(B)
    with torch.no_grad():
        logp, _ = step_log_prob(model.velocity, latents[:, 0], latents[:, 1], sigmas[[0] * B], sigmas[[1] * B],
                                eta[[0] * B], cond, kernel="flow_sde")
    log_probs = torch.zeros(B, T)  # [B, T]
    log_probs[:, 0] = logp - (shift if shift is not None else 0.0)
    traj = SimpleNamespace(latents=latents, sigmas=sigmas, eta=eta, log_probs=log_probs, cond=cond, cond_index=b,
                           velocities=None)
    advs = {"main": torch.ones(B, T)}  # [B, T]
    pairs = torch.stack([b, torch.zeros(B, dtype=torch.long)], 1)  # [B, 2] (rollout, step 0)
    return model, nfe, opt, traj, advs, pairs


def _tr(**kw):
    train = dict(optimizer_steps_per_iter=1, micro_batch=2, clip_range=0.2, beta_kl=0.0, kl_form="exact",
                 max_grad_norm=1.0, surrogate="clipped")
    train.update(kw)
    sampler = SimpleNamespace(kernel="flow_sde", logp_reduce="mean", logp_form="exact", plan_options={})
    return SimpleNamespace(train=SimpleNamespace(**train), sampler=sampler)


# ------------------------------------------------------------------ tests


def test_max_grad_norm_zero_means_no_clipping():
    """train.max_grad_norm=0 is documented as "off"; clip_grad_norm_(…, 0) would scale every gradient to 0."""
    from flowalign.train import _optimizer_step

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 0.0, 4.0])
    opt = torch.optim.SGD([p], lr=1.0)
    out, logs = {"train/skipped_updates": 0, "_steps_taken": 0}, {}
    _optimizer_step(opt, True, lambda t: t, SimpleNamespace(max_grad_norm=0.0), logs, out)
    assert torch.equal(p.detach(), torch.tensor([-3.0, 0.0, -4.0]))  # the full gradient step
    assert out["_steps_taken"] == 1 and logs["grad_norm"] == [5.0]


def test_ratio_metrics_are_means_over_pairs_not_over_micro_batches():
    """3 pairs in micro-batches of 2 + 1: the clip fraction is 2/3 (pairs), not (1/2 + 1)/2 (micro-batch means)."""
    from flowalign.train import _update

    model, nfe, opt, traj, advs, pairs = _update_inputs(shift=torch.tensor([1.0, 0.0, 1.0]))  # ρ = e, 1, e
    out = _update(_tr(), model, opt, traj, advs, pairs, lambda t: t, nfe, skip=False)
    assert out["train/clipfrac_high"] == pytest.approx(2 / 3)
    assert out["train/ratio_mean"] == pytest.approx((2 * torch.e + 1) / 3, rel=1e-5)
    assert out["train/approx_kl"] == pytest.approx(0.5 * 2 / 3, rel=1e-5)


def _two_ranks(monkeypatch, work):
    """Run ``work(rank, reduce_mean)`` on two threads that all-reduce (mean) through a barrier, as two processes would;
    returns each rank's result and its list of collective shapes. torch.distributed reads as initialised, so the
    update takes its multi-rank path."""
    import threading

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    barrier, slots = threading.Barrier(2, timeout=60), [None, None]
    results, calls, errors = [None, None], [[], []], []

    def reduce_mean_of(rank):
        def reduce_mean(t):
            calls[rank].append(tuple(t.shape))
            slots[rank] = t.detach().clone()
            barrier.wait()  # a collective the other rank does not join times out here (BrokenBarrierError)
            mean = (slots[0] + slots[1]) / 2
            barrier.wait()
            t.copy_(mean)
            return t
        return reduce_mean

    def run(rank):
        try:
            results[rank] = work(rank, reduce_mean_of(rank))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results, calls


def _one_process_step(pairs_slice=slice(None), **tr):
    from flowalign.train import _update

    model, nfe, opt, traj, advs, pairs = _update_inputs(B=3, shift=torch.tensor([0.3, -0.2, 0.1]))
    _update(_tr(**tr), model, opt, traj, advs, pairs[pairs_slice], lambda t: t, nfe, skip=False)
    return model.w.detach().clone()


@pytest.mark.parametrize("split", [2, 0])
def test_two_ranks_take_the_step_one_process_takes_on_their_pairs(monkeypatch, split):
    """Rank 0 holds pairs [:split], rank 1 the rest (split = 0: rank 0 has none, as zero-std filtering can leave it).
    The update is the mean over all pairs, not the mean of the ranks' means (which weighed rank 1's single pair like
    rank 0's two); a rank without pairs joins every collective of the other, and both end with the same weights."""
    from flowalign.train import _update

    def work(rank, reduce_mean):
        model, nfe, opt, traj, advs, pairs = _update_inputs(B=3, shift=torch.tensor([0.3, -0.2, 0.1]))
        mine = pairs[:split] if rank == 0 else pairs[split:]
        _update(_tr(max_grad_norm=0.0), model, opt, traj, advs, mine, reduce_mean, nfe, skip=False)
        return model.w.detach().clone()

    (w0, w1), calls = _two_ranks(monkeypatch, work)
    assert calls[0] == calls[1]  # the same collectives, in the same order
    assert torch.equal(w0, w1)
    assert torch.allclose(w0, _one_process_step(max_grad_norm=0.0), rtol=0, atol=1e-6)


def test_no_rank_with_pairs_means_no_step_on_any_rank(monkeypatch):
    """Every rank tied in a step: all of them skip it together (no AdamW drift), agreeing through one all-reduce."""
    from flowalign.train import _update

    def work(rank, reduce_mean):
        model, nfe, opt, traj, advs, pairs = _update_inputs()
        opt = torch.optim.AdamW([model.w], lr=0.1, weight_decay=0.1)
        model.w.grad = torch.ones_like(model.w)
        opt.step()  # momentum that an empty step would apply
        w = model.w.detach().clone()
        out = _update(_tr(), model, opt, traj, advs, pairs[:0], reduce_mean, nfe, skip=False)
        return torch.equal(model.w.detach(), w), out["_steps_taken"]

    results, calls = _two_ranks(monkeypatch, work)
    assert results == [(True, 0), (True, 0)] and calls[0] == calls[1] == [(2,)]


def test_one_rank_with_a_nonfinite_reward_makes_every_rank_skip(monkeypatch):
    """A non-finite reward on one rank (skip=True there) skips the update on both, with the same collectives."""
    from flowalign.train import _update

    def work(rank, reduce_mean):
        model, nfe, opt, traj, advs, pairs = _update_inputs()
        w = model.w.detach().clone()
        out = _update(_tr(), model, opt, traj, advs, pairs if rank else pairs[:0], reduce_mean, nfe, skip=rank == 0)
        return torch.equal(model.w.detach(), w), out["train/skipped_updates"]

    results, calls = _two_ranks(monkeypatch, work)
    assert results == [(True, 1), (True, 1)] and calls[0] == calls[1]


def test_first_update_is_on_policy_with_a_kernel_option(tmp_path):
    """A kernel keyword set through sampler.plan_options (flow_sde's sigma_1) reaches the re-scoring too: ρ ≡ 1."""
    from flowalign.train import train

    run = train(_cfg(tmp_path / "run", "train.iterations=1", "train.micro_batch=1000", "train.filter_zero_std=false",
                     "train.shuffle_transitions=false", "train.optimizer_steps_per_iter=1",
                     "sampler.plan_options.sigma_1=0.9", "train.beta_kl=0.1"))
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(m["train/ratio_mean"] - 1) < 1e-5 and m["train/clipfrac_high"] == 0 and m["train/clipfrac_low"] == 0
    assert m["train/approx_kl"] < 1e-10
    assert m["train/kl"] == 0.0  # the reference (adapter off) equals the policy at init, with the same kernel option


def test_ema_resume_is_exact_after_a_skipped_update(tmp_path, monkeypatch):
    """The EMA's step counter n counts optimizer steps taken; a skipped (NaN) update before a checkpoint must not
    shift it on resume (iteration × steps per iteration is not the count)."""
    from flowalign import train as T
    from safetensors.torch import load_file

    real = T.UPDATES["grpo"]
    calls = {"n": 0}

    def first_skipped(*args, skip, **kw):
        calls["n"] += 1
        return real(*args, skip=skip or calls["n"] == 1, **kw)

    monkeypatch.setitem(T.UPDATES, "grpo", first_skipped)
    ema = ["train.ema=true", "train.ema_every=1"]
    full = T.train(_cfg(tmp_path / "full", *ema))
    calls["n"] = 0
    cut = T.train(_cfg(tmp_path / "cut", *ema, "train.iterations=1"))
    calls["n"] = 1  # the resumed run does not skip: iteration 2 is its first update
    T.train(_cfg(tmp_path / "cut", *ema, "output.resume=true"))
    a = load_file(str(full / "checkpoints" / "step-2" / WEIGHT_NAME))  # the EMA weights
    b = load_file(str(cut / "checkpoints" / "step-2" / WEIGHT_NAME))
    ra = load_file(str(full / "checkpoints" / "step-2" / "raw" / WEIGHT_NAME))
    rb = load_file(str(cut / "checkpoints" / "step-2" / "raw" / WEIGHT_NAME))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)  # the training itself resumed exactly
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_std_filter_drops_rollouts_not_single_zero_advantage_steps(tmp_path, monkeypatch):
    """train.filter_zero_std drops rollouts whose advantage is 0 at every trained step (METHODS.md §3.3); a kept
    rollout's step whose dense advantage happens to be 0 stays in S (it counts in the mean and carries the KL)."""
    from flowalign import credit as CR
    from flowalign.train import train

    seen = {}

    def holes(inp):
        adv = CR.outcome(inp).advantages.clone()  # [B, T]
        adv[:, 0] = 0.0  # a dense credit may give exactly 0 at one step of every rollout
        seen["rows"] = int((adv != 0).any(1).sum())
        seen["steps"] = int(inp.trained[0].sum())
        return CR.Credit(advantages=adv)

    monkeypatch.setitem(CR.CREDIT, "review_holes", holes)
    run = train(_cfg(tmp_path / "run", "train.iterations=1", "credit.name=review_holes"))
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert seen["steps"] == 2 and seen["rows"] > 0
    assert m["train/transitions"] == seen["rows"] * seen["steps"]


def test_atomic_dir_rewrite_never_leaves_the_target_missing(tmp_path, monkeypatch):
    """Rewriting an existing directory: a reader always finds ``path`` (old or new contents, never nothing)."""
    import os

    from flowalign import io

    probe = [tmp_path / "x", tmp_path / "y"]
    for d in probe:
        d.mkdir()
    if not io._exchange(*probe):
        pytest.skip("this platform or filesystem has no atomic directory exchange (renameat2)")
    for d in probe:
        d.rmdir()
    target = tmp_path / "step-3"
    target.mkdir()
    (target / "a").write_text("old")
    real = os.replace
    seen = []

    def spy(src, dst):
        real(src, dst)
        seen.append(target.is_dir())

    monkeypatch.setattr(os, "replace", spy)
    with io.atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert all(seen)
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step-3"]


def test_atomic_dir_falls_back_to_two_renames(tmp_path, monkeypatch):
    from flowalign import io

    monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    for text in ("first", "second"):  # a new directory, then a rewrite
        with io.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text(text)
        assert (tmp_path / "d" / "f").read_text() == text and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_an_update_without_pairs_leaves_the_weights_alone():
    """Every group tied (all pairs filtered): nothing to learn, so AdamW must not move the weights on its momentum
    and weight decay, nor count an optimizer step (the EMA's n), as the nft update already does."""
    from flowalign.train import _update

    model, nfe, opt, traj, advs, pairs = _update_inputs()
    opt = torch.optim.AdamW([model.w], lr=0.1, weight_decay=0.1)
    out = _update(_tr(), model, opt, traj, advs, pairs, lambda t: t, nfe, skip=False)  # a real step: momentum
    assert out["_steps_taken"] == 1
    w = model.w.detach().clone()
    out = _update(_tr(), model, opt, traj, advs, pairs[:0], lambda t: t, nfe, skip=False)
    assert torch.equal(model.w.detach(), w) and out["_steps_taken"] == 0 and out["train/skipped_updates"] == 0


def test_two_processes_with_zero_std_filtering_when_one_rank_has_no_pairs(tmp_path):
    """The shipped shapes config under 2 processes with train.filter_zero_std on (its default): with this seed rank
    0's only group is tied in iteration 1, so rank 0 has no pairs while rank 1 has some. It used to abort with a
    gloo "collective mismatch" (rank 0 skipped the gradient all-reduce)."""
    import os
    import shutil
    import subprocess
    import sys

    acc = Path(sys.executable).parent / "accelerate"
    if not acc.exists() and shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not installed")
    run = tmp_path / "run"
    cmd = [str(acc) if acc.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flowalign.cli", "train",
           str(ROOT / "configs" / "shapes_grpo.yaml"), f"output.run_dir={run}", "train.iterations=3",
           "train.groups_per_iter=2", "train.group_size=4", "sampler.steps=4", "eval.before=false", "eval.after=false",
           "output.tensorboard=false", "train.lr=1e-2", "train.clip_range=0.2", "train.filter_zero_std=true",
           "train.checkpoint_every=3", "train.micro_batch=4", "train.optimizer_steps_per_iter=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # the mean over the ranks, each holding one group: rank 0's tied group kept nothing in iteration 1 (the case under
    # test), rank 1 kept all its rollouts
    assert lines[0]["train/kept_fraction"] == 0.5
    assert lines[-1]["dist/max_weight_diff"] == 0.0


def test_per_frame_options_on_an_image_model_are_reported_not_silently_dropped(tmp_path, caplog):
    """reward.per_frame only applies to video models; on the shapes model it is ignored, and the log says so."""
    import logging

    from flowalign.train import train

    with caplog.at_level(logging.WARNING, logger="flowalign.train"):
        train(_cfg(tmp_path / "run", "train.iterations=1", "reward.per_frame={stride: 2}"))
    assert any("reward.per_frame is set, but shapes makes images" in r.getMessage() for r in caplog.records)


def test_random_trained_steps_are_per_rollout_subsets_of_the_stochastic_steps():
    """sampler.train_steps=random (DanceGRPO, METHODS §3.5): each rollout trains ⌊(T−1)·f⌋ = 9 of steps 0…T−2 at
    T = 16, f = 0.6; never the last step or an ODE step; rollouts differ; the draw is a function of the generator."""
    from flowalign.train import TRAINED_STEPS

    pick = TRAINED_STEPS["random"]
    eta = torch.full((16,), 0.3)
    eta[-1] = 0.0
    m = pick(eta, 0.6, 64, torch.Generator().manual_seed(5))  # [64, 16]
    assert m.shape == (64, 16) and m.dtype == torch.bool
    assert torch.equal(m.sum(1), torch.full((64,), 9)) and not m[:, 15].any()
    assert len({tuple(r.tolist()) for r in m}) > 1 and m[:, :15].all(0).logical_not().all()  # every step sometimes skipped
    assert torch.equal(m, pick(eta, 0.6, 64, torch.Generator().manual_seed(5)))
    eta[3:6] = 0.0  # ODE steps (a window-less plan with Euler steps) are never trained
    m = pick(eta, 0.6, 64, torch.Generator().manual_seed(6))
    assert not m[:, 3:6].any() and torch.equal(m.sum(1), torch.full((64,), 9))
    eta[:12] = 0.0  # fewer stochastic steps than ⌊(T−1)·f⌋: all of them
    assert torch.equal(pick(eta, 0.6, 4, torch.Generator().manual_seed(7)), (eta > 0)[None].expand(4, -1) & (torch.arange(16) < 15))
    first = TRAINED_STEPS["first"](torch.full((10,), 0.7), 0.99, 3)  # Flow-GRPO: the first ⌊0.99·10⌋ = 9, in order
    assert first[:, :9].all() and not first[:, 9].any()


@pytest.mark.parametrize("extra, needle", [
    (["sampler.train_steps=random", "sampler.window_size=2"], "sampler.train_steps=random draws the trained steps"),
    (["sampler.train_steps=random", "sampler.plan=branch", "train.group_size=2"], "needs sampler.plan=chain"),
    (["sampler.train_steps=random", "sampler.train_fraction=0.2"], r"floor\(sampler.train_fraction=0.2 x \(sampler.steps - 1\)=3\) = 0"),
])
def test_random_trained_steps_config_errors(tmp_path, extra, needle):
    from flowalign.errors import UserError

    with pytest.raises(UserError, match=needle):
        _cfg(tmp_path / "run", *extra)


def test_trainer_trains_a_random_subset_of_steps_per_rollout(tmp_path):
    """Outcome credit on every rollout (filter off): T = 4, f = 0.5 → ⌊0.5·3⌋ = 1 step per rollout (first: 2 steps),
    so 8 rollouts give 8 transitions; the shipped Wan config selects DanceGRPO's random steps."""
    from flowalign.train import train

    extra = ["train.iterations=1", "train.filter_zero_std=false", "sampler.train_fraction=0.5", "train.micro_batch=4"]
    got = {}
    for mode in ("random", "first"):
        run = train(_cfg(tmp_path / mode, *extra, f"sampler.train_steps={mode}"))
        got[mode] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train/transitions"]
    assert got == {"random": 8, "first": 16}
    wan = C.load_config(str(ROOT / "configs" / "wan21_hps.yaml"))
    assert wan.sampler.train_steps == "random" and C.trained_steps(wan.sampler) == 11


def test_model_resolution_reaches_the_loader(tiny_sd3_dir, tmp_path, monkeypatch):
    """model.resolution was validated and printed but never passed on: every family loaded at its default size
    (the Wan config's 512 px ran at 480 x 832). Now it is the loader's height = width; the shapes model, whose size
    its weights fix, and a second size in model.kwargs are one-line errors before anything is written."""
    import flowalign.train as T
    from flowalign.errors import UserError

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    loaded = []
    real = T.load_model
    monkeypatch.setattr(T, "load_model", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    base = ["model.name=sd3", f"model.path={tiny_sd3_dir}", "model.resolution=48", "sampler.steps=2",
            "reward.weights={saturation: 1.0}", f"data.train_prompts={prompts}", "eval.rewards=[saturation]",
            "eval.before=false", "eval.after=false", "train.iterations=1", "train.groups_per_iter=1",
            "train.group_size=2", "train.micro_batch=2", "train.optimizer_steps_per_iter=1", "train.ema=false",
            "output.tensorboard=false"]
    T.train(C.load_config(None, [*base, f"output.run_dir={tmp_path / 'run'}"]))
    assert (loaded[0].height, loaded[0].width, tuple(loaded[0].latent_shape[1:])) == (48, 48, (24, 24))
    for extra, needle in ((["model.kwargs={height: 32}"], "both set the image size"),
                          (["model.name=shapes", "model.path=", "reward.weights={shapes_partial: 1.0}"],
                           "fixed by its weights")):
        with pytest.raises(UserError, match=needle):
            T.train(C.load_config(None, [*base, *extra, f"output.run_dir={tmp_path / 'bad'}"]))
        assert not (tmp_path / "bad").exists()


def test_evaluating_on_the_training_prompts_is_reported(tmp_path, caplog):
    """One prompt file for training and evaluation (the PickScore configs without the unshipped train split): a
    warning; the shapes world's partial overlap (small tasks whose whole prompt space is in shapes-train): a note."""
    import logging

    from flowalign.train import train

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    with caplog.at_level(logging.INFO, logger="flowalign.train"):
        train(_cfg(tmp_path / "same", "train.iterations=1", f"data.train_prompts={prompts}",
                   f"data.eval_prompts={prompts}", "eval.after=true"))
    hits = [r for r in caplog.records if "of the evaluation prompts" in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.WARNING and hits[0].getMessage().startswith("100% ")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flowalign.train"):
        train(_cfg(tmp_path / "shapes", "train.iterations=1", "eval.after=true"))
    hits = [r for r in caplog.records if "of the evaluation prompts" in r.getMessage()]
    assert len(hits) == 1 and hits[0].levelno == logging.INFO


def test_logged_update_statistics_and_nfe_are_over_all_ranks(monkeypatch):
    """METHODS §3.6: logged statistics are reduced across ranks (they were rank 0's): the update's per-pair means
    weighted by each rank's pairs (a rank without pairs counts for nothing), fractions averaged, the skip flag any
    rank's; nfe/* become totals over the ranks, folded into each counter so a checkpoint keeps them."""
    from flowalign.train import _reduce_metrics, _sync_nfe
    from flowalign.values import NFECounter

    per_rank = [
        {"train/transitions": 3, "train/approx_kl": 1.0, "train/clipfrac_high": 0.0, "train/clipfrac_low": 0.0,
         "train/ratio_mean": 1.0, "train/policy_loss": 2.0, "train/kl": 0.0, "train/kept_fraction": 0.5,
         "reward/zero_std_ratio": 0.5, "train/nonfinite_inputs": 0, "credit/main_abs_mean": 1.0,
         "reward/nan_rows": 2},
        {"train/transitions": 0, "train/kept_fraction": 0.0, "reward/zero_std_ratio": 1.0,
         "train/nonfinite_inputs": 1, "credit/main_abs_mean": 0.0, "reward/nan_rows": 1},
    ]
    per_rank_b = [dict(per_rank[0]), {**per_rank[0], "train/transitions": 1, "train/approx_kl": 5.0}]

    def work(rank, reduce_mean):
        m, mb = dict(per_rank[rank]), dict(per_rank_b[rank])
        _reduce_metrics(m, "grpo", reduce_mean, 2)
        _reduce_metrics(mb, "grpo", reduce_mean, 2)
        model = SimpleNamespace(velocity=lambda x, s, c: x)
        nfe = NFECounter(model)
        seen = dict(nfe.totals())
        with nfe.phase("sampling"):
            model.velocity(torch.zeros(4 + rank, 1), None, None)  # 4 and 5 forwards
        with nfe.phase("training"):
            model.velocity(torch.zeros(3 * (1 - rank), 1), None, None)  # rank 1 trains nothing
        seen = _sync_nfe(nfe, seen, reduce_mean, 2)
        first = dict(nfe.totals())
        with nfe.phase("sampling"):
            model.velocity(torch.zeros(1, 1), None, None)
        _sync_nfe(nfe, seen, reduce_mean, 2)
        return m, mb, first, dict(nfe.totals())

    (r0, r1), _ = _two_ranks(monkeypatch, work)
    for m, mb, first, last in (r0, r1):
        assert m["train/approx_kl"] == 1.0 and m["train/policy_loss"] == 2.0  # rank 1 had no pairs: weight 0
        assert m["train/kept_fraction"] == 0.25 and m["reward/zero_std_ratio"] == 0.75
        assert m["train/nonfinite_inputs"] == 1 and m["credit/main_abs_mean"] == 0.5
        assert m["reward/nan_rows"] == 3  # a count: summed over the ranks
        assert mb["train/approx_kl"] == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)  # weighted by pairs, not 3.0
        assert m["train/transitions"] == 3 and mb["train/transitions"] == 4  # all ranks' pairs
        assert first == {"sampling": 9, "training": 3} and last == {"sampling": 11, "training": 3}


def test_calibrated_eta_file_must_match_the_kernel_and_the_sigma_grid(tmp_path):
    """A `flowalign calibrate` file holds dance_sde noise ψ_t on one sigma grid. Under flow_sde (the shapes config's
    kernel) ψ was read as Flow-GRPO's a, and a file from another model/shift/step count was used as is."""
    from flowalign.errors import UserError
    from flowalign.models import load_model
    from flowalign.train import train

    grid = load_model("shapes").schedule(4).tolist()
    f = tmp_path / "eta.json"
    f.write_text(json.dumps({"kernel": "dance_sde", "eta": [0.3, 0.3, 0.2, 0.0], "sigmas": grid}))
    base = ["train.iterations=1", f"sampler.eta_file={f}"]
    with pytest.raises(UserError, match="holds dance_sde noise levels but sampler.kernel=flow_sde"):
        train(_cfg(tmp_path / "a", *base))
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"kernel": "dance_sde", "eta": [0.3, 0.3, 0.2, 0.0], "sigmas": [1.0, 0.9, 0.6, 0.3, 0.0]}))
    with pytest.raises(UserError, match="calibrated on another sigma grid"):
        train(_cfg(tmp_path / "b", "train.iterations=1", f"sampler.eta_file={bad}", "sampler.kernel=dance_sde"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    run = train(_cfg(tmp_path / "c", *base, "sampler.kernel=dance_sde"))
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train/transitions"] > 0


def test_an_eta_file_calibrated_at_another_cfg_scale_warns(tmp_path, caplog):
    """ψ_t balances reward gains measured under one CFG scale (the file records it since `flowalign calibrate` writes
    `guidance`); at another scale the file still fits the kernel and grid, so it is used, with a warning."""
    import logging

    from flowalign.config import load_config
    from flowalign.train import _load_eta

    f = tmp_path / "eta.json"
    f.write_text(json.dumps({"kernel": "dance_sde", "eta": [0.3, 0.2, 0.1, 0.0], "guidance": 4.0}))
    cfg = load_config(None, [f"sampler.eta_file={f}", "sampler.kernel=dance_sde", "sampler.steps=4"])
    with caplog.at_level(logging.WARNING, logger="flowalign.train"):
        assert _load_eta(cfg, guidance=4.0).tolist() == pytest.approx([0.3, 0.2, 0.1, 0.0])
        assert not caplog.records
        _load_eta(cfg, guidance=1.0)
    assert any("calibrated at CFG scale 4 and this run samples at 1" in r.getMessage() for r in caplog.records)


def test_options_of_a_reward_that_is_not_used_are_reported(tmp_path, caplog):
    import logging

    from flowalign.train import _check_components

    with caplog.at_level(logging.WARNING, logger="flowalign.train"):
        _check_components(_cfg(tmp_path / "run", "reward.kwargs={saturation: {}}"))
    assert any("reward.kwargs.saturation is set, but saturation is neither" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("eta, needle", [
    (["0.3", 0.3, 0.2, 0.0], "eta[0] = '0.3'"),
    ([0.3, float("nan"), 0.2, 0.0], "eta[1] = nan"),
    ([0.3, 0.3, -0.2, 0.0], "eta[2] = -0.2"),
    ({"0": 0.3}, "must be a list"),
])
def test_an_eta_file_with_a_bad_noise_level_is_one_line_before_the_run(tmp_path, eta, needle):
    """A string, NaN or negative ψ_t used to pass (a traceback from float(), or NaN noise in every rollout)."""
    from flowalign.errors import UserError
    from flowalign.train import train

    f = tmp_path / "eta.json"
    f.write_text(json.dumps({"kernel": "dance_sde", "eta": eta}))
    with pytest.raises(UserError, match=re.escape(needle)):
        train(_cfg(tmp_path / "run", "train.iterations=1", f"sampler.eta_file={f}", "sampler.kernel=dance_sde"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ states shared by several rollouts


def test_state_classes_are_exact_repeats_of_step_prompt_and_bits():
    from flowalign.train import state_classes

    lat = torch.randn(5, 3, 2, 4, generator=torch.Generator().manual_seed(1))  # [B, T+1, *latent]
    lat[1, 1] = lat[0, 1]  # a branch child: its parent's state
    lat[2, 1] = lat[0, 1]
    lat[2, 1, 0, 0] = torch.nextafter(lat[2, 1, 0, 0], torch.tensor(float("inf")))  # one ulp away: another state
    lat[3, 1] = lat[0, 1]  # the same bits for another prompt: another state
    lat[4, 0] = lat[0, 1]  # the same bits at another step: another state
    cond_index = torch.tensor([0, 0, 0, 1, 0])
    pairs = torch.tensor([[0, 1], [1, 1], [2, 1], [3, 1], [4, 0], [1, 1]])  # the last: a pair seen twice
    assert state_classes(lat, cond_index, pairs).tolist() == [0, 0, 2, 3, 4, 0]
    nan = lat.clone()
    nan[:, 1] = float("nan")  # NaN bits never compare equal: every row stays its own state (no silent merge)
    assert state_classes(nan, torch.zeros(5, dtype=torch.long), pairs[:3]).tolist() == [0, 1, 2]


def test_micro_batches_keep_a_states_pairs_together_and_are_the_plain_split_without_repeats():
    from flowalign.train import shared_micro_batches

    plain = shared_micro_batches(torch.arange(7), 3)
    assert [p.tolist() for p in plain] == [p.tolist() for p in torch.split(torch.arange(7), 3)]
    packed = shared_micro_batches(torch.tensor([0, 1, 0, 3, 1, 5, 0]), 2)  # states 0, 1 | 3, 5
    assert [p.tolist() for p in packed] == [[0, 2, 6, 1, 4], [3, 5]]


def test_branch_children_are_rescored_once_per_state_with_the_same_update(tmp_path, monkeypatch):
    """TempFlow-GRPO / G²RPO children of one branch step share x_k: one forward (and backward) per state gives the
    weights of one forward per child, with children-fold fewer training forwards; on-policy ratio 1 either way.
    With two optimizer steps the pairs of each step are those of the plain run (the shuffle is not changed), and the
    children of a state that share a step share its forward."""
    from safetensors.torch import load_file

    import flowalign.train as T

    def run(name, *extra):
        cfg = _cfg(tmp_path / name, "sampler.plan=branch", "sampler.plan_options.children=4",
                   "sampler.plan_options.branch_steps=all", "credit.name=branch", "train.group_size=8",
                   "train.iterations=1", "train.micro_batch=6", "train.filter_zero_std=false", *extra)
        out = T.train(cfg)
        m = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        return load_file(str(out / "checkpoints" / "step-1" / WEIGHT_NAME)), m

    one_step = "train.optimizer_steps_per_iter=1"
    shared, m_shared = run("shared", one_step)
    _, m_two = run("shared_two_steps")  # SMALL's two optimizer steps per iteration
    with monkeypatch.context() as mp:
        mp.setattr(T, "state_classes", lambda latents, cond_index, pairs: torch.arange(pairs.shape[0]))
        per_row, m_rows = run("per_row", one_step)
    assert m_shared["train/transitions"] == m_rows["train/transitions"] == m_two["train/transitions"] > 0
    assert m_rows["nfe/training"] == 4 * m_shared["nfe/training"]  # 4 children per branch state
    assert m_shared["nfe/training"] < m_two["nfe/training"] < m_rows["nfe/training"]
    assert abs(m_shared["train/ratio_mean"] - 1) < 1e-5 and abs(m_rows["train/ratio_mean"] - 1) < 1e-5
    assert shared.keys() == per_row.keys()
    for k in shared:
        assert torch.allclose(shared[k], per_row[k], atol=1e-6, rtol=1e-4), k


def test_a_group_sharing_its_initial_noise_rescores_step_zero_once(tmp_path):
    """DanceGRPO's one initial noise per group (``sampler.init_noise=group``): the G members share x_0, so step 0
    costs one training forward per group, the later (diverged) steps one per member; on-policy ratio 1."""
    import flowalign.train as T

    cfg = _cfg(tmp_path / "run", "sampler.init_noise=group", "train.optimizer_steps_per_iter=1",
               "train.filter_zero_std=false", "train.iterations=1", "train.checkpoint_every=0")
    m = json.loads((T.train(cfg) / "metrics.jsonl").read_text().splitlines()[0])
    groups, g = cfg.train.groups_per_iter, cfg.train.group_size
    assert m["train/transitions"] > groups * g  # step 0 and later steps are trained
    assert m["nfe/training"] == m["train/transitions"] - groups * (g - 1)
    assert abs(m["train/ratio_mean"] - 1) < 1e-5


# ------------------------------------------------------------------ float16 loss scaling, EMA per step, group std


class _Half(torch.nn.Module):
    """v(x) = w·x computed in float16 (an fp16 transformer with an fp32 trainable weight, as model.dtype=float16)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def velocity(self, x, sigma, cond):
        return (self.w.half() * x.half()).float()  # [n, D]; the backward crosses float16 activations


def _half_step(scale):
    """One GRPO step with tiny advantages (1e-9: the order of SD3.5's output gradients) through float16."""
    from flowalign.train import LossScale, _update

    model, nfe, opt, traj, advs, pairs = _update_inputs()
    half = _Half()
    opt = torch.optim.SGD([half.w], lr=1e6)
    loss_scale = LossScale(enabled=scale is not None, init=scale or 1.0)
    out = _update(_tr(max_grad_norm=0.0), half, opt, traj, {"main": advs["main"] * 1e-9}, pairs, lambda t: t, nfe,
                  skip=False, loss_scale=loss_scale)
    return float(half.w.detach()) - 0.5, out, loss_scale


def test_float16_gradients_need_the_loss_scale_and_equal_fp32_with_it():
    from flowalign.train import _update

    model, nfe, opt, traj, advs, pairs = _update_inputs()
    opt = torch.optim.SGD([model.w], lr=1e6)
    _update(_tr(max_grad_norm=0.0), model, opt, traj, {"main": advs["main"] * 1e-9}, pairs, lambda t: t, nfe,
            skip=False)
    fp32 = float(model.w.detach()) - 0.5  # the fp32 reference step
    unscaled, _, _ = _half_step(None)
    scaled, out, ls = _half_step(2.0 ** 16)
    assert fp32 != 0 and unscaled == 0.0  # without scaling the fp16 backward underflows to exact zeros
    assert scaled == pytest.approx(fp32, rel=2e-3) and out["_steps_taken"] == 1 and ls.good == 1


def test_a_float16_overflow_skips_the_step_and_halves_the_scale():
    step, out, ls = _half_step(2.0 ** 60)  # the scaled gradient overflows float16
    assert step == 0.0 and out["_steps_taken"] == 0 and out["train/skipped_updates"] == 0
    assert out["train/overflow_steps"] == 1 and ls.scale == 2.0 ** 59


def test_loss_scale_grows_after_clean_steps_and_round_trips():
    from flowalign.train import LossScale

    ls = LossScale(enabled=True, init=8.0, growth_interval=2)
    for overflow in (False, False, False, True):
        ls.update(overflow)
    assert ls.scale == 8.0 and ls.good == 0  # 8 → 16 after two clean steps, 16 → 8 on the overflow
    again = LossScale(enabled=True)
    again.load_state_dict(ls.state_dict())
    assert again.state_dict() == ls.state_dict()
    off = LossScale(enabled=False)
    off.update(True)
    assert off.scale == 1.0


def test_the_ema_reads_each_optimizer_steps_own_weights():
    """METHODS §3.7 (Q4): EMA update n uses the weights after optimizer step n, not those after the iteration's last."""
    from flowalign.train import EMA, _update

    model, nfe, opt, traj, advs, pairs = _update_inputs()
    ema = EMA([model.w], decay_max=0.9, every=1)
    seen = []

    def on_step():
        seen.append(float(model.w.detach()))
        ema.update(len(seen) - 1)

    out = _update(_tr(optimizer_steps_per_iter=3, max_grad_norm=0.0), model, opt, traj, advs, pairs, lambda t: t,
                  nfe, skip=False, on_step=on_step)
    assert out["_steps_taken"] == 3 and len(set(seen)) == 3 and seen[-1] == float(model.w.detach())
    expect = 0.5
    for n, w in enumerate(seen):
        expect += (w - expect) * (1 - min((1 + n) / (10 + n), 0.9))
    assert float(ema.shadow[0]) == pytest.approx(expect, rel=1e-6)


def test_mean_group_std_is_the_mean_of_population_stds_over_finite_rewards():
    from flowalign.train import mean_group_std

    r = torch.tensor([0.0, 1.0, float("nan"), 2.0, 2.0, 5.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2])
    assert mean_group_std(r, g) == pytest.approx((0.5 + 0.0 + 0.0) / 3)


# ------------------------------------------------------------------ the update against its objective written out


def _all_steps_inputs(B=3, w=0.5, lr=0.1):
    """``_Lin`` starting at ``w`` on a trajectory whose T = 3 steps are all stochastic, with unequal Δ_t = σ_t − σ_{t+1}
    = 0.3, 0.25, 0.45; the stored log-probs are the policy's at ``w`` (ρ = 1 at the start) while the reference stays
    at 0.5. Pairs: every (rollout, step), row-major. SGD without momentum, so a step moves w by −lr·grad."""
    from flowalign.samplers import step_log_prob
    from flowalign.values import NFECounter

    T, D = 3, 4
    model = _Lin()
    model.w.data.fill_(w)
    nfe = NFECounter(model)
    opt = torch.optim.SGD([model.w], lr=lr)
    latents = torch.randn(B, T + 1, D, generator=torch.Generator().manual_seed(1))  # [B, T+1, D]
    sigmas = torch.tensor([1.0, 0.7, 0.45, 0.0])  # [T+1]
    eta = torch.tensor([0.7, 0.5, 0.6])  # [T]
    cond = {"c": torch.zeros(B, 1)}
    pairs = torch.cartesian_prod(torch.arange(B), torch.arange(T))  # [B·T, 2] (rollout, step)
    b, t = pairs.unbind(1)  # [B·T] each
    with torch.no_grad():
        logp, _ = step_log_prob(lambda x, s, c: w * x, latents[b, t], latents[b, t + 1], sigmas[t], sigmas[t + 1],
                                eta[t], cond, kernel="flow_sde")  # [B·T]
    traj = SimpleNamespace(latents=latents, sigmas=sigmas, eta=eta, log_probs=logp.reshape(B, T), cond=cond,
                           cond_index=torch.arange(B), velocities=None)
    return model, nfe, opt, traj, pairs


def _objective(w, traj, advs, pairs, *, form="exact", clip_range=0.2):
    """The update's per-pair terms written out for v = w·x (reference v = 0.5·x): the policy loss summed over the
    advantage heads, Σ_h max(−Â_h[b, t]·ρ, −Â_h[b, t]·clip(ρ, 1 ± ε)), and the KL mean_D((μ_θ − μ_ref)²)/(2s²), times
    Δ_t = σ_t − σ_{t+1} for kl_form=flow_grpo. Returns (policy [n], kl [n])."""
    from flowalign.samplers import step_log_prob

    b, t = pairs.unbind(1)  # [n] each
    x, x_next = traj.latents[b, t], traj.latents[b, t + 1]  # [n, D]
    sig, sig_next, eta = traj.sigmas[t], traj.sigmas[t + 1], traj.eta[t]  # [n]
    logp, trans = step_log_prob(lambda x_, s, c: w * x_, x, x_next, sig, sig_next, eta, None, kernel="flow_sde")
    _, ref = step_log_prob(lambda x_, s, c: 0.5 * x_, x, x_next, sig, sig_next, eta, None, kernel="flow_sde")
    ratio = torch.exp(logp - traj.log_probs[b, t])  # [n]
    pol = sum(torch.maximum(-a[b, t] * ratio, -a[b, t] * ratio.clamp(1 - clip_range, 1 + clip_range))
              for a in advs.values())  # [n]
    s2 = trans.std.reshape(len(b), -1)[:, 0] ** 2  # [n]
    kl = ((trans.mean - ref.mean.detach()) ** 2).flatten(1).mean(1) / (2 * s2)  # [n]
    return pol, (kl * (sig - sig_next) if form == "flow_grpo" else kl)


def _grad(w, traj, advs, pairs, *, beta=0.0, form="exact"):
    """d/dw of (Σ policy + β·Σ KL) / n over ``pairs`` (one optimizer step's loss, n = its pair count)."""
    w = torch.tensor(float(w), requires_grad=True)
    pol, kl = _objective(w, traj, advs, pairs, form=form)
    return float(torch.autograd.grad((pol.sum() + beta * kl.sum()) / pairs.shape[0], w)[0])


def test_each_optimizer_step_applies_only_its_own_chunks_gradient():
    """Two optimizer steps per iteration: step 2 moves w by its own chunk's gradient at the weights step 1 left, not
    by that plus step 1's (the gradients are zeroed before every step, not only before the first)."""
    from flowalign.train import _update

    model, nfe, opt, traj, pairs = _all_steps_inputs(B=2, lr=0.5)
    advs = {"main": torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])}  # [B, T]
    seen = []
    out = _update(_tr(optimizer_steps_per_iter=2, micro_batch=2, max_grad_norm=0.0), model, opt, traj, advs, pairs,
                  lambda t: t, nfe, skip=False, on_step=lambda: seen.append(float(model.w.detach())))
    first, second = pairs[:3], pairs[3:]  # tensor_split of the 6 pairs into the 2 steps
    g1 = _grad(0.5, traj, advs, first)
    w1 = 0.5 - 0.5 * g1
    w2 = w1 - 0.5 * _grad(w1, traj, advs, second)
    assert out["_steps_taken"] == 2 and abs(0.5 * g1) > 1e-2  # step 1's gradient is no rounding error
    assert seen == pytest.approx([w1, w2], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("form", ["flow_grpo", "exact"])
def test_the_kl_term_is_the_closed_form_and_pulls_towards_the_reference(form):
    """β-KL alone (zero advantages), w = 0.8 against the reference's 0.5: the logged train/kl is the mean over pairs of
    mean_D((μ_θ − μ_ref)²)/(2s²) (× Δ_t = σ_t − σ_{t+1} > 0 for flow_grpo, whose Δ_t differ per step), and the step
    is −lr·β·∇ Σ KL / n, which moves w towards 0.5."""
    from flowalign.loss import gaussian_kl
    from flowalign.samplers import step_log_prob
    from flowalign.train import _update

    model, nfe, opt, traj, pairs = _all_steps_inputs(w=0.8)
    advs = {"main": torch.zeros(3, 3)}  # [B, T]
    out = _update(_tr(beta_kl=0.5, kl_form=form, micro_batch=4, max_grad_norm=0.0), model, opt, traj, advs, pairs,
                  lambda t: t, nfe, skip=False)
    _, kl = _objective(torch.tensor(0.8), traj, advs, pairs, form=form)  # [9]
    _, exact = _objective(torch.tensor(0.8), traj, advs, pairs)  # [9]
    assert (kl > 0).all()
    if form == "flow_grpo":  # the factor Δ_t: 0.3, 0.25, 0.45 by step
        assert torch.allclose(kl, exact * torch.tensor([0.3, 0.25, 0.45]).repeat(3), rtol=1e-5)
    assert out["train/kl"] == pytest.approx(float(kl.mean()), rel=1e-5)
    # gaussian_kl as the trainer calls it (dt = σ_{t+1} − σ_t < 0) is this closed form
    b, t = pairs.unbind(1)  # [9] each
    args = (traj.latents[b, t], traj.latents[b, t + 1], traj.sigmas[t], traj.sigmas[t + 1], traj.eta[t], None)
    _, trans = step_log_prob(lambda x, s, c: 0.8 * x, *args)
    _, ref = step_log_prob(lambda x, s, c: 0.5 * x, *args)
    assert torch.allclose(gaussian_kl(trans.mean, ref.mean, trans.std, traj.sigmas[t + 1] - traj.sigmas[t], form=form),
                          kl, rtol=1e-5)
    w = float(model.w.detach())
    assert 0.5 < w < 0.8
    assert w == pytest.approx(0.8 - 0.1 * _grad(0.8, traj, advs, pairs, beta=0.5, form=form), rel=1e-5)


def test_advantage_heads_add_up_in_the_loss_and_the_step():
    """Two advantage heads: the policy loss is the sum of the heads' surrogates, so the logged policy_loss and the
    step (SGD, one optimizer step) are the sums of those of each head alone, not the last head's."""
    from flowalign.train import _update

    heads = {"a": torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0], [-0.5, 2.0, 1.5]]),  # [B, T]
             "b": torch.tensor([[0.3, 1.0, -1.5], [-2.0, 0.5, 2.5], [1.0, -0.75, 0.2]])}  # [B, T]
    got = {}
    for name, advs in (("a", {"a": heads["a"]}), ("b", {"b": heads["b"]}), ("both", heads)):
        model, nfe, opt, traj, pairs = _all_steps_inputs()
        out = _update(_tr(micro_batch=4, max_grad_norm=0.0), model, opt, traj, advs, pairs, lambda t: t, nfe,
                      skip=False)
        got[name] = (float(model.w.detach()) - 0.5, out["train/policy_loss"])
    assert abs(got["a"][0]) > 1e-3 and abs(got["b"][0]) > 1e-3
    assert got["both"][0] == pytest.approx(got["a"][0] + got["b"][0], rel=1e-5)
    assert got["both"][1] == pytest.approx(got["a"][1] + got["b"][1], rel=1e-5)
    assert got["both"][0] == pytest.approx(-0.1 * _grad(0.5, traj, heads, pairs), rel=1e-5)


def test_the_kl_is_summed_over_pairs_whatever_the_micro_batch():
    """loss = (Σ policy + β·Σ KL) / n: the KL of every pair counts once, so micro-batches of 1, 4 (4 + 4 + 1) or all 9
    pairs take the same step, −lr·β·∇ Σ KL / n (a per-micro-batch mean would shrink it by the micro-batch size)."""
    from flowalign.train import _update

    steps = []
    for micro_batch in (1, 4, 9):
        model, nfe, opt, traj, pairs = _all_steps_inputs(w=0.8)
        advs = {"main": torch.zeros(3, 3)}  # [B, T]
        out = _update(_tr(beta_kl=0.5, micro_batch=micro_batch, max_grad_norm=0.0), model, opt, traj, advs, pairs,
                      lambda t: t, nfe, skip=False)
        steps.append(float(model.w.detach()) - 0.8)
    expect = -0.1 * _grad(0.8, traj, advs, pairs, beta=0.5)
    assert abs(expect) > 1e-3 and out["train/kl"] > 0
    assert steps == pytest.approx([expect] * 3, rel=1e-5)


def test_max_grad_norm_limits_the_applied_step_and_logs_the_norm_before_clipping():
    """max_grad_norm = 1e-3 caps the gradient that SGD applies at norm 1e-3 (clip_grad_norm_'s g·c/(‖g‖ + 1e-6));
    the logged grad_norm is ‖g‖ before clipping; 0 applies the whole gradient."""
    from flowalign.train import _optimizer_step, _update

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 0.0, 4.0])
    opt = torch.optim.SGD([p], lr=1.0)
    out, logs = {"train/skipped_updates": 0, "_steps_taken": 0}, {}
    _optimizer_step(opt, True, lambda t: t, SimpleNamespace(max_grad_norm=1.0), logs, out)
    assert torch.allclose(p.detach(), torch.tensor([-0.6, 0.0, -0.8]), rtol=1e-5)  # the unit-norm step
    assert out["_steps_taken"] == 1 and logs["grad_norm"] == [5.0]

    advs = {"main": torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0], [-0.5, 2.0, 1.5]])}  # [B, T]
    got = {}
    for cap in (1e-3, 0.0):
        model, nfe, opt, traj, pairs = _all_steps_inputs(lr=1.0)
        out = _update(_tr(micro_batch=4, max_grad_norm=cap), model, opt, traj, advs, pairs, lambda t: t, nfe,
                      skip=False)
        got[cap] = (float(model.w.detach()) - 0.5, out["train/grad_norm"])
    g = _grad(0.5, traj, advs, pairs)
    assert abs(g) > 1e-1
    assert got[0.0][0] == pytest.approx(-g, rel=1e-5) and got[0.0][1] == pytest.approx(abs(g), rel=1e-5)
    assert got[1e-3][0] == pytest.approx(-g * 1e-3 / (abs(g) + 1e-6), rel=1e-4)
    assert got[1e-3][1] == pytest.approx(abs(g), rel=1e-5)


def test_each_pair_takes_the_advantage_of_its_own_rollout_and_step():
    """A dense advantage that differs by rollout and step: pair (b, t) is weighted by Â[b, t]. Steps 0 and 1 of each
    rollout, in shuffled order: the logged policy_loss (−mean Â at ρ = 1) and the step are those of the objective."""
    from flowalign.train import _update

    model, nfe, opt, traj, pairs = _all_steps_inputs()
    advs = {"main": torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0], [-0.5, 2.0, 1.5]])}  # [B, T]
    mine = pairs[pairs[:, 1] < 2][torch.tensor([3, 0, 5, 1, 4, 2])]  # [6, 2]
    out = _update(_tr(micro_batch=4, max_grad_norm=0.0), model, opt, traj, advs, mine, lambda t: t, nfe, skip=False)
    b, t = mine.unbind(1)
    assert out["train/policy_loss"] == pytest.approx(-float(advs["main"][b, t].mean()), rel=1e-5)
    expect = -0.1 * _grad(0.5, traj, advs, mine)
    assert abs(expect) > 1e-3
    assert float(model.w.detach()) - 0.5 == pytest.approx(expect, rel=1e-5)


# ------------------------------------------------------------------ the calibrated eta file across a resume


def _eta_file(file, eta, **extra):
    from flowalign.models import load_model

    grid = load_model("shapes").schedule(len(eta)).tolist()
    file.write_text(json.dumps({"kernel": "dance_sde", "eta": eta, "sigmas": grid, **extra}))
    return file


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_resume_refuses_an_eta_file_recalibrated_in_place_and_takes_the_runs_copy(tmp_path, monkeypatch):
    """config.yaml held only the eta file's path: recalibrating the file in place (`calibrate --overwrite`) and
    resuming went on silently with other noise levels, and a relative path resumed from another directory was not
    found. The run keeps a copy of the file; a resume whose file holds other etas is refused naming the copy, the
    copy resumes (its path may differ from the original's), and a missing relative path points at it."""
    from flowalign.errors import UserError
    from flowalign.train import ETA_COPY, train

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _eta_file(work / "psi.json", [0.3, 0.3, 0.2, 0.0])
    run = train(_cfg(tmp_path / "run", "train.iterations=1", "sampler.eta_file=psi.json", "sampler.kernel=dance_sde"))
    copy = run / ETA_COPY
    assert json.loads(copy.read_text())["eta"] == [0.3, 0.3, 0.2, 0.0]
    saved = C.load_config(str(run / "config.yaml"))
    assert saved.sampler.eta_file == "psi.json"

    _eta_file(work / "psi.json", [0.6, 0.5, 0.3, 0.0])  # recalibrated in place
    before = _tree_bytes(run)
    resume = ["output.resume=true", "train.iterations=2"]
    with pytest.raises(UserError, match=r"now holds other etas \(0\.6, 0\.5, 0\.3, 0\) than the run started with "
                                        r"\(0\.3, 0\.3, 0\.2, 0\)") as e:
        train(C.apply_overrides(saved, resume))
    assert str(copy) in str(e.value) and "\n" not in str(e.value)
    assert _tree_bytes(run) == before

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # psi.json is not here
    with pytest.raises(UserError, match=rf"'psi.json' not found .*resume with the run's copy, "
                                        rf"sampler.eta_file='{re.escape(str(copy))}'"):
        train(C.apply_overrides(saved, resume))
    assert _tree_bytes(run) == before

    done = train(C.apply_overrides(saved, [*resume, f"sampler.eta_file={copy}"]))
    lines = [json.loads(ln) for ln in (done / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "train/transitions" in r] == [1, 2]
    assert json.loads(copy.read_text())["eta"] == [0.3, 0.3, 0.2, 0.0]  # the copy is the run's, never rewritten


def test_an_eta_file_is_checked_before_the_model_loads_and_by_describe(tmp_path, monkeypatch):
    """A missing eta file, or one for another step count or kernel, was refused only after the model had loaded
    (minutes for SD3 or FLUX), and `train --describe` called such a config valid."""
    import flowalign.train as T
    from flowalign.errors import UserError

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the eta file was checked")

    monkeypatch.setattr(T, "load_model", no_load)
    four = _eta_file(tmp_path / "four.json", [0.3, 0.3, 0.2, 0.0])
    cases = [(["sampler.eta_file=" + str(tmp_path / "nope.json"), "sampler.kernel=dance_sde"], "not found"),
             ([f"sampler.eta_file={four}", "sampler.kernel=dance_sde", "sampler.steps=10"],
              "has 4 etas but sampler.steps=10; they must match (set sampler.steps=4, or calibrate with --steps 10)"),
             ([f"sampler.eta_file={four}"], "holds dance_sde noise levels but sampler.kernel=flow_sde")]
    for overrides, needle in cases:
        cfg = _cfg(tmp_path / "run", *[o for o in overrides if not o.startswith("sampler.steps")],
                   *[o for o in overrides if o.startswith("sampler.steps")])
        with pytest.raises(UserError, match=re.escape(needle)):
            T.train(cfg)
        with pytest.raises(UserError, match=re.escape(needle)):
            T._check_components(cfg, check_device=False)  # what --describe runs
    assert not (tmp_path / "run").exists()


def test_an_eta_file_for_another_model_or_reward_warns(tmp_path, caplog):
    """calibrate records the model, weights and rewards it tuned ψ_t for; only the CFG scale was compared, so a file
    made for FLUX with PickScore drove a shapes run with shapes_partial without a word."""
    import logging

    from flowalign.train import _load_eta

    f = _eta_file(tmp_path / "eta.json", [0.3, 0.2, 0.1, 0.0], model="shapes", path="",
                  rewards={"shapes_partial": 1.0})
    cfg = _cfg(tmp_path / "run", f"sampler.eta_file={f}", "sampler.kernel=dance_sde")
    with caplog.at_level(logging.WARNING, logger="flowalign.train"):
        _load_eta(cfg)
        assert not caplog.records
        _eta_file(f, [0.3, 0.2, 0.1, 0.0], model="flux", path="/w/flux", rewards={"pickscore": 1.0})
        _load_eta(cfg)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "for model 'flux' and this run uses 'shapes'" in text
    assert "for weights (--path) '/w/flux' and this run uses ''" in text
    assert "for rewards {'pickscore': 1.0} and this run uses {'shapes_partial': 1.0}" in text
