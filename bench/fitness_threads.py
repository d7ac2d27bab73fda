"""The search's fitness (validation loss of a demo SubTransformer) on 1 and on N host threads, at 60
and 30 validation sentences: what `--threads auto` (app/job.py `TimedThreads`) chooses between; with
`--max-tokens`, also at other validation batch sizes (app/job.py `FITNESS_MAX_TOKENS`).

Each setting evaluates the same archs (uncached, `ValidLoss.compute`), in alternating rounds so a
drift of the machine falls on all of them. Run it once on a quiet machine and once with a core kept
busy (`--busy`: a spin loop in a child process) to see why no fixed count fits both. Every batch
size must give the same losses (the padding is masked): the largest difference to the first size
is printed, with the fraction of the decoder's positions that are real tokens, not padding.

    .venv/bin/python bench/fitness_threads.py            # ~1 min on 2 cores
    .venv/bin/python bench/fitness_threads.py --busy
    .venv/bin/python bench/fitness_threads.py --max-tokens 1000,600,400,250 --sentences 60 --rounds 4

Writes bench/results/fitness_threads[_busy][_batches].json and prints ms per arch (median over rounds).
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
    ap.add_argument("--sentences", default="60,30", help="validation sentence counts, comma-separated")
    ap.add_argument("--max-tokens", default=None,
                    help="validation batch sizes in tokens, comma-separated (default: FITNESS_MAX_TOKENS)")
    args = ap.parse_args()

    import torch

    from hat_edge.app.job import FITNESS_MAX_TOKENS, thread_choices
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.evaluate import ValidLoss

    ck = load_checkpoint("demo")
    archs = ck.space.sample_n(args.archs, seed=7)
    sizes = [int(x) for x in args.max_tokens.split(",")] if args.max_tokens else [FITNESS_MAX_TOKENS]
    counts = [int(x) for x in args.sentences.split(",")]
    losses = {(n, mt): ValidLoss(ck, max_sentences=n, max_tokens=mt) for n in counts for mt in sizes}
    tag = lambda threads, n, mt: (f"{threads} thread(s), {n} sentences"  # noqa: E731
                                  + (f", {mt}-token batches" if args.max_tokens else ""))
    values: dict[tuple[int, int], list[float]] = {}
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
                for (n, mt), vl in losses.items():
                    t0 = time.perf_counter()
                    values[n, mt] = [vl.compute(a) for a in archs]
                    took.setdefault(tag(threads, n, mt), []).append(1000 * (time.perf_counter() - t0) / len(archs))
    finally:
        stop.set()
        if hog:
            hog.join()
    rows = {k: {"median_ms_per_arch": round(statistics.median(v), 1), "rounds_ms": [round(x, 1) for x in v]}
            for k, v in took.items()}
    for k, v in rows.items():
        print(f"{k:45s} {v['median_ms_per_arch']:7.1f} ms per arch  {v['rounds_ms']}")
    batches = {}
    for (n, mt), vl in losses.items():
        real = vl.n_tokens / sum(b.target.numel() for b in vl.batches)
        diff = max(abs(x - y) for x, y in zip(values[n, mt], values[n, sizes[0]]))
        batches[f"{n} sentences, {mt}-token batches"] = {"batches": len(vl.batches), "real_fraction": round(real, 3),
                                                         "max_loss_diff": diff}
        print(f"{n} sentences, {mt}-token batches: {len(vl.batches)} batches, {100 * real:.1f}% of the decoder's "
              f"positions real tokens, losses within {diff:.1e} of {sizes[0]}-token batches")
    name = f"fitness_threads{'_busy' if args.busy else ''}{'_batches' if args.max_tokens else ''}.json"
    write_json(REPO / "bench" / "results" / name,
               {"bench": "fitness_threads", "busy": args.busy, "archs": args.archs, "cores": os.cpu_count(),
                "batches": batches,
                "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows})


if __name__ == "__main__":
    main()
