"""What the HTML report and its grids and plots tell a reader (an audit of report.html): captions keep their
scores, headings claim only what holds, unfinished runs say so, plots are legible."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import flowalign.report as R
from flowalign.errors import UserError
from flowalign.io import atomic_write_json
from flowalign.report import cli_main, grid_image, plot_metrics, save_image_grid, write_report

TASKS = ["single_object", "position"]


def _summary(steps: int = 12, prompts: int = 12, digest: str = "a" * 64, per_task_images: int = 6, **extra) -> dict:
    settings = {"steps": steps, "guidance": 4.0, "kernel": "euler", "seeds_per_prompt": 1, "seed": 0,
                "prompts": prompts, "resolution": {"height": 32, "width": 32}, "rewards": ["r"], "path": None,
                "prompts_sha256": digest, "overall": "groups", **extra}
    return {"overall": {"r": 0.5}, "per_task": {t: {"r": 0.5} for t in TASKS},
            "counts": {t: per_task_images for t in TASKS}, "n": per_task_images * len(TASKS), "settings": settings}


def _training_run(run: Path, *overrides: str) -> Path:
    from flowalign.config import dump_yaml, load_config

    dump_yaml(load_config(None, ["output.run_dir=" + str(run), *overrides]), run / "config.yaml")
    return run


def _metrics(run: Path, records: list[dict]) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the report saves, by file stem (drawn, for their text and layout)."""
    saved: dict = {}
    save = R._save_fig

    def keep(fig, path):
        out = save(fig, path)
        saved[Path(path).stem] = fig
        return out

    monkeypatch.setattr(R, "_save_fig", keep)
    return saved


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


# 1 --------------------------------------------------------------------------------------------------------------


def test_a_long_caption_keeps_its_score_and_shortens_its_prompt(monkeypatch):
    """A 128 px tile holds 3 caption lines; the longest shapes-bench prompts filled them and the score was cut."""
    from PIL import ImageDraw

    drawn: list[str] = []
    text = ImageDraw.ImageDraw.text

    def spy(self, xy, line, *a, **k):
        drawn.append(line)
        return text(self, xy, line, *a, **k)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    prompt = "an orange triangle to the right of a green triangle"
    grid_image(torch.rand(1, 3, 32, 32), nrow=1, upscale=4, labels=[f"{prompt}  [shapes_strict: 0]"])
    assert len(drawn) == 3 and drawn[-1].endswith("[shapes_strict: 0]")
    assert drawn[0].startswith("an orange triangle") and "…" in " ".join(drawn)  # the prompt, shortened
    drawn.clear()
    grid_image(torch.rand(1, 3, 32, 32), nrow=1, upscale=4, labels=["a red circle  [s: 1]"])
    assert drawn == ["a red circle [s: 1]"]  # what fits is drawn as before


# 2 --------------------------------------------------------------------------------------------------------------


