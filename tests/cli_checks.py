"""Shared checks of the `flowalign` commands' bad-input rule: one stderr line, exit code 2, no model loaded."""

from __future__ import annotations

import pytest

from flowalign.cli import main


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model: its arguments must be refused before that."""
    import functools

    import flowalign.models
    from flowalign.models.shapes import ShapesModel

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad argument was refused")

    def like(fn):  # a new refusing function with ``fn``'s signature, which commands inspect to check arguments
        @functools.wraps(fn)
        def refuse(*a, **k):
            boom()
        return refuse

    monkeypatch.setattr(flowalign.models, "load_model", boom)
    monkeypatch.setattr(ShapesModel, "from_pretrained", classmethod(like(ShapesModel.from_pretrained.__func__)))
    monkeypatch.setattr(ShapesModel, "from_config", classmethod(like(ShapesModel.from_config.__func__)))


def error_prefix(argv) -> str:
    """The command an error line names: ``bench NAME`` / ``rewards serve`` for a benchmark's or the reward server's
    own code (as their argument errors), else the top-level command."""
    from flowalign.bench import BENCHES

    if argv[:2] == ["rewards", "serve"]:
        return "rewards serve"
    if argv[0] == "bench" and len(argv) > 1 and argv[1] in BENCHES:
        return f"bench {argv[1]}"
    return argv[0]


def fails(capsys, argv, *needles, cmd=None):
    """Run ``flowalign argv``; assert exit 2 and one stderr line `flowalign CMD: error: ...` holding every needle
    (CMD: ``error_prefix(argv)`` unless given)."""
    cmd = cmd or error_prefix(argv)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flowalign {cmd}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
