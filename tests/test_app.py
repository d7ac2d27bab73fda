"""The application layer (`hat_edge/app/`): deploy and the main job (`hat-edge run`).

Moved from test_loop.py with hat_edge/search/{deploy,mainjob,report}.py; the assertions are the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from local_device import fast_local_profile  # noqa: E402  (tests/ helper)

from hat_edge.errors import UserError
from hat_edge.search.evolution import EvolutionSettings
from hat_edge.space import PRESETS

DEMO = PRESETS["demo"]
# The main job's search, cut to ~30 fitness evaluations (12 x 4: ~55, 24 x 6: 114): the tests check
# the job's steps and outputs, not the search's quality (tests/test_sim.py and test_loop.py do).
TINY_EVO = EvolutionSettings(population=8, parents=3, mutations=3, crossovers=2, iterations=3, seed=0)


# ------------------------------------------------------------------------------------------------
# deploy: a real bundle through the local transport
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_deploy_pushes_once_verifies_and_benchmarks_on_the_device(tmp_path: Path):
    """Random weights (no checkpoint needed): export, deploy twice (the second sends nothing),
    repair a file corrupted on the device, and refuse a bundle tampered on the host."""
    from hat_edge.app.deploy import deploy, render_deploy
    from hat_edge.exporters import export_bundle
    from hat_edge.model import SubTransformer

    arch = DEMO.sample_n(1, seed=5)[0]
    bundle = export_bundle(SubTransformer.random(arch, 500, seed=0), tmp_path / "bundle", fmt="onnx",
                           exporter="torchscript")
    profile = fast_local_profile(tmp_path, 500)
    r1 = deploy(profile, bundle=bundle, log=lambda m: None)
    assert r1.ok and r1.hashes_ok and r1.parity
    assert r1.files_sent == r1.files_total >= 3
    assert len(r1.translations) == 3 and all(t.host_equal for t in r1.translations)
    assert r1.bench["median_ms"] > 0 and len(r1.bench["runs"]) >= 5
    assert r1.arch == arch and str(tmp_path / "work") in r1.remote_dir
    assert "benchmark" in render_deploy(r1)

    env = dict(r1.env)
    r2 = deploy(profile, bundle=bundle, env=env, benchmark=False, log=lambda m: None)
    assert r2.files_sent == 0 and r2.files_skipped == r1.files_total and r2.ok
    assert r2.bench == {}

    # A file corrupted on the device is detected by its hash and sent again.
    graph = next(p for p in Path(r1.remote_dir).iterdir() if p.suffix == ".onnx")
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    r3 = deploy(profile, bundle=bundle, env=env, benchmark=False, log=lambda m: None)
    assert r3.files_sent == 1 and r3.ok

    # A bundle tampered with on the host never leaves it.
    local_graph = next(p for p in Path(bundle).iterdir() if p.suffix == ".onnx")
    local_graph.write_bytes(local_graph.read_bytes() + b"\0")
    with pytest.raises(UserError, match="sha256|hash|modified"):
        deploy(profile, bundle=bundle, env=env, log=lambda m: None)
    d = r1.to_dict()
    assert d["version"] == 1 and d["files_skipped"] == 0 and d["median_ms"] == r1.bench["median_ms"]
    json.dumps(d)


def test_deploy_argument_errors(tmp_path: Path):
    from hat_edge.cli import cli

    r = CliRunner().invoke(cli, ["deploy", "--profile", "local-cpu"])
    assert r.exit_code != 0 and "ARCH_FILE" in r.output and "--bundle" in r.output
    r = CliRunner().invoke(cli, ["deploy", "--profile", "local-cpu", "x.yml"])
    assert r.exit_code != 0 and "--checkpoint" in r.output
    r = CliRunner().invoke(cli, ["deploy", "--profile", "nope-profile", "--bundle", str(tmp_path)])
    assert r.exit_code != 0 and "unknown profile 'nope-profile'" in r.output


# ------------------------------------------------------------------------------------------------
# The main job (`hat-edge run`), end to end at a small size
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The whole job once on local-cpu with the bundled demo model, cut small (6 initial
    measurements, one round, a tiny evolution, 0.2 s per model): (settings, summary, logs, run dir).
    The two tests below share it: the first run's outputs, then a second run into the same dir."""
    from hat_edge.app.mainjob import RunSettings, run_main_job

    tmp = tmp_path_factory.mktemp("main_job")
    out = tmp / "run"
    s = RunSettings(initial=6, rounds=1, top_k=1, explore=1, evolution=TINY_EVO, valid_sentences=12,
                    bleu_sentences=6, translations=2, out_dir=str(out), min_time_s=0.2, min_repeats=3)
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HAT_EDGE_CACHE", str(tmp / "cache"))
        result, _, _ = run_main_job(s, progress=False, log=logs.append)
    return s, result, logs, out, tmp / "cache"


