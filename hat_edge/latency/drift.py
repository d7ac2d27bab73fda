"""A device's drift from anchors: archs timed before, timed again beside new ones.

The one rule every device uses (a board's `devices.measure.measure_anchored`, the simulated board
`devices.sim`): the drift factor is the median over the anchors of (latency now / latency before),
and a new measurement on the anchors' earlier scale is its raw latency divided by that factor
(`LatencyRecord.corrected_ms`). The median, not the mean: one anchor caught by a passing spike
must not move the correction.
"""

from __future__ import annotations

import statistics
from typing import Iterable


def drift_factor(pairs: Iterable[tuple[float, float]]) -> float:
    """Median of now / before over (now_ms, before_ms) pairs with before > 0; 1.0 when there are none."""
    ratios = [now / before for now, before in pairs if before > 0]
    return float(statistics.median(ratios)) if ratios else 1.0


def corrected(raw_ms: float, drift: float) -> float:
    """A latency timed under `drift`, on the anchors' earlier scale."""
    return raw_ms / drift if drift > 0 else raw_ms


__all__ = ["drift_factor", "corrected"]
