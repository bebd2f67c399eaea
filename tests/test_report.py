"""flowalign.report and flowalign.io: image grids, metric plots, the HTML report, atomic writes."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from cli_checks import fails as _fails
from PIL import Image

from flowalign.errors import UserError
from flowalign.io import append_jsonl, atomic_dir, atomic_save, atomic_write_json, atomic_write_text, read_jsonl
from flowalign.report import cli_main, grid_image, plot_metrics, save_image_grid, write_report

TASKS = ["single_object", "counting", "position"]


def _summary(strict: list[float], partial: list[float]) -> dict:
    per = {t: {"shapes_strict": s, "shapes_partial": p} for t, s, p in zip(TASKS, strict, partial)}
    return {"overall": {"shapes_strict": sum(strict) / 3, "shapes_partial": sum(partial) / 3},
            "per_task": per, "counts": {t: 40 for t in TASKS}, "n": 120,
            "settings": {"steps": 10, "guidance": 4.5, "kernel": "euler", "seeds_per_prompt": 4}}


def test_grid_size_and_nearest_upscale(tmp_path):
    images = torch.zeros(10, 3, 8, 8)
    images[1, 0] = 1.0  # tile 1 pure red
    images[5, 2] = 1.0  # tile 5 pure blue (second row, second column)
    path = save_image_grid(images, tmp_path / "g" / "grid.png", nrow=4, upscale=4)
    img = Image.open(path).convert("RGB")
    pad, tile = 2, 32
    assert img.size == (4 * (tile + pad) + pad, 3 * (tile + pad) + pad)  # ceil(10 / 4) = 3 rows
    x1, y0 = pad + 1 * (tile + pad), pad
    assert img.getpixel((x1, y0)) == (255, 0, 0) and img.getpixel((x1 + tile - 1, y0 + tile - 1)) == (255, 0, 0)
    assert img.getpixel((x1 - 1, y0 + 5)) == (255, 255, 255)  # padding between tiles
    y1 = pad + (tile + pad)
    assert img.getpixel((x1 + 3, y1 + 3)) == (0, 0, 255)
    assert img.getpixel((pad, pad)) == (0, 0, 0)


def test_a_video_grid_plays_at_the_given_frame_rate(tmp_path):
    """GIFs always played at 8 fps (Wan generates at 16). GIF delays are whole centiseconds, so frame k ends at
    1000·(k+1)/fps ms rounded to 10 ms: 16 fps alternates 60 and 70 ms and keeps 62.5 ms on average."""
    from PIL import ImageSequence

    from flowalign.report import DEFAULT_FPS, save_video_grid

    v = torch.rand(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # [N, F, 3, H, W]: no two frames equal

    def durations(fps):
        with Image.open(save_video_grid(v, tmp_path / "g.gif", nrow=2, fps=fps)) as gif:
            return [fr.info["duration"] for fr in ImageSequence.Iterator(gif)]

    assert durations(16) == [60, 60, 70, 60, 60, 70, 60, 60] and sum(durations(16)) == 8 * 1000 / 16
    assert durations(10) == [100] * 8
    assert DEFAULT_FPS == 8.0 and durations(None) == durations(8) and sum(durations(8)) == 1000
    assert durations(200) == [20] * 8  # browsers slow delays under 20 ms down to 100 ms
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps must be a finite number > 0"):
            save_video_grid(v, tmp_path / "bad.gif", nrow=2, fps=bad)
    assert not (tmp_path / "bad.gif").exists()


def test_grid_labels(tmp_path):
    images = torch.rand(6, 3, 8, 8)
    plain = grid_image(images, nrow=3, upscale=4)
    per_tile = grid_image(images, nrow=3, upscale=4, labels=[f"a red circle above a blue square {i}" for i in range(6)])
    per_col = grid_image(images, nrow=3, upscale=4, labels=["base", "step 10", "final"])
    assert per_tile.size[0] == plain.size[0] and per_tile.size[1] > plain.size[1]
    assert per_col.size[0] == plain.size[0] and plain.size[1] < per_col.size[1] < per_tile.size[1]
    # the caption band holds dark text pixels
    band = per_col.crop((0, 0, per_col.size[0], per_col.size[1] - plain.size[1]))
    import numpy as np

    assert np.asarray(band).min() < 100
    # a caption followed by empty labels spans its row, so a long prompt needs fewer lines
    long = "three yellow triangles"
    spanning = grid_image(images, nrow=3, upscale=8, labels=[long, "", "", long, "", ""])
    single = grid_image(images, nrow=3, upscale=8, labels=[long, "x", "x", long, "x", "x"])
    assert grid_image(images, nrow=3, upscale=8).size[1] < spanning.size[1] < single.size[1]
    with pytest.raises(ValueError):
        grid_image(images, nrow=3, labels=["a", "b"])
    with pytest.raises(ValueError):
        grid_image(torch.rand(3, 8, 8), nrow=3)


def _synthetic_run(run, with_final=True):
    from flowalign.config import dump_yaml, load_config

    dump_yaml(load_config(None, ["output.run_dir=" + str(run)]), run / "config.yaml")
    nfe = 0
    for it in range(1, 26):
        nfe += 100
        rec = {"iteration": it, "reward/shapes_partial": 0.5 + 0.01 * it, "reward/zero_std_ratio": 0.1,
               "train/approx_kl": 1e-6 * it, "train/clipfrac_high": 0.0, "train/clipfrac_low": 0.01,
               "nfe/sampling": nfe, "nfe/training": 2 * nfe, "time/iteration_s": float("nan")}
        if it == 10:
            rec["eval/overall/shapes_strict"] = 0.5
        append_jsonl(run / "metrics.jsonl", rec)
    atomic_write_json(run / "eval" / "base" / "summary.json", _summary([0.8, 0.25, 0.125], [0.9, 0.5, 0.4]))
    atomic_write_json(run / "eval" / "step-10" / "summary.json", _summary([0.85, 0.4, 0.2], [0.92, 0.6, 0.5]))
    if with_final:
        atomic_write_json(run / "eval" / "final" / "summary.json", _summary([0.9, 0.75, 0.5], [0.95, 0.85, 0.7]))
    save_image_grid(torch.rand(4, 3, 8, 8), run / "grids" / "base.png", nrow=4)
    save_image_grid(torch.rand(4, 3, 8, 8), run / "grids" / "final.png", nrow=4)


def test_report_has_per_task_table(tmp_path):
    run = tmp_path / "run"
    _synthetic_run(run)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    table = page[page.index("<table>"):page.index("</table>")]
    for task in TASKS:
        assert f"<td>{task}</td>" in table
    # counting: base 0.250 -> aligned 0.750, delta +0.500; overall is the mean over tasks
    row = re.search(r"<td>counting</td>(.*?)</tr>", table).group(1)
    assert "<td>0.250</td><td>0.750</td>" in row and "+0.500" in row
    assert "0.392" in table and "0.717" in table  # overall strict, base and aligned
    assert "shapes_strict" in page and "shapes_partial" in page
    # self-contained: every image is inlined, no scripts
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page
    assert "nfe/training" in page and "5,000" in page  # compute spent: last cumulative counter
    assert "train first 9 steps" in page  # config summary
    plots = {p.name for p in (run / "plots").glob("*.png")}
    assert {"reward.png", "nfe.png", "kl.png", "clipfrac.png", "groups.png", "eval_shapes_strict.png",
            "reward_vs_nfe.png"} <= plots
    assert "time.png" not in plots  # all-NaN series are dropped, not plotted


def test_report_relative_images_and_partial_runs(tmp_path):
    run = tmp_path / "run"
    _synthetic_run(run, with_final=False)
    page = write_report(run, inline_images=False, make_plots=False).read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all((run / s).is_file() for s in srcs)
    assert "aligned (step-10)" in page  # the latest evaluation stands in for the final one
    bare = tmp_path / "bare"
    bare.mkdir()
    assert "no evaluation summaries" in write_report(bare).read_text()


def test_plot_metrics_groups(tmp_path):
    run = tmp_path / "run"
    _synthetic_run(run)
    paths = plot_metrics(run / "metrics.jsonl", tmp_path / "plots", keys=["reward/*"])
    names = sorted(p.name for p in paths)
    assert names == ["groups.png", "reward.png"]  # reward/zero_std_ratio goes to its more specific group
    with Image.open(paths[0]) as im:
        assert im.format == "PNG" and im.size[0] > 100
    with pytest.raises(UserError):
        plot_metrics(tmp_path / "nope.jsonl", tmp_path)


def test_cli(tmp_path, capsys):
    with pytest.raises(UserError, match="not found"):
        cli_main([str(tmp_path / "missing")])
    run = tmp_path / "run"
    _synthetic_run(run)
    assert cli_main([str(run), "--no-plots"]) == 0
    assert (run / "report.html").is_file() and "report.html" in capsys.readouterr().out


def test_atomic_writes(tmp_path):
    target = tmp_path / "a" / "x.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(), not mkstemp's 0600

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "ckpt") as d:
            (d / "weights.bin").write_bytes(b"x")
            raise Boom
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt*"))
    with atomic_dir(tmp_path / "ckpt") as d:
        atomic_save({"step": 3, "t": torch.arange(3)}, d / "state.pt")
    with atomic_dir(tmp_path / "ckpt") as d:  # replaces a complete directory
        atomic_save({"step": 4}, d / "state.pt")
    assert torch.load(tmp_path / "ckpt" / "state.pt")["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "ckpt"]


def test_a_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "state.pt"
    atomic_save({"step": 1}, target)
    with pytest.raises(Exception):
        atomic_save({"f": lambda: 0}, target)  # a lambda cannot be pickled: torch.save fails mid-write
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_jsonl_round_trip_and_truncated_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"iteration": 1, "x": torch.tensor(0.5), "v": torch.arange(2), "nan": float("nan")})
    append_jsonl(path, {"iteration": 2, "x": 1})
    with open(path, "a") as fh:
        fh.write('{"iteration": 3, "x"')  # a crash mid-append
    recs = read_jsonl(path)
    assert [r["iteration"] for r in recs] == [1, 2] and recs[0]["x"] == 0.5 and recs[0]["v"] == [0, 1]
    assert math.isnan(recs[0]["nan"])
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ValueError, match=":2"):
        read_jsonl(path)
    assert json.loads(json.dumps({"ok": True}))


def test_report_of_an_eval_directory_shows_its_numbers_and_pass_at_k(tmp_path):
    """``flowalign eval --out D`` writes D/summary.json (no eval/ subfolder): the report must show it, with pass@k."""
    import json

    from flowalign.report import find_summaries, write_report

    summ = {"overall": {"shapes_strict": 0.4375}, "per_task": {"counting": {"shapes_strict": 0.25}}, "counts": {"counting": 4},
            "n": 8, "pass_at_k": {"shapes_strict": {"k": [1, 2, 4], "overall": {"1": 0.4375, "2": 0.625, "4": 0.8125},
                                                    "per_task": {"counting": {"1": 0.25, "2": 0.5, "4": 0.75}}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summ))
    assert list(find_summaries(tmp_path)) == ["eval"]
    page = write_report(tmp_path, make_plots=False).read_text()
    assert "no evaluation summaries" not in page
    assert "0.438" in page and "pass@4" in page and "0.812" in page and "0.750" in page


# -------------------------------------------- headline, corrupt logs, single evaluations, linked and ordered grids


def _run_with(tmp_path, base: dict, final: dict):
    run = tmp_path / "run"
    for label, s in (("base", base), ("final", final)):
        (run / "eval" / label).mkdir(parents=True)
        (run / "eval" / label / "summary.json").write_text(json.dumps(s))
    return run


def test_report_headline_with_a_missing_base_value_says_nothing_rather_than_nan(tmp_path):
    from flowalign.report import write_report

    run = _run_with(tmp_path, {"overall": {"ocr": float("nan")}}, {"overall": {"ocr": 0.5}})
    page = write_report(run, make_plots=False).read_text()
    assert "nan" not in page.lower().replace("n/a", "")


def test_report_of_a_corrupt_metrics_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = _run_with(tmp_path, {"overall": {"r": 0.1}}, {"overall": {"r": 0.2}})
    (run / "metrics.jsonl").write_text('{"iteration": 1, "reward/r": 0.1}\n{"iteration": 2, "rew\n'
                                       '{"iteration": 3, "reward/r": 0.2}\n')
    _fails(capsys, ["report", str(run)], "metrics.jsonl:2")
    assert not (run / "report.html").exists() and not (run / "plots").exists()
    (run / "metrics.jsonl").write_text('{"iteration": 1}\n[1, 2]\n')  # valid JSON, not a record
    _fails(capsys, ["report", str(run)], "metrics.jsonl")
    (run / "metrics.jsonl").write_bytes(b'{"iteration": 1}\n\xff\xfe\n')
    _fails(capsys, ["report", str(run)], "metrics.jsonl")
    assert not (run / "report.html").exists()


def test_report_of_a_single_eval_does_not_call_the_model_aligned(tmp_path):
    """`flowalign eval --out D` of the base model: its report must not label the numbers "aligned"."""
    from flowalign.report import write_report

    (tmp_path / "summary.json").write_text(json.dumps({"overall": {"r": 0.25}, "per_task": {"a": {"r": 0.25}}}))
    page = write_report(tmp_path, make_plots=False).read_text()
    assert "0.250" in page and "aligned" not in page


def test_linked_image_paths_are_urls(tmp_path):
    """--link-images: a grid named with '#' or '%' must still resolve (a raw name cuts the URL at '#')."""
    import torch
    from urllib.parse import unquote

    from flowalign.report import save_image_grid, write_report

    run = tmp_path / "run"
    save_image_grid(torch.rand(2, 3, 4, 4), run / "grids" / "try #2 100%.png", nrow=2)
    page = write_report(run, inline_images=False, make_plots=False).read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all("#" not in s and (run / unquote(s)).is_file() for s in srcs)


def test_report_shows_step_grids_in_step_order(tmp_path):
    """grids/step-N.png were sorted as text: step-10, step-100, step-20, step-5."""
    import torch

    from flowalign.report import save_image_grid, write_report

    run = tmp_path / "run"
    for name in ("base", "step-100", "step-20", "step-5", "final"):
        save_image_grid(torch.rand(1, 3, 4, 4), run / "grids" / f"{name}.png", nrow=1)
    page = write_report(run, inline_images=False, make_plots=False).read_text()
    assert re.findall(r'<img src="grids/([^"]+)\.png"', page) == ["base", "step-5", "step-20", "step-100", "final"]


def test_ranking_plot_range_keeps_every_state_on_the_plot():
    """The ranking plot's y-range was fixed at −0.4 … 1.02, and a probe's ρ of −0.41 fell on the frame."""
    from flowalign.report import ranking_ylim

    tables = {"ode:full": {"ode:2": {"by_state": [0.1, 0.5]}, "x0": {"by_state": [float("nan"), 0.3]}}}
    assert ranking_ylim(tables) == (-0.4, 1.02)
    tables["sde:16"] = {"x0": {"by_state": [-0.41, 0.9], "spearman_mean": 0.2}}
    lo, hi = ranking_ylim(tables)
    assert lo < -0.41 and hi == 1.02
    tables["sde:16"]["x0"]["by_state"][0] = -1.0
    assert ranking_ylim(tables)[0] == -1.02  # never below ρ's own range


def test_plots_keep_counts_off_the_reward_axis_and_training_nfe_without_evaluations(tmp_path):
    """reward/nan_rows (a count) was drawn on the reward axis, and reward_vs_nfe's x counted nfe/other (evaluations
    and grids) as training cost, unlike `flowalign compare`; the credit heads had no plot at all."""
    from flowalign.report import _group_keys, _series, _total_nfe_series, DEFAULT_PLOT_GROUPS

    path = tmp_path / "metrics.jsonl"
    recs = [{"iteration": i, "reward/shapes_partial": 0.5, "reward/nan_rows": 3 * (i == 2), "nfe/sampling": 10 * i,
             "nfe/training": 5 * i, "nfe/other": 1000, "credit/main_abs_mean": 0.4} for i in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    _, series = _series([json.loads(x) for x in path.read_text().splitlines()])
    groups = _group_keys(list(series), DEFAULT_PLOT_GROUPS, keep_unmatched=False)
    assert groups["reward"] == ["reward/shapes_partial"] and groups["counts"] == ["reward/nan_rows"]
    assert groups["credit"] == ["credit/main_abs_mean"]
    assert _total_nfe_series(series)[1] == [15.0, 30.0, 45.0]
    names = sorted(p.name for p in plot_metrics(path, tmp_path / "plots"))
    assert {"counts.png", "credit.png", "reward.png", "reward_vs_nfe.png"} <= set(names)
    path.write_text("".join(json.dumps({**r, "reward/nan_rows": 0}) + "\n" for r in recs))
    assert "counts.png" not in {p.name for p in plot_metrics(path, tmp_path / "plots2")}  # nothing went wrong


def test_report_warns_when_base_and_final_were_evaluated_differently(tmp_path):
    """A resume may change eval.*; the base evaluation is not run again, so base vs final then mixes the model's
    change with the evaluation's."""
    from flowalign.report import eval_mismatch, write_report

    base, final = _summary([0.8, 0.25, 0.125], [0.9, 0.5, 0.4]), _summary([0.9, 0.75, 0.5], [0.95, 0.85, 0.7])
    assert eval_mismatch(base, final) == ""
    final["settings"] = {**final["settings"], "steps": 3, "seeds_per_prompt": 1}
    assert eval_mismatch(base, final) == "seeds_per_prompt 4 vs 1, steps 10 vs 3"
    page = write_report(_run_with(tmp_path, base, final), make_plots=False).read_text()
    assert "were evaluated with other settings (seeds_per_prompt 4 vs 1, steps 10 vs 3)" in page


