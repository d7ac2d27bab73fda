"""The closed loop (search -> measure -> refit), its CLI, and its failure modes.

The slow test is the issue's: the demo space, the bundled demo SuperTransformer, real local
measurements through the same runner a board runs, and the real default predictor.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from local_device import fast_local_profile  # noqa: E402  (tests/ helper)

from hat_edge.errors import UserError
from hat_edge.search.evolution import CachedFitness, EvolutionSettings
from hat_edge.search.loop import (
    LoopSettings,
    ProfileDevice,
    budget_from_measurements,
    initial_archs,
    run_loop,
)
from hat_edge.space import PRESETS, Arch

DEMO = PRESETS["demo"]
TINY_EVO = EvolutionSettings(population=24, parents=6, mutations=9, crossovers=9, iterations=6, seed=0)


def capacity_loss(a: Arch) -> float:
    """Synthetic fitness: lower with more capacity (what a trained SuperTransformer shows)."""
    f = a.features()
    return 6.0 - 0.4 * np.log(f[4]) - 0.25 * np.log(f[2]) - 0.35 * np.log(f[6]) - 0.15 * a.decoder_layer_num


class CliffDevice:
    """A synthetic device whose latency jumps 35% once a model's weights exceed 2.6 M params (a
    cache spilling over). No predictor fitted on a few dozen rows sees the cliff coming, so the
    loop's first winner misses the budget on the device: the recovery path, deterministically.
    Synthetic on purpose (the real local device runs in the slow test below)."""

    name = "cliff"

    def __init__(self) -> None:
        self.store: dict[Arch, float] = {}
        self.calls: list[int] = []
        self.checked = 0

    @staticmethod
    def latency(a: Arch) -> float:
        base = a.flops() / 4e6 + 4.0 * a.decoder_layer_num + 0.01 * a.decoder_embed_dim
        return base * (1.35 if a.params() > 2.6e6 else 1.0)

    def check(self) -> dict:
        self.checked += 1
        return {"os": "synthetic"}

    def measure(self, archs, progress=True):
        self.calls.append(len(archs))
        out = {a: self.latency(a) for a in archs}
        self.store.update(out)
        return out

    def measured(self):
        return dict(self.store)


def test_loop_recovers_when_the_predictor_misses_the_budget():
    dev = CliffDevice()
    init = initial_archs(DEMO, 30, seed=0)
    budget = float(np.percentile([dev.latency(a) for a in init], 40))
    fit = CachedFitness(capacity_loss)
    res = run_loop(DEMO, fit, dev, LoopSettings(budget_ms=budget, rounds=4, top_k=3, initial=30, evolution=TINY_EVO),
                   progress=False, log=lambda m: None)
    assert dev.checked == 1
    assert res.met and res.winner.measured_ms <= budget * 1.03
    assert res.winner.measured_ms == dev.latency(res.winner.arch)
    # The first round's winner missed on the device; the loop refitted and searched again.
    assert len(res.rounds) >= 2 and not res.rounds[0].met and res.rounds[-1].met
    assert res.rounds[1].fitted_on > res.rounds[0].fitted_on
    # A later round never proposes an arch already measured over the budget.
    over = {c.arch for c in res.rounds[0].candidates if c.measured_ms > budget}
    assert over and not over & {c.arch for r in res.rounds[1:] for c in r.candidates}
    # Candidates were predicted before they were measured (out of sample) and measured once each.
    assert dev.calls[0] == 30 and sum(dev.calls) == res.device_measurements
    assert len(dev.store) == res.device_measurements
    d = res.to_dict()
    for k in ("arch", "budget_ms", "predicted_latency_ms", "measured_latency_ms", "loss", "rounds"):
        assert k in d
    assert d["rounds"] == len(res.rounds) and Arch.from_dict(d["arch"]) == res.winner.arch
    json.dumps(d)


class LyingDevice(CliffDevice):
    """A device that measures every arch proposed by a search (not in the initial dataset) 50%
    slower than its cost model: the searched candidates all miss the budget, while random archs
    measured at the start met it. Synthetic, to make the fallback deterministic."""

    name = "lying"

    def __init__(self, initial: list[Arch]) -> None:
        super().__init__()
        self.initial = set(initial)

    def latency(self, a: Arch) -> float:  # type: ignore[override]
        base = a.flops() / 4e6 + 4.0 * a.decoder_layer_num + 0.01 * a.decoder_embed_dim
        return base * (1.0 if a in self.initial else 1.5)


def test_winner_is_the_best_arch_measured_within_budget_even_from_the_initial_dataset():
    init = initial_archs(DEMO, 20, seed=0)
    dev = LyingDevice(init)
    budget = float(np.percentile([dev.latency(a) for a in init], 40))
    fit = CachedFitness(capacity_loss)
    logs: list[str] = []
    res = run_loop(DEMO, fit, dev, LoopSettings(budget_ms=budget, rounds=1, top_k=2, initial=20, explore=0,
                                                 evolution=TINY_EVO), progress=False, log=logs.append)
    under = [a for a in init if dev.latency(a) <= budget * 1.03]
    assert under and res.met
    assert res.winner.loss == min(capacity_loss(a) for a in under)
    assert res.winner.arch in dev.initial and res.winner.kind == "measured" and res.winner.round == 0
    assert res.to_dict()["found_in_round"] == 0
    assert any("earlier measurements" in m for m in logs)


def test_calibration_aims_the_next_search_where_the_device_says_the_budget_is():
    """Every searched arch measures 1.5x its cost model (LyingDevice): the first round's picks
    miss, refitting alone keeps missing, the next search scales its predictions by the misses'
    ratio and its own winner meets the budget."""
    init = initial_archs(DEMO, 20, seed=0)
    dev = LyingDevice(init)
    budget = float(np.percentile([dev.latency(a) for a in init], 60))
    logs: list[str] = []
    res = run_loop(DEMO, CachedFitness(capacity_loss), dev,
                   LoopSettings(budget_ms=budget, rounds=4, top_k=2, initial=20, explore=0, evolution=TINY_EVO),
                   progress=False, log=logs.append)
    r1, r2 = res.rounds[0], res.rounds[1]
    assert r1.calibration == 1.0 and not r1.met
    assert 1.3 < r2.calibration <= 1.5, r2.calibration
    assert any("scaled by that" in m for m in logs)
    # The search's own winner met the budget in a later round (not a fallback to the initial data).
    met = [r for r in res.rounds[1:] if r.met]
    assert met and met[0].calibration > 1.3
    # Candidates record the calibrated prediction (what the round expected): close to measured.
    w = met[0].candidates[0]
    assert w.measured_ms <= budget * 1.03 and w.kind == "exploit"
    assert abs(w.predicted_ms / w.measured_ms - 1) < 0.2, (w.predicted_ms, w.measured_ms)
    assert res.met and res.winner.measured_ms <= budget * 1.03


def test_rerun_measures_nothing_new_and_budget_below_fastest_is_refused_before_search():
    dev = CliffDevice()
    fit = CachedFitness(capacity_loss)
    s = LoopSettings(budget_ms=1e6, rounds=1, top_k=2, initial=12, evolution=TINY_EVO)
    run_loop(DEMO, fit, dev, s, progress=False, log=lambda m: None)
    n = len(dev.store)
    fastest = dev.latency(DEMO.smallest())
    calls = fit.calls
    with pytest.raises(UserError) as e:
        run_loop(DEMO, fit, dev, dataclasses.replace(s, budget_ms=fastest * 0.8), progress=False, log=lambda m: None)
    msg = str(e.value)
    assert "below the fastest SubTransformer" in msg and "\n" not in msg
    quoted = float(re.search(r"predicted ([0-9.]+) ms", msg).group(1))  # the fastest predicted latency
    assert 0.9 * fastest <= quoted <= fastest
    assert len(dev.store) == n and fit.calls == calls  # nothing measured, nothing evaluated


def test_budget_from_measurements():
    m = {a: float(i) for i, a in enumerate(DEMO.sample_n(11, seed=0))}
    assert budget_from_measurements(m, 40) == 4.0
    with pytest.raises(UserError, match="--budget"):
        budget_from_measurements({}, 40)
    with pytest.raises(UserError, match="--budget"):
        LoopSettings(budget_ms=-3)


def test_unreachable_device_fails_before_any_work(tmp_path: Path):
    """An SSH profile pointing at a closed port: a one-line error, and no store was even created."""
    import socket

    from hat_edge.cli import cli

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    prof = tmp_path / "gone.toml"
    prof.write_text(f'name = "gone"\ntransport = "ssh"\nhost = "127.0.0.1"\nport = {port}\nuser = "nobody"\n'
                    f'known_hosts = "{tmp_path / "known_hosts"}"\n')
    store = tmp_path / "store.sqlite"
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["loop", "--profile", str(prof), "--budget", "50", "--store", str(store)])
    assert r.exit_code != 0 and r.exception is None or isinstance(r.exception, SystemExit), r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: gone:") and "127.0.0.1" in lines[0], r.output
    assert not store.exists()
    assert time.perf_counter() - t0 < 60


# ------------------------------------------------------------------------------------------------
# The test: real device (local), real model, real predictor
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_ckpt():
    from hat_edge.checkpoint import load_checkpoint

    return load_checkpoint("demo")


def test_loop_on_the_local_device_meets_the_budget(tmp_path: Path, demo_ckpt, monkeypatch):
    """The real path, short: the demo SuperTransformer's fitness, real local measurements through
    the runner a board runs, the real default predictor, two rounds. The loop's statistical claims
    (it beats random search, meets the budget over seeds, corrects drift, calibrates) are tested on
    the simulated board (tests/test_sim.py): on this shared 2-core machine one real run per CI could
    only sample them, took 5-12 min and failed on noise."""
    from hat_edge.app.job import make_fitness
    from hat_edge.latency.store import LatencyStore

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    profile = fast_local_profile(tmp_path, demo_ckpt.model.cfg.vocab_size, min_time_s=0.2)
    store = LatencyStore(tmp_path / "latency.sqlite")
    dev = ProfileDevice(profile, store)
    fit = make_fitness(demo_ckpt, 20)

    from hat_edge.search.loop import measure_initial

    measured, init, _ = measure_initial(DEMO, dev, 10, seed=0, progress=False)
    budget = budget_from_measurements({a: measured[a] for a in init}, 40)
    ls = LoopSettings(budget_ms=budget, rounds=2, top_k=2, tolerance=0.03, initial=10, explore=1,
                      evolution=EvolutionSettings(population=16, parents=4, mutations=6, crossovers=6, iterations=4))
    res = run_loop(DEMO, fit, dev, ls, progress=False, initial=(measured, init))
    w = res.winner
    assert res.met
    assert w.measured_ms <= budget * 1.05
    assert store.get(profile.name, w.arch, profile.runtime, _settings(profile)) is not None
    assert 1 <= len(res.rounds) <= 2 and res.device_measurements >= 1
    assert all(c.measured_ms > 0 and c.predicted_ms > 0 for r in res.rounds for c in r.candidates)
    print(f"\nloop test: budget {budget:.1f} ms, winner measured {w.measured_ms:.1f} ms loss {w.loss:.4f}; "
          f"rounds {len(res.rounds)}; {time.perf_counter() - t0:.0f} s")


@pytest.mark.slow
def test_anchored_measurement_corrects_a_real_slowdown(tmp_path: Path, monkeypatch):
    """A real slowdown: the runner pinned to CPU 0, then a busy process pinned to the same CPU
    takes half of it. A candidate measured side by side with an anchor comes out on the scale of
    the anchor's earlier measurement: its ratio to the anchor is what it was when both were timed
    side by side before the slowdown. The raw runs stay in the store."""
    import multiprocessing as mp

    from hat_edge.devices.measure import measure_archs
    from hat_edge.latency.store import LatencyStore

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    profile = fast_local_profile(tmp_path, 4000, min_time_s=0.5).with_measurement(cpu_affinity=(0,))
    anchor, cand = DEMO.smallest(), DEMO.sample_n(1, seed=11)[0]
    before = {r.arch: r.median_ms for r in measure_archs(profile, [anchor, cand], LatencyStore(":memory:"),
                                                          progress=False, interleave=True)}
    dev = ProfileDevice(profile, LatencyStore(tmp_path / "latency.sqlite"))

    hog = mp.get_context("spawn").Process(target=_busy, args=(0,), daemon=True)
    hog.start()
    try:
        out, drift = dev.measure_anchored([cand], {anchor: before[anchor]}, progress=False)
    finally:
        hog.terminate()
        hog.join(10)
    print(f"\nanchored: drift {drift:.2f}; corrected {out[cand]:.2f} ms vs {before[cand]:.2f} ms before")
    assert drift > 1.4, drift  # the shared core really slowed the runner down
    raw = next(r for r in dev._records() if r.arch == cand)
    # The correction removes most of the slowdown (seen: 1.7-2.8x raw, 2-14% off corrected; the
    # rest is this shared machine's own noise between the two side-by-side measurements).
    err_raw, err = abs(raw.median_ms / before[cand] - 1), abs(out[cand] / before[cand] - 1)
    assert err < 0.25 * err_raw, (out[cand], raw.median_ms, before[cand], drift)
    assert raw.median_ms == pytest.approx(out[cand] * drift) and raw.env["drift_factor"] == pytest.approx(drift)
    assert dev.measured() == {cand: pytest.approx(out[cand])}  # the anchor's re-measurement is not stored
    # Nothing new to measure: no runner, no drift.
    assert dev.measure_anchored([cand], {anchor: before[anchor]}, progress=False) == (
        {cand: pytest.approx(out[cand])}, 1.0)


def test_initial_dataset_is_measured_side_by_side_in_anchored_groups(tmp_path: Path, monkeypatch):
    """measure_initial on a real local device: groups of at most `group` models timed in rotation;
    each later group re-times anchors of the first and stores its drift factor; a rerun measures
    nothing."""
    from hat_edge.latency.store import LatencyStore
    from hat_edge.search import loop as loop_mod

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    profile = fast_local_profile(tmp_path, 4000, min_time_s=0.2)
    dev = ProfileDevice(profile, LatencyStore(tmp_path / "latency.sqlite"))
    archs = initial_archs(DEMO, 6, seed=3)
    out = dev.measure_side_by_side(archs, progress=False, group=4, anchors=2)
    assert set(out) == set(archs) and all(v > 0 for v in out.values())
    recs = {r.arch: r for r in dev._records()}
    assert set(recs) == set(archs)  # the anchors' re-timing is not stored twice
    first, later = archs[:4], archs[4:]
    assert all("drift_factor" not in (recs[a].env or {}) for a in first)
    assert all(recs[a].env["drift_factor"] > 0 and len(recs[a].env["anchors"]) == 2 for a in later)
    assert dev.measured() == pytest.approx(out)
    # measure_initial uses it, and a rerun measures nothing new.
    measured, init, n_new = loop_mod.measure_initial(DEMO, dev, 6, seed=3, progress=False)
    assert n_new == 0 and init == archs and measured == pytest.approx(out)


def test_a_job_exports_each_arch_once_and_removes_only_the_exports_it_made(tmp_path: Path, monkeypatch):
    """The archs a job times again (a later group's anchors, a round's anchors, the final side by
    side) reuse the export made when they were first measured; closing the device removes the
    exports made since its first measurement, not one that was in the cache before."""
    import hat_edge.exporters as exporters
    from hat_edge.devices.measure import bundle_key, measure_archs
    from hat_edge.latency.store import LatencyStore

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "bundles"
    profile = fast_local_profile(tmp_path, 4000, min_time_s=0.05)
    archs = initial_archs(DEMO, 5, seed=5)
    old = DEMO.sample_n(1, seed=99)[0]
    assert old not in archs
    measure_archs(profile, [old], LatencyStore(":memory:"), progress=False, keep_exports=True)  # before the job
    exported: list = []
    real = exporters.export_bundle

    def counting(sub, *a, **k):
        exported.append(sub.arch)
        return real(sub, *a, **k)

    monkeypatch.setattr(exporters, "export_bundle", counting)
    dev = ProfileDevice(profile, LatencyStore(tmp_path / "latency.sqlite"))
    first = dev.measure_side_by_side(archs[:4], progress=False, group=3, anchors=2)  # group 2 re-times 2 anchors
    dev.measure_anchored([archs[4]], {a: first[a] for a in archs[:2]}, progress=False)
    pair = dev.time_together([archs[0], old])
    assert set(pair) == {archs[0], old} and all(v > 0 for v in pair.values())
    assert sorted(map(str, exported)) == sorted(map(str, archs))  # each once; `old` reused from before
    keys = {a: cache / bundle_key(a, profile) for a in [*archs, old]}
    assert all(d.is_dir() for d in keys.values())
    dev.close()
    assert not any(keys[a].exists() for a in archs) and keys[old].is_dir()


def _busy(cpu: int) -> None:
    import os

    os.sched_setaffinity(0, {cpu})
    while True:
        pass


def _settings(profile):
    return profile.measure_spec().identity()


class SmoothDevice(CliffDevice):
    """CliffDevice's cost model without the cliff: what a prior and a few measurements can learn."""

    name = "smooth"

    @staticmethod
    def latency(a: Arch) -> float:
        return a.flops() / 4e6 + 4.0 * a.decoder_layer_num + 0.01 * a.decoder_embed_dim


