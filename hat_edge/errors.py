"""Errors a user can cause. The CLI prints them as one line (no traceback) and exits 1.

Defined at the bottom of the house (`hat_edge.runtime.errors`) so the device side raises the same
kind; every room imports them from here.
"""

from hat_edge.runtime.errors import RunnerError, UserError

__all__ = ["UserError", "RunnerError"]
