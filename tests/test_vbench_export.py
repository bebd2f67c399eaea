"""VBench (REWARDS_AND_EVAL.md §3.8): `flowalign eval --export vbench` writes the videos as VBench's standard mode reads
them (one flat folder of `<prompt>-<k>.mp4`, k = 0..4, H.264), and `flowalign import-scores vbench` adds its
per-video results back, one column per dimension.

VBench itself (its DINO, CLIP, RAFT, AMT, MUSIQ, GRiT, ViCLIP and UMT models, on a GPU) cannot run here; its results
file is written below in the format its evaluate.py writes: {dimension: [aggregate, [{"video_path": ...,
"video_results": ...}, ...]]}. The videos come from the shipped shapes video model (8 frames of 32x32, 8 fps), one
sampling step."""

import io
import json
import logging
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)
from flowalign import data as D
from flowalign.cli import main
from flowalign.evaluate import as_records, load_protocol, protocol_status
from flowalign.io import prompts_digest

av = pytest.importorskip("av")  # the dev extra installs it (pip install -e '.[dev]')

RED, BLUE = "a red circle moving to the right", "a blue square moving up"
LINES = [RED, BLUE, RED]  # RED twice: VBench names videos by prompt, so it is sampled once


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One `eval --export vbench` of the shipped shapes video model on LINES x 5 videos, keeping the videos the
    exporter received (the sampled ones, in [0, 1]) and the log."""
    from flowalign.external import VBenchExport

    d = tmp_path_factory.mktemp("vbench")
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(LINES) + "\n")
    sampled, logged = {}, []
    original = VBenchExport.__call__

    def keep(self, chunk, images, batch_records):
        for j, (i, k) in enumerate(chunk):
            sampled[(self.records[i]["prompt"], k)] = images[j].detach().float().clone()  # [F, 3, H, W]
        return original(self, chunk, images, batch_records)

    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    log = logging.getLogger("flowalign")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(VBenchExport, "__call__", keep)
            assert main(["eval", "--model", "shapes_video", "--prompts", str(prompts), "--seeds", "5", "--steps", "1",
                         "--grid", "0", "--export", "vbench", "--out", str(d / "ev")]) == 0
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return SimpleNamespace(out=d / "ev", sampled=sampled, log="\n".join(logged), prompts=prompts)


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_export_writes_five_videos_per_prompt_named_as_vbench_reads_them(exported):
    """VBench's standard mode looks for f'{prompt}-{i}{postfix}' for i in range(5), with the postfix of the folder's
    first file: the folder holds those files and nothing else."""
    names = sorted(os.listdir(exported.out / "vbench"))
    assert names == sorted(f"{p}-{k}.mp4" for p in (RED, BLUE) for k in range(5))


def test_an_exported_mp4_decodes_to_the_sampled_video(exported):
    """H.264 in yuv420p at the model's 8 fps, every frame at the model's size, the pixels those the rewards scored up
    to 8-bit quantisation and the codec's loss (and much closer to them than to another video)."""
    from flowalign.models.shapes_video import ShapesVideoModel

    assert len(exported.sampled) == 10
    for (prompt, k), video in exported.sampled.items():
        with av.open(str(exported.out / "vbench" / f"{prompt}-{k}.mp4")) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert float(stream.average_rate) == ShapesVideoModel.fps == 8.0
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        decoded = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255  # [F, 3, H, W]
        assert decoded.shape == video.shape == (8, 3, 32, 32)
        err = (decoded - video.clamp(0, 1)).abs().mean(dim=(1, 2, 3))  # [F]: each frame in its place
        other = exported.sampled[(BLUE if prompt == RED else RED, k)]
        assert err.max() < 0.03 and err.mean() < 0.5 * (decoded - other.clamp(0, 1)).abs().mean(), (prompt, k, err)