def test_with_a_prior_the_initial_dataset_is_informative_half_the_size_and_the_loop_as_good():
    """#16: with the packaged prior the loop measures the most informative archs first and stops
    the initial dataset once the predictor's cross-validated MAPE is <= 4%; the loop still meets
    the same budget with a winner as good as the one without a prior from twice the rows."""
    from hat_edge.latency.prior import packaged_prior
    from hat_edge.search.loop import informative_initial_archs, measure_initial

    prior = packaged_prior()
    order = informative_initial_archs(DEMO, 24, prior)
    assert order[:2] == [DEMO.smallest(), DEMO.largest()] and len(set(order)) == 24
    assert order == informative_initial_archs(DEMO, 24, prior)  # deterministic

    probe = SmoothDevice()
    logs: list[str] = []
    _, init, n_new = measure_initial(DEMO, probe, 24, prior=prior, step=4, cv_mape=4.0, progress=False,
                                     log=logs.append)
    assert init == order[: len(init)] and n_new == len(init) == len(probe.store)
    assert len(init) <= 12, (len(init), logs)
    assert any("archs suffice" in m for m in logs)
    # a rerun (as `hat-edge run` does before the loop) finds them stored and stops at the same place,
    # whatever else the store holds by then
    assert len(init) > 8  # more than one group: a stop decided on other rows would come earlier
    probe.measure([a for a in DEMO.sample_n(30, seed=5) if a not in probe.store][:12])
    _, again, n_again = measure_initial(DEMO, probe, 24, prior=prior, step=4, cv_mape=4.0, progress=False)
    assert again == init and n_again == 0

    budget = float(np.percentile([SmoothDevice.latency(a) for a in initial_archs(DEMO, 24, seed=0)], 40))
    results = {}
    for name, kw in (("none", {}), ("prior", {"prior": prior, "initial_step": 4})):
        dev = SmoothDevice()
        res = run_loop(DEMO, CachedFitness(capacity_loss), dev,
                       LoopSettings(budget_ms=budget, rounds=3, top_k=3, initial=24, evolution=TINY_EVO, **kw),
                       progress=False, log=lambda m: None)
        results[name] = (res, dev.calls[0])
    (plain, n_plain), (with_prior, n_prior) = results["none"], results["prior"]
    assert n_plain == 24 and n_prior <= n_plain // 2
    assert plain.met and with_prior.met and with_prior.winner.measured_ms <= budget * 1.03
    assert with_prior.winner.loss <= plain.winner.loss + 0.02, (with_prior.winner.loss, plain.winner.loss)


