"""The on-device runner (hat_edge/runtime/, shipped as runner.pyz): search, bundles, timing, env, the CLI.

Bundles here are real exports of small random SubTransformers. The ONNX one goes through torch's
TorchScript-based ONNX exporter (seconds instead of tens of seconds): these tests are about the
runner, the exporter's own paths are tested in test_export.py.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hat_edge.runtime import backends, decoding, envinfo, errors, job, pack, timing
from hat_edge.runtime import bundle as rbundle
from hat_edge.space import Arch

RUNNER = pack.build_runner()  # the one file a device receives
RUNTIME_DIR = Path(pack.__file__).parent
SMALL = Arch(
    encoder_embed_dim=64, decoder_embed_dim=48, encoder_layer_num=3, decoder_layer_num=2,
    encoder_ffn_embed_dim=(128, 64, 128), encoder_self_attention_heads=(4, 2, 4),
    decoder_ffn_embed_dim=(96, 128), decoder_self_attention_heads=(2, 4),
    decoder_ende_attention_heads=(4, 2), decoder_arbitrary_ende_attn=(2, -1), qkv_dim=64,
)


# ------------------------------------------------------------------------------------------------
# 1. search
# ------------------------------------------------------------------------------------------------
def test_topk_stable_matches_full_stable_sort_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        cand = rng.integers(-3, 3, size=(3, 40)).astype(np.float64)  # many ties
        cand[0, :5] = -np.inf
        k = int(rng.integers(1, 12))
        want = np.argsort(-cand, axis=1, kind="stable")[:, :k]
        assert np.array_equal(decoding._topk_stable(cand, k), want)


def test_beam_candidates_equal_a_full_stable_sort_of_all_sums() -> None:
    rng = np.random.default_rng(1)
    for _ in range(40):
        beam, vocab = int(rng.integers(1, 6)), int(rng.integers(3, 50))
        lp = rng.integers(-4, 0, size=(beam, vocab)).astype(np.float32)  # ties everywhere
        lp[:, int(rng.integers(vocab))] = -np.inf
        scores = rng.integers(-6, 0, size=beam).astype(np.float64)
        scores[rng.random(beam) < 0.3] = -np.inf  # dead rows
        k = min(2 * beam, beam * vocab)
        full = (scores[:, None] + lp.astype(np.float64)).ravel()
        want = np.argsort(-full, kind="stable")[:k]
        want = want[np.isfinite(full[want])]
        flat, sc = decoding._beam_candidates(scores, lp, k)
        finite = np.isfinite(sc)
        assert np.array_equal(flat[finite], want) and np.array_equal(sc[finite], full[want])


class MarkovStep:
    """A fixed random bigram model: log p(next | last token), independent of the row's history."""

    def __init__(self, vocab: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(vocab, vocab)) * 2.0
        self.lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        self.calls = 0

    def __call__(self, tokens: np.ndarray, order):
        self.calls += 1
        return self.lp[tokens]


def _brute_force_best(lp: np.ndarray, bos: int, eos: int, max_len: int, alpha: float) -> list[int]:
    """Exhaustive search over every hypothesis ending with EOS within max_len steps."""
    vocab = lp.shape[0]
    best, best_score = None, -np.inf
    for n in range(0, max_len):
        for body in itertools.product([v for v in range(vocab) if v != eos], repeat=n):
            seq = [bos, *body, eos]
            s = sum(lp[a, b] for a, b in zip(seq, seq[1:])) / (n + 1) ** alpha
            if s > best_score:
                best, best_score = list(body), s
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_with_a_wide_beam_is_exact(seed: int) -> None:
    vocab, bos, eos, max_len = 5, 2, 3, 4
    step = MarkovStep(vocab, seed)
    got = decoding.beam_search(step, batch=1, beam=vocab**max_len, bos=bos, eos=eos, max_len=max_len)
    assert got == [_brute_force_best(step.lp, bos, eos, max_len, 1.0)]


def test_greedy_and_beam_fixed_steps_never_stop() -> None:
    step = MarkovStep(6, 3)
    out = decoding.greedy_search(step, 2, bos=2, eos=3, max_len=7, fixed_steps=True)
    assert [len(o) for o in out] == [7, 7] and step.calls == 7 and 3 not in out[0]
    step = MarkovStep(6, 3)
    out = decoding.beam_search(step, 1, 3, bos=2, eos=3, max_len=9, fixed_steps=True)
    assert len(out[0]) == 9 and step.calls == 9 and 3 not in out[0]


