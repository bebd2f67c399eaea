"""Frozen benchmark protocols (REWARDS_AND_EVAL.md §3.2): pinned files, the benchmark / non-benchmark label, the
overall conventions, and `flowalign eval --benchmark`."""

import hashlib
import json
import logging

import pytest

from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)
from flowalign import data as D
from flowalign.cli import main
from flowalign.evaluate import (as_records, find_protocol, list_protocols, load_protocol, protocol_defaults,
                                protocol_dir, protocol_status, summarize, summarize_pass_at_k)
from flowalign.io import prompts_digest
from flowalign.report import benchmark_line

# The SHA-256 of every built-in protocol file. A protocol is frozen: a test that fails here means a file was edited;
# add a new protocol (or a new version under a new name) instead, so earlier results keep their meaning.
PINNED = {
    "geneval": "65a9931648f7dc0ecb787ebde56f1c5064a8837d4f6abacd7259da77f7a914df",
    "imagereward-bench": "e336f403753697c425c3d5d6f60dc69bb2dcead5562d35cac5b6ff768eb2c58c",
    "parti": "3bcbcf6ca1ed248fafe76c23eb72d785fb883e3d427f4b7e50d098f984a3e3e7",
    "pickscore-sfw": "878ca9c82171fc2605c3e046782142b5e44ef54152404336bad91b427e180eae",
    "shapes-bench": "725be933bc0e91b1e00bd02b5f4fc38abba63dcad057a96061f82143d86febe5",
    "shapes-motion-bench": "5e0c02f2cf9ad9b47db14a03b1b3c5ddd5ffc18216a41833c7114b4338aa60e5",
    "vbench": "077a856fe9211cbbaafe187b6a34ad3513feeda4b0ba4555b2d2e6a4e5b1dbc1",
}


def test_every_builtin_protocol_is_pinned_and_unchanged():
    assert list_protocols() == sorted(PINNED)
    for name, digest in PINNED.items():
        raw = (protocol_dir() / f"{name}.yaml").read_bytes()
        assert hashlib.sha256(raw).hexdigest() == digest, f"{name}.yaml was edited: a frozen protocol never changes"
        assert load_protocol(name).sha256 == digest


@pytest.mark.parametrize("name", sorted(PINNED))
def test_a_protocol_pins_the_exact_prompts_of_its_builtin_set(name):
    """Its prompts_sha256 is the digest of the vendored set's records (text and metadata): an edited prompt file
    turns every later run into a non-benchmark one instead of silently changing what the number means."""
    proto = load_protocol(name)
    assert proto.name == name and proto.version >= 1
    assert prompts_digest(as_records(D.load_prompts(proto.prompts))) == proto.prompts_sha256
    assert find_protocol(proto.prompts) == proto  # each built-in set has at most one protocol


def test_shapes_bench_is_what_the_main_job_evaluates():
    """configs/shapes_grpo.yaml's evaluation (the README's numbers) uses exactly the protocol's settings."""
    from flowalign import config as C

    cfg = C.load_config("configs/shapes_grpo.yaml")
    want = protocol_defaults(load_protocol("shapes-bench"), cfg.model.name)
    assert (cfg.data.eval_prompts, cfg.eval.max_prompts, cfg.eval.seeds_per_prompt) == (want["prompt_set"], 0,
                                                                                       want["seeds_per_prompt"])
    assert (cfg.eval.steps, cfg.eval.guidance) == (want["steps"], want["guidance"])
    assert tuple(cfg.eval.rewards) == (*want["rewards"], "shapes_strict_intact")  # the protocol's, then the gated strict


def _settings(proto, family):
    """The settings an evaluation that follows ``proto`` records (``run_eval``'s keys)."""
    want = protocol_defaults(proto, family)
    records = as_records(D.load_prompts(proto.prompts))
    return {"model": family, "prompt_set": proto.prompts, "prompts": len(records),
            "prompts_sha256": prompts_digest(records), "seeds_per_prompt": want["seeds_per_prompt"],
            "seed": want["seed"], "rewards": list(reversed(want["rewards"])),  # the order does not matter
            "steps": want["steps"], "guidance": want["guidance"], "resolution": want.get("resolution", {})}


