"""Evaluation: sample a prompt set with the ODE sampler, score every image with rewards, summarise.

``sample_and_score`` is the core every benchmark protocol uses (DESIGN.md §1: "evaluation is sample (ODE)
+ rewards + a report"); ``summarize`` turns its per-image records into per-task and overall means.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import torch
from torch import Tensor

from flowalign.config import MAX_STEPS
from flowalign.report import benchmark_line

logger = logging.getLogger(__name__)

OVERALL = ("groups", "images")  # summarize's conventions for the overall mean


def image_seed(seed: int, prompt_index: int, k: int) -> int:
    """Seed of the initial noise of image ``k`` of prompt ``prompt_index``.

    One seed per image, so any image can be regenerated alone: ``model.init_noise(1,
    torch.Generator().manual_seed(image_seed(...)))``. The same (seed, prompt index, k) gives the same
    noise whatever the batch size or the model, so base and fine-tuned models are compared on equal noise.

    For ``0 <= k < 1009`` it is ``seed·1_000_003 + prompt_index·1_009 + k`` (every recorded measurement used
    these). That formula repeats itself from k = 1009 on (``image_seed(0, 0, 1009) == image_seed(0, 1, 0)``), which
    best-of-N and steering reach with seeds·particles >= 1009 per prompt, so larger k map elsewhere: bit 63 set
    (never equal to a linear seed of a seed in [0, 2**63 / 1_000_003)), then ``seed mod 2**31`` in bits 32-62, and in
    the low 32 bits (the only ones the CPU generator uses: ``manual_seed(v)`` and ``manual_seed(v % 2**32)`` draw
    the same noise) a Cantor pairing of (prompt_index, k - 1009) placed half the 32-bit circle away from the run's
    linear seeds, at a per-seed offset below 2**30. So within one run (one seed) every image has its own noise
    as long as prompts·1009 < 2**31 and (prompts + k)²/2 < 2**30 (prompts + k up to about 46,000). The value
    is below 2**64, as ``torch.Generator.manual_seed`` requires.
    """
    seed, i, k = int(seed), int(prompt_index), int(k)
    if k < 1_009:
        return seed * 1_000_003 + i * 1_009 + k
    j = k - 1_009
    pair = (i + j) * (i + j + 1) // 2 + j  # Cantor pairing: one number per (prompt, image), growing as (i + j)²/2
    low = (seed * 1_000_003 + 2**31 + _splitmix64(seed) % 2**30 + pair) % 2**32
    return 2**63 | ((seed % 2**31) << 32) | low


def step_noise_seed(init_seed: int) -> int:
    """Seed of the SDE step noise of the image (or steered output) whose initial noise has seed ``init_seed``
    (``image_seed``): one stream per image, so it does not depend on its batch-mates.

    A splitmix64 hash of the initial seed, in the low 32 bits the CPU generator uses. The earlier ``init·7919 + 1`` was
    itself an initial seed: image 0 of prompt 0 at run seed 0 drew its step noise from seed 1, the initial noise of
    image 1 (or of particle 1 of the same output), so two supposedly independent samples were correlated. A hash meets
    one of a run's n initial seeds only by chance (about n / 2**32 per image; tests/test_seed_streams.py checks that
    none of the first seeds' streams meets an initial seed)."""
    return _splitmix64(int(init_seed) ^ 0x5DEECE66D) % 2**32


