"""Errors of hat-edge, defined at the bottom of the house so the device side can raise them too.

`UserError` is anything a user can fix (a file, field or value); the CLI prints its message as one
line. `RunnerError` is the runtime's kind of it: a problem with a job, a bundle or the runtime on a
device. `hat_edge.errors` re-exports both for the rooms above.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a file, field or value the user can fix. The message names it and what is allowed."""


class RunnerError(UserError):
    """A problem with a job, a bundle or the runtime; the message is one line, ready to print."""