class TiedMarkovTopK(MarkovStep):
    """A bigram model with log-probs on a coarse grid (ties everywhere) that also offers the
    search's top-k form, as the ONNX graph's TopK does it: per row sorted by (-value, id)."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__(vocab, seed)
        self.lp = np.round(self.lp * 2) / 2  # many equal values per row
        self.vocab_size = vocab
        self.topk_calls = 0

    def topk(self, tokens: np.ndarray, order, k: int):
        self.topk_calls += 1
        lp = self.lp[tokens].astype(np.float32)
        ids = np.argsort(-lp, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(lp, ids, axis=1), ids


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_search_over_the_graphs_topk_picks_the_same_tokens(seed: int, fixed: bool) -> None:
    """Beam search over a step's top-k (k x N values a step) chooses exactly what it chooses over
    the full log-probs, ties and the fixed_steps EOS ban included; greedy uses the full ones."""
    vocab, eos = 9, 3
    for beam, batch in ((1, 2), (2, 1), (3, 2), (5, 2)):
        plain = MarkovStep(vocab, seed)
        plain.lp = np.round(plain.lp * 2) / 2
        want = decoding.decode(plain, batch, beam, 2, eos, 8, fixed_steps=fixed)
        fast = TiedMarkovTopK(vocab, seed)
        got = decoding.decode(fast, batch, beam, 2, eos, 8, fixed_steps=fixed)
        assert got == want, (beam, batch)
        if beam > 1:  # beam search: the top-k form did the work, but for the forced-EOS last step
            assert fast.topk_calls >= 1 and fast.calls <= (0 if fixed else 1)  # (a search may end early)
        else:  # greedy keeps numpy's argmax over the full log-probs
            assert fast.topk_calls == 0


def test_beam_search_rows_are_sentence_major() -> None:
    """Two identical sentences in one batch decode exactly like each alone."""
    step = MarkovStep(7, 5)
    alone = decoding.beam_search(step, 1, 3, 2, 3, 6)
    both = decoding.beam_search(MarkovStep(7, 5), 2, 3, 2, 3, 6)
    assert both == alone * 2


# ------------------------------------------------------------------------------------------------
# 4. statistics
# ------------------------------------------------------------------------------------------------
def test_summarize_known_values() -> None:
    vals = [10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 100.0]
    s = timing.summarize(vals)
    assert s["median_ms"] == pytest.approx(np.median(vals))
    assert s["p90_ms"] == pytest.approx(np.percentile(vals, 90))
    assert s["iqr_ms"] == pytest.approx(np.percentile(vals, 75) - np.percentile(vals, 25))
    assert s["mean_10_90_ms"] == pytest.approx(np.mean(sorted(vals)[1:9]))  # HAT's [10%, 90%) slice
    assert s["cv"] == pytest.approx(np.std(vals, ddof=1) / np.mean(vals))


def test_warmed_up_detects_improvement() -> None:
    assert not timing.warmed_up([100, 90, 80, 70, 60, 50])  # still getting faster
    assert timing.warmed_up([100, 50, 51, 50, 52, 51])  # flat
    assert timing.warmed_up([100, 50])  # too few to judge: the minimum warm-up decides


def test_throttle_bits() -> None:
    assert envinfo.throttled_during(None, 0) is None
    assert envinfo.throttled_during(0x0, 0x0) is False
    assert envinfo.throttled_during(0x50000, 0x50000) is False  # happened before, not during
    assert envinfo.throttled_during(0x0, 0x40000) is True  # began during the run
    assert envinfo.throttled_during(0x4, 0x0) is True  # throttled at the start


def test_settings_validation() -> None:
    s, unknown = job.MeasureSpec.from_job({"beam": 1, "threads": 2, "timeout_s": 5})
    assert s.beam == 1 and s.threads == 2 and unknown == ["timeout_s"]
    for bad in ({"beam": 0}, {"min_time_s": -1}, {"runtime": "tflite"}, {"device": "tpu"},
                {"cpu_affinity": []}, {"env": ["A=1"]}, {"steps": "30"}):
        with pytest.raises(errors.RunnerError, match=next(iter(bad))):
            job.MeasureSpec.from_job(bad)


def test_runner_parses_with_the_oldest_board_python_grammar() -> None:
    """The runner runs on board pythons down to RUNNER_MIN_PYTHON: no newer syntax in it."""
    from hat_edge.runtime.formats import RUNNER_MIN_PYTHON

    for path in sorted(RUNTIME_DIR.glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=RUNNER_MIN_PYTHON)
    with pytest.raises(SyntaxError):  # the check bites: a match statement is 3.10 grammar
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=RUNNER_MIN_PYTHON)


def test_runner_imports_only_stdlib_numpy_and_runtimes() -> None:
    allowed = set(sys.stdlib_module_names) | {"numpy", "onnxruntime", "torch"}
    mods = set()
    for path in sorted(RUNTIME_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods.add(node.module.split(".")[0])
    assert mods and mods <= allowed, mods - allowed


# ------------------------------------------------------------------------------------------------
# bundles and the CLI (real exports)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from hat_edge.exporters import export_bundle
    from hat_edge.model import SubTransformer

    d = tmp_path_factory.mktemp("runner_bundles")
    sub = SubTransformer.random(SMALL, 300, seed=1)
    return {
        "onnx": export_bundle(sub, d / "onnx", fmt="onnx", exporter="torchscript"),
        "ts": export_bundle(sub, d / "ts", fmt="torchscript"),
    }


def _job(tmp: Path, bundles: list[tuple[str, str]], **settings) -> Path:
    base = dict(threads=1, src_len=12, steps=6, beam=3, warmup=2, min_repeats=4, min_time_s=0.05)
    base.update(settings)
    job = {"format": "hat-edge-job", "version": 1, "bundles": [{"id": i, "path": p} for i, p in bundles],
           "settings": base}
    path = tmp / "job.json"
    path.write_text(json.dumps(job))
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_run_job_writes_one_line_per_bundle_with_statistics(bundles, tmp_path) -> None:
    job = _job(tmp_path, [("onnx", str(bundles["onnx"])), ("missing", str(tmp_path / "nope")),
                          ("ts", str(bundles["ts"]))], cooldown_s=0.01, env={"OMP_NUM_THREADS": "1"})
    out = tmp_path / "res.jsonl"
    r = _run("run", str(job), "--out", str(out))
    assert r.returncode == 1, r.stderr  # one bundle failed, the batch went on
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["onnx", "missing", "ts"]
    assert "not a directory" in lines[1]["error"] and set(lines[1]) == {"id", "error"}
    for rec, rt in ((lines[0], "onnxruntime"), (lines[2], "torchscript")):
        assert rec["version"] == 1 and rec["runtime"] == rt
        runs = rec["runs"]
        assert len(runs) >= 4 and rec["warmup"] >= 2
        for x in runs:
            assert x["total_ms"] == pytest.approx(x["encoder_ms"] + x["decode_ms"]) and x["encoder_ms"] > 0
        totals = sorted(x["total_ms"] for x in runs)
        assert rec["median_ms"] == pytest.approx(float(np.median(totals)))
        assert totals[0] <= rec["mean_10_90_ms"] <= totals[-1] and rec["p90_ms"] <= totals[-1]
        assert rec["iqr_ms"] >= 0 and rec["cv"] >= 0 and rec["peak_rss_mb"] > 10
        assert rec["throttled"] is None  # not a Raspberry Pi
        assert rec["settings"]["beam"] == 3 and rec["env"]["numpy"] == np.__version__
        assert rec["encoder_median_ms"] > 0 and rec["decoder_median_ms"] > 0

    # --resume skips what is measured; only the failed one is retried
    r = _run("run", str(job), "--out", str(out), "--resume")
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in again[3:]] == ["missing"]


def test_a_runner_starts_no_child_process_while_it_times(bundles, tmp_path) -> None:
    """Off a Pi, `runner.pyz run` forks nothing: a child between fork and exec carries the runner's
    command line, so the board's process table would show two runners (Python's
    `platform.platform()` ran `uname -p`; the kill -9 test's watcher caught it under load)."""
    import platform

    from hat_edge.runtime.envinfo import _platform

    assert _platform(platform.uname()) == platform.platform()  # the same string, without the child
    job = _job(tmp_path, [("onnx", str(bundles["onnx"]))])
    hook = ("import runpy, sys\n"
            "def hook(ev, args):\n"
            "    if ev in ('subprocess.Popen', 'os.fork', 'os.forkpty', 'os.posix_spawn', 'os.system'):\n"
            "        print('CHILD', ev, args[:2], file=sys.stderr, flush=True)\n"
            "sys.addaudithook(hook)\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = tmp_path / "res.jsonl"
    r = subprocess.run([sys.executable, "-c", hook, str(RUNNER), "run", str(job), "--out", str(out), "--lock",
                        str(tmp_path / "runner.lock")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CHILD" not in r.stderr, r.stderr
    assert json.loads(out.read_text())["median_ms"] > 0


def test_run_job_level_errors_are_one_line(tmp_path) -> None:
    bad = tmp_path / "job.json"
    bad.write_text(json.dumps({"format": "hat-edge-job", "version": 9, "bundles": []}))
    r = _run("run", str(bad), "--out", str(tmp_path / "o.jsonl"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "version" in r.stderr


def test_env_reports_the_machine() -> None:
    r = _run("env")
    assert r.returncode == 0, r.stderr
    env = json.loads(r.stdout)
    for key in ("os", "cpu_model", "cores", "memory_mb", "python", "numpy", "onnxruntime", "torch",
                "governor", "temperature_c", "throttled", "raspberry_pi"):
        assert key in env
    assert env["cores"] >= 1 and env["memory_mb"] > 100 and env["numpy"] == np.__version__
    assert env["raspberry_pi"] is None and env["throttled"] is None  # this is not a Pi


def test_runner_script_translates_and_checks_from_a_copy(bundles, tmp_path) -> None:
    """The file alone (copied elsewhere, as on a board) decodes like the host API."""
    from hat_edge.exporters import translate

    copy = tmp_path / "runner.pyz"
    copy.write_bytes(RUNNER.read_bytes())
    src = [[5, 9, 17, 3], [8, 3]]
    for b in bundles.values():
        r = subprocess.run([sys.executable, str(copy), "translate", str(b), "--src", "5 9 17 3", "--src", "8 3",
                            "--beam", "3", "--max-len", "8"], capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["tokens"] == translate(b, src, beam=3, max_len=8)
        r = subprocess.run([sys.executable, str(copy), "check", str(b)], capture_output=True, text=True)
        assert json.loads(r.stdout)["ok"] is True


def test_measure_in_process_honours_min_repeats_and_time(bundles) -> None:
    model = backends.open_model(bundles["onnx"], threads=1)
    s, _ = job.MeasureSpec.from_job({"src_len": 8, "steps": 4, "beam": 1, "warmup": 1, "min_repeats": 3,
                                      "min_time_s": 0.3})
    res = timing.measure(model, s)
    assert len(res["runs"]) >= 3 and sum(r["total_ms"] for r in res["runs"]) >= 300 * 0.9


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_weightless_measurement_bundle_ships_graphs_and_the_device_writes_the_weights(tmp_path, quantize) -> None:
    """A measurement bundle leaves its weights to the device: the copy that travels is the graphs
    and the manifest; the runner (run from a bare copy, as on a board) writes random weights of the
    right sizes, and the model runs with the same output shapes as the full bundle."""
    import shutil

    from hat_edge.exporters import export_bundle
    from hat_edge.exporters.bundle import make_weightless
    from hat_edge.model import SubTransformer

    sub = SubTransformer.random(SMALL, 3000, seed=2)
    full = export_bundle(sub, tmp_path / "full", fmt="onnx", exporter="torchscript", quantize=quantize,
                         parity_check=False)
    light = tmp_path / "light"
    shutil.copytree(full, light)
    b = make_weightless(light)
    gen = b.manifest["generated"]
    assert set(gen) == {"encoder.weights", "decoder_step.weights"}
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(light) < size(full) / 3  # only the graphs and the manifest are left to ship
    assert "random" in b.manifest["weights"]
    # Made in the same pass as the export (what measurements use): the same graphs, the same manifest
    # fields, and no weights ever written here.
    once = export_bundle(sub, tmp_path / "once", fmt="onnx", exporter="torchscript", quantize=quantize,
                         parity_check=False, weightless_seed=0)
    assert sorted(p.name for p in once.iterdir()) == sorted(p.name for p in light.iterdir())
    assert all((once / g["file"]).read_bytes() == (light / g["file"]).read_bytes()
               for g in b.manifest["graphs"].values())
    m_once = json.loads((once / "manifest.json").read_text())
    assert {k: m_once[k] for k in ("generated", "weights", "parity", "graphs")} == {
        k: b.manifest[k] for k in ("generated", "weights", "parity", "graphs")}

    # "Ship" it: copy what a device receives, and run the runner file there.
    dev = tmp_path / "device"
    dev.mkdir()
    shutil.copytree(light, dev / "b")
    copy = dev / "runner.pyz"
    copy.write_bytes(RUNNER.read_bytes())
    r = subprocess.run([sys.executable, str(copy), "translate", str(dev / "b"), "--src", "5 9 17 3",
                        "--beam", "2", "--max-len", "6"], capture_output=True, text=True, cwd=dev)
    assert r.returncode == 0, r.stderr
    assert all((dev / "b" / name).stat().st_size == spec["bytes"] for name, spec in gen.items())
    job = _job(dev, [("w", str(dev / "b"))])
    r = _run("run", str(job), "--out", str(dev / "res.jsonl"))
    assert r.returncode == 0, r.stderr
    rec = json.loads((dev / "res.jsonl").read_text())
    assert rec["median_ms"] > 0 and len(rec["runs"]) >= 4

    m_full, m_light = backends.open_model(full, threads=1), backends.open_model(dev / "b", threads=1)
    src = np.array([[5, 9, 17, 3]], dtype=np.int64)
    for x, y in zip(m_full.encode(src), m_light.encode(src)):
        assert x.shape == y.shape and np.isfinite(y).all()
    # A generated file of the wrong size (an interrupted write) is written again, not used.
    w = dev / "b" / "encoder.weights"
    w.write_bytes(b"\0" * 10)
    assert rbundle.materialize_generated(dev / "b", rbundle.read_manifest(dev / "b")) == gen["encoder.weights"]["bytes"]
    # The layout is sealed by the manifest digest: editing it is refused like any tampering.
    mpath = dev / "b" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["generated"]["encoder.weights"]["bytes"] += 4096
    mpath.write_text(json.dumps(m))
    with pytest.raises(errors.RunnerError, match="manifest_sha256"):
        rbundle.read_manifest(dev / "b")
    # A stray file is still refused; the generated ones are not strays.
    mpath.write_text(json.dumps(b.manifest))
    (dev / "b" / "extra.bin").write_bytes(b"x")
    with pytest.raises(errors.RunnerError, match="extra.bin"):
        rbundle.read_manifest(dev / "b")


def test_interleaved_job_times_bundles_in_rotation(bundles, tmp_path) -> None:
    """interleave: every bundle gets the same number of timed runs, taken in turn, and a bundle
    that cannot be opened is reported without stopping the others."""
    job = _job(tmp_path, [("onnx", str(bundles["onnx"])), ("missing", str(tmp_path / "nope")),
                          ("ts", str(bundles["ts"]))], interleave=True, min_repeats=5, min_time_s=0.1)
    out = tmp_path / "res.jsonl"
    r = _run("run", str(job), "--out", str(out))
    assert r.returncode == 1, r.stderr
    lines = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"onnx", "missing", "ts"} and "error" in lines["missing"]
    a, b = lines["onnx"], lines["ts"]
    assert len(a["runs"]) == len(b["runs"]) >= 5
    assert a["interleaved_with"] == b["interleaved_with"] == 2 and a["settings"]["interleave"] is True
    # The rotation lasted min_time_s per model: 2 x 0.1 s of timed runs in all.
    assert sum(x["total_ms"] for x in a["runs"] + b["runs"]) >= 200 * 0.9
    bad = _job(tmp_path, [("onnx", str(bundles["onnx"]))], interleave="yes")
    r = _run("run", str(bad), "--out", str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "interleave" in r.stderr and r.stderr.strip().count("\n") == 0