# ------------------------------------------------ the overall convention, broken summaries, eval dirs without a log


@pytest.mark.parametrize("over, label", [("images", "overall (mean over images)"), ("groups", "overall (mean over tasks)"),
                                         (None, "overall (mean over tasks)")])
def test_the_overall_row_says_what_it_averages(tmp_path, over, label):
    """A summary whose settings say overall=images was labelled 'overall (mean over tasks)'."""
    from flowalign.report import write_report

    s = _summary([0.8, 0.25, 0.125], [0.9, 0.5, 0.4])
    if over:
        s["settings"]["overall"] = over
    (tmp_path / "summary.json").write_text(json.dumps(s))
    page = write_report(tmp_path, make_plots=False).read_text()
    assert label in page and page.count("overall (mean over") == 1


@pytest.mark.parametrize("field, change", [
    ("per_task", lambda s: s.__setitem__("per_task", ["counting"])),
    ("per_task.counting", lambda s: s["per_task"].__setitem__("counting", None)),
    ("counts", lambda s: s.__setitem__("counts", [40])),
    ("pass_at_k.shapes_strict", lambda s: s.__setitem__("pass_at_k", {"shapes_strict": [1, 2]})),
    ("pass_at_k.shapes_strict.per_task", lambda s: s.__setitem__(
        "pass_at_k", {"shapes_strict": {"k": [1], "overall": {"1": 0.5}, "per_task": [0.5]}})),
    ("settings", lambda s: s.__setitem__("settings", "steps 10")),
    ("settings.benchmark.overrides", lambda s: s["settings"].__setitem__(
        "benchmark", {"name": "p", "version": 1, "benchmark": False, "overrides": ["steps"]})),
])
def test_a_summary_with_a_broken_part_is_one_line_and_writes_nothing(tmp_path, capsys, field, change):
    """A right top-level overall but a list, a null or a string elsewhere crashed report with a traceback."""
    s = _summary([0.8, 0.25, 0.125], [0.9, 0.5, 0.4])
    change(s)
    (tmp_path / "summary.json").write_text(json.dumps(s))
    _fails(capsys, ["report", str(tmp_path)], f"{tmp_path / 'summary.json'}: {field} must be a mapping",
           "re-run the evaluation")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_pass_at_k_ks_must_be_integers(tmp_path):
    from flowalign.report import read_summary

    s = _summary([0.8, 0.25, 0.125], [0.9, 0.5, 0.4])
    s["pass_at_k"] = {"shapes_strict": {"k": ["one"], "overall": {}}}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    with pytest.raises(UserError, match=r"pass_at_k.shapes_strict.k must be a list of integers"):
        read_summary(tmp_path / "summary.json")


