"""flowalign.data: prompt files, built-in sets, the resumable prompt stream, group expansion and sharding."""

from __future__ import annotations

import collections
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


# ------------------------------------------------------------------------------------------ prompt-file edge cases


def test_txt_splits_prompts_only_at_newlines(tmp_path):
    # str.splitlines() also breaks at U+2028/U+2029 (pasted web text), NEL, form feed, vertical tab and the
    # \x1c-\x1e separators: one line of the file silently became two prompts (and the count changed)
    p = tmp_path / "p.txt"
    lines = ["a red\u2028circle", "two\u2029cows", "a\x85b", "page\x0cbreak", "tab\x0bbed", "file\x1csep"]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [r.prompt for r in load_prompts(p)] == lines
    crlf = tmp_path / "crlf.txt"  # Windows and old-Mac line ends still end a line, and are not kept
    crlf.write_bytes(b"\xef\xbb\xbfa cat\r\n\r\n# note\r\na dog\rthree birds\r\n")
    assert [r.prompt for r in load_prompts(crlf)] == ["a cat", "a dog", "three birds"]


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


@pytest.mark.parametrize("raw, line, byte", [
    (b"ok\nbad \xff here\n", 2, 7),
    (b"\xef\xbb\xbfok\nok2\nbad \xff here\n", 3, 14),  # the BOM counts: the offset is in the file, not after it
    (b"ok\r\nok2\r\n\xc3(\r\n", 3, 9),
    (b"\xff\xfea\x00", 1, 0),  # UTF-16
])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_not_utf8_names_file_line_and_true_byte(tmp_path, raw, line, byte, suffix):
    p = tmp_path / f"bad{suffix}"
    p.write_bytes(raw)
    msg = _err(load_prompts, p)
    assert f"{p}:{line}:" in msg and f"byte {byte}" in msg and "UTF-8" in msg


@pytest.mark.parametrize("value, shown", [("null", "null"), ("3", "number"), ('["a"]', "list")])
def test_non_string_prompt_says_so(tmp_path, value, shown):
    # it used to say 'no string "prompt" key (keys: prompt)', which reads as if the key were missing
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": ' + value + ', "tag": "x"}\n')
    msg = _err(load_prompts, p)
    assert f"{p}:2:" in msg and "must be a string" in msg and shown in msg
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"text": "a cat"}\n')
    assert "keys: text" in _err(load_prompts, missing)  # a missing key still lists the keys it has


@pytest.mark.parametrize("empty", ["", "   ", "\t"])
def test_an_empty_jsonl_prompt_is_refused_naming_the_file_and_line(tmp_path, empty):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "a red circle"}) + "\n" + json.dumps({"prompt": empty, "task": "x"}) + "\n")
    with pytest.raises(UserError) as err:
        load_prompts(p)
    msg = str(err.value)
    assert f"{p}:2" in msg and "empty prompt" in msg and "\n" not in msg
    j = tmp_path / "p.json"  # the same rule for a .json list, of objects or of strings
    j.write_text(json.dumps(["a red circle", empty]))
    with pytest.raises(UserError, match=r"p\.json\[1\].*empty prompt"):
        load_prompts(j)


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


# ----------------------------------------------------------------------------- the prompt stream: seeds and resume


def test_prompt_sampler_takes_a_negative_seed():
    """train.seed=-1 crashed the first iteration (numpy refuses negative entropy) after the base evaluation ran."""
    s = PromptSampler(7, 3, seed=-1)
    a = [s.next_groups() for _ in range(5)]
    b = PromptSampler(7, 3, seed=-1)
    assert a == [b.next_groups() for _ in range(5)]
    assert sorted(a[0] + a[1] + [a[2][0]]) == list(range(7))  # epoch 0 is a permutation


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


# ------------------------------------------------------------------ exact contracts: shares, seeds, resume position


