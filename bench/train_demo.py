"""The accuracy side of the latency/accuracy trade-off: how the bundled demo SuperTransformer was
trained, and what its SubTransformers score, from the smallest to the largest.

    .venv/bin/python bench/train_demo.py [--run runs/demo-ddp] [--checkpoint demo] [--archs 7]
                                         [--max-sentences N] [--beam 5] [--threads 2]

Reads the training run's train_log.jsonl (the curve) and evaluates SubTransformers of the
checkpoint on the test split: loss (nats/token) and sacrebleu BLEU of beam search. The archs are
the space's smallest and largest plus archs sampled from the space and picked at evenly spaced
parameter counts. Writes bench/results/train_demo.json (everything), train_demo.md (the tables)
and train_demo.png (training curve; BLEU against parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hat_edge.checkpoint import load_checkpoint  # noqa: E402
from hat_edge.data.corpus import DataSpec  # noqa: E402
from hat_edge.evaluate import ValidLoss, bleu  # noqa: E402
from hat_edge.space import Arch, SearchSpace  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def pick_archs(space: SearchSpace, n: int, seed: int = 0) -> list[tuple[str, Arch]]:
    """smallest, largest and n-2 sampled archs at evenly spaced parameter counts between them."""
    lo, hi = space.smallest(), space.largest()
    pool = sorted(space.sample_n(400, seed=seed), key=lambda a: a.params())
    picked: list[tuple[str, Arch]] = [("smallest", lo)]
    for k in range(1, n - 1):
        target = lo.params() + (hi.params() - lo.params()) * k / (n - 1)
        best = min(pool, key=lambda a: abs(a.params() - target))
        pool.remove(best)
        picked.append((f"sampled-{k}", best))
    picked.append(("largest", hi))
    return picked


def read_curve(run: Path | None) -> list[dict]:
    if run is None or not (run / "train_log.jsonl").exists():
        return []
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot(curve: list[dict], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tr = [r for r in curve if r["kind"] == "train"]
    va = [r for r in curve if r["kind"] == "valid"]
    if tr:
        a.plot([r["elapsed_ms"] / 60000 for r in tr], [r["nll"] for r in tr], label="train (sampled arch)", lw=0.8)
    for key in ("largest", "smallest"):
        pts = [(r["elapsed_ms"] / 60000, r["valid_loss"][key]) for r in va if key in r["valid_loss"]]
        if pts:
            a.plot(*zip(*pts), "o-", label=f"valid ({key})")
    a.set_xlabel("training time (min)")
    a.set_ylabel("cross-entropy (nats/token)")
    a.set_title("demo SuperTransformer training")
    a.legend()
    b.plot([r["params"] / 1e6 for r in rows], [r["bleu"] for r in rows], "o-")
    for r in rows:
        b.annotate(r["name"], (r["params"] / 1e6, r["bleu"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    b.set_xlabel("parameters (M, HAT convention: no embeddings)")
    b.set_ylabel("test BLEU (sacrebleu, beam)")
    b.set_title("demo SubTransformers")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "demo-ddp"), help="training run dir (train_log.jsonl)")
    ap.add_argument("--checkpoint", default="demo")
    ap.add_argument("--archs", type=int, default=7, help="number of SubTransformers (>= 2)")
    ap.add_argument("--max-sentences", type=int, default=None, help="first N test pairs (default: all 1,000)")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "train_demo"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ck = load_checkpoint(args.checkpoint)
    test = DataSpec.from_dict(ck.meta["data"]).load().test
    if args.max_sentences:
        test = test.head(args.max_sentences)
    vl = ValidLoss(ck, corpus=test, max_sentences=None, max_len=None)
    fitness = ValidLoss(ck, split="valid", max_sentences=300)
    rows = []
    for name, arch in pick_archs(ck.space, args.archs):
        t0 = time.perf_counter()
        fit = fitness.loss(arch)
        fit_ms = (time.perf_counter() - t0) * 1000
        loss = vl.loss(arch)
        res = bleu(ck.model, ck.tokenizer, test, arch=arch, beam=args.beam)
        rows.append({
            "name": name, "params": arch.params(), "flops": arch.flops(), "test_loss": loss, "bleu": res.bleu,
            "valid_loss_300": fit, "valid_loss_ms": fit_ms, "bleu_ms": res.elapsed_ms, "arch": arch.to_dict(),
            "describe": arch.describe(), "example": {"src": test.src[0], "ref": test.tgt[0], "hyp": res.hypotheses[0]},
        })
        print(f"{name:12s} {arch.params() / 1e6:5.2f}M  test loss {loss:.3f}  BLEU {res.bleu:5.2f}  "
              f"(fitness {fit_ms:.0f} ms, BLEU {res.elapsed_ms / 1000:.0f} s)", flush=True)

    curve = read_curve(Path(args.run) if args.run else None)
    tc = ck.meta.get("train_config", {})
    doc = {
        "version": 1,
        "checkpoint": ck.path,
        "checkpoint_bytes": Path(ck.path).stat().st_size,
        "train_config": tc,
        "train_steps": ck.meta.get("step"),
        "train_elapsed_ms": ck.meta.get("elapsed_ms"),
        "hardware": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
        "test": {"n_sentences": len(test), "beam": args.beam, "signature": res.signature},
        "subtransformers": rows,
        "curve": curve,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Demo SuperTransformer: SubTransformers from smallest to largest",
        "",
        f"Checkpoint `{_rel(ck.path)}` ({doc['checkpoint_bytes'] / 1e6:.2f} MB, fp16), trained "
        f"{doc['train_steps']} steps in {(doc['train_elapsed_ms'] or 0) / 60000:.0f} min on {doc['hardware']['cpu']} "
        f"({doc['hardware']['cores']} cores, shared). Test split: {len(test)} pairs, beam {args.beam}, "
        f"`{res.signature}`.",
        "",
        "| arch | params (M) | GFLOPs (30+30 tok) | test loss | test BLEU | fitness ms (300 valid) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['flops'] / 1e9:.2f} | {r['test_loss']:.3f} | "
                     f"{r['bleu']:.2f} | {r['valid_loss_ms']:.0f} |")
    lines += ["", "Fitness ms: one `ValidLoss.loss(arch)` call (300 validation pairs, the search's fitness) "
              f"with {args.threads} threads, measured in passing on a machine shared with other jobs: "
              "it swings with their load.", ""]
    lines += ["", "Archs:", ""] + [f"- {r['name']}: {r['describe']}" for r in rows]
    lines += ["", f"Example (largest): `{rows[-1]['example']['src']}` -> `{rows[-1]['example']['hyp']}` "
              f"(reference `{rows[-1]['example']['ref']}`)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    plot(curve, rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
