"""``flowalign compare RUN... --out DIR``: several training runs on one plot and in one table.

Used for the credit-method experiment (docs/credit.md): every run evaluates ``shapes-bench`` every few
iterations (``eval.every``), and this command puts the headline metric of each run against the rollouts it
consumed and against its cumulative transformer forwards (NFE: every ``nfe/*`` phase, sampling + probing + guidance +
training, but not the evaluations' ``nfe/other``; a CFG step counts once), so methods are compared at equal rollouts
*and* at equal compute. Writes ``DIR/compare.png`` and ``DIR/compare.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from flowalign.errors import CommandParser, UserError, first_line

logger = logging.getLogger(__name__)


def _short_value(v: Any) -> str:
    """A credit option's value for a run label: lists without brackets' padding ([1, 2, 3] → 1,2,3)."""
    if isinstance(v, (list, tuple)):
        return ",".join(_short_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_wall_s(records: Sequence[Any]) -> float:
    """Wall time of a training run from its metrics records: the last ``time/elapsed_s``. The trainer logs it
    cumulatively across resumed sessions; in runs of earlier versions it restarted at 0 in each session, and a value
    below the previous one starts a new session, whose time is added to that of the sessions before."""
    wall = done = 0.0  # done: the wall time of earlier sessions
    for r in records:
        elapsed = r.get("time/elapsed_s") if isinstance(r, dict) and isinstance(r.get("iteration"), int) else None
        if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool):
            if elapsed < wall - done:  # a new session began
                done = wall
            wall = done + float(elapsed)
    return wall


def first_reward(summary: dict) -> Optional[str]:
    """The reward an evaluation's summary lists first (``settings["rewards"]``, else its overall means), or None."""
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    listed = settings.get("rewards")
    if isinstance(listed, list) and listed and isinstance(listed[0], str):
        return listed[0]
    return next(iter(summary.get("overall") or {}), None)


