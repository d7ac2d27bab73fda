"""Reading a user's file: every reader's failure is one line naming the file, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Type, Union

from .errors import RunnerError, UserError


def read_file(path: Union[str, Path], missing: str = "no such file", error: Type[UserError] = RunnerError,
              text: bool = False) -> Union[bytes, str]:
    """The bytes (or UTF-8 text) of `path`; `error` with one line when it is missing
    (`{path}: {missing}`) or unreadable (`{path}: cannot read (IsADirectoryError)`)."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8") if text else p.read_bytes()
    except FileNotFoundError:
        raise error(f"{p}: {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: cannot read ({e.__class__.__name__})") from None


def read_text(path: Union[str, Path], missing: str = "no such file", error: Type[UserError] = RunnerError) -> str:
    out = read_file(path, missing, error, text=True)
    assert isinstance(out, str)
    return out