def test_the_report_of_an_eval_directory_does_not_ask_for_nfe_counters(tmp_path):
    """An eval or steer directory has no metrics.jsonl; its report said 'no nfe/* counters in metrics.jsonl'."""
    from flowalign.report import write_report

    (tmp_path / "summary.json").write_text(json.dumps(_summary([0.8, 0.25, 0.125], [0.9, 0.5, 0.4])))
    page = write_report(tmp_path, make_plots=False).read_text()
    assert "metrics.jsonl" not in page and "Compute spent" not in page
    run = tmp_path / "run"  # a training run still says so
    _synthetic_run(run)
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "reward/x": 0.5}) + "\n")
    assert "no <code>nfe/*</code> counters in metrics.jsonl" in write_report(run, make_plots=False).read_text()


# ------------------------------------------------------ which number goes in which cell, order and captions of the page


def test_the_comparison_cells_and_the_headline_give_aligned_minus_base(tmp_path):
    """Each reward's columns are base, aligned, Δ = aligned − base; a rise is class "up", a fall "down", no change
    neither; the headline (the first reward) says base → aligned and the signed absolute change."""
    run = _run_with(tmp_path, {"overall": {"a": 0.2, "b": 0.5, "c": 0.7}}, {"overall": {"a": 0.3, "b": 0.5, "c": 0.4}})
    page = write_report(run, make_plots=False).read_text()
    row = re.search(r'<tr class="total"><td>overall</td>(.*?)</tr>', page).group(1)
    assert row == ('<td>0.200</td><td>0.300</td><td class="up">+0.100</td>'
                   '<td>0.500</td><td>0.500</td><td class="">+0.000</td>'
                   '<td>0.700</td><td>0.400</td><td class="down">-0.300</td><td>—</td>')
    assert "<p><b>a</b>: 0.200 → 0.300 (+0.100 absolute)</p>" in page
    fell = write_report(_run_with(tmp_path / "fell", {"overall": {"a": 0.7}}, {"overall": {"a": 0.4}}),
                        make_plots=False).read_text()
    assert "<p><b>a</b>: 0.700 → 0.400 (-0.300 absolute)</p>" in fell


