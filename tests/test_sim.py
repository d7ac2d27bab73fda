"""The loop's statistical claims on a simulated board (hat_edge/devices/sim.py), deterministically.

The simulated board is HAT's Raspberry Pi 4 as a known function of the arch (the cost model
fitted on all 2,000 rows of HAT's Pi file) with seeded timing noise, per-arch deviations, a
slowdown part-way and (for calibration) a memory cliff. The claims the slow real-device test
could only sample once per CI run (and which failed there on noise) are checked here over several
seeds in a few seconds: the loop meets the budget, beats random search at the same number of
measurements, corrects the board's drift, and calibrates its searches after misses. The real
device keeps one short loop test (test_loop.py) and one end-to-end run (test_app.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from shared_data import HAT_LATENCY
from test_loop import TINY_EVO, capacity_loss

from hat_edge.devices.sim import SIM_NOTE, SimDevice, SimSettings
from hat_edge.errors import UserError
from hat_edge.search.evolution import CachedFitness
from hat_edge.search.loop import LoopSettings, initial_archs, run_loop
from hat_edge.space import PRESETS

HAT = PRESETS["hat-wmt"]
SEEDS = range(6)
DRIFTING = dict(noise=0.02, bias=0.05, drift=1.2, drift_after=20)  # 20% slower once the initial dataset is in


def test_the_simulated_pi_is_hats_measured_pi() -> None:
    """Noise-free, the simulated board's latency of HAT's own 2,000 SubTransformers is within 10% of
    what HAT measured on its Pi for at least 90% of them (its cost model was fitted on those rows)."""
    from hat_edge.latency.features import cost_terms, read_latency_csv

    data = read_latency_csv(HAT_LATENCY / "wmt14ende_cpu_raspberrypi_all.csv")
    sim = SimDevice("hat-pi4", SimSettings(noise=0.0, bias=0.0))
    enc, dec = cost_terms(data.features)  # HAT's file has the 10 averaged features, not per-layer archs
    pred = enc @ np.asarray(sim.cost.encoder) + dec @ np.asarray(sim.cost.decoder)
    err = np.abs(pred / np.asarray(data.latency_ms) - 1)
    assert (err < 0.10).mean() >= 0.90, (err < 0.10).mean()
    a = HAT.largest()  # a uniform arch: its averaged features are exact
    assert sim.true_ms(a) == pytest.approx(float(np.dot(cost_terms(np.array([a.features()]))[0][0], sim.cost.encoder)
                                                 + np.dot(cost_terms(np.array([a.features()]))[1][0], sim.cost.decoder)))
    assert sim.check()["simulated"] is True and sim.check()["rows"] == 2000


def test_the_simulated_board_is_seeded_noisy_biased_and_drifts() -> None:
    archs = HAT.sample_n(30, seed=0)
    a = SimDevice("hat-pi4", SimSettings(**DRIFTING, seed=3))
    b = SimDevice("sim:hat-pi4", SimSettings(**DRIFTING, seed=3))
    assert a.measure(archs) == b.measure(archs)  # the same seed, the same timings
    ratio = np.array([a.measured()[x] / a.true_ms(x) for x in archs])
    assert 0.005 < np.std(np.log(ratio)) < 0.05  # timing noise, around the arch's own (biased) latency
    dev = np.array([np.log(a.true_ms(x) / sum(a.cost_model_ms(x))) for x in archs])
    assert 0.02 < np.std(dev) < 0.1  # the persistent per-arch deviation no cost model learns
    # after the drift: a plain measurement is 20% slow, an anchored one is corrected
    new = HAT.sample_n(40, seed=1)[30:34]
    raw = SimDevice("hat-pi4", SimSettings(**DRIFTING, seed=3))
    raw.timings = 1000
    slow = raw.measure(new)
    fixed, drift = a.measure_anchored(new, {x: a.measured()[x] for x in archs[:3]})
    assert 1.12 < drift < 1.28
    assert all(abs(fixed[x] / a.true_ms(x) - 1) < 0.08 for x in new)
    assert all(slow[x] / a.true_ms(x) > 1.1 for x in new)
    with pytest.raises(UserError, match="allowed: sim:hat-pi4, sim:hat-xeon, sim:hat-titanxp"):
        SimDevice("sim:jetson")
    with pytest.raises(UserError, match="field 'drift'"):
        SimSettings(drift=0.0)


def _loop(seed: int, **sim):
    init = initial_archs(HAT, 20, seed=seed)
    truth = SimDevice("hat-pi4", SimSettings(**{**sim, "noise": 0.0, "drift": 1.0}, seed=seed))
    budget = float(np.percentile([truth.true_ms(a) for a in init], 40))
    dev = SimDevice("hat-pi4", SimSettings(**sim, seed=seed))
    res = run_loop(HAT, CachedFitness(capacity_loss), dev,
                   LoopSettings(budget_ms=budget, rounds=4, top_k=2, initial=20, evolution=TINY_EVO, seed=seed),
                   progress=False, log=lambda m: None)
    return res, dev, truth, budget


@pytest.mark.parametrize("seed", SEEDS)
def test_on_a_drifting_board_the_loop_meets_the_budget_and_beats_random(seed: int) -> None:
    """Meets: the winner's true latency (the undrifted board's, without noise) is within the budget
    (+3% tolerance, +5% for the timing noise of it and its anchors). Beats random: no random
    SubTransformer among as many as the loop measured has a lower loss within the budget. Both need
    the drift correction: without it every candidate after the slowdown reads 20% slow, and the
    loop settles far under the budget on a small model (seen: 0.70-0.99 of the budget, and the
    random baseline better in 6 of 6 seeds)."""
    res, dev, truth, budget = _loop(seed, **DRIFTING)
    w = res.winner
    assert res.met
    assert 0.85 * budget <= truth.true_ms(w.arch) <= 1.08 * budget, truth.true_ms(w.arch) / budget
    n = 20 + res.device_measurements
    rand = HAT.sample_n(400, seed=100 + seed)[:n]
    under = [a for a in rand if truth.true_ms(a) <= budget * 1.03]
    assert under and w.loss <= min(capacity_loss(a) for a in under)
    # the slowdown was seen and corrected in the rounds' anchored measurements
    assert any(abs(r.drift - 1.2) < 0.08 for r in res.rounds), [r.drift for r in res.rounds]


def test_after_picks_that_measured_over_their_predictions_the_next_search_is_scaled_up() -> None:
    """A memory cliff (archs over 34 M params run 25% slower) that the smooth predictor does not see:
    the searches' picks cross it and measure over their predictions (the winner's curse). Each
    later round scales its predictions by the geometric mean of those misses (measured / the
    predictor's own prediction, clipped to [0.67, 1.5]); the scale is visible in the candidates'
    predictions, and above 1.05 after the misses in most seeds."""
    cliff = dict(DRIFTING, cliff=1.25, cliff_params=34_000_000)
    scaled = 0
    for seed in SEEDS:
        res, dev, truth, budget = _loop(seed, **cliff)
        assert res.met
        for k, r in enumerate(res.rounds):
            ratios = [c.measured_ms * rr.calibration / c.predicted_ms for rr in res.rounds[:k] for c in rr.candidates
                      if c.kind == "exploit" and c.new]
            want = float(np.clip(np.exp(np.mean(np.log(ratios))), 0.67, 1.5)) if ratios else 1.0
            if r.calibration != 1.0 or k == 0:
                assert r.calibration == pytest.approx(want), (seed, k)
            scaled += r.calibration > 1.05
    assert scaled >= 4, scaled


def test_loop_cli_on_the_simulated_pi_says_it_is_simulated(tmp_path) -> None:
    from hat_edge.cli import cli

    r = CliRunner().invoke(cli, ["loop", "--profile", "sim:hat-pi4", "--budget", "2500", "--search-size", "quick",
                                 "--rounds", "1", "--initial", "8", "--valid-sentences", "20", "--no-progress",
                                 "--out", str(tmp_path / "w.yml")])
    assert r.exit_code in (0, 1), r.output
    assert SIM_NOTE in r.output and "sim:hat-pi4" in r.output and (tmp_path / "w.yml").exists()
