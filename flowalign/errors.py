"""User-facing errors: the CLI prints ``str(err)`` on one line and exits with code 2."""

from __future__ import annotations

import argparse
import difflib
from typing import NoReturn


class UserError(Exception):
    """Bad input from the user (config, paths, prompts). One line: what is wrong and how to fix it.

    ``command``: the subcommand the line is prefixed with when it is more than the top-level one (e.g. ``bench
    credit``), so an error from a command's code reads like its argument errors (``flowalign bench credit: error:``);
    None = the top-level command."""

    command: str | None = None


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``err``'s text (its class name if it has none), for a one-line ``UserError``.
    A line ending in ':' takes the next one too (torch's "Error(s) in loading state_dict for X:" says why there)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text[:limit]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that shows an option's default, ``(default: X)``, where its text does not already speak of one and the
    default is a value (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text.lower() and default is not argparse.SUPPRESS
                and default is not None and default is not False and default != [] and default != ""):
            text += " (default: %(default)s)"
        return text


class Once(argparse.Action):
    """An option that takes one value and refuses a second in one line (argparse keeps the last, silently: ``--lora A
    --lora B`` applied only B). ``once_hint``: the refusal's advice. One parser per command call, so the action's own
    flag is the call's."""

    def __init__(self, *args, once_hint: str = "pass it once", **kwargs) -> None:
        self.once_hint = once_hint
        self.seen = False
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.seen:
            parser.error(f"{option_string} is given twice ({getattr(namespace, self.dest)!r}, {values!r}); "
                         f"{self.once_hint}")
        self.seen = True
        setattr(namespace, self.dest, values)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are the commands' one line: ``PROG: error: WHAT (see `PROG --help`)``,
    exit code 2, without the usage block argparse prints first. An unknown option names the closest known one. Its
    help shows each option's default (``DefaultsHelpFormatter``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        hint = f"see `{self.prog} --help`"
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            option = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), None)
            close = difflib.get_close_matches(option, list(self._option_string_actions), n=1) if option else []
            if close:
                hint = f"did you mean {close[0]!r}? {hint}"
        self.exit(2, f"{self.prog}: error: {message} ({hint})\n")