def test_spaced_subset_of_interleaved_tasks_gives_the_rest_by_largest_remainder():
    """Interleaved tasks: shares n·|task|/N rounded down, the rest to the largest remainders, picks evenly spaced
    within each task. a×5, b×3, c×2 and n = 4: quotas 2, 1.2, 0.8 → a 2, b 1, then c (remainder 0.8, not a's 0)."""
    from flowalign.data import spaced_subset

    tasks = ["a", "b", "a", "c", "a", "b", "a", "c", "a", "b"]
    recs = [PromptRecord(f"p{i}", {"task": t}) for i, t in enumerate(tasks)]
    picked = spaced_subset(recs, 4)
    assert [r.prompt for r in picked] == ["p0", "p1", "p3", "p4"]  # a: 0 and 4 (of 0,2,4,6,8); b: 1; c: 3
    assert collections.Counter(task_of(r) for r in spaced_subset(recs, 7)) == {"a": 4, "b": 2, "c": 1}  # 3.5,2.1,1.4


def test_resume_refuses_a_position_past_the_end_of_the_epoch():
    """The saved position is the next index within the epoch, in [0, n): a state at n is corrupt, not a resume."""
    s = PromptSampler(5, 2, seed=1)
    s.next_groups()
    state = s.state_dict()
    for bad in (5, -1):
        msg = _err(PromptSampler(5, 2, seed=1).load_state_dict, dict(state, position=bad))
        assert "corrupt sampler state" in msg and f"position {bad}" in msg
    PromptSampler(5, 2, seed=1).load_state_dict(dict(state, position=4))  # the last index is valid


def test_a_negative_seed_is_its_64_bit_word_not_its_absolute_value():
    """train.seed = -1 shuffles as the 64-bit word 2**64 − 1 (numpy refuses negative entropy), a stream of its own:
    not that of seed 1."""
    def stream(seed):
        s = PromptSampler(9, 3, seed=seed)
        return [s.next_groups() for _ in range(6)]

    assert stream(-1) == stream(2**64 - 1) != stream(1)
    assert stream(-2) == stream(2**64 - 2) != stream(2)


def test_shard_groups_refuses_a_rank_outside_the_world():
    """A rank outside [0, world) is a launch error (ValueError), not an empty or wrapped-around share."""
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="invalid rank"):
            shard_groups([1, 2, 3, 4], rank, world)


# ---------------------------------------------------------------------- where a prompt that fails a check came from


def _parse_all(grammar_module):
    """A ``validate_prompts`` as the shapes verifier's: every prompt must parse in ``grammar_module``."""
    def check(prompts):
        for p in prompts:
            grammar_module.parse(p)
    return check


@pytest.mark.parametrize("name, text, where", [
    ("typo.txt", "# motion prompts\na red circle moving up\n\na red squar moving up\n", "typo.txt:4"),
    ("typo.jsonl", '{"prompt": "a red circle moving up"}\n{"prompt": "a red squar moving up"}\n', "typo.jsonl:2"),
    ("typo.json", '["a red circle moving up", "a red squar moving up"]', "typo.json[1]"),
])
def test_a_prompt_that_fails_a_check_is_named_by_file_and_line(tmp_path, name, text, where):
    """A .txt prompt outside the grammar used to be named by its text only (`prompt 'a red squar moving up': ...`),
    while .jsonl parse errors named FILE:LINE: every file type now names where the prompt is, and the unknown word
    gets a did-you-mean."""
    from flowalign.data import check_prompts
    from flowalign.shapes import motion

    p = tmp_path / name
    p.write_text(text)
    msg = _err(check_prompts, load_prompts(p), _parse_all(motion))
    assert msg.startswith(f"{tmp_path / where}: prompt 'a red squar moving up'"), msg
    assert "did you mean 'square'?" in msg and "outside the shapes motion grammar" in msg


def test_a_check_names_the_setting_and_the_builtin_set_line():
    """`data.train_prompts=shapes-train` under the video model failed as `prompt 'two purple triangles': unknown word
    'two'`, without the setting: the line names it, and the built-in set's line."""
    from flowalign.data import check_prompts
    from flowalign.models.shapes import ShapesTextEncoder
    from flowalign.shapes import motion

    records = load_prompts("shapes-train")
    line = next(i for i, r in enumerate(records, start=1) if r.prompt.split()[0] == "two")
    msg = _err(check_prompts, records, ShapesTextEncoder(motion.vocabulary()).tokenize, "data.train_prompts")
    assert msg.startswith(f"data.train_prompts (shapes-train:{line}): prompt '{records[line - 1].prompt}'"), msg
    msg = _err(check_prompts, ["a red circle moving up", "a red circle"], _parse_all(motion), "data.eval_prompts")
    assert msg.startswith("data.eval_prompts: prompt 'a red circle'"), msg  # strings: the setting alone