def _splitmix64(x: int) -> int:
    """splitmix64's output function (Steele et al. 2014): a well-mixed 64-bit word for an integer (mod 2**64)."""
    z = (x + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def _reward_items(reward_fns: Any) -> list[tuple[str, Any]]:
    if isinstance(reward_fns, Mapping):
        return list(reward_fns.items())
    return [(getattr(r, "name", type(r).__name__), r) for r in reward_fns]


def sample_and_score(model: Any, records: Sequence[Mapping[str, Any]], reward_fns: Any, *, steps: int,
                     guidance: Optional[float] = None, seeds_per_prompt: int = 4, batch_size: int = 32, seed: int = 0,
                     progress: bool = False, skip_batches: Collection[int] = (),
                     done_jobs: Collection[tuple[int, int]] = (),
                     on_batch: Optional[Callable[[Sequence[tuple[int, int]], Tensor, list[dict]], None]] = None
                     ) -> list[dict]:
    """ODE-sample ``seeds_per_prompt`` images per prompt and score each with every reward.

    Args:
        model: a ``FlowModel`` (its ``guidance_scale`` is set to ``guidance`` for the call and restored).
        records: prompt records, each with ``"prompt"`` and optional metadata (``"task"``, ...), passed to
            the rewards as ``metadata``.
        reward_fns: ``RewardModel``s as a list (keyed by ``.name``) or a ``{name: reward}`` mapping.
        steps: Euler steps on ``model.schedule(steps)`` (η = 0, kernel "euler": the deterministic ODE).
        guidance: CFG scale; None keeps the model's.
        seeds_per_prompt, seed: image k of prompt i starts from the noise of ``image_seed(seed, i, k)``.
        batch_size: images per sampling batch (results do not depend on it beyond the matmul kernels' last bits).
        skip_batches: indices of batches (of ``batch_size`` consecutive (prompt, k) jobs) not to sample: those an
            interrupted run finished (``run_eval``'s resume); their images get no record here.
        done_jobs: (prompt index, k) jobs not to sample either: a batch holding some of them samples only the rest
            (a resume with another ``batch_size``, whose finished jobs fill part of a batch).
        on_batch: called after each batch with its (prompt index, k) pairs, its decoded images [B, 3, H, W] (videos
            [B, F, 3, H, W]) in [0, 1] and its records, e.g. to save them as they come or keep a few for a grid.

    Returns one dict per image, in (prompt, k) order: the prompt record's fields, ``prompt_index``,
    ``sample`` (k), ``seed`` (the image seed) and one float per reward name.
    """
    from flowalign.samplers.loop import sample

    rewards = _reward_items(reward_fns)
    jobs = [(i, k) for i in range(len(records)) for k in range(seeds_per_prompt)]
    old_w = getattr(model, "guidance_scale", None)
    if guidance is not None:
        model.guidance_scale = float(guidance)
    sigmas = model.schedule(steps)  # [T+1]
    out: list[dict] = []
    done_jobs = set(done_jobs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # this process's share: the batches of the other ranks of a launch (skip_batches) are not its progress
        mine = [job for n, job in enumerate(jobs) if n // batch_size not in skip_batches]
        bar = tqdm(total=len(mine), initial=sum(job in done_jobs for job in mine), unit="img", dynamic_ncols=True,
                   desc="eval" if len(mine) == len(jobs) else f"eval (this process's {len(mine)} of {len(jobs)})")
    try:
        with torch.no_grad():
            for start in range(0, len(jobs), batch_size):
                if start // batch_size in skip_batches:
                    continue
                chunk = [job for job in jobs[start:start + batch_size] if job not in done_jobs]
                if not chunk:
                    continue
                prompt_ids = sorted({i for i, _ in chunk})
                row = {i: r for r, i in enumerate(prompt_ids)}
                cond = model.encode([records[i]["prompt"] for i in prompt_ids])  # per prompt
                seeds = [image_seed(seed, i, k) for i, k in chunk]
                x = torch.cat([model.init_noise(1, torch.Generator().manual_seed(s)) for s in seeds])  # [B, *latent]
                index = torch.tensor([row[i] for i, _ in chunk], device=x.device)  # [B]
                traj = sample(model.velocity, x, sigmas, cond, eta=0.0, kernel="euler", cond_index=index)
                images = model.decode(traj.final)  # [B, 3, H, W] in [0, 1]
                prompts = [records[i]["prompt"] for i, _ in chunk]
                meta = [dict(records[i]) for i, _ in chunk]
                scores = {name: fn(images, prompts, meta).detach().float().cpu().tolist() for name, fn in rewards}
                batch_records = []
                for j, (i, k) in enumerate(chunk):
                    rec = dict(records[i])
                    rec.update(prompt_index=i, sample=k, seed=seeds[j])
                    rec.update({name: float(v[j]) for name, v in scores.items()})
                    batch_records.append(rec)
                out += batch_records
                if on_batch is not None:
                    on_batch(chunk, images, batch_records)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        if guidance is not None:
            model.guidance_scale = old_w
    return out


def summarize(records: Sequence[Mapping[str, Any]], reward_names: Optional[Sequence[str]] = None,
              group_key: str = "task", overall: str = "groups") -> dict:
    """Means of each reward per group (``records[i][group_key]``) and overall.

    ``overall="groups"``: the mean over groups (GenEval's convention: every task weighs the same; the mean over images
    when records carry no group). ``overall="images"``: the mean over all images, the groups only a breakdown (reward
    averages on PartiPrompts, whose 12 categories differ in size). NaN scores (reward not applicable) are skipped.
    Returns ``{"overall": {name: mean}, "per_task": {task: {name: mean}}, "counts": {task: n}, "n": N}``.
    """
    if overall not in OVERALL:
        raise ValueError(f"overall must be one of {OVERALL}, got {overall!r}")
    if reward_names is None:
        skip = {"prompt", "task", "prompt_index", "sample", "seed", group_key}
        reward_names = sorted({k for r in records for k, v in r.items()
                               if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)})
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(_group_of(r, group_key), []).append(r)

    def mean(rs: Sequence[Mapping[str, Any]], name: str) -> float:
        vals = [float(r[name]) for r in rs if name in r and not math.isnan(float(r[name]))]
        return sum(vals) / len(vals) if vals else float("nan")

    per = {g: {n: mean(rs, n) for n in reward_names} for g, rs in groups.items()}
    means = {}
    for n in reward_names:
        if overall == "images":
            means[n] = mean(records, n)
            continue
        vals = [v[n] for v in per.values() if not math.isnan(v[n])]
        means[n] = sum(vals) / len(vals) if vals else float("nan")
    return {"overall": means, "per_task": per, "counts": {g: len(rs) for g, rs in groups.items()}, "n": len(records)}


def _group_of(record: Mapping[str, Any], group_key: str) -> str:
    """A record's group: ``group_key``; for the default "task" also GenEval's ``tag`` and Parti's ``category``
    (``data.task_of``'s order), so every benchmark gets its per-task table and task-averaged overall."""
    keys = (group_key, "tag", "category") if group_key == "task" else (group_key,)
    for k in keys:
        v = record.get(k)
        if isinstance(v, str) and v:
            return v
    return "all"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k images drawn without replacement from n, c of which pass, passes.

    The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code",
    arXiv:2107.03374, eq. 1): 1 − C(n − c, k)/C(n, k). k = 1 gives c/n; k = n gives 1 iff any image passes.
    """
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (got n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def summarize_pass_at_k(records: Sequence[Mapping[str, Any]], reward_names: Sequence[str],
                        group_key: str = "task", overall: str = "groups") -> dict:
    """pass@k of each pass/fail reward (every score 0 or 1, NaN skipped), per group and overall, for k = 1, 2, 4, …
    up to the smallest number of images any prompt has (only when every prompt has at least 2).

    Images are grouped into prompts by ``prompt_index``; a prompt's pass@k is ``pass_at_k``; a group's is the mean
    over its prompts and the overall one the mean over groups, or over all prompts with ``overall="images"`` (as
    ``summarize``). Rewards with other values
    (e.g. ``shapes_partial``) are left out. Returns ``{name: {"k": [...], "overall": {k: p}, "per_task": {g: {k: p}}}}``.
    """
    out: dict[str, dict] = {}
    for name in reward_names:
        prompts: dict[Any, list[float]] = {}
        group_of: dict[Any, str] = {}
        for r in records:
            v = r.get(name)
            if v is None or math.isnan(float(v)):
                continue
            prompts.setdefault(r["prompt_index"], []).append(float(v))
            group_of[r["prompt_index"]] = _group_of(r, group_key)
        if not prompts or any(v not in (0.0, 1.0) for vs in prompts.values() for v in vs):
            continue
        n_min = min(len(vs) for vs in prompts.values())
        if n_min < 2:
            continue
        ks = [2 ** i for i in range(n_min.bit_length()) if 2 ** i <= n_min]
        per: dict[str, dict[int, list[float]]] = {}
        for idx, vs in prompts.items():
            for k in ks:
                per.setdefault(group_of[idx], {}).setdefault(k, []).append(pass_at_k(len(vs), int(sum(vs)), k))
        per_task = {g: {k: sum(v) / len(v) for k, v in d.items()} for g, d in per.items()}
        if overall == "images":  # every prompt weighs the same
            means = {k: sum(sum(d[k]) for d in per.values()) / len(prompts) for k in ks}
        else:
            means = {k: sum(d[k] for d in per_task.values()) / len(per_task) for k in ks}
        out[name] = {"k": ks, "overall": means, "per_task": per_task}
    return out


def paired_bootstrap(base: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]], reward: str, *,
                     overall: str = "groups", group_key: str = "task", n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0, same_noise: bool = True) -> dict:
    """The change of ``reward`` from evaluation ``base`` to ``other`` on the same images' jobs, with a paired bootstrap
    confidence interval (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13, percentile interval).

    Both record lists (``results.jsonl``) must hold the same (``prompt_index``, ``sample``) jobs with the same noise
    ``seed``: the pairs differ only in the model, so the noise of the prompts and seeds cancels in the difference
    (``same_noise=False``: the seeds may differ, e.g. steered outputs against plain samples; the pairs then share
    only their prompt, and the interval is over prompts all the same). Prompts
    are resampled with replacement within each group (``_group_of``: every group keeps its size), the same prompts
    for both evaluations, ``n_boot`` times; each resample's means follow ``summarize`` (a group's mean over its
    images, NaN skipped; ``overall`` over groups or over images), so the unresampled data give exactly
    ``summarize(other) − summarize(base)``.

    Returns ``{"delta", "lo", "hi", "per_task": {group: {"delta", "lo", "hi"}}, "n_boot", "level"}``; ``lo``/``hi``
    are the (1 − level)/2 and (1 + level)/2 quantiles of the resampled differences, NaN for a group of one prompt
    (nothing to resample) and, if there is one, overall. A ``ValueError`` when the jobs, their seeds or their prompts
    differ.
    """
    import numpy as np

    if overall not in OVERALL:
        raise ValueError(f"overall must be one of {OVERALL}, got {overall!r}")

    def by_job(records: Sequence[Mapping[str, Any]]) -> dict:
        return {(int(r["prompt_index"]), int(r["sample"])): r for r in records}

    a, b = by_job(base), by_job(other)
    if a.keys() != b.keys():
        raise ValueError(f"the evaluations hold different images ({len(a)} vs {len(b)} (prompt, sample) jobs, "
                         f"{len(a.keys() ^ b.keys())} not in both)")
    if same_noise and any(a[k].get("seed") != b[k].get("seed") for k in a):
        raise ValueError("the evaluations sampled the same jobs from different noise seeds (another --seed)")
    other_prompt = next((k for k in a if a[k].get("prompt") != b[k].get("prompt")), None)
    if other_prompt is not None:
        i, k = other_prompt
        raise ValueError(f"the evaluations sampled different prompts (prompt {i}: {a[(i, k)].get('prompt')!r} vs "
                         f"{b[(i, k)].get('prompt')!r})")
    prompts = sorted({i for i, _ in a})
    group_of = {i: _group_of(a[(i, k)], group_key) for i, k in a}
    groups = list(dict.fromkeys(group_of[i] for i in prompts))

    def sums(records: dict) -> tuple[Any, Any]:  # per prompt: the sum and count of its finite scores
        s, c = np.zeros(len(prompts)), np.zeros(len(prompts))
        pos = {i: j for j, i in enumerate(prompts)}
        for (i, _), r in records.items():
            v = r.get(reward)
            if v is not None and not math.isnan(float(v)):
                s[pos[i]] += float(v)
                c[pos[i]] += 1
        return s, c

    (sa, ca), (sb, cb) = sums(a), sums(b)
    rng = np.random.default_rng(seed)
    members = {g: np.array([j for j, i in enumerate(prompts) if group_of[i] == g]) for g in groups}
    draws = {g: np.vstack([np.arange(len(m)), rng.integers(0, len(m), size=(n_boot, len(m)))]) for g, m in
             members.items()}  # row 0: the data themselves; rows 1..n_boot: resamples [1 + n_boot, |group|]

    def ratio(num: Any, den: Any) -> Any:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    per_group, tot = {}, {"a": [0, 0], "b": [0, 0]}
    for g, m in members.items():
        idx = m[draws[g]]  # [1 + n_boot, |group|] prompt positions
        ga, gb = (sa[idx].sum(1), ca[idx].sum(1)), (sb[idx].sum(1), cb[idx].sum(1))
        per_group[g] = (ratio(*ga), ratio(*gb))  # [1 + n_boot] each
        for key, (s_, c_) in (("a", ga), ("b", gb)):
            tot[key][0] = tot[key][0] + s_
            tot[key][1] = tot[key][1] + c_
    if overall == "images":
        ma, mb = ratio(*tot["a"]), ratio(*tot["b"])
    else:
        ma = np.nanmean(np.vstack([v[0] for v in per_group.values()]), axis=0)
        mb = np.nanmean(np.vstack([v[1] for v in per_group.values()]), axis=0)

    q = ((1 - level) / 2, (1 + level) / 2)

    def interval(d: Any, resampled: bool = True) -> dict:
        rest = d[1:][~np.isnan(d[1:])]
        lo, hi = (np.quantile(rest, q) if rest.size and resampled else (math.nan, math.nan))
        return {"delta": float(d[0]), "lo": float(lo), "hi": float(hi)}

    # a group of one prompt cannot be resampled: its interval (and the overall one, which holds it fixed) would have
    # width 0 whatever the noise, so they are NaN ("n/a"), not falsely certain
    few = {g for g, m in members.items() if len(m) < 2}
    out = interval(mb - ma, resampled=not few)
    out["per_task"] = {g: interval(vb - va, resampled=g not in few) for g, (va, vb) in per_group.items()}
    out.update(n_boot=n_boot, level=level)
    return out


def summarize_chunks(records: Sequence[Mapping[str, Any]], reward_names: Sequence[str], size: int = 80,
                     group_key: str = "task") -> dict:
    """The HPSv2 benchmark's statistic (REWARDS_AND_EVAL.md §3.3; HPSv2's ``evaluate_benchmark``): per group, its
    images in (prompt, sample) order split into consecutive chunks of ``size``, and the mean and (population) std of
    the chunk means. Groups whose image count is not a positive multiple of ``size`` are left out; NaN scores are
    skipped within a chunk. Returns ``{name: {group: {"mean", "std", "chunks"}}}`` in the reward's own units (HPS
    rewards give cos; the benchmark's tables show 100·cos)."""
    import statistics

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in sorted(records, key=lambda r: (r["prompt_index"], r["sample"])):
        groups.setdefault(_group_of(r, group_key), []).append(r)
    out: dict[str, dict] = {}
    for name in reward_names:
        per = {}
        for g, rs in groups.items():
            if not rs or len(rs) % size:
                continue
            means = []
            for c in range(0, len(rs), size):
                vals = [float(r[name]) for r in rs[c:c + size] if name in r and not math.isnan(float(r[name]))]
                if vals:
                    means.append(sum(vals) / len(vals))
            if means:
                per[g] = {"mean": sum(means) / len(means), "std": statistics.pstdev(means), "chunks": len(means)}
        if per:
            out[name] = per
    return out


