"""User-facing errors: the CLI prints ``str(err)`` on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, prompts). One line: what is wrong and how to fix it."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``err``'s text (its class name if it has none), for a one-line ``UserError``.
    A line ending in ':' takes the next one too (torch's "Error(s) in loading state_dict for X:" says why there)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text[:limit]
