"""The search's fitness (validation loss of a demo SubTransformer) on 1 and on N host threads, at 60
and 30 validation sentences: what `--threads auto` (app/job.py `TimedThreads`) chooses between.

Each setting evaluates the same archs (uncached, `ValidLoss.compute`), in alternating rounds so a
drift of the machine falls on all of them. Run it once on a quiet machine and once with a core kept
busy (`--busy`: a spin loop in a child process) to see why no fixed count fits both.

    .venv/bin/python bench/fitness_threads.py            # ~1 min on 2 cores
    .venv/bin/python bench/fitness_threads.py --busy

Writes bench/results/fitness_threads[_busy].json and prints ms per arch (median over rounds).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from _results import write_json  # noqa: E402  (bench/, the script's own folder)


def _spin(stop) -> None:  # a busy core
    while not stop.is_set():
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    args = ap.parse_args()

    import torch

    from hat_edge.app.job import FITNESS_MAX_TOKENS, thread_choices
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.evaluate import ValidLoss

    ck = load_checkpoint("demo")
    archs = ck.space.sample_n(args.archs, seed=7)
    losses = {n: ValidLoss(ck, max_sentences=n, max_tokens=FITNESS_MAX_TOKENS) for n in (60, 30)}
    stop = mp.Event()
    hog = mp.Process(target=_spin, args=(stop,), daemon=True) if args.busy else None
    if hog:
        hog.start()
    took: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            order = thread_choices() if r % 2 == 0 else thread_choices()[::-1]
            for threads in order:
                torch.set_num_threads(threads)
                for n, vl in losses.items():
                    t0 = time.perf_counter()
                    for a in archs:
                        vl.compute(a)
                    took.setdefault(f"{threads} thread(s), {n} sentences", []).append(
                        1000 * (time.perf_counter() - t0) / len(archs))
    finally:
        stop.set()
        if hog:
            hog.join()
    rows = {k: {"median_ms_per_arch": round(statistics.median(v), 1), "rounds_ms": [round(x, 1) for x in v]}
            for k, v in took.items()}
    for k, v in rows.items():
        print(f"{k:28s} {v['median_ms_per_arch']:7.1f} ms per arch  {v['rounds_ms']}")
    write_json(REPO / "bench" / "results" / f"fitness_threads{'_busy' if args.busy else ''}.json",
               {"bench": "fitness_threads", "busy": args.busy, "archs": args.archs, "cores": os.cpu_count(),
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows})


if __name__ == "__main__":
    main()