def test_a_repeated_prompt_is_sampled_once_and_the_evaluation_records_it(exported):
    recs = _records(exported.out)
    assert [(r["prompt"], r["sample"]) for r in recs] == [(p, k) for p in (RED, BLUE) for k in range(5)]
    assert all(r.get("repeats") == (2 if r["prompt"] == RED else None) for r in recs)
    settings = json.loads((exported.out / "summary.json").read_text())["settings"]
    assert settings["export"] == "vbench" and settings["prompts"] == 2 and settings["seeds_per_prompt"] == 5
    assert settings["unique_prompts"] == {"dropped": 1, "prompts": 3, "prompts_sha256": prompts_digest(
        as_records(D.load_prompts(str(exported.prompts))))}
    assert "--export vbench: 1 repeated prompt(s) dropped" in exported.log and "2 of 3 prompts" in exported.log


def _results(out, dims, path, root=None):
    """A VBench <name>_eval_results.json for the videos in ``root`` (default: this export's folder): ``dims`` maps a
    dimension to {(prompt, k): score} over the videos it scores."""
    root = root or out / "vbench"
    data = {}
    for dim, scores in dims.items():
        rows = [{"video_path": os.path.join(str(root), f"{p}-{k}.mp4"), "video_results": v, "extra": 1}
                for (p, k), v in scores.items()]
        vals = [float(v) for v in scores.values()]
        data[dim] = [sum(vals) / len(vals) if vals else 0.0, rows]
    path.write_text(json.dumps(data, indent=4))
    return path


def test_import_puts_each_dimensions_score_on_the_videos_it_scored(exported, tmp_path, caplog):
    out = tmp_path / "ev"
    shutil.copytree(exported.out, out)
    subject = {(RED, k): 0.9 + k / 100 for k in range(5)}  # RED's dimension only
    dynamic = {(p, k): (p == BLUE or k == 0) for p in (RED, BLUE) for k in range(5)}  # booleans, both prompts
    src = _results(out, {"subject_consistency": subject, "dynamic_degree": dynamic},
                   tmp_path / "results_2025-01-01-00:00:00_eval_results.json")
    with caplog.at_level(logging.INFO, logger="flowalign"):
        assert main(["import-scores", "vbench", str(src), "--into", str(out)]) == 0
    for r in _records(out):
        job = (r["prompt"], r["sample"])
        assert r["vbench_dynamic_degree"] == float(dynamic[job])
        assert r.get("vbench_subject_consistency") == subject.get(job)  # none on BLUE's records
        assert "shapes_motion_partial" in r  # the evaluation's own rewards stay
    summ = json.loads((out / "summary.json").read_text())
    assert summ["overall"]["vbench_subject_consistency"] == pytest.approx(sum(subject.values()) / 5)
    assert summ["overall"]["vbench_dynamic_degree"] == pytest.approx(6 / 10)
    ext = summ["settings"]["external_scores"]
    assert ext["vbench_dynamic_degree"]["vbench_aggregate"] == pytest.approx(0.6)
    assert ext["vbench_subject_consistency"]["videos"] == 5
    assert ext["vbench_subject_consistency"]["results"] == str(src.resolve())  # absolute, whatever the cwd
    assert "vbench_dynamic_degree" in (out / "report.html").read_text()
    assert "vbench_subject_consistency" in caplog.text and "aggregate 0.9200, mean over its 5 videos 0.9200" in caplog.text
    # another results file (one more dimension, dynamic_degree again): added, and dynamic_degree replaced everywhere
    src2 = _results(out, {"dynamic_degree": {(BLUE, 0): False}, "aesthetic_quality": {(BLUE, 1): 0.5}},
                    tmp_path / "second_eval_results.json")
    assert main(["import-scores", "vbench", str(src2), "--into", str(out)]) == 0
    recs = _records(out)
    assert [r["vbench_dynamic_degree"] for r in recs if "vbench_dynamic_degree" in r] == [0.0]
    assert sum("vbench_subject_consistency" in r for r in recs) == 5
    summ = json.loads((out / "summary.json").read_text())
    assert set(summ["settings"]["external_scores"]) == {"vbench_subject_consistency", "vbench_dynamic_degree",
                                                        "vbench_aesthetic_quality"}