def test_grids_and_tables_of_evaluations_made_with_other_settings_say_so(tmp_path):
    """A resume that changed eval.max_prompts and eval.steps: the grids were headed 'same prompts and seeds', the
    images column showed the final count for both, and only the final evaluation's settings were listed."""
    run = _training_run(tmp_path / "run", "train.iterations=2", "eval.max_prompts=6", "eval.steps=6")
    atomic_write_json(run / "eval" / "base" / "summary.json", _summary())
    atomic_write_json(run / "eval" / "final" / "summary.json",
                      _summary(steps=6, prompts=6, digest="b" * 64, per_task_images=3))
    _metrics(run, [{"iteration": 0, "eval/overall/r": 0.5}, {"iteration": 1, "reward/r": 0.5},
                   {"iteration": 2, "reward/r": 0.6}, {"iteration": 2, "eval/overall/r": 0.5}])
    for name in ("base", "final"):
        save_image_grid(torch.rand(1, 3, 4, 4), run / "grids" / f"{name}.png", nrow=1)
    page = write_report(run, make_plots=False).read_text()
    assert "same prompts and seeds)" not in page
    heading = re.search(r"<h2>(Samples[^<]*)</h2>", page).group(1)
    assert "not the same prompts and seeds" in heading and "steps 12 vs 6" in heading and "prompts 12 vs 6" in heading
    assert re.search(r"<figcaption>base model \([^)]*steps 12[^)]*\)</figcaption>", page)
    assert re.search(r"<figcaption>aligned model \([^)]*steps 6[^)]*\)</figcaption>", page)
    # each evaluation's own image counts
    assert re.search(r"<td>position</td>(?:<td[^>]*>[^<]*</td>){3}<td>6</td><td>3</td></tr>", page)
    assert re.search(r'<tr class="total">(?:<td[^>]*>[^<]*</td>){4}<td>12</td><td>6</td></tr>', page)
    assert "evaluation settings (base): steps=12" in page and "evaluation settings (aligned): steps=6" in page
    config = page[page.index("<h2>Configuration</h2>"):]
    assert "not of eval/base" in config and "steps 12 vs 6" in config

    # evaluated alike: the claim holds, one images column, one settings line
    atomic_write_json(run / "eval" / "final" / "summary.json", _summary())
    page = write_report(run, make_plots=False).read_text()
    assert "<h2>Samples (same prompts and seeds)</h2>" in page and "<th rowspan=2>images</th>" in page
    assert "evaluation settings: steps=12" in page and "not of eval/base" not in page


# 3 --------------------------------------------------------------------------------------------------------------


def test_an_interrupted_training_run_says_where_it_stopped_and_how_to_resume(tmp_path):
    """Killed after a checkpoint, before its final evaluation: the report was headed 'base vs aligned' with only a
    base column and said nothing of the stop."""
    run = _training_run(tmp_path / "run", "train.iterations=4")
    atomic_write_json(run / "eval" / "base" / "summary.json", _summary())
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    _metrics(run, [{"iteration": 0, "eval/overall/r": 0.5}] + [{"iteration": i, "reward/r": 0.5} for i in (1, 2, 3)])
    page = write_report(run, make_plots=False).read_text()
    note = re.search(r'<p class="warn">(Training stopped[^\n]*)</p>', page).group(1)
    assert "at iteration 3 of 4" in note and "step-2" in note
    assert f"<code>flowalign train {run}/config.yaml output.run_dir={run} output.resume=true</code>" in note
    assert page.index("Training stopped") < page.index("<h2>Evaluation")  # near the top
    assert "base vs aligned" not in page

    # it ran its iterations but was killed in its final evaluation
    _metrics(run, [{"iteration": 0, "eval/overall/r": 0.5}] + [{"iteration": i, "reward/r": 0.5} for i in range(1, 5)])
    (run / "checkpoints" / "step-4").mkdir()
    page = write_report(run, make_plots=False).read_text()
    assert "ran its 4 iterations but stopped before its final evaluation" in page
    # finished: nothing to say
    atomic_write_json(run / "eval" / "final" / "summary.json", _summary())
    page = write_report(run, make_plots=False).read_text()
    assert "Training stopped" not in page and "output.resume=true" not in page and "base vs aligned" in page


def test_the_resume_command_of_a_run_started_with_overwrite_turns_it_off(tmp_path):
    """A run started with output.overwrite=true saved it in config.yaml, and resume and overwrite together are
    refused: the report's command adds output.overwrite=false (run for real by hand: it continues)."""
    run = _training_run(tmp_path / "run", "train.iterations=4", "output.overwrite=true")
    atomic_write_json(run / "eval" / "base" / "summary.json", _summary())
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    _metrics(run, [{"iteration": 0, "eval/overall/r": 0.5}] + [{"iteration": i, "reward/r": 0.5} for i in (1, 2)])
    page = write_report(run, make_plots=False).read_text()
    assert f"output.run_dir={run} output.resume=true output.overwrite=false</code>" in page