class TransientDevice(SmoothDevice):
    """SmoothDevice whose first measurements after the initial dataset run 15% slow (a passing
    load): the first round's picks miss, and the calibration then scales every later search up."""

    name = "transient"

    def measure(self, archs, progress=True):
        out = super().measure(archs, progress)
        if len(self.calls) == 2:  # the loop's first round
            out = {a: 1.15 * ms for a, ms in out.items()}
            self.store.update(out)
        return out


def test_a_winner_with_room_under_a_calibrated_search_gets_one_round_on_the_predictors_own_latencies():
    """After a passing slowdown inflates the calibration, the search's winner meets the budget with
    room to spare; the loop then runs one more round without the calibration, which measures a pick
    closer to the budget, and stops there."""
    init = initial_archs(DEMO, 20, seed=0)
    budget = float(np.percentile([SmoothDevice.latency(a) for a in init], 60))
    dev = TransientDevice()
    logs: list[str] = []
    res = run_loop(DEMO, CachedFitness(capacity_loss), dev,
                   LoopSettings(budget_ms=budget, rounds=4, top_k=2, initial=20, explore=0, evolution=TINY_EVO),
                   progress=False, log=logs.append)
    cal = [r.calibration for r in res.rounds]
    assert cal[1] > 1.1, cal
    assert any("one more round on the predictor's own latencies" in m for m in logs), logs
    last, before = res.rounds[-1], res.rounds[-2]
    assert last.calibration == 1.0 and before.calibration > 1.03 and before.met, cal
    assert before.candidates[0].measured_ms < budget * 0.97
    assert last.candidates[0].measured_ms > before.candidates[0].measured_ms  # closer to the budget
    assert res.met and res.winner.measured_ms <= budget * 1.03
    earlier = min(c.loss for r in res.rounds[:-1] for c in r.candidates if c.measured_ms <= budget * 1.03)
    assert res.winner.round == last.round and res.winner.loss < earlier  # the extra round found the winner