def run_curve(run_dir: str | Path, reward: Optional[str] = None) -> dict[str, Any]:
    """Evaluation points of one run: ``{"label", "credit", "rollouts": [...], "nfe": [...], "value": [...], ...}``
    (``"rewards"``: every reward its evaluations hold; ``value`` is empty when ``reward`` is none of them; ``reward``
    None: the first reward of its base evaluation, else of its first, as ``"reward"`` says).

    Point 0 is the base model (0 rollouts, 0 NFE); ``step-N`` is after iteration N; ``final`` after the last one.
    Rollouts after N iterations = N · groups_per_iter · group_size (the trajectories sampled, whatever the
    credit method spends on probes); NFE after N iterations = the sum over phases of the cumulative ``nfe/*``
    counters logged at iteration N: sampling, probing and training (``nfe/other``, the evaluations, is left out).
    """
    import yaml

    from flowalign.io import read_jsonl
    from flowalign.report import find_summaries, read_summary

    run = Path(run_dir)
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{run} is not a run directory (no config.yaml); pass directories written by `flowalign train`")
    try:
        cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{cfg_file}{where}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{cfg_file} is not UTF-8 text ({err.reason} at byte {err.start}); restore the run's "
                        f"config.yaml") from None
    except (ValueError, TypeError) as err:  # PyYAML's constructors, e.g. `!!float abc`
        raise UserError(f"{cfg_file}: invalid YAML ({first_line(err)})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("train") or {}, dict):
        raise UserError(f"{cfg_file}: not a flowalign config (needs a mapping with a train: mapping)")
    # a hand-edited config.yaml: a section or an option that is not a mapping, a count that is not a number
    for section, sub in (("credit", "options"), ("sampler", "plan_options"), ("sampler", "guide_options")):
        sec = cfg.get(section) or {}
        if not isinstance(sec, dict):
            raise UserError(f"{cfg_file}: {section}: must be a mapping of options, got {sec!r}")
        if not isinstance(sec.get(sub) or {}, dict):
            raise UserError(f"{cfg_file}: {section}.{sub}: must be a mapping of options, got {sec[sub]!r}")
    train = cfg.get("train") or {}

    def count(key: str, unset_is_zero: bool = False) -> int:
        value = train.get(key, 0)
        if value is None and unset_is_zero:
            return 0
        try:
            if isinstance(value, bool) or int(value) != value:
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{cfg_file}: train.{key} must be an integer, got {value!r}; restore the run's "
                            f"config.yaml") from None

    per_iter = count("groups_per_iter") * count("group_size")
    metrics = run / "metrics.jsonl"
    try:
        records = read_jsonl(metrics) if metrics.is_file() else []
    except UnicodeDecodeError as err:  # a ValueError too, whose text does not name the file
        raise UserError(f"{metrics} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except ValueError as err:  # a corrupt line before the last one
        raise UserError(str(err)) from None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{metrics}: record {i + 1} is a JSON {type(rec).__name__}, not an object")
    nfe_after: dict[int, float] = {0: 0.0}
    sampled: dict[int, int] = {}  # iteration -> final samples scored (plans like TempFlow branching add rows)
    total, last_it = 0.0, 0
    phases: set[str] = set()  # the nfe/* phases summed into NFE (for the axis label)
    final_logged = 0  # the last end-of-run eval line (eval/*, no per-iteration keys): where eval/final was taken
    for r in records:
        it = r.get("iteration")
        if not isinstance(it, int):
            continue
        if isinstance(r.get("rollouts/iteration"), (int, float)):
            sampled[it] = int(r["rollouts/iteration"])  # a resumed run may repeat an iteration: keep the last
        spent = {k[len("nfe/"):]: float(v) for k, v in r.items() if k.startswith("nfe/") and k != "nfe/other"
                 and isinstance(v, (int, float))}
        counters = list(spent.values())
        phases.update(spent)
        if counters:  # the trainer logs cumulative counters per phase
            total = sum(counters)
            nfe_after[it] = total
        elif (it > 0 and any(k.startswith("eval/") for k in r) and "time/iteration_s" not in r
              and not any(k.startswith(("train/", "rollouts/")) for k in r)):
            final_logged = it
        last_it = max(last_it, it)
    wall = run_wall_s(records)
    sums = find_summaries(run)
    if not sums or "eval" in sums:  # "eval": a lone `flowalign eval` summary.json, no eval/<label>/ of a run
        raise UserError(f"{run} has no evaluations (eval/*/summary.json); train with eval.before/eval.every/eval.after")
    pts = []
    available: set[str] = set()  # the rewards the evaluations of this run hold (to name them when ``reward`` is not one)
    # ``final`` is after the last iteration; without a logged iteration (no metrics.jsonl) fall back to the
    # config's train.iterations, never 0, where it would silently replace the base point
    # a run resumed with a larger train.iterations keeps its earlier eval/final until the new one is written
    final_it = final_logged or (last_it if last_it > 0 else count("iterations", unset_is_zero=True))
    if "final" in sums and final_it <= 0:
        raise UserError(f"{run}: cannot place eval/final (no iterations in metrics.jsonl or train.iterations in "
                        f"config.yaml)")
    summaries = {label: (path, read_summary(path)) for label, path in sums.items()}
    eval_ref = next(iter(summaries.values()))[1]  # its settings stand for how this run was evaluated (base, else first)
    if reward is None:
        reward = first_reward(eval_ref) or "shapes_strict"
    for label, (path, summary) in summaries.items():
        it = 0 if label == "base" else (final_it if label == "final" else int(label.split("-", 1)[1]))
        overall = summary["overall"]
        available.update(overall)
        value = overall.get(reward)
        if value is None:
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{path}: {reward} is {value!r}, not a number") from None
        if not math.isfinite(value):
            continue
        pts.append((it, value))
    pts = sorted(dict(pts).items())  # a final eval at the last step replaces the step-N one
    credit = cfg.get("credit") or {}
    c_opts = credit.get("options") or {}
    tags = [str(p)] if (p := c_opts.get("probe")) else []
    tags += [f"{k} {_short_value(v)}" for k, v in c_opts.items() if k != "probe"]  # e.g. G²RPO's strides
    sampler = cfg.get("sampler") or {}
    if sampler.get("plan") == "branch":  # TempFlow: one random step vs every step are different methods in cost
        tags.append(f"branch_steps {(sampler.get('plan_options') or {}).get('branch_steps', 'all')}")
    if sampler.get("guide", "none") != "none":  # guided rollouts (Euphonium): the guide and its strength
        lam = (sampler.get("guide_options") or {}).get("lam")
        tags.append(f"{sampler['guide']}" + (f" λ={lam:g}" if isinstance(lam, (int, float)) else ""))
    objective = (cfg.get("train") or {}).get("objective", "grpo")
    if objective != "grpo":  # another update rule (DiffusionNFT) on the same rollouts and rewards
        tags.append(f"objective {objective}")
    same = _setting(cfg_file, cfg)  # what must match for runs to be seeds of one setting
    from flowalign.config import DataConfig

    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    planned = train.get("iterations")
    return {
        "label": run.name,
        "prompt_set": str(data.get("eval_prompts") or DataConfig().eval_prompts),  # unset: the config's default
        "seed": train.get("seed"),
        "setting": json.dumps(same, sort_keys=True, default=str),
        "credit": str(credit.get("name", "outcome")) + (f" ({', '.join(tags)})" if tags else ""),
        "iterations": [p[0] for p in pts],
        "rollouts": [sum(sampled.get(i, per_iter) for i in range(1, p[0] + 1)) for p in pts],
        "nfe": [nfe_after.get(p[0], float("nan")) for p in pts],
        "value": [p[1] for p in pts],
        "wall_s": wall,
        "metrics": bool(records),  # False: no metrics.jsonl (or an empty one), so NFE and wall time are unknown
        "nfe_phases": sorted(phases),
        "last_iteration": last_it,  # the last iteration metrics.jsonl logged (0: none)
        # train.iterations, 0 when unset or not a count (only the notes on unfinished runs use it)
        "planned_iterations": planned if isinstance(planned, int) and not isinstance(planned, bool) else 0,
        "rewards": sorted(available),
        "reward": reward,
        "eval_summary": eval_ref,
    }


def default_reward_note(reward: str, source: str, rewards: Sequence[str], flag: str = "--reward") -> str:
    """The log line's words for a reward chosen by default: that it is the first of ``source``, how to pick another."""
    others = [r for r in rewards if r != reward]
    how = f"pass {flag} to pick another: {', '.join(others)}" if others else "the only one"
    return f"{reward}, the first reward of {source} ({how})"


def _check_curves(curves: Sequence[dict[str, Any]], reward: str) -> None:
    """One-line ``UserError`` when a run has no evaluation point of ``reward`` (suggesting the closest reward)."""
    for c in curves:
        if c["value"]:
            continue
        if reward in c["rewards"]:
            raise UserError(f"run {c['label']}: no finite {reward!r} value in its evaluations (eval/*/summary.json)")
        import difflib

        close = difflib.get_close_matches(reward, c["rewards"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"--reward {reward!r} is not in the evaluations of run {c['label']} "
                        f"(they hold: {', '.join(c['rewards']) or 'nothing'}){hint}")


def _setting(cfg_file: Path, raw: dict) -> dict:
    """The run's resolved config (defaults filled in, so a run made before a field existed still matches a newer
    one) without ``output.*``, ``train.seed`` and what changes neither training nor the evaluation numbers (the
    device, checkpointing, the eval batch size and grids); the raw YAML when it no longer loads."""
    from flowalign import config as C

    try:
        tree = C.to_dict(C.load_config(str(cfg_file)))
    except UserError:
        tree = dict(raw)
    tree = {k: v for k, v in tree.items() if k != "output"}
    tree["train"] = {k: v for k, v in (tree.get("train") or {}).items()
                     if k not in ("seed", "checkpoint_every", "keep_checkpoints")}
    tree["model"] = {k: v for k, v in (tree.get("model") or {}).items() if k != "device"}
    tree["eval"] = {k: v for k, v in (tree.get("eval") or {}).items() if k not in ("batch_size", "grid_prompts")}
    return tree


def mean_over_seeds(curves: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs whose configs differ only in ``train.seed`` (and ``output.*``, the device, checkpointing: ``_setting``)
    merged into one curve per setting, in the order of their first run: ``value`` is the mean over seeds at each evaluation point, ``lo``/``hi`` the
    smallest and largest seed, ``seeds`` the seeds and ``finals`` each seed's last value; rollouts, NFE and wall
    time are means. A one-line ``UserError`` when the runs of one setting were evaluated at different points."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in curves:
        groups.setdefault(c["setting"], []).append(c)
    out = []
    for runs in groups.values():
        first = runs[0]
        for c in runs[1:]:
            if c["iterations"] != first["iterations"]:
                raise UserError(f"runs {first['label']} and {c['label']} have the same settings but were evaluated at "
                                f"different iterations ({first['iterations']} vs {c['iterations']}); finish both or "
                                f"compare them without --mean-over-seeds")
        seeds = [c["seed"] for c in runs]
        if len(set(seeds)) < len(seeds):
            raise UserError(f"runs {', '.join(c['label'] for c in runs)} have the same settings and the same seed "
                            f"({seeds}); pass each seed once")
        cols = list(zip(*(c["value"] for c in runs)))  # per evaluation point: one value per seed

        def mean(key: str) -> list[float]:
            return [sum(v) / len(v) for v in zip(*(c[key] for c in runs))]

        label = first["label"] if len(runs) == 1 else f"{first['label']} (+{len(runs) - 1} seed{'s' * (len(runs) > 2)})"
        out.append({**first, "label": label, "value": [sum(v) / len(v) for v in cols], "lo": [min(v) for v in cols],
                    "hi": [max(v) for v in cols], "rollouts": mean("rollouts"), "nfe": mean("nfe"),
                    "wall_s": sum(c["wall_s"] for c in runs) / len(runs), "seeds": seeds,
                    "finals": [c["value"][-1] for c in runs]})
    return out


def _check_out_dir(out: Path) -> None:
    """One-line ``UserError`` when ``--out`` exists as a file, lies under one, or cannot be written (not writable
    itself, or its nearest existing parent is not): ``mkdir`` or the write would fail after the runs were read."""
    from flowalign.io import check_out_parent

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; pass a directory for compare.png and compare.md")
    for parent in out.absolute().parents:  # mkdir under a file fails too
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {str(out)!r} is under {str(parent)!r}, a file; pass a directory")
            break
    check_out_parent(out)


def _unique_labels(curves: Sequence[dict[str, Any]], run_dirs: Sequence[str | Path]) -> None:
    """Runs of the same directory name (``runs/<method>/seed42``) are labelled by as many trailing path parts as
    tell them apart; the same directory passed twice keeps its name."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    for i, c in enumerate(curves):
        others = {parts[j] for j in range(len(parts)) if parts[j] != parts[i] and parts[j][-1] == parts[i][-1]}
        if not others:
            continue
        k = 1
        while k < len(parts[i]) and any(o[-k:] == parts[i][-k:] for o in others):
            k += 1
        c["label"] = "/".join(parts[i][-k:])


def eval_subset(curve: dict[str, Any]) -> Optional[int]:
    """The number of prompts a run's evaluations took of their prompt set with ``eval.max_prompts``, or None when they
    used all of it: their settings record ``max_prompts`` = ``prompts`` > 0 and, for a set with a frozen protocol, a
    ``prompts`` override of the protocol (without one the whole set was used)."""
    summary = curve.get("eval_summary") or {}
    st = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    n, limit, bench = st.get("prompts"), st.get("max_prompts"), st.get("benchmark")
    whole_protocol = isinstance(bench, dict) and "prompts" not in (bench.get("overrides") or {})
    if isinstance(n, int) and isinstance(limit, int) and 0 < limit == n and not whole_protocol:
        return n
    return None


def y_label(curves: Sequence[dict[str, Any]], reward: str) -> str:
    """The plots' y label: the evaluation prompt set(s) of the runs (``data.eval_prompts``; a file by its name), each
    with the subsets the runs evaluated (``eval_subset``), and the reward, e.g. ``shapes-bench shapes_strict``,
    ``shapes-bench (24-prompt subset) shapes_strict`` or ``prompts.txt, shapes-bench pickscore`` for mixed runs."""
    sets: dict[str, dict[str, None]] = {}
    for c in curves:
        n = eval_subset(c)
        sets.setdefault(Path(str(c["prompt_set"])).name, {})[f"{n}-prompt subset" if n else "all prompts"] = None
    named = [name if list(parts) == ["all prompts"] else f"{name} ({' / '.join(parts)})"
             for name, parts in sets.items()]
    return f"{', '.join(named)} {reward}"


def evaluated_as(ref: dict, summary: dict) -> str:
    """How ``summary``'s evaluation differs from ``ref``'s, in its own settings (``12 prompts, 8 steps``); '' when they
    match on every setting ``report.eval_mismatch`` compares."""
    from flowalign.report import _EVAL_PROTOCOL_KEYS

    sa = ref.get("settings") if isinstance(ref.get("settings"), dict) else {}
    sb = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    keys = [k for k in _EVAL_PROTOCOL_KEYS if k in sa and k in sb and sa[k] != sb[k]]
    if "prompts" in keys and "prompts_sha256" in keys:  # another count: other prompts goes without saying
        keys.remove("prompts_sha256")

    def words(key: str, v: Any) -> str:
        if key == "resolution" and isinstance(v, dict):
            return f"{v.get('height')}x{v.get('width')}"
        return {"prompts_sha256": "other prompts", "prompts": f"{v} prompts", "steps": f"{v} steps",
                "seeds_per_prompt": f"{v} image{'s' * (v != 1)} per prompt", "overall": f"overall over {v}",
                }.get(key, f"{key} {v}")

    return ", ".join(words(k, sb[k]) for k in keys)


def after_training(curve: dict[str, Any]) -> list[float]:
    """The values of a run's evaluations after training (every point but the base model's)."""
    return [v for it, v in zip(curve["iterations"], curve["value"]) if it > 0]


def progress_note(curve: dict[str, Any]) -> Optional[str]:
    """A note for the table when a run's last value is not the end of its training: no evaluation after training
    (killed or still running before its first), or a last evaluation before ``train.iterations``; None otherwise."""
    its = [it for it in curve["iterations"] if it > 0]
    planned = curve.get("planned_iterations") or 0
    of = f" of {planned}" if planned else ""
    logged = (f"metrics.jsonl ends at iteration {curve.get('last_iteration', 0)}{of}" if curve.get("metrics")
              else f"no metrics.jsonl{f' ({planned} iterations planned)' if planned else ''}")
    if not its:
        return f"{curve['label']}: no evaluation after training; {logged}"
    if planned and its[-1] < planned:
        return (f"{curve['label']}: last evaluation after iteration {its[-1]}{of} (its final column); "
                f"{logged}")
    return None


def nfe_axis_label(curves: Sequence[dict[str, Any]]) -> str:
    """The NFE axis's label: exactly what ``run_curve`` sums, the runs' ``nfe/*`` phases but ``nfe/other`` (the
    evaluations and grids), one per image and step: a classifier-free-guidance step, two transformer rows, counts
    once (``values.NFECounter`` counts the rows ``model.velocity`` is called with)."""
    order = ["sampling", "probing", "guidance", "reference", "training"]
    found = {p for c in curves for p in c.get("nfe_phases", ())}
    phases = [p for p in order if p in found] + sorted(found - set(order))
    return (f"transformer forwards, thousands ({' + '.join(phases) or 'training phases'}; "
            f"no evaluations; a CFG step counts once)")


def _write_outputs(out: Path, fig: Any, lines: Sequence[str]) -> tuple[Path, Path]:
    """``out/compare.png`` (the figure, then closed) and ``out/compare.md`` (the lines), each written atomically."""
    import io

    import matplotlib.pyplot as plt

    from flowalign.io import atomic_write_bytes, atomic_write_text

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(out / "compare.png", buf.getvalue()), atomic_write_text(out / "compare.md",
                                                                                      "\n".join(lines) + "\n")


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path, reward: Optional[str] = None, *,
            seeds_mean: bool = False) -> tuple[Path, Path]:
    """Plot and tabulate ``reward`` of each run against rollouts and NFE; returns (png, md). ``reward`` None: the
    first run's first evaluation reward (``run_curve``).

    ``seeds_mean``: runs that differ only in ``train.seed`` become one curve (the mean, with a band from the
    lowest to the highest seed) and one table row that also lists every seed's final value (``mean_over_seeds``).
    Runs evaluated with other settings than the first (``report.eval_mismatch`` of their eval/base summary, else their
    first) are listed above the table and logged as a warning; a run without metrics.jsonl shows its NFE and wall
    time as unknown (–), with a note below the table.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    out = Path(out_dir)
    _check_out_dir(out)
    first = run_curve(run_dirs[0], reward)
    if reward is None:
        reward = first["reward"]
        logger.info("comparing %s",
                    default_reward_note(reward, f"run {first['label']}'s evaluations", first["rewards"]))
    curves = [first, *(run_curve(d, reward) for d in run_dirs[1:])]
    _check_curves(curves, reward)  # before anything is written
    _unique_labels(curves, run_dirs)
    lines = []
    # runs evaluated with other settings (steps, seeds, prompts, ...) are not compared on the same footing
    from flowalign.report import eval_mismatch

    ref = curves[0]
    mismatched = [(c["label"], m) for c in curves[1:] if (m := eval_mismatch(ref["eval_summary"], c["eval_summary"]))]
    for c in curves:  # before merging seeds, which keep their first run's entry: the legend marks these runs
        c["evaluated_as"] = evaluated_as(ref["eval_summary"], c["eval_summary"]) if c is not ref else ""
    for label, m in mismatched:
        logger.warning("run %s was evaluated with other settings than %s (%s): their values are not comparable",
                       label, ref["label"], m)
    if mismatched:
        lines += ["- eval settings that differ: " + "; ".join(f"{label}: {m}" for label, m in mismatched)
                  + f" (each against {ref['label']}, first)", ""]
    no_metrics = [c["label"] for c in curves if not c["metrics"]]
    if seeds_mean:
        curves = mean_over_seeds(curves)
    per_seed = " | seeds: final each" if seeds_mean else ""
    lines += [f"| run | credit | rollouts | NFE | wall (s) | base {reward} | final {reward}{' (mean)' * seeds_mean} | Δ | "
              f"best after training{' (mean curve)' * seeds_mean}{per_seed} |",
              "|---|---|---|---|---|---|---|---|---|" + "---|" * seeds_mean]
    for c in curves:
        v, trained = c["value"], after_training(c)
        has_base = c["iterations"][0] == 0  # without eval.before the first point is a later step, not the base
        base = f"{v[0]:.3f}" if has_base else "–"
        # no evaluation after training: the base value is no final, and no rollouts or forwards led to one
        final, best = (f"{v[-1]:.3f}", f"{max(trained):.3f}") if trained else ("none after training", "–")
        delta = f"{v[-1] - v[0]:+.3f}" if has_base and trained else "–"
        seeds = (" | " + ", ".join(f"{s}: {f:.3f}" if trained else f"{s}: –"
                                   for s, f in zip(c["seeds"], c["finals"])) if seeds_mean else "")
        nfe = f"{c['nfe'][-1]:,.0f}" if trained and math.isfinite(c["nfe"][-1]) else "–"
        rollouts = f"{c['rollouts'][-1]:,.0f}" if trained else "–"
        wall = f"{c['wall_s']:.0f}" if c["metrics"] or c["wall_s"] else "–"
        lines.append(f"| {c['label']} | {c['credit']} | {rollouts} | {nfe} | "
                     f"{wall} | {base} | {final} | {delta} | {best}{seeds} |")
    if no_metrics:
        lines += ["", f"– NFE and wall time unknown: no metrics.jsonl in {', '.join(no_metrics)} (its rollouts count "
                      f"train.iterations from config.yaml)."]
    notes = [n for c in curves if (n := progress_note(c))]
    if notes:
        lines += ["", "Unfinished or partly evaluated runs (the table's final and Δ are their last evaluation's; "
                      "– where there is none after training):", *(f"- {n}" for n in notes)]
    below = len(curves) > 6  # many runs: the legend goes under the plots instead of over the curves
    rows = -(-len(curves) // 2) if below else 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4 + 0.15 * rows), dpi=110)
    # more runs than the 10-colour cycle: each further cycle of colours gets its own line style and marker
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    for i, c in enumerate(curves):
        name = f"{c['label']}: {c['credit']}"
        ls, mk = styles[(i // len(colours)) % len(styles)]
        if c.get("evaluated_as"):  # dashed: its values are not on the same footing as the first run's
            name += f" (evaluated differently: {c['evaluated_as']})"
            ls = "--"
        if not after_training(c):
            name += " (no evaluation after training)"
        kw = dict(color=colours[i % len(colours)], linestyle=ls, marker=mk, markersize=3, label=name)
        axes[0].plot(c["rollouts"], c["value"], **kw)
        axes[1].plot([n / 1e3 for n in c["nfe"]], c["value"], **kw)
        if len(c.get("seeds", ())) > 1:  # the spread of the seeds around their mean
            axes[0].fill_between(c["rollouts"], c["lo"], c["hi"], color=kw["color"], alpha=0.12, linewidth=0)
            axes[1].fill_between([n / 1e3 for n in c["nfe"]], c["lo"], c["hi"], color=kw["color"], alpha=0.12,
                                 linewidth=0)
    axes[0].set_xlabel("rollouts (trajectories sampled)")
    import textwrap

    axes[1].set_xlabel(textwrap.fill(nfe_axis_label(curves), 60))
    ylabel = textwrap.fill(y_label(curves, reward), 40)  # a subset or several sets: on two lines
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if below:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
        fig.tight_layout(rect=(0, 0.15 * rows / (4 + 0.15 * rows), 1, 1))
    else:
        axes[0].legend(fontsize=7, loc="best")
        fig.tight_layout()
    return _write_outputs(out, fig, lines)


# ---- evaluations of several models on the same prompts and seeds -------------------------------------------------

# A paired-bootstrap interval over fewer prompts than this is unreliable (never starred, marked †): the percentile
# bootstrap undercovers on small samples, and with 2 prompts its 95 % interval is just the range of their 2 changes,
# which excludes 0 whenever both changed the same way.
MIN_INTERVAL_PROMPTS = 10


def interval_reliable(r: dict, n_prompts: int) -> bool:
    """Whether a finite paired-bootstrap interval (``r``: ``delta``, ``lo``, ``hi``) may back a significance claim: it
    was resampled from at least ``MIN_INTERVAL_PROMPTS`` prompts and has a width (a zero-width interval means every
    resample gave the same change, e.g. every prompt changed by as much: no spread was measured, not certainty)."""
    return n_prompts >= MIN_INTERVAL_PROMPTS and r["hi"] > r["lo"]


# settings that say which model was evaluated (a comparison's subject) or that every evaluation repeats anyway
_SUBJECT = {"model", "path", "lora", "lora_ema", "trained_iterations", "model_args", "reward_args", "benchmark",
            "reward_versions", "external_scores", "export"}


def is_eval_dir(path: str | Path) -> bool:
    """An evaluation's output (``flowalign eval --out``, a training run's ``eval/<tag>``): summary.json and
    results.jsonl, and no config.yaml (a training run's own directory)."""
    d = Path(path)
    return (d / "summary.json").is_file() and (d / "results.jsonl").is_file() and not (d / "config.yaml").is_file()


def _eval_label(path: Path) -> str:
    """A training run's ``RUN/eval/final`` as ``RUN/final``; anything else by its directory name."""
    p = Path(os.path.abspath(path))
    return f"{p.parent.parent.name}/{p.name}" if p.parent.name == "eval" else p.name


def read_eval(path: str | Path, reward: str) -> dict[str, Any]:
    """``{"label", "dir", "settings", "summary", "records"}`` of one evaluation directory, or a one-line ``UserError``
    (not an evaluation, unreadable files, ``reward`` not scored there)."""
    from flowalign.io import read_jsonl
    from flowalign.report import read_summary

    d = Path(path)
    if not is_eval_dir(d):
        raise UserError(f"{d} is not an evaluation directory (summary.json and results.jsonl, written by "
                        f"`flowalign eval` or a training run's eval/<tag>)")
    try:
        summary = read_summary(d / "summary.json")
        records = read_jsonl(d / "results.jsonl")
    except (OSError, ValueError) as err:
        raise UserError(f"{d}: cannot read its evaluation ({first_line(err)})") from None
    if not records or not all(isinstance(r, dict) and "prompt_index" in r and "sample" in r for r in records):
        raise UserError(f"{d / 'results.jsonl'} holds no per-image records (prompt_index, sample); re-run the evaluation")
    settings = summary.get("settings") if isinstance(summary.get("settings"), dict) else {}
    if isinstance(settings.get("rewards"), list):  # the scores: its rewards and what was imported, not metadata
        scored = [*settings["rewards"], *(settings.get("external_scores") or {})]
    else:  # an evaluation written before settings listed its rewards: every numeric field but the job's own
        scored = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))
                         and not isinstance(v, bool)} - {"prompt_index", "sample", "seed", "style_index"})
    if reward is None:
        reward = scored[0] if scored else "shapes_strict"
    if reward not in scored:
        import difflib

        close = difflib.get_close_matches(reward, scored, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"--reward {reward!r} is not scored in {d} (it holds: {', '.join(scored) or 'nothing'}){hint}")
    return {"label": _eval_label(d), "dir": d, "settings": settings, "summary": summary, "records": records,
            "reward": reward, "rewards": scored}


def compare_evals(eval_dirs: Sequence[str | Path], out_dir: str | Path, reward: Optional[str] = None, *,
                  n_boot: int = 2000) -> tuple[Path, Path]:
    """Several models evaluated on the same prompts and noise seeds, against the first: ``compare.md`` (per task and
    overall: each model's mean ``reward`` and its change from the first with a 95 % paired-bootstrap interval,
    ``evaluate.paired_bootstrap``; * where the interval excludes 0) and ``compare.png`` (the same as bars).

    Evaluations that did not sample the same (prompt, image) jobs from the same seeds are refused in one line; other
    differences (steps, guidance, resolution, ...) are allowed and listed above the table, as is each one's benchmark
    label. The overall convention is the first evaluation's (``settings["overall"]``); ``reward`` None = the first
    evaluation's first reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowalign.evaluate import paired_bootstrap
    from flowalign.report import benchmark_line

    out = Path(out_dir)
    _check_out_dir(out)
    first = read_eval(eval_dirs[0], reward)
    if reward is None:
        reward = first["reward"]
        logger.info("comparing %s", default_reward_note(reward, f"{first['label']}'s evaluation", first["rewards"]))
    evals = [first, *(read_eval(d, reward) for d in eval_dirs[1:])]
    _unique_labels(evals, eval_dirs)
    ref = evals[0]
    overall = ref["settings"].get("overall", "groups")
    for e in evals[1:]:
        if e["settings"].get("overall", "groups") != overall:
            raise UserError(f"{e['label']} averages its overall over {e['settings'].get('overall', 'groups')}, "
                            f"{ref['label']} over {overall}; compare evaluations of the same protocol")
    # `flowalign steer` outputs are other images than plain samples of the same seeds (best of k, resampled): they are
    # paired with the others by prompt and output index, not by noise
    def is_steered(e: dict) -> bool:  # `steer --method none` with the ODE draws the evaluation's own images
        st = e["settings"]
        return "steer_rewards" in st and (st.get("method") != "none" or bool(st.get("eta")))

    steered = [e["label"] for e in evals if is_steered(e)]
    results = []
    for e in evals[1:]:  # before anything is written: every pair must be comparable
        pair_steered = is_steered(ref) or is_steered(e)
        try:
            results.append(paired_bootstrap(ref["records"], e["records"], reward, overall=overall, n_boot=n_boot,
                                            same_noise=not pair_steered))
        except ValueError as err:
            how = "image for image" if not pair_steered else "prompt for prompt"
            # the error's counts and values are the reference's first, then this evaluation's
            raise UserError(f"{ref['label']} and {e['label']} cannot be compared {how}: {err}; evaluate (steer) "
                            f"both with the same prompts, --seeds and --seed") from None
    keys = sorted({k for e in evals for k in e["settings"]} - _SUBJECT)
    differ = [k for k in keys if len({json.dumps(e["settings"].get(k), sort_keys=True, default=str) for e in evals}) > 1]
    same = "prompts and seeds" if not steered else "prompts"
    lines = [f"# {reward}: {len(evals)} evaluations on the same {same} (reference: {ref['label']})", ""]
    if steered:
        lines += [f"Steered outputs ({', '.join(steered)}) are not the images plain sampling draws from the same "
                  f"seeds: their pairs share the prompt and output index, not the noise (the other pairs are image "
                  f"for image).", ""]
    for e in evals:
        st = e["settings"]
        what = ", ".join(f"{k}={st[k]}" for k in ("model", "path", "lora") if st.get(k)) or "settings not recorded"
        bench = f"; {benchmark_line(st['benchmark'])}" if isinstance(st.get("benchmark"), dict) else ""
        lines.append(f"- **{e['label']}**: {what}{bench}")
    if differ:
        lines.append("- settings that differ: " + "; ".join(
            f"{k}: " + " / ".join(str(e["settings"].get(k)) for e in evals) for k in differ))
    lines += ["", f"Δ: change from {ref['label']} with its {int(100 * results[0]['level']) if results else 95} % "
                  f"paired-bootstrap interval over prompts ({n_boot} resamples); * the interval excludes 0. "
                  f"† the interval is unreliable and never starred: fewer than {MIN_INTERVAL_PROMPTS} prompts (in the "
                  f"task; overall: in all), too few for a bootstrap, or zero width (every resample gave the same "
                  f"change, e.g. every prompt changed by as much). "
                  f"Overall: the mean over {'tasks' if overall == 'groups' else 'images'}. n/a: a task of one prompt "
                  f"(nothing to resample; overall too when there is one).", ""]
    tasks = list(ref["summary"].get("per_task", {}))
    from flowalign.evaluate import _group_of  # the tasks paired_bootstrap resamples within

    prompts_in: dict[Optional[str], set] = {None: {r["prompt_index"] for r in ref["records"]}}
    for r in ref["records"]:
        prompts_in.setdefault(_group_of(r, "task"), set()).add(r["prompt_index"])
    lines.append("| task | " + " | ".join(e["label"] for e in evals) + " |")
    lines.append("|---|" + "---|" * len(evals))

    def cell(mean: Any, r: Optional[dict], task: Optional[str]) -> str:
        m = f"{mean:.3f}" if isinstance(mean, (int, float)) and math.isfinite(mean) else "–"
        if r is None:
            return m
        if not math.isfinite(r["delta"]):
            return f"{m} (–)"
        if not (math.isfinite(r["lo"]) and math.isfinite(r["hi"])):  # one prompt: nothing to resample
            return f"{m} ({r['delta']:+.3f} [n/a])"
        if not interval_reliable(r, len(prompts_in.get(task, ()))):
            return f"{m} ({r['delta']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}])†"
        star = "*" if r["lo"] > 0 or r["hi"] < 0 else ""
        return f"{m} ({r['delta']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]){star}"

    def mean_of(e: dict, task: Optional[str]) -> Any:
        s = e["summary"]
        return (s.get("overall", {}) if task is None else s.get("per_task", {}).get(task, {})).get(reward)

    for task in [*tasks, None]:
        row = [cell(mean_of(ref, task), None, task)]
        row += [cell(mean_of(e, task), r if task is None else r["per_task"].get(task), task)
                for e, r in zip(evals[1:], results)]
        name = "**overall**" if task is None else task
        lines.append(f"| {name} | " + " | ".join(row) + " |")

    # values above, changes with their intervals below: an interval of the change drawn around a mean would reach
    # values the reward cannot take
    names = [*tasks, "overall"]
    fig, (ax, ax_d) = plt.subplots(2, 1, sharex=True, dpi=110, gridspec_kw={"height_ratios": (3, 2)},
                                   figsize=(max(6.0, 1.1 * len(names) * max(1, len(evals)) ** 0.5 + 2), 6))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    width = 0.8 / len(evals)
    no_interval = {"delta": math.nan, "lo": math.nan, "hi": math.nan}
    for j, e in enumerate(evals):
        colour = colours[j % len(colours)]
        ys = [mean_of(e, t) for t in tasks] + [mean_of(e, None)]
        ys = [y if isinstance(y, (int, float)) and math.isfinite(y) else 0.0 for y in ys]
        xs = [i + (j - (len(evals) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, ys, width=width, label=e["label"], color=colour)
        if j == 0:
            continue
        r = results[j - 1]
        iv = [r["per_task"].get(t, no_interval) for t in tasks] + [r]
        ds = [v["delta"] if math.isfinite(v["delta"]) else 0.0 for v in iv]
        ax_d.bar(xs, ds, width=width, color=colour)
        known = [i for i, v in enumerate(iv) if all(math.isfinite(v[k]) for k in ("delta", "lo", "hi"))]
        n_of = [len(prompts_in.get(t, ())) for t in [*tasks, None]]
        for ok, colour_bar in ((True, "black"), (False, "0.6")):  # grey: the unreliable intervals (†)
            shown = [i for i in known if interval_reliable(iv[i], n_of[i]) is ok]
            if shown:
                ax_d.errorbar([xs[i] for i in shown], [ds[i] for i in shown], fmt="none", ecolor=colour_bar,
                              capsize=2, elinewidth=0.8,
                              yerr=[[max(0.0, iv[i]["delta"] - iv[i]["lo"]) for i in shown],
                                    [max(0.0, iv[i]["hi"] - iv[i]["delta"]) for i in shown]])
        for i in sorted(set(range(len(iv))) - set(known)):  # n/a: no bar, the text "n/a"
            ax_d.text(xs[i], ds[i], "n/a", ha="center", va="bottom", fontsize=6)
    ax_d.axhline(0.0, color="black", linewidth=0.6)
    ax_d.set_xticks(range(len(names)))
    ax_d.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(reward)
    ax.set_title(f"{reward}: mean per task and overall", fontsize=9)
    ax_d.set_ylabel(f"change from {ref['label']}", fontsize=8)
    ax_d.set_title(f"change from {ref['label']} with its 95 % paired-bootstrap interval (grey: unreliable, fewer than "
                   f"{MIN_INTERVAL_PROMPTS} prompts or zero width; n/a: a task of one prompt)", fontsize=8)
    ax.legend(fontsize=7)
    for a in (ax, ax_d):
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _write_outputs(out, fig, lines)


def cli_main(argv: Sequence[str]) -> int:
    p = CommandParser(prog="flowalign compare", description="Compare training runs: the headline eval metric "
                                "against rollouts and against NFE (compare.png) and a table (compare.md). Or compare "
                                "evaluations of several models on the same prompts and seeds: per task, each one's "
                                "change from the first with a paired-bootstrap 95% interval.")
    p.add_argument("runs", nargs="+", help="run directories written by `flowalign train` (with eval.every > 0), or "
                                           "evaluation directories (`flowalign eval --out`, a run's eval/final), the "
                                           "first one the reference")
    p.add_argument("--out", required=True, help="output directory for compare.png and compare.md (made if missing; "
                                                "a compare.png or compare.md already there is replaced, the rest of "
                                                "the directory is left alone)")
    p.add_argument("--reward", default=None, help="evaluation reward to compare (default: the first reward the first "
                                                  "run or evaluation was evaluated with, e.g. shapes_strict)")
    p.add_argument("--mean-over-seeds", action="store_true",
                   help="merge runs whose configs differ only in train.seed: mean curve with a min-max band, and "
                        "every seed's final value in the table")
    args = p.parse_args(list(argv))
    kinds = [is_eval_dir(d) for d in args.runs]
    if any(kinds) and not all(kinds):
        mixed = next(d for d, k in zip(args.runs, kinds) if not k)
        raise UserError(f"{mixed} is not an evaluation directory while {args.runs[kinds.index(True)]} is; compare "
                        f"training runs with training runs, or evaluations (summary.json + results.jsonl) together")
    if all(kinds):
        if args.mean_over_seeds:
            raise UserError("--mean-over-seeds merges training runs; evaluations are compared image for image")
        if len(args.runs) < 2:
            raise UserError("pass at least two evaluation directories: the reference first, then the models to compare")
        png, md = compare_evals(args.runs, args.out, args.reward)
    else:
        png, md = compare(args.runs, args.out, args.reward, seeds_mean=args.mean_over_seeds)
    sys.stdout.write(Path(md).read_text())
    logger.info("wrote %s and %s", png, md)
    return 0
