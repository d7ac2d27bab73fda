"""`hat-edge run` with the packaged latency prior (the default) against `--no-prior` (#16).

For each seed, the two runs go at the same time, each on its own local board (a copy of the
`local-cpu` profile with its own work dir, so the board lock does not make them take turns): they
see the same machine speed, which on a shared VM moves by 2x within an hour. Each run's latencies are
on its own scale (its first measured group anchors the rest), so the budget is each run's default:
the 40th percentile of the space's latency as predicted from its own initial measurements
(`search.loop.budget_from_space`), i.e. the same share of the space for both.

Reported per run (from report.json): budget met, initial and total measurements, winner loss,
BLEU and params, initial-measurement and wall time.

    .venv/bin/python bench/run_prior.py                      # seeds 0,1,2: ~30-45 min on 2 cores
    .venv/bin/python bench/run_prior.py --collect DIR        # tabulate runs already in DIR

Writes bench/results/run_prior.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)

MODES = {"A": ("no prior (--no-prior)", ["--no-prior"]), "B": ("packaged prior (default)", [])}


def board_profile(base: Path, tag: str, out: Path) -> Path:
    text = base.read_text().replace("threads = 1\n", f'threads = 1\nwork_dir = "{out / ("work" + tag)}"\n', 1)
    path = out / f"cpu{tag}.toml"
    path.write_text(text)
    return path


def run_pairs(out: Path, seeds: list[int], extra: list[str]) -> None:
    exe = Path(sys.executable).with_name("hat-edge")
    for seed in seeds:
        procs = []
        for tag, (_, flags) in MODES.items():
            prof = board_profile(REPO / "device_profiles" / "local-cpu.toml", tag, out)
            cmd = [str(exe), "run", "--profile", str(prof), "--seed", str(seed), "--out-dir",
                   str(out / f"d{seed}{tag}"), "--no-progress", "--json", *flags, *extra]
            procs.append(subprocess.Popen(cmd, stdout=open(out / f"d{seed}{tag}.json", "w"),
                                          stderr=open(out / f"d{seed}{tag}.err", "w")))
        for p in procs:
            p.wait()
        print(f"seed {seed} done", file=sys.stderr, flush=True)


def collect(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("d*[AB].json")):
        seed, tag = int(path.stem[1:-1]), path.stem[-1]
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            rows.append({"seed": seed, "mode": MODES[tag][0], "error": (out / f"{path.stem}.err").read_text()[-300:]})
            continue
        w = d["winner"]
        rows.append({
            "seed": seed, "mode": MODES[tag][0], "met": d["met"], "budget_ms": d["budget_ms"],
            "budget_source": d["budget_source"], "measured_range_ms": d["measured_range_ms"],
            "initial_measurements": d["initial_measurements"], "device_measurements": d["device_measurements"],
            "winner_loss": w["loss"], "winner_bleu": w.get("bleu"), "winner_params": w.get("params"),
            "winner_measured_ms": w.get("measured_latency_ms"), "wall_s": d["wall_s"],
            "initial_measure_s": d["timings_s"].get("initial_measure_s"),
        })
    return rows


def table(rows: list[dict]) -> None:
    head = (f"{'seed':>4} {'mode':<26} {'met':>4} {'budget':>8} {'initial':>7} {'measured':>8} {'loss':>7} "
            f"{'BLEU':>5} {'params M':>8} {'init s':>7} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['seed']:>4} {r['mode']:<26} failed: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        print(f"{r['seed']:>4} {r['mode']:<26} {'yes' if r['met'] else 'NO':>4} {r['budget_ms']:>8.1f} "
              f"{r['initial_measurements']:>7} {r['device_measurements']:>8} {r['winner_loss']:>7.4f} "
              f"{r['winner_bleu'] or 0:>5.1f} {(r['winner_params'] or 0) / 1e6:>8.2f} {r['initial_measure_s']:>7.0f} "
              f"{r['wall_s']:>7.0f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dir", default=None, help="Where the runs go (default: a temporary directory).")
    ap.add_argument("--collect", default=None, metavar="DIR", help="Only tabulate the runs already in DIR.")
    ap.add_argument("--note", default="", help="A line about the machine's state, kept in the JSON.")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "run_prior.json"))
    args, extra = ap.parse_known_args(argv)
    if args.collect:
        out = Path(args.collect)
    else:
        out = Path(args.dir or tempfile.mkdtemp(prefix="run-prior-"))
        out.mkdir(parents=True, exist_ok=True)
        run_pairs(out, [int(s) for s in args.seeds.split(",")], extra)
    rows = collect(out)
    table(rows)
    doc = {"format": "hat-edge-bench-run-prior", "version": 2,
           "protocol": ("per seed, `hat-edge run --no-prior` and `hat-edge run` (packaged prior) at the same time, each on "
                        "its own local board (local-cpu with its own work dir); default budget (40th percentile of the "
                        "space's predicted latency, each run on its own scale); demo checkpoint"),
           "command": "bench/run_prior.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "note": args.note, "machine": {"python": platform.python_version(), "platform": platform.platform()},
           "runs": rows}
    print(f"\nwrote {write_json(args.out, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
