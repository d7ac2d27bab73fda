"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits 1."""


class UserError(Exception):
    """Bad input: a file, field or value the user can fix. The message names it and what is allowed."""
