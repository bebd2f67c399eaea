"""flowalign.data: prompt files, built-in sets, the resumable prompt stream, group expansion and sharding."""

from __future__ import annotations

import json

import pytest
import torch

from flowalign.data import (
    BUILTIN_PROMPTS,
    PromptRecord,
    PromptSampler,
    builtin_path,
    expand_groups,
    load_prompts,
    shard_groups,
    task_of,
)
from flowalign.errors import UserError


def _err(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_txt_skips_blank_and_comments_and_keeps_text(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# a comment\na red circle \n\n   \n  # indented comment\nthree blue squares\r\n")
    recs = load_prompts(p)
    assert [r.prompt for r in recs] == ["a red circle ", "three blue squares"]  # trailing space kept, CR dropped
    assert all(r.metadata == {} for r in recs)


def test_jsonl_metadata(tmp_path):
    p = tmp_path / "p.jsonl"
    rows = [{"prompt": "a red circle", "task": "single_object"},
            {"tag": "counting", "include": [{"class": "cow", "count": 2}], "prompt": "two cows"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_prompts(str(p))
    assert recs[0] == PromptRecord("a red circle", {"task": "single_object"})
    assert recs[1].metadata == {"tag": "counting", "include": [{"class": "cow", "count": 2}]}
    assert [task_of(r) for r in recs] == ["single_object", "counting"]
    with pytest.raises(dataclasses_frozen()):
        recs[0].prompt = "x"  # type: ignore[misc]


def dataclasses_frozen():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_json_list(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps(["a", {"prompt": "b", "style": "anime"}]))
    assert [(r.prompt, r.metadata) for r in load_prompts(p)] == [("a", {}), ("b", {"style": "anime"})]


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert "no prompts" in _err(load_prompts, empty)
    (tmp_path / "e.jsonl").write_text("")
    assert "no prompts" in _err(load_prompts, tmp_path / "e.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert "bad.jsonl:2" in _err(load_prompts, bad)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "a red circle"}\n')
    assert "nokey.jsonl:1" in _err(load_prompts, nokey) and "prompt" in _err(load_prompts, nokey)
    (tmp_path / "p.csv").write_text("a\n")
    assert "extension" in _err(load_prompts, tmp_path / "p.csv")
    msg = _err(load_prompts, tmp_path / "missing.txt")
    assert "not found" in msg and "geneval" in msg  # lists the built-in names
    msg = _err(load_prompts, "genevel")
    assert "'geneval'" in msg


def test_builtin_benchmarks():
    geneval = load_prompts("geneval")
    assert len(geneval) == 553 and geneval[0].prompt == "a photo of a bench"
    assert {task_of(r) for r in geneval} == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    parti = load_prompts("parti")
    raw = [json.loads(line)["prompt"] for line in builtin_path("parti").read_text().splitlines()]
    assert len(parti) == 1632 and [r.prompt for r in parti] == raw  # text exactly as shipped
    assert sum(r.prompt != r.prompt.strip() for r in parti) == 10  # not stripped (REWARDS_AND_EVAL §3.1)
    assert len(load_prompts("pickscore")) == 1024
    assert len(load_prompts("hpsv2")) == 50
    assert len(load_prompts("vbench")) == 946
    assert len(load_prompts("t2i-compbench-color")) == 300
    # every registered benchmark file exists, and its provenance travels with it
    for name in BUILTIN_PROMPTS:
        if not name.startswith("shapes-"):
            assert builtin_path(name).is_file(), name
    assert (builtin_path("geneval").parents[1] / "PROVENANCE.md").is_file()


def test_builtin_shapes_sets():
    if not builtin_path("shapes-bench").is_file():
        pytest.skip("shapes prompt files not generated yet")
    bench = load_prompts("shapes-bench")
    assert bench and all(task_of(r) for r in bench)


def _drain(sampler: PromptSampler, k: int) -> list[list[int]]:
    return [sampler.next_groups() for _ in range(k)]


def test_sampler_epochs_are_permutations_and_deterministic():
    a = PromptSampler(list(range(12)), groups_per_iter=4, seed=3)
    b = PromptSampler(12, groups_per_iter=4, seed=3)
    c = PromptSampler(12, groups_per_iter=4, seed=4)
    sa, sb, sc = _drain(a, 6), _drain(b, 6), _drain(c, 6)
    assert sa == sb and sa != sc
    flat = [i for g in sa for i in g]
    assert sorted(flat[:12]) == list(range(12)) and sorted(flat[12:]) == list(range(12))
    assert flat[:12] != flat[12:]  # a new order each epoch
    assert flat[:12] != list(range(12))
    seq = PromptSampler(5, groups_per_iter=3, seed=0, shuffle=False)
    assert _drain(seq, 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_sampler_exact_resume():
    ref = PromptSampler(10, groups_per_iter=4, seed=7)
    uninterrupted = _drain(ref, 8)
    first = PromptSampler(10, groups_per_iter=4, seed=7)
    head = _drain(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives JSON / torch.save
    resumed = PromptSampler(10, groups_per_iter=4, seed=7)
    resumed.load_state_dict(state)
    assert head + _drain(resumed, 5) == uninterrupted
    assert resumed.iteration == 8
    other = PromptSampler(11, groups_per_iter=4, seed=7)
    assert "n=10" in _err(other.load_state_dict, state)
    assert "seed" in _err(PromptSampler(10, 4, seed=8).load_state_dict, state)


def test_shard_groups():
    groups = [5, 1, 9, 3, 3, 0]
    parts = [shard_groups(groups, r, 3) for r in range(3)]
    assert parts == [[5, 1], [9, 3], [3, 0]] and sum(parts, []) == groups
    assert PromptSampler.shard_groups(groups, 1, 2) == [3, 3, 0]
    msg = _err(shard_groups, groups, 0, 4)
    assert "6" in msg and "4" in msg


def test_expand_groups():
    cond_index, group = expand_groups([7, 2, 7], group_size=4, group_offset=6)
    assert cond_index.dtype == torch.int64 and cond_index.shape == (12,)
    assert cond_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert group.tolist() == [6] * 4 + [7] * 4 + [8] * 4  # a prompt drawn twice is two groups
    # gathering prompt rows by cond_index gives every rollout its own group's prompt
    prompts = ["p7", "p2", "p7"]
    assert [prompts[i] for i in cond_index.tolist()][4:8] == ["p2"] * 4
