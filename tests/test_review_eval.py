"""Review of evaluation, reports, sampling, prompt data and safe writes: each test pins one fixed bug."""

from __future__ import annotations

import json
import os
import re

import pytest
from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)

from flowalign.cli import main
from flowalign.data import PromptSampler, load_prompts
from flowalign.errors import UserError


# ---------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("empty", ["", "   ", "\t"])
def test_an_empty_jsonl_prompt_is_refused_naming_the_file_and_line(tmp_path, empty):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "a red circle"}) + "\n" + json.dumps({"prompt": empty, "task": "x"}) + "\n")
    with pytest.raises(UserError) as err:
        load_prompts(p)
    msg = str(err.value)
    assert f"{p}:2" in msg and "empty prompt" in msg and "\n" not in msg
    j = tmp_path / "p.json"  # the same rule for a .json list, of objects or of strings
    j.write_text(json.dumps(["a red circle", empty]))
    with pytest.raises(UserError, match=r"p\.json\[1\].*empty prompt"):
        load_prompts(j)


def test_eval_refuses_an_empty_jsonl_prompt_in_one_line_before_the_model_loads(tmp_path, capsys, no_model):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a red circle"}\n{"prompt": ""}\n')
    out = tmp_path / "ev"
    _fails(capsys, ["eval", "--prompts", str(p), "--out", str(out)], f"{p}:2", "empty prompt")
    assert not out.exists()
    _fails(capsys, ["sample", "--prompt-file", str(p), "--out", str(tmp_path / "g.png")], f"{p}:2", "empty prompt")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.jsonl"]


def test_prompt_sampler_takes_a_negative_seed():
    """train.seed=-1 crashed the first iteration (numpy refuses negative entropy) after the base evaluation ran."""
    s = PromptSampler(7, 3, seed=-1)
    a = [s.next_groups() for _ in range(5)]
    b = PromptSampler(7, 3, seed=-1)
    assert a == [b.next_groups() for _ in range(5)]
    assert sorted(a[0] + a[1] + [a[2][0]]) == list(range(7))  # epoch 0 is a permutation


# ---------------------------------------------------------------------------------------------- report


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
    assert re.findall(r'<img src="grids/([^"]+)\.png"', page) == ["base", "final", "step-5", "step-20", "step-100"]


# ---------------------------------------------------------------------------------------------- eval / sample CLI


def test_eval_and_sample_refuse_an_out_under_a_file_before_the_model_loads(tmp_path, capsys, no_model):
    """Else the whole evaluation ran and the final mkdir / write failed with a traceback."""
    f = tmp_path / "file"
    f.write_text("keep")
    _fails(capsys, ["eval", "--max-prompts", "1", "--out", str(f / "ev")], str(f), "not a directory")
    _fails(capsys, ["sample", "a red circle", "--out", str(f / "sub" / "g.png")], str(f), "not a directory")
    assert f.read_text() == "keep" and sorted(x.name for x in tmp_path.iterdir()) == ["file"]


def test_sample_refuses_prompts_and_a_prompt_file_together(tmp_path, capsys, no_model):
    """One of the two was silently ignored (the positional prompts)."""
    _fails(capsys, ["sample", "a red circle", "--prompt-file", "shapes-bench", "--out", str(tmp_path / "g.png")],
           "--prompt-file", "not both")
    assert list(tmp_path.iterdir()) == []


def test_eval_summary_records_which_model_lora_and_prompt_set_were_evaluated(tmp_path, capsys):
    """REWARDS_AND_EVAL §3.2: the results record the LoRA state; two eval dirs (base, LoRA) must be told apart."""
    out = tmp_path / "ev"
    code = main(["eval", "--max-prompts", "1", "--seeds", "1", "--steps", "1", "--rewards", "shapes_partial",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["model"] == "shapes" and settings["lora"] is None and settings["prompt_set"] == "shapes-bench"
    assert "model=shapes" in (out / "report.html").read_text()


# ---------------------------------------------------------------------------------------------- io


def test_atomic_dir_fsyncs_the_files_written_into_it(tmp_path, monkeypatch):
    """A checkpoint's files (e.g. safetensors' save_file, which does not fsync) must be durable before the rename
    publishes the directory, else a power loss can leave a complete-looking checkpoint with empty files."""
    from flowalign import io as fio

    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(fio.os, "fsync", spy)
    with fio.atomic_dir(tmp_path / "ckpt") as d:
        (d / "weights.bin").write_bytes(b"x" * 10)  # written by another library, not fsynced by it
        (d / "sub").mkdir()
        (d / "sub" / "state.json").write_text("{}")
    names = {os.path.basename(p) for p in synced}
    assert {"weights.bin", "state.json"} <= names
    assert (tmp_path / "ckpt" / "weights.bin").read_bytes() == b"x" * 10


def test_ungrammatical_prompts_of_known_words_fail_before_sampling(tmp_path, capsys, monkeypatch):
    """'circle red a' uses only the model's words, so the model's vocabulary check passes; the shapes verifier
    refused it only when scoring, after sampling. Train and eval now parse every prompt of a shapes reward first."""
    from pathlib import Path

    import flowalign.evaluate as E
    import flowalign.train as T
    from flowalign import config as C

    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\ncircle red a\n")

    def no_sampling(*a, **k):
        raise AssertionError("sampling started before the prompt was refused")

    monkeypatch.setattr(E, "run_eval", no_sampling)
    _fails(capsys, ["eval", "--prompts", str(bad), "--out", str(tmp_path / "ev"), "--rewards", "shapes_strict"],
          "'circle red a' is outside the shapes grammar")
    assert not (tmp_path / "ev").exists()
    monkeypatch.setattr(T, "run_eval", no_sampling)
    cfg = C.load_config(str(Path(__file__).resolve().parents[1] / "configs" / "shapes_grpo.yaml"),
                        [f"data.train_prompts={bad}", f"output.run_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError, match="'circle red a' is outside the shapes grammar"):
        T.train(cfg)
    assert not (tmp_path / "run").exists()


def test_sample_refuses_an_out_name_that_is_not_png(tmp_path, capsys, no_model):
    """The grid is PNG bytes: samples.jpg would hold a PNG under a JPEG name."""
    _fails(capsys, ["sample", "a red circle", "--out", str(tmp_path / "samples.jpg")], "give the file a .png name")
    assert not (tmp_path / "samples.jpg").exists()
