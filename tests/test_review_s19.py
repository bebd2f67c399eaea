"""Review s19: resume checks the prompt set's content, `pretrain --threads` is checked and scoped to the run,
`--guidance` is checked before the model loads, and image seeds stay distinct past k = 1009. Each test failed on
the code before the review."""

from __future__ import annotations

import json

import pytest
import torch

from cli_checks import fails as _fails, no_model  # noqa: F401  (the fixture is used by name)
from flowalign.cli import main
from flowalign.errors import UserError

# ----------------------------------------------------------------------------- 1. resume checks the prompts


def _records(texts, meta=None):
    from flowalign.data import PromptRecord

    return [PromptRecord(t, dict(meta or {})) for t in texts]


def _saved_state(records):
    from flowalign.data import PromptSampler

    s = PromptSampler(records, groups_per_iter=2, seed=5)
    s.next_groups()
    return json.loads(json.dumps(s.state_dict()))  # as stored: plain data


def test_resume_refuses_an_edited_prompt_set_of_the_same_length():
    """Only the count was compared: an edited prompt file with as many lines resumed silently on other prompts."""
    from flowalign.data import PromptSampler

    a = _records(["a red circle", "a blue square", "two circles"])
    b = _records(["a red circle", "a green square", "two circles"])
    state = _saved_state(a)
    with pytest.raises(UserError) as info:
        PromptSampler(b, groups_per_iter=2, seed=5).load_state_dict(state)
    msg = str(info.value)
    assert "\n" not in msg and "prompt" in msg and "changed" in msg, msg
    # metadata counts too (GenEval's tag/include decide the reward)
    with pytest.raises(UserError):
        PromptSampler(_records([r.prompt for r in a], {"task": "x"}), 2, seed=5).load_state_dict(state)
    # prompt text is compared exactly: a trailing space (kept by load_prompts) is another prompt
    with pytest.raises(UserError):
        PromptSampler(_records(["a red circle ", "a blue square", "two circles"]), 2, seed=5).load_state_dict(state)


def test_resume_over_the_same_prompts_and_from_old_checkpoints_still_works():
    from flowalign.data import PromptSampler

    a = _records(["a red circle", "a blue square", "two circles"], {"task": "t", "b": 1})
    ref = PromptSampler(a, 2, seed=5)
    uninterrupted = [ref.next_groups() for _ in range(4)]
    state = _saved_state(a)
    same = PromptSampler(_records([r.prompt for r in a], {"b": 1, "task": "t"}), 2, seed=5)  # key order is not content
    same.load_state_dict(state)
    assert [uninterrupted[0]] + [same.next_groups() for _ in range(3)] == uninterrupted
    old = {k: v for k, v in state.items() if k not in ("prompts_sha256",)}  # written before the fingerprint existed
    assert set(old) == {"epoch", "position", "iteration", "seed", "n", "groups_per_iter", "shuffle"}
    PromptSampler(_records(["x", "y", "z"]), 2, seed=5).load_state_dict(old)
    PromptSampler(3, 2, seed=5).load_state_dict(state)  # built from a count: nothing to compare
    with pytest.raises(UserError, match="n=3"):  # a changed count is still reported as such
        PromptSampler(_records(["x", "y"]), 2, seed=5).load_state_dict(state)


# ----------------------------------------------------------------------------- 2. pretrain --threads


@pytest.mark.parametrize("value", [str(2**31), str(2**70), "-1", "100000"])
def test_pretrain_refuses_impossible_thread_counts_in_one_line(tmp_path, capsys, value):
    """2**31 overflowed torch.set_num_threads (a ValueError traceback, exit 1); 100000 threads was accepted."""
    from test_review_pretrain import _tiny_yaml

    out = tmp_path / "run"
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    before = torch.get_num_threads()
    _fails(capsys, ["pretrain", "--config", str(conf), "--out", str(out), "--threads", value, "--no-progress"],
           "--threads", value)
    assert not out.exists()
    assert torch.get_num_threads() == before


