"""``flowalign bench credit``: measured cost of every credit method (METHODS.md §5.2), never estimated.

For each method (rollout plan + kernel + credit assigner + probe mode) this runs one real iteration's
rollout, rewards and credit on a model with an ``NFECounter`` installed, and reports per prompt group:
model forwards for sampling and probing (1 NFE = one sample's forward, the CFG pair counted once), the
ratio to plain Flow-GRPO sampling (G·T), reward calls (images scored), the training forwards of one optimizer step
over the trained transitions (one per distinct state: branch children share their parent's; β = 0, no reference
forward; not in the × Flow-GRPO ratio, which compares sampling) and wall time, next to the
reference implementations' costs from METHODS.md §5.2. It also measures how well few-step probes rank the
members of each group like full-ODE probes (mean Spearman over (group, state)), and with ``--rank-references``
how every probe, ``ode:full`` included, ranks against the same ODE solved F times finer (``fine:F``) and against the
mean reward of K SDE completions per state (``sde:K``, with that estimate's split-half agreement).

Models: the shipped shapes model (``load_model("shapes")``; a randomly initialised shapes model when it
is not shipped yet: the counts are exact, the ranking figures are not meaningful), the shipped shapes video model
(``load_model("shapes_video")``, rewarded by ``shapes_motion_partial``: the same methods on [C, F, H, W] latents) and
the tiny SD3 pipeline of ``tests/tiny_models.py`` (only from a source checkout).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from flowalign.errors import CommandParser

logger = logging.getLogger(__name__)

# name: (plan, kernel, eta, credit, credit options, plan options)
METHODS: dict[str, tuple[str, str, float, str, dict, dict]] = {
    "flow_grpo": ("chain", "flow_sde", 0.7, "outcome", {}, {}),
    "dense_full": ("chain", "flow_sde", 0.7, "dense_gain", {"probe": "ode:full"}, {}),
    "dense_ode3": ("chain", "flow_sde", 0.7, "dense_gain", {"probe": "ode:3"}, {}),
    "dense_ode2": ("chain", "flow_sde", 0.7, "dense_gain", {"probe": "ode:2"}, {}),
    "dense_mid1": ("chain", "flow_sde", 0.7, "dense_gain", {"probe": "ode2:1"}, {}),
    "dense_x0": ("chain", "flow_sde", 0.7, "dense_gain", {"probe": "x0"}, {}),
    "dense_stride3": ("chain", "flow_sde", 0.7, "dense_gain", {"probe": "ode/3"}, {}),
    "stepwise_ode5": ("chain", "flow_sde", 0.7, "stepwise_gain", {"probe": "ode:5"}, {}),
    "tp_full": ("chain", "cps", 0.7, "turning_points", {"probe": "ode:full"}, {}),
    "tp_ode2": ("chain", "cps", 0.7, "turning_points", {"probe": "ode:2"}, {}),
    "vgpo_x0": ("chain", "flow_sde", 0.7, "value_anchor", {"probe": "x0"}, {}),
    "euphonium_x0": ("chain", "flow_sde", 0.7, "euphonium", {"pra_probe": "x0"}, {}),
    "euphonium_guided": ("chain", "flow_sde", 0.7, "euphonium", {}, {}),
    "tempflow_all": ("branch", "flow_sde", 0.7, "branch", {}, {"branch_steps": "all"}),
    "tempflow_one": ("branch", "flow_sde", 0.7, "branch", {}, {"branch_steps": "random"}),
    "g2rpo": ("branch", "flow_sde", 0.7, "granular", {"strides": [1, 2, 3]}, {"branch_steps": "all"}),
}

# methods that train (and so branch at) only the first part of the steps: the fraction (sampler.train_fraction)
TRAIN_FRACTION: dict[str, float] = {"g2rpo": 0.5}  # G²RPO branches in the high-noise half (METHODS.md §4.7)

# METHODS.md §5.2 (SD3.5-M-like, T = 10, G = 24): NFE as × Flow-GRPO, as released (with reuse)
REFERENCE = {
    "flow_grpo": "1× (240 NFE)",
    "dense_full": "6.5× released; 5.5× with reuse",
    "dense_ode3": "—",
    "dense_ode2": "2.9× released; 1.9× with reuse",
    "dense_mid1": "—",
    "dense_x0": "2× released; 1× with reuse",
    "dense_stride3": "— (every 3rd native step: more sub-steps from the noisy states, fewer late)",
    "stepwise_ode5": "— (5-step ODE probes at every state)",
    "tp_full": "6.4× released; ≈4.6× shared ODE + reuse",
    "tp_ode2": "—",
    "vgpo_x0": "2× (1× with reuse)",
    "euphonium_x0": "1× + PRM fwd/bwd at guided steps (here: x0 pixel-reward proxy, no guidance)",
    "euphonium_guided": "1× + PRM fwd/bwd at guided steps (here: saturation of x̂0, λ = 300; backward not counted)",
    "tempflow_all": "4.65× (4 seeds × 6 children)",
    "tempflow_one": "≈0.6×",
    "g2rpo": "≈11× (FLUX, T = 16, G = 12: ≈2.2k vs 192 NFE; 8 branch steps × 3 grids)",
}

RANK_MODES = ("x0", "ode:2", "ode2:1", "ode:3", "ode2:2", "ode:4", "ode/3")

# methods whose rollouts are guided (``sampler.guide=reward_grad``): the guide's options
GUIDED: dict[str, dict] = {"euphonium_guided": {"lam": 300.0, "rewards": {"saturation": 1.0}}}


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties); NaN when either is constant or
    holds a non-finite value (a NaN reward would otherwise be ranked as the largest value)."""

    def ranks(x: Tensor) -> Tensor:
        x = x.to(torch.float64)
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=torch.float64)
        for v in x.unique():  # average ties
            m = x == v
            if int(m.sum()) > 1:
                r[m] = r[m].mean()
        return r

    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


