"""Evolutionary search on real SearchSpaces with synthetic fitness and latency.

The fitness and latency here are synthetic functions of the arch (not mocks of a peer room): they
let the tests know the true optimum, which a trained SuperTransformer cannot tell us.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from hat_edge.errors import UserError
from hat_edge.search.evolution import (
    CachedFitness,
    Constraints,
    EvolutionSettings,
    check_constraints,
    dominates,
    estimate_memory_mb,
    evolution_search,
    hypervolume,
    pareto_front,
    random_search,
)
from hat_edge.space import PRESETS, Arch, SearchSpace

DEMO = PRESETS["demo"]

# A space small enough to enumerate (1,512 archs), so the constrained optimum is known exactly.
TINY = SearchSpace(
    name="tiny",
    encoder_embed_choice=(128, 64),
    decoder_embed_choice=(128, 64),
    encoder_ffn_embed_dim_choice=(512, 256, 128),
    decoder_ffn_embed_dim_choice=(512, 256, 128),
    encoder_layer_num_choice=(2,),
    decoder_layer_num_choice=(2, 1),
    encoder_self_attention_heads_choice=(4,),
    decoder_self_attention_heads_choice=(4,),
    decoder_ende_attention_heads_choice=(4,),
    decoder_arbitrary_ende_attn_choice=(-1, 1),
    qkv_dim=128,
)


def enumerate_space(sp: SearchSpace) -> list[Arch]:
    out = []
    for e, d, n_dec in itertools.product(sp.encoder_embed_choice, sp.decoder_embed_choice, sp.decoder_layer_num_choice):
        n_enc = sp.encoder_layer_num_choice[0]
        for eff in itertools.product(sp.encoder_ffn_embed_dim_choice, repeat=n_enc):
            for dff in itertools.product(sp.decoder_ffn_embed_dim_choice, repeat=n_dec):
                for ende in itertools.product(sp.decoder_arbitrary_ende_attn_choice, repeat=n_dec):
                    out.append(
                        Arch(e, d, n_enc, n_dec, eff, (4,) * n_enc, dff, (4,) * n_dec, (4,) * n_dec, ende, sp.qkv_dim)
                    )
    return out


def flops_latency(archs):
    """Synthetic latency in ms: proportional to FLOPs plus a per-decoder-layer cost."""
    return [a.flops() / 2e6 + 3.0 * a.decoder_layer_num for a in archs]


def capacity_loss(a: Arch) -> float:
    """Lower with more capacity, with diminishing returns and a preference for deep decoders and
    wide FFNs that is not simply latency (so the constrained optimum is not just 'the slowest')."""
    f = a.features()
    return (
        5.0
        - 0.8 * math.log(f[0]) * 0.3
        - 0.4 * math.log(f[4])
        - 0.25 * math.log(f[2])
        - 0.35 * math.log(f[6])
        - 0.15 * a.decoder_layer_num
        - 0.05 * f[9]
        # Small position-dependent terms: no two archs tie (the averages above ignore layer order).
        - 0.002 * sum((i + 1) * v / 512 for i, v in enumerate(a.encoder_ffn_embed_dim + a.decoder_ffn_embed_dim))
        - 0.001 * sum((i + 1) * a.ende_layers(i) for i in range(a.decoder_layer_num))
    )


def test_tiny_space_enumerates_to_its_size():
    assert len(set(enumerate_space(TINY))) == TINY.size() == 1512


def test_finds_the_known_constrained_optimum_and_respects_the_budget():
    archs = enumerate_space(TINY)
    lat = dict(zip(archs, flops_latency(archs)))
    budget = float(np.percentile(list(lat.values()), 40))
    feasible = [a for a in archs if lat[a] <= budget]
    optimum, runner_up = sorted(feasible, key=capacity_loss)[:2]
    assert capacity_loss(optimum) < capacity_loss(runner_up)  # one true optimum
    unconstrained = min(archs, key=capacity_loss)
    assert lat[unconstrained] > budget  # the constraint binds: the answer is not the free optimum

    fit = CachedFitness(capacity_loss)
    res = evolution_search(
        TINY, fit, flops_latency, Constraints(latency_ms=budget),
        EvolutionSettings(population=30, parents=8, mutations=11, crossovers=11, iterations=12, seed=1),
    )
    assert res.best.arch == optimum
    assert res.best.latency_ms <= budget
    # Every arch the search evaluated satisfies the budget; evaluations are counted exactly.
    assert all(c.latency_ms <= budget for c in res.evaluated)
    assert res.evaluations == len(res.evaluated) == fit.calls
    assert res.evaluations <= EvolutionSettings(30, 8, 11, 0.3, 11, 12).evaluations_upper_bound()
    # Fewer evaluations than exhaustive enumeration of the feasible set.
    assert res.evaluations < len(feasible)
    # History: best-so-far never gets worse and ends at the optimum.
    best = [h.best_loss for h in res.history]
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:]))
    assert best[-1] == pytest.approx(capacity_loss(optimum))
    assert [h.iteration for h in res.history] == list(range(12))


def test_finds_a_target_at_the_budget_edge_in_the_demo_space():
    # Loss = genes differing from a target arch whose latency is exactly the budget; the optimum
    # is the target (loss 0) and most of its large neighbours are over the budget.
    target = Arch(256, 256, 3, 3, (768, 512, 768), (4, 2, 4), (768, 768, 512), (4, 4, 2), (2, 4, 4), (2, 1, -1), 256)
    DEMO.validate(target)
    budget = flops_latency([target])[0]

    def loss(a: Arch) -> float:
        ga, gt = a.to_dict(), target.to_dict()
        d = 0.0
        for k, v in gt.items():
            w = ga[k]
            if isinstance(v, list):
                d += sum(x != y for x, y in itertools.zip_longest(w, v))
            else:
                d += w != v
        return d

    res = evolution_search(DEMO, loss, flops_latency, Constraints(latency_ms=budget), EvolutionSettings(seed=0))
    assert res.best.arch == target
    assert res.best.loss == 0.0
    assert max(c.latency_ms for c in res.evaluated) <= budget


def test_deterministic_with_a_seed_and_different_across_seeds():
    s = EvolutionSettings(population=20, parents=5, mutations=8, crossovers=7, iterations=5, seed=3)
    budget = float(np.median(flops_latency(DEMO.sample_n(200, seed=1))))
    r1 = evolution_search(DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget), s)
    r2 = evolution_search(DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget), s)
    assert [c.arch for c in r1.evaluated] == [c.arch for c in r2.evaluated]
    assert r1.history == r2.history
    r3 = evolution_search(
        DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget),
        EvolutionSettings(population=20, parents=5, mutations=8, crossovers=7, iterations=5, seed=4),
    )
    assert [c.arch for c in r3.evaluated] != [c.arch for c in r1.evaluated]


def test_population_shape_follows_the_settings():
    s = EvolutionSettings(population=20, parents=5, mutations=8, crossovers=6, iterations=3, seed=0)
    res = evolution_search(DEMO, capacity_loss, flops_latency, Constraints(latency_ms=1e9), s)
    assert [h.population for h in res.history] == [20, 19, 19]
    assert len(res.population) == 19
    assert len({c.arch for c in res.population}) == 19  # children are distinct


def test_pareto_mode_returns_a_non_dominated_front():
    budget = float(np.percentile(flops_latency(DEMO.sample_n(300, seed=2)), 70))
    res = evolution_search(
        DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget),
        EvolutionSettings(population=30, parents=10, mutations=10, crossovers=10, iterations=6, seed=0),
        pareto=True,
    )
    front = list(res.front)
    assert res.method == "pareto" and len(front) >= 5
    for a in front:
        assert not any(dominates(b, a) for b in res.evaluated), a
    # Sorted by latency with strictly decreasing loss: a trade-off curve.
    lat = [c.latency_ms for c in front]
    loss = [c.loss for c in front]
    assert lat == sorted(lat) and all(l2 < l1 for l1, l2 in zip(loss, loss[1:]))
    assert res.best.loss == min(loss)
    # Pareto ranking pushes the whole front, not only its low-loss end: it dominates more of the
    # (loss, latency) plane than the loss-only search with the same settings and seed.
    plain = evolution_search(
        DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget),
        EvolutionSettings(population=30, parents=10, mutations=10, crossovers=10, iterations=6, seed=0),
    )
    assert hypervolume(res.front, 5.0, budget) > hypervolume(plain.front, 5.0, budget)


def test_pareto_front_helper():
    a = DEMO.sample_n(4, seed=0)
    from hat_edge.search.evolution import Candidate

    c = [
        Candidate(a[0], 1.0, 10.0, 1),
        Candidate(a[1], 2.0, 5.0, 1),
        Candidate(a[2], 2.5, 6.0, 1),  # dominated by a[1]
        Candidate(a[3], 0.5, 20.0, 1),
    ]
    assert [x.arch for x in pareto_front(c)] == [a[1], a[0], a[3]]


def test_budget_below_the_fastest_subtransformer_is_a_clear_error():
    fastest = flops_latency([DEMO.smallest()])[0]
    calls = CachedFitness(capacity_loss)
    with pytest.raises(UserError) as e:
        evolution_search(DEMO, calls, flops_latency, Constraints(latency_ms=fastest * 0.9))
    msg = str(e.value)
    assert "below the fastest SubTransformer" in msg and f"{fastest:.2f} ms" in msg and "\n" not in msg
    assert calls.calls == 0  # raised before any fitness evaluation
    # At exactly the fastest latency the search runs and returns an arch that fast (heads do not
    # change FLOPs, so several archs share the smallest latency).
    res = evolution_search(
        DEMO, capacity_loss, flops_latency, Constraints(latency_ms=fastest),
        EvolutionSettings(population=10, parents=3, mutations=4, crossovers=3, iterations=2),
    )
    assert res.best.latency_ms == pytest.approx(fastest)
    assert res.best.arch.features()[0:3] == DEMO.smallest().features()[0:3]


def test_params_and_memory_constraints():
    max_params = int(np.median([a.params() for a in DEMO.sample_n(200, seed=5)]))
    mem = lambda a: estimate_memory_mb(a, vocab_size=8000)  # noqa: E731
    max_mem = float(np.median([mem(a) for a in DEMO.sample_n(200, seed=6)]))
    res = evolution_search(
        DEMO, capacity_loss, flops_latency,
        Constraints(latency_ms=1e9, max_params=max_params, max_memory_mb=max_mem),
        EvolutionSettings(population=20, parents=5, mutations=8, crossovers=7, iterations=4),
        memory_fn=mem,
    )
    assert all(c.params <= max_params and c.memory_mb <= max_mem for c in res.evaluated)
    with pytest.raises(UserError, match="params limit"):
        check_constraints(DEMO, flops_latency, Constraints(max_params=1000))
    with pytest.raises(UserError, match="memory"):
        evolution_search(DEMO, capacity_loss, flops_latency, Constraints(max_memory_mb=10.0))


def test_memory_estimate_grows_with_the_model():
    small, large = DEMO.smallest(), DEMO.largest()
    assert 0 < estimate_memory_mb(small, 8000) < estimate_memory_mb(large, 8000)
    # Weights alone: fp32 params + one shared 8000 x 256 embedding table.
    w = (large.params() + 8000 * 256) * 4 / 2**20
    assert w < estimate_memory_mb(large, 8000) < 1.5 * w


def test_random_search_at_equal_evaluations_is_a_weaker_baseline():
    budget = float(np.percentile(flops_latency(DEMO.sample_n(300, seed=2)), 40))
    s = EvolutionSettings(population=30, parents=8, mutations=11, crossovers=11, iterations=8, seed=0)
    evo = evolution_search(DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget), s)
    rnd = random_search(DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget), evo.evaluations, seed=0)
    assert rnd.evaluations == evo.evaluations
    assert all(c.latency_ms <= budget for c in rnd.evaluated)
    assert evo.best.loss < rnd.best.loss


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="parents"):
        EvolutionSettings(population=10, parents=20)
    with pytest.raises(UserError, match="mutation_prob"):
        EvolutionSettings(mutation_prob=1.5)
    with pytest.raises(UserError, match="latency_ms"):
        Constraints(latency_ms=-1)
    with pytest.raises(UserError, match="needs a latency predictor"):
        evolution_search(DEMO, capacity_loss, None, Constraints(latency_ms=10.0))


def test_result_serialises_with_a_version():
    res = evolution_search(
        DEMO, capacity_loss, flops_latency, Constraints(latency_ms=1e9),
        EvolutionSettings(population=6, parents=2, mutations=2, crossovers=2, iterations=2),
    )
    d = res.to_dict()
    assert d["format"] == "hat-edge-search" and d["version"] == 1
    assert Arch.from_dict(d["best"]["arch"]) == res.best.arch
    import json

    json.dumps(d)


def test_seeds_start_the_search_when_feasible():
    budget = float(np.percentile(flops_latency(DEMO.sample_n(300, seed=2)), 50))
    feasible = [a for a in DEMO.sample_n(200, seed=8) if flops_latency([a])[0] <= budget]
    good = min(feasible, key=capacity_loss)
    too_slow = DEMO.largest()
    s = EvolutionSettings(population=10, parents=3, mutations=3, crossovers=3, iterations=2, seed=0)
    res = evolution_search(DEMO, capacity_loss, flops_latency, Constraints(latency_ms=budget), s,
                           seeds=[good, too_slow])
    first = [c.arch for c in res.evaluated[:10]]
    assert good in first and too_slow not in {c.arch for c in res.evaluated}
    assert res.best.loss <= capacity_loss(good)


# ------------------------------------------------------------------------------------------------
# The `hat-edge search` command: the demo checkpoint's loss, a saved predictor's latency
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flops_predictor(tmp_path_factory):
    """A real default predictor, fitted on synthetic (FLOPs-based) latencies of 30 demo archs."""
    from hat_edge.latency.predictor import make_predictor

    archs = DEMO.sample_n(30, seed=4) + [DEMO.smallest(), DEMO.largest()]
    pred = make_predictor("default").fit(archs, flops_latency(archs), device="synthetic")
    return pred.save(tmp_path_factory.mktemp("pred") / "pred.json"), pred


@pytest.mark.slow
def test_search_command_with_a_saved_predictor(tmp_path, flops_predictor):
    from click.testing import CliRunner

    from hat_edge.cli import cli

    path, pred = flops_predictor
    budget = float(np.median(pred.predict(DEMO.sample_n(100, seed=1))))
    out = tmp_path / "winner.yml"
    small = ["--search-size", "population=8,parents=3,mutations=3,crossovers=2,iterations=2",
             "--valid-sentences", "20", "--no-progress"]
    r = CliRunner().invoke(cli, ["search", "--predictor", str(path), "--budget", f"{budget:.3f}", *small,
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output.strip().splitlines()[-1])
    assert d["predicted_latency_ms"] <= budget and d["budget_ms"] == pytest.approx(budget, abs=1e-3)
    assert d["loss"] > 0 and d["evaluations"] <= 8 + 5
    assert Arch.load(out) == Arch.from_dict(d["arch"])

    fastest = float(min(pred.predict([DEMO.smallest()] + DEMO.sample_n(1000, seed=7919))))
    r = CliRunner().invoke(cli, ["search", "--predictor", str(path), "--budget", f"{fastest * 0.5:.3f}", *small])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "below the fastest SubTransformer" in lines[0] and "predicted" in lines[0]


def test_search_command_argument_errors():
    from click.testing import CliRunner

    from hat_edge.cli import cli

    r = CliRunner().invoke(cli, ["search", "--profile", "local-cpu"])
    assert r.exit_code != 0 and "--budget" in r.output
    r = CliRunner().invoke(cli, ["search", "--budget", "10"])
    assert r.exit_code != 0 and "--predictor" in r.output


def test_round_line_says_which_arch_won_and_why() -> None:
    """`run`'s screen: one line per round naming the pick (size, shape, loss, why), the device's
    verdict in budget words, and the best arch measured within the budget so far."""
    import dataclasses

    from hat_edge.search.loop import Measured, RoundReport, arch_tag, round_line
    from hat_edge.space import arch_id

    space = PRESETS["demo"]
    small, big = space.smallest(), space.largest()

    def meas(arch: Arch, loss: float, ms: float, rnd: int, kind: str = "exploit") -> Measured:
        return Measured(arch=arch, loss=loss, predicted_ms=10.0, predicted_lo_ms=9.0, predicted_hi_ms=11.0,
                        measured_ms=ms, round=rnd, kind=kind)

    def report(rnd: int, pick: Measured, met: bool) -> RoundReport:
        return RoundReport(round=rnd, fitted_on=26, evaluations=273, search_ms=1.0, measure_ms=1.0,
                           best_loss=pick.loss, best_predicted_ms=10.0, candidates=(pick,), met=met)

    # Round 1 meets the budget with a slight overshoot: the words say so (not "within budget").
    p1 = meas(small, 2.73, 10.58, 1)
    line1 = round_line(report(1, p1, True), p1, 10.4, 0.03)
    assert line1.startswith(f"round 1: pick {arch_tag(small)} (lowest loss 2.7300 of 273 archs searched")
    assert "over by 1.7% (within the 3% tolerance) -> met; the best pick so far" in line1
    assert "\n" not in line1

    # Round 2's pick misses: the line says so, and names the arch `run` will report instead.
    p2 = meas(big, 2.60, 14.0, 2)
    line2 = round_line(report(2, p2, False), p1, 10.4, 0.03)
    assert "BUDGET NOT MET: over by 34.6% (tolerance 3%) -> missed" in line2
    assert line2.endswith(f"the best pick so far (within the budget): round 1's exploit pick, {arch_tag(small)}, "
                          "loss 2.7300, measured 10.58 ms")
    # An arch from the initial dataset with a lower loss: named as such.
    early = meas(small, 2.50, 10.0, 0, kind="measured")
    assert "the best pick so far (lower loss): the earlier measurements," in round_line(report(2, p2, False), early, 10.4, 0.03)
    assert round_line(report(1, p2, False), None, 10.4, 0.03).endswith("no search pick has measured within the budget yet")
    assert arch_tag(big).startswith(f"{arch_id(big)} ({big.params() / 1e6:.2f}M params, enc {big.encoder_embed_dim}x")
    # two archs of one size and shape are told apart by their ids
    twin = dataclasses.replace(big, encoder_ffn_embed_dim=(small.encoder_ffn_embed_dim[0],) * big.encoder_layer_num)
    assert arch_tag(twin) != arch_tag(big) and len(arch_id(big)) == 8


# ------------------------------------------------------------------------------------------------
# Validation losses kept across runs (search.fitness_store)
# ------------------------------------------------------------------------------------------------
def test_a_second_fitness_reads_the_stored_losses_and_a_new_fingerprint_computes(tmp_path):
    from hat_edge.search.fitness_store import FitnessStore

    archs = DEMO.sample_n(4, seed=1)
    seen: list[Arch] = []

    def loss(a: Arch) -> float:
        seen.append(a)
        return 2.0 + a.encoder_embed_dim / 1000

    store = FitnessStore(tmp_path / "fitness.sqlite")
    first = CachedFitness(loss, persist=store.bind("f1"))
    values = [first(a) for a in archs + archs[:1]]
    assert first.calls == 4 and first.reused == 0 and len(seen) == 4 and store.count("f1") == 4
    store.close()
    again = FitnessStore(tmp_path / "fitness.sqlite")  # a rerun: a new process, the same file
    second = CachedFitness(loss, persist=again.bind("f1"))
    assert [second(a) for a in archs] == values[:4] and second.calls == 0 and second.reused == 4 and len(seen) == 4
    other = CachedFitness(loss, persist=again.bind("f2"))  # other weights or sentences: nothing to read
    other(archs[0])
    assert other.calls == 1 and other.reused == 0 and len(seen) == 5
    # a value written into the file by hand is not a loss: computed again
    db = again._db
    for bad in ("'x'", "-1.0", "9e999"):
        db.execute(f"UPDATE fitness SET loss = {bad} WHERE fingerprint = 'f1'")
        db.commit()
        fresh = CachedFitness(loss, persist=again.bind("f1"))
        assert fresh(archs[1]) == values[1] and fresh.calls == 1, bad
    again.close()


def test_a_linked_foreign_or_damaged_fitness_file_is_refused_in_one_line(tmp_path):
    import sqlite3

    from hat_edge.search.fitness_store import FitnessStore

    target = tmp_path / "elsewhere.sqlite"
    FitnessStore(target).close()
    link = tmp_path / "link.sqlite"
    link.symlink_to(target)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE t (x)")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    for path, words in ((link, "symbolic link"), (foreign, "not a hat-edge fitness cache"),
                        (junk, "not a hat-edge fitness cache")):
        before = path.read_bytes() if not path.is_symlink() else None
        with pytest.raises(UserError) as e:
            FitnessStore(path)
        msg = str(e.value)
        assert str(path) in msg and words in msg and "\n" not in msg, msg
        if before is not None:
            assert path.read_bytes() == before  # left unchanged


def test_the_validation_loss_fingerprint_follows_the_weights_and_the_sentences():
    import torch

    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.evaluate import ValidLoss

    ck = load_checkpoint("demo")
    a, b = ValidLoss(ck, max_sentences=8), ValidLoss(ck, max_sentences=8)
    fa = a.fingerprint()
    assert fa == b.fingerprint() and len(fa) == 64
    assert ValidLoss(ck, max_sentences=9).fingerprint() != fa
    w = next(iter(ck.model.parameters()))
    with torch.no_grad():
        w.view(-1)[0] += 1e-3
    try:
        assert ValidLoss(ck, max_sentences=8).fingerprint() != fa
    finally:
        with torch.no_grad():
            w.view(-1)[0] -= 1e-3