def test_the_loop_starts_from_an_initial_dataset_just_measured_without_measuring_or_fitting_it_again():
    """`hat-edge run` measures the initial dataset before it sets the budget; handed to the loop, it
    is neither measured nor re-decided there (no second round of early-stop fits and log lines)."""
    from hat_edge.latency.prior import packaged_prior
    from hat_edge.search.loop import measure_initial

    prior = packaged_prior()
    dev = SmoothDevice()
    first: list[str] = []
    measured, init, n_new = measure_initial(DEMO, dev, 24, prior=prior, step=4, progress=False, log=first.append)
    assert n_new == len(init) and any("initial dataset" in m for m in first)
    calls_before = len(dev.calls)
    budget = float(np.percentile([SmoothDevice.latency(a) for a in init], 40))
    logs: list[str] = []
    res = run_loop(DEMO, CachedFitness(capacity_loss), dev,
                   LoopSettings(budget_ms=budget, rounds=2, top_k=2, initial=24, evolution=TINY_EVO, prior=prior,
                                initial_step=4),
                   progress=False, log=logs.append, initial=(measured, init))
    assert res.initial == tuple(init)
    assert not [m for m in logs if "initial dataset" in m or "informative SubTransformers" in m], logs
    assert sum(dev.calls[calls_before:]) == res.device_measurements  # only the loop's own picks
    assert res.met