def test_the_images_column_counts_the_aligned_evaluation_and_accepts_the_synonyms(tmp_path):
    """The images column is the shown (aligned) summary's, read from ``counts``/``n`` or their synonyms
    ``n_per_task``/``n_images`` (module docstring)."""
    base = {"overall": {"r": 0.1}, "per_task": {"t1": {"r": 0.1}}, "counts": {"t1": 4}, "n": 4}
    final = {"overall": {"r": 0.2}, "per_task": {"t1": {"r": 0.2}}, "n_per_task": {"t1": 8}, "n_images": 8}
    page = write_report(_run_with(tmp_path, base, final), make_plots=False).read_text()
    # each evaluation's own count when they differ (a resume that changed eval.*): base 4, aligned 8
    assert re.search(r"<td>t1</td>(?:<td[^>]*>[^<]*</td>){3}<td>4</td><td>8</td></tr>", page)
    assert re.search(r"<td>overall \(mean over tasks\)</td>(?:<td[^>]*>[^<]*</td>){3}<td>4</td><td>8</td></tr>", page)


def test_a_summary_without_task_labels_has_no_all_row(tmp_path):
    """summarize() without task labels gives one group "all": it is the overall row, not a task row beside it."""
    s = {"overall": {"r": 0.25}, "per_task": {"all": {"r": 0.25}}, "counts": {"all": 4}, "n": 4}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    page = write_report(tmp_path, make_plots=False).read_text()
    assert "<td>all</td>" not in page
    assert '<tr class="total"><td>overall</td><td>0.250</td><td>4</td></tr>' in page


