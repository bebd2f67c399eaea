"""External evaluators (GenEval): the export layout its evaluate_images.py reads, and importing its results.

GenEval itself (mmdet, a Mask2Former detector) cannot run here; its results file is written below in the format its
evaluate_images.py writes (one JSON line per image: filename, tag, prompt, correct, reason, metadata, details)."""

import json
import os

import pytest
from PIL import Image

from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)
from flowalign import data as D
from flowalign.cli import main
from flowalign.evaluate import as_records
from flowalign.external import geneval_job

SIZE = ["--model-arg", "height=32", "--model-arg", "width=32"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd3_dir):
    """A tiny SD3 evaluated on 6 GenEval prompts x 2 images with --export geneval."""
    out = tmp_path_factory.mktemp("gx") / "eval"
    assert main(["eval", "--model", "sd3", "--path", str(tiny_sd3_dir), *SIZE, "--prompts", "geneval",
                 "--max-prompts", "6", "--seeds", "2", "--steps", "1", "--rewards", "saturation", "--grid", "0",
                 "--export", "geneval", "--out", str(out)]) == 0
    return out


def _geneval_results(out, correct, path=None, drop=0, prompt=None):
    """What GenEval's evaluate_images.py writes for the export in ``out``: one line per image it finds."""
    lines = []
    root = out / "geneval"
    for sub in sorted(os.listdir(root)):
        meta = json.loads((root / sub / "metadata.jsonl").read_text())
        for name in sorted(os.listdir(root / sub / "samples")):
            i, k = int(sub), int(name[:-4])
            lines.append({"filename": os.path.join(str(root), sub, "samples", name), "tag": meta["tag"],
                          "prompt": prompt or meta["prompt"], "correct": bool(correct(i, k)), "reason": "",
                          "metadata": json.dumps(meta), "details": "{}"})
    path = path or out.parent / "geneval_results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines[drop:]))
    return path


def test_export_writes_the_layout_geneval_reads(exported):
    """GenEval's README: <i:05d>/metadata.jsonl (the i-th line of evaluation_metadata.jsonl, read with json.load)
    and <i:05d>/samples/<k:04d>.png; its evaluator keeps digit folders and \\d+.png files only."""
    records = as_records(D.spaced_subset(D.load_prompts("geneval"), 6))
    root = exported / "geneval"
    assert sorted(os.listdir(root)) == [f"{i:05d}" for i in range(6)]
    for i, rec in enumerate(records):
        with open(root / f"{i:05d}" / "metadata.jsonl") as fp:
            assert json.load(fp) == rec  # tag, include (and exclude), prompt: what its evaluate() reads
        assert sorted(os.listdir(root / f"{i:05d}" / "samples")) == ["0000.png", "0001.png"]
        img = Image.open(root / f"{i:05d}" / "samples" / "0001.png")
        assert img.mode == "RGB" and img.size == (32, 32)
    settings = json.loads((exported / "summary.json").read_text())["settings"]
    assert settings["export"] == "geneval"


def test_import_adds_geneval_scores_with_its_task_means_and_overall(exported, tmp_path):
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(exported, out)
    correct = lambda i, k: k == 0 or i % 3 == 0  # noqa: E731
    results = _geneval_results(out, correct)
    assert main(["import-scores", "geneval", str(results), "--into", str(out)]) == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["geneval"] == float(correct(r["prompt_index"], r["sample"])) for r in recs)
    assert all("saturation" in r for r in recs)  # the evaluation's own rewards stay
    summ = json.loads((out / "summary.json").read_text())
    tasks = {}
    for r in recs:
        tasks.setdefault(r["tag"], []).append(r["geneval"])
    want = {t: sum(v) / len(v) for t, v in tasks.items()}
    assert {t: v["geneval"] for t, v in summ["per_task"].items()} == pytest.approx(want)
    assert summ["overall"]["geneval"] == pytest.approx(sum(want.values()) / len(want))  # GenEval: mean over tasks
    assert summ["pass_at_k"]["geneval"]["k"] == [1, 2]
    assert summ["settings"]["external_scores"]["geneval"]["results"] == str(results)
    assert "geneval" in (out / "report.html").read_text()


def test_import_refuses_results_that_do_not_match_the_export_and_writes_nothing(exported, tmp_path, capsys):
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(exported, out)
    before = (out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    part = _geneval_results(out, lambda i, k: True, path=tmp_path / "part.jsonl", drop=1)
    fails(capsys, ["import-scores", "geneval", str(part), "--into", str(out)], "1 without a GenEval result")
    other = _geneval_results(out, lambda i, k: True, path=tmp_path / "other.jsonl", prompt="a photo of a cat")
    fails(capsys, ["import-scores", "geneval", str(other), "--into", str(out)], "results of another export")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "x.png", "score": 1}) + "\n")
    fails(capsys, ["import-scores", "geneval", str(bad), "--into", str(out)], "not a GenEval result")
    fails(capsys, ["import-scores", "geneval", str(part), "--into", str(tmp_path)], "not an evaluation directory")
    # the same prompts but other images (another export of another model): its files exist here and differ
    twin = tmp_path / "twin"
    shutil.copytree(exported, twin)
    png = twin / "geneval" / "00000" / "samples" / "0000.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(png)
    theirs = _geneval_results(twin, lambda i, k: True, path=tmp_path / "twin.jsonl")
    fails(capsys, ["import-scores", "geneval", str(theirs), "--into", str(out)], "results of another export",
          "other images")
    assert ((out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()) == before


def test_geneval_job_reads_the_prompt_and_image_from_a_result_path():
    assert geneval_job("/data/run/geneval/00012/samples/0003.png") == (12, 3)
    assert geneval_job("C:\\run\\geneval\\00000\\samples\\0001.png") == (0, 1)
    with pytest.raises(ValueError):
        geneval_job("/data/run/geneval/00012/grid.png")


def test_export_refuses_prompts_without_geneval_metadata_before_the_model_loads(tmp_path, capsys, no_model):
    fails(capsys, ["eval", "--prompts", "shapes-bench", "--export", "geneval", "--out", str(tmp_path / "o")],
          "--export geneval needs GenEval prompt records", "'a red triangle'")
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_video_model(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle moving to the left", "tag": "motion", "include": []}) + "\n")
    fails(capsys, ["eval", "--model", "shapes_video", "--prompts", str(prompts), "--rewards", "shapes_motion_partial",
                   "--export", "geneval", "--out", str(tmp_path / "o")], "--export geneval takes images")
    assert not (tmp_path / "o").exists()
