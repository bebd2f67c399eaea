"""flowalign.io.BatchJournal: what an interrupted long job (eval, steer) finished, batch by batch; and the atomic
writers, the JSONL reader and the output-path check around it."""

import json
import os

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
    assert again.redone == 0
    third = BatchJournal(path, {"steps": 2, "model": "shapes"}, resume=True, redo={0})
    assert sorted(third.done) == [2]
    assert third.redone == 2  # batch 0's two records are produced again (the resume line says so)
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


def test_resume_refuses_a_setting_that_was_dropped(tmp_path):
    """The settings are compared over both key sets: a key in the journal but not in the resume is a difference too."""
    path = tmp_path / "j.jsonl"
    BatchJournal(path, {"steps": 2, "seed": 0}).add(0, [{"x": 0}])
    with pytest.raises(UserError, match=r"other settings \(seed 0 -> None\)"):
        BatchJournal(path, {"steps": 2}, resume=True)


def test_records_come_in_batch_order_whatever_order_they_finished_in(tmp_path):
    """records(): every finished batch's records in batch order, not in the order the batches were appended."""
    path = tmp_path / "j.jsonl"
    j = BatchJournal(path, {"steps": 2})
    j.add(2, [{"x": 4}])
    j.add(0, [{"x": 0}, {"x": 1}])
    assert j.records() == []  # only a resume reads the file
    again = BatchJournal(path, {"steps": 2}, resume=True)
    assert again.records() == [{"x": 0}, {"x": 1}, {"x": 4}]
    ends = [json.loads(line)["journal_batch"] for line in path.read_text().splitlines() if "journal_batch" in line]
    assert ends == [0, 2]  # the rewritten file holds the batches in order too


# ------------------------------------------------------------------------------------ atomic writes, JSONL, --out


def test_an_atomic_rewrite_keeps_the_existing_files_mode(tmp_path):
    """The replacement file takes the existing file's permissions (only a new file gets 0o666 & ~umask)."""
    from flowalign.io import atomic_write_text

    target = tmp_path / "summary.json"
    atomic_write_text(target, "one")
    os.chmod(target, 0o640)
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and target.stat().st_mode & 0o7777 == 0o640


