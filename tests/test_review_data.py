"""Review of flowalign.data: prompt-file edge cases (line breaks, non-UTF-8 bytes, non-string prompts)."""

from __future__ import annotations

import pytest

from flowalign.data import load_prompts
from test_data import _err  # noqa: E402  (one-line UserError message of fn(*args))


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