def test_pretrain_restores_the_callers_thread_count(tmp_path, monkeypatch):
    """An in-process run (tests, notebooks) left torch at the run's thread count for the rest of the process."""
    import flowalign.pretrain as P
    from test_pretrain import tiny_cfg, toy_data

    before = torch.get_num_threads()
    want = before + 1
    seen = []
    real = P.train_step
    monkeypatch.setattr(P, "train_step", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    P.pretrain(tiny_cfg(steps=1, checkpoint_every=0, threads=want), tmp_path / "a", data=toy_data, progress=False)
    assert seen == [want]  # the run used its threads...
    assert torch.get_num_threads() == before  # ...and gave the caller's back
    # also when the run fails (here: images of another size than the model's)
    with pytest.raises(UserError):
        P.pretrain(tiny_cfg(steps=1, threads=want), tmp_path / "b",
                   data=lambda step, bs: (["a red circle"] * bs, torch.rand(bs, 3, 16, 16)), progress=False)
    assert torch.get_num_threads() == before


def test_pretrain_cli_in_process_keeps_the_thread_count(tmp_path, capsys):
    from test_review_pretrain import _tiny_yaml

    before = torch.get_num_threads()
    conf = _tiny_yaml(tmp_path / "tiny.yaml")
    assert main(["pretrain", "--config", str(conf), "--out", str(tmp_path / "run"), "--threads", str(before + 1),
                 "--no-progress"]) == 0
    assert (tmp_path / "run" / "final").is_dir()
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- 3. --guidance


BAD_GUIDANCE = ["nan", "inf", "-inf", "-0.5"]


@pytest.mark.parametrize("value", BAD_GUIDANCE)
def test_sample_refuses_a_bad_guidance_before_the_model_loads(tmp_path, capsys, no_model, value):
    out = tmp_path / "grid.png"
    _fails(capsys, ["sample", "a red circle", "--out", str(out), f"--guidance={value}"], "--guidance", value)
    assert not out.exists()


@pytest.mark.parametrize("value", BAD_GUIDANCE)
def test_eval_refuses_a_bad_guidance_before_the_model_loads(tmp_path, capsys, no_model, value):
    out = tmp_path / "ev"
    _fails(capsys, ["eval", "--out", str(out), f"--guidance={value}"], "--guidance", value)
    assert not out.exists()


@pytest.mark.parametrize("value", BAD_GUIDANCE)
def test_calibrate_refuses_a_bad_guidance_before_the_model_loads(tmp_path, capsys, no_model, value):
    out = tmp_path / "eta.json"
    _fails(capsys, ["calibrate", "--out", str(out), f"--guidance={value}"], "--guidance", value)
    assert not out.exists()


def test_check_guidance_is_shared():
    from flowalign.sample import check_guidance

    assert check_guidance(None) is None
    assert check_guidance(0) == 0.0 and check_guidance(4.5) == 4.5
    for bad in (float("nan"), float("inf"), -1.0, "x"):
        with pytest.raises(UserError) as info:
            check_guidance(bad)
        assert str(info.value).startswith("--guidance") and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- 4. image seeds past k = 1009


def test_image_seed_is_unchanged_below_1009():
    from flowalign.evaluate import image_seed

    assert image_seed(0, 0, 0) == 0
    assert image_seed(0, 1, 0) == 1009
    assert image_seed(3, 2, 5) == 3 * 1_000_003 + 2 * 1_009 + 5 == 3_002_032
    assert image_seed(1, 0, 1008) == 1_001_011
    assert image_seed(7, 500, 17) == 7_000_021 + 504_500 + 17


def test_image_seeds_are_distinct_past_1009_and_usable():
    """seed·1_000_003 + i·1_009 + k repeats from k = 1009 on: image_seed(0, 0, 1009) == image_seed(0, 1, 0), so
    best-of-N / steering with 1009+ images per prompt started two images from the same noise."""
    from flowalign.evaluate import image_seed

    vals = {(s, i, k): image_seed(s, i, k) for s in (0, 1) for i in range(3) for k in range(3000)}
    assert len(set(vals.values())) == len(vals)
    # the CPU generator keeps only the low 32 bits of a seed, so those must differ within a run too
    g = torch.Generator()
    assert torch.equal(torch.randn(3, generator=g.manual_seed(2**40 + 7)), torch.randn(3, generator=g.manual_seed(7)))
    for s in (0, 1):
        low = [v % 2**32 for (s2, _, _), v in vals.items() if s2 == s]
        assert len(set(low)) == len(low)
    for v in vals.values():
        assert 0 <= v < 2**64
    for v in (max(vals.values()), image_seed(2**40, 10**4, 10**5)):
        torch.Generator().manual_seed(v)  # does not overflow