class _Setup:
    """A model with an NFE counter, its rewards, and a fixed prompt batch."""

    def __init__(self, name: str, model, rewards: dict, prompts: list[str], note: str, prompt_fn=None):
        from flowalign.values import NFECounter

        self.name, self.model, self.rewards, self.prompts, self.note = name, model, rewards, prompts, note
        self.prompt_fn = prompt_fn  # (n, seed) → n prompts, for the ranking measurement
        self.nfe = NFECounter(model)
        self.reward_calls = 0

    def score(self, latents: Tensor, rows: Tensor, traj) -> dict[str, Tensor]:
        self.reward_calls += int(latents.shape[0])
        with torch.no_grad():
            images = self.model.decode(latents)
        ps = [traj.prompts[int(traj.cond_index[int(r)])] for r in rows]
        return {k: r(images, ps).float().cpu() for k, r in self.rewards.items()}


def _shapes_setup(n_groups: int, path: str = "") -> _Setup:
    from flowalign.errors import UserError
    from flowalign.models import load_model
    from flowalign.rewards import build_reward
    try:
        model, note = load_model("shapes", path), f"shapes model {path or '(shipped)'}"
    except UserError as e:
        if path:  # an explicit directory that does not hold a model is the user's mistake, not a missing ship
            raise
        from flowalign.models.shapes import ShapesModel

        logger.warning("%s", e)
        model = ShapesModel.from_config({})
        for m in model.components.values():
            m.eval().requires_grad_(False)
        note = "RANDOM-INIT shapes model (shipped weights not found): counts exact, rankings not meaningful"
    prompts = _shapes_prompts(n_groups, seed=3)
    return _Setup("shapes", model, {"shapes_partial": build_reward("shapes_partial")}, prompts, note, _shapes_prompts)


def _video_setup(n_groups: int) -> _Setup:
    """The shipped shapes video model with ``shapes_motion_partial`` (the video job's reward)."""
    from flowalign.models import load_model
    from flowalign.rewards import build_reward

    model = load_model("shapes_video", "")
    return _Setup("shapes-video", model, {"shapes_motion_partial": build_reward("shapes_motion_partial")},
                  _motion_prompts(n_groups, seed=3), "shapes video model (shipped), shapes_motion_partial reward",
                  _motion_prompts)


def tiny_models_file() -> Path:
    """``tests/tiny_models.py`` next to the package: it builds the tiny SD3 pipeline, and only a source checkout has
    it (a pip-installed wheel ships no tests/)."""
    import flowalign

    return Path(flowalign.__file__).resolve().parents[1] / "tests" / "tiny_models.py"


