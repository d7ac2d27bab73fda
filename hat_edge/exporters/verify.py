"""Parity of an exported bundle with the PyTorch SubTransformer it came from.

Two levels:
- `graph_parity` (run at every export, cheap): encoder outputs for a padded batch, and the
  decoder step at the first step (empty caches) and with a past of 5, compared with eager PyTorch.
- `verify_bundle` (`hat-edge export --verify`): the above at shapes other than the trace's, plus
  greedy and beam (5) decoding of a few sources through the bundle's runtime with the device's own
  loop (`hat_edge.runtime.backends.translate`) against `hat_edge.model.decode` on the PyTorch model.

Log-prob differences leave out the pad column: the model adds a constant -1e4 there so search
never picks pad, and at that magnitude float32 spacing (~1e-3) would swamp the 1e-4 tolerance
without saying anything about the graphs.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from hat_edge.errors import UserError
from hat_edge.exporters.bundle import Bundle, load_bundle, update_parity
from hat_edge.exporters.graphs import example_decoder_inputs, example_source
from hat_edge.model import SubTransformer, decode
from hat_edge.runtime.backends import Model, OrtModel, TorchScriptModel, translate
from hat_edge.runtime.decoding import _topk_stable
from hat_edge.runtime.formats import TOPK_INPUT

TOPK_PARITY_K = 10  # k the graph's TopK is checked at (beam 5's 2 * beam)

FP32_TOLERANCE = 1e-4
# int8 changes the numbers, so tokens may differ: the share of tokens equal to PyTorch's is the
# figure, shown against these levels, measured on real sentences (`verify_bundle(sources=...)`; the
# demo's largest SubTransformer on its first 20 test sentences, this AMD EPYC: greedy 0.97, beam 0.92).
INT8_AGREEMENT = {"greedy": 0.9, "beam": 0.8}


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _max_diff(a: Sequence[Any], b: Sequence[Any], pad_col: Optional[int] = None) -> float:
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = _np(x).astype(np.float64), _np(y).astype(np.float64)
        if x.shape != y.shape:
            return float("inf")
        if i == 0 and pad_col is not None:  # log_probs (N, V)
            x, y = np.delete(x, pad_col, axis=-1), np.delete(y, pad_col, axis=-1)
        if x.size:
            worst = max(worst, float(np.abs(x - y).max()))
    return worst


def _step_inputs_runtime(model: Model, inputs: Sequence[torch.Tensor]) -> list:
    if isinstance(model, TorchScriptModel):
        return [t.to(model.device) for t in inputs]
    return [_np(t) for t in inputs]


def _run_decoder(model: Model, inputs: Sequence[torch.Tensor]) -> list:
    args = _step_inputs_runtime(model, inputs)
    if isinstance(model, OrtModel):
        feed = dict(zip(model.dec_in, args))
        if TOPK_INPUT in model.dec_in:  # the search's TopK (compared with PyTorch's log-probs below)
            feed[TOPK_INPUT] = np.array([TOPK_PARITY_K], dtype=np.int64)
        return model.dec.run(None, feed)
    with torch.inference_mode():
        return list(model.dec(*args))


@torch.no_grad()
def graph_parity(sub: SubTransformer, bundle: Bundle, batch: int = 3, src_len: int = 9, rows: int = 4) -> dict:
    """max |diff| of encoder outputs and decoder-step outputs (first step and past 5) vs PyTorch.

    Shapes differ from the trace's example shapes on purpose (dynamic axes at work).
    """
    sub = sub.eval()
    model = bundle.open(threads=None)
    src = example_source(sub, batch=batch, src_len=src_len, seed=11)
    ref_enc = sub.encode(src)
    got_enc = model.encode(_np(src))
    enc_diff = _max_diff(ref_enc, got_enc)
    pad = sub.cfg.pad_id
    dec_diff = 0.0
    topk_ok: Optional[bool] = None
    for past in (0, 5):
        if past == 0:
            enc = sub.encode(example_source(sub, batch=rows, src_len=src_len, seed=12))
            inputs = (torch.full((rows, 1), sub.cfg.bos_id, dtype=torch.long), torch.tensor([0]),
                      *[t.clone() for t in enc], *[c.clone() for c in sub.init_self_cache(rows)])
        else:
            inputs = example_decoder_inputs(sub, rows=rows, past=past, src_len=src_len, seed=13)
        ref = sub.decode_step(*inputs)
        got = _run_decoder(model, inputs)
        dec_diff = max(dec_diff, _max_diff(ref, got, pad_col=pad))
        if len(got) == len(ref) + 2:  # the graph's TopK: exactly the search's choice over its own log-probs
            lp = np.asarray(got[0])
            want = _topk_stable(lp, min(TOPK_PARITY_K, lp.shape[1]))
            ok = bool(np.array_equal(np.asarray(got[-1]), want)
                      and np.array_equal(np.asarray(got[-2]), np.take_along_axis(lp, want, axis=1)))
            topk_ok = ok if topk_ok is None else (topk_ok and ok)
    out: dict[str, Any] = {
        "encoder_max_abs_diff": enc_diff,
        "decoder_max_abs_diff": dec_diff,
        "max_abs_diff": max(enc_diff, dec_diff),
    }
    if topk_ok is not None:
        out["topk_equal"] = topk_ok
    return out


def token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens the two outputs have in common once aligned (difflib's longest matching
    blocks, over the longer of each pair): one token inserted early does not count every later
    token as different, as a position-by-position comparison would."""
    same = total = 0
    for x, y in zip(a, b):
        if not x and not y:  # both translated to nothing at once: they agree
            same, total = same + 1, total + 1
            continue
        total += max(len(x), len(y))
        same += sum(m.size for m in difflib.SequenceMatcher(None, x, y, autojunk=False).get_matching_blocks())
    return same / total if total else 1.0