def test_every_evaluation_is_listed_in_step_order_with_its_headline(tmp_path):
    """find_summaries orders base, step-N by N (not as text: step-10 < step-100 < step-5), final; with more than
    two evaluations the report lists them all with the headline metric."""
    from flowalign.report import find_summaries

    run = tmp_path / "run"
    for label, v in (("base", 0.1), ("step-100", 0.4), ("step-5", 0.2), ("step-10", 0.3), ("final", 0.5)):
        atomic_write_json(run / "eval" / label / "summary.json", {"overall": {"r": v}})
    assert list(find_summaries(run)) == ["base", "step-5", "step-10", "step-100", "final"]
    page = write_report(run, make_plots=False).read_text()
    assert "<summary>all evaluations (5)</summary>" in page
    rows = re.findall(r"<tr><td>(base|step-\d+|final)</td><td>([^<]*)</td></tr>", page)
    assert rows == [("base", "0.100"), ("step-5", "0.200"), ("step-10", "0.300"), ("step-100", "0.400"),
                    ("final", "0.500")]
    (run / "eval" / "step-5" / "summary.json").unlink()
    (run / "eval" / "step-100" / "summary.json").unlink()
    assert "<summary>all evaluations (3)</summary>" in write_report(run, make_plots=False).read_text()
    (run / "eval" / "step-10" / "summary.json").unlink()
    assert "all evaluations" not in write_report(run, make_plots=False).read_text()  # two: the table says it all


