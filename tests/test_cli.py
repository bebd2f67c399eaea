"""The `flowalign` command as a user runs it (subprocess): sample, eval, rewards, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

from cli_checks import fails, no_model  # noqa: F401  (the fixture is used by name)

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flowalign.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=300)


def test_sample_writes_a_grid(tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    r = _cli("sample", "a red circle", "two blue squares", "--seeds", "3", "--steps", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    im = Image.open(out)
    assert im.size[0] > 3 * 32 and im.size[1] > 2 * 32


def test_sample_grid_does_not_depend_on_the_batch_size(tmp_path):
    """Each image has its own noise seed, so --batch-size changes memory and speed, not the grid (to the last
    rounding of a pixel); the progress bar goes to stderr."""
    import numpy as np
    from PIL import Image

    grids = []
    for bs in ("1", "32"):
        out = tmp_path / f"grid{bs}.png"
        r = _cli("sample", "a red circle", "two blue squares", "--seeds", "2", "--steps", "3", "--batch-size", bs,
                 "--out", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert "sampling" in r.stderr  # the progress bar
        grids.append(np.asarray(Image.open(out), dtype=np.int16))
    assert grids[0].shape == grids[1].shape
    assert np.abs(grids[0] - grids[1]).max() <= 1


def test_sample_rejects_out_of_grammar_prompt_in_one_line(tmp_path):
    out = tmp_path / "grid.png"
    r = _cli("sample", "a pink circle", "--out", str(out))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("flowalign sample: error:") and "'pink'" in lines[-1]
    assert sum("error" in ln.lower() for ln in lines) == 1
    assert not out.exists()


def test_sample_warns_on_known_words_outside_the_grammar_and_still_draws(tmp_path):
    """'a red circle above a blue squares' uses only the model's words, so it encodes; the grid is drawn, with one
    warning that quotes the grammar's error (train/eval/steer refuse such prompts: their verifier cannot score them)."""
    out = tmp_path / "grid.png"
    r = _cli("sample", "a red circle above a blue squares", "a red circle", "--seeds", "1", "--steps", "2",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [ln for ln in r.stderr.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and "'a red circle above a blue squares' is outside the shapes grammar" in warnings[0]
    assert "expected a singular shape after 'blue', got 'squares'" in warnings[0] and out.exists()


def test_eval_on_shapes_bench_subset(tmp_path):
    out = tmp_path / "ev"
    r = _cli("eval", "--prompts", "shapes-bench", "--max-prompts", "6", "--seeds", "2", "--steps", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    summ = json.loads((out / "summary.json").read_text())
    assert summ["n"] == 12 and 0.0 <= summ["overall"]["shapes_strict"] <= 1.0
    pk = summ["pass_at_k"]  # two seeds per prompt: pass@1 is the strict mean; the graded partial reward has none
    assert set(pk) == {"shapes_strict"} and pk["shapes_strict"]["k"] == [1, 2]
    assert abs(pk["shapes_strict"]["overall"]["1"] - summ["overall"]["shapes_strict"]) < 1e-9
    assert pk["shapes_strict"]["overall"]["2"] >= pk["shapes_strict"]["overall"]["1"]
    assert "shapes_strict pass@2=" in r.stderr
    assert (out / "report.html").exists()
    again = _cli("eval", "--prompts", "shapes-bench", "--max-prompts", "6", "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_rewards_lists_every_registered_reward():
    from flowalign.rewards import REWARDS

    r = _cli("rewards")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in REWARDS:
        if name != "remote":
            assert name in r.stdout, name


def test_train_describe_needs_no_config_and_a_missing_config_is_one_line_exit_2():
    r = _cli("train", "--describe")
    assert r.returncode == 0, r.stderr
    for field in ("lora_targets:", "init_noise:", "train_fraction:", "clip_range:"):
        assert field in r.stdout
    r = _cli("train")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("flowalign train: error:"), r.stderr


def test_train_describe_validates_what_train_validates_but_the_device(capsys):
    """`--describe` said "(validated)" but skipped the registry checks: an unknown credit method or option printed the
    config and exited 0, while `train` refused it. A CUDA config is still described on a machine without CUDA."""
    from flowalign.cli import main

    root = Path(__file__).resolve().parents[1]
    for bad, words in ((["credit.name=bogus"], "unknown credit method 'bogus'"),
                       (["credit.options={nonsense: 1}"], "credit.options: unknown option(s) ['nonsense']")):
        assert main(["train", str(root / "configs" / "shapes_grpo.yaml"), *bad, "--describe"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and words in err, err
    assert main(["train", str(root / "configs" / "sd35_pickscore.yaml"), "--describe"]) == 0
    out, _ = capsys.readouterr()
    assert "device: cuda" in out


def test_version_is_the_installed_one():
    from importlib.metadata import version

    r = _cli("--version")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == f"flowalign {version('flowalign')}\n"


# ---------------------------------------------------------------- sample: outputs that cannot be written (in process)

def test_sample_refuses_an_out_it_cannot_write_before_loading(capsys, no_model):
    """`--out /sys/a.png` (a directory even root cannot write in, though os.access says it may) or under a directory
    that cannot be made sampled the whole grid and then failed with a PermissionError traceback, exit code 1."""
    for out in ("/sys/a.png", "/proc/sub/a.png"):
        line = fails(capsys, ["sample", "a red circle", "--out", out], f"--out {out!r}", "cannot be written")
        assert "writable directory" in line


def test_the_write_probe_is_real_not_os_access(capsys, no_model, tmp_path, monkeypatch):
    """os.access answers yes to root everywhere; the check must try to create a file (and leave nothing behind)."""
    import tempfile

    from flowalign.sample import check_out_parent

    check_out_parent(tmp_path / "new" / "sub" / "a.png")  # a writable ancestor: fine, and nothing is left there
    assert list(tmp_path.iterdir()) == []

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    fails(capsys, ["sample", "a red circle", "--out", str(tmp_path / "a.png")], str(tmp_path), "Permission denied")


def test_sample_eta_without_a_stochastic_kernel_lists_every_stochastic_kernel(capsys, no_model):
    from flowalign.samplers import KERNELS

    line = fails(capsys, ["sample", "a red circle", "--eta", "0.5"], "--eta", "--kernel")
    stochastic = [k for k in KERNELS if k != "euler"]
    assert "ddim_sde" in stochastic
    for k in stochastic:
        assert k in line, (k, line)


def test_sample_with_a_stochastic_kernel_draws_noise_by_default_as_steer_does(tmp_path):
    """`sample --kernel flow_sde` without --eta sampled at eta 0, i.e. the ODE: a grid byte-identical to the default
    kernel's, without a word, while steer defaults a stochastic kernel to 0.7. Now the default is steer's, an
    explicit --eta 0 still gives the ODE, and euler stays at 0."""
    from flowalign.cli import main

    common = ["sample", "a red circle", "--seeds", "2", "--steps", "4"]
    grid = {}
    for name, extra in (("sde", ["--kernel", "flow_sde"]), ("sde07", ["--kernel", "flow_sde", "--eta", "0.7"]),
                        ("sde0", ["--kernel", "flow_sde", "--eta", "0"]), ("ode", [])):
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        grid[name] = (tmp_path / f"{name}.png").read_bytes()
    assert grid["sde"] == grid["sde07"] and grid["sde0"] == grid["ode"] and grid["sde"] != grid["ode"]


def test_sample_help_says_an_existing_grid_is_replaced(capsys):
    from flowalign.cli import main

    try:
        main(["sample", "--help"])
    except SystemExit:
        pass
    assert "an existing file of that name is replaced" in " ".join(capsys.readouterr().out.split())


def test_loading_a_diffusers_pipeline_prints_no_torchvision_fallback_warning(tmp_path, tiny_sd3_dir):
    """Importing diffusers' SD3 pipeline makes transformers warn that torchvision is missing for image processors
    flowalign never uses (torchvision is not installed on purpose); the commands drop that line, nothing else."""
    out = tmp_path / "g.png"
    r = _cli("sample", "a cat", "--model", "sd3", "--path", str(tiny_sd3_dir), "--model-arg", "height=32",
             "--model-arg", "width=32", "--steps", "1", "--seeds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file() and "torchvision" not in r.stderr, r.stderr[-2000:]


def test_the_torchvision_filter_drops_only_that_line():
    import logging

    from flowalign.cli import TorchvisionFallbackFilter

    f = TorchvisionFallbackFilter()
    rec = lambda msg: logging.LogRecord("transformers.utils.import_utils", logging.WARNING, "", 0, msg, None, None)  # noqa: E731
    assert not f.filter(rec("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"))
    assert f.filter(rec("Some weights of the model checkpoint were not used"))


def test_eval_with_world_size_but_no_launcher_is_one_line(tmp_path):
    env_extra = {"WORLD_SIZE": "2"}
    r = subprocess.run([sys.executable, "-m", "flowalign.cli", "eval", "--max-prompts", "1", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env_extra},
                       cwd=ROOT, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "no process group to join" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, "-m", "flowalign.cli", "rewards", "list"], capture_output=True, text=True,
                       env={**os.environ, **env_extra}, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "shapes_strict" in r.stdout  # a listing is not refused


def test_sample_max_prompts_applies_to_prompts_given_as_arguments(tmp_path):
    """`--max-prompts` was silently ignored for prompts given as arguments (steer applies it to them): 4 prompts with
    `--max-prompts 2` sample the evenly spaced 1st and 3rd, the same grid as passing those two."""
    from flowalign.cli import main

    prompts = ["a red circle", "two blue squares", "a green triangle", "a yellow circle"]
    kw = ["--seeds", "1", "--steps", "2"]
    assert main(["sample", *prompts, "--max-prompts", "2", *kw, "--out", str(tmp_path / "sub.png")]) == 0
    assert main(["sample", prompts[0], prompts[2], *kw, "--out", str(tmp_path / "two.png")]) == 0
    assert (tmp_path / "sub.png").read_bytes() == (tmp_path / "two.png").read_bytes()
    assert main(["sample", *prompts, *kw, "--out", str(tmp_path / "all.png")]) == 0  # default: every argument
    assert (tmp_path / "all.png").read_bytes() != (tmp_path / "two.png").read_bytes()


def test_sample_and_steer_without_prompts_use_the_models_own_benchmark_as_eval_does(tmp_path, capsys, caplog):
    """With neither prompts nor --prompt-file, `sample` draws 8 evenly spaced prompts of the family's benchmark (the
    set `eval` evaluates by default): the same grid as naming it, announced in one INFO line; a family without one
    (sd3) is refused in one line, with an example, before any model loads; `steer` resolves the same way."""
    import logging

    from flowalign.cli import main

    kw = ["--seeds", "1", "--steps", "2", "--model", "shapes_video"]
    with caplog.at_level(logging.INFO, logger="flowalign.sample"):
        assert main(["sample", *kw, "--out", str(tmp_path / "default.png")]) == 0
    assert "using the prompts of shapes-motion-bench, the benchmark of --model shapes_video" in caplog.text
    assert main(["sample", "--prompt-file", "shapes-motion-bench", *kw, "--out", str(tmp_path / "named.png")]) == 0
    assert (tmp_path / "default.png").read_bytes() == (tmp_path / "named.png").read_bytes()
    capsys.readouterr()
    fails(capsys, ["sample", "--model", "sd3", "--out", str(tmp_path / "sd3.png")],
          "no prompts given, and --model sd3 has no built-in prompt set", "--prompt-file")
    fails(capsys, ["steer", "--model", "flux", "--reward", "pickscore", "--out", str(tmp_path / "st")],
          "--model flux has no built-in prompt set")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default.gif", "default.png", "named.gif", "named.png"]
