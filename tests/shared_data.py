"""Where the tests find the read-only shared data (HAT's configs and latency files).

`$HAT_EDGE_SHARED` if set; else `../shared` beside the checkout (where CI has it); else
`/work/shared` (a clone made elsewhere on a development machine, e.g. under /tmp). The package never
reads it. A test that needs it and finds none fails naming the path it looked at (never a skip).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    env = os.environ.get("HAT_EDGE_SHARED")
    candidates = [Path(env)] if env else [REPO.parent / "shared", Path("/work/shared")]
    for c in candidates:
        if (c / "data" / "hat").is_dir():
            return c
    return candidates[0]


HAT_DATA = shared_dir() / "data" / "hat"
HAT_LATENCY = HAT_DATA / "latency"
