"""What the search loop needs of a device and of a latency predictor, as Protocols.

A device is anything with `name`, `check()`, `measure(archs)` and `measured()` (`Device`). Three
optional capabilities make the loop's measurements fairer on a device whose speed drifts; each is
a runtime-checkable Protocol of its own, and the loop uses it where `isinstance` says the device
has it:

    SideBySideDevice  measure_side_by_side(archs)      the initial dataset, timed in rotation
    AnchoredDevice    measure_anchored(archs, anchors) each round's candidates, beside anchors
    SplitDevice       split()                          encoder / decoder medians for the predictor

`hat_edge.search.loop.ProfileDevice` (a device profile and the latency store) has all three; a
synthetic test device may have none. A predictor is anything with `fit`, `predict` and
`predict_interval` (`LatencyPredictor`); `hat_edge.latency.predictor.Predictor` is one.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from hat_edge.space import Arch

ArchsOrFeatures = Sequence[Arch] | np.ndarray  # archs, or an (n, 10) array of HAT's features


class Device(Protocol):
    """The device as the loop sees it."""

    name: str

    def check(self) -> Mapping[str, Any]:
        """Connect and describe the device (the runner's `env` JSON); raise UserError when it
        cannot be reached."""
        ...

    def measure(self, archs: Sequence[Arch], progress: bool = True) -> dict[Arch, float]:
        """Measured latency (median ms) of each arch; stored ones are not measured again."""
        ...

    def measured(self) -> dict[Arch, float]:
        """Every arch measured on this device with the current settings so far."""
        ...


@runtime_checkable
class SideBySideDevice(Protocol):
    """A device that can time a batch of archs in rotation (one runner process), in anchored groups."""

    def measure_side_by_side(self, archs: Sequence[Arch], progress: bool = True) -> dict[Arch, float]:
        """arch -> latency (ms, on the scale of the first group) of each arch; stored ones are reused."""
        ...


@runtime_checkable
class AnchoredDevice(Protocol):
    """A device that can time new archs beside anchors measured before, to correct for drift."""

    def measure_anchored(
        self, archs: Sequence[Arch], anchors: Mapping[Arch, float], progress: bool = True
    ) -> tuple[dict[Arch, float], float]:
        """(arch -> latency corrected to the anchors' earlier scale, drift factor now / before)."""
        ...


@runtime_checkable
class SplitDevice(Protocol):
    """A device that knows the encoder / decode-loop split of its measurements."""

    def split(self) -> dict[Arch, tuple[float, float]]:
        """arch -> (encoder ms, decode-loop ms) of every measurement that has them."""
        ...


class LatencyPredictor(Protocol):
    """A latency model: fitted on measurements, predicts ms with a central interval."""

    def fit(
        self,
        X: ArchsOrFeatures,
        y_ms: Sequence[float] | np.ndarray,
        *,
        encoder_ms: Sequence[float] | np.ndarray | None = None,
        decoder_ms: Sequence[float] | np.ndarray | None = None,
        device: str | None = None,
    ) -> LatencyPredictor:
        """Fit on archs (or HAT features) and their latency; returns self."""
        ...

    def predict(self, X: ArchsOrFeatures) -> np.ndarray:
        """(n,) predicted latency in ms."""
        ...

    def predict_interval(self, X: ArchsOrFeatures, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) in ms: a central `level` interval for the measured latency of each arch."""
        ...


__all__ = ["AnchoredDevice", "ArchsOrFeatures", "Device", "LatencyPredictor", "SideBySideDevice", "SplitDevice"]
