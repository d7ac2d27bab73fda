"""The search's fitness at HAT's scale: a WMT-size SuperTransformer imported on 2 CPU cores (#24).

1. cost: a checkpoint laid out as HAT's `HAT_wmt14ende_super_space0.pt` (space0: 640/512 wide,
   6 + 6 layers, FFN 3072, 8 heads, qkv 512, a 32k joint dictionary; random weights, since the
   published files cannot be downloaded here) goes through `hat-edge import hat`; then the fitness
   (`ValidLoss`, teacher-forced validation loss) of random SubTransformers is timed at several
   validation sizes, on sentences with newstest2013's length profile (mean ~29 BPE tokens).
2. noise: what fewer sentences cost in ranking, on a *trained* model (the bundled demo; there is
   no trained WMT SuperTransformer here): Kendall's tau and the mean |loss difference| between the
   loss on N sentences and on all 1,000 validation sentences, over random archs.

3. with --run: `hat-edge run --checkpoint <that import>` on local-cpu, fresh cache, its wall time
   and outcome (budget met, winner vs largest side by side); BLEU on --bleu-sentences test
   sentences (random weights never emit EOS, so each decodes to HAT's 200-token bound).

    .venv/bin/python bench/hat_scale.py                 # ~10 min on 2 cores
    .venv/bin/python bench/hat_scale.py --sizes 30,60 --archs 3
    .venv/bin/python bench/hat_scale.py --only-run      # the run alone, ~15 min

Writes bench/results/hat_scale.json and prints two tables.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
from _results import write_json  # noqa: E402
from hat_reference import hat_args, hat_state  # noqa: E402  (HAT's checkpoint layout, tests/)

SPACE0 = dict(
    encoder_embed_dim=640, decoder_embed_dim=640, encoder_ffn_embed_dim=3072, decoder_ffn_embed_dim=3072,
    encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8, qkv_dim=512,
    encoder_embed_choice=[640, 512], decoder_embed_choice=[640, 512],
    encoder_ffn_embed_dim_choice=[3072, 2048, 1024], decoder_ffn_embed_dim_choice=[3072, 2048, 1024],
    encoder_layer_num_choice=[6], decoder_layer_num_choice=[6, 5, 4, 3, 2, 1],
    encoder_self_attention_heads_choice=[8, 4], decoder_self_attention_heads_choice=[8, 4],
    decoder_ende_attention_heads_choice=[8, 4], decoder_arbitrary_ende_attn_choice=[-1, 1, 2],
    decoder_output_dim=640,
)


def wmt_size_import(d: Path, vocab: int = 32768, n_valid: int = 3000, seed: int = 0) -> Path:
    """A HAT-layout space0 checkpoint, its dictionary and BPE-level valid text; imported."""
    from hat_edge.hat_import import import_hat

    args = hat_args(**SPACE0)
    n_sym = vocab - 4
    (d / "dict.en.txt").write_text("".join(f"w{i} {n_sym - i}\n" for i in range(n_sym)))
    torch.save({"args": args, "model": hat_state(args, vocab, vocab, seed=seed)}, d / "HAT_wmt_size_super_space0.pt")
    rng = np.random.default_rng(seed)
    data = d / "data"
    data.mkdir()
    for split, n in (("valid", n_valid), ("test", 200)):
        for lang in ("en", "de"):
            # newstest2013 after BPE 32k: ~29 tokens a sentence, long right tail
            lens = np.clip(rng.lognormal(3.2, 0.55, size=n).astype(int), 2, 150)
            ids = [rng.zipf(1.3, size=k) % n_sym for k in lens]
            (data / f"{split}.{lang}").write_text("".join(" ".join(f"w{i}" for i in s) + "\n" for s in ids))
    out = d / "wmt_size.pt"
    import_hat(d / "HAT_wmt_size_super_space0.pt", out, src_dict=d / "dict.en.txt", data=data)
    return out


def time_fitness(ckpt_path: Path, sizes: list[int], n_archs: int, threads: int) -> list[dict]:
    from hat_edge.app.job import FITNESS_MAX_TOKENS
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.evaluate import ValidLoss

    torch.set_num_threads(threads)
    ck = load_checkpoint(ckpt_path)
    archs = ck.space.sample_n(n_archs, seed=1) + [ck.space.largest()]
    rows = []
    for n in sizes:
        vl = ValidLoss(ck, split="valid", max_sentences=n, max_tokens=FITNESS_MAX_TOKENS)
        vl.loss(archs[0])  # warm-up (allocations, first-call overheads)
        vl._cache.clear()
        per = []
        for a in archs:
            t0 = time.perf_counter()
            vl.loss(a)
            per.append(time.perf_counter() - t0)
        rows.append({"sentences": n, "tokens": vl.n_tokens, "threads": threads, "median_s": float(np.median(per)),
                     "max_s": float(max(per)), "largest_s": per[-1], "archs": len(archs)})
        print(f"  {n:5d} sentences ({vl.n_tokens} tokens), {threads} thread(s): median {np.median(per):.2f} s/arch, "
              f"largest {per[-1]:.2f} s", flush=True)
    return rows


def ranking_noise(sizes: list[int], n_archs: int) -> list[dict]:
    from scipy.stats import kendalltau

    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.evaluate import ValidLoss

    torch.set_num_threads(1)
    ck = load_checkpoint("demo")
    archs = ck.space.sample_n(n_archs, seed=2)
    full = ValidLoss(ck, split="valid", max_sentences=None)
    ref = np.array([full.loss(a) for a in archs])
    rows = []
    for n in sizes:
        vl = ValidLoss(ck, split="valid", max_sentences=n)
        got = np.array([vl.loss(a) for a in archs])
        tau = float(kendalltau(got, ref).statistic)
        # does the best-by-N arch stay near the true best? (what the search cares about)
        regret = float(ref[int(np.argmin(got))] - ref.min())
        rows.append({"sentences": n, "kendall_tau": tau, "mean_abs_diff": float(np.abs(got - got.mean() - (ref - ref.mean())).mean()),
                     "best_regret": regret, "archs": n_archs, "reference_sentences": full.n_sentences})
        print(f"  {n:5d} sentences: Kendall tau {tau:.3f} vs all {full.n_sentences}, best-arch regret {regret:.4f} nats",
              flush=True)
    return rows


def time_run(ckpt: Path, out: Path, bleu_sentences: int) -> dict:
    """`hat-edge run --checkpoint CKPT` on local-cpu with a fresh cache: wall time and outcome."""
    import json
    import os
    import subprocess

    exe = Path(sys.executable).with_name("hat-edge")
    env = dict(os.environ, HAT_EDGE_CACHE=str(out / "cache"))
    cmd = [str(exe), "run", "--checkpoint", str(ckpt), "--out-dir", str(out / "run"), "--no-progress", "--json",
           "--bleu-sentences", str(bleu_sentences)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "run.err").write_text(p.stderr)
    if p.returncode not in (0, 1):
        raise SystemExit(f"hat-edge run failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    s = json.loads(p.stdout.strip().splitlines()[-1])
    row = {"command": " ".join(cmd[1:]), "wall_s": wall, "exit": p.returncode, "met": s.get("met"),
           "initial_measurements": s.get("initial_measurements"), "device_measurements": s.get("device_measurements"),
           "fitness_evaluations": s.get("fitness_evaluations"), "speedup": s.get("speedup"),
           "timings_s": s.get("timings_s"), "job_wall_s": s.get("wall_s"), "bleu_sentences": bleu_sentences,
           "winner_params": (s.get("winner") or {}).get("params"), "largest_params": (s.get("largest") or {}).get("params")}
    print(f"  hat-edge run on the imported space0-size model: {wall:.0f} s, exit {p.returncode}, budget met "
          f"{row['met']}, {row['device_measurements']} measurements, {row['fitness_evaluations']} fitness evaluations",
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="30,60,120,300", help="validation sentences to time")
    ap.add_argument("--archs", type=int, default=5, help="random archs timed per size (+ the largest)")
    ap.add_argument("--noise-sizes", default="30,60,120,300,600")
    ap.add_argument("--noise-archs", type=int, default=30)
    ap.add_argument("--run", action="store_true", help="also time `hat-edge run` on the imported model")
    ap.add_argument("--only-run", action="store_true", help="only the run (keeps the rest of an existing JSON)")
    ap.add_argument("--bleu-sentences", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "hat_scale.json"))
    a = ap.parse_args()
    if a.only_run:
        import json

        doc = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {"version": 1}
        with tempfile.TemporaryDirectory() as tmp:
            doc["run"] = time_run(wmt_size_import(Path(tmp)), Path(tmp), a.bleu_sentences)
        write_json(a.out, doc)
        print(f"wrote {a.out}")
        return
    random.seed(0)
    sizes = [int(x) for x in a.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ck = wmt_size_import(Path(tmp))
        import_s = time.perf_counter() - t0
        print(f"import of a space0-size checkpoint (32k vocabulary): {import_s:.1f} s", flush=True)
        cost = time_fitness(ck, sizes, a.archs, 1) + time_fitness(ck, sizes[:2], a.archs, 2)
        run = time_run(ck, Path(tmp), a.bleu_sentences) if a.run else None
    print("ranking noise on the trained demo SuperTransformer:", flush=True)
    noise = ranking_noise([int(x) for x in a.noise_sizes.split(",")], a.noise_archs)
    write_json(a.out, {"version": 1, "machine": platform.machine(), "torch": torch.__version__,
                       "import_s": import_s, "fitness_cost": cost, "ranking_noise": noise,
                       **({"run": run} if run else {})})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