def _sd3_setup(n_groups: int, workdir: Path) -> Optional[_Setup]:
    from flowalign.models import load_model
    from flowalign.rewards import build_reward

    src = tiny_models_file()
    if not src.is_file():
        logger.warning("tiny SD3 skipped: %s not found (needs a source checkout)", src)
        return None
    spec = importlib.util.spec_from_file_location("_flowalign_tiny_models", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = mod.build_tiny_sd3(workdir / "tiny_sd3")
    model = load_model("sd3", str(path), **mod.TINY_SIZES["sd3"])
    prompts = ["a red cat", "a blue square above a green tree", "two yellow birds", "a white house"][:n_groups]
    prompts += ["a black dog"] * max(0, n_groups - len(prompts))
    return _Setup("tiny-sd3", model, {"saturation": build_reward("saturation")}, prompts,
                  "tiny random SD3 pipeline (tests/tiny_models.py), saturation reward")


def trained_steps(method: str, steps: int) -> Tensor:
    """[T] bool: the steps ``method`` trains (and a branch plan may branch at): η > 0 (the last step is deterministic)
    and within the method's ``TRAIN_FRACTION`` of the steps."""
    from flowalign.samplers.loop import eta_schedule

    eta = eta_schedule(steps, METHODS[method][2])  # [T]
    return (eta > 0) & (torch.arange(steps) < math.floor(TRAIN_FRACTION.get(method, 0.99) * steps + 1e-9))


def run_method(setup: _Setup, method: str, *, steps: int, group_size: int, children: int, seed: int,
               max_batch: Optional[int]) -> dict[str, Any]:
    """One rollout + rewards + credit iteration of ``method``; measured counts per prompt group."""
    from flowalign.credit import CreditInput, assign_credit
    from flowalign.samplers.loop import eta_schedule
    from flowalign.samplers.plans import PLANS
    from flowalign.train import state_classes
    from flowalign.values import make_probe

    plan, kernel, eta_val, credit, c_opts, p_opts = METHODS[method]
    model, nfe = setup.model, setup.nfe
    n_groups = len(setup.prompts)
    nfe.counts.clear()
    nfe.calls.clear()
    setup.reward_calls = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        cond = model.encode(setup.prompts)
    sigmas = model.schedule(steps)
    eta = eta_schedule(steps, eta_val)  # [T], last step deterministic
    rows = group_size if plan == "chain" else max(1, group_size // children)
    cond_index = torch.arange(n_groups).repeat_interleave(rows)
    noise = model.init_noise(n_groups * rows, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    opts = dict(p_opts)
    trained = trained_steps(method, steps)[None]  # [1, T]
    if plan == "branch":
        opts.update(children=children, max_batch=max_batch, trainable=trained[0])
    guide = None
    if method in GUIDED:
        from flowalign.rewards import build_reward
        from flowalign.rewards.video import for_outputs
        from flowalign.values import reward_grad_guide

        g = dict(GUIDED[method])
        weights = g.pop("rewards")
        kind = getattr(model, "output_kind", "image")  # a video model's frames, as the trainer scores them
        guide = reward_grad_guide(velocity=model.velocity, decode=model.decode, counter=nfe,
                                  rewards={k: for_outputs(build_reward(k), kind, {}) for k in weights}, weights=weights,
                                  steps=trained[0].nonzero().flatten().tolist(), **g)
        guide.prm.prompts = [setup.prompts[int(i)] for i in cond_index]
        opts["mean_shift"] = guide
    with nfe.phase("sampling"):
        traj = PLANS[plan](model.velocity, noise, sigmas, cond, cond_index=cond_index, group=cond_index.clone(),
                           eta=eta, kernel=kernel, generator=gen, keep_velocities=True, prompts=setup.prompts,
                           **opts)
    t_sample = time.perf_counter()
    rewards = setup.score(traj.final, torch.arange(traj.batch_size), traj)
    trained = trained.expand(traj.batch_size, -1) & (traj.eta.cpu() > 0)[None]  # [B, T]
    if "trained" in traj.extras:
        trained = trained & traj.extras["trained"].cpu()
    probe = make_probe(model.velocity, traj, lambda z, r: setup.score(z, r, traj), terminal=rewards, counter=nfe,
                       max_batch=max_batch)
    extras = guide.credit_extras(traj) if guide is not None else {}  # PRM at the guided post-states
    inp = CreditInput(traj=traj, rewards=rewards, reward_weights={k: 1.0 for k in rewards}, trained=trained,
                      probe=probe, extras=extras)
    out = assign_credit(credit, inp, c_opts)
    wall = time.perf_counter() - t0
    nonzero = trained & (out.advantages != 0)  # [B, T]
    kept = trained if out.mask is None else trained & out.mask.detach().cpu().to(torch.bool)  # pruned: not re-scored
    # as the trainer (filter_zero_std): a rollout with a nonzero advantage on a kept step keeps all its kept steps
    pairs = (kept & (kept & nonzero).any(1, keepdim=True)).nonzero()  # [n, 2] the (rollout, step) pairs re-scored
    n_states = int(torch.unique(state_classes(traj.latents, traj.cond_index, pairs)).numel()) if len(pairs) else 0
    tot = nfe.totals()
    base = group_size * steps
    per = 1.0 / n_groups
    samp, prob = tot.get("sampling", 0) * per, tot.get("probing", 0) * per
    guid = tot.get("guidance", 0) * per
    return {
        "model": setup.name, "method": method, "credit": credit,
        "probe": c_opts.get("probe", c_opts.get("pra_probe", "prm" if guide is not None else
                                                 "ode/" + ",".join(map(str, c_opts["strides"])) if "strides" in c_opts
                                                 else "-")),
        "rollouts_per_group": traj.batch_size * per, "nfe_sampling": samp, "nfe_probing": prob,
        "nfe_guidance": guid, "nfe_total": samp + prob + guid, "x_flow_grpo": round((samp + prob + guid) / base, 3),
        "model_launches": sum(nfe.calls.values()), "reward_calls": setup.reward_calls * per,
        "trained_transitions": int(nonzero.sum()) * per, "nfe_training": n_states * per,
        "wall_s": round(wall, 2), "sampling_s": round(t_sample - t0, 2), "reference": REFERENCE.get(method, "—"),
    }


def parse_references(spec: str) -> list[tuple[str, int]]:
    """``"fine:4,sde:16"`` → [("fine", 4), ("sde", 16)]: the extra references the ranking is measured against."""
    from flowalign.errors import UserError

    out: list[tuple[str, int]] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        kind, _, num = item.partition(":")
        n = int(num) if num.isdigit() else 0
        if kind == "fine" and n >= 2:
            out.append(("fine", n))
        elif kind == "sde" and n >= 2 and n % 2 == 0:
            out.append(("sde", n))
        else:
            raise UserError(f"--rank-references: {item!r} is not a reference; use fine:F (F ≥ 2: the same Euler ODE "
                            "with every step split in F) or sde:K (K even ≥ 2: K SDE completions per state)")
    return out


def _agreement(vals: dict[str, Tensor], ref: dict[str, Tensor], cond_index: Tensor, n_groups: int,
               steps: int) -> dict[str, Any]:
    """Mean Spearman over (group, state) pairs of states 0 … T−2, and its mean per state."""
    rs, by_t = [], {t: [] for t in range(steps - 1)}
    for name in ref:
        for g in range(n_groups):
            m = cond_index == g
            for t in range(steps - 1):  # x_{T−1} → x_T is ODE, its value is R for every mode's complement
                r = spearman(vals[name][m, t], ref[name][m, t])
                if math.isfinite(r):
                    rs.append(r)
                    by_t[t].append(r)
    return {"spearman_mean": round(sum(rs) / len(rs), 3) if rs else float("nan"),
            "spearman_min": round(min(rs), 3) if rs else float("nan"), "pairs": len(rs),
            "by_state": [round(sum(v) / len(v), 2) if v else float("nan") for v in by_t.values()]}


def rank_agreement(setup: _Setup, *, steps: int, group_size: int, seed: int, modes: Sequence[str],
                   max_batch: Optional[int], references: Sequence[tuple[str, int]] = (),
                   progress: bool = False) -> dict[str, Any]:
    """Spearman between few-step and full-ODE values of every state, per (group, state) across members.

    With ``references`` also against each of them (key ``"references"``): ``("fine", F)``, the same Euler ODE on a
    grid F times finer (``values.refined_ode_values``), and ``("sde", K)``, the mean reward of K completions with
    the rollouts' own SDE (``values.sde_mc_values``), whose split-half agreement (two halves of K/2) bounds how
    well any value can rank against a K-sample estimate."""
    from tqdm.auto import tqdm

    from flowalign.samplers.loop import eta_schedule, sample
    from flowalign.values import probe_values, refined_ode_values, sde_mc_values

    model = setup.model
    n_groups = len(setup.prompts)
    with torch.no_grad():
        cond = model.encode(setup.prompts)
    cond_index = torch.arange(n_groups).repeat_interleave(group_size)
    noise = model.init_noise(n_groups * group_size, torch.Generator().manual_seed(seed))
    traj = sample(model.velocity, noise, model.schedule(steps), cond, eta=eta_schedule(steps, 0.7),
                  kernel="flow_sde", generator=torch.Generator().manual_seed(seed + 1), cond_index=cond_index,
                  group=cond_index.clone(), keep_velocities=True, prompts=setup.prompts)
    mask = torch.ones(traj.batch_size, steps + 1, dtype=torch.bool)
    mask[:, steps] = False
    sc = lambda z, r: setup.score(z, r, traj)  # noqa: E731
    term = sc(traj.final, torch.arange(traj.batch_size))
    # one tick per probe mode, and per state of each reference (an sde:16 reference takes most of the time)
    # the bar is kept (leave=True): closing it ends its line, so a log file's next line starts on its own
    bar = tqdm(total=1 + len(modes) + len(references) * (steps - 1), desc="ranking", unit="stage",
               disable=not progress)
    full = probe_values(model.velocity, traj, mask, "ode:full", sc, terminal=term, max_batch=max_batch)
    bar.update()
    vals = {}
    for mode in modes:
        bar.set_postfix_str(mode)
        vals[mode] = probe_values(model.velocity, traj, mask, mode, sc, terminal=term, max_batch=max_batch)
        bar.update()
    out: dict[str, Any] = {mode: _agreement(v, full, cond_index, n_groups, steps) for mode, v in vals.items()}
    if references:
        refs: dict[str, Any] = {}
        costs: dict[str, dict[str, float]] = {}
        every = {"ode:full": full, **vals}
        for kind, n in references:
            label = f"{kind}:{n}"
            bar.set_postfix_str(label)
            parts: dict[str, Tensor] = {}
            before = setup.nfe.totals().get("reference", 0)
            # state by state (the same values as one call), so the bar moves; only the ranked states 0 … T−2
            for t in range(steps - 1):
                m_t = torch.zeros_like(mask)
                m_t[:, t] = mask[:, t]
                with setup.nfe.phase("reference"):
                    if kind == "fine":
                        got = refined_ode_values(model.velocity, traj, m_t, sc, n, max_batch=max_batch)
                    else:
                        got = sde_mc_values(model.velocity, traj, m_t, sc, k=n, kernel="flow_sde",
                                            max_batch=max_batch, seed=seed + 2)  # name -> [K, B, T+1]
                for k, v in got.items():
                    parts[k] = v if k not in parts else torch.where(torch.isnan(v), parts[k], v)
                bar.update()
            if kind == "fine":
                ref, extra = parts, {}
            else:
                ref = {k: v.mean(0) for k, v in parts.items()}
                halves = _agreement({k: v[: n // 2].mean(0) for k, v in parts.items()},
                                    {k: v[n // 2:].mean(0) for k, v in parts.items()}, cond_index, n_groups, steps)
                extra = {f"split-half ({n // 2} vs {n // 2})": halves}
            per = (setup.nfe.totals().get("reference", 0) - before) / traj.batch_size  # measured forwards per rollout
            costs[label] = {"nfe_per_rollout": per, "x_flow_grpo": round(1 + per / steps, 2)}
            refs[label] = {**{mode: _agreement(v, ref, cond_index, n_groups, steps) for mode, v in every.items()},
                           **extra}  # every mode, ode:full and the earlier references against this one
            every[label] = ref
        out["references"] = refs
        out["reference_cost"] = costs
    bar.close()
    return out


def _plot_target(plot: str, model: str, n_models: int) -> Path:
    """Where ``bench credit --plot PLOT`` draws ``model``'s ranking: PLOT itself for one model, else
    PLOT-<model>.png."""
    return Path(plot) if n_models == 1 else Path(plot).with_name(f"{Path(plot).stem}-{model}.png")


def bench_credit(argv: Sequence[str]) -> int:
    """``flowalign bench credit``: print measured NFE / reward calls / wall time per credit method."""
    ap = CommandParser(prog="flowalign bench credit", description="Measured cost of every credit method (transformer "
                                 "forwards, reward calls, wall time per prompt group) beside the reference "
                                 "implementations' published costs, and the few-step probes' ranking agreement.")
    ap.add_argument("--models", default="shapes,sd3", help="comma list of: shapes, shapes_video, sd3")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of: {', '.join(METHODS)} (default: all)")
    ap.add_argument("--shapes-path", "--path", dest="shapes_path", default="",
                    help="shapes model directory ('' = the shipped model; --path: the same, as sample names it; "
                         "shapes_video and sd3 always use the shipped video model and the tiny built-in SD3 pipeline)")
    ap.add_argument("--steps", type=int, default=10, help="rollout steps T")
    ap.add_argument("--group-size", type=int, default=8, help="rollouts per prompt G (the reference cost table assumes 24)")
    ap.add_argument("--groups", type=int, default=1, help="prompt groups")
    ap.add_argument("--children", type=int, default=4, help="TempFlow children K (seeds = G // K)")
    ap.add_argument("--max-batch", type=int, default=None, help="rows per model forward while probing")
    ap.add_argument("--rank-groups", type=int, default=4, help="groups for the Spearman measurement (0 = skip)")
    ap.add_argument("--rank-reward", default="shapes_partial",
                    help="reward whose probe values are ranked on the shapes model (shapes_partial, saturation, "
                         "jpeg_compressibility, ...); the video model ranks shapes_motion_partial")
    ap.add_argument("--reward-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="constructor argument of the --rank-reward, as for `flowalign eval`, e.g. "
                         "pickscore.path=/weights/PickScore_v1 or remote.url=http://host:8000 (repeatable)")
    ap.add_argument("--rank-references", default="",
                    help="also rank against these references (comma list): fine:F = the same Euler ODE with every step "
                         "split in F (does ode:full's ranking survive a finer solver?), sde:K = the mean reward of K "
                         "completions with the rollouts' SDE (the sampling policy's own value; its split-half "
                         "agreement is printed too). Costly: with fine:4,sde:16 the video model's 8 groups took 42 min "
                         "instead of 4.4 (two threads), the shapes model's 6 groups 10-11 min (one thread)")
    ap.add_argument("--plot", default=None, help="also draw the ranking agreement by state to this PNG (one panel "
                    "per reference, one line per probe mode; with several models, one file each: NAME-<model>.png); "
                    "an existing file is refused unless --overwrite")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rollouts' noise (and of the ranking check's states)")
    from flowalign.bench_snr import JSON_HELP

    ap.add_argument("--json", default=None, help=JSON_HELP)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --json file or --plot image (the "
                    "figures of an earlier run)")
    args = ap.parse_args(list(argv))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from flowalign.bench_snr import check_json_out, check_out_file
    from flowalign.errors import UserError
    from flowalign.rewards.video import for_outputs
    from flowalign.config import check_max_steps
    from flowalign.sample import check_seed

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown bench method(s) {unknown}; choose from {', '.join(METHODS)}")
    if not methods:  # the models loaded and printed an empty table, exit code 0
        raise UserError(f"--methods {args.methods!r} names no method; choose from {', '.join(METHODS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("shapes", "shapes_video", "sd3")]
    if bad or not models:
        raise UserError(f"--models {args.models!r}: unknown model(s) {bad}; choose from shapes, shapes_video, sd3")
    for flag, value, low in (("steps", args.steps, 1), ("group-size", args.group_size, 1), ("groups", args.groups, 1),
                             ("children", args.children, 1), ("max-batch", args.max_batch, 1),
                             ("rank-groups", args.rank_groups, 0), ("threads", args.threads, 1)):
        if value is not None and value < low:
            raise UserError(f"--{flag} must be at least {low}, got {value}")
    check_max_steps(args.steps)
    check_seed(args.seed)
    references = parse_references(args.rank_references)
    ranked = [m for m in models if m in ("shapes", "shapes_video")] if args.rank_groups > 0 else []
    if ranked and (args.steps < 2 or args.group_size < 2):  # Spearman across members of states 0 … T−2
        raise UserError(f"the ranking needs --steps >= 2 and --group-size >= 2 (got {args.steps} and "
                        f"{args.group_size}): it ranks the members of a group at states 0 … T-2; or pass --rank-groups 0")
    # a branch plan branches at a trained stochastic step: none at T = 1 (η = 0 on the last step), which raised a
    # ValueError traceback in the middle of the table
    no_branch = [m for m in methods if METHODS[m][0] == "branch" and not bool(trained_steps(m, args.steps).any())]
    if no_branch:
        raise UserError(f"--steps {args.steps}: method(s) {', '.join(no_branch)} branch at a trained stochastic step "
                        f"and T = {args.steps} has none (the last step is deterministic); use --steps >= 2 or drop "
                        f"them from --methods")
    for flag, value in (("--plot", args.plot), ("--rank-references", args.rank_references)):
        if value and not ranked:  # was ignored silently: no plot, no reference figures, exit code 0
            raise UserError(f"{flag} {value!r} needs the ranking, which runs only with --rank-groups >= 1 on "
                            "--models shapes or shapes_video")
    if args.reward_arg and "shapes" not in ranked:  # only the shapes model's ranking scores --rank-reward
        raise UserError(f"--reward-arg {args.reward_arg[0]!r} sets an option of --rank-reward, which only the ranking "
                        f"on --models shapes scores (with --rank-groups >= 1)")
    check_json_out(args.json, args.overwrite)
    if args.plot and (Path(args.plot).is_dir() or not args.plot.lower().endswith(".png")):
        raise UserError(f"--plot {args.plot!r}: pass the path of a .png file, e.g. ranking.png")
    for name in ranked if args.plot else ():  # one file per ranked model (sd3 is never ranked)
        check_out_file(str(_plot_target(args.plot, name, len(ranked))), "--plot", args.overwrite, "ranking.png")
    rank_reward = None
    if "shapes" in ranked:
        # built here, the last check: an unknown name, a bad --reward-arg, a reward that cannot be built (remote
        # without its url, missing weights) or a video reward for the image model is one line before any model
        # loads, not a traceback after the cost runs; the ranking below scores with this very object
        from types import SimpleNamespace

        from flowalign.evaluate import parse_component_args
        from flowalign.models import resolve as resolve_model
        from flowalign.rewards.catalog import build_reward_checked

        given = SimpleNamespace(reward_arg=args.reward_arg, per_frame=[], model_arg=[], model="shapes")
        kwargs = parse_component_args(given, [args.rank_reward])[0][args.rank_reward]
        built = build_reward_checked(args.rank_reward, kwargs, f"--rank-reward {args.rank_reward!r}")
        rank_reward = for_outputs(built, getattr(resolve_model("shapes"), "output_kind", "image"))
    if set(models) == {"sd3"} and not tiny_models_file().is_file():
        # every requested model would be skipped: this exited 0 having printed nothing (and wrote a JSON of no runs)
        raise UserError(f"--models {args.models!r}: every requested model would be skipped: sd3 is the tiny random "
                        f"SD3 pipeline of tests/tiny_models.py, which only a flowalign source checkout has (not found: "
                        f"{tiny_models_file()}); install flowalign from a checkout (`pip install -e .` in it), or "
                        f"pass --models shapes or shapes_video")
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"runs": [], "ranking": {}, "notes": {}}
    with tempfile.TemporaryDirectory(prefix="flowalign-bench-") as tmp:
        for name in models:
            setup = _shapes_setup(args.groups, args.shapes_path) if name == "shapes" else \
                _video_setup(args.groups) if name == "shapes_video" else \
                _sd3_setup(args.groups, Path(tmp)) if name == "sd3" else None
            if setup is None:
                results["notes"][name] = "skipped"
                continue
            results["notes"][name] = setup.note
            print(f"\n== {setup.name}: {setup.note}; T={args.steps}, G={args.group_size}, groups={args.groups}")  # noqa: T201
            print(f"{'method':<17}{'probe':<10}{'NFE samp':>9}{'NFE probe':>10}{'NFE guide':>10}{'× FlowGRPO':>11}{'rewards':>8}"  # noqa: T201
                  f"{'NFE train':>10}{'launch':>7}{'wall s':>8}   reference (METHODS §5.2)")
            for m in methods:
                r = run_method(setup, m, steps=args.steps, group_size=args.group_size, children=args.children,
                               seed=args.seed, max_batch=args.max_batch)
                results["runs"].append(r)
                print(f"{m:<17}{r['probe']:<10}{r['nfe_sampling']:>9.0f}{r['nfe_probing']:>10.0f}{r['nfe_guidance']:>10.0f}"  # noqa: T201
                      f"{r['x_flow_grpo']:>11.2f}{r['reward_calls']:>8.0f}{r['nfe_training']:>10.0f}{r['model_launches']:>7d}"
                      f"{r['wall_s']:>8.2f}   {r['reference']}")
            if args.rank_groups > 0 and name in ("shapes", "shapes_video"):
                setup.prompts = setup.prompt_fn(args.rank_groups, seed=11)  # the cost runs are done; reuse the model
                if name == "shapes":
                    setup.rewards = {args.rank_reward: rank_reward}
                rk = rank_agreement(setup, steps=args.steps, group_size=args.group_size, seed=args.seed + 17,
                                    modes=RANK_MODES, max_batch=args.max_batch, references=references,
                                    progress=True)
                refs = rk.pop("references", {})
                ref_cost = rk.pop("reference_cost", {})
                results["ranking"][setup.name] = rk
                if refs:
                    results.setdefault("ranking_references", {})[setup.name] = refs
                    results.setdefault("reference_cost", {})[setup.name] = ref_cost
                if args.plot:
                    from flowalign.report import plot_ranking

                    target = _plot_target(args.plot, name, len(ranked))
                    reward = args.rank_reward if name == "shapes" else "shapes_motion_partial"
                    plot_ranking({"ode:full": rk, **refs}, target, f"{setup.name}, {reward}: {args.rank_groups} "
                                 f"groups of {args.group_size}, T = {args.steps}")
                    results.setdefault("plots", {})[setup.name] = str(target)
                    logger.info("ranking plot of %s written to %s", setup.name, target)
                for label, c in ref_cost.items():
                    print(f"reference {label}: {c['nfe_per_rollout']:.0f} forwards per rollout, measured "  # noqa: T201
                          f"({c['x_flow_grpo']:.2f}× Flow-GRPO's sampling)")
                for title, table in [("ode:full", rk), *refs.items()]:
                    print(f"ranking agreement with {title} (Spearman across group members, per group and state):")  # noqa: T201
                    for mode, d in table.items():
                        print(f"  {mode:<10} mean {d['spearman_mean']:.3f}  min {d['spearman_min']:.3f}  "  # noqa: T201
                              f"({d['pairs']} (group, state) pairs)  by state t=0..{args.steps - 2}: "
                              + " ".join(f"{v:.2f}" for v in d["by_state"]))
    if args.json:
        from flowalign.io import atomic_write_json

        atomic_write_json(args.json, results)
    sys.stdout.flush()
    return 0


def _round_robin(generate, tasks: Sequence[str], n: int, seed: int) -> list[str]:
    """n prompts from a grammar's ``generate_prompts(n_per_task, seed)``, taking its tasks in turn."""
    per = max(1, -(-n // len(tasks)))
    rows = generate(per, seed=seed)
    by_task = [[r["prompt"] for r in rows if r["task"] == t] for t in tasks]
    return [p for i in range(per) for ps in by_task if i < len(ps) for p in [ps[i]]][:n]


def _shapes_prompts(n: int, seed: int) -> list[str]:
    """n shapes prompts, round-robin over the grammar's tasks."""
    from flowalign.shapes.grammar import TASKS, generate_prompts

    return _round_robin(generate_prompts, TASKS, n, seed)


def _motion_prompts(n: int, seed: int) -> list[str]:
    """n shapes-motion prompts, alternating its tasks (motion, two_motion)."""
    from flowalign.shapes.motion import TASKS, generate_prompts

    return _round_robin(generate_prompts, TASKS, n, seed)


def cli_main(argv: Sequence[str]) -> int:
    return bench_credit(argv)


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(bench_credit(sys.argv[1:]))
