"""Review of `flowalign compare`: bad input is one line (exit 2), seeds of one setting are merged, every row can
be told apart, and a stale final evaluation of a resumed-and-extended run sits where it was taken."""

from __future__ import annotations

import json

import pytest
import yaml

from flowalign.cli import main
from flowalign.compare import compare, run_curve


def _run(d, values, records=None, cfg=None, raw_metrics=None):
    d.mkdir(parents=True)
    cfg = cfg if cfg is not None else {"train": {"groups_per_iter": 2, "group_size": 4}, "credit": {"name": "outcome"}}
    (d / "config.yaml").write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    if records is None:
        records = [{"iteration": i, "nfe/sampling": 10 * i, "time/elapsed_s": 1.0 * i} for i in range(1, 5)]
    text = raw_metrics if raw_metrics is not None else "".join(json.dumps(r) + "\n" for r in records)
    (d / "metrics.jsonl").write_text(text)
    for label, v in values.items():
        (d / "eval" / label).mkdir(parents=True)
        (d / "eval" / label / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": v}}))
    return d


def _fails_in_one_line(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_compare_corrupt_metrics_line_is_one_line_error(tmp_path, capsys):
    """A bad line in the middle of metrics.jsonl raised a ValueError traceback (exit 1), not a one-line error."""
    recs = [{"iteration": i, "nfe/sampling": 10 * i} for i in range(1, 4)]
    raw = json.dumps(recs[0]) + "\n{oops\n" + json.dumps(recs[1]) + "\n" + json.dumps(recs[2]) + "\n"
    d = _run(tmp_path / "r", {"base": 0.3, "final": 0.5}, raw_metrics=raw)
    out = tmp_path / "out"
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(out)], "metrics.jsonl:2")
    assert not out.exists()


@pytest.mark.parametrize("text", ["train: [1\n", "- a\n- b\n", "train: 5\n"])
def test_compare_unreadable_config_is_one_line_error(tmp_path, capsys, text):
    """Invalid YAML, or a config.yaml that is not a mapping, crashed with a yaml/Attribute traceback."""
    d = _run(tmp_path / "r", {"base": 0.3, "final": 0.5}, cfg=text)
    out = tmp_path / "out"
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(out)], "config.yaml")
    assert not out.exists()


def test_compare_non_numeric_summary_value_is_one_line_error(tmp_path, capsys):
    d = _run(tmp_path / "r", {"base": 0.3, "final": 0.5})
    (d / "eval" / "final" / "summary.json").write_text(json.dumps({"overall": {"shapes_strict": "n/a"}}))
    out = tmp_path / "out"
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(out)], "final")
    assert not out.exists()


def test_compare_out_under_a_file_is_one_line_error(tmp_path, capsys):
    """`--out FILE/sub`: mkdir failed with NotADirectoryError after all runs were read and plotted."""
    d = _run(tmp_path / "r", {"base": 0.3, "final": 0.5})
    f = tmp_path / "afile"
    f.write_text("x")
    _fails_in_one_line(capsys, ["compare", str(d), "--out", str(f / "sub")], str(f))


def test_mean_over_seeds_merges_seeds_run_on_different_devices(tmp_path):
    """Seeds run side by side on cuda:0 and cuda:1 (or checkpointed at another cadence) are one setting; the
    device made them two 'settings', so --mean-over-seeds silently printed two unmerged rows."""
    def cfg(seed, device, ckpt):
        return {"train": {"groups_per_iter": 2, "group_size": 4, "seed": seed, "checkpoint_every": ckpt},
                "model": {"device": device}, "credit": {"name": "outcome"}}

    a = _run(tmp_path / "s42", {"base": 0.4, "final": 0.6}, cfg=cfg(42, "cuda:0", 10))
    b = _run(tmp_path / "s43", {"base": 0.4, "final": 0.5}, cfg=cfg(43, "cuda:1", 5))
    rows = compare([a, b], tmp_path / "out", seeds_mean=True)[1].read_text().splitlines()[2:]
    assert len(rows) == 1 and rows[0].startswith("| s42 (+1 seed) |")
    assert "42: 0.600, 43: 0.500" in rows[0]


def test_compare_rows_of_runs_with_the_same_directory_name_can_be_told_apart(tmp_path):
    """runs/<method>/seed42 layouts: every row and legend entry was labelled 'seed42'."""
    a = _run(tmp_path / "outcome" / "seed42", {"base": 0.3, "final": 0.5})
    b = _run(tmp_path / "lowlr" / "seed42", {"base": 0.3, "final": 0.7})
    c = _run(tmp_path / "other", {"base": 0.3, "final": 0.4})
    rows = compare([a, b, c], tmp_path / "out")[1].read_text().splitlines()[2:]
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["outcome/seed42", "lowlr/seed42", "other"]


def test_compare_places_a_stale_final_eval_of_an_extended_run_where_it_was_taken(tmp_path):
    """A run of 8 iterations resumed with train.iterations=12: while session 2 runs, eval/final is still the one
    taken at iteration 8. It was put at the last logged iteration (10), replacing the step-10 evaluation."""
    recs = [{"iteration": 0, "time/elapsed_s": 1.0, "eval/overall/shapes_strict": 0.3}]
    recs += [{"iteration": i, "nfe/sampling": 10 * i, "train/loss": 0.0, "time/elapsed_s": 1.0 + i}
             for i in range(1, 9)]
    recs[4]["eval/overall/shapes_strict"] = 0.4  # step-4
    recs.append({"iteration": 8, "time/elapsed_s": 10.0, "eval/overall/shapes_strict": 0.5})  # final of session 1
    recs += [{"iteration": i, "nfe/sampling": 10 * i, "train/loss": 0.0, "time/elapsed_s": 1.0 * (i - 8)}
             for i in (9, 10)]
    recs[-1]["eval/overall/shapes_strict"] = 0.7  # step-10
    cfg = {"train": {"groups_per_iter": 2, "group_size": 4, "iterations": 12}, "credit": {"name": "outcome"}}
    d = _run(tmp_path / "r", {"base": 0.3, "step-4": 0.4, "final": 0.5, "step-10": 0.7}, recs, cfg=cfg)
    c = run_curve(d)
    assert c["iterations"] == [0, 4, 8, 10] and c["value"] == [0.3, 0.4, 0.5, 0.7]
    assert c["nfe"] == [0.0, 40.0, 80.0, 100.0] and c["rollouts"] == [0, 32, 64, 80]
