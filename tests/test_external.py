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


def _export(tmp_path_factory, model_dir, prompts, n, layout):
    """A tiny SD3 evaluated on ``n`` prompts of ``prompts`` x 2 images with ``--export layout``."""
    out = tmp_path_factory.mktemp(layout) / "eval"
    assert main(["eval", "--model", "sd3", "--path", str(model_dir), *SIZE, "--prompts", prompts,
                 "--max-prompts", str(n), "--seeds", "2", "--steps", "1", "--rewards", "saturation", "--grid", "0",
                 "--export", layout, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_sd3_dir):
    return _export(tmp_path_factory, tiny_sd3_dir, "geneval", 6, "geneval")


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
    assert summ["settings"]["external_scores"]["geneval"]["results"] == str(results.resolve())
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


def _tree(d):
    """Every file under ``d`` with its bytes: equal before and after a refused import."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_geneval_import_refuses_an_evaluation_not_exported_for_geneval(exported, exported_t2i, tiny_sd3_dir, tmp_path,
                                                                        capsys):
    """As t2i-compbench and vbench refuse theirs: an evaluation of the same prompts and seeds without --export
    geneval holds no images GenEval could have scored, so results written on a remote copy of another (exported)
    run, or naming files under its nonexistent geneval/, are refused in one line and nothing is written; so is a
    T2I-CompBench export (no talk of its nonexistent geneval/ folder)."""
    import shutil

    plain = tmp_path / "plain"
    assert main(["eval", "--model", "sd3", "--path", str(tiny_sd3_dir), *SIZE, "--prompts", "geneval",
                 "--max-prompts", "6", "--seeds", "2", "--steps", "1", "--rewards", "saturation", "--grid", "0",
                 "--out", str(plain)]) == 0
    capsys.readouterr()
    local = _geneval_results(exported, lambda i, k: True, path=tmp_path / "local.jsonl")
    remote = tmp_path / "remote.jsonl"
    remote.write_text(local.read_text().replace(str(exported / "geneval"), "/remote/box/run/geneval"))
    here = tmp_path / "here.jsonl"  # the files it would have scored, had plain been exported
    here.write_text(local.read_text().replace(str(exported / "geneval"), str(plain / "geneval")))
    t2i = tmp_path / "t2i"
    shutil.copytree(exported_t2i, t2i)
    for d in (plain, t2i):
        before = _tree(d)
        for res in (remote, here, local):
            line = fails(capsys, ["import-scores", "geneval", str(res), "--into", str(d)],
                         f"{d} was not exported for GenEval", "--export geneval")
            assert "geneval/" not in line.split("evaluate with")[0]  # names no folder that does not exist
        assert _tree(d) == before
    assert not (plain / "geneval").exists()


def test_import_records_the_results_files_absolute_path_and_hints_with_absolute_paths(exported, tmp_path, capsys,
                                                                                      monkeypatch):
    """A relative results path (from the working directory of the import) is recorded resolved in summary.json; the
    "not found" hint names the export and the --outfile absolutely, as GenEval needs and `flowalign eval` prints."""
    import shutil

    shutil.copytree(exported, tmp_path / "eval")
    _geneval_results(tmp_path / "eval", lambda i, k: True, path=tmp_path / "geneval_results.jsonl")
    monkeypatch.chdir(tmp_path)
    root = tmp_path.resolve()
    fails(capsys, ["import-scores", "geneval", "missing.jsonl", "--into", "eval"], "'missing.jsonl' not found",
          f"evaluate_images.py {root / 'eval' / 'geneval'} --outfile {root / 'missing.jsonl'} --model-path")
    fails(capsys, ["import-scores", "t2i-compbench", "missing.json", "--into", "eval", "--name", "x"],
          f"T2I-CompBench's evaluator on {root / 'eval' / 't2i-compbench'}")
    assert main(["import-scores", "geneval", "geneval_results.jsonl", "--into", "eval"]) == 0
    recorded = json.loads((tmp_path / "eval" / "summary.json").read_text())["settings"]["external_scores"]
    assert recorded["geneval"]["results"] == str(root / "geneval_results.jsonl")


def test_a_file_of_another_format_is_named_for_what_was_expected(exported, exported_t2i, tmp_path, capsys):
    """Each reader says which file it expected, keeping the parser's detail: GenEval's JSON lines given to the
    T2I-CompBench import, a JSON object instead of its list, a JSON list over several lines given to GenEval's; a NaN
    score and a duplicate are two distinct refusals."""
    import shutil

    gen, t2i = tmp_path / "gen", tmp_path / "t2i"
    shutil.copytree(exported, gen)
    shutil.copytree(exported_t2i, t2i)
    before = _tree(gen), _tree(t2i)
    lines = _geneval_results(gen, lambda i, k: True, path=tmp_path / "geneval_results.jsonl")
    t2i_args = ["--into", str(t2i), "--name", "blip_vqa"]
    fails(capsys, ["import-scores", "t2i-compbench", str(lines), *t2i_args],
          "geneval_results.jsonl is not T2I-CompBench's vqa_result.json (a JSON list of {question_id, answer})",
          "Extra data: line 2 column 1")
    res = tmp_path / "vqa_result.json"
    res.write_text(json.dumps({"0": 0.5}))
    fails(capsys, ["import-scores", "t2i-compbench", str(res), *t2i_args], "is not T2I-CompBench's vqa_result.json",
          "it holds a JSON object, not a list")
    for nan in ("nan", float("nan")):
        res.write_text(json.dumps([{"question_id": n, "answer": nan if n == 4 else 0.5} for n in range(6)]))
        line = fails(capsys, ["import-scores", "t2i-compbench", str(res), *t2i_args],
                     "image 4 is scored", "not a finite number")
        assert "twice" not in line
    res.write_text(json.dumps([{"question_id": n, "answer": 0.5} for n in [0, 1, 1]]))
    line = fails(capsys, ["import-scores", "t2i-compbench", str(res), *t2i_args], "image 1 is scored twice")
    assert "finite" not in line
    res.write_text(json.dumps([{"question_id": n, "answer": 0.5} for n in range(12)], indent=1))
    fails(capsys, ["import-scores", "geneval", str(res), "--into", str(gen)],
          "vqa_result.json is not GenEval's results (the JSON lines, one per image, that",
          "vqa_result.json:1: invalid JSON line")
    assert (_tree(gen), _tree(t2i)) == before


def test_geneval_job_reads_the_prompt_and_image_from_a_result_path():
    assert geneval_job("/data/run/geneval/00012/samples/0003.png") == (12, 3)
    assert geneval_job("C:\\run\\geneval\\00000\\samples\\0001.png") == (0, 1)
    with pytest.raises(ValueError):
        geneval_job("/data/run/geneval/00012/grid.png")


def test_export_refuses_prompts_without_geneval_metadata_before_the_model_loads(tmp_path, capsys, no_model):
    fails(capsys, ["eval", "--prompts", "shapes-bench", "--export", "geneval", "--out", str(tmp_path / "o")],
          "--export geneval needs GenEval prompt records", "'a red triangle'")
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_video_model_before_it_loads(tmp_path, capsys, no_model):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle moving to the left", "tag": "motion", "include": []}) + "\n")
    fails(capsys, ["eval", "--model", "shapes_video", "--prompts", str(prompts), "--rewards", "shapes_motion_partial",
                   "--export", "geneval", "--out", str(tmp_path / "o")], "--export geneval takes images")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------- T2I-CompBench


@pytest.fixture(scope="module")
def exported_t2i(tmp_path_factory, tiny_sd3_dir):
    return _export(tmp_path_factory, tiny_sd3_dir, "t2i-compbench-color", 3, "t2i-compbench")


def test_t2i_export_names_files_as_its_evaluators_read_them(exported_t2i):
    """BLIP_vqa.py / CLIP_similarity.py sort samples/ by the number after the last '_' and read the prompt as the text
    before the first '_'; UniDet numbers its results by that number. Image n = i·seeds + k."""
    records = as_records(D.spaced_subset(D.load_prompts("t2i-compbench-color"), 3))
    names = os.listdir(exported_t2i / "t2i-compbench" / "samples")
    names.sort(key=lambda x: int(x.split("_")[-1].split(".")[0]))  # their sort
    assert len(names) == 6
    for n, name in enumerate(names):
        assert int(name.split("_")[-1].split(".")[0]) == n  # position == number: both numberings agree
        assert name.split("_")[0] == records[n // 2]["prompt"]
        assert Image.open(exported_t2i / "t2i-compbench" / "samples" / name).size == (32, 32)


def test_t2i_import_maps_question_ids_back_to_images(exported_t2i, tmp_path, capsys):
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(exported_t2i, out)
    blip = out / "t2i-compbench" / "annotation_blip" / "vqa_result.json"
    blip.parent.mkdir(parents=True)
    blip.write_text(json.dumps([{"question_id": n, "answer": f"{n / 10:.4f}"} for n in range(6)]))  # BLIP: strings
    fails(capsys, ["import-scores", "t2i-compbench", str(blip), "--into", str(out)], "--name is required")
    assert main(["import-scores", "t2i-compbench", str(blip), "--into", str(out), "--name", "blip_vqa"]) == 0
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["blip_vqa"] == pytest.approx((2 * r["prompt_index"] + r["sample"]) / 10) for r in recs)
    summ = json.loads((out / "summary.json").read_text())
    assert summ["overall"]["blip_vqa"] == pytest.approx(0.25) and "saturation" in summ["overall"]
    assert summ["settings"]["external_scores"]["blip_vqa"]["results"] == str(blip.resolve())
    before = (out / "results.jsonl").read_bytes()
    short = tmp_path / "short.json"
    short.write_text(json.dumps([{"question_id": n, "answer": 1.0} for n in range(5)]))
    fails(capsys, ["import-scores", "t2i-compbench", str(short), "--into", str(out), "--name", "x"],
          "1 without a T2I-CompBench result")
    for taken in ("saturation", "sample", "prompt", "seed", "prompt_index"):  # would overwrite the records
        fails(capsys, ["import-scores", "t2i-compbench", str(blip), "--into", str(out), "--name", taken],
              f"--name {taken!r} is already a field of the evaluation's records")
    for bad in ([{"question_id": 0.7, "answer": 1}], [{"question_id": 0, "answer": True}]):
        short.write_text(json.dumps(bad))
        fails(capsys, ["import-scores", "t2i-compbench", str(short), "--into", str(out), "--name", "x"],
              "is not a T2I-CompBench result")
    twin = tmp_path / "twin"  # another export's directory: its results are of other images
    shutil.copytree(exported_t2i, twin)
    theirs = twin / "t2i-compbench" / "annotation_blip" / "vqa_result.json"
    theirs.parent.mkdir(parents=True)
    theirs.write_text(blip.read_text())
    fails(capsys, ["import-scores", "t2i-compbench", str(theirs), "--into", str(out), "--name", "x"],
          "another export than")
    assert (out / "results.jsonl").read_bytes() == before
    # the same name again replaces the earlier import
    blip.write_text(json.dumps([{"question_id": n, "answer": 1.0} for n in range(6)]))
    assert main(["import-scores", "t2i-compbench", str(blip), "--into", str(out), "--name", "blip_vqa"]) == 0
    assert json.loads((out / "summary.json").read_text())["overall"]["blip_vqa"] == 1.0
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "results.jsonl").write_text("{}\n")
    fails(capsys, ["import-scores", "t2i-compbench", str(blip), "--into", str(broken), "--name", "y"],
          "cannot read", "as an evaluation's records")


def test_t2i_export_refuses_prompts_that_cannot_be_its_file_names(tmp_path, capsys, no_model):
    prompts = tmp_path / "p.txt"
    for text in ("a red_car", "a logo.png on a wall"):  # UniDet's numeracy script splits the name at '.png'
        prompts.write_text(text + "\n")
        fails(capsys, ["eval", "--prompts", str(prompts), "--export", "t2i-compbench", "--out", str(tmp_path / "o")],
              "cannot be a T2I-CompBench file name")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------- HPSv2 benchmark


def _hpd_dir(tmp_path, n=80):
    """HPDv2's benchmark/ layout: one JSON list of prompts per style (shapes prompts, so the shapes model runs)."""
    from flowalign.data import HPD_STYLES

    d = tmp_path / "hpd"
    d.mkdir()
    words = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")]
    for j, style in enumerate(HPD_STYLES):
        (d / f"{style}.json").write_text(json.dumps([words[(i + j) % len(words)] for i in range(n)]))
    return d


def test_hpd_benchmark_directory_loads_style_by_style(tmp_path, capsys, no_model):
    from flowalign.data import HPD_STYLES

    d = _hpd_dir(tmp_path, n=3)
    recs = D.load_prompts(str(d))
    assert [r.metadata["task"] for r in recs] == [s for s in HPD_STYLES for _ in range(3)]
    assert [r.metadata["style_index"] for r in recs] == [0, 1, 2] * 4
    (d / "photo.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(Exception, match="non-empty JSON list of prompt strings"):
        D.load_prompts(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(capsys, ["eval", "--prompts", str(empty), "--out", str(tmp_path / "o")], "is a directory",
          "the HPSv2 benchmark's directory")


def test_summarize_chunks_is_the_hpsv2_benchmark_statistic():
    import statistics

    from flowalign.evaluate import summarize_chunks

    recs = [{"prompt_index": i, "sample": 0, "task": "photo", "hps": float(i // 80)} for i in range(160)]
    recs += [{"prompt_index": 160 + i, "sample": 0, "task": "anime", "hps": 1.0} for i in range(100)]  # not 80·k
    out = summarize_chunks(recs, ["hps"])
    assert out["hps"]["photo"] == {"mean": 0.5, "std": statistics.pstdev([0.0, 1.0]), "chunks": 2}
    assert "anime" not in out["hps"]


def test_hpsv2_export_writes_its_layout_and_the_summary_its_chunks(tmp_path, capsys, monkeypatch):
    d = _hpd_dir(tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--prompts", str(d), "--seeds", "1", "--steps", "1", "--rewards", "shapes_partial",
                 "--grid", "0", "--export", "hpsv2", "--batch-size", "64", "--out", str(out)]) == 0
    for style in ("anime", "concept-art", "paintings", "photo"):
        names = sorted(os.listdir(out / "hpsv2" / style))
        assert names == [f"{i:05d}.jpg" for i in range(80)]  # HPSv2's evaluate reads <style>/<idx:05d>.jpg
        assert Image.open(out / "hpsv2" / style / names[0]).format == "JPEG"
    summ = json.loads((out / "summary.json").read_text())
    chunks = summ["chunks"]["shapes_partial"]
    assert set(chunks) == {"anime", "concept-art", "paintings", "photo"}
    assert all(c["chunks"] == 1 and c["mean"] == pytest.approx(summ["per_task"][s]["shapes_partial"])
               for s, c in chunks.items())
    capsys.readouterr()  # the run's progress bars
    fails(capsys, ["eval", "--prompts", str(d), "--seeds", "2", "--export", "hpsv2", "--out", str(tmp_path / "o")],
          "one image per prompt", "--seeds 1")
    fails(capsys, ["eval", "--seeds", "1", "--export", "hpsv2", "--out", str(tmp_path / "o")],
          "needs the HPSv2 benchmark's prompts")


def test_hpd_subsets_and_several_seeds_get_no_chunk_statistic_and_no_export(tmp_path, capsys):
    """HPSv2's statistic is over each style's full list, one image per prompt; its loader would silently score the
    next file for a missing one, so a subset is not exported."""
    d = _hpd_dir(tmp_path)
    fails(capsys, ["eval", "--prompts", str(d), "--seeds", "1", "--max-prompts", "160", "--export", "hpsv2",
                   "--out", str(tmp_path / "o")], "needs every prompt of each style")
    for extra, name in ((["--max-prompts", "160"], "sub"), (["--seeds", "2"], "two")):
        args = ["--seeds", "1", *extra] if name == "sub" else extra
        assert main(["eval", "--prompts", str(d), *args, "--steps", "1", "--rewards", "shapes_partial", "--grid", "0",
                     "--batch-size", "64", "--out", str(tmp_path / name)]) == 0
        assert "chunks" not in json.loads((tmp_path / name / "summary.json").read_text())
    (d / "photo.json").unlink()
    capsys.readouterr()
    fails(capsys, ["eval", "--prompts", str(d), "--out", str(tmp_path / "o")], "lacks photo.json")


def test_compare_offers_rewards_not_prompt_metadata_and_defaults_to_the_first_reward(tmp_path, capsys):
    d = _hpd_dir(tmp_path)
    for name in ("a", "b"):
        assert main(["eval", "--prompts", str(d), "--seeds", "1", "--max-prompts", "8", "--steps", "1", "--rewards",
                     "shapes_partial", "--grid", "0", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    fails(capsys, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--reward", "style_index", "--out",
                   str(tmp_path / "c")], "it holds: shapes_partial)")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "compare.md").read_text().startswith("# shapes_partial: 2 evaluations")


def test_import_scores_offers_only_evaluators_with_per_image_results(capsys):
    with pytest.raises(SystemExit):
        main(["import-scores", "hpsv2", "x.json", "--into", "y"])
    assert "invalid choice: 'hpsv2'" in capsys.readouterr().err


# ------------------------------------------------------------------------ matching external rows to the export's images


def test_geneval_import_refuses_an_image_scored_twice_or_not_in_the_evaluation(exported, tmp_path, capsys):
    """Each (prompt i, image k) of the evaluation needs exactly one GenEval result: a duplicate line (one image
    evaluated twice) or a result for an image the evaluation does not hold (another export's prompt 6) is refused
    and nothing is written."""
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(exported, out)
    before = (out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    good = _geneval_results(out, lambda i, k: True, path=tmp_path / "good.jsonl")
    lines = good.read_text().splitlines(keepends=True)
    twice = tmp_path / "twice.jsonl"
    twice.write_text("".join(lines + lines[:1]))
    fails(capsys, ["import-scores", "geneval", str(twice), "--into", str(out)], "image 0 of prompt 0 is scored twice")
    extra = dict(json.loads(lines[0]), filename=str(out / "geneval" / "00006" / "samples" / "0000.png"))
    more = tmp_path / "more.jsonl"
    more.write_text("".join(lines) + json.dumps(extra) + "\n")
    fails(capsys, ["import-scores", "geneval", str(more), "--into", str(out)], "0 without a GenEval result",
          "1 not in the evaluation")
    assert ((out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()) == before


def test_t2i_import_refuses_a_question_id_scored_twice_or_beyond_the_export(exported_t2i, tmp_path, capsys):
    """Image n = i·seeds + k (T2I-CompBench's numbering): question ids 0..5 cover the 3 prompts x 2 images; an id
    given twice, or id 6 (a 4th prompt this evaluation does not hold), is refused and nothing is written."""
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(exported_t2i, out)
    before = (out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    res = tmp_path / "vqa_result.json"
    res.write_text(json.dumps([{"question_id": n, "answer": 0.5} for n in [0, 1, 2, 3, 4, 5, 3]]))
    fails(capsys, ["import-scores", "t2i-compbench", str(res), "--into", str(out), "--name", "blip_vqa"],
          "image 3 is scored twice")
    res.write_text(json.dumps([{"question_id": n, "answer": 0.5} for n in range(7)]))
    fails(capsys, ["import-scores", "t2i-compbench", str(res), "--into", str(out), "--name", "blip_vqa"],
          "scores 7 images", "0 without a T2I-CompBench result, 1 not in the evaluation")
    assert ((out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()) == before


def test_only_the_benchmarks_own_evaluator_marks_it_scored(tmp_path):
    """settings.benchmark.scored becomes True only for an import by the protocol's own external evaluator
    (status["external"]): VBench columns imported into a GenEval benchmark leave it pending, GenEval's complete it."""
    from flowalign.evaluate import load_protocol, protocol_status
    from flowalign.external import _write_columns

    d = tmp_path / "ev"
    d.mkdir()
    rec = {"prompt": "p", "tag": "single_object", "prompt_index": 0, "sample": 0, "seed": 0}
    (d / "results.jsonl").write_text(json.dumps(rec) + "\n")
    src = tmp_path / "results.json"
    src.write_text("{}")
    status = protocol_status(load_protocol("geneval"), {"export": "geneval"})
    assert (status["external"], status["scored"]) == ("geneval", False)
    summary = {"overall": {}, "per_task": {}, "settings": {"benchmark": status}}
    for scorer, want in (("vbench", False), ("geneval", True)):
        new = _write_columns(d, src, {(0, 0): dict(rec)}, {"geneval": {(0, 0): 1.0}}, json.loads(json.dumps(summary)),
                             scorer, scorer=scorer)
        assert new["settings"]["benchmark"]["scored"] is want, scorer


def test_result_paths_and_file_names_match_exactly():
    """geneval_job reads only ``.../<i>/samples/<k>.png`` at the end of the path (not a .png.bak copy); hpd_complete
    needs each style's prompts 0..n−1 in order (HPSv2 reads <style>/00000.jpg onwards by position); vbench_file strips
    the prompt as VBench strips its prompt files' lines."""
    from flowalign.external import hpd_complete, vbench_file

    for bad in ("/r/geneval/00012/samples/0003.png.bak", "/r/geneval/00012/samples/0003.pngx"):
        with pytest.raises(ValueError):
            geneval_job(bad)
    assert hpd_complete([{"task": "photo", "style_index": 0}, {"task": "photo", "style_index": 1}])
    assert not hpd_complete([{"task": "photo", "style_index": 1}, {"task": "photo", "style_index": 0}])
    assert vbench_file("  a red circle moving up \n", 3) == "a red circle moving up-3.mp4"


def test_imported_scores_are_summarized_in_the_evaluations_own_overall_convention(tmp_path):
    """An evaluation recorded with overall="images" (the mean over all images) keeps that convention for an imported
    column; "groups" (GenEval's mean over tasks) is only the default. Task a: 1 image scoring 1; task b: 3 scoring 0."""
    from flowalign.external import _write_columns

    d = tmp_path / "ev"
    d.mkdir()
    recs = {(i, 0): {"prompt": f"p{i}", "task": "a" if i == 0 else "b", "prompt_index": i, "sample": 0, "seed": 0}
            for i in range(4)}
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs.values()))
    src = tmp_path / "vqa_result.json"
    src.write_text("[]")
    scores = {(i, 0): float(i == 0) for i in range(4)}
    for overall, want in (("images", 0.25), ("groups", 0.5)):
        summary = {"overall": {}, "per_task": {}, "settings": {"overall": overall}}
        new = _write_columns(d, src, {j: dict(r) for j, r in recs.items()}, {"x": scores}, summary, "test")
        assert new["overall"]["x"] == pytest.approx(want), overall


def test_geneval_import_refuses_a_truncated_results_file_and_a_directory(exported, tmp_path, capsys):
    """GenEval writes its --outfile whole, so a corrupt last line is an error naming the line (read_jsonl's tolerance
    of a truncated last line is for our own append-only logs); a directory given as the results file is called one,
    not "not found"."""
    import shutil

    out = tmp_path / "eval"
    shutil.copytree(exported, out)
    before = (out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    good = _geneval_results(out, lambda i, k: True, path=tmp_path / "good.jsonl")
    cut = tmp_path / "cut.jsonl"
    cut.write_text(good.read_text()[:-20])  # the last result loses its end
    n = len(good.read_text().splitlines())
    fails(capsys, ["import-scores", "geneval", str(cut), "--into", str(out)], f"cut.jsonl:{n}: invalid JSON line")
    one = tmp_path / "one.jsonl"
    one.write_text('{"x":\n')
    fails(capsys, ["import-scores", "geneval", str(one), "--into", str(out)], "one.jsonl:1: invalid JSON line")
    fails(capsys, ["import-scores", "geneval", str(tmp_path), "--into", str(out)], "is a directory")
    assert ((out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()) == before