@pytest.fixture
def fsynced(monkeypatch):
    """The paths ``os.fsync`` is called on (read from /proc, so Linux only), in order; the real fsync still runs."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names the synced files via /proc (Linux)")
    from flowalign import io as fio

    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(fio.os, "fsync", spy)
    return synced


def test_an_atomic_write_fsyncs_the_temp_file_before_the_rename(tmp_path, fsynced):
    """DESIGN.md §5: the data is made durable (fsync of the temporary file) before os.replace publishes it, and the
    directory is fsynced after it; else a power loss can leave an empty file under the final name."""
    from flowalign import io as fio

    fio.atomic_write_text(tmp_path / "x.txt", "data")
    names = [os.path.basename(p) for p in fsynced]
    assert any(n.startswith(".x.txt.") and n.endswith(".tmp") for n in names), names  # the temp file, pre-rename
    assert str(tmp_path) in fsynced  # then the directory holding the rename


def test_atomic_dir_fsyncs_the_files_written_into_it(tmp_path, fsynced):
    """A checkpoint's files (e.g. safetensors' save_file, which does not fsync) must be durable before the rename
    publishes the directory, else a power loss can leave a complete-looking checkpoint with empty files."""
    from flowalign import io as fio

    with fio.atomic_dir(tmp_path / "ckpt") as d:
        (d / "weights.bin").write_bytes(b"x" * 10)  # written by another library, not fsynced by it
        (d / "sub").mkdir()
        (d / "sub" / "state.json").write_text("{}")
    names = {os.path.basename(p) for p in fsynced}
    assert {"weights.bin", "state.json"} <= names
    assert (tmp_path / "ckpt" / "weights.bin").read_bytes() == b"x" * 10


def test_atomic_write_json_keeps_the_key_order(tmp_path):
    """The first reward in a summary's ``overall`` is the report's headline metric: keys are never sorted."""
    from flowalign.io import atomic_write_json

    path = atomic_write_json(tmp_path / "summary.json", {"overall": {"shapes_strict": 0.5, "aesthetic": 0.1}, "n": 2})
    assert list(json.loads(path.read_text())["overall"]) == ["shapes_strict", "aesthetic"]
    assert list(json.loads(path.read_text())) == ["overall", "n"]


def test_read_jsonl_skips_blank_lines_anywhere(tmp_path):
    """Blank (or whitespace-only) lines are skipped, not an 'invalid JSON line' error."""
    from flowalign.io import read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_check_out_parent_judges_an_existing_output_file_by_its_directory(tmp_path):
    """An existing file at the output path is replaced (through a temp file beside it), so it is fine; a file
    standing where a parent directory should be is a one-line UserError naming it."""
    from flowalign.io import check_out_parent

    existing = tmp_path / "grid.png"
    existing.write_bytes(b"old")
    check_out_parent(existing)  # no error: its directory is writable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # and the probe left nothing behind
    with pytest.raises(UserError, match=r"grid.png is a file, not a directory"):
        check_out_parent(existing / "sub" / "a.png")


def test_read_jsonl_strict_refuses_a_truncated_last_line(tmp_path):
    """The default skips a truncated last line (a crash mid-append of our own logs); ``strict`` (a file another
    program wrote whole) raises naming it."""
    from flowalign.io import read_jsonl

    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n{"a": 2\n')
    assert read_jsonl(p) == [{"a": 1}]
    with pytest.raises(ValueError, match=r"r.jsonl:2: invalid JSON line"):
        read_jsonl(p, strict=True)
    p.write_text('{"a": 1}\n\n')
    assert read_jsonl(p, strict=True) == [{"a": 1}]


def test_a_journal_resumed_at_another_batch_size_regroups_its_records_and_merges_partial_batches(tmp_path):
    """``rebatch``: the finished records are filed under the batches of the new size that hold them (a batch may be
    partly done); a later entry for the same batch is merged, not lost; other changed settings are still refused and
    leave the file as it was."""
    path = tmp_path / "j.jsonl"
    j = BatchJournal(path, {"steps": 2, "batch_size": 4})
    j.add(0, [{"job": n} for n in range(4)])
    j.add(1, [{"job": n} for n in range(4, 8)])
    of = ("batch_size", lambda size: lambda r: r["job"] // size)
    with pytest.raises(UserError, match="steps 2 -> 3"):
        BatchJournal(path, {"steps": 3, "batch_size": 3}, resume=True, rebatch=(of[0], of[1](3)))
    assert BatchJournal(path, {"steps": 2, "batch_size": 4}, resume=True).records() == [{"job": n} for n in range(8)]
    again = BatchJournal(path, {"steps": 2, "batch_size": 3}, resume=True, rebatch=(of[0], of[1](3)), redo={0})
    assert again.rebatched and again.rebatched_from == 4 and again.redone == 3
    assert {b: [r["job"] for r in recs] for b, (recs, _) in again.done.items()} == {1: [3, 4, 5], 2: [6, 7]}
    again.add(2, [{"job": 8}])  # the rest of the partly done batch 2
    third = BatchJournal(path, {"steps": 2, "batch_size": 3}, resume=True, rebatch=(of[0], of[1](3)))
    assert not third.rebatched
    assert {b: [r["job"] for r in recs] for b, (recs, _) in third.done.items()} == {1: [3, 4, 5], 2: [6, 7, 8]}
    with pytest.raises(UserError, match="batch_size 3 -> 4"):  # without rebatch the size is a setting like any other
        BatchJournal(path, {"steps": 2, "batch_size": 4}, resume=True)


def test_a_checkpoint_directory_and_its_lora_get_the_modes_mkdir_and_open_would_give(tmp_path, monkeypatch):
    """mkdtemp and mkstemp make 0700 directories and 0600 files: checkpoints/step-N and its LoRA were unreadable to
    other users of a shared machine whatever the umask. They now get 0o777 / 0o666 less the umask."""
    import torch

    import flowalign.io as IO
    from flowalign.io import atomic_dir
    from flowalign.models.lora import WEIGHT_NAME, save_lora

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(4, 4)

    from peft import LoraConfig, inject_adapter_in_model

    module = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), Tiny())
    old = os.umask(0o027)
    monkeypatch.setattr(IO, "_UMASK", None)
    try:
        with atomic_dir(tmp_path / "step-1") as tmp:
            save_lora(module, tmp)
    finally:
        os.umask(old)
    assert (tmp_path / "step-1").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "step-1" / WEIGHT_NAME).stat().st_mode & 0o777 == 0o640