@torch.no_grad()
def verify_bundle(sub: SubTransformer, bundle_dir: str | Path, sentences: int = 3, src_len: int = 12,
                  beam: int = 5, max_len: int = 20, record: bool = True,
                  sources: Sequence[Sequence[int]] | None = None) -> dict:
    """Run PyTorch and the bundle on the same inputs; returns figures (and records them).

    Keys: max_abs_diff, encoder_max_abs_diff, decoder_max_abs_diff, tokens_equal (greedy AND beam
    token-identical), greedy_equal, beam_equal, greedy_agreement, beam_agreement (share of equal
    tokens), precision, tolerance, passed (fp32: max_abs_diff <= 1e-4 and tokens_equal; int8: no
    threshold, the agreement is the figure), sentences, max_len, beam, source ("random ids" or
    "given").

    `sources`: real sentences as token ids (EOS-terminated), decoded instead of random ids. int8's
    agreement is only meaningful on them: on random ids a trained model's next-token distribution
    is flat, so int8 rounding flips near-ties (the demo's largest SubTransformer, this AMD EPYC
    without VNNI: about 0.5 on random ids, greedy 0.97 and beam 0.92 on 20 test sentences).
    """
    bundle = load_bundle(bundle_dir)
    if bundle.arch != sub.arch:
        raise UserError(f"bundle {bundle_dir} holds arch {bundle.arch.describe()}, not the model's "
                        f"{sub.arch.describe()}")
    sub = sub.eval()
    figures = graph_parity(sub, bundle)
    model = bundle.open()
    # sources of unequal length (right-padded): the runtime sees a real padded batch
    if sources:
        width = max(len(x) for x in sources)
        src = torch.tensor([list(x) + [sub.cfg.pad_id] * (width - len(x)) for x in sources], dtype=torch.long)
        sentences = len(sources)
    else:
        src = example_source(sub, batch=sentences, src_len=src_len, seed=21)
    src_np = _np(src)
    ref_greedy = decode.greedy(sub, src, max_len=max_len)
    ref_beam = decode.beam(sub, src, beam=beam, max_len=max_len)
    got_greedy = translate(model, src_np, beam=1, max_len=max_len)
    got_beam = translate(model, src_np, beam=beam, max_len=max_len)
    greedy_equal, beam_equal = ref_greedy == got_greedy, ref_beam == got_beam
    precision = bundle.precision
    out = {
        **figures,
        "tokens_equal": bool(greedy_equal and beam_equal),
        "greedy_equal": bool(greedy_equal),
        "beam_equal": bool(beam_equal),
        "greedy_agreement": token_agreement(ref_greedy, got_greedy),
        "beam_agreement": token_agreement(ref_beam, got_beam),
        "precision": precision,
        "runtime": bundle.runtime,
        "tolerance": FP32_TOLERANCE if precision == "fp32" else None,
        "sentences": sentences,
        "source": "given" if sources else "random ids",
        "beam": beam,
        "max_len": max_len,
    }
    out["passed"] = bool(out["max_abs_diff"] <= FP32_TOLERANCE and out["tokens_equal"]) if precision == "fp32" else True
    if record:
        update_parity(bundle, {"verify": out})
    return out
