"""The main job's typed result (`RunSummary`) and its parts.

`RunSummary.to_dict()` is the JSON that `hat-edge run --json` prints and report.json holds (the
report without `report`): the same keys as before the result was typed, so scripts keep working.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from hat_edge.app.deploy import DeployResult, Translation
from hat_edge.search.loop import RoundReport, budget_verdict
from hat_edge.space import Arch


class _Plain:
    """A frozen record of plain values: its JSON object is its fields, in order."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


def _with_arch(obj: Any, *keys: str) -> dict[str, Any]:
    """{"arch": the arch as a dict, then each key's value}, in that order (the --json key order)."""
    return {"arch": obj.arch.to_dict(), **{k: getattr(obj, k) for k in keys}}


@dataclass(frozen=True)
class WinnerSummary:
    """The loop's winner: its predictions (made before it was measured), measurements and quality."""

    arch: Arch
    predicted_latency_ms: float
    predicted_lo_ms: float
    predicted_hi_ms: float
    measured_latency_ms: float
    deployed_latency_ms: float | None  # the deployed bundle's benchmark median (None: no benchmark)
    loss: float
    found_in: str  # "round N" or "earlier measurements"
    bleu: float  # the PyTorch SubTransformer's (fp32)
    precision: str = "fp32"  # of the deployed bundle (and of every latency above): "fp32" | "int8"
    bleu_deployed: float | None = None  # the deployed bundle's own BLEU on the host (int8: its own numbers)

    @property
    def describe(self) -> str:
        return self.arch.describe()

    @property
    def params(self) -> int:
        return self.arch.params()

    def to_dict(self) -> dict[str, Any]:
        return _with_arch(self, "describe", "predicted_latency_ms", "predicted_lo_ms", "predicted_hi_ms",
                          "measured_latency_ms", "deployed_latency_ms", "loss", "found_in", "bleu", "params",
                          "precision", "bleu_deployed")


@dataclass(frozen=True)
class LargestSummary:
    """The largest SubTransformer: the baseline of the speed-up."""

    arch: Arch
    measured_latency_ms: float | None  # None when the loop never measured it
    loss: float
    bleu: float

    @property
    def params(self) -> int:
        return self.arch.params()

    def to_dict(self) -> dict[str, Any]:
        return _with_arch(self, "measured_latency_ms", "loss", "bleu", "params")


@dataclass(frozen=True)
class SideBySide(_Plain):
    """The winner and the largest SubTransformer timed in rotation in one runner process."""

    winner_ms: float
    largest_ms: float
    speedup: float

    @classmethod
    def of(cls, winner_ms: float, largest_ms: float) -> "SideBySide":
        return cls(winner_ms=winner_ms, largest_ms=largest_ms, speedup=largest_ms / winner_ms)


@dataclass(frozen=True)
class PredictorError(_Plain):
    """The predictor on the loop's new candidates, predicted before they were measured."""

    mape: float | None  # mean |error| in %
    within_10: float | None  # % of candidates within 10%
    n: int

    @classmethod
    def of(cls, errors_pct: Sequence[float]) -> "PredictorError":
        """From each candidate's |error| in % (none: no new candidate was measured)."""
        if not errors_pct:
            return cls(mape=None, within_10=None, n=0)
        return cls(mape=sum(errors_pct) / len(errors_pct),
                   within_10=100.0 * sum(e <= 10 for e in errors_pct) / len(errors_pct), n=len(errors_pct))


@dataclass(frozen=True)
class RandomComparison(_Plain):
    """Random search at the same number of fitness evaluations (`--compare-random`)."""

    evaluations: int
    best_loss: float
    evolution_best_loss: float


@dataclass(frozen=True)
class RunSummary:
    """What `run_main_job` returns: the whole job's result."""

    device: str  # the profile's name
    device_desc: str
    checkpoint: str
    space: str
    created_at: str  # ISO 8601, UTC
    command: str  # the command line that reproduces the run
    budget_ms: float
    budget_source: str
    tolerance: float
    met: bool
    measured_range_ms: tuple[float, float]  # of the initial dataset
    winner: WinnerSummary
    largest: LargestSummary
    speedup: float | None  # largest / winner: side by side when timed so, else the loop's measurements
    side_by_side: SideBySide | None
    bleu_sentences: int
    bleu_beam: int
    initial_measurements: int
    device_measurements: int
    fitness_evaluations: int
    rounds: tuple[RoundReport, ...]
    predictor_error: PredictorError
    random_search: RandomComparison | None
    deploy: DeployResult
    device_env: Mapping[str, Any]  # the runner's `env` JSON
    store: str
    timings_s: Mapping[str, float]
    wall_s: float
    report: tuple[str, ...] = field(default=())  # files written (report.md, report.json, plots)

    @property
    def translations(self) -> tuple[Translation, ...]:
        """The winner's test translations on the device."""
        return self.deploy.translations

    def to_dict(self) -> dict[str, Any]:
        """The `--json` object (report.json: the same without `report`)."""
        return {
            "device": self.device,
            "device_desc": self.device_desc,
            "checkpoint": self.checkpoint,
            "space": self.space,
            "created_at": self.created_at,
            "command": self.command,
            "budget_ms": self.budget_ms,
            "budget_source": self.budget_source,
            "tolerance": self.tolerance,
            "met": self.met,
            "measured_range_ms": list(self.measured_range_ms),
            "winner": self.winner.to_dict(),
            "largest": self.largest.to_dict(),
            "speedup": self.speedup,
            "side_by_side": self.side_by_side.to_dict() if self.side_by_side else None,
            "bleu_sentences": self.bleu_sentences,
            "bleu_beam": self.bleu_beam,
            "initial_measurements": self.initial_measurements,
            "device_measurements": self.device_measurements,
            "fitness_evaluations": self.fitness_evaluations,
            "rounds": [r.to_dict() for r in self.rounds],
            "predictor_error": self.predictor_error.to_dict(),
            "random_search": self.random_search.to_dict() if self.random_search else None,
            "deploy": self.deploy.to_dict(),
            "translations": [
                {"source": t.source, "reference": t.reference, "hypothesis": t.device} for t in self.translations
            ],
            "device_env": dict(self.device_env),
            "store": self.store,
            "timings_s": dict(self.timings_s),
            "wall_s": self.wall_s,
            "report": list(self.report),
        }


# budget_verdict is re-exported: the wording lives with the loop that decides what met means.
__all__ = ["LargestSummary", "budget_verdict", "PredictorError", "RandomComparison", "RunSummary", "SideBySide", "WinnerSummary"]