def test_default_budget_is_a_share_of_the_space_whichever_archs_were_measured():
    """`hat-edge run`'s default budget is a percentile of the space's predicted latency: from 24
    random archs or from a prior's 12 informative ones (the space's extremes) it lands near the true
    40th percentile of the space, so runs with and without a prior get budgets of the same meaning."""
    from hat_edge.latency.prior import packaged_prior
    from hat_edge.search.loop import budget_from_space, informative_initial_archs

    true = float(np.percentile([SmoothDevice.latency(a) for a in DEMO.sample_n(1000, seed=7)], 40))
    prior = packaged_prior()
    for archs, with_prior in ((initial_archs(DEMO, 24, seed=0), None),
                              (informative_initial_archs(DEMO, 12, prior), prior)):
        dev = SmoothDevice()
        got = budget_from_space(DEMO, dev, dev.measure(archs), 40, with_prior)
        assert abs(got / true - 1) < 0.05, (got, true, with_prior is not None)
    with pytest.raises(UserError, match="pass --budget"):
        budget_from_space(DEMO, SmoothDevice(), {}, 40)


def test_int8_device_measures_and_reads_int8_latencies(tmp_path: Path, monkeypatch):
    """`hat-edge run --quantize int8`'s device: the archs are measured as int8 bundles (the store
    keys rows by quantisation), and what the loop reads back (`measured`) is those int8 rows only;
    an fp32 device on the same store sees none of them."""
    from hat_edge.latency.store import LatencyStore

    monkeypatch.setenv("HAT_EDGE_CACHE", str(tmp_path / "cache"))
    profile = fast_local_profile(tmp_path, 64, min_time_s=0.05)
    store = LatencyStore(tmp_path / "latency.sqlite")
    archs = [DEMO.smallest(), DEMO.largest()]
    q = ProfileDevice(profile, store, quantize="int8")
    got = q.measure(archs, progress=False)
    assert set(got) == set(archs) and all(v > 0 for v in got.values())
    int8_rows = store.records(device=profile.name, runtime=profile.runtime,
                              settings=profile.measure_spec("int8").identity())
    assert {r.arch for r in int8_rows} == set(archs)
    assert not store.records(device=profile.name, runtime=profile.runtime,
                             settings=profile.measure_spec().identity())
    assert q.measured() == got
    assert ProfileDevice(profile, store).measured() == {}
