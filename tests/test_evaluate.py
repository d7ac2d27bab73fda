"""Evaluation room: the loss (label smoothing, pads), ValidLoss (the search's fitness), BLEU of the
bundled demo model (torch and exported bundle), and `hat-edge evaluate --json`."""

from __future__ import annotations

import json
import lzma
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from hat_edge.checkpoint import DEMO_CHECKPOINT, load_checkpoint
from hat_edge.data.corpus import DEMO_CORPUS, DataSpec, ParallelCorpus
from hat_edge.data.tokenizer import train_tokenizer
from hat_edge.errors import UserError
from hat_edge.evaluate import ValidLoss, bleu, evaluate, loss_sums, mean_loss, translate
from hat_edge.space import SpaceError
from hat_edge.train import train


# ------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------
def test_loss_sums_match_cross_entropy_and_fairseq_smoothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)
    target = torch.randint(4, 11, (3, 5), generator=g)
    target[0, 3:] = 0  # pad
    target[2, 1:] = 0
    loss, nll = loss_sums(logits, target, 0.0)
    ref = F.cross_entropy(logits.view(-1, 11), target.view(-1), ignore_index=0, reduction="sum")
    assert torch.allclose(loss, ref) and torch.allclose(nll, ref)
    eps = 0.1
    loss, nll = loss_sums(logits, target, eps)
    lp = logits.log_softmax(-1)
    mask = target != 0
    manual = 0.0
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                y = target[b, t]
                others = torch.cat([lp[b, t, :y], lp[b, t, y + 1 :]])
                manual += -(1 - eps) * lp[b, t, y] - eps / 10 * others.sum()
    assert loss.item() == pytest.approx(float(manual), rel=1e-5)
    assert nll.item() == pytest.approx(ref.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# ValidLoss on a small trained checkpoint
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from test_train import TINY_SPACE, tiny_cfg

    d = tmp_path_factory.mktemp("eval_corpus")
    with lzma.open(DEMO_CORPUS, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(1200)]
    (d / "c.tsv").write_text("".join(lines), encoding="utf-8")
    TINY_SPACE.save(d / "tiny.yml")
    train_tokenizer([s for ln in lines for s in ln.rstrip("\n").split("\t")], 300).save(d)
    s = train(tiny_cfg(d, d / "run", max_steps=8), log=lambda m: None)
    return Path(s.last_checkpoint)


def test_valid_loss_is_cached_per_arch_and_matches_mean_loss(tiny_run):
    ck = load_checkpoint(tiny_run)
    vl = ValidLoss(ck, split="valid", max_sentences=50)
    assert vl.n_sentences == 50 and vl.n_tokens > 50
    big, small = ck.space.largest(), ck.space.smallest()
    l_big = vl.loss(big)
    assert vl.cache_size == 1 and vl(big) == l_big and vl.cache_size == 1
    assert l_big == pytest.approx(mean_loss(ck.model, vl.batches, big), rel=1e-6)
    assert vl.loss(small) != l_big and vl.cache_size == 2
    assert 0 < l_big < math.log(300) + 1
    bad = ck.space.largest().__class__.uniform(512, 2048, 8, 2, 2, qkv_dim=64)
    with pytest.raises(SpaceError):
        vl.loss(bad)


def test_split_comes_from_the_checkpoint_data_spec(tiny_run):
    ck = load_checkpoint(tiny_run)
    spec = DataSpec.from_dict(ck.meta["data"])
    assert (spec.n_valid, spec.n_test) == (100, 100)
    res = evaluate(ck, ck.space.smallest(), split="test", max_sentences=5, beam=2)
    assert res["n_sentences"] == 5 and res["loss"] > 0 and 0 <= res["bleu"] <= 100


def test_super_and_extracted_sub_translate_alike(tiny_run):
    ck = load_checkpoint(tiny_run)
    arch = ck.space.smallest()
    src = ["Find Bar", "Enter the text to be searched in the document."]
    a = translate(ck.model, ck.tokenizer, src, arch=arch, beam=3)
    b = translate(ck.model.extract(arch), ck.tokenizer, src, beam=3)
    assert a == b and len(a) == 2
    with pytest.raises(UserError, match="needs an arch"):
        translate(ck.model, ck.tokenizer, src, arch=None)


# ------------------------------------------------------------------------------------------------
# the bundled demo model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    assert DEMO_CHECKPOINT.exists(), "the demo checkpoint must ship in hat_edge/assets/demo"
    return load_checkpoint("demo")


@pytest.fixture(scope="module")
def demo_test_head(demo) -> ParallelCorpus:
    return DataSpec.from_dict(demo.meta["data"]).load().test.head(8)


def test_demo_checkpoint_fits_the_package_budget(demo):
    assert DEMO_CHECKPOINT.stat().st_size <= 12_000_000
    assert demo.space.name == "demo" and demo.meta["weights_dtype"] == "float16"
    assert demo.tokenizer.vocab_size == demo.model.cfg.vocab_size


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_demo_model_translates_a_handful_of_test_sentences(demo, demo_test_head, which):
    arch = demo.space.largest() if which == "largest" else demo.space.smallest()
    res = bleu(demo.model, demo.tokenizer, demo_test_head, arch=arch, beam=5)
    assert res.n_sentences == 8 and res.bleu > 0, res.hypotheses
    assert sum(bool(h.strip()) for h in res.hypotheses) == 8


def test_demo_valid_loss_is_fast_and_learned(demo):
    vl = ValidLoss(demo, split="valid", max_sentences=300)
    t0 = time.perf_counter()
    big = vl.loss(demo.space.largest())
    dt = time.perf_counter() - t0
    small = vl.loss(demo.space.smallest())
    assert big < 4.0 and small < 4.5  # a uniform guess over 4,000 pieces is 8.3 nats
    assert big < small  # the wider, deeper SubTransformer is better
    assert dt < 10.0, f"ValidLoss took {dt:.1f} s for one arch (budget: well under 1 s on 2 free cores)"


def test_cli_evaluate_json(demo):
    from hat_edge.cli import cli

    res = CliRunner().invoke(
        cli, ["evaluate", "--checkpoint", "demo", "--arch", "smallest", "--split", "test", "--max-sentences", "4",
              "--beam", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output.strip().splitlines()[-1])
    assert d["n_sentences"] == 4 and d["loss"] > 0 and d["bleu"] >= 0 and d["split"] == "test"
    bad = CliRunner().invoke(cli, ["evaluate", "--checkpoint", "nope.pt", "--json"])
    assert bad.exit_code != 0 and "nope.pt: no such checkpoint file" in bad.output


@pytest.mark.slow
def test_bleu_of_an_exported_bundle_matches_torch(demo, demo_test_head, tmp_path):
    from hat_edge.exporters import export_bundle

    arch = demo.space.smallest()
    sub = demo.model.extract(arch)
    out = export_bundle(sub, tmp_path / "bundle", fmt="onnx", tokenizer=demo.tokenizer)
    ref = bleu(sub, demo.tokenizer, demo_test_head, beam=5)
    got = bleu(out, None, demo_test_head, beam=5)  # tokenizer read from the bundle
    same = sum(a == b for a, b in zip(ref.hypotheses, got.hypotheses))
    assert got.bleu > 0 and same >= 7, (ref.hypotheses, got.hypotheses)