# 4 --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(R._TITLES))
def test_every_plot_title_fits_its_figure(name):
    """The credit plot's title ran off both sides of the 6.4-inch figure."""
    fig, ax = R._new_axes(R._TITLES[name], "iteration")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    box = ax.title.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width


# 5 --------------------------------------------------------------------------------------------------------------


def test_a_single_point_plot_has_whole_iteration_ticks_and_overall_last(tmp_path, figures):
    """One logged iteration gave x ticks at −0.04 … 0.04; the eval plot from metrics.jsonl listed its lines
    alphabetically with overall among the tasks, and its legend lay over the lines."""
    tasks = ["single_object", "colors", "counting", "two_object", "position", "color_attr"]
    _metrics(tmp_path, [{"iteration": 3, **{f"eval/{t}/r": 0.1 * i for i, t in enumerate(["overall", *tasks])}}])
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots", keys={"eval": ["eval/*"]})
    fig = figures["eval_r"]
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks == [3.0]
    assert _legend_texts(fig) == [*sorted(tasks), "overall"]
    renderer = fig.canvas.get_renderer()
    legend, axes = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert not legend.overlaps(axes) and legend.x1 <= fig.bbox.width  # beside the lines, inside the figure


# 6 --------------------------------------------------------------------------------------------------------------


def test_a_smoothed_reward_vs_nfe_curve_says_so(tmp_path, figures):
    """reward.png's legend said '(EMA 0.2)'; reward_vs_nfe.png drew the same smoothing unlabelled."""
    _metrics(tmp_path, [{"iteration": i, "reward/r": (i % 3) / 3, "nfe/sampling": 10 * i} for i in range(1, 26)])
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert _legend_texts(figures["reward"]) == ["reward/r (EMA 0.2)"]
    assert _legend_texts(figures["reward_vs_nfe"]) == ["reward/r (EMA 0.2)"]
    _metrics(tmp_path, [{"iteration": i, "reward/r": (i % 3) / 3, "nfe/sampling": 10 * i} for i in range(1, 6)])
    plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert _legend_texts(figures["reward_vs_nfe"]) == ["reward/r"]  # few points: drawn as they are


# 7 --------------------------------------------------------------------------------------------------------------


def test_grids_are_shown_in_the_order_of_the_run(tmp_path):
    """base, final, step-2, step-4 is not the order they were made in."""
    for name in ("final", "step-10", "step-2", "base", "step-4"):
        save_image_grid(torch.rand(1, 3, 4, 4), tmp_path / "grids" / f"{name}.png", nrow=1)
    page = write_report(tmp_path, inline_images=False, make_plots=False).read_text()
    assert re.findall(r'<img src="grids/([^"]+)\.png"', page) == ["base", "step-2", "step-4", "step-10", "final"]


# 8 --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, command", [({"steps": 12, "batch_size": 8}, "`flowalign eval`"),
                                             ({"method": "fk", "particles": 4}, "`flowalign steer`")])
def test_report_of_an_interrupted_eval_or_steer_says_to_resume_it(tmp_path, header, command):
    """It said the directory was not a run directory at all."""
    (tmp_path / "results.partial.jsonl").write_text(json.dumps({"journal": header}) + "\n")
    with pytest.raises(UserError) as err:
        cli_main([str(tmp_path)])
    msg = str(err.value)
    assert f"holds an interrupted {command} run" in msg and "plus --resume" in msg and "not a run directory" not in msg
    assert not (tmp_path / "report.html").exists()


# 9 --------------------------------------------------------------------------------------------------------------


def test_no_plots_leaves_out_plots_of_metrics_the_run_no_longer_has(tmp_path):
    """--no-plots showed every file in plots/, also one of a metric metrics.jsonl no longer logs."""
    _metrics(tmp_path, [{"iteration": i, "reward/r": 0.5, "train/approx_kl": 0.01} for i in (1, 2)])
    write_report(tmp_path)
    assert (tmp_path / "plots" / "kl.png").is_file()
    save_image_grid(torch.rand(1, 3, 4, 4), tmp_path / "plots" / "mine.png", nrow=1)  # not the report's: kept
    _metrics(tmp_path, [{"iteration": i, "reward/r": 0.5} for i in (1, 2)])
    page = write_report(tmp_path, inline_images=False, make_plots=False).read_text()
    assert re.findall(r'<img src="plots/[^"]+" alt="([^"]+)"', page) == ["reward", "mine"]
    assert "not shown: plots/kl.png, from an earlier build" in page


# 10 -------------------------------------------------------------------------------------------------------------


def test_an_eval_or_steer_grid_is_headed_samples_and_a_steer_grid_says_what_it_shows(tmp_path):
    """One grid cannot be 'the same prompts and seeds' as another; steer's was captioned just 'steered'."""
    ev, st = tmp_path / "eval", tmp_path / "steer"
    atomic_write_json(ev / "summary.json", _summary())
    save_image_grid(torch.rand(1, 3, 4, 4), ev / "grids" / "eval.png", nrow=1)
    page = write_report(ev, make_plots=False).read_text()
    assert "<h2>Samples</h2>" in page and "same prompts" not in page
    atomic_write_json(st / "summary.json", {**_summary(method="fk", lam=10.0), "cost": {"particles": 4}})
    save_image_grid(torch.rand(1, 3, 4, 4), st / "grids" / "steered.png", nrow=1)
    page = write_report(st, make_plots=False).read_text()
    cap = re.search(r"<figcaption>([^<]*)</figcaption>", page).group(1)
    assert "<h2>Samples</h2>" in page and "fk" in cap and "k = 4" in cap and "r scores" in cap


# 11 -------------------------------------------------------------------------------------------------------------


def test_pass_at_k_without_tasks_has_no_all_row_and_settings_read_plainly(tmp_path):
    """A prompt file without tasks gave pass@k rows overall and all (the same); the settings line printed Python
    reprs: resolution={'height': 32, 'width': 32}, rewards=['r'], path=None."""
    s = _summary()
    at_k = {"1": 0.5, "2": 0.75}
    s.update(per_task={"all": {"r": 0.5}}, counts={"all": 4}, n=4,
             pass_at_k={"r": {"k": [1, 2], "overall": at_k, "per_task": {"all": at_k}}})
    atomic_write_json(tmp_path / "summary.json", s)
    page = write_report(tmp_path, make_plots=False).read_text()
    assert "<td>all</td>" not in page and "<tr><td>overall</td><td>0.500</td><td>0.750</td></tr>" in page
    line = re.search(r"evaluation settings: ([^<]*)</p>", page).group(1)
    assert "resolution=32×32" in line and "rewards=r," in line and "path=none" in line
    assert not re.search(r"[{}\[\]]|None", line)


def test_the_configuration_of_a_multi_process_run_shows_its_own_batch_layout(tmp_path):
    """A 2-process run's report said '2 groups/rank on 1 rank(s)' (the summary at world size 1), where the run
    itself printed '1 groups/rank on 2 rank(s)': the world size now comes from metrics.jsonl or a checkpoint."""
    run = _training_run(tmp_path / "run", "train.iterations=1", "train.groups_per_iter=2")
    _metrics(run, [{"iteration": 1, "reward/r": 0.5}, {"iteration": 1, "dist/world_size": 2}])
    page = write_report(run, make_plots=False).read_text()
    assert "1 groups/rank on 2 rank(s)" in page and "on 1 rank(s)" not in page
    run1 = _training_run(tmp_path / "one", "train.iterations=1", "train.groups_per_iter=2")
    (run1 / "checkpoints" / "step-1").mkdir(parents=True)
    (run1 / "checkpoints" / "step-1" / "meta.json").write_text('{"iteration": 1, "world_size": 2}')
    assert "1 groups/rank on 2 rank(s)" in write_report(run1, make_plots=False).read_text()