def test_a_check_that_passes_or_fails_only_as_a_set_is_left_as_it_was():
    """Prompts that pass are checked once, as a set; a check that refuses only the set (no prompt alone) keeps its
    own message, and one without any place to name is not touched."""
    from flowalign.data import check_prompts
    from flowalign.shapes import grammar

    calls = []
    check_prompts([PromptRecord("a red circle"), "a red circle", "a blue square"], calls.append, "data.train_prompts")
    assert calls == [["a red circle", "a blue square"]]

    def at_most_one(prompts):
        if len(prompts) > 1:
            raise UserError("at most one prompt")
    assert _err(check_prompts, ["a", "b"], at_most_one, "data.eval_prompts") == "at most one prompt"
    msg = _err(check_prompts, ["a red sqare"], _parse_all(grammar))
    assert msg.startswith("prompt 'a red sqare' is outside the shapes grammar"), msg


def test_where_a_record_was_read_is_not_part_of_it(tmp_path):
    """The file and line a record was read from is no field: equal records stay equal and their JSON (prompt
    digests, journals, results) does not change with the file's name or place; a copy keeps it."""
    import copy
    import dataclasses
    import pickle

    from flowalign.data import prompt_fingerprint, source_of
    from flowalign.io import to_jsonable

    (tmp_path / "a.txt").write_text("a red circle\n")
    (tmp_path / "b.jsonl").write_text('\n{"prompt": "a red circle"}\n')
    a, b = load_prompts(tmp_path / "a.txt")[0], load_prompts(tmp_path / "b.jsonl")[0]
    assert (source_of(a), source_of(b)) == (f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'b.jsonl'}:2")
    assert a == b == PromptRecord("a red circle") and source_of(PromptRecord("x")) is None and source_of("x") is None
    assert [f.name for f in dataclasses.fields(a)] == ["prompt", "metadata"]
    assert to_jsonable(a) == to_jsonable(b) and prompt_fingerprint([a]) == prompt_fingerprint([b])
    assert source_of(pickle.loads(pickle.dumps(a))) == source_of(copy.deepcopy(a)) == source_of(a)


@pytest.mark.parametrize("module, prompt, wanted, unwanted", [
    ("grammar", "a red sqare", "unknown word 'sqare'; did you mean 'square'?", None),
    ("grammar", "a red circle abov a blue square", "did you mean 'above'?", None),
    ("grammar", "a big circle", "unknown word 'big' (", "did you mean"),  # nothing close: no guess
    ("grammar", "a red circle moving up", "unknown word 'moving', a word of the shapes motion grammar", "did you mean"),
    ("motion", "a red squar moving up", "expected a shape, got 'squar'; did you mean 'square'?", None),
    ("motion", "a rde circle moving up", "got 'rde'; did you mean 'red'?", None),
    ("motion", "a red circle movin up", "unknown word 'movin'; did you mean 'moving'?", None),
    ("motion", "a red circle moving upp", "unknown word 'upp'; did you mean 'up'?", None),
    # an image-grammar word is no typo: not 'to' for 'two' nor 'the' for 'three'
    ("motion", "two purple triangles", "unknown word 'two', a word of the shapes image grammar", "did you mean"),
    ("motion", "three red circles", "unknown word 'three', a word of the shapes image grammar", "did you mean"),
])
def test_an_unknown_prompt_word_gets_a_did_you_mean(module, prompt, wanted, unwanted):
    """The shapes grammars name the closest known word (difflib over the grammar's vocabulary), as other errors do."""
    import importlib

    msg = _err(importlib.import_module(f"flowalign.shapes.{module}").parse, prompt)
    assert wanted in msg and (unwanted is None or unwanted not in msg), msg