def test_pass_at_k_is_shown_for_base_and_aligned(tmp_path):
    """Each summary's pass@k table, labelled with its model, base first."""
    def with_pass(v):
        return {"overall": {"r": v}, "pass_at_k": {"r": {"k": [1, 2], "overall": {"1": v, "2": v + 0.125}}}}

    page = write_report(_run_with(tmp_path, with_pass(0.25), with_pass(0.5)), make_plots=False).read_text()
    i, j = page.index("<b>r</b>, base: how often"), page.index("<b>r</b>, aligned: how often")
    assert i < j
    assert "<td>0.250</td><td>0.375</td>" in page[i:j] and "<td>0.500</td><td>0.625</td>" in page[j:]


def test_grid_captions_and_eval_plots_are_each_shown_once_in_order(tmp_path):
    """grids/base.png is captioned the base model and final.png the aligned one; the curves come reward first, then
    the evaluations, then reward vs NFE, then the rest; with >= 2 summaries the per-reward evaluation plot is the
    summaries' history alone (metrics.jsonl's eval group is not drawn over it and not shown twice)."""
    run = _run_with(tmp_path, {"overall": {"r": 0.2, "q": 0.1}}, {"overall": {"r": 0.4, "q": 0.3}})
    recs = [{"iteration": i, "reward/r": 0.1 * i, "nfe/sampling": 10 * i, "train/approx_kl": 0.01} for i in (1, 2, 3)]
    recs[1]["eval/overall/r"] = 0.3  # a periodic evaluation logged on its iteration's line
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name in ("final", "base"):
        save_image_grid(torch.rand(1, 3, 4, 4), run / "grids" / f"{name}.png", nrow=1)  # [1, 3, 4, 4]
    page = write_report(run, inline_images=False).read_text()
    assert '<img src="grids/base.png" alt="base.png"><figcaption>base model</figcaption>' in page
    assert '<img src="grids/final.png" alt="final.png"><figcaption>aligned model</figcaption>' in page
    curves = page[page.index("<h2>Training curves</h2>"):]
    alts = re.findall(r'<img src="plots/[^"]+" alt="([^"]+)"', curves)
    assert alts == ["reward", "eval_r", "eval_q", "reward_vs_nfe", "nfe", "kl"]


