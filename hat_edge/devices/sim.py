"""A simulated board: HAT's measured latency as a known function of the arch, with a real board's flaws.

`SimDevice("hat-pi4")` answers the loop's questions (`check`, `measure`, side-by-side and anchored
measurements, the encoder/decoder split) from the cost model fitted on all 2,000 rows of HAT's
Raspberry Pi 4 latency file (the packaged prior's `raspberrypi` entry; `hat-xeon` and
`hat-titanxp` likewise), plus three seeded imperfections a real board has:

- noise: each timing is the true latency times a log-normal factor (`noise`, the sd of its log);
- selection bias: each arch carries a persistent deviation from the cost model (`bias`), which no
  predictor of the arch's features can learn, so a search that minimises loss under a predicted
  budget picks archs the predictor underestimates (the winner's curse the loop calibrates for);
- drift: after `drift_after` timings the board runs `drift` times slower (a passing load, thermal
  throttling), which the loop's anchored measurements must correct.

Everything is a pure function of (settings, seed, the order of calls): a test of the loop's
statistics on it is deterministic and takes seconds. `hat-edge loop --profile sim:hat-pi4` lets
anyone try the loop against HAT's Pi measurements without a board; every line it prints says the
latencies are simulated. The latencies are HAT's settings (beam 5, 30 steps on HAT's Pi), not this
machine's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from hat_edge.errors import UserError
from hat_edge.latency.drift import corrected, drift_factor
from hat_edge.latency.features import cost_terms
from hat_edge.latency.prior import DevicePrior, packaged_prior
from hat_edge.space import Arch

SIM_PREFIX = "sim:"
SIM_DEVICES = {"hat-pi4": "raspberrypi", "hat-xeon": "xeon", "hat-titanxp": "titanxp"}
SIM_NOTE = "simulated: HAT's measured cost model + seeded noise, bias and drift; no board was timed"


@dataclass(frozen=True)
class SimSettings:
    """The simulated board's imperfections (module doc)."""

    noise: float = 0.02  # sd of log(timed / true) per timing
    bias: float = 0.05  # sd of the persistent per-arch log deviation from the cost model
    drift: float = 1.0  # slowdown factor after `drift_after` timings (1.0: none)
    drift_after: int = 10**9
    # a memory cliff: archs with more than `cliff_params` weights run `cliff` times slower (their
    # weights spill out of the board's fast memory), a jump no smooth cost model represents
    cliff: float = 1.0
    cliff_params: int = 10**12
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo, hi in (("noise", 0.0, 1.0), ("bias", 0.0, 1.0), ("drift", 0.1, 10.0), ("cliff", 0.1, 10.0)):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
                raise UserError(f"simulated device: field '{name}' must be a number in [{lo}, {hi}], got {v!r}")


def is_sim(profile: str) -> bool:
    return str(profile).startswith(SIM_PREFIX)


