"""The local device, cut down for tests (shared by test_loop.py and test_app.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def fast_local_profile(tmp: Path, vocab_size: int, min_time_s: float = 0.3):
    """local-cpu with fewer repeats (a test, not a benchmark) and its own work dir."""
    from hat_edge.app.job import prepare_profile
    from hat_edge.devices.profiles import load_profile

    p = load_profile("local-cpu")
    p = dataclasses.replace(p, work_dir=str(tmp / "work"), measurement=dataclasses.replace(
        p.measurement, warmup=3, min_repeats=5 if min_time_s < 1 else 10, min_time_s=min_time_s))
    return prepare_profile(p, vocab_size)
