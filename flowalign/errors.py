"""User-facing errors: the CLI prints ``str(err)`` on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (config, paths, prompts). One line: what is wrong and how to fix it."""
