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