def test_import_refuses_results_that_do_not_match_the_export_and_writes_nothing(exported, tmp_path, capsys):
    out = tmp_path / "ev"
    shutil.copytree(exported.out, out)
    before = (out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    bad = tmp_path / "bad_eval_results.json"

    def refused(data, *needles):
        bad.write_text(data if isinstance(data, str) else json.dumps(data))
        fails(capsys, ["import-scores", "vbench", str(bad), "--into", str(out)], *needles)

    path = str(out / "vbench" / f"{RED}-0.mp4")
    refused([{"video_path": path, "video_results": 1.0}], "is not a VBench results file")
    refused({"color": [0.5, {"video_path": path}]}, "'color' is not a VBench dimension's result")
    refused({"color": [0.5, [{"path": path, "score": 1.0}]]}, "is not a VBench video result")
    refused({"color": [0.5, [{"video_path": path.replace("red", "green"), "video_results": 1.0}]]},
            "'a green circle moving to the right-0.mp4', which is not a video of this evaluation")
    refused({"color": [0.5, [{"video_path": path, "video_results": 1.0}] * 2]}, "twice")
    refused('{"color": [0.5, [{"video_path": "%s", "video_results": NaN}]]}' % path, "not a finite number")
    refused({"color": [0.5, [{"video_path": path, "video_results": "high"}]]}, "not a finite number or true/false")
    twin = tmp_path / "twin"  # the same prompts, another model's videos: the scored files exist here and differ
    shutil.copytree(exported.out, twin)
    (twin / "vbench" / f"{BLUE}-3.mp4").write_bytes(b"another video")
    theirs = _results(twin, {"color": {(BLUE, 3): 0.5}}, tmp_path / "twin_eval_results.json")
    fails(capsys, ["import-scores", "vbench", str(theirs), "--into", str(out)], "results of another export",
          "other videos")
    fails(capsys, ["import-scores", "vbench", str(theirs), "--into", str(out), "--name", "x"],
          "VBench's scores are always called vbench_<dimension>")
    assert ((out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()) == before
    # VBench ran on another machine, on a copy: files that do not exist here are not compared
    elsewhere = _results(out, {"color": {(BLUE, 3): 0.5}}, tmp_path / "copy_eval_results.json",
                         root=tmp_path / "gpu-machine" / "vbench")
    assert main(["import-scores", "vbench", str(elsewhere), "--into", str(out)]) == 0


def test_import_names_the_file_it_expected_when_given_another_format(exported, tmp_path, capsys):
    """GenEval's JSON lines (or any text that is not JSON) given as VBench's results: the message says what VBench's
    file is and keeps the parser's detail; a missing file's hint names the video folder absolutely."""
    out = tmp_path / "ev"
    shutil.copytree(exported.out, out)
    before = (out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()
    lines = tmp_path / "geneval_results.jsonl"
    lines.write_text('{"filename": "a/00000/samples/0000.png", "correct": true}\n' * 2)
    fails(capsys, ["import-scores", "vbench", str(lines), "--into", str(out)],
          "geneval_results.jsonl is not a VBench results file (a JSON object {dimension: [score, per-video results]})",
          "Extra data: line 2 column 1", "pass the <name>_eval_results.json")
    fails(capsys, ["import-scores", "vbench", str(tmp_path / "none.json"), "--into", str(out)], "not found",
          f"--videos_path {(out / 'vbench').resolve()} ")
    assert ((out / "results.jsonl").read_bytes(), (out / "summary.json").read_bytes()) == before


def test_import_refuses_an_evaluation_not_exported_for_vbench(tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["eval", "--model", "shapes_video", "--max-prompts", "1", "--seeds", "1", "--steps", "1", "--grid", "0",
                 "--out", str(out)]) == 0
    src = tmp_path / "r_eval_results.json"
    src.write_text(json.dumps({"color": [0.5, []]}))
    capsys.readouterr()
    fails(capsys, ["import-scores", "vbench", str(src), "--into", str(out)], "was not exported for VBench")


@pytest.mark.parametrize("lines, extra, needles", [
    ([RED, BLUE], ["--seeds", "4"], ["writes 5 videos per prompt", "pass --seeds 5 (got 4)"]),
    ([RED, "a red/blue circle moving up"], [], ["'a red/blue circle moving up' cannot be a file name"]),
    ([RED, "a red\\blue circle"], [], ["cannot be a file name"]),
    ([RED, "a red circle " + "x" * 230], [], ["cannot be a file name", "at most 241 bytes"]),
])
def test_export_refusals_before_the_model_loads(tmp_path, capsys, no_model, lines, extra, needles):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(lines) + "\n")
    fails(capsys, ["eval", "--model", "shapes_video", "--prompts", str(prompts), "--seeds", "5", *extra, "--export",
                   "vbench", "--out", str(tmp_path / "o")], *needles)
    assert not (tmp_path / "o").exists()


def test_export_without_pyav_or_of_an_image_model_is_refused_before_the_model_loads(tmp_path, capsys, no_model,
                                                                                    monkeypatch):
    fails(capsys, ["eval", "--model", "shapes", "--seeds", "5", "--export", "vbench", "--out", str(tmp_path / "o")],
          "--export vbench takes videos; --model shapes makes images")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    fails(capsys, ["eval", "--model", "shapes_video", "--seeds", "5", "--export", "vbench", "--out",
                   str(tmp_path / "o")], "PyAV, which is not installed: pip install av")
    assert not (tmp_path / "o").exists()


def test_the_vbench_protocol_samples_each_prompt_once_and_stays_a_benchmark():
    """946 lines, 944 distinct prompts: the export samples 944 x 5 videos, every name one VBench reads, and the
    evaluation is still labelled a benchmark result (its prompts are the protocol's, before the de-duplication)."""
    from flowalign.external import check_vbench_export, unique_vbench_prompts, vbench_file

    proto = load_protocol("vbench")
    assert (proto.external, proto.rewards, proto.images_per_prompt, proto.families()) == ("vbench", (), 5, ["wan"])
    records = D.load_prompts("vbench")
    check_vbench_export(as_records(records), 5)
    unique, dropped = unique_vbench_prompts(records)
    assert (len(records), len(unique), dropped) == (946, 944, 2)
    assert len({vbench_file(r.prompt, 0) for r in unique}) == 944
    assert sorted(r.prompt for r in unique if r.metadata.get("repeats") == 2) == [
        "A beautiful coastal beach in spring, waves lapping on sand by Hokusai, in the style of Ukiyo",
        "The bund Shanghai, oil painting"]
    fam = proto.sampling["wan"]
    settings = {"model": "wan", "prompt_set": "vbench", "prompts": 944, "seeds_per_prompt": 5, "seed": 0,
                "rewards": [], "steps": fam["steps"], "guidance": fam["guidance"], "export": "vbench",
                "resolution": {k: fam[k] for k in ("height", "width", "num_frames")},
                "prompts_sha256": prompts_digest(as_records(unique)),
                "unique_prompts": {"dropped": 2, "prompts": 946, "prompts_sha256": proto.prompts_sha256}}
    status = protocol_status(proto, settings)
    assert status["benchmark"] and (status["external"], status["scored"]) == ("vbench", False), status
    subset = {**settings, "unique_prompts": {**settings["unique_prompts"], "prompts_sha256": "0" * 64}}
    assert list(protocol_status(proto, subset)["overrides"]) == ["prompts"]


def test_mp4_bytes_refuses_an_image():
    from flowalign.errors import UserError
    from flowalign.external import mp4_bytes

    with pytest.raises(UserError, match="takes videos, not images"):
        mp4_bytes(torch.rand(3, 8, 8), 8.0)
    assert av.open(io.BytesIO(mp4_bytes(torch.rand(2, 3, 8, 8), 16.0))).streams.video[0].average_rate == 16
