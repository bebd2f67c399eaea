"""Image grids, metric plots and a static, self-contained HTML report of a run directory.

Run directory layout read here (written by train.py / evaluate.py)::

    config.yaml                  the resolved config (flowalign.config.dump_yaml)
    metrics.jsonl                one JSON object per logged step (see "Metric names" below)
    eval/base/summary.json       evaluation of the base model (before training)
    eval/step-N/summary.json     evaluations during training
    eval/final/summary.json      evaluation after training
    grids/base.png, grids/final.png   the same prompts and seeds before and after (other grids/*.png are shown too)
    plots/*.png                  written by plot_metrics
    report.html                  written by write_report

``summary.json`` format (written by ``flowalign.evaluate.run_eval`` via ``evaluate.summarize``)::

    {
      "overall":  {"shapes_strict": 0.52, "shapes_partial": 0.71},  # per reward: mean over tasks when images carry
                                                                     # a task label (GenEval's convention), else over images
      "per_task": {"counting": {"shapes_strict": 0.30, ...}, ...},   # nan-aware mean over the task's images
      "counts":   {"counting": 160, ...},                            # images per task
      "n":        960,                                               # images in total
      "settings": {"steps": 10, "guidance": 4.5, "kernel": "euler", "seeds_per_prompt": 4, ...},
      "pass_at_k": {"shapes_strict": {"k": [1, 2, 4], "overall": {"1": 0.40, ...}, "per_task": {...}}}
    }                                                                # only with >= 2 images per prompt and a 0/1 reward

Only ``overall`` is required; NaN means "not applicable" and is shown as n/a. The first reward in ``overall``
is the headline metric. ``n_images`` / ``n_per_task`` are accepted as synonyms of ``n`` / ``counts``.

Metric names (``metrics.jsonl``; each line has ``iteration`` (or ``step``) plus any of these; a ``train/`` prefix
is accepted everywhere): ``reward/<name>``; ``eval/<task>/<reward>`` and ``eval/overall/<reward>`` (one plot per
reward, one line per task); ``approx_kl``, ``kl``; ``clipfrac_high``, ``clipfrac_low``; ``policy_loss``;
``nfe/<phase>`` as **cumulative** counters since the start of the run (``nfe/total`` or the sum of the phases is
the x axis of ``reward_vs_nfe.png``); ``zero_std_ratio``, ``kept_fraction``; ``grad_norm``; ``time/*``.
Unmatched keys are ignored unless asked for. A key matching several groups goes to its most specific pattern.
"""

from __future__ import annotations

import base64
import datetime as _dt
import fnmatch
import html
import io as _stdio
import json
import logging
import math
import re
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

from flowalign.errors import CommandParser, UserError
from flowalign.io import atomic_write_bytes, atomic_write_text, read_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "save_image_grid", "grid_image", "plot_metrics", "plot_eval_history", "write_report", "read_summary",
    "find_summaries", "DEFAULT_PLOT_GROUPS", "cli_main",
]

# group name -> fnmatch patterns; a key goes to the first group that matches it
DEFAULT_PLOT_GROUPS: dict[str, list[str]] = {
    "counts": ["reward/nan_rows", "*/nonfinite*", "*skipped*"],  # counts, not rewards: before the reward group
    "credit": ["credit/*"],
    "reward": ["reward", "reward/*", "train/reward/*", "reward_*"],
    "eval": ["eval/*"],
    "nfe": ["nfe", "nfe/*", "train/nfe/*"],
    "kl": ["*kl", "*kl_*", "*/kl*"],
    "clipfrac": ["clipfrac*", "*/clipfrac*"],
    "loss": ["*loss*"],
    "groups": ["*zero_std_ratio", "*kept_fraction", "*group_std*"],
    "grad_norm": ["grad_norm*", "*/grad_norm*"],
    "time": ["time/*"],
}
_STEP_KEYS = ("step", "iteration", "iter", "global_step")


# ----------------------------------------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------------------------------------


def _font(size: int = 11):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType (>= 10.1)
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines[-1] = last + "…"
    # a single word longer than the tile: cut it
    out = []
    for line in lines:
        while len(line) > 1 and draw.textlength(line, font=font) > width:
            line = line[:-2] + "…"
        out.append(line)
    return out


# a caption's trailing score, "[shapes_strict: 1 0]" (evaluate / steer captions): kept whole when the caption is cut
_SCORE_TAIL = re.compile(r"(.*\S)\s+(\[[^\[\]]*\])", re.DOTALL)


