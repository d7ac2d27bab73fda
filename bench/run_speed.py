"""`hat-edge run` (README set-up command 1) of this checkout against an earlier revision, side by side
in one sitting (#25: wall time, same machine, same hour).

Each pair runs the baseline and this checkout one after the other (the order alternates between
pairs, so a drift of the machine's speed during the sitting falls on both), each with a fresh cache
(`HAT_EDGE_CACHE`: export cache and board work dir) and a fresh `--out-dir`; with `--rerun`, each then
runs again into its own out-dir (what a user's second `hat-edge run` costs). The baseline is a
`git worktree` of `--baseline` run from its own source tree with this venv. Both run the same
command: `python -m hat_edge run --no-progress --json` on the embedded default (local-cpu, the
bundled demo model). Nothing else should run on the machine meanwhile.

    .venv/bin/python bench/run_speed.py                              # baseline a8aae77, 2 pairs, reruns
    .venv/bin/python bench/run_speed.py --baseline 1b6ab25 --pairs 1 --no-rerun

Writes bench/results/run_speed.json and prints a table: wall time (the bench's clock), the job's
own step times, budget met, the side-by-side speed-up, new measurements and fitness evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)

STEPS = ("initial_measure_s", "loop_s", "deploy_s", "side_by_side_s", "bleu_s")


def one_run(src: Path, work: Path, tag: str) -> dict:
    """`hat-edge run` from source tree `src` with its cache and out-dir under `work`; its summary."""
    env = {**os.environ, "HAT_EDGE_CACHE": str(work / "cache"), "PYTHONPATH": str(src)}
    out = work / "run"
    cmd = [sys.executable, "-m", "hat_edge", "run", "--out-dir", str(out), "--no-progress", "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"{tag}.err").write_text(p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{tag}: hat-edge run failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    s = json.loads(p.stdout[p.stdout.index("{"):])
    side = s.get("side_by_side") or {}
    row = {
        "run": tag, "wall_s": round(wall, 1), "own_wall_s": s.get("wall_s"), "met": s.get("met"),
        "speedup_side_by_side": side.get("speedup"), "new_measurements": s.get("device_measurements"),
        "fitness_evaluations": s.get("fitness_evaluations"), "budget_ms": s.get("budget_ms"),
        "winner_ms": s["winner"].get("measured_latency_ms"), "winner_loss": s["winner"].get("loss"),
        "winner_bleu": s["winner"].get("bleu"), "steps_s": {k: (s.get("timings_s") or {}).get(k) for k in STEPS},
        "reused_losses": sum("validation loss read from" in line for line in p.stderr.splitlines()),
        "reused_export": any(line.startswith("reusing the export of") for line in p.stderr.splitlines()),
    }
    print(f"  {tag}: {row['wall_s']} s, met {row['met']}, {row['fitness_evaluations']} fitness evaluations",
          file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| run | wall (s) | budget met | side-by-side speed-up | new measurements | fitness evaluations | "
            "initial / loop / deploy / side by side / BLEU (s) |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        steps = " / ".join(f"{r['steps_s'][k]:.1f}" if r["steps_s"][k] is not None else "-" for k in STEPS)
        sp = f"{r['speedup_side_by_side']:.2f}x" if r["speedup_side_by_side"] else "-"
        lines.append(f"| {r['run']} | {r['wall_s']:.0f} | {'yes' if r['met'] else 'no'} | {sp} | "
                     f"{r['new_measurements']} | {r['fitness_evaluations']} | {steps} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="a8aae77", help="git revision to compare with (default: the code #25 "
                                                          "was filed against)")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--rerun", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a second run into each out-dir")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "run_speed.json"))
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="run-speed-") as tmp:
        base_src = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_src), args.baseline], cwd=REPO,
                       check=True)
        try:
            trees = {f"baseline {args.baseline}": base_src, f"this checkout {head}{'+' if dirty else ''}": REPO}
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            for i in range(args.pairs):
                order = list(trees.items()) if i % 2 == 0 else list(trees.items())[::-1]
                for name, src in order:
                    work = Path(tmp) / f"{i}-{name.split()[0]}"
                    work.mkdir()
                    rows.append({**one_run(src, work, f"{name}, fresh #{i + 1}"), "tree": name, "kind": "fresh"})
                    if args.rerun:
                        rows.append({**one_run(src, work, f"{name}, rerun #{i + 1}"), "tree": name, "kind": "rerun"})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_src)], cwd=REPO, check=False)
    summary = {}
    for name in trees:
        for kind in ("fresh", "rerun"):
            walls = [r["wall_s"] for r in rows if r["tree"] == name and r["kind"] == kind]
            if walls:
                summary[f"{name}, {kind}"] = {"median_wall_s": statistics.median(walls), "runs": len(walls),
                                              "met": sum(r["met"] for r in rows if r["tree"] == name and r["kind"] == kind)}
    doc = {"bench": "run_speed", "started": started, "machine": platform.processor() or platform.machine(),
           "cores": os.cpu_count(), "baseline": args.baseline, "head": head, "dirty": dirty, "rows": rows,
           "median": summary, "command": "python -m hat_edge run --no-progress --json (fresh HAT_EDGE_CACHE, own --out-dir)"}
    write_json(args.out, doc)
    print(table(rows))
    for k, v in summary.items():
        print(f"median wall, {k}: {v['median_wall_s']:.0f} s over {v['runs']} run(s), budget met in {v['met']}")


if __name__ == "__main__":
    main()
