"""What every bench script does with its result: one JSON file, its folder made if missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, doc: Any, indent: int = 2) -> Path:
    """Write `doc` as indented JSON (a trailing newline) to `path`; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=indent) + "\n")
    return out