def test_the_total_nfe_counter_wins_over_the_sum_of_the_phases():
    """reward_vs_nfe's x axis is nfe/total when logged (it may count phases not logged on their own)."""
    from flowalign.report import _total_nfe_series

    series = {"nfe/total": ([1.0, 2.0], [100.0, 250.0]), "nfe/sampling": ([1.0, 2.0], [10.0, 20.0])}
    assert _total_nfe_series(series) == ([1.0, 2.0], [100.0, 250.0])
    series = {"train/nfe/total": ([1.0], [7.0]), "nfe/sampling": ([1.0], [3.0])}
    assert _total_nfe_series(series) == ([1.0], [7.0])


def test_grid_values_outside_0_1_are_clamped_not_wrapped():
    """grid_image takes [0, 1] images and clamps: 1.5 is white and −0.5 black, not uint8 wrap-around."""
    from flowalign.report import grid_image

    images = torch.zeros(1, 3, 2, 2)  # [N, 3, H, W]
    images[0, 0], images[0, 1], images[0, 2] = 1.5, 0.5, -0.5
    assert grid_image(images, nrow=1, upscale=1).getpixel((2, 2)) == (255, 128, 0)


def test_eval_mismatch_names_other_prompts_by_their_digest():
    """Two evaluations of the same count of prompts but other prompt texts are not comparable (prompts_sha256)."""
    from flowalign.report import eval_mismatch

    a = {"settings": {"prompts": 96, "prompts_sha256": "a" * 64}}
    b = {"settings": {"prompts": 96, "prompts_sha256": "b" * 64}}
    assert eval_mismatch(a, b) == f"prompts_sha256 {'a' * 12} vs {'b' * 12}"
    assert eval_mismatch(a, {"settings": {"prompts": 96}}) == ""  # an older summary without it: not a difference