def as_records(prompts: Sequence[Any]) -> list[dict]:
    """Prompt records as dicts ({"prompt", **metadata}) from PromptRecords, dicts or strings."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append({"prompt": p})
        elif isinstance(p, Mapping):
            out.append(dict(p))
        else:
            out.append({"prompt": p.prompt, **dict(getattr(p, "metadata", {}) or {})})
    return out


# ---- frozen benchmark protocols (REWARDS_AND_EVAL.md §3.2) ---------------------------------------------------------

SAMPLING_KEYS = ("steps", "guidance", "height", "width", "num_frames")  # what a protocol fixes per model family
_PROTOCOL_KEYS = ("name", "version", "description", "source", "prompts", "prompts_sha256", "images_per_prompt", "seed",
                  "rewards", "overall", "sampling")
_OPTIONAL_PROTOCOL_KEYS = ("external",)
# A protocol's ``external`` scorer: an evaluator that runs outside flowalign on the images `eval --export NAME` writes,
# whose per-image results `flowalign import-scores NAME` adds as the score NAME (REWARDS_AND_EVAL.md §3.5). The
# layout, the import and the score share the name.
EXTERNAL_SCORERS = {"geneval": "GenEval's evaluation/evaluate_images.py",
                    "vbench": "VBench's evaluate.py"}  # vbench: one score per dimension, vbench_<dimension>


@dataclass(frozen=True)
class Protocol:
    """A frozen benchmark protocol: what a benchmark number means (REWARDS_AND_EVAL.md §3.2).

    Read from a YAML file (``flowalign/assets/protocols/NAME.yaml``, or a user's file): the prompt set and the SHA-256
    of its records (text and metadata, ``io.prompts_digest``), images per prompt and the run seed (image k of prompt i
    starts from ``image_seed(seed, i, k)``), the rewards, how the overall mean is taken (``summarize``'s ``overall``),
    per model family the ODE steps, guidance and, where the family has one, the resolution, and optionally an
    ``external`` scorer (``EXTERNAL_SCORERS``: the benchmark's number is that evaluator's, run on the images of
    ``eval --export NAME`` and added per image by ``flowalign import-scores NAME``; ``rewards`` may then be empty;
    the label says whether its scores are in yet). An evaluation whose
    settings all equal the protocol's is a benchmark result; overriding any of them makes it a non-benchmark one
    (``protocol_status``). The built-in files are never edited: a change is a new name or version, and
    tests/test_protocols.py pins each file's SHA-256 (``sha256`` here).
    """

    name: str
    version: int
    description: str
    source: str
    prompts: str
    prompts_sha256: str
    images_per_prompt: int
    seed: int
    rewards: tuple[str, ...]
    overall: str
    sampling: Mapping[str, Mapping[str, Any]]
    sha256: str = ""
    file: str = ""  # a user's protocol file ("" = built-in)
    external: str = ""  # an EXTERNAL_SCORERS name: the benchmark's score comes from that evaluator ("" = none)

    def families(self) -> list[str]:
        return list(self.sampling)


def protocol_dir():
    """The directory of the built-in protocol files."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "assets" / "protocols"


def list_protocols() -> list[str]:
    """Names of the built-in protocols, sorted."""
    return sorted(p.stem for p in protocol_dir().glob("*.yaml"))


def load_protocol(name_or_path: str) -> Protocol:
    """A built-in protocol by name, or a protocol YAML file by path; a one-line ``UserError`` when it does not exist
    or its fields are not a protocol's (unknown or missing keys, wrong types, a family or reward flowalign lacks)."""
    import difflib
    import hashlib
    from pathlib import Path

    from flowalign.config import read_yaml_file
    from flowalign.errors import UserError

    text_name = str(name_or_path)
    if Path(text_name).is_dir():
        raise UserError(f"--benchmark {text_name!r} is a directory; pass a protocol YAML file or a built-in name "
                        f"(`flowalign eval --list-benchmarks`)")
    path = Path(text_name) if text_name.endswith((".yaml", ".yml")) else protocol_dir() / f"{text_name}.yaml"
    if not path.is_file():
        if text_name.endswith((".yaml", ".yml")):
            raise UserError(f"--benchmark {text_name!r}: no such protocol file")
        close = difflib.get_close_matches(text_name, list_protocols(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(list_protocols())}"
        raise UserError(f"unknown benchmark {text_name!r} ({hint}; `flowalign eval --list-benchmarks` lists them)")
    raw = path.read_bytes()
    where = f"protocol {str(path)!r}"
    builtin = path.resolve().parent == protocol_dir().resolve()
    data = read_yaml_file(path, "protocol")  # FILE:LINE:COL for malformed YAML; a repeated key is refused
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping with keys {', '.join(_PROTOCOL_KEYS)}")
    unknown = [k for k in data if k not in _PROTOCOL_KEYS + _OPTIONAL_PROTOCOL_KEYS]
    missing = [k for k in _PROTOCOL_KEYS if k not in data]
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown keys {unknown}" if unknown else "",
                                     f"missing keys {missing}" if missing else "") if x)
        raise UserError(f"{where}: {what} (a protocol has exactly {', '.join(_PROTOCOL_KEYS)}, and may have "
                        f"{', '.join(_OPTIONAL_PROTOCOL_KEYS)})")

    def typed(key: str, kind: type, value: Any = None) -> Any:
        v = data[key] if value is None else value
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise UserError(f"{where}: {key} must be {_KIND_NAMES[kind]}, got {v!r}")
        return v

    from flowalign.models import MODELS
    from flowalign.rewards import REWARDS

    external = data.get("external", "")
    if external not in ("", *EXTERNAL_SCORERS):
        raise UserError(f"{where}: external must be one of {', '.join(EXTERNAL_SCORERS)} (an evaluator flowalign "
                        f"exports for and imports from), got {external!r}")
    rewards = data["rewards"]
    if (not isinstance(rewards, list) or not (rewards or external)
            or not all(isinstance(r, str) and r in REWARDS for r in rewards)):
        raise UserError(f"{where}: rewards must be a {'' if external else 'non-empty '}list of reward names "
                        f"(`flowalign rewards list`), got {rewards!r}")
    if len(set(rewards)) != len(rewards):
        raise UserError(f"{where}: rewards {rewards!r} names a reward twice")
    if data["overall"] not in OVERALL:
        raise UserError(f"{where}: overall must be one of {', '.join(OVERALL)}, got {data['overall']!r}")
    sampling = data["sampling"]
    if not isinstance(sampling, dict) or not sampling:
        raise UserError(f"{where}: sampling must map model families ({', '.join(MODELS)}) to their settings")
    fixed: dict[str, dict[str, Any]] = {}
    for family, cfg in sampling.items():
        if family not in MODELS:
            raise UserError(f"{where}: sampling names an unknown model family {family!r} (known: {', '.join(MODELS)})")
        if not isinstance(cfg, dict) or not {"steps", "guidance"} <= set(cfg) or set(cfg) - set(SAMPLING_KEYS):
            raise UserError(f"{where}: sampling.{family} must give steps and guidance, and may give "
                            f"{', '.join(SAMPLING_KEYS[2:])}; got {cfg!r}")
        fixed[family] = {k: typed(f"sampling.{family}.{k}", float if k == "guidance" else int, v)
                         for k, v in cfg.items()}
        if not 1 <= fixed[family]["steps"] <= MAX_STEPS or not (math.isfinite(fixed[family]["guidance"])
                                                                and fixed[family]["guidance"] >= 0):
            raise UserError(f"{where}: sampling.{family} needs steps in [1, {MAX_STEPS}] and a finite guidance >= 0, "
                            f"got {cfg!r}")
    from flowalign.data import BUILTIN_PROMPTS

    prompts = typed("prompts", str)
    if prompts not in BUILTIN_PROMPTS:
        prompts = str(Path(prompts).expanduser())
        if not Path(prompts).is_absolute():
            prompts = str(path.parent / prompts)  # a prompt file beside the protocol, wherever the command runs
    proto = Protocol(name=typed("name", str), version=typed("version", int), description=typed("description", str),
                     source=typed("source", str), prompts=prompts,
                     prompts_sha256=typed("prompts_sha256", str), images_per_prompt=typed("images_per_prompt", int),
                     seed=typed("seed", int), rewards=tuple(rewards), overall=data["overall"], sampling=fixed,
                     sha256=hashlib.sha256(raw).hexdigest(), file="" if builtin else str(path), external=external)
    if proto.images_per_prompt < 1 or proto.seed < 0:
        raise UserError(f"{where}: images_per_prompt must be >= 1 and seed >= 0")
    if not builtin and proto.name in list_protocols() and proto.sha256 != load_protocol(proto.name).sha256:
        raise UserError(f"{where} is named {proto.name!r} like the built-in protocol but differs from it; give your "
                        f"protocol another name (a built-in protocol never changes)")
    return proto


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def find_protocol(prompt_set: Any) -> Optional[Protocol]:
    """The built-in protocol of a built-in prompt set (by name), or None: an evaluation of that set is labelled with
    it (a benchmark result when every setting matches, ``protocol_status``)."""
    if not isinstance(prompt_set, str):
        return None
    for name in list_protocols():
        proto = load_protocol(name)
        if proto.prompts == prompt_set:
            return proto
    return None


def protocol_defaults(protocol: Protocol, family: str) -> dict:
    """What ``protocol`` fixes for a run of model family ``family``: ``prompt_set``, ``seeds_per_prompt``, ``seed``,
    ``rewards``, ``export`` (its external scorer's layout, if it has one) and, when it has that family, ``steps``,
    ``guidance`` and ``resolution`` (height/width/num_frames)."""
    out: dict[str, Any] = {"prompt_set": protocol.prompts, "seeds_per_prompt": protocol.images_per_prompt,
                           "seed": protocol.seed, "rewards": list(protocol.rewards)}
    if protocol.external:
        out["export"] = protocol.external
    fam = protocol.sampling.get(family)
    if fam is not None:
        out.update(steps=fam["steps"], guidance=fam["guidance"])
        res = {k: fam[k] for k in ("height", "width", "num_frames") if k in fam}
        if res:
            out["resolution"] = res
    return out


def protocol_status(protocol: Protocol, settings: Mapping[str, Any]) -> dict:
    """Whether an evaluation's ``settings`` (``run_eval``'s: ``model``, ``prompts_sha256``, ``seeds_per_prompt``, ``seed``,
    ``rewards``, ``steps``, ``guidance``, ``resolution``) are ``protocol``'s; recorded as ``settings["benchmark"]``.

    Returns ``{"name", "version", "sha256", "benchmark": bool, "overrides": {field: {"protocol": x, "used": y}}}``:
    ``benchmark`` is true exactly when nothing is overridden. Rewards beyond the protocol's are no override (they
    score the same images; e.g. ``shapes_strict_intact`` beside ``shapes-bench``'s two), a protocol reward left out
    is. The prompts are compared by the digest of their records, so a subset (``--max-prompts``), an edited copy or
    another file is an override whatever its name.
    """
    family = settings.get("model")
    want = protocol_defaults(protocol, str(family))
    overrides: dict[str, dict[str, Any]] = {}

    def differ(field: str, expected: Any, used: Any) -> None:
        if expected != used:
            overrides[field] = {"protocol": expected, "used": used}

    if family not in protocol.sampling:
        differ("model", protocol.families(), family)
    # --export vbench samples a repeated prompt once (external.unique_vbench_prompts): the prompts are then those
    # before that, which determine the ones sampled
    digest = (settings.get("unique_prompts") or {}).get("prompts_sha256", settings.get("prompts_sha256"))
    if digest != protocol.prompts_sha256:
        overrides["prompts"] = {"protocol": f"{protocol.prompts} (sha256 {protocol.prompts_sha256[:12]})",
                                "used": f"{settings.get('prompt_set', '?')}, {settings.get('prompts', '?')} prompts "
                                        f"(sha256 {str(settings.get('prompts_sha256'))[:12]})"}
    differ("images_per_prompt", want["seeds_per_prompt"], settings.get("seeds_per_prompt"))
    differ("seed", want["seed"], settings.get("seed"))
    used_rewards = list(settings.get("rewards") or [])
    if not set(want["rewards"]) <= set(used_rewards):  # extra rewards score the same images: the protocol's numbers stand
        differ("rewards", sorted(want["rewards"]), sorted(used_rewards))
    if "steps" in want:
        differ("steps", want["steps"], settings.get("steps"))
        used_g = settings.get("guidance")
        differ("guidance", want["guidance"], None if used_g is None else float(used_g))
        res = settings.get("resolution") or {}
        for k, v in want.get("resolution", {}).items():
            differ(k, v, res.get(k))
    scorer = {}
    if protocol.external:  # the images must be in its evaluator's layout; its score is in once imported
        differ("export", protocol.external, settings.get("export"))
        scorer = {"external": protocol.external,
                  "scored": protocol.external in (settings.get("external_scores") or {})}
    return {"name": protocol.name, "version": protocol.version, "sha256": protocol.sha256,
            **({"file": protocol.file} if protocol.file else {}), "benchmark": not overrides, "overrides": overrides,
            **scorer}


def format_protocols() -> str:
    """The built-in protocols as a table (``flowalign eval --list-benchmarks``)."""
    rows = [("name", "prompts", "images", "scores", "overall", "families (steps, guidance[, HxW])")]
    for name in list_protocols():
        p = load_protocol(name)
        fams = "; ".join(f"{f} ({c['steps']}, {c['guidance']:g}" + (f", {c['height']}x{c['width']}" if "height" in c else "")
                         + ")" for f, c in p.sampling.items())
        scores = ",".join([*p.rewards, *([f"{p.external} (external)"] if p.external else [])])
        rows.append((f"{p.name} v{p.version}", p.prompts, str(p.images_per_prompt), scores, p.overall, fams))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    return "\n".join(lines)


def eval_settings(model: Any, prompts: Sequence[Any], reward_fns: Any, *, steps: int, guidance: Optional[float] = None,
                  kernel: str = "euler", seeds_per_prompt: int = 4, seed: int = 0,
                  extra_settings: Optional[Mapping[str, Any]] = None, protocol: Optional[Protocol] = None) -> dict:
    """The settings ``run_eval`` records with its numbers (REWARDS_AND_EVAL.md §3.2): steps, the guidance that samples,
    kernel, images per prompt, seed, the prompt count and digest, the resolution (``model.output_size()``), the
    reward versions (``version`` of the rewards that have one, e.g. HPS v2.1), ``extra_settings`` (the model family
    as ``model``, its LoRA, the prompt set, ...), the ``overall`` convention and, with a ``protocol``,
    ``benchmark``: its ``protocol_status``."""
    from flowalign.io import prompts_digest

    used = guidance if guidance is not None else getattr(model, "guidance_scale", None)  # the scale that samples
    settings = {"steps": steps, "guidance": None if used is None else float(used), "kernel": kernel,
                "seeds_per_prompt": seeds_per_prompt, "seed": seed, "prompts": len(prompts)}
    size = getattr(model, "output_size", None)  # the resolution the scores belong to
    if callable(size):
        settings["resolution"] = size()
    items = _reward_items(reward_fns)
    versions = {n: str(fn.version) for n, fn in items if getattr(fn, "version", None) is not None}
    if versions:
        settings["reward_versions"] = versions
    settings["rewards"] = [n for n, _ in items]
    settings.update(extra_settings or {})
    settings["prompts_sha256"] = prompts_digest(as_records(prompts))
    settings["overall"] = protocol.overall if protocol is not None else "groups"
    if protocol is not None:
        settings["benchmark"] = protocol_status(protocol, {**settings, "rewards": [n for n, _ in items]})
    return settings


def _check_out_dir_once(path: str, resume: bool, rank: int, world: int):
    """``sample.check_out_dir`` on rank 0 only (its writability probe would make the directory look non-empty to the
    other ranks), its verdict shared with every rank, so all raise the same one-line error or none does."""
    from pathlib import Path

    from flowalign.dist import once_on_rank0
    from flowalign.sample import check_out_dir

    once_on_rank0(lambda: check_out_dir(path, resume, PARTIAL), rank, world)
    return Path(path)


def lora_ema(lora: Any) -> Optional[bool]:
    """Whether a training checkpoint's LoRA file holds EMA weights (``flowalign train`` saves the EMA when
    ``train.ema`` is on), read from its run's ``config.yaml`` (``RUN/checkpoints/step-N``); None when unknown."""
    from pathlib import Path

    import yaml

    cfg = Path(lora).resolve().parent.parent / "config.yaml"
    try:
        data = yaml.safe_load(cfg.read_text())
        value = data["train"]["ema"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return value if isinstance(value, bool) else None


PARTIAL = "results.partial.jsonl"  # a resumable evaluation's scored batches so far (run_eval(resumable=True))


def run_eval(model: Any, prompts: Sequence[Any], reward_fns: Any, out_dir, *, steps: int,
             guidance: Optional[float] = None, kernel: str = "euler", seeds_per_prompt: int = 4, batch_size: int = 32,
             seed: int = 0, progress: bool = True, extra_settings: Optional[Mapping[str, Any]] = None,
             grid_prompts: int = 0, resumable: bool = False, resume: bool = False,
             protocol: Optional[Protocol] = None,
             on_images: Optional[Callable[[Sequence[tuple[int, int]], Tensor, list[dict]], None]] = None,
             shard: tuple[int, int] = (0, 1), on_start: Optional[Callable[[dict], None]] = None) -> dict:
    """Evaluate and write ``out_dir/results.jsonl`` (one line per image) and ``out_dir/summary.json``.

    ``grid_prompts`` > 0 also writes ``out_dir/grids/eval.png``: the images of that many evenly spaced prompts
    (every seed, at most 8), each row captioned with its prompt and the first reward's score of each image, from
    the very images that were scored (no extra sampling; a video model adds ``eval.gif``, see ``sample.save_grid``).

    ``resumable``: each finished batch's records are appended to ``out_dir/results.partial.jsonl`` (an ``io.BatchJournal``
    with the settings in its header), removed once results.jsonl is written. ``resume`` continues from that file: the
    settings and the prompts (text and metadata, by their SHA-256; a journal without it is refused) must be the same
    (else a one-line ``UserError`` naming the differences), its complete batches are not sampled again (those holding
    grid images are, for their pixels), and the results equal an uninterrupted run's, batch for batch.

    The protocol is the ODE sampler (``kernel`` must be "euler"); the summary is ``summarize``'s dict plus
    the settings used, so a report can say how the numbers were made: steps, guidance, resolution, images per prompt,
    seed, the digest of the prompts, the reward versions (``version`` of the rewards that have one, e.g. HPS v2.1)
    and ``extra_settings`` (e.g. the model family as ``model``, its LoRA, the prompt set).

    ``protocol`` (a frozen benchmark, ``load_protocol``): its ``overall`` convention is used and
    ``settings["benchmark"]`` records ``protocol_status``, whether this evaluation is a benchmark result.
    ``on_images``: called with each sampled batch (as ``sample_and_score``'s ``on_batch``), e.g. to export the images
    for an external evaluator (``external.GenEvalExport``). ``on_start``: called with the settings once a resume is
    accepted, before any sampling (``flowalign eval`` says there whether this will be a benchmark result, so a refused
    resume stays one line).

    ``shard=(rank, world)`` (every process of a multi-process launch calls with its own; ``dist.process_group``): rank r
    samples the batches b with b mod world = r, the records and grid images are gathered, every rank returns the whole
    summary and only rank 0 writes. Batches are the same whatever the world size, so the results equal one process's.
    Resumable as one process is: each rank journals its own batches (``partial_path``), and a resume must run on as
    many processes (the journals record it).
    """
    from pathlib import Path

    from flowalign.data import HPD_STYLES
    from flowalign.errors import UserError, first_line
    from flowalign.external import hpd_complete
    from flowalign.io import BatchJournal

    if kernel != "euler":
        raise ValueError("evaluation uses the deterministic ODE sampler (kernel 'euler')")
    out = Path(out_dir)
    names = [n for n, _ in _reward_items(reward_fns)]
    prompt_records = as_records(prompts)
    settings = eval_settings(model, prompt_records, reward_fns, steps=steps, guidance=guidance, kernel=kernel,
                             seeds_per_prompt=seeds_per_prompt, seed=seed, extra_settings=extra_settings,
                             protocol=protocol)
    overall = settings["overall"]
    shown = set(range(len(prompts))[:: max(1, len(prompts) // grid_prompts)][:grid_prompts]) if grid_prompts > 0 else set()
    cols = min(seeds_per_prompt, 8)
    batch_of = lambda i, k: (i * seeds_per_prompt + k) // batch_size  # noqa: E731  (run_eval's job order)
    n_jobs = len(prompts) * seeds_per_prompt

    # what an interrupted run finished (whole batches: io.BatchJournal, which also checks that the prompts are the
    # same, text and metadata); the grid's batches run again for their pixels
    rank, world = shard
    journal = None
    if resumable:  # each rank journals its own batches (their assignment depends on the number of processes)
        out.mkdir(parents=True, exist_ok=True)
        mine = partial_path(out, rank)
        try:
            # a rank killed before it wrote its journal has none: it resumes with nothing done (the other ranks'
            # journals check the settings); one process must hold its journal, as before
            # one process may resume with another batch size (after running out of memory): an image's record does
            # not depend on its batch, so the finished ones are kept whatever batch now holds them
            journal = BatchJournal(mine, {**settings, "rewards": names, "batch_size": batch_size,
                                          **({"processes": world} if world > 1 else {})},
                                   resume=resume and (world == 1 or mine.is_file()),
                                   redo={batch_of(i, k) for i in shown for k in range(cols)}, prompts=prompt_records,
                                   rebatch=("batch_size", lambda r: batch_of(r["prompt_index"], r["sample"]))
                                   if world == 1 else None)
            failed = None
        except (UserError, OSError) as err:
            failed = str(err) if isinstance(err, UserError) else f"cannot write {mine} ({first_line(err)})"
        _all_or_none(failed, world)  # a rank that cannot resume stops every rank, with its line
        if resume:
            again = (f"; {journal.redone} more finished ones are sampled again, in the batches that hold the grid's "
                     f"images (for their pixels)") if journal.redone else ""
            moved = (f" (they ran in batches of {journal.rebatched_from}, the rest in batches of {batch_size})"
                     if journal.rebatched else "")
            logger.info("resuming %s: %d of %d images already scored%s%s%s", out, len(journal.records()), n_jobs,
                        f" (rank {rank})" if world > 1 else "", moved, again)
    done_jobs = {(r["prompt_index"], r["sample"]) for r in journal.records()} if journal is not None else set()
    if on_start is not None:
        on_start(settings)
    n_batches = -(-n_jobs // batch_size)
    others = {b for b in range(n_batches) if b % world != rank}  # the other ranks' batches

    kept: dict[tuple[int, int], Tensor] = {}

    def on_batch(chunk: Sequence[tuple[int, int]], images: Tensor, batch_records: list[dict]) -> None:
        if on_images is not None:  # before the journal marks the batch done: a crash between them samples it again
            on_images(chunk, images, batch_records)
        if journal is not None:
            journal.add(batch_of(*chunk[0]), batch_records)
        for j, (i, k) in enumerate(chunk):
            if i in shown and k < cols:
                kept[(i, k)] = images[j].detach().float().cpu()  # [3, H, W] (video: [F, 3, H, W])

    new = sample_and_score(model, prompt_records, reward_fns, steps=steps, guidance=guidance,
                           seeds_per_prompt=seeds_per_prompt, batch_size=batch_size, seed=seed,
                           progress=progress and rank == 0, skip_batches=others, done_jobs=done_jobs,
                           on_batch=on_batch if (shown or resumable or on_images) else None)
    if world > 1:  # every rank's records and grid images, on every rank
        import torch.distributed as dist

        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, ((journal.records() if journal is not None else []) + new, kept))
        new = [r for part, _ in parts for r in part]
        kept = {key: img for _, part in parts for key, img in part.items()}
    elif journal is not None:
        new = journal.records() + new
    records = sorted(new, key=lambda r: (r["prompt_index"], r["sample"]))
    summ = summarize(records, names, overall=overall)
    passk = summarize_pass_at_k(records, names, overall=overall)
    if passk:  # several images per prompt and a pass/fail reward: how often one of k seeds passes
        summ["pass_at_k"] = passk
    if (seeds_per_prompt == 1 and prompt_records and hpd_complete(prompt_records)
            and all(r.get("task") in HPD_STYLES for r in prompt_records)):
        chunks = summarize_chunks(records, names)  # the HPSv2 benchmark: 10 chunks of 80 prompts per style
        if chunks:
            summ["chunks"] = chunks
    summ["settings"] = settings
    error = None
    if rank == 0:  # rank 0 writes what every rank now holds
        try:
            _write_eval(out, records, summ, kept, shown, cols, names, prompt_records, model)
        except Exception as err:  # noqa: BLE001  (re-raised below, after the other ranks know)
            if world == 1:
                raise
            error = err
    if world > 1:  # every journal stays until results.jsonl is written; a failed write stops every rank
        import torch.distributed as dist

        verdicts: list[Any] = [None] * world
        dist.all_gather_object(verdicts, None if error is None else first_line(error))
        if error is not None:
            raise error
        if verdicts[0] is not None:
            raise UserError(f"rank 0 could not write the evaluation to {out} ({verdicts[0]})")
    if journal is not None:
        journal.close()
    return summ


def partial_path(out, rank: int = 0):
    """The journal of a resumable evaluation's rank: ``results.partial.jsonl`` (rank 0, and a single process), else
    ``results.partial.rank<r>.jsonl``."""
    from pathlib import Path

    return Path(out) / (PARTIAL if rank == 0 else f"results.partial.rank{rank}.jsonl")


def journal_processes(out) -> int:
    """How many processes wrote the journal of an interrupted evaluation in ``out`` (its header's ``processes``; 1
    when it has none, or there is no readable journal: ``BatchJournal`` then names what is wrong)."""
    import json

    from pathlib import Path

    for path in [partial_path(out), *sorted(Path(out).glob("results.partial.rank*.jsonl"))]:  # any rank's
        try:
            with open(path, encoding="utf-8") as fh:
                header = json.loads(fh.readline()).get("journal", {})
            return int(header.get("processes", 1))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return 1


def _all_or_none(error: Optional[str], world: int) -> None:
    """Raise one rank's one-line error on every rank (the first rank's that has one), or nothing when none has: a
    rank that stops alone leaves the others waiting in the next collective."""
    from flowalign.errors import UserError

    if world > 1:
        import torch.distributed as dist

        errors: list[Any] = [None] * world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise UserError(error)


def _write_eval(out, records, summ, kept, shown, cols, names, prompt_records, model) -> None:
    """results.jsonl, summary.json and the grid of ``run_eval`` (rank 0)."""
    import json

    from flowalign.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write_text(out / "summary.json", json.dumps(summ, indent=2, default=str))  # str: e.g. a YAML date argument
    if kept:
        from flowalign.sample import save_grid

        score = {(r["prompt_index"], r["sample"]): r.get(names[0]) for r in records} if names else {}
        labels = []
        for i in sorted(shown):
            vals = " ".join(format(float(score[(i, k)]), ".3g") for k in range(cols) if score.get((i, k)) is not None)
            head = prompt_records[i]["prompt"] + (f"  [{names[0]}: {vals}]" if vals else "")
            labels += [head] + [""] * (cols - 1)
        images = torch.stack([kept[(i, k)] for i in sorted(shown) for k in range(cols)])  # [n·cols, (F,) 3, H, W]
        save_grid(images, out / "grids" / "eval.png", nrow=cols, labels=labels, fps=getattr(model, "fps", None))
    mean_over = "tasks" if summ.get("settings", {}).get("overall") == "groups" else "images"
    logger.info("eval %s: %s", out, "  ".join(f"{k}={v:.4f}" for k, v in summ["overall"].items())
                + f"  (overall, the mean over {mean_over}; {len(records)} images)" if names else
                f"{len(records)} images, no rewards")


def add_component_args(p) -> None:
    """``--reward-arg``, ``--per-frame`` and ``--model-arg`` on an argparse parser (``flowalign eval`` and ``steer``)."""
    p.add_argument("--reward-arg", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="reward constructor argument, e.g. pickscore.path=/weights/PickScore_v1 (repeatable)")
    p.add_argument("--per-frame", action="append", default=[], metavar="KEY=VALUE",
                   help="video models: how image rewards score the frames, e.g. reduce=first or stride=2 "
                        "(PerFrame options; default every 4th frame, mean; repeatable)")
    add_model_arg(p)


def add_model_arg(p) -> None:
    """``--model-arg KEY=VALUE`` on an argparse parser (``eval``, ``steer``, ``sample``): the adapter's loader options."""
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter argument, e.g. guidance_scale=3 (shapes), dtype=bfloat16 (float32, bfloat16 or "
                        "float16), height=1024 (sd3, flux) or num_frames=33 (wan) (repeatable; values parsed as YAML)")


def parse_component_args(args, reward_names: Sequence[str]) -> tuple[dict[str, dict], dict, dict]:
    """(reward kwargs per name, PerFrame options, model kwargs) from ``add_component_args``' options, each checked
    against the constructor it goes to (one-line ``UserError``), before any model or reward is built. A model
    ``dtype`` is returned as its ``torch.dtype`` (``model_dtype``; ``model_args_jsonable`` names it back) and a
    ``guidance_scale`` is checked as ``--guidance`` is."""
    from flowalign.errors import UserError
    from flowalign.rewards import resolve as resolve_reward
    from flowalign.rewards.catalog import check_kwarg_types, check_kwargs
    from flowalign.models import resolve as resolve_model
    from flowalign.rewards.video import check_per_frame, check_temporal

    kv = _key_value
    names = list(dict.fromkeys(reward_names))
    reward_kwargs: dict[str, dict] = {n: {} for n in names}
    for text in args.reward_arg:
        key, value = kv(text, "--reward-arg")
        if "." not in key or key.split(".", 1)[0] not in reward_kwargs:
            raise UserError(f"--reward-arg {text!r} must look like NAME.KEY=VALUE with NAME one of {names}")
        n, k = key.split(".", 1)
        reward_kwargs[n][k] = value
    for n in names:
        check_kwargs(resolve_reward(n), reward_kwargs[n], f"--reward-arg: reward {n!r}")
        check_kwarg_types(resolve_reward(n), reward_kwargs[n], f"--reward-arg: reward {n!r}")
    per_frame = dict(kv(t, "--per-frame") for t in args.per_frame)
    check_per_frame(per_frame, "--per-frame")
    video = getattr(resolve_model(args.model), "output_kind", "image") == "video"
    if video:  # image models ignore --per-frame
        check_temporal(per_frame, names, "--per-frame")
    if per_frame and (not video or all(getattr(resolve_reward(n), "kind", "image") == "video" for n in names)):
        logger.warning("--per-frame is set, but no image reward scores video frames here (%s): the options are unused",
                       "the model makes images" if not video else "every reward scores videos")
    return reward_kwargs, per_frame, parse_model_args(args.model, args.model_arg)


def _key_value(text: str, flag: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (the value parsed as YAML) or a one-line ``UserError``; NaN and inf are refused."""
    import yaml

    from flowalign.errors import UserError, first_line

    if "=" not in text:
        raise UserError(f"{flag} {text!r}: expected KEY=VALUE")
    k, v = text.split("=", 1)
    try:
        value = yaml.safe_load(v)
    except yaml.YAMLError:  # not YAML (e.g. a path with ': '): the text itself
        value = v
    except (ValueError, TypeError, AttributeError) as err:  # an explicit tag that does not convert: !!float abc
        raise UserError(f"{flag} {text!r}: the value is not valid YAML ({first_line(err)})") from None
    # NaN or inf is never a sensible option (a CFG scale, a threshold, a weight) and would pass into every forward
    if (isinstance(value, float) and not math.isfinite(value)) or (
            isinstance(value, str) and value.strip().lower().lstrip("+-.") in ("nan", "inf", "infinity")):
        raise UserError(f"{flag} {text!r}: the value must be a finite number or a string, not {v.strip()!r}")
    return k.strip(), value


def parse_model_args(family: str, items: Sequence[str]) -> dict:
    """``--model-arg KEY=VALUE`` items as the loader kwargs of model ``family``, each checked against its
    ``from_pretrained`` (one-line ``UserError``) before anything loads; ``dtype`` as a ``torch.dtype``."""
    from flowalign.errors import UserError
    from flowalign.models import resolve as resolve_model
    from flowalign.rewards.catalog import check_kwarg_types, check_kwargs

    pairs = [_key_value(t, "--model-arg") for t in items]
    model_kwargs = dict(pairs)
    for k in model_kwargs:  # a repeated key: the last value won without a word
        values = [v for key, v in pairs if key == k]
        if len(values) > 1 and any(v != values[0] for v in values):
            raise UserError(f"--model-arg {k} is given {len(values)} times with different values "
                            f"({', '.join(map(repr, values))}); pass it once")
    for k in ("path", "device"):
        if k in model_kwargs:
            raise UserError(f"--model-arg {k}=...: pass --{k} instead")
    loader = resolve_model(family).from_pretrained
    takes = inspect.signature(loader).parameters
    for k in ("resolution", "size", "image_size"):  # a config's model.resolution; the loaders take height and width
        if k in model_kwargs and k not in takes and "height" in takes:
            raise UserError(f"--model-arg {k}=...: model {family!r} takes --model-arg height=N --model-arg width=N "
                            f"(model.resolution in a train config)")
    check_kwargs(loader, model_kwargs, f"--model-arg: model {family!r}", reserved=("path", "device"))
    if "dtype" in model_kwargs:  # the loaders take a torch.dtype; the command line names it as the train config does
        model_kwargs["dtype"] = model_dtype(model_kwargs["dtype"], "--model-arg dtype")
    if "guidance_scale" in model_kwargs:  # what --guidance refuses is refused here too (null keeps the model's)
        from flowalign.sample import check_guidance

        check_guidance(model_kwargs["guidance_scale"], "--model-arg guidance_scale")
    check_kwarg_types(loader, model_kwargs, f"--model-arg: model {family!r}")
    return model_kwargs


def warn_outside_grammar(model, prompts: Sequence[str], family: str, doing: str) -> None:
    """One warning when prompts lie outside the grammar a closed-grammar model (shapes) was trained on: known words
    in a sentence it never saw (e.g. shapes-bench's still scenes on the shapes video model) encode and sample, but
    the model never learned them. ``sample`` warns per prompt; eval and steer once, counting them."""
    note = getattr(model, "prompt_note", None)
    unique = list(dict.fromkeys(prompts))
    outside = [why for why in map(note, unique) if why] if note else []
    if outside:
        logger.warning("%d of %d prompts are outside the grammar --model %s was trained on (first: %s); %s them anyway",
                       len(outside), len(unique), family, outside[0], doing)


def guidance_with_model_args(guidance: Optional[float], model_kwargs: Mapping[str, Any]) -> Optional[float]:
    """The CFG scale a command samples at, given ``--guidance`` and ``--model-arg guidance_scale``: the model-arg
    sets the model's own scale, which ``--guidance`` (or a benchmark's fixed scale) replaced at sampling time, so a
    model-arg beside them was silently ignored. Now it counts as ``--guidance`` (a benchmark run at another scale is
    then labelled not a benchmark), and the two given with different values are refused in one line."""
    from flowalign.errors import UserError

    scale = model_kwargs.get("guidance_scale")
    if scale is None:
        return guidance
    if guidance is not None and float(guidance) != float(scale):
        raise UserError(f"--guidance {guidance:g} and --model-arg guidance_scale={scale:g} disagree; pass one of them")
    return float(scale)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype's values


def model_dtype(value: Any, flag: str = "--model-arg dtype") -> torch.dtype:
    """The ``torch.dtype`` named by ``value`` (float32, bfloat16 or float16, the values of the train config's
    ``model.dtype``), else a one-line ``UserError`` starting with ``flag``."""
    from flowalign.errors import UserError

    if isinstance(value, str) and value.strip() in DTYPES:
        return DTYPES[value.strip()]
    raise UserError(f"{flag} must be one of {', '.join(DTYPES)}, got {value!r}")


def model_args_jsonable(model_kwargs: Mapping[str, Any]) -> dict:
    """``parse_component_args``' model kwargs as JSON values for a summary or a journal: a dtype by its name."""
    names = {v: k for k, v in DTYPES.items()}
    return {k: names.get(v, str(v)) if isinstance(v, torch.dtype) else v for k, v in model_kwargs.items()}


def cli_main(argv: Sequence[str]) -> int:
    """``flowalign eval``: a prompt set × rewards → results.jsonl, summary.json and report.html in --out."""
    from flowalign import data as D
    from flowalign.errors import CommandParser, Once, UserError
    from flowalign.dist import process_device, process_group
    from flowalign.external import (EXPORTS, GENEVAL_DIR, HPSV2_DIR, T2I_DIR, VBENCH_DIR, VIDEO_EXPORTS, GenEvalExport,
                                    HPSv2Export, T2ICompBenchExport, VBenchExport, check_geneval_records,
                                    check_hpsv2_records, check_t2i_records, check_vbench_export, unique_vbench_prompts)
    from flowalign.models import load_model
    from flowalign.rewards.catalog import build_reward_checked

    p = CommandParser(prog="flowalign eval", description="Evaluate a model on a prompt set with rewards.")
    p.add_argument("--model", default=None, help="model family (shapes, shapes_video, sd3, flux, wan; default "
                   "shapes, or the --benchmark's family when it has one)")
    p.add_argument("--path", default="", help="weights directory or hub id ('' = the family default)")
    p.add_argument("--lora", action=Once, once_hint="one LoRA is applied; merge them first or pass one", help="LoRA directory to apply (e.g. runs/x/checkpoints/step-N, or one written by "
                   "diffusers' save_lora_weights)")
    p.add_argument("--benchmark", metavar="NAME|FILE.yaml",
                   help="run a frozen benchmark protocol (--list-benchmarks): it sets the prompts, images per prompt, "
                        "seed, rewards, steps, guidance and resolution; any of these flags given with another value "
                        "makes the run a non-benchmark evaluation, recorded as such (--rewards that only adds rewards "
                        "to the protocol's does not)")
    p.add_argument("--list-benchmarks", action="store_true", help="list the built-in benchmark protocols and exit")
    p.add_argument("--prompts", "--prompt-file", dest="prompts", default=None,
                   help="built-in prompt set name, a .txt/.jsonl/.json file, or the HPSv2 "
                   "benchmark's directory (HPDv2 benchmark/; default: the benchmark's, else shapes-bench for shapes "
                   "and shapes-motion-bench for shapes_video; required for sd3, flux and wan; --prompt-file: the "
                   "same, as sample and steer name it)")
    p.add_argument("--max-prompts", type=int, default=None, help="an evenly spaced subset of N prompts (0 = all, "
                   "the default)")
    p.add_argument("--rewards", default=None, help="comma-separated reward names (default: the benchmark's, else "
                   "the shapes models' verifier: shapes_strict,shapes_partial or shapes_motion_strict,"
                   "shapes_motion_partial; required for sd3, flux and wan)")
    add_component_args(p)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the benchmark's, else the "
                   "model's own: 28 for sd3 and flux, 50 for wan, the config's sample_steps for shapes, 12)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the benchmark's, else the model's)")
    p.add_argument("--seeds", type=int, default=None, help="images per prompt (default 4, or the benchmark's; >= 2 "
                   "adds pass@k of pass/fail rewards)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default 0, or the benchmark's): image k of "
                   "prompt i starts from the noise of image_seed(seed, i, k), so any image can be regenerated alone")
    p.add_argument("--batch-size", type=int, default=32, help="images per model batch (memory and speed; each image has its own noise seed)")
    p.add_argument("--grid", type=int, default=8, metavar="N",
                   help="grids/eval.png: the scored images of N evenly spaced prompts, each row captioned with the "
                        "first reward's scores (0 = no grid)")
    p.add_argument("--export", choices=EXPORTS, help="also write every image in an external evaluator's layout under "
                   "--out: geneval -> OUT/geneval/<prompt>/samples/<image>.png + metadata.jsonl, for GenEval's "
                   "evaluate_images.py; t2i-compbench -> OUT/t2i-compbench/samples/<prompt>_<n>.png, for its "
                   "BLIP-VQA, UniDet and CLIPScore scripts, then `flowalign import-scores ... --into OUT`; hpsv2 -> "
                   "OUT/hpsv2/<style>/<index>.jpg, for HPSv2's benchmark evaluation (--prompts: the HPDv2 benchmark "
                   "directory, --seeds 1); vbench (video models, --seeds 5, PyAV) -> OUT/vbench/<prompt>-<k>.mp4, for "
                   "VBench's evaluate.py, each repeated prompt sampled once")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--out", help="output directory, required (must be new or empty, unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted evaluation in --out ({PARTIAL}) with the same arguments: batches "
                        "it finished are not sampled again, and the results equal an uninterrupted run's (one process "
                        "may change --batch-size, e.g. after running out of memory: the images already scored are kept)")
    args = p.parse_args(list(argv))
    if args.list_benchmarks:
        sys.stdout.write(format_protocols() + "\n")
        return 0
    if not args.out:
        raise UserError("--out is required: the output directory for results.jsonl, summary.json and report.html")

    from flowalign.rewards.video import for_outputs
    from flowalign.sample import (check_device, check_guidance, check_lora_dir, check_max_prompts, check_positive,
                                  check_seed, load_lora_checked, resolve_steps)

    # every argument is checked before the model loads and before anything is written
    protocol = load_protocol(args.benchmark) if args.benchmark else None
    if args.model is None:  # a benchmark of one family (shapes-motion-bench: shapes_video) runs on that family
        args.model = protocol.families()[0] if protocol is not None and len(protocol.families()) == 1 else "shapes"
        if protocol is not None and len(protocol.families()) > 1:  # several: the one --path holds, else ask
            from flowalign.models.base import pipeline_family

            held = pipeline_family(args.path) if args.path else None
            if held not in protocol.families():
                choices = " or ".join(f"--model {f}" for f in protocol.families())
                raise UserError(f"benchmark {protocol.name!r} runs on {', '.join(protocol.families())}; pass "
                                f"{choices} (with --path to its weights)")
            args.model = held
            logger.info("--model %s: the family of the pipeline in --path %s", held, args.path)
    from flowalign.models import resolve as resolve_model

    family = resolve_model(args.model)  # an unknown name: one line with the closest one
    fixed = protocol_defaults(protocol, args.model) if protocol is not None else {}
    if protocol is not None and "steps" not in fixed and (args.steps is None or args.guidance is None):
        kinds = {getattr(resolve_model(f), "output_kind", "image") for f in protocol.families()}
        if getattr(family, "output_kind", "image") == "image" and kinds == {"video"}:  # no non-benchmark way either
            raise UserError(f"benchmark {protocol.name!r} scores videos (of {', '.join(protocol.families())}), and "
                            f"--model {args.model} draws images; pass --model {protocol.families()[0]}")
        raise UserError(f"benchmark {protocol.name!r} fixes sampling for {', '.join(protocol.families())}, not "
                        f"--model {args.model}; pass --model {protocol.families()[0]}, or --steps and --guidance to run "
                        f"its prompts and rewards as a non-benchmark evaluation")
    if args.prompts is None:
        args.prompts = fixed.get("prompt_set", getattr(family, "default_prompts", None))
        if args.prompts is None:
            raise UserError(f"--prompts is required for --model {args.model}: a built-in set (e.g. geneval, parti, "
                            f"pickscore) or a .txt/.jsonl file; or --benchmark NAME (--list-benchmarks)")
    if args.rewards is None:
        default = fixed.get("rewards", getattr(family, "default_rewards", None))
        if default is None:
            raise UserError(f"--rewards is required for --model {args.model} (it has no built-in verifier): e.g. "
                            f"--rewards pickscore --reward-arg pickscore.path=/weights/PickScore_v1")
        args.rewards = ",".join(default)
    args.seeds = fixed.get("seeds_per_prompt", 4) if args.seeds is None else args.seeds
    args.seed = fixed.get("seed", 0) if args.seed is None else args.seed
    args.max_prompts = 0 if args.max_prompts is None else args.max_prompts
    args.steps = fixed.get("steps") if args.steps is None else args.steps
    args.guidance = guidance_with_model_args(args.guidance, parse_model_args(args.model, args.model_arg))
    args.guidance = fixed.get("guidance") if args.guidance is None else args.guidance
    if "export" in fixed:  # a benchmark scored by an external evaluator: its images in that evaluator's layout
        if args.export not in (None, fixed["export"]):
            raise UserError(f"benchmark {protocol.name!r} is scored by {EXTERNAL_SCORERS[protocol.external]} on "
                            f"--export {fixed['export']} images; drop --export {args.export}")
        args.export = fixed["export"]
    check_positive(steps=args.steps, seeds=args.seeds, batch_size=args.batch_size)
    check_max_prompts(args.max_prompts)
    if args.grid < 0:
        raise UserError(f"--grid must be >= 0 (0 = no grid), got {args.grid}")
    check_seed(args.seed)
    check_guidance(args.guidance)
    check_device(args.device)
    # under `accelerate launch` / torchrun every process runs this command and samples its share of the batches
    rank, world, _, _ = process_group()
    out = _check_out_dir_once(args.out, args.resume, rank, world)
    if args.resume:  # each rank journals its own batches, assigned by the number of processes
        held = journal_processes(out)
        if held != world:
            raise UserError(f"--resume: the interrupted evaluation in {str(out)!r} ran on {held} process(es) and "
                            f"this one on {world}; resume it on {held}")
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    if not names and not (protocol is not None and protocol.external):  # an external scorer's benchmark needs none
        raise UserError("--rewards is empty; pass e.g. --rewards shapes_strict,shapes_partial")
    reward_kwargs, per_frame, model_kwargs = parse_component_args(args, names)
    if args.lora:
        check_lora_dir(args.lora)
    # --benchmark: its resolution unless --model-arg sets one (then an override, recorded)
    model_kwargs = {**fixed.get("resolution", {}), **model_kwargs}
    if protocol is None:
        protocol = find_protocol(args.prompts)  # a built-in set with a protocol: label the run with it
    records = D.load_prompts(args.prompts)
    records = D.spaced_subset(records, args.max_prompts)
    if args.export == "geneval":
        check_geneval_records(as_records(records))
    elif args.export == "t2i-compbench":
        check_t2i_records(as_records(records))
    elif args.export == "hpsv2":
        check_hpsv2_records(as_records(records), args.seeds)
    from flowalign.rewards import resolve as resolve_reward

    outputs = getattr(family, "output_kind", "image")
    takes = "video" if args.export in VIDEO_EXPORTS else "image"
    if args.export and outputs != takes:  # before the load
        raise UserError(f"--export {args.export} takes {takes}s; --model {args.model} makes {outputs}s")
    unique = {}
    if args.export == "vbench":  # VBench names videos by prompt: a repeated prompt is sampled once
        from flowalign.io import prompts_digest

        check_vbench_export(as_records(records), args.seeds, "--export vbench" if protocol is None or
                            protocol.external != "vbench" else f"--benchmark {args.benchmark} (its --export vbench)")
        source_sha256, source_n = prompts_digest(as_records(records)), len(records)
        records, dropped = unique_vbench_prompts(records)
        if dropped:
            logger.info("--export vbench: %d repeated prompt(s) dropped (VBench names videos by prompt; each is sampled "
                        "once and scored for every dimension that lists it): %d of %d prompts", dropped, len(records),
                        source_n)
            unique = {"unique_prompts": {"dropped": dropped, "prompts": source_n, "prompts_sha256": source_sha256}}
    # the rewards before the model: a wrong reward path is one line, not one after a (long) model load
    rewards = {n: for_outputs(build_reward_checked(n, reward_kwargs[n], f"--reward-arg: reward {n!r}"), outputs,
                              per_frame) for n in names}
    model = load_model(args.model, args.path, device=str(process_device(args.device, world)), **model_kwargs)
    if args.lora:
        load_lora_checked(model, args.lora)
    validate = getattr(model, "validate_prompts", None)  # a closed vocabulary (shapes): the file and line of a bad word
    if validate is not None:
        D.check_prompts(records, validate)
    for r in dict.fromkeys(r.prompt for r in records):
        model.encode([r])  # unreadable prompts fail before any work
    warn_outside_grammar(model, [r.prompt for r in records], args.model, "evaluating")
    for fn in rewards.values():  # rewards that parse their prompts (the shapes verifier): before any sampling
        check = getattr(fn, "validate_prompts", None)
        if check is not None:
            D.check_prompts(records, check)
    steps = resolve_steps(model, args.steps)
    ema = lora_ema(args.lora) if args.lora else None
    extra = {"model": args.model, "path": args.path or None, "lora": args.lora,
             **({"lora_ema": ema} if ema is not None else {}),
             "prompt_set": args.prompts, "max_prompts": args.max_prompts,
             **({"export": args.export} if args.export else {}), **unique,
             **({"model_args": model_args_jsonable(model_kwargs)} if model_kwargs else {}),
             **({"reward_args": reward_kwargs} if any(reward_kwargs.values()) else {}),
             **({"per_frame": per_frame} if per_frame and outputs == "video"
                and any(getattr(fn, "kind", "image") == "image" for fn in map(resolve_reward, names)) else {})}

    def say_benchmark(settings: Mapping[str, Any]) -> None:  # before the long part: will this be a benchmark number?
        status = settings.get("benchmark")
        if status is not None and rank == 0:
            (logger.info if status["benchmark"] else logger.warning)("%s", benchmark_line(status))
    exporter = {"geneval": lambda: GenEvalExport(out / GENEVAL_DIR, as_records(records)),
                "t2i-compbench": lambda: T2ICompBenchExport(out / T2I_DIR, as_records(records), args.seeds),
                "hpsv2": lambda: HPSv2Export(out / HPSV2_DIR, as_records(records)),
                "vbench": lambda: VBenchExport(out / VBENCH_DIR, as_records(records), fps=getattr(model, "fps", None),
                                               size=model.output_size() if callable(getattr(model, "output_size", None))
                                               else None),
                None: lambda: None}[args.export]()
    summ = run_eval(model, records, rewards, out, steps=steps, guidance=args.guidance,
                    seeds_per_prompt=args.seeds, batch_size=args.batch_size, seed=args.seed, grid_prompts=args.grid,
                    resumable=True, resume=args.resume, extra_settings=extra, protocol=protocol,
                    on_images=exporter, shard=(rank, world), on_start=say_benchmark)
    if rank != 0:  # rank 0 writes the results, the report and the log
        return 0
    from flowalign.report import write_report

    write_report(out)
    for task, vals in summ["per_task"].items() if names else ():  # no rewards: an external scorer's benchmark
        n = summ.get("counts", {}).get(task)
        logger.info("%-14s %s%s", task, "  ".join(f"{k}={v:.3f}" for k, v in vals.items()),
                    f"  ({n} image{'' if n == 1 else 's'})" if n is not None else "")
    if names:
        mean_over = "tasks" if summ["settings"].get("overall") == "groups" else "images"
        logger.info("overall        %s  (the mean over %s)", "  ".join(f"{k}={v:.3f}" for k, v in summ["overall"].items()),
                    mean_over)
    for name, per in summ.get("chunks", {}).items():  # the HPSv2 benchmark's statistic
        for style, c in per.items():
            logger.info("%-14s %s over %d chunks: %.4f ± %.4f", style, name, c["chunks"], c["mean"], c["std"])
    for name, pk in summ.get("pass_at_k", {}).items():
        for task, vals in [*pk["per_task"].items(), ("overall", pk["overall"])]:
            logger.info("%-14s %s", task, "  ".join(f"{name} pass@{k}={v:.3f}" for k, v in vals.items()))
    if args.export == "geneval":
        logger.info("GenEval layout in %s; score it with GenEval's `python evaluation/evaluate_images.py %s --outfile "
                    "%s --model-path <OBJECT_DETECTOR_FOLDER>`, then `flowalign import-scores geneval %s --into %s`",
                    out / GENEVAL_DIR, (out / GENEVAL_DIR).resolve(), (out / "geneval_results.jsonl").resolve(),
                    out / "geneval_results.jsonl", out)
    elif args.export == "t2i-compbench":
        logger.info("T2I-CompBench layout in %s; run its evaluator for the category (e.g. `python BLIP_vqa.py --out_dir "
                    "%s/`), then `flowalign import-scores t2i-compbench %s/annotation_blip/vqa_result.json --into %s "
                    "--name blip_vqa`", out / T2I_DIR, (out / T2I_DIR).resolve(), out / T2I_DIR, out)
    elif args.export == "vbench":
        logger.info("VBench layout in %s (%d videos); score it on a GPU machine with VBench's `python evaluate.py "
                    "--videos_path %s --dimension <DIMENSION ...> --output_path %s`, then `flowalign import-scores "
                    "vbench %s/<name>_eval_results.json --into %s`", out / VBENCH_DIR, len(records) * args.seeds,
                    (out / VBENCH_DIR).resolve(), (out / "vbench_results").resolve(), out / "vbench_results", out)
    if "benchmark" in summ["settings"]:
        status = summ["settings"]["benchmark"]
        (logger.info if status["benchmark"] else logger.warning)("%s", benchmark_line(status))
    logger.info("wrote %s: results.jsonl, summary.json, %sreport.html", out, "grids/eval.png, " if args.grid else "")
    return 0