@pytest.mark.parametrize("field, change", [
    ("steps", {"steps": 10}), ("guidance", {"guidance": 7.0}), ("seed", {"seed": 1}),
    ("images_per_prompt", {"seeds_per_prompt": 4}), ("rewards", {"rewards": ["hpsv21"]}),
    ("model", {"model": "shapes"}), ("height", {"resolution": {"height": 1024, "width": 512}}),
    ("prompts", {"prompts_sha256": "0" * 64}),
])
def test_any_overridden_field_makes_a_non_benchmark_result(field, change):
    proto = load_protocol("pickscore-sfw")
    exact = protocol_status(proto, _settings(proto, "sd3"))
    assert exact["benchmark"] is True and exact["overrides"] == {} and exact["sha256"] == proto.sha256
    assert benchmark_line(exact).startswith("benchmark pickscore-sfw v1")
    status = protocol_status(proto, {**_settings(proto, "sd3"), **change})
    assert status["benchmark"] is False and field in status["overrides"], status
    assert benchmark_line(status).startswith("not a benchmark result: protocol pickscore-sfw v1 with " + field)


def test_extra_rewards_keep_a_benchmark_result_and_a_missing_one_does_not():
    """Rewards beyond the protocol's score the same images (the main job adds ``shapes_strict_intact``): still the
    benchmark; leaving one of the protocol's out is an override."""
    proto = load_protocol("shapes-bench")
    extra = protocol_status(proto, {**_settings(proto, "shapes"),
                                    "rewards": ["shapes_strict", "shapes_partial", "shapes_strict_intact"]})
    assert extra["benchmark"] is True and extra["overrides"] == {}
    fewer = protocol_status(proto, {**_settings(proto, "shapes"), "rewards": ["shapes_strict", "shapes_strict_intact"]})
    assert fewer["benchmark"] is False and list(fewer["overrides"]) == ["rewards"]


def test_a_subset_of_the_prompts_is_an_override():
    proto = load_protocol("shapes-bench")
    records = as_records(D.spaced_subset(D.load_prompts("shapes-bench"), 12))
    status = protocol_status(proto, {**_settings(proto, "shapes"), "prompts": 12,
                                     "prompts_sha256": prompts_digest(records)})
    assert not status["benchmark"] and list(status["overrides"]) == ["prompts"]
    assert "12 prompts" in status["overrides"]["prompts"]["used"]


def _grouped_records():
    """Group a: 3 images scoring 1; group b: 1 image scoring 0 (sizes differ, as Parti's categories)."""
    return [{"prompt": f"p{i}", "category": "a" if i < 3 else "b", "prompt_index": i, "sample": 0,
             "r": 1.0 if i < 3 else 0.0} for i in range(4)]


def test_overall_over_groups_weighs_groups_equally_and_over_images_weighs_images():
    recs = _grouped_records()
    assert summarize(recs, ["r"])["overall"]["r"] == 0.5  # GenEval: (1 + 0) / 2
    assert summarize(recs, ["r"], overall="images")["overall"]["r"] == 0.75  # reward average: 3 / 4
    assert summarize(recs, ["r"], overall="images")["per_task"] == summarize(recs, ["r"])["per_task"]
    with pytest.raises(ValueError):
        summarize(recs, ["r"], overall="tasks")
    two = [dict(r, sample=k) for r in recs for k in range(2)]  # two images per prompt: pass@k exists
    assert summarize_pass_at_k(two, ["r"], overall="images")["r"]["overall"][2] == 0.75
    assert summarize_pass_at_k(two, ["r"])["r"]["overall"][2] == 0.5