def _caption_lines(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` wrapped to ``width`` in at most ``max_lines`` lines. When it does not fit, a trailing score in
    brackets keeps the last line(s) and the text before it is shortened with an ellipsis (the score was what got
    cut)."""
    match = _SCORE_TAIL.fullmatch(text.strip())
    fits = len(_wrap(draw, text, font, width, max_lines + 1)) <= max_lines
    if fits or match is None or max_lines < 2:
        return _wrap(draw, text, font, width, max_lines)
    head, score = match.groups()
    tail = _wrap(draw, score, font, width, max_lines - 1)
    return _wrap(draw, head, font, width, max_lines - len(tail)) + tail


def grid_image(images, nrow: int, upscale: int = 4, labels: Sequence[str] | None = None, pad: int = 2,
               max_label_lines: int = 3):
    """Compose ``images`` [N,3,H,W] in [0,1] into a PIL image, ``nrow`` tiles per row (torchvision's convention).

    ``labels``: one per tile (caption under each tile; a caption followed by empty labels in its row spans
    those tiles) or one per column (header above each column).
    Tiles are upscaled with nearest-neighbour so 32×32 samples stay crisp.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, H, W] (or [N, 1, H, W]), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if n == 0:
        raise ValueError("no images to put in a grid")
    ncol = max(1, min(int(nrow), n))
    nrows = math.ceil(n / ncol)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [N, C, H, W]
    arr = arr.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
    th, tw = h * upscale, w * upscale

    per_tile = per_col = False
    if labels is not None:
        labels = [str(x) for x in labels]
        if len(labels) == n:
            per_tile = True
        elif len(labels) == ncol:
            per_col = True
        else:
            raise ValueError(f"labels: expected {n} (one per image) or {ncol} (one per column), got {len(labels)}")

    font = _font(11)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    top, bottom = font.getbbox("Ag")[1::2]
    line_h = int(bottom - top) + 3
    widths = [tw] * len(labels or [])
    if per_tile:
        # a caption followed by empty labels in the same row spans those tiles (e.g. one prompt per row)
        for i in range(n):
            span = 1
            while (i + span) % ncol and i + span < n and not labels[i + span]:
                span += 1
            widths[i] = span * tw + (span - 1) * pad
    wrapped = [_caption_lines(scratch, lab, font, wd, max_label_lines) for lab, wd in zip(labels, widths)] if labels else []
    cap_h = (max(len(x) for x in wrapped) * line_h + 2) if (per_tile and wrapped) else 0
    head_h = (max(len(x) for x in wrapped) * line_h + 2) if (per_col and wrapped) else 0

    cell_h = th + cap_h + pad
    width = ncol * (tw + pad) + pad
    height = head_h + nrows * cell_h + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = pad + c * (tw + pad), head_h + pad + r * cell_h
        tile = Image.fromarray(arr[i]).resize((tw, th), Image.NEAREST)
        canvas.paste(tile, (x, y))
        if per_tile:
            for k, line in enumerate(wrapped[i]):
                draw.text((x, y + th + 1 + k * line_h), line, fill=(20, 20, 20), font=font)
    if per_col:
        for c in range(ncol):
            for k, line in enumerate(wrapped[c]):
                draw.text((pad + c * (tw + pad), 1 + k * line_h), line, fill=(20, 20, 20), font=font)
    return canvas


def save_image_grid(images, path: str | Path, nrow: int, upscale: int = 4, labels: Sequence[str] | None = None) -> Path:
    """Save ``images`` [N,3,H,W] in [0,1] as a PNG grid (atomic write). See :func:`grid_image`."""
    canvas = grid_image(images, nrow=nrow, upscale=upscale, labels=labels)
    buf = _stdio.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return atomic_write_bytes(path, buf.getvalue())


DEFAULT_FPS = 8.0  # GIF frame rate for a video model without an ``fps`` attribute


def save_video_grid(videos, path: str | Path, nrow: int, upscale: int = 4, labels: Sequence[str] | None = None,
                    fps: float | None = None) -> Path:
    """Save ``videos`` [N,F,3,H,W] in [0,1] as an animated GIF that loops: frame f is the :func:`grid_image` of every
    video's frame f, so all tiles play in step. One palette for every frame (colours do not flicker between
    frames), no dithering. Atomic write. ``fps`` is the generating model's frame rate (its ``fps`` attribute: Wan
    16, shapes_video 8; None = ``DEFAULT_FPS``)."""
    from PIL import Image

    if getattr(videos, "ndim", 0) != 5:
        raise ValueError(f"videos must be [N, F, 3, H, W], got {tuple(getattr(videos, 'shape', ()))}")
    fps = DEFAULT_FPS if fps is None else float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a finite number > 0, got {fps}")
    frames = [grid_image(videos[:, f], nrow=nrow, upscale=upscale, labels=labels) for f in range(videos.shape[1])]
    w, h = frames[0].size
    sheet = Image.new("RGB", (w, h * len(frames)))  # every frame's colours go into the shared palette
    for k, fr in enumerate(frames):
        sheet.paste(fr, (0, k * h))
    palette = sheet.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    quantized = [fr.quantize(palette=palette, dither=Image.Dither.NONE) for fr in frames]
    buf = _stdio.BytesIO()
    # GIF delays are whole centiseconds: frame k ends at 1000·(k+1)/fps ms rounded to 10 ms, so 16 fps alternates
    # 60 and 70 ms and keeps 62.5 ms on average (one fixed 60 ms delay would play at 16.7 fps); browsers slow delays
    # under 20 ms down to 100 ms, hence the floor
    ends = [int(round(100.0 * (k + 1) / fps)) * 10 for k in range(len(frames))]
    durations = [max(20, b - a) for a, b in zip([0, *ends[:-1]], ends)]
    quantized[0].save(buf, format="GIF", save_all=True, append_images=quantized[1:], loop=0,
                      duration=durations, disposal=1, optimize=False)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(records: list[dict]) -> tuple[str | None, dict[str, tuple[list[float], list[float]]]]:
    """Per numeric key: (x, y) with x = the step key (or the record index) and non-finite values dropped."""
    step_key = next((k for k in _STEP_KEYS if any(k in r for r in records)), None)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(records):
        x = rec.get(step_key, i) if step_key else i
        if not _is_num(x):
            continue
        for key, val in rec.items():
            if key == step_key or not _is_num(val) or not math.isfinite(val):
                continue
            xs, ys = out.setdefault(key, ([], []))
            xs.append(float(x))
            ys.append(float(val))
    return step_key, out


def _read_metrics(path: Path) -> list[dict]:
    """``read_jsonl`` for the report: a corrupt line (or a non-object one, or bytes that are not UTF-8) is a
    one-line ``UserError`` naming the file, not a traceback."""
    try:
        records = read_jsonl(path)
    except ValueError as err:  # also UnicodeDecodeError
        raise UserError(f"cannot read {path}: {err}; fix or delete that line and run `flowalign report` again") from None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i + 1} is a JSON {type(rec).__name__}, not an object")
    return records


def _specificity(pattern: str) -> int:
    return sum(ch not in "*?[]" for ch in pattern)


def _group_keys(keys: Sequence[str], groups: Mapping[str, Sequence[str]], keep_unmatched: bool) -> dict[str, list[str]]:
    """Assign each key to the group of its most specific matching pattern (``reward/zero_std_ratio`` -> groups)."""
    out: dict[str, list[str]] = {name: [] for name in groups}  # keeps the groups' order
    for key in keys:
        best, best_score = None, -1
        for name, patterns in groups.items():
            for p in patterns:
                if fnmatch.fnmatchcase(key, p) and _specificity(p) > best_score:
                    best, best_score = name, _specificity(p)
        if best is not None:
            out[best].append(key)
        elif keep_unmatched:
            out.setdefault(re.sub(r"[^A-Za-z0-9_.-]+", "_", key), []).append(key)
    # evaluation keys eval/<task>/<reward>: one plot per reward, one line per task
    if "eval" in out and any(k.count("/") >= 2 for k in out["eval"]):
        ordered: dict[str, list[str]] = {}
        for name, ks in out.items():
            if name != "eval":
                ordered[name] = ks
                continue
            for k in ks:  # the per-reward eval plots take the place of the eval group
                reward = k.rsplit("/", 1)[-1] if k.count("/") >= 2 else "headline"
                ordered.setdefault("eval_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", reward), []).append(k)
        out = ordered
    return {name: ks for name, ks in out.items() if ks}


def _smooth(ys: list[float], alpha: float = 0.2) -> list[float]:
    out, acc = [], None
    for y in ys:
        acc = y if acc is None else (1 - alpha) * acc + alpha * y
        out.append(acc)
    return out


_TITLE_CHARS = 60  # characters per title line: what fits the 6.4-inch figure at the default title size


def _new_axes(title: str, xlabel: str, ylabel: str = ""):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas directly: no pyplot global state, no backend switching, safe in any process
    fig = Figure(figsize=(6.4, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(textwrap.fill(title, _TITLE_CHARS))  # a longer one line ran off both sides of the figure
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _whole_iterations(ax, xs: Sequence[float]) -> None:
    """Integer x ticks only (a 2-iteration run had ticks at 1.25, 1.5, ...), also for a single point: matplotlib
    then spans ±0.05 around it, where no integer but the point fits, and fell back to fractional ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if xs and min(xs) == max(xs):
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)


_LEGEND_INSIDE = 3  # entries that "best" can place inside the axes; more go to the right of them, off the data


def _legend(ax) -> None:
    """The axes' legend: inside where it covers the fewest points for a few lines, else beside the axes (a
    legend of 7 tasks over a [0, 1] plot covered lines wherever it went)."""
    handles, _ = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= _LEGEND_INSIDE:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save_fig(fig, path: Path) -> Path:
    buf = _stdio.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


_TITLES = {
    "reward": "training reward (mean over rollouts)", "eval": "evaluation (headline metric per task)",
    "nfe": "model forwards spent (cumulative)", "kl": "KL", "clipfrac": "clipped fraction of ratios",
    "loss": "losses", "groups": "group statistics", "grad_norm": "gradient norm", "time": "wall time",
    "counts": "NaN reward rows, non-finite inputs, skipped updates (counts)",
    "credit": "credit: mean |advantage| per head (NFT: over samples)",
}


def _plot_groups(series: Mapping[str, tuple[list[float], list[float]]],
                 keys: Sequence[str] | Mapping[str, Sequence[str]] | None) -> dict[str, list[str]]:
    """``{plot name: its keys}`` of :func:`plot_metrics` (``keys`` as there), in drawing order within a plot: an
    evaluation's ``overall`` line last, as in :func:`plot_eval_history`; a ``counts`` plot only when a count is
    not 0."""
    if isinstance(keys, Mapping):
        groups = _group_keys(sorted(series), keys, keep_unmatched=False)
    elif keys is not None:
        wanted = [k for k in series if any(fnmatch.fnmatchcase(k, p) for p in keys)]
        groups = _group_keys(wanted, DEFAULT_PLOT_GROUPS, keep_unmatched=True)
    else:
        groups = _group_keys(list(series), DEFAULT_PLOT_GROUPS, keep_unmatched=False)
    if "counts" in groups and not any(y for k in groups["counts"] for y in series[k][1]):
        del groups["counts"]  # nothing went wrong: no plot
    return {name: sorted(ks, key=lambda k: k.count("/") >= 2 and k.split("/")[1] == "overall")
            if _is_eval_group(name) else ks for name, ks in groups.items()}


def _is_eval_group(name: str) -> bool:
    return name == "eval" or name.startswith("eval_")


def _reward_vs_nfe(series: Mapping[str, tuple[list[float], list[float]]],
                   groups: Mapping[str, Sequence[str]]) -> dict[str, list[tuple[float, float]]]:
    """Per reward key of ``groups``: its (cumulative NFE, reward) points, for the keys with at least two."""
    nfe = _total_nfe_series(series)
    if not (groups.get("reward") and nfe and "nfe" in groups):
        return {}
    steps_nfe = dict(zip(*nfe))
    out = {}
    for key in groups["reward"]:
        pts = [(steps_nfe[x], y) for x, y in zip(*series[key]) if x in steps_nfe]
        if len(pts) >= 2:
            out[key] = pts
    return out


_SMOOTH_OVER = 20  # points: longer reward curves are drawn EMA-smoothed (over the raw ones, faint)


def _plot_reward_line(ax, key: str, xs: Sequence[float], ys: Sequence[float], marker: str | None) -> None:
    """A reward curve: as is, or with more than ``_SMOOTH_OVER`` points its EMA (labelled so) over the raw one."""
    if len(xs) > _SMOOTH_OVER:
        line, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
        ax.plot(xs, _smooth(list(ys)), color=line.get_color(), label=f"{key} (EMA 0.2)")
    else:
        ax.plot(xs, ys, marker=marker, markersize=3, label=key)


def plot_metrics(metrics_jsonl_path: str | Path, out_dir: str | Path,
                 keys: Sequence[str] | Mapping[str, Sequence[str]] | None = None) -> list[Path]:
    """Plot ``metrics.jsonl`` to ``out_dir/<group>.png`` (one PNG per group of keys); returns the paths written.

    ``keys``: None = every key matching :data:`DEFAULT_PLOT_GROUPS`; a list of fnmatch patterns = only those keys
    (grouped by the default groups, others one plot each); a mapping = custom ``{group: [patterns]}``.
    Also writes ``reward_vs_nfe.png`` when both a reward and ``nfe/total`` (or the sum of ``nfe/*``) are logged.
    """
    path = Path(metrics_jsonl_path)
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}")
    step_key, series = _series(_read_metrics(path))
    groups = _plot_groups(series, keys)
    out_dir = Path(out_dir)
    xlabel = step_key or "record"
    written: list[Path] = []
    for name, gkeys in groups.items():
        is_eval = _is_eval_group(name)
        title = _TITLES.get(name) or (f"evaluation: {name[5:]} per task" if is_eval else name)
        fig, ax = _new_axes(title, xlabel)
        if xlabel == "iteration":
            _whole_iterations(ax, [x for k in gkeys for x in series[k][0]])
        for key in gkeys:
            xs, ys = series[key]
            marker = "o" if len(xs) <= 30 else None
            label = key.split("/")[1] if (is_eval and key.count("/") >= 2) else key
            if name == "reward":
                _plot_reward_line(ax, key, xs, ys, marker)
            elif is_eval and label == "overall":
                ax.plot(xs, ys, marker=marker, markersize=4, label=label, color="black", linewidth=2.2)
            else:
                ax.plot(xs, ys, marker=marker, markersize=3, label=label)
        if is_eval and all(0 <= y <= 1 for k in gkeys for y in series[k][1]):
            ax.set_ylim(-0.02, 1.02)
        if name == "nfe":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        _legend(ax)
        written.append(_save_fig(fig, out_dir / f"{name}.png"))
    by_nfe = _reward_vs_nfe(series, groups)
    if by_nfe:
        fig, ax = _new_axes("reward vs model forwards spent", "NFE (cumulative: sampling, probing, training)")
        for key, pts in by_nfe.items():
            _plot_reward_line(ax, key, [p[0] for p in pts], [p[1] for p in pts], "o" if len(pts) <= 30 else None)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        _legend(ax)
        written.append(_save_fig(fig, out_dir / "reward_vs_nfe.png"))
    return written


def _total_nfe_series(series: Mapping[str, tuple[list[float], list[float]]]):
    for key in ("nfe/total", "train/nfe/total", "nfe"):
        if key in series:
            return series[key]
    # the training cost, as `flowalign compare` counts it: nfe/other (evaluations, grids) is not spent on training
    phases = [k for k in series if k.startswith("nfe/") and k != "nfe/other"]
    if not phases:
        return None
    totals: dict[float, float] = {}
    for k in phases:
        for x, y in zip(*series[k]):
            totals[x] = totals.get(x, 0.0) + y
    xs = sorted(totals)
    return xs, [totals[x] for x in xs]


# ----------------------------------------------------------------------------------------------------------
# Evaluation summaries
# ----------------------------------------------------------------------------------------------------------


def read_summary(path: str | Path) -> dict:
    """Read and check a ``summary.json`` (``UserError`` naming the file if malformed)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"summary not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, dict) or not isinstance(data.get("overall"), dict):
        raise UserError(f"{path}: not a flowalign summary (needs an \"overall\" mapping of reward -> value)")
    _check_summary_fields(path, data)
    return data


def _check_summary_fields(path: Path, data: dict) -> None:
    """One-line ``UserError`` when a part of a summary that report and compare index into is not what evaluate
    writes (a hand-edited or truncated file): each is a mapping, or absent."""

    def mapping(field: str, value: Any) -> dict:
        if not isinstance(value, dict):
            got = "null" if value is None else {"list": "a list", "str": "a string", "bool": "a boolean"}.get(
                type(value).__name__, "a number" if isinstance(value, (int, float)) else type(value).__name__)
            raise UserError(f"{path}: {field} must be a mapping, got {got}; re-run the evaluation")
        return value

    for key in ("per_task", "counts", "n_per_task", "settings", "pass_at_k"):
        if key in data:
            mapping(key, data[key])
    for task, means in (data.get("per_task") or {}).items():
        mapping(f"per_task.{task}", means)
    for reward, table in (data.get("pass_at_k") or {}).items():
        mapping(f"pass_at_k.{reward}", table)
        ks = table.get("k", [])
        if not isinstance(ks, list) or not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
            raise UserError(f"{path}: pass_at_k.{reward}.k must be a list of integers, got {ks!r}; re-run the evaluation")
        for key in ("overall", "per_task"):
            if key in table:
                mapping(f"pass_at_k.{reward}.{key}", table[key])
        for task, row in (table.get("per_task") or {}).items():
            mapping(f"pass_at_k.{reward}.per_task.{task}", row)
    status = (data.get("settings") or {}).get("benchmark")
    if status is not None:
        mapping("settings.benchmark", status)
        if "overrides" in status:
            for name, change in mapping("settings.benchmark.overrides", status["overrides"]).items():
                mapping(f"settings.benchmark.overrides.{name}", change)


def find_summaries(run_dir: str | Path) -> dict[str, Path]:
    """``{label: summary.json}`` under ``run_dir/eval``, ordered base, step-N ascending, final; for the output
    directory of ``flowalign eval`` (a ``summary.json`` at its top) ``{"eval": run_dir/summary.json}``."""
    eval_dir = Path(run_dir) / "eval"
    if not eval_dir.is_dir():
        top = Path(run_dir) / "summary.json"
        return {"eval": top} if top.is_file() else {}
    found: dict[str, Path] = {}
    if (eval_dir / "base" / "summary.json").is_file():
        found["base"] = eval_dir / "base" / "summary.json"
    steps = []
    for p in eval_dir.glob("step-*/summary.json"):
        m = re.fullmatch(r"step-(\d+)", p.parent.name)
        if m:
            steps.append((int(m.group(1)), p))
    for n, p in sorted(steps):
        found[f"step-{n}"] = p
    if (eval_dir / "final" / "summary.json").is_file():
        found["final"] = eval_dir / "final" / "summary.json"
    return found


_FK_LABEL_DEFAULTS = (("potential", "max"), ("resampler", "systematic"), ("probe", "x0"), ("ess", 0.5),
                      ("output", "best"), ("proposal", "kernel"), ("temper", None))
_GUIDE_LABEL_DEFAULTS = (("guide_mode", "x0"), ("band", [0.05, 0.8]), ("normalize", None), ("clip", None))


def _label_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_label_value(x) for x in v)
    return f"{v:g}" if _is_num(v) else str(v)


def steer_line_label(st: Mapping[str, Any]) -> str:
    """The ``plot_steering`` line of a ``flowalign steer`` run's ``settings``: its method and kernel, and every setting
    that shapes its outputs and is not the default (FK: λ, potential, resampler, probe, ESS, output, proposal (DAS),
    temper, a resampling schedule other than every step from its first; guided and DAS: β, guide mode, band,
    normalize, clip). A λ or β per reward std (``--reward-std``) is always named with that std, so it never shares
    a line with a raw one."""
    method = st.get("method", "?")
    std = st.get("reward_std")
    per_std = f" per std {_label_value(std)}" if std is not None else ""
    opts = []
    if method == "fk":  # FK variants differ in more than k: name the settings that are not the defaults
        lam = st.get("lam")
        if lam is not None and (std is not None or lam != 10.0):
            opts.append(f"lam={_label_value(lam)}{per_std}")
        opts += [f"{k}={_label_value(st[k])}" for k, d in _FK_LABEL_DEFAULTS if st.get(k, d) != d]
    if method == "guided":
        b = st.get("beta", 1.0)
        if std is not None or b != 1.0:
            opts.append(f"beta={_label_value(b)}{per_std}")
    if method == "guided" or st.get("proposal") == "guided":
        opts += [f"{k}={_label_value(st[k])}" for k, d in _GUIDE_LABEL_DEFAULTS if st.get(k, d) != d]
    extra = " " + " ".join(opts) if opts else ""
    if method == "fk":
        steps = [int(t) for t in st.get("resample_steps") or []]
        regular = steps[:-1]  # S without the final step T − 1, which always resamples
        gaps = {b - a for a, b in zip(regular, regular[1:])}
        if steps and steps == list(range(steps[0], steps[-1] + 1)):
            extra += f" from step {steps[0]}"
        elif len(regular) > 2 and len(gaps) == 1:
            extra += f" resampling at {regular[0]}..{regular[-1]} every {gaps.pop()}, {steps[-1]}"
        elif steps:
            extra += f" resampling at {','.join(map(str, steps))}"
    key = "plain" if method == "none" else method
    if method in ("none", "best_of_n"):  # best-of-1 is plain sampling: one curve per kernel
        key = "best-of-N"
    eta = st.get("eta")
    return f"{key}{extra}, {st.get('kernel', '?')}" + (f" {eta:g}" if _is_num(eta) and eta else "")


def plot_steering(summaries: Mapping[str, dict], path: str | Path, reward: str) -> Path:
    """``reward`` of ``flowalign steer`` outputs against the forwards spent per image, one line per method, kernel and
    non-default settings (``steer_line_label``) over its particle counts (``summaries``: label → ``summary.json`` with
    ``settings`` and ``cost``)."""
    lines: dict[str, list[tuple[float, float, int]]] = {}
    plain: dict[str, list[bool]] = {}  # per line: which points are `--method none` (no steering)
    for s in summaries.values():
        st, cost = s.get("settings") or {}, s.get("cost") or {}
        y, x = (s.get("overall") or {}).get(reward), cost.get("forwards_per_image")
        if not (_is_num(x) and _is_num(y) and math.isfinite(y)):
            continue
        label = steer_line_label(st)
        lines.setdefault(label, []).append((float(x), float(y), int(cost.get("particles", 1))))
        plain.setdefault(label, []).append(st.get("method") == "none")
    fig, ax = _new_axes(f"steering: {reward} against cost", "model forwards per output image", reward)
    for label, pts in sorted(lines.items()):
        pts.sort()
        shown = label  # best-of-1 shares the best-of-N line of its kernel; alone it is no steering at all
        if all(plain[label]):
            shown = label.replace("best-of-N", "no steering (1 sample)", 1)
        elif any(plain[label]):
            shown = label.replace("best-of-N", "best-of-N (k=1: no steering)", 1)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=shown)
        for x, y, k in pts:
            ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(3, -9), fontsize=6, color="#555")
    _legend(ax)
    return _save_fig(fig, Path(path))


def ranking_ylim(tables: Mapping[str, Mapping[str, dict]]) -> tuple[float, float]:
    """The y-range of ``plot_ranking``: −0.4 … 1.02, lowered (to −1.02 at most) so that no ρ by state falls off."""
    lows = [float(v) for table in tables.values() for d in table.values() for v in d.get("by_state", [])
            if _is_num(v) and math.isfinite(float(v))]
    return max(-1.02, min([-0.4] + [v - 0.05 for v in lows])), 1.02


def plot_ranking(tables: Mapping[str, Mapping[str, dict]], path: str | Path, title: str) -> Path:
    """``flowalign bench credit``'s ranking agreement by state: one panel per reference (``tables``: reference →
    {probe mode → {"by_state": [ρ per state], "spearman_mean": ρ}}), one line per probe mode."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(tables))
    fig = Figure(figsize=(4.6 * n, 3.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    names = list(dict.fromkeys(m for table in tables.values() for m in table))  # one colour per mode in every panel
    palette = [f"C{i}" for i in range(10)] + ["#444444", "#bcbd22", "#17becf", "#8c564b"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(names)}
    for ax, (ref, table) in zip(axes, tables.items()):
        for mode, d in table.items():
            ys = [float(v) if _is_num(v) else float("nan") for v in d.get("by_state", [])]
            mean = d.get("spearman_mean")
            dashed = mode.startswith(("split-half", "ode:full", "fine:", "sde:"))  # references, not probes
            ax.plot(range(len(ys)), ys, marker="o", markersize=3, linestyle="--" if dashed else "-", color=color[mode],
                    label=f"{mode} ({mean:.2f})" if _is_num(mean) and math.isfinite(mean) else mode)
        ax.axhline(0.9, color="#999", linewidth=0.8, linestyle=":")
        ax.set_ylim(*ranking_ylim(tables))
        ax.set_title(f"against {ref}", fontsize=10)
        ax.set_xlabel("state t (0 = pure noise)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    axes[0].set_ylabel("Spearman ρ across a group's members")
    fig.suptitle(title, fontsize=10)
    return _save_fig(fig, Path(path))


def _final_eval_iteration(records: Sequence[dict]) -> float | None:
    """The iteration of the last end-of-run evaluation line in ``records`` (``eval/*`` keys and none of an
    iteration's own: ``train/*``, ``rollouts/*``, ``nfe/*``, ``time/iteration_s``), or None."""
    last = None
    for r in records:
        it = r.get("iteration")
        if (_is_num(it) and it > 0 and any(k.startswith("eval/") for k in r) and "time/iteration_s" not in r
                and not any(k.startswith(("train/", "rollouts/", "nfe/")) for k in r)):
            last = float(it)
    return last


def plot_eval_history(run_dir: str | Path, records: Sequence[dict] = ()) -> list[Path]:
    """``plots/eval_<reward>.png`` from ``eval/*/summary.json``: one line per task plus the overall mean, with
    the base model at iteration 0, ``step-N`` at N and ``final`` after the last logged iteration."""
    run_dir = Path(run_dir)
    sums = {label: read_summary(p) for label, p in find_summaries(run_dir).items()}
    if not sums:
        return []
    steps = [float(r[k]) for r in records for k in _STEP_KEYS if _is_num(r.get(k))]
    xs: dict[str, float] = {}
    for label in sums:
        if label == "base":
            xs[label] = 0.0
        elif label.startswith("step-"):
            xs[label] = float(label[5:])
    if "final" in sums:
        # where the final evaluation was taken: the last end-of-run line of metrics.jsonl (a run resumed with more
        # iterations keeps its earlier eval/final until the new one is written), else after the last logged iteration
        xs["final"] = _final_eval_iteration(records) or max([*steps, *xs.values(), 0.0]) + (0.0 if steps else 1.0)
    rewards = list(dict.fromkeys(r for s in sums.values() for r in s["overall"]))
    written = []
    for reward in rewards:
        fig, ax = _new_axes(f"evaluation: {reward} per task", "iteration (base = 0)")
        _whole_iterations(ax, list(xs.values()))
        tasks = list(dict.fromkeys(t for s in sums.values() for t in (s.get("per_task") or {}) if t != "all"))
        labels = list(sums)
        for task in tasks:
            pts = [(xs[lab], (sums[lab].get("per_task") or {}).get(task, {}).get(reward)) for lab in labels]
            pts = [(x, y) for x, y in pts if _is_num(y) and math.isfinite(y)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=task)
        pts = [(xs[lab], sums[lab]["overall"].get(reward)) for lab in labels]
        pts = [(x, y) for x, y in pts if _is_num(y) and math.isfinite(y)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color="black", linewidth=2.2,
                label="overall")
        values = [y for line in ax.get_lines() for y in line.get_ydata()]
        if values and all(0 <= v <= 1 for v in values):
            ax.set_ylim(-0.02, 1.02)
        _legend(ax)
        written.append(_save_fig(fig, run_dir / "plots" / f"eval_{re.sub(r'[^A-Za-z0-9_.-]+', '_', reward)}.png"))
    return written


# ----------------------------------------------------------------------------------------------------------
# HTML report
# ----------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.92em;margin:.5em 0} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left} tr.total td{font-weight:600;background:#fafafa}
.up{color:#0a7a2f} .down{color:#b00020} pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
.plots img{max-width:49%;margin:.2em 0} .grids figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
.grids img{image-rendering:pixelated;max-width:100%} figcaption{font-size:.9em;color:#555} .muted{color:#777} .ok{color:#1a7f37} .warn{color:#b35900;font-weight:bold}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if _is_num(v):
        return "n/a" if not math.isfinite(v) else (f"{v:,}" if isinstance(v, int) else f"{v:.{digits}f}")
    return html.escape(str(v)) if v is not None else "—"


def _delta_cell(a: Any, b: Any) -> str:
    if not (_is_num(a) and _is_num(b)) or not (math.isfinite(a) and math.isfinite(b)):
        return "<td>—</td>"
    d = b - a
    cls = "up" if d > 0 else ("down" if d < 0 else "")
    return f'<td class="{cls}">{d:+.3f}</td>'


def _comparison_table(base: dict | None, final: dict | None, final_label: str) -> str:
    sums = [s for s in (base, final) if s]
    rewards: list[str] = []
    for s in sums:
        for k in s.get("overall", {}):
            if k not in rewards:
                rewards.append(k)
    tasks: list[str] = []
    for s in sums:
        for t in s.get("per_task", {}) or {}:
            if t not in tasks:
                tasks.append(t)
    if tasks == ["all"]:  # summarize() without task labels: the single group is the overall row
        tasks = []
    both = base is not None and final is not None
    cols = (["base", final_label, "Δ"] if both else (["base"] if base else [final_label]))

    def count(s: dict, t: str | None) -> Any:  # t None: all images
        if t is None:
            return s.get("n", s.get("n_images"))
        return (s.get("counts") or s.get("n_per_task") or {}).get(t)

    # each evaluation's own image counts: one column when they agree, else one per evaluation (e.g. a resume that
    # changed eval.max_prompts evaluated fewer images after training than before)
    counted = [s for s in (base, final) if s]
    if len(counted) == 2 and any(count(base, t) != count(final, t) for t in [*tasks, None]):
        n_cols = ["base", final_label]
    else:
        counted = [final or base]
        n_cols = []
    head1 = "<tr><th rowspan=2>task</th>" + "".join(f'<th colspan="{len(cols)}">{html.escape(r)}</th>' for r in rewards)
    head1 += f'<th colspan="{len(n_cols)}">images</th></tr>' if n_cols else "<th rowspan=2>images</th></tr>"
    subheads = [*(c for _ in rewards for c in cols), *n_cols]
    head2 = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in subheads) + "</tr>"

    def row(label: str, get, task: str | None, cls: str = "") -> str:
        cells = []
        for r in rewards:
            a = get(base, r) if base else None
            b = get(final, r) if final else None
            if both:
                cells += [f"<td>{_fmt(a)}</td>", f"<td>{_fmt(b)}</td>", _delta_cell(a, b)]
            else:
                cells.append(f"<td>{_fmt(a if base else b)}</td>")
        cells += [f"<td>{_fmt(count(s, task))}</td>" for s in counted]
        return f'<tr class="{cls}"><td>{html.escape(label)}</td>' + "".join(cells) + "</tr>"

    rows = [row(t, lambda s, r, t=t: ((s.get("per_task") or {}).get(t) or {}).get(r), t) for t in tasks]
    over = ((final or base or {}).get("settings") or {}).get("overall", "groups")  # summarize()'s convention
    label = f"overall (mean over {'images' if over == 'images' else 'tasks'})" if tasks else "overall"
    rows.append(row(label, lambda s, r: s.get("overall", {}).get(r), None, "total"))
    return f"<table>{head1}{head2}{''.join(rows)}</table>"


def _pass_at_k_table(summary: dict, label: str) -> str:
    """pass@k of each pass/fail reward (``summary["pass_at_k"]``): rows overall + tasks, one column per k."""
    out = []
    for reward, d in (summary.get("pass_at_k") or {}).items():
        ks = [str(k) for k in d.get("k", [])]
        if not ks:
            continue
        per_task = d.get("per_task") or {}
        if list(per_task) == ["all"]:  # a prompt file without tasks: its one group is the overall row
            per_task = {}
        rows = [("overall", d.get("overall") or {})] + list(per_task.items())
        body = "".join(f"<tr><td>{html.escape(str(t))}</td>" + "".join(
            f"<td>{_fmt((v or {}).get(k, (v or {}).get(int(k))))}</td>" for k in ks) + "</tr>" for t, v in rows)
        head = "".join(f"<th>pass@{k}</th>" for k in ks)
        out.append(f"<p><b>{html.escape(reward)}</b>, {html.escape(label)}: how often one of k images per prompt "
                   f"passes</p><table><tr><th>task</th>{head}</tr>{body}</table>")
    return "".join(out)


def _img_src(path: Path, run_dir: Path, inline: bool) -> str:
    if inline:
        mime = "image/gif" if path.suffix.lower() == ".gif" else "image/png"
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    from urllib.parse import quote

    # a URL, not a file name: "#", "?", "%" in a name would otherwise cut the link
    return html.escape(quote(path.relative_to(run_dir).as_posix()))


def _nfe_section(records: list[dict]) -> str:
    last: dict[str, Any] = {}
    for rec in records:
        for k, v in rec.items():
            if (k.startswith("nfe") or k.startswith("train/nfe")) and _is_num(v):
                last[k] = v
    if not last:
        return '<p class="muted">no <code>nfe/*</code> counters in metrics.jsonl.</p>'
    items = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(int(v) if float(v).is_integer() else v)}</td></tr>"
                    for k, v in last.items())
    return f"<table><tr><th>counter (cumulative, last logged)</th><th>forwards</th></tr>{items}</table>"


def benchmark_line(status: Mapping[str, Any]) -> str:
    """A ``settings["benchmark"]`` (``evaluate.protocol_status``) as one line for logs and reports: 'benchmark NAME vN' or 'not a benchmark result: protocol NAME vN with ...'."""
    head = f"{status.get('name')} v{status.get('version')}"
    if status.get("file"):  # a user's protocol: its file and digest, so it is never mistaken for a built-in one
        head += f" (user protocol {status['file']}, sha256 {str(status.get('sha256'))[:12]})"
    pending = ""
    if (status.get("external") and not status.get("scored")  # the number comes from an evaluator run elsewhere
            and "export" not in (status.get("overrides") or {})):  # on images exported for it
        pending = (f"; its score comes from {status['external']}'s own evaluator: run it on the exported images, then "
                   f"add its results with `flowalign import-scores {status['external']}`")
    if status.get("benchmark"):
        done = f"; {status['external']} scores imported" if status.get("scored") else ""
        return f"benchmark {head} (every setting as the frozen protocol{done}){pending}"
    def said(k: str, v: Any) -> str:  # an export the run did not make (training's evaluations): "none", not None
        return "none" if v is None else str(v)

    changes = ", ".join(f"{k} {said(k, v.get('protocol'))} -> {said(k, v.get('used'))}"
                        for k, v in (status.get("overrides") or {}).items())
    return f"not a benchmark result: protocol {head} with {changes}{pending}"


# what makes two evaluations' numbers comparable (the model aside): the images' jobs, noise and sampler, the scores
_EVAL_PROTOCOL_KEYS = ("prompts_sha256", "prompts", "seeds_per_prompt", "seed", "steps", "guidance", "kernel",
                       "resolution", "overall")
# what makes two evaluations' images the same prompts and seeds (their grids comparable tile for tile)
_SAMPLE_KEYS = tuple(k for k in _EVAL_PROTOCOL_KEYS if k != "overall")


def _setting_text(key: str, value: Any) -> str:
    """A summary setting as a reader writes it: a resolution as 32×32 (×F frames), a digest by its first 12
    characters, a list comma-separated, a mapping as (k v, ...), None as none, numbers with %g."""
    if key == "resolution" and isinstance(value, dict) and {"height", "width"} <= set(value):
        frames = value.get("num_frames")
        return f"{value['height']}×{value['width']}" + (f"×{frames} frames" if frames else "")
    if key == "prompts_sha256" and isinstance(value, str):
        return value[:12]
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_setting_text(str(k), v)}" for k, v in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return ",".join(_setting_text(key, v) for v in value)
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return format(value, "g") if _is_num(value) else str(value)


def eval_mismatch(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str] = _EVAL_PROTOCOL_KEYS) -> str:
    """'' when two summaries were evaluated the same way (in ``keys``, each compared where both record it), else the
    differing settings ('steps 12 vs 3, ...')."""
    sa = a.get("settings") if isinstance(a.get("settings"), dict) else {}
    sb = b.get("settings") if isinstance(b.get("settings"), dict) else {}
    return ", ".join(f"{k} {_setting_text(k, sa[k])} vs {_setting_text(k, sb[k])}"
                     for k in keys if k in sa and k in sb and sa[k] != sb[k])


def _summary_settings(summ: Mapping[str, Any]) -> dict:
    """A summary's ``settings`` (an older one's settings at its top level)."""
    if isinstance(summ.get("settings"), dict):
        return summ["settings"]
    return {k: summ[k] for k in ("steps", "guidance", "kernel", "seeds_per_prompt", "seed", "prompts") if k in summ}


def _settings_line(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_setting_text(k, v)}" for k, v in settings.items() if k != "benchmark")


def _saved_train_config(run_dir: Path) -> dict | None:
    """``config.yaml`` of a training run as plain data (its ``train`` section a mapping), else None."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("train"), dict) else None


def _run_world_size(run_dir: Path, records: Sequence[dict]) -> int:
    """How many processes trained the run, for its batch layout (groups and transitions per rank): the last
    ``dist/world_size`` of metrics.jsonl, else the newest checkpoint's ``meta.json``, else 1."""
    sizes = [r["dist/world_size"] for r in records if isinstance(r.get("dist/world_size"), int)]
    if sizes:
        return max(1, sizes[-1])
    from flowalign.models.lora import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    try:
        return max(1, int(json.loads((ckpt / "meta.json").read_text())["world_size"])) if ckpt is not None else 1
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def _unfinished_training(run_dir: Path, records: Sequence[dict], has_final: bool) -> str:
    """For a training run that stopped before its end (killed, preempted, or still running): at which iteration of
    how many, and the command that continues it (README: ``output.resume=true``); '' for a finished run."""
    saved = _saved_train_config(run_dir)
    total = (saved or {}).get("train", {}).get("iterations")
    if not (_is_num(total) and total >= 0):
        return ""
    total = int(total)
    done = int(max([r["iteration"] for r in records if _is_num(r.get("iteration"))], default=0))
    evaluate_after = saved["eval"].get("after", True) if isinstance(saved.get("eval"), dict) else True
    if done < total:
        what = f"Training stopped at iteration {done} of {total} (or is still running)"
    elif evaluate_after and total > 0 and not has_final:
        what = f"Training ran its {total} iterations but stopped before its final evaluation"
    else:
        return ""
    from flowalign.models.lora import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    # a run started with output.overwrite=true saved it: resume and overwrite together are refused, so turn it off
    overwrite = isinstance(saved.get("output"), dict) and saved["output"].get("overwrite") is True
    cmd = (f"flowalign train {shlex.quote(str(run_dir / 'config.yaml'))} "
           f"output.run_dir={shlex.quote(str(run_dir))} output.resume=true" + (" output.overwrite=false" * overwrite))
    if ckpt is None:
        where = "it wrote no checkpoint, so this starts it afresh"
    else:
        step = int(ckpt.name[len("step-"):])
        where = f"it continues from its last checkpoint, {ckpt.name}" + (
            f" (iterations {step + 1}–{done} are run again)" if step < done else "")
    return (f"{what}: the numbers and curves below are of an unfinished run. Continue it with "
            f"<code>{html.escape(cmd)}</code>; {html.escape(where)}.")


def _grid_order(grid_dir: Path) -> list[Path]:
    """``grids/*.png`` in the order of the run: base, then the others by name with numbers as numbers (step-5
    before step-10), final last."""
    if not grid_dir.is_dir():
        return []
    natural = lambda p: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", p.stem)]  # noqa: E731
    rank = {"base": 0, "final": 2}
    return sorted(grid_dir.glob("*.png"), key=lambda p: (rank.get(p.stem, 1), natural(p)))


def _samples_heading(stems: Sequence[str], summaries: Mapping[str, dict]) -> tuple[str, list[str]]:
    """The grids' heading and the sampling settings that differ between them: 'same prompts and seeds' only for two
    or more evaluations' grids whose summaries record the same prompts, seeds and sampler (else what differs); a
    single grid (eval, steer) is just Samples."""
    scored = [s for s in stems if s in summaries]
    if len(scored) < 2:
        return "Samples", []
    first = summaries[scored[0]]
    diffs = [f"{scored[0]} vs {s}: {d}" for s in scored[1:] if (d := eval_mismatch(first, summaries[s], _SAMPLE_KEYS))]
    if diffs:
        keys = [k for k in _SAMPLE_KEYS if len({json.dumps(_summary_settings(summaries[s]).get(k), sort_keys=True)
                                                for s in scored}) > 1]
        return f"Samples (not the same prompts and seeds: {'; '.join(diffs)})", keys
    if all(isinstance(summaries[s].get("settings"), dict) for s in scored):
        return "Samples (same prompts and seeds)", []
    return "Samples", []


def _grid_caption(stem: str, summary: dict | None, settings: Sequence[str] = ()) -> str:
    """A grid's caption: which model or run it shows, and its values of the sampling ``settings`` named."""
    if stem == "steered" and summary is not None:
        st, k = _summary_settings(summary), (summary.get("cost") or {}).get("particles", "?")
        reward = next(iter(summary["overall"]), "the first evaluation reward")
        cap = (f"steered outputs ({steer_line_label(st)}, k = {k} particles per output; each row: its prompt and "
               f"its outputs' {reward} scores)")
    else:
        cap = {"base": "base model", "final": "aligned model",
               "eval": "evaluated images (each row: its prompt and the first reward's score per seed)"}.get(stem, stem)
    st = _summary_settings(summary) if summary is not None else {}
    shown = [f"{k} {_setting_text(k, st[k])}" for k in settings if k in st]
    return cap + (f" ({', '.join(shown)})" if shown else "")


# plots/ names that report draws (a plot of another name, e.g. of plot_metrics' custom keys, is always shown)
def _is_report_plot(stem: str) -> bool:
    return stem in DEFAULT_PLOT_GROUPS or stem == "reward_vs_nfe" or _is_eval_group(stem)


def _report_plot_names(records: Sequence[dict], summaries: Mapping[str, dict]) -> set[str]:
    """The plots/ names that ``write_report`` draws from these metrics and summaries."""
    history = len(summaries) >= 2
    _, series = _series(list(records))
    groups = _plot_groups(series, {k: v for k, v in DEFAULT_PLOT_GROUPS.items() if not (history and k == "eval")})
    names = set(groups) | ({"reward_vs_nfe"} if _reward_vs_nfe(series, groups) else set())
    if history:
        names |= {"eval_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", r) for s in summaries.values() for r in s["overall"]}
    return names


def write_report(run_dir: str | Path, *, inline_images: bool = True, make_plots: bool = True) -> Path:
    """(Re)build ``run_dir/plots/*.png`` and ``run_dir/report.html`` from whatever the run directory holds.

    The page is static and self-contained (images inlined as base64 unless ``inline_images=False``, then
    referenced relatively); no scripts.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    parts: list[str] = []
    title = f"flowalign report — {run_dir.resolve().name}"
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append(f'<p class="muted">{html.escape(str(run_dir.resolve()))} · generated '
                 f'{_dt.datetime.now().strftime("%Y-%m-%d %H:%M")}</p>')

    sums = find_summaries(run_dir)
    loaded = {label: read_summary(p) for label, p in sums.items()}
    metrics = run_dir / "metrics.jsonl"
    records = _read_metrics(metrics) if metrics.is_file() else []
    pretrain_run = not sums and _is_pretrain_run(run_dir)
    if not pretrain_run and "eval" not in loaded:  # near the top: every number below is of an unfinished run
        unfinished = _unfinished_training(run_dir, records, "final" in loaded)
        if unfinished:
            parts.append(f'<p class="warn">{unfinished}</p>')

    # 1. evaluation: base vs aligned
    base = loaded.get("base")
    later = [k for k in sums if k != "base"]
    final_label = later[-1] if later else None
    final = loaded[final_label] if final_label else None
    shown_label = "aligned" if final_label == "final" else (f"aligned ({final_label})" if final_label else "")
    if final_label == "eval":  # `flowalign eval --out D`: one model, often the base one; do not call it aligned
        shown_label = "model"
    heading = ("Evaluation" if final_label == "eval" else
               "Evaluation: base model (no evaluation of the aligned one yet)" if base and not final else
               "Evaluation: base vs aligned")
    parts.append(f"<h2>{heading}</h2>")
    mismatch = eval_mismatch(base, final) if base and final else ""
    if base or final:
        headline = next(iter((final or base)["overall"]), None)
        if base and final and headline:
            a, b = base["overall"].get(headline), final["overall"].get(headline)
            if _is_num(a) and _is_num(b) and math.isfinite(a) and math.isfinite(b):
                parts.append(f"<p><b>{html.escape(headline)}</b>: {_fmt(a)} → {_fmt(b)} "
                             f"({'+' if b >= a else ''}{b - a:.3f} absolute)</p>")
        if mismatch:  # e.g. a resume that changed eval.*: the change is not the model's alone
            parts.append(f'<p class="warn">base and {html.escape(shown_label or "aligned")} were evaluated with other '
                         f'settings ({html.escape(mismatch)}): their difference is not the model\'s change alone; '
                         f'evaluate both the same way (`flowalign eval`) to compare them</p>')
        parts.append(_comparison_table(base, final, shown_label or "aligned"))
        sides = [(lab, sm) for lab, sm in (("base", base), (shown_label or "aligned", final)) if sm]
        if len(sides) == 2 and not mismatch:
            sides = sides[1:]  # evaluated alike: one line, the later evaluation's (it also names the LoRA)
        for lab, sm in sides:
            settings = _summary_settings(sm)
            status = settings.get("benchmark")
            which = f" ({html.escape(lab)})" if len(sides) == 2 else ""
            if isinstance(status, dict):  # a frozen protocol's set: say whether these are benchmark numbers
                cls = "ok" if status.get("benchmark") else "warn"
                parts.append(f'<p class="{cls}">{html.escape(lab + ": " if which else "")}'
                             f'{html.escape(benchmark_line(status))}</p>')
            if _settings_line(settings):
                line = html.escape(_settings_line(settings))
                parts.append(f'<p class="muted">evaluation settings{which}: {line}</p>')
        for lab, sm in (("base", base), (shown_label or "aligned", final)):
            if sm:
                parts.append(_pass_at_k_table(sm, lab))
        if len(sums) > 2:
            headline_rows = "".join(f"<tr><td>{html.escape(lab)}</td><td>{_fmt(sm['overall'].get(headline))}</td></tr>"
                                    for lab, sm in loaded.items())
            parts.append(f"<details><summary>all evaluations ({len(sums)})</summary><table><tr><th>eval</th>"
                         f"<th>{html.escape(str(headline))}</th></tr>{headline_rows}</table></details>")
    elif pretrain_run:  # `flowalign pretrain --out`: no evaluations of its own; final/ is a model directory
        done = (run_dir / "final").is_dir()
        parts[-1] = "<h2>Pretraining run</h2>"
        parts.append('<p class="muted">a <code>flowalign pretrain</code> run: '
                     + ("finished; final/ holds its EMA model (sample or evaluate it with --path "
                        f"{html.escape(str(run_dir / 'final'))})" if done else
                        "not finished (no final/ yet): continue it with <code>flowalign pretrain --out "
                        f"{html.escape(str(run_dir))} --resume</code>") + ".</p>")
    else:
        parts.append('<p class="muted">no evaluation summaries (eval/*/summary.json) yet.</p>')

    # 2. image grids
    grids = _grid_order(run_dir / "grids")
    if grids:
        heading, differ = _samples_heading([p.stem for p in grids], loaded)
        parts.append(f"<h2>{html.escape(heading)}</h2><div class=grids>")
        for p in grids:
            cap = _grid_caption(p.stem, loaded.get(p.stem) or (final if final_label == "eval" else None), differ)
            gif = p.with_suffix(".gif")  # a video model's grid plays beside its film strip (sample.sample_grid)
            shown = [gif, p] if gif.is_file() else [p]
            imgs = "".join(f'<img src="{_img_src(q, run_dir, inline_images)}" alt="{html.escape(q.name)}">' for q in shown)
            note = " (animated; below, a film strip of up to 8 frames)" if gif.is_file() else ""
            parts.append(f"<figure>{imgs}<figcaption>{html.escape(cap + note)}</figcaption></figure>")
        parts.append("</div>")

    # 3. training curves and cost
    plots: list[Path] = []
    stale: list[Path] = []
    if make_plots:
        history = len(sums) >= 2
        if metrics.is_file():
            # with >= 2 evaluation summaries the per-task curves come from them (they include the base model)
            groups = {k: v for k, v in DEFAULT_PLOT_GROUPS.items() if not (history and k == "eval")}
            plots = plot_metrics(metrics, run_dir / "plots", keys=groups)
        if history:
            plots += plot_eval_history(run_dir, records)
    elif (run_dir / "plots").is_dir():  # the existing files, less those of metrics the run no longer has
        expected = _report_plot_names(records, loaded)
        for q in sorted((run_dir / "plots").glob("*.png")):
            (plots if q.stem in expected or not _is_report_plot(q.stem) else stale).append(q)
    rank = {"reward": 0, "reward_vs_nfe": 2}
    plots.sort(key=lambda p: rank.get(p.stem, 1 if p.stem.startswith("eval") else 3))
    spent: list[str] = []
    if records:
        steps = [r.get(k) for r in records for k in _STEP_KEYS if _is_num(r.get(k))]
        if steps:
            spent.append(f"<p>{len(records)} logged records, last step {_fmt(int(max(steps)))}.</p>")
    cost = (final or base or {}).get("cost") if not records else None
    if isinstance(cost, dict) and cost:  # `flowalign steer`: per-output cost, no training metrics
        spent.append("<p>" + ", ".join(f"{html.escape(k.replace('_', ' '))}: {format(v, '.4g') if _is_num(v) else html.escape(str(v))}"
                                       for k, v in cost.items()) + "</p>")
    elif not pretrain_run and (metrics.is_file() or final_label != "eval"):
        # pretraining counts no forwards, and an eval/steer directory has no metrics.jsonl to count them in
        spent.append(_nfe_section(records))
    if spent:
        parts += ["<h2>Compute spent</h2>", *spent]
    if plots or stale:
        parts.append("<h2>Training curves</h2><div class=plots>")
        parts += [f'<img src="{_img_src(p, run_dir, inline_images)}" alt="{html.escape(p.stem)}">' for p in plots]
        parts.append("</div>")
    if stale:
        names = ", ".join(f"plots/{q.name}" for q in stale)
        parts.append(f'<p class="muted">not shown: {html.escape(names)}, from an earlier build (this run\'s metrics and '
                     f'evaluations no longer have their values); run <code>flowalign report</code> without '
                     f'<code>--no-plots</code> to redraw the plots.</p>')

    # 4. configuration
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file() and pretrain_run:  # PretrainConfig fields, not a training config
        raw = cfg_path.read_text(encoding="utf-8", errors="replace")
        parts.append("<h2>Configuration</h2><p class=\"muted\">the pretraining config "
                     "(<code>flowalign pretrain</code>; its fields: <code>flowalign pretrain --help</code>)</p>")
        parts.append(f"<details open><summary>config.yaml</summary><pre>{html.escape(raw)}</pre></details>")
    elif cfg_path.is_file():
        parts.append("<h2>Configuration</h2>")
        raw = cfg_path.read_text(encoding="utf-8", errors="replace")  # shown as is; load_config names a bad byte
        if mismatch:  # a resume rewrote config.yaml with its eval.*; eval/base was made with the earlier ones
            parts.append(f'<p class="warn">config.yaml holds the last session\'s settings: its eval line is that of '
                         f'the later evaluations, not of eval/base ({html.escape(mismatch)}; base first)</p>')
        try:
            from flowalign.config import load_config, summary

            parts.append(f"<pre>{html.escape(summary(load_config(cfg_path), _run_world_size(run_dir, records)))}</pre>")
        except UserError as err:
            parts.append(f'<p class="muted">config.yaml does not load with this version ({html.escape(str(err))}); raw file below.</p>')
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(raw)}</pre></details>")

    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    return atomic_write_text(run_dir / "report.html", page)


def _is_pretrain_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a ``flowalign pretrain`` run (its config.yaml holds PretrainConfig fields). A training
    config's ``model`` is a section; only a plain ``model: NAME`` goes on to the full check, which imports torch."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not (isinstance(saved, dict) and isinstance(saved.get("model", "shapes"), str)):
        return False
    from flowalign.pretrain import is_pretrain_run

    return is_pretrain_run(run_dir)


# what a run directory holds at least one of (train: config.yaml, metrics.jsonl; eval / steer: summary.json)
_RUN_MARKERS = ("config.yaml", "metrics.jsonl", "eval", "grids", "summary.json")


def _interrupted_job(run: Path) -> str | None:
    """Which command's run ``run`` holds the journal of, interrupted (``results.partial.jsonl``, or a rank's
    ``results.partial.rank<r>.jsonl``; a steer journal's settings name its ``method``), else None."""
    journals = sorted(run.glob("results.partial*.jsonl"))
    if not journals:
        return None
    try:
        with open(journals[0], encoding="utf-8") as fh:
            header = json.loads(fh.readline()).get("journal")
    except (OSError, ValueError, AttributeError):  # unreadable: --resume names what is wrong with it
        return "`flowalign eval` or `flowalign steer`"
    if not isinstance(header, dict):
        return "`flowalign eval` or `flowalign steer`"
    return "`flowalign steer`" if "method" in header else "`flowalign eval`"


def cli_main(argv: Sequence[str]) -> int:
    """``flowalign report RUN_DIR``: rebuild the plots and report.html of a run directory."""
    parser = CommandParser(prog="flowalign report", description="(re)build plots and report.html for a run directory")
    parser.add_argument("run_dir", help="run directory (holds config.yaml, metrics.jsonl, eval/, grids/)")
    parser.add_argument("--no-plots", action="store_true", help="do not redraw plots/*.png (use the existing ones)")
    parser.add_argument("--link-images", action="store_true", help="reference images by relative path instead of inlining them")
    args = parser.parse_args(list(argv))
    run = Path(args.run_dir)
    if run.exists() and not run.is_dir():
        raise UserError(f"{args.run_dir!r} is a file, not a run directory; pass the --out of `flowalign train`, "
                        f"`eval` or `steer`")
    if run.is_dir() and not any((run / name).exists() for name in _RUN_MARKERS):
        interrupted = _interrupted_job(run)
        if interrupted:  # nothing to report yet: say how to finish it
            raise UserError(f"{args.run_dir!r} holds an interrupted {interrupted} run (results.partial*.jsonl, "
                            f"no summary.json yet); continue it with the same command plus --resume, which writes "
                            f"its report")
        # e.g. a typo'd parent directory: a report.html (and plots/) of nothing would be written into it
        raise UserError(f"{args.run_dir!r} is not a run directory (none of {', '.join(_RUN_MARKERS)} there); pass the "
                        f"--out of `flowalign train`, `eval` or `steer`")
    path = write_report(args.run_dir, inline_images=not args.link_images, make_plots=not args.no_plots)
    sys.stdout.write(f"{path}\n")
    return 0