@pytest.mark.slow
def test_main_job_end_to_end_writes_the_report(main_job):
    """A real device check, measurements, predictor, search, deploy through the local transport,
    side-by-side benchmark, BLEU, report and plots."""
    from hat_edge.app.mainjob import render_summary

    _, result, logs, out, cache = main_job
    summary = result.to_dict()  # the `--json` object
    # The measurement exports it kept to time archs again are gone once it ends.
    assert [p.name for p in (cache / "bundles").iterdir() if not p.name.startswith(".")] == []
    assert [m[:5] for m in logs if m.startswith("[")] == [f"[{i}/7]" for i in range(1, 8) if i != 5]
    w = summary["winner"]
    assert summary["budget_ms"] > 0 and w["measured_latency_ms"] > 0 and w["predicted_latency_ms"] > 0
    assert summary["met"] == (w["measured_latency_ms"] <= summary["budget_ms"] * 1.03)
    assert 0 < w["bleu"] <= 100 and 0 < summary["largest"]["bleu"] <= 100
    d = summary["deploy"]
    assert d["hashes_ok"] and d["parity"] and d["median_ms"] > 0 and len(summary["translations"]) == 2
    # deployed as it was measured: by the TorchScript-based ONNX exporter (RunSettings.exporter)
    assert d["exporter"] == "torch.onnx.export(dynamo=False)"
    side = summary["side_by_side"]
    assert side is None or summary["speedup"] == pytest.approx(side["largest_ms"] / side["winner_ms"])
    for name in ("report.md", "report.json", "predicted_vs_measured.png", "search_progress.png",
                 "loss_vs_latency.png", "latency.sqlite", "fitness.sqlite"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert "## Result" in md and f"{summary['budget_ms']:.2f} ms" in md
    assert "exported by torch.onnx.export(dynamo=False)" in md
    assert json.loads((out / "report.json").read_text())["winner"]["arch"] == w["arch"]
    text = render_summary(result)
    assert "speed-up vs largest" in text and "budget" in text


@pytest.mark.slow
def test_a_second_main_job_reuses_the_measurements_the_losses_and_the_export(main_job, monkeypatch):
    from hat_edge.app.mainjob import run_main_job

    s, result, _, out, cache = main_job
    monkeypatch.setenv("HAT_EDGE_CACHE", str(cache))
    summary = result.to_dict()
    w = summary["winner"]
    # A second run reuses every stored measurement: nothing new is measured before the search.
    logs2: list[str] = []
    summary2 = run_main_job(s, progress=False, log=logs2.append)[0].to_dict()
    assert summary2["device_measurements"] <= summary["device_measurements"]
    # ... and the validation losses it computed (out/fitness.sqlite): the archs it meets again are read
    assert summary2["fitness_evaluations"] < summary["fitness_evaluations"]
    assert any("validation loss read from" in m for m in logs2)
    # ... and the export of the same winner from the same weights (#25: ~8 s of the second run)
    same = summary2["winner"]["arch"] == w["arch"]
    assert any(m.startswith("reusing the export of") for m in logs2) == same
    assert summary2["deploy"]["hashes_ok"] and summary2["deploy"]["parity"]
    # A changed bundle file, a changed key or a linked key file is never reused.
    from hat_edge.app.deploy import reusable_bundle

    bundle, key_file = out / "bundle", out / "bundle.export-key.json"
    key = json.loads(key_file.read_text())["key"]
    assert reusable_bundle(bundle, key) == bundle and reusable_bundle(bundle, "0" * 64) is None
    # ... and an export by the other ONNX exporter has another key (`hat-edge run --exporter dynamo`)
    from hat_edge.app.deploy import export_key
    from hat_edge.checkpoint import load_checkpoint

    ck = load_checkpoint("demo")
    sub = ck.model.extract(ck.space.smallest())
    keys = {e: export_key(sub, ck.space.smallest(), "onnx", None, ck.tokenizer, e) for e in ("torchscript", "dynamo")}
    assert keys["torchscript"] != keys["dynamo"]
    (out.parent / "k.json").write_text(key_file.read_text())
    key_file.unlink()
    key_file.symlink_to(out.parent / "k.json")
    assert reusable_bundle(bundle, key) is None
    key_file.unlink()
    (out.parent / "k.json").rename(key_file)
    graph = next(p for p in bundle.iterdir() if p.suffix == ".onnx")
    graph.write_bytes(graph.read_bytes() + b"\0")
    assert reusable_bundle(bundle, key) is None


# ------------------------------------------------------------------------------------------------
# The typed results, without a device or a model
# ------------------------------------------------------------------------------------------------
RUN_JSON_KEYS = [
    "device", "device_desc", "checkpoint", "space", "created_at", "command", "budget_ms", "budget_source",
    "tolerance", "met", "measured_range_ms", "winner", "largest", "speedup", "side_by_side", "bleu_sentences",
    "bleu_beam", "initial_measurements", "device_measurements", "fitness_evaluations", "rounds",
    "predictor_error", "random_search", "deploy", "translations", "device_env", "store", "timings_s", "wall_s",
    "report",
]


def _synthetic_summary(side: bool = True):
    from hat_edge.app.deploy import DeployResult, Translation
    from hat_edge.app.results import (
        LargestSummary,
        PredictorError,
        RandomComparison,
        RunSummary,
        SideBySide,
        WinnerSummary,
    )
    from hat_edge.search.loop import Measured, RoundReport

    w, big = DEMO.sample_n(1, seed=3)[0], DEMO.largest()
    m = Measured(arch=w, loss=2.5, predicted_ms=10.0, predicted_lo_ms=9.0, predicted_hi_ms=11.5, measured_ms=10.4,
                 round=1)
    rr = RoundReport(round=1, fitted_on=8, evaluations=60, search_ms=1234.0, measure_ms=800.0, best_loss=2.5,
                     best_predicted_ms=10.0, candidates=(m,), met=True)
    dep = DeployResult(profile="local-cpu", bundle="out/bundle", remote_dir="/w/x", runtime="onnxruntime",
                       precision="int8", arch=w, files_total=4, files_sent=4, hashes_ok=True, parity=True,
                       translations=(Translation("Hello", "Hallo", "Hallo", (5, 3), True),), host_verify=None,
                       bench={"median_ms": 12.1, "p90_ms": 13.0, "cv": 0.02, "runs": [12.0]})
    return RunSummary(
        device="local-cpu", device_desc="this machine", checkpoint="demo", space="demo",
        created_at="2025-01-01T00:00:00+00:00", command="hat-edge run", budget_ms=10.5, budget_source="--budget",
        tolerance=0.03, met=True, measured_range_ms=(4.0, 30.0),
        winner=WinnerSummary(arch=w, predicted_latency_ms=10.0, predicted_lo_ms=9.0, predicted_hi_ms=11.5,
                             measured_latency_ms=10.4, deployed_latency_ms=dep.median_ms, loss=2.5,
                             found_in="round 1", bleu=20.5, precision="int8", bleu_deployed=19.5),
        largest=LargestSummary(arch=big, measured_latency_ms=30.0, loss=2.2, bleu=25.0),
        speedup=2.8 if side else 30.0 / 10.4,
        side_by_side=SideBySide(winner_ms=10.0, largest_ms=28.0, speedup=2.8) if side else None,
        bleu_sentences=12, bleu_beam=5, initial_measurements=8, device_measurements=11, fitness_evaluations=70,
        rounds=(rr,), predictor_error=PredictorError(mape=4.0, within_10=100.0, n=1),
        random_search=RandomComparison(evaluations=60, best_loss=2.7, evolution_best_loss=2.5), deploy=dep,
        device_env={"os": "Linux"}, store="out/latency.sqlite", timings_s={"loop_s": 1.0}, wall_s=99.0,
        report=("out/report.md", "out/report.json"),
    )


@pytest.mark.parametrize("side", [True, False])
def test_run_summary_to_dict_keeps_the_json_keys_and_the_renderers_read_it(side: bool):
    from hat_edge.app.mainjob import render_summary
    from hat_edge.app.report import render_markdown

    s = _synthetic_summary(side)
    d = json.loads(json.dumps(s.to_dict(), default=str))
    assert list(d) == RUN_JSON_KEYS
    assert list(d["winner"]) == ["arch", "describe", "predicted_latency_ms", "predicted_lo_ms", "predicted_hi_ms",
                                 "measured_latency_ms", "deployed_latency_ms", "loss", "found_in", "bleu", "params",
                                 "precision", "bleu_deployed"]
    assert list(d["largest"]) == ["arch", "measured_latency_ms", "loss", "bleu", "params"]
    assert d["winner"]["deployed_latency_ms"] == d["deploy"]["median_ms"] == 12.1
    assert d["deploy"]["quantize"] == "int8" and d["measured_range_ms"] == [4.0, 30.0]
    assert d["translations"] == [{"source": "Hello", "reference": "Hallo", "hypothesis": "Hallo"}]
    assert (d["side_by_side"] is not None) == side and d["rounds"][0]["candidates"][0]["measured_ms"] == 10.4
    text = render_summary(s)
    assert "report                out/report.md" in text
    assert ("speed-up vs largest   2.80x (side by side: 10.00 vs 28.00 ms)" in text) == side
    assert ("speed-up vs largest   2.88x (largest measured 30.00 ms)" in text) == (not side)
    md = render_markdown(s)
    assert "| latency budget | 10.50 ms (--budget) | |" in md and "(onnxruntime, int8)" in md
    assert "| 1 | 8 | 60 | 1.2 | 10.0 -> 10.4 (2.500) | 1.00x | 1.00x | yes |" in md
    # --quantize int8: the latencies are int8 ones, and the int8 bundle's BLEU stands next to fp32's
    assert "| measured latency (median, int8 bundles) | **10.40 ms** |" in md
    assert "| BLEU of the deployed int8 bundle (same sentences) | 19.5 | |" in md


def test_search_does_not_import_the_app_layer():
    """hat_edge/search sits below hat_edge/app: no import of it, not even inside a function."""
    import ast

    import hat_edge.search

    for path in Path(hat_edge.search.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n == "hat_edge.app" or n.startswith("hat_edge.app.")], path


def test_a_budget_is_a_budget() -> None:
    """'within budget' only at or under it; over it, by how much and whether the tolerance covers it."""
    from hat_edge.app.results import budget_verdict

    assert budget_verdict(10.4, 10.4, 0.03) == "within budget"
    assert budget_verdict(10.58, 10.4, 0.03) == "over by 1.7% (within the 3% tolerance)"
    assert budget_verdict(11.0, 10.4, 0.03).startswith("BUDGET NOT MET: over by 5.8%")
    assert budget_verdict(None, 10.4, 0.03) == "not measured"


def test_int8_deploy_shows_agreement_against_stated_levels() -> None:
    import dataclasses

    from hat_edge.app.deploy import render_deploy

    dep = _synthetic_summary().deploy
    hv = {"precision": "int8", "greedy_agreement": 1.0, "beam_agreement": 0.88, "tokens_equal": False,
          "max_abs_diff": 0.2}
    text = render_deploy(dataclasses.replace(dep, host_verify=hv))
    assert "tokens equal: NO" not in text
    assert "greedy 1.00, beam 0.88 (expected >= 0.90 / 0.80: ok)" in text
    low = render_deploy(dataclasses.replace(dep, host_verify={**hv, "beam_agreement": 0.5}))
    assert "beam 0.50 (expected >= 0.90 / 0.80: LOW)" in low


def test_int8_device_parity_is_agreement_not_identity() -> None:
    """An int8 bundle decodes differently on an ARM board than on the x86 host (different int8
    kernels): the device check is the share of tokens in common against the stated level."""
    import dataclasses

    from hat_edge.app.deploy import render_deploy

    dep = dataclasses.replace(_synthetic_summary().deploy, precision="int8", device_agreement=0.93, parity=True)
    text = render_deploy(dep)
    assert "device parity int8: tokens agreeing with the host's: 0.93 (expected >= 0.80: ok" in text
    low = render_deploy(dataclasses.replace(dep, device_agreement=0.5, parity=False))
    assert "0.50 (expected >= 0.80: LOW" in low
    assert dep.to_dict()["device_agreement"] == 0.93
    # fp32 keeps the identity check
    assert "translations identical to the host's" in render_deploy(_synthetic_summary().deploy)


# ------------------------------------------------------------------------------------------------
# --threads auto: the fitness's host threads, chosen by timing
# ------------------------------------------------------------------------------------------------
def test_timed_threads_uses_the_faster_count_and_follows_the_machine():
    """A fitness whose cost depends on the thread count (here: a sleep per count, as a quiet and
    a busy machine make it): the faster count is used after the first probe, and after a change
    of the machine the next probe switches."""
    import time

    import torch

    from hat_edge.app.job import TimedThreads

    cost = {1: 0.03, 2: 0.004}
    used: list[int] = []

    def fn(arch) -> float:
        n = torch.get_num_threads()
        used.append(n)
        time.sleep(cost[n])
        return 1.25

    before = torch.get_num_threads()
    try:
        t = TimedThreads(fn, (1, 2), probe_every=8)
        assert [t(i) for i in range(8)] == [1.25] * 8  # the value is the loss, probe or not
        assert len(t.probes) == 1 and t.current == 2 and used[2:] == [2] * 7 and used[:2] == [1, 1]
        cost[1], cost[2] = 0.004, 0.03  # something else now keeps a core busy
        for i in range(8):
            t(i)
        assert len(t.probes) == 2 and t.current == 1 and used[-6:] == [1] * 6
        assert "1 thread(s), chosen by timing (2 probe(s)" in t.describe()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        TimedThreads(fn, (0, 2))


def test_threads_option_takes_auto_or_a_count_and_refuses_the_rest():
    from hat_edge.cli import cli

    r = CliRunner().invoke(cli, ["run", "--threads", "many"])
    assert r.exit_code == 2 and "'many': allowed 'auto' or a whole number >= 0" in r.output
    r = CliRunner().invoke(cli, ["run", "--help"])
    assert "--threads AUTO|N" in r.output and "[default: auto]" in r.output


def test_exporter_option_names_the_choices_and_settings_refuse_others():
    from hat_edge.app.mainjob import RunSettings
    from hat_edge.cli import cli

    r = CliRunner().invoke(cli, ["run", "--exporter", "tvm"])
    assert r.exit_code == 2 and "'tvm' is not one of 'torchscript', 'dynamo'" in r.output
    assert RunSettings().exporter == "torchscript"
    with pytest.raises(UserError, match="--exporter 'tvm': allowed: dynamo, torchscript"):
        RunSettings(exporter="tvm")
