"""Two CPU processes under `accelerate launch` (gloo): both ranks hold identical weights after updates."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
@pytest.mark.parametrize("config", ["shapes_grpo.yaml", "shapes_nft.yaml"])  # both update rules all-reduce the same way
def test_two_process_training_keeps_ranks_identical(tmp_path, config):
    from safetensors.torch import load_file

    acc = str(Path(sys.executable).parent / "accelerate")
    run = tmp_path / "run"
    cmd = [acc, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "flowalign.cli", "train", str(ROOT / "configs" / config),
           f"output.run_dir={run}", "train.iterations=2", "train.groups_per_iter=2", "train.group_size=4",
           "sampler.steps=4", "eval.after=false", "output.tensorboard=false", "train.lr=1e-2",
           "train.clip_range=0.2", "train.filter_zero_std=false", "train.checkpoint_every=2",
           "train.optimizer_steps_per_iter=1", "eval.max_prompts=4", "eval.seeds_per_prompt=1", "eval.steps=2",
           "eval.batch_size=2", "eval.grid_prompts=0",
           # GRPO: the base evaluation runs sharded on both ranks (two batches of 2); NFT: none
           f"eval.before={'true' if config == 'shapes_grpo.yaml' else 'false'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert last["dist/world_size"] == 2 and last["dist/max_weight_diff"] == 0.0
    if config == "shapes_grpo.yaml":  # every image of the base evaluation, gathered from both ranks, written once
        records = (run / "eval" / "base" / "results.jsonl").read_text().splitlines()
        assert len(records) == 4 and lines[0]["iteration"] == 0 and "eval/overall/shapes_strict" in lines[0]
        # resuming with another process count would draw other SDE noise (step_noise=rank): refused before loading
        resume = [sys.executable, "-m", "flowalign.cli", *cmd[cmd.index("train"):], "train.iterations=3",
                  "output.resume=true"]
        r = subprocess.run(resume, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 2 and "2 process(es) wrote it and 1 run now" in r.stderr, r.stderr[-2000:]
    assert all(m["train/skipped_updates"] == 0 for m in lines if "train/skipped_updates" in m)
    sd = load_file(str(run / "checkpoints" / "step-2" / "raw" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)  # the updates really happened


def _first_reward(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["reward/saturation"]


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
@pytest.mark.parametrize("config", ["shapes_grpo.yaml", "shapes_nft.yaml"])
def test_group_step_noise_makes_runs_independent_of_the_process_count(tmp_path, config):
    """`sampler.step_noise=group`: the first iteration's rollouts (their mean `saturation`, a continuous reward) are
    the same on one process and on two, and so are the LoRA weights after its two optimizer steps (GRPO: the ranks
    split one global shuffle of the pairs, `train.step_chunks`; NFT: each group's (t, ε) from its own generator,
    `train.nft_row_draws`; equal up to float summation order). With the default per-process streams the weights
    differ (GRPO's SDE rollouts differ too; NFT's are ODE rollouts, the same either way)."""
    from safetensors.torch import load_file

    acc = str(Path(sys.executable).parent / "accelerate")
    args = [str(ROOT / "configs" / config), "train.iterations=1", "train.groups_per_iter=2",
            "train.group_size=4", "sampler.steps=4", "eval.before=false", "eval.after=false", "output.tensorboard=false",
            "reward.weights={saturation: 1.0}", "train.checkpoint_every=1", "train.optimizer_steps_per_iter=2",
            "train.filter_zero_std=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    got = {}
    for noise in ("group", "rank"):
        for procs in (1, 2):
            run = tmp_path / f"{noise}{procs}"
            launch = [acc, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                      "no", "--dynamo_backend", "no", "-m"] if procs == 2 else [sys.executable, "-m"]
            cmd = [*launch, "flowalign.cli", "train", *args, f"sampler.step_noise={noise}", f"output.run_dir={run}"]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            got[noise, procs] = _first_reward(run)
            got[noise, procs, "w"] = load_file(str(run / "checkpoints" / "step-1" / "raw" /
                                                   "pytorch_lora_weights.safetensors"))
    assert abs(got["group", 1] - got["group", 2]) < 1e-6
    def rel(a, b):  # ‖a − b‖ / ‖a‖ over the LoRA B matrices (they start at 0: their norm is the steps' size)
        keys = [k for k in a if "lora_B" in k]
        return (sum(float((a[k] - b[k]).pow(2).sum()) for k in keys) / sum(float(a[k].pow(2).sum()) for k in keys)) ** 0.5

    # float summation order only: measured 3e-6 (GRPO) and 8e-5 (NFT; a handful of parameters whose gradient is a
    # near-cancelling sum differ more, as Adam's g/(√v + eps) amplifies the rounding; the median one differs by 0)
    assert rel(got["group", 1, "w"], got["group", 2, "w"]) < 0.01
    assert rel(got["rank", 1, "w"], got["rank", 2, "w"]) > 0.1  # per-process streams: other draws
    if config == "shapes_grpo.yaml":  # SDE rollouts: the per-process step noise draws other rollouts on two ranks
        assert abs(got["rank", 1] - got["rank", 2]) > 1e-4 and got["rank", 1] != got["group", 1]


def _launch_eval(tmp_path, *args):
    acc = str(Path(sys.executable).parent / "accelerate")
    cmd = [acc, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "flowalign.cli", "eval", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_process_eval_shards_the_batches_and_equals_one_process(tmp_path):
    """Each rank samples every other batch; rank 0 gathers and writes: results, summary and grid are byte for byte
    those of one process (the batches, hence the images, are the same). An error is one line, printed once (by rank
    0: every rank stops with the same verdict), no hang."""
    from flowalign.cli import main

    args = ["--max-prompts", "12", "--seeds", "2", "--steps", "2", "--batch-size", "5"]
    assert main(["eval", *args, "--out", str(tmp_path / "one")]) == 0
    r = _launch_eval(tmp_path, *args, "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("results.jsonl", "summary.json", "grids/eval.png"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert (tmp_path / "two" / "report.html").is_file() and not (tmp_path / "two" / "results.partial.jsonl").exists()
    r = _launch_eval(tmp_path, *args, "--out", str(tmp_path / "two"))  # not empty: refused on both ranks
    assert r.returncode != 0 and r.stderr.count("flowalign eval: error: ") == 1 and "not empty" in r.stderr
    r = _launch_eval(tmp_path, *args, "--resume", "--out", str(tmp_path / "two"))  # finished: nothing to resume
    assert r.returncode != 0 and r.stderr.count("flowalign eval: error: ") == 1, r.stderr[-2000:]


def _kill_all(needle: str) -> None:
    """SIGKILL every process of this user whose command line holds ``needle``, and wait until they are gone."""
    import signal
    import time

    def matching():
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if needle in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    for pid in matching():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}/status").is_file() and "zombie" not in
                                         Path(f"/proc/{p}/status").read_text() for p in matching()):
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate CLI not installed")
@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="kills the launched processes through /proc")
def test_a_killed_two_process_eval_resumes_to_the_results_of_one_process(tmp_path):
    """Each rank journals its own batches (results.partial.jsonl, results.partial.rank1.jsonl); killed with SIGKILL
    once both have finished some, `--resume` on two processes samples only the rest, and the results equal an
    uninterrupted one-process evaluation byte for byte. A resume on another number of processes is refused in one
    line (the batches' assignment to ranks depends on it)."""
    import time

    from flowalign.cli import main

    args = ["--max-prompts", "96", "--seeds", "1", "--steps", "2", "--batch-size", "2", "--grid", "2"]
    assert main(["eval", *args, "--out", str(tmp_path / "one")]) == 0
    acc = str(Path(sys.executable).parent / "accelerate")
    launch = [acc, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "flowalign.cli", "eval", *args, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    journals = [tmp_path / "two" / "results.partial.jsonl", tmp_path / "two" / "results.partial.rank1.jsonl"]

    def batches(p):
        return p.read_text().count('"journal_batch"') if p.is_file() else 0

    proc = subprocess.Popen(launch, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not all(batches(j) >= 2 for j in journals) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    _kill_all(str(tmp_path / "two"))  # the launcher and its workers (torchrun starts them in their own sessions)
    proc.wait()
    done = [batches(j) for j in journals]
    assert not (tmp_path / "two" / "results.jsonl").exists() and all(n >= 2 for n in done), done
    assert sum(done) < 48  # killed before the end

    r = subprocess.run([sys.executable, "-m", "flowalign.cli", "eval", *args, "--resume", "--out",
                        str(tmp_path / "two")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "ran on 2 process(es) and this one on 1; resume it on 2" in r.stderr
    # a rank killed before it wrote its journal (ranks load at their own pace) has none: it samples all its batches
    # again, rank 0 resumes from its journal
    journals[1].unlink()
    r = _launch_eval(tmp_path, *args, "--resume", "--out", str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("results.jsonl", "summary.json", "grids/eval.png"):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    assert not any(j.exists() for j in journals)


@pytest.mark.parametrize("value, minutes", [(None, 120.0), ("30", 30.0), ("0.5", 0.5)])
def test_the_collective_timeout_is_read_from_the_environment(monkeypatch, value, minutes):
    """torch's default (10 or 30 min by backend) is shorter than one evaluation or checkpoint of a large model."""
    from flowalign.dist import TIMEOUT_ENV, _timeout

    if value is None:
        monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(TIMEOUT_ENV, value)
    assert _timeout().total_seconds() == minutes * 60


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf", "1e12"])
def test_a_bad_collective_timeout_is_one_line(monkeypatch, value):
    from flowalign.dist import TIMEOUT_ENV, _timeout
    from flowalign.errors import UserError

    monkeypatch.setenv(TIMEOUT_ENV, value)
    with pytest.raises(UserError, match=f"{TIMEOUT_ENV}={value!r} must be a positive number of minutes, at most"):
        _timeout()


def test_once_on_rank0_in_one_process_is_the_call_itself():
    from flowalign.dist import once_on_rank0
    from flowalign.errors import UserError

    assert once_on_rank0(lambda: 7, 0, 1) == 7

    def bad():
        raise UserError("no")

    with pytest.raises(UserError, match="no"):
        once_on_rank0(bad, 0, 1)
    with pytest.raises(OSError):  # any other error of the call, as it is
        once_on_rank0(lambda: (_ for _ in ()).throw(OSError("disk")), 0, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_ends_when_its_launcher_is_killed(tmp_path):
    """A launcher killed with SIGKILL left its workers training (reparented to init), and a resume started then ran
    beside them in the same run directory. A worker of a launch (WORLD_SIZE > 1, TORCHELASTIC_RUN_ID set) now asks
    the kernel for SIGTERM when its parent dies; a lone process (nohup) is left alone."""
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    worker = ("import os, time; from flowalign.dist import die_with_launcher; die_with_launcher(int(os.environ["
              f"'WORLD_SIZE'])); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:  # a zombie (reaped by init soon) counts as ended
                return fh.read().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    for world, launched in (("2", True), ("1", False)):
        pid_file.unlink(missing_ok=True)
        env = {**os.environ, "WORLD_SIZE": world, "TORCHELASTIC_RUN_ID": "x"}
        launcher = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, "
                                     f"'-c', {worker!r}]); time.sleep(60)"], env=env)
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        pid = int(pid_file.read_text())
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        for _ in range(100):
            if not alive(pid):
                break
            time.sleep(0.05)
        assert alive(pid) is not launched, (world, launched)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
