"""flowalign.io.BatchJournal: what an interrupted long job (eval, steer) finished, batch by batch."""

import json

import pytest

from flowalign.errors import UserError
from flowalign.io import BatchJournal


def test_a_batch_is_done_only_with_its_end_line_and_redo_drops_batches(tmp_path):
    path = tmp_path / "j.jsonl"
    j = BatchJournal(path, {"steps": 2, "model": "shapes"})
    j.add(0, [{"x": 0}, {"x": 1}], forwards=10)
    j.add(2, [{"x": 4}], forwards=5)
    with open(path, "a") as fh:  # batch 1 was being written when the run died: records but no end line ...
        fh.write(json.dumps({"x": 2}) + "\n" + '{"journal_ba')  # ... and a truncated last line

    again = BatchJournal(path, {"model": "shapes", "steps": 2}, resume=True)  # key order does not matter
    assert again.done == {0: ([{"x": 0}, {"x": 1}], {"forwards": 10}), 2: ([{"x": 4}], {"forwards": 5})}
    assert again.records() == [{"x": 0}, {"x": 1}, {"x": 4}]
    # the file now holds exactly what is done; redo leaves a batch out of it
    third = BatchJournal(path, {"steps": 2, "model": "shapes"}, resume=True, redo={0})
    assert sorted(third.done) == [2]
    assert sorted(BatchJournal(path, {"steps": 2, "model": "shapes"}, resume=True).done) == [2]
    third.close()
    assert not path.exists()


def test_resume_refuses_other_settings_and_a_missing_or_corrupt_journal(tmp_path):
    path = tmp_path / "j.jsonl"
    BatchJournal(path, {"steps": 2, "seed": 0}).add(0, [{"x": 0}])
    with pytest.raises(UserError, match=r"other settings \(seed 0 -> 1; steps 2 -> 3\)"):
        BatchJournal(path, {"steps": 3, "seed": 1}, resume=True)
    assert BatchJournal(path, {"steps": 2, "seed": 0}, resume=True).records() == [{"x": 0}]  # untouched by the refusal
    with pytest.raises(UserError, match="missing"):
        BatchJournal(tmp_path / "none.jsonl", {}, resume=True)
    path.write_text('{"journal": {}}\n{broken\n{"x": 1}\n')
    with pytest.raises(UserError, match="cannot read"):
        BatchJournal(path, {}, resume=True)
    assert BatchJournal(path, {"a": 1}).done == {}  # without resume a journal starts afresh
    assert path.read_text() == '{"journal": {"a": 1}}\n'


def test_resume_refuses_other_prompts_with_the_same_count(tmp_path):
    """The settings held the prompt file's path and count, not its text: an edited prompt resumed into results that
    mixed the old prompt's batches with the new one's. The prompts' digest (text, order, metadata) is in the header."""
    from flowalign.io import PROMPTS_KEY, prompts_digest

    path = tmp_path / "j.jsonl"
    prompts = [{"prompt": "a red circle"}, {"prompt": "a blue square", "task": "colors"}]
    BatchJournal(path, {"prompts": 2}, prompts=prompts).add(0, [{"x": 0}])
    assert json.loads(path.read_text().splitlines()[0])["journal"][PROMPTS_KEY] == prompts_digest(prompts)
    for other in ([{"prompt": "a green circle"}, prompts[1]],  # an edited line
                  prompts[::-1],  # another order
                  [prompts[0], {"prompt": "a blue square", "task": "position"}]):  # other metadata
        with pytest.raises(UserError, match=r"^--resume: .*the prompts differ in text, order or metadata") as e:
            BatchJournal(path, {"prompts": 2}, resume=True, prompts=other)
        assert "\n" not in str(e.value)
    again = BatchJournal(path, {"prompts": 2}, resume=True, prompts=[dict(p) for p in prompts])
    assert again.records() == [{"x": 0}]


def test_a_journal_without_the_prompts_digest_is_refused(tmp_path):
    """A journal from before the digest cannot show that its prompts were the same: refused, saying why."""
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({"journal": {"steps": 2}}) + "\n" + json.dumps({"x": 0}) + "\n"
                    + json.dumps({"journal_batch": 0}) + "\n")
    with pytest.raises(UserError, match="the prompts cannot be checked: the journal is from a flowalign that did not "
                                        "record them, so start again without --resume"):
        BatchJournal(path, {"steps": 2}, resume=True, prompts=["a red circle"])
    assert BatchJournal(path, {"steps": 2}, resume=True).records() == [{"x": 0}]  # a caller without prompts: as before


def test_prompts_digest_depends_on_text_order_and_metadata_only():
    from flowalign.io import prompts_digest

    a = prompts_digest([{"prompt": "x", "task": "t", "n": 1}, {"prompt": "y"}])
    assert a == prompts_digest([{"n": 1, "task": "t", "prompt": "x"}, {"prompt": "y"}])  # key order is not content
    assert len({a, prompts_digest([{"prompt": "y"}, {"prompt": "x", "task": "t", "n": 1}]),
                prompts_digest([{"prompt": "x", "task": "t", "n": 2}, {"prompt": "y"}]),
                prompts_digest([{"prompt": "x ", "task": "t", "n": 1}, {"prompt": "y"}])}) == 4