def _user_protocol(tmp_path, **change):
    """A protocol file of the user's own: three shapes prompts from a file, one image each, 2 steps."""
    prompts = tmp_path / "mine.txt"
    prompts.write_text("a red circle\na blue square\ntwo green triangles\n")
    digest = prompts_digest(as_records(D.load_prompts(str(prompts))))
    body = {"name": "mine", "version": 1, "description": "a test protocol", "source": "tests", "prompts": str(prompts),
            "prompts_sha256": digest, "images_per_prompt": 1, "seed": 3, "rewards": ["shapes_partial"],
            "overall": "images", "sampling": {"shapes": {"steps": 2, "guidance": 4.0}}, **change}
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def test_eval_benchmark_takes_every_setting_from_the_protocol_and_labels_the_result(tmp_path, caplog):
    path = _user_protocol(tmp_path)
    out = tmp_path / "bench"
    with caplog.at_level(logging.INFO, logger="flowalign"):
        assert main(["eval", "--benchmark", str(path), "--grid", "0", "--out", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    st = summ["settings"]
    assert (st["steps"], st["guidance"], st["seed"], st["seeds_per_prompt"], st["prompts"]) == (2, 4.0, 3, 1, 3)
    assert set(summ["overall"]) == {"shapes_partial"} and st["overall"] == "images"
    assert st["benchmark"]["benchmark"] is True and st["benchmark"]["name"] == "mine"
    assert f"benchmark mine v1 (user protocol {path}, sha256 " in caplog.text
    assert "(every setting as the frozen protocol)" in caplog.text
    assert "benchmark mine v1" in (out / "report.html").read_text()

    caplog.clear()
    other = tmp_path / "other"  # one flag changed: the same protocol, but not a benchmark number, and it says so
    with caplog.at_level(logging.INFO, logger="flowalign"):
        assert main(["eval", "--benchmark", str(path), "--steps", "3", "--grid", "0", "--out", str(other)]) == 0
    st = json.loads((other / "summary.json").read_text())["settings"]
    assert st["benchmark"]["benchmark"] is False and st["benchmark"]["overrides"] == {"steps": {"protocol": 2, "used": 3}}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "not a benchmark result" in r.message]
    assert len(warned) == 2  # before sampling, so a user can stop, and again at the end
    assert "not a benchmark result: protocol mine v1 (user protocol" in (other / "report.html").read_text()
    assert "with steps 2 -&gt; 3" in (other / "report.html").read_text()


def test_a_model_arg_guidance_scale_counts_as_guidance(tmp_path, capsys):
    """`--model-arg guidance_scale=2` beside a benchmark's fixed scale (or --guidance) was silently replaced: the
    results were the protocol's, labelled a benchmark. It now counts as --guidance: the run samples at 2 and says it
    is not a benchmark; beside a different --guidance it is refused in one line, in eval, sample and steer."""
    from cli_checks import fails

    path = _user_protocol(tmp_path)
    base = ["eval", "--benchmark", str(path), "--grid", "0"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--model-arg", "guidance_scale=2", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in "ab")
    assert a["settings"]["guidance"] == 4.0 and a["settings"]["benchmark"]["benchmark"] is True
    assert b["settings"]["guidance"] == 2.0 and b["settings"]["benchmark"]["benchmark"] is False
    assert b["settings"]["benchmark"]["overrides"]["guidance"] == {"protocol": 4.0, "used": 2.0}
    assert main([*base, "--model-arg", "guidance_scale=4", "--out", str(tmp_path / "c")]) == 0  # the protocol's own
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["settings"]["benchmark"]["benchmark"] is True
    capsys.readouterr()
    for cmd in (base, ["sample", "a red circle"], ["steer", "a red circle"]):
        fails(capsys, [*cmd, "--guidance", "4", "--model-arg", "guidance_scale=2", "--out", str(tmp_path / "x.png")],
              "--guidance 4 and --model-arg guidance_scale=2 disagree; pass one of them")
    assert not (tmp_path / "x.png").exists()


def test_eval_benchmark_sets_the_resolution_of_the_model(tmp_path, tiny_sd3_dir):
    """A protocol's height/width reach the model (--model-arg overriding them is recorded as an override)."""
    path = _user_protocol(tmp_path, rewards=["saturation"],
                          sampling={"sd3": {"steps": 2, "guidance": 4.5, "height": 32, "width": 32}})
    common = ["eval", "--benchmark", str(path), "--model", "sd3", "--path", str(tiny_sd3_dir), "--grid", "0"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    st = json.loads((tmp_path / "a" / "summary.json").read_text())["settings"]
    assert st["resolution"] == {"height": 32, "width": 32} and st["benchmark"]["benchmark"] is True
    assert main([*common, "--model-arg", "height=64", "--out", str(tmp_path / "b")]) == 0
    st = json.loads((tmp_path / "b" / "summary.json").read_text())["settings"]
    assert st["resolution"] == {"height": 64, "width": 32}
    assert st["benchmark"]["overrides"] == {"height": {"protocol": 32, "used": 64}}


def test_eval_of_a_builtin_set_is_labelled_with_its_protocol_without_asking(tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "--max-prompts", "6", "--seeds", "1", "--steps", "2", "--grid", "0", "--out", str(out)]) == 0
    status = json.loads((out / "summary.json").read_text())["settings"]["benchmark"]
    assert status["name"] == "shapes-bench" and not status["benchmark"]
    assert set(status["overrides"]) == {"prompts", "images_per_prompt", "steps"}


def test_list_benchmarks_names_every_protocol(capsys):
    assert main(["eval", "--list-benchmarks"]) == 0
    out = capsys.readouterr().out
    for name in list_protocols():
        assert f"{name} v1" in out


@pytest.mark.parametrize("change, needles", [
    ({"steps": 2}, ["unknown keys ['steps']"]),
    ({"overall": "tasks"}, ["overall must be one of groups, images"]),
    ({"rewards": ["pickscroe"]}, ["rewards must be a non-empty list of reward names"]),
    ({"rewards": []}, ["rewards must be a non-empty list of reward names"]),
    ({"external": "vbench2"}, ["external must be one of geneval, vbench", "got 'vbench2'"]),
    ({"sampling": {"sdxl": {"steps": 2, "guidance": 4.0}}}, ["unknown model family 'sdxl'"]),
    ({"sampling": {"shapes": {"steps": 2}}}, ["sampling.shapes must give steps and guidance"]),
    ({"images_per_prompt": "four"}, ["images_per_prompt must be an integer"]),
])
def test_a_bad_protocol_file_is_one_line_and_nothing_is_written(tmp_path, capsys, no_model, change, needles):
    path = _user_protocol(tmp_path, **change)
    out = tmp_path / "out"
    fails(capsys, ["eval", "--benchmark", str(path), "--out", str(out)], *needles)
    assert not out.exists()


def test_eval_benchmark_refusals_before_the_model_loads(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    fails(capsys, ["eval", "--benchmark", "shapes-bnch", "--out", str(out)], "unknown benchmark 'shapes-bnch'",
          "did you mean 'shapes-bench'?")
    fails(capsys, ["eval", "--benchmark", "pickscore-sfw", "--model", "shapes", "--out", str(out)],
          "fixes sampling for sd3, flux, not --model shapes", "pass --model sd3, or --steps and --guidance")
    fails(capsys, ["eval", "--benchmark", str(tmp_path / "missing.yaml"), "--out", str(out)], "no such protocol file")
    fails(capsys, ["eval", "--benchmark", "shapes-bench"], "--out is required")
    assert not out.exists()


def test_every_documented_eval_command_is_accepted(tmp_path, monkeypatch, no_model):
    """The `flowalign eval` command lines of README.md and docs/benchmarks.md pass every argument check (they reach
    the reward and model loads, which this test and `no_model` stop: the rewards are built first, so a wrong weights
    path fails before the model loads); a user's own protocol file is the one line that needs a file."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmds = []
    for doc in ("README.md", "docs/benchmarks.md"):
        for line in (root / doc).read_text(encoding="utf-8").splitlines():
            if line.startswith("flowalign eval ") and "my_protocol.yaml" not in line:
                cmds.append(shlex.split(re.sub(r"\s#.*", "", line))[1:])
    assert len(cmds) >= 6 and sum("--benchmark" in c for c in cmds) >= 5
    monkeypatch.chdir(tmp_path)
    hpd = tmp_path / "hpd"  # the HPSv2 benchmark's prompt directory (not vendored) where the docs put /data/HPDv2/...
    hpd.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hpd / f"{style}.json").write_text('["a cat"]')
    cmds = [[str(hpd) if a == "/data/HPDv2/benchmark" else a for a in argv] for argv in cmds]
    import flowalign.rewards.catalog as catalog

    def built(*a, **k):
        raise AssertionError("the rewards were built")

    monkeypatch.setattr(catalog, "build_reward_checked", built)
    for argv in cmds:
        with pytest.raises(AssertionError, match="the rewards were built|the model was loaded"):
            main(argv)


@pytest.mark.parametrize("text, needle", [
    ("version: !!float abc", "malformed YAML: cannot construct a value"),
    ("seed: 0\nseed: 5", "malformed YAML: duplicate key 'seed'"),
    ("seed: [0", "malformed YAML"),
])
def test_a_protocol_that_yaml_cannot_build_is_one_line(tmp_path, capsys, no_model, text, needle):
    path = _user_protocol(tmp_path)
    body = json.loads(path.read_text())
    lines = [f"{k}: {json.dumps(v)}" for k, v in body.items() if k not in ("version", "seed")]
    path.write_text("\n".join([*lines, text, *(["version: 1"] if "version" not in text else []),
                                *(["seed: 0"] if "seed" not in text else [])]) + "\n")
    fails(capsys, ["eval", "--benchmark", str(path), "--out", str(tmp_path / "o")], needle)
    assert not (tmp_path / "o").exists()


def test_a_protocol_guidance_must_be_finite(tmp_path, capsys, no_model):
    path = _user_protocol(tmp_path, sampling={"shapes": {"steps": 2, "guidance": 4.0}})
    path.write_text(path.read_text().replace('"guidance": 4.0', '"guidance": .nan'))
    fails(capsys, ["eval", "--benchmark", str(path), "--out", str(tmp_path / "o")], "a finite guidance >= 0")


def test_a_user_protocol_cannot_pass_for_a_builtin_one(tmp_path, capsys, no_model):
    """A copy of shapes-bench.yaml with other settings under the same name would label its runs 'benchmark
    shapes-bench v1'; it is refused, and an unchanged copy is the built-in protocol itself."""
    builtin = (protocol_dir() / "shapes-bench.yaml").read_text()
    same = tmp_path / "copy.yaml"
    same.write_text(builtin)
    assert load_protocol(str(same)).sha256 == PINNED["shapes-bench"]
    fake = tmp_path / "fake.yaml"
    fake.write_text(builtin.replace("images_per_prompt: 4", "images_per_prompt: 1"))
    fails(capsys, ["eval", "--benchmark", str(fake), "--out", str(tmp_path / "o")],
          "is named 'shapes-bench' like the built-in protocol but differs from it")


def test_a_user_protocol_is_labelled_with_its_file_and_reads_its_prompts_beside_it(tmp_path, monkeypatch):
    path = _user_protocol(tmp_path)
    body = json.loads(path.read_text())
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "mine.txt").write_text((tmp_path / "mine.txt").read_text())
    (sub / "mine.yaml").write_text(json.dumps({**body, "prompts": "mine.txt"}))  # relative: beside the protocol
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--benchmark", str(sub / "mine.yaml"), "--grid", "0", "--out", "o"]) == 0
    status = json.loads((elsewhere / "o" / "summary.json").read_text())["settings"]["benchmark"]
    assert status["benchmark"] and status["file"] == str(sub / "mine.yaml")
    assert benchmark_line(status).startswith(f"benchmark mine v1 (user protocol {sub / 'mine.yaml'}, sha256 ")


def test_a_user_protocol_prompt_path_may_start_with_the_home_directory(tmp_path, monkeypatch):
    path = _user_protocol(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path.write_text(json.dumps({**json.loads(path.read_text()), "prompts": "~/mine.txt"}))
    assert load_protocol(str(path)).prompts == str(tmp_path / "mine.txt")


def test_geneval_is_a_benchmark_scored_by_its_own_evaluator():
    """REWARDS_AND_EVAL §3.5: 553 prompts x 4 images, the mean of the six task accuracies; Flow-GRPO's SD3.5 / FLUX
    evaluation sampling (METHODS §3.10). Its number is GenEval's, imported per image; flowalign computes no reward."""
    proto = load_protocol("geneval")
    assert (proto.external, proto.rewards, proto.images_per_prompt, proto.overall) == ("geneval", (), 4, "groups")
    assert len(D.load_prompts(proto.prompts)) == 553
    assert protocol_defaults(proto, "sd3") == {"prompt_set": "geneval", "seeds_per_prompt": 4, "seed": 0, "rewards": [],
                                               "export": "geneval", "steps": 40, "guidance": 4.5,
                                               "resolution": {"height": 512, "width": 512}}
    exact = {**_settings(proto, "sd3"), "export": "geneval"}
    status = protocol_status(proto, exact)
    assert status["benchmark"] and (status["external"], status["scored"]) == ("geneval", False)
    assert "import-scores geneval" in benchmark_line(status)
    status = protocol_status(proto, {**exact, "external_scores": {"geneval": {}}})
    assert status["scored"] and "geneval scores imported" in benchmark_line(status)
    assert "import-scores" not in benchmark_line(status)
    assert list(protocol_status(proto, {**exact, "export": None})["overrides"]) == ["export"]


def _geneval_protocol(tmp_path):
    """A user protocol scored by GenEval on three of its prompts at the tiny SD3's size: a benchmark run that fits a
    test (the built-in one samples 2,212 images at 512x512)."""
    prompts = tmp_path / "geneval3.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in as_records(D.spaced_subset(D.load_prompts("geneval"), 3))))
    return _user_protocol(tmp_path, name="geneval-tiny", prompts=str(prompts),
                          prompts_sha256=prompts_digest(as_records(D.load_prompts(str(prompts)))), images_per_prompt=2,
                          rewards=[], external="geneval", overall="groups",
                          sampling={"sd3": {"steps": 1, "guidance": 4.5, "height": 32, "width": 32}})


def test_an_externally_scored_benchmark_exports_then_is_complete_once_its_scores_are_imported(tmp_path, tiny_sd3_dir,
                                                                                             caplog, capsys):
    path = _geneval_protocol(tmp_path)
    out = tmp_path / "ev"
    with caplog.at_level(logging.INFO, logger="flowalign"):
        assert main(["eval", "--benchmark", str(path), "--model", "sd3", "--path", str(tiny_sd3_dir), "--grid", "0",
                     "--out", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    st = summ["settings"]
    assert st["export"] == "geneval" and st["rewards"] == [] and summ["overall"] == {}  # the export is implied
    assert (st["benchmark"]["benchmark"], st["benchmark"]["scored"]) == (True, False)
    assert "then add its results with `flowalign import-scores geneval`" in caplog.text
    pngs = sorted(p.relative_to(out / "geneval").as_posix() for p in (out / "geneval").rglob("*.png"))
    assert pngs == [f"{i:05d}/samples/{k:04d}.png" for i in range(3) for k in range(2)]
    results = tmp_path / "geneval_results.jsonl"  # what GenEval's evaluate_images.py writes for these images
    lines = []
    for i in range(3):
        meta = json.loads((out / "geneval" / f"{i:05d}" / "metadata.jsonl").read_text())
        lines += [{"filename": str(out / "geneval" / f"{i:05d}" / "samples" / f"{k:04d}.png"), "tag": meta["tag"],
                   "prompt": meta["prompt"], "correct": k == 0, "reason": "", "metadata": json.dumps(meta),
                   "details": "{}"} for k in range(2)]
    results.write_text("".join(json.dumps(r) + "\n" for r in lines))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flowalign"):
        assert main(["import-scores", "geneval", str(results), "--into", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["overall"] == {"geneval": 0.5} and summ["settings"]["benchmark"]["scored"] is True
    assert "benchmark geneval-tiny v1" in caplog.text and "geneval scores imported" in caplog.text
    assert "geneval scores imported" in (out / "report.html").read_text()


def test_an_externally_scored_benchmark_refuses_another_export(tmp_path, capsys, no_model):
    fails(capsys, ["eval", "--benchmark", "geneval", "--model", "sd3", "--export", "t2i-compbench", "--out",
                   str(tmp_path / "o")], "benchmark 'geneval' is scored by GenEval", "drop --export t2i-compbench")
    assert not (tmp_path / "o").exists()


def test_the_video_benchmark_and_model_bring_their_own_prompts_and_rewards(tmp_path, caplog):
    """`eval --benchmark shapes-motion-bench` ran the image model (refused: fixes sampling for shapes_video), and
    `eval/steer --model shapes_video` defaulted to the image verifier and image prompts (refused as outside the
    grammar); --per-frame is recorded (two reductions of the same videos no longer look like one setting)."""
    out = tmp_path / "bench"
    assert main(["eval", "--benchmark", "shapes-motion-bench", "--max-prompts", "2", "--seeds", "1", "--steps", "2",
                 "--grid", "0", "--out", str(out)]) == 0
    st = json.loads((out / "summary.json").read_text())["settings"]
    assert st["model"] == "shapes_video" and st["rewards"] == ["shapes_motion_strict", "shapes_motion_partial"]
    out = tmp_path / "plain"
    assert main(["eval", "--model", "shapes_video", "--max-prompts", "2", "--seeds", "1", "--steps", "2", "--grid", "0",
                 "--rewards", "shapes_motion_partial,saturation", "--per-frame", "reduce=first", "--out", str(out)]) == 0
    st = json.loads((out / "summary.json").read_text())["settings"]
    assert st["prompt_set"] == "shapes-motion-bench" and st["per_frame"] == {"reduce": "first"}
    out = tmp_path / "steer"
    assert main(["steer", "--model", "shapes_video", "a red circle moving up", "-k", "2", "--steps", "2", "--seeds",
                 "1", "--out", str(out)]) == 0
    st = json.loads((out / "summary.json").read_text())["settings"]
    assert st["steer_rewards"] == {"shapes_motion_partial": 1.0}
    assert st["rewards"] == ["shapes_motion_strict", "shapes_motion_partial"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flowalign"):
        assert main(["eval", "--max-prompts", "2", "--seeds", "1", "--steps", "2", "--grid", "0", "--per-frame",
                     "reduce=first", "--out", str(tmp_path / "img")]) == 0
    assert "--per-frame is set, but no image reward scores video frames here (the model makes images)" in caplog.text
    assert "per_frame" not in json.loads((tmp_path / "img" / "summary.json").read_text())["settings"]
    caplog.clear()  # steer read --per-frame without a word where nothing scores frames (one check now serves all)
    with caplog.at_level(logging.WARNING, logger="flowalign"):
        assert main(["steer", "--model", "shapes_video", "a red circle moving up", "--method", "none", "--steps", "2",
                     "--per-frame", "reduce=first", "--out", str(tmp_path / "st")]) == 0
    assert "--per-frame is set, but no image reward scores video frames here (every reward scores videos)" in caplog.text


def test_the_pending_hint_and_the_scored_mark_belong_to_the_external_scorers_own_export(tmp_path):
    """Without --export geneval there are no images for GenEval to score, so no hint to run it; and a score imported
    under the name 'geneval' from another tool (T2I-CompBench's import takes any --name) does not complete it."""
    from flowalign.external import _write_scores

    proto = load_protocol("geneval")
    status = protocol_status(proto, {**_settings(proto, "sd3"), "export": None})
    assert "export" in status["overrides"] and "import-scores" not in benchmark_line(status)
    d = tmp_path / "ev"
    d.mkdir()
    recs = [{"prompt": "p", "tag": "single_object", "prompt_index": 0, "sample": 0, "seed": 0}]
    (d / "results.jsonl").write_text(json.dumps(recs[0]) + "\n")
    src = tmp_path / "vqa_result.json"
    src.write_text("[]")
    summary = {"overall": {}, "per_task": {}, "settings": {"benchmark": protocol_status(proto, {**_settings(proto, "sd3"),
                                                                                             "export": "geneval"})}}
    jobs = {(0, 0): dict(recs[0])}
    new = _write_scores(d, src, jobs, {(0, 0): 1.0}, json.loads(json.dumps(summary)), "geneval", "T2I-CompBench")
    assert new["settings"]["benchmark"]["scored"] is False
    new = _write_scores(d, src, jobs, {(0, 0): 1.0}, json.loads(json.dumps(summary)), "geneval", "GenEval",
                        scorer="geneval")
    assert new["settings"]["benchmark"]["scored"] is True


def test_a_benchmark_of_several_families_takes_the_family_of_path_or_asks(tmp_path, capsys, caplog, no_model):
    """`eval --benchmark pickscore-sfw --path SD3_DIR` without --model ran --model shapes (and then blamed --model
    shapes, a flag never typed): the family now comes from --path's model_index.json, or the line asks for it."""
    import logging

    fails(capsys, ["eval", "--benchmark", "pickscore-sfw", "--out", str(tmp_path / "a")],
          "benchmark 'pickscore-sfw' runs on sd3, flux; pass --model sd3 or --model flux")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with caplog.at_level(logging.INFO, logger="flowalign.evaluate"):
        fails(capsys, ["eval", "--benchmark", "pickscore-sfw", "--path", str(pipe), "--reward-arg",
                       f"pickscore.path={tmp_path / 'nope'}", "--out", str(tmp_path / "b")], "nope")
    assert "--model flux: the family of the pipeline in --path" in caplog.text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
