"""Regression tests for bugs found in review: grammar, prompt files, subsets, sampling, pretraining inputs/resume."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from flowalign.errors import UserError

# ------------------------------------------------------------------------------------------- grammar


def test_parse_accepts_a_space_before_the_trailing_period():
    from flowalign.shapes.grammar import parse

    assert parse("a red circle .") == parse("a red circle")
    assert parse("two blue squares .  ") == parse("two blue squares")


# -------------------------------------------------------------------------------------- prompt files


def test_load_prompts_ignores_a_utf8_bom(tmp_path):
    from flowalign.data import load_prompts

    bom = "\ufeff"
    (tmp_path / "p.txt").write_text(bom + "a red circle\n# note\na blue square\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text(bom + json.dumps({"prompt": "a red circle", "task": "t"}) + "\n", encoding="utf-8")
    (tmp_path / "p.json").write_text(bom + json.dumps(["a red circle"]), encoding="utf-8")
    assert [r.prompt for r in load_prompts(tmp_path / "p.txt")] == ["a red circle", "a blue square"]
    assert [(r.prompt, r.metadata) for r in load_prompts(tmp_path / "p.jsonl")] == [("a red circle", {"task": "t"})]
    assert [r.prompt for r in load_prompts(tmp_path / "p.json")] == ["a red circle"]


def test_jsonl_keeps_prompts_that_contain_unicode_line_breaks(tmp_path):
    from flowalign.data import load_prompts

    rows = [{"prompt": "line\u2028sep"}, {"prompt": "next\x85line"}, {"prompt": "form\x0cfeed"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                                      encoding="utf-8")
    assert [r.prompt for r in load_prompts(tmp_path / "p.jsonl")] == [r["prompt"] for r in rows]


def test_spaced_subset_keeps_every_task_share_in_a_shuffled_set():
    from flowalign.data import load_prompts, spaced_subset, task_of

    train = load_prompts("shapes-train")  # 6 tasks x 500, shuffled
    for n in (6, 12, 60):
        counts = collections.Counter(task_of(r) for r in spaced_subset(train, n))
        assert set(counts.values()) == {n // 6}, (n, counts)
    # a task-ordered set keeps its evenly spaced picks (same records as before)
    bench = load_prompts("shapes-bench")
    for n in (7, 8, 100):
        assert spaced_subset(bench, n) == [bench[(i * len(bench)) // n] for i in range(n)]


# ------------------------------------------------------------------------------------------- sampling


TINY = dict(vocab=["a", "an", "red", "blue", "orange", "circle", "square", "and"], image_size=16, patch_size=4,
            num_layers=2, num_heads=2, head_dim=8, text_dim=16, text_layers=1, text_heads=2, max_len=6, pooled_dim=16,
            guidance_scale=3.0, patch_embed_kernel=8, refiner_channels=4)


def test_sde_sample_of_a_prompt_and_seed_does_not_depend_on_its_batch():
    from flowalign.models.shapes import ShapesModel
    from flowalign.sample import generate

    torch.manual_seed(0)
    m = ShapesModel.from_config(dict(TINY))
    for c in m.components.values():
        c.eval().requires_grad_(False)
    kw = dict(steps=4, kernel="flow_sde", eta=0.7)
    alone = generate(m, ["a red circle"], [0], **kw)
    in_batch = generate(m, ["a blue square", "a red circle"], [5, 0], **kw)[1:]
    split = generate(m, ["a blue square", "a red circle"], [5, 0], batch_size=1, **kw)[1:]
    assert torch.allclose(alone, in_batch, atol=1e-4) and torch.allclose(alone, split, atol=1e-4)
    assert torch.equal(alone, generate(m, ["a red circle"], [0], **kw))  # still reproducible
    assert not torch.allclose(alone, generate(m, ["a red circle"], [1], **kw), atol=1e-3)


@pytest.mark.parametrize("device", ["nonsense", "cuda:0"])
def test_sample_bad_device_is_one_line_and_writes_nothing(tmp_path, device):
    from flowalign.sample import cli_main

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "g.png"
    with pytest.raises(UserError) as info:
        cli_main(["a red circle", "--device", device, "--steps", "1", "--seeds", "1", "--out", str(out)])
    assert "--device" in str(info.value) and device in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- pretraining

from test_pretrain import TINY_MODEL as TINY_PRE, toy_data as _toy_data  # noqa: E402  (the tiny model and its data)


def _cfg(**kw):
    from flowalign.pretrain import PretrainConfig

    base = dict(model="shapes", model_config=TINY_PRE, steps=4, batch_size=2, lr=1e-3, warmup=1, checkpoint_every=2,
                keep_checkpoints=5, log_every=1, ema_decay=0.9, seed=3)
    base.update(kw)
    return PretrainConfig.from_dict(base)


@pytest.mark.parametrize("bad, needle", [
    ({"seed": -1}, "seed"),
    ({"data_config": None}, "data_config"),
    ({"model_config": "patch_size: 4"}, "model_config"),
    ({"betas": [0.9]}, "betas"),
])
def test_pretrain_config_rejects_values_that_crash_later(bad, needle):
    from flowalign.pretrain import PretrainConfig

    with pytest.raises(UserError, match=needle) as info:
        PretrainConfig.from_dict(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data_config, needle", [
    ({"task_weights": {"single_object": 0.0}}, "task_weights"),
    ({"task_weights": {"single_object": -1.0, "counting": 2.0}}, "task_weights"),
    ({"task_weights": ["single_object"]}, "task_weights"),
    ({"image_sise": 8}, "image_sise"),
    ({"seed": 4}, "seed"),
    ({"image_size": 16}, "image_size"),  # the model is 8x8
])
def test_pretrain_bad_data_config_is_one_line_before_anything_is_written(tmp_path, data_config, needle):
    from flowalign.pretrain import pretrain

    out = tmp_path / "run"
    with pytest.raises(UserError, match=needle) as info:
        model_config = {k: v for k, v in TINY_PRE.items() if k not in ("vocab", "max_len")}  # the grammar's words
        pretrain(_cfg(model_config=model_config, data_config=dict({"image_size": 8}, **data_config)), out, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_resume_without_a_checkpoint_still_starts_from_init_from(tmp_path):
    from flowalign.pretrain import pretrain

    stage1 = pretrain(_cfg(checkpoint_every=0), tmp_path / "s1", data=_toy_data, progress=False)
    cfg2 = _cfg(steps=1, checkpoint_every=0, lr=0.0, warmup=0, init_from=str(tmp_path / "s1" / "final"))
    # e.g. stage 2 was interrupted before its first checkpoint and restarted with --resume, as the CLI suggests
    stage2 = pretrain(cfg2, tmp_path / "s2", data=_toy_data, progress=False, resume=True)
    for k, v in stage1.state_dict().items():
        assert torch.equal(v, stage2.state_dict()[k]), k


def test_resume_rewrites_the_metrics_logged_after_the_last_checkpoint(tmp_path):
    from flowalign.pretrain import pretrain

    cfg = _cfg(steps=6, checkpoint_every=3, log_every=1)
    full = tmp_path / "full"
    pretrain(cfg, full, data=_toy_data, progress=False)

    def dies_at_step_5(step, bs):
        if step == 5:
            raise KeyboardInterrupt
        return _toy_data(step, bs)

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, killed, data=dies_at_step_5, progress=False)  # logged steps 1..5, last checkpoint at 3
    pretrain(cfg, killed, data=_toy_data, progress=False, resume=True)

    def rows(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(killed)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows(killed)] == [r["loss"] for r in rows(full)]


# ----------------------------------------------------------------------------------- make_prompt_sets


@pytest.mark.parametrize("args", [["--n-train", "-1"], ["--n-bench", "0"], ["--seed", "-1"]])
def test_make_prompt_sets_bad_counts_exit_2_with_one_line(tmp_path, capsys, args):
    from flowalign.shapes.make_prompt_sets import main

    out = tmp_path / "sets"
    with pytest.raises(SystemExit) as info:
        main([*args, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and args[0] in err
    assert not out.exists()