class SimDevice:
    """A `search.protocols.Device` with every optional capability (side by side, anchored, split)."""

    def __init__(self, which: str = "hat-pi4", settings: SimSettings | None = None) -> None:
        which = which[len(SIM_PREFIX):] if which.startswith(SIM_PREFIX) else which
        if which not in SIM_DEVICES:
            raise UserError(f"--profile sim:{which}: unknown simulated device; allowed: "
                            + ", ".join(SIM_PREFIX + k for k in SIM_DEVICES))
        self.which = which
        self.name = SIM_PREFIX + which
        self.settings = settings or SimSettings()
        dev = next(d for d in packaged_prior().devices if d.name == SIM_DEVICES[which])
        self.cost: DevicePrior = dev
        self._rng = np.random.default_rng(self.settings.seed)
        self.timings = 0  # timings taken so far (the drift's clock)
        self._store: dict[Arch, float] = {}
        self._split: dict[Arch, tuple[float, float]] = {}
        self.calls: list[int] = []

    # ---- the ground truth ----
    def cost_model_ms(self, arch: Arch) -> tuple[float, float]:
        """(encoder ms, decoder ms) of HAT's fitted cost model."""
        enc, dec = cost_terms(np.zeros((1, 10)), [arch])
        return float(enc[0] @ np.asarray(self.cost.encoder)), float(dec[0] @ np.asarray(self.cost.decoder))

    def _deviation(self, arch: Arch) -> float:
        """The arch's persistent log deviation, a seeded hash of the arch (same arch, same value)."""
        if self.settings.bias == 0:
            return 0.0
        h = hashlib.sha256(f"{self.settings.seed}:{arch.to_json()}".encode()).digest()
        u = (int.from_bytes(h[:8], "big") + 0.5) / 2**64
        from scipy.stats import norm

        return float(norm.ppf(u)) * self.settings.bias

    def _persistent(self, arch: Arch) -> float:
        """The arch's own factor over the cost model: its deviation and the memory cliff."""
        cliff = self.settings.cliff if arch.params() > self.settings.cliff_params else 1.0
        return float(np.exp(self._deviation(arch))) * cliff

    def true_ms(self, arch: Arch) -> float:
        """The arch's latency on the undrifted board, without timing noise (what a test checks against)."""
        e, d = self.cost_model_ms(arch)
        return (e + d) * self._persistent(arch)

    def speed(self) -> float:
        """The slowdown now (1.0 before the drift sets in)."""
        return self.settings.drift if self.timings >= self.settings.drift_after else 1.0

    def _time(self, archs: Sequence[Arch]) -> dict[Arch, tuple[float, float, float]]:
        """One batch timed side by side: every arch sees the same speed; (total, enc, dec) ms."""
        s = self.speed()
        out = {}
        for a in archs:
            e, d = self.cost_model_ms(a)
            k = self._persistent(a) * float(np.exp(self._rng.normal(0.0, self.settings.noise))) * s
            out[a] = ((e + d) * k, e * k, d * k)
        self.timings += len(archs)
        return out

    # ---- the Device protocol ----
    def check(self) -> Mapping[str, Any]:
        return {"os": "simulated", "simulated": True, "device": self.name, "cost_model": self.cost.source or
                self.cost.name, "rows": self.cost.rows, "note": SIM_NOTE}

    def measure(self, archs: Sequence[Arch], progress: bool = True) -> dict[Arch, float]:
        new = [a for a in dict.fromkeys(archs) if a not in self._store]
        self.calls.append(len(new))
        for a, (ms, e, d) in self._time(new).items():
            self._store[a], self._split[a] = ms, (e, d)
        return {a: self._store[a] for a in archs}

    def measured(self) -> dict[Arch, float]:
        return dict(self._store)

    def split(self) -> dict[Arch, tuple[float, float]]:
        return dict(self._split)

    def measure_side_by_side(self, archs: Sequence[Arch], progress: bool = True, group: int = 12,
                             anchors: int = 2) -> dict[Arch, float]:
        """In groups of at most `group`, each later group beside `anchors` of the first, corrected
        to the first group's scale (what `ProfileDevice.measure_side_by_side` does on a board)."""
        new = [a for a in dict.fromkeys(archs) if a not in self._store]
        first = new[:group]
        if first:
            self.measure(first, progress)
        ref = sorted(first, key=lambda a: self._store[a])
        picks = [ref[int(q * (len(ref) - 1))] for q in (1 / 3, 2 / 3)][:anchors] if ref else []
        for i in range(group, len(new), group):
            self.measure_anchored(new[i:i + group], {a: self._store[a] for a in picks}, progress)
        return {a: self._store[a] for a in archs}

    def measure_anchored(self, archs: Sequence[Arch], anchors: Mapping[Arch, float],
                         progress: bool = True) -> tuple[dict[Arch, float], float]:
        new = [a for a in dict.fromkeys(archs) if a not in self._store]
        if not new:
            return {a: self._store[a] for a in archs}, 1.0
        timed = self._time(list(anchors) + new)
        drift = drift_factor((timed[a][0], ms) for a, ms in anchors.items())
        self.calls.append(len(new))
        for a in new:
            ms, e, d = timed[a]
            self._store[a], self._split[a] = corrected(ms, drift), (corrected(e, drift), corrected(d, drift))
        return {a: self._store[a] for a in archs}, drift


__all__ = ["SIM_DEVICES", "SIM_NOTE", "SIM_PREFIX", "SimDevice", "SimSettings", "is_sim"]
