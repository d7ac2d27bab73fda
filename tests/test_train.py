"""Training room: loss goes down on real text, exact resume, DDP (gloo, 2 CPU processes) equals one
process, fixed-arch training, the checkpoint format and its errors.

Everything runs on a small real slice of the vendored LibreOffice corpus with a tiny design space
(same code paths as the demo space, a fraction of the compute).
"""

from __future__ import annotations

import lzma
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hat_edge.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    ship_checkpoint,
)
from hat_edge.data.corpus import DEMO_CORPUS
from hat_edge.data.tokenizer import train_tokenizer
from hat_edge.errors import UserError
from hat_edge.space import SearchSpace
from hat_edge.train import LAST, TrainConfig, Trainer, learning_rate, sample_arch, train

TINY_SPACE = SearchSpace(
    name="tiny",
    encoder_embed_choice=(64, 48),
    decoder_embed_choice=(64, 48),
    encoder_ffn_embed_dim_choice=(128, 64),
    decoder_ffn_embed_dim_choice=(128, 64),
    encoder_layer_num_choice=(2,),
    decoder_layer_num_choice=(2, 1),
    encoder_self_attention_heads_choice=(4, 2),
    decoder_self_attention_heads_choice=(4, 2),
    decoder_ende_attention_heads_choice=(4, 2),
    decoder_arbitrary_ende_attn_choice=(-1, 1),
    qkv_dim=64,
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """1,200 real pairs as a TSV, the tiny space as a file, and a 300-piece tokenizer trained on them."""
    d = tmp_path_factory.mktemp("train_corpus")
    with lzma.open(DEMO_CORPUS, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(1200)]
    (d / "c.tsv").write_text("".join(lines), encoding="utf-8")
    TINY_SPACE.save(d / "tiny.yml")
    texts = [s for line in lines for s in line.rstrip("\n").split("\t")]
    train_tokenizer(texts, vocab_size=300).save(d)
    return d


def tiny_cfg(d: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(d / "c.tsv"), valid_size=100, test_size=100, max_len=64, tokenizer=str(d / "tokenizer.model"),
        space=str(d / "tiny.yml"), dropout=0.1, attention_dropout=0.1, max_tokens=300, lr=3e-3, warmup_steps=4,
        max_steps=12, seed=7, out_dir=str(out), valid_sentences=60, valid_every_steps=0, save_every_steps=1000,
        log_every_steps=2, progress=False, device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# pure pieces
# ------------------------------------------------------------------------------------------------
def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, max_steps=110, warmup_init_lr=0.0)
    lrs = [learning_rate(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert learning_rate(110, cfg) == pytest.approx(1e-5)
    inv = replace(cfg, schedule="inverse-sqrt")
    assert learning_rate(39, inv) == pytest.approx(1e-3 * (10 / 40) ** 0.5)


def test_arch_per_step_is_seeded_and_varied():
    a = [sample_arch(TINY_SPACE, 1, s) for s in range(20)]
    assert a == [sample_arch(TINY_SPACE, 1, s) for s in range(20)]
    assert len(set(a)) > 10 and all(TINY_SPACE.contains(x) for x in a)
    assert a != [sample_arch(TINY_SPACE, 2, s) for s in range(20)]


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def test_a_few_steps_on_real_text_lower_the_loss(corpus_dir, tmp_path):
    tr = Trainer.create(tiny_cfg(corpus_dir, tmp_path), resume=False, log=lambda m: None)
    before = tr.validate()
    losses = [tr.step().loss for _ in range(12)]
    after = tr.validate()
    assert after["largest"] < before["largest"] - 0.5, (before, after)
    assert after["smallest"] < before["smallest"] - 0.5
    assert sum(losses[-3:]) < sum(losses[:3])
    assert before["largest"] == pytest.approx(torch.log(torch.tensor(300.0)).item(), abs=1.0)  # starts near uniform


def test_resume_after_interruption_continues_exactly(corpus_dir, tmp_path):
    """A run 'killed' after step 3 (last checkpoint at step 2) and resumed = an uninterrupted run."""
    cfg_a = tiny_cfg(corpus_dir, tmp_path / "a")
    a = Trainer.create(cfg_a, resume=False, log=lambda m: None)
    batches_a = []
    for _ in range(5):
        batches_a.append(a.next_indices())
        a.step()
    final_a = _state(a.model)

    cfg_b = tiny_cfg(corpus_dir, tmp_path / "b")
    b = Trainer.create(cfg_b, resume=False, log=lambda m: None)
    b.step()
    b.step()
    b.save(Path(cfg_b.out_dir) / LAST)
    b.step()  # work after the last checkpoint: lost in the "kill"
    del b
    torch.manual_seed(12345)  # a new process would start with other RNG states
    random.seed(999)
    c = Trainer.create(cfg_b, resume=True, log=lambda m: None)
    assert c.pos.step == 2
    assert c.next_indices() == batches_a[2]  # the same next batch
    for k in range(2, 5):
        assert c.next_indices() == batches_a[k]
        c.step()
    final_c = _state(c.model)
    assert final_a.keys() == final_c.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_c[k]), k  # bit-identical weights (dropout on)


def test_train_function_resumes_and_extends(corpus_dir, tmp_path):
    """The CLI path: train 3 steps, run again to 6 -> same weights as one 6-step run; log written."""
    kw = dict(schedule="inverse-sqrt", log_every_steps=1)
    once = train(tiny_cfg(corpus_dir, tmp_path / "once", max_steps=6, **kw), log=lambda m: None)
    train(tiny_cfg(corpus_dir, tmp_path / "twice", max_steps=3, **kw), log=lambda m: None)
    twice = train(tiny_cfg(corpus_dir, tmp_path / "twice", max_steps=6, **kw), log=lambda m: None)
    assert once.steps == twice.steps == 6
    sa = read_checkpoint(once.last_checkpoint)["state_dict"]
    sb = read_checkpoint(twice.last_checkpoint)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log = (tmp_path / "twice" / "train_log.jsonl").read_text().splitlines()
    assert len([ln for ln in log if '"kind": "train"' in ln]) == 6
    # the same out-dir with a different data-defining setting is refused, not silently mixed
    with pytest.raises(UserError, match="max_tokens"):
        train(tiny_cfg(corpus_dir, tmp_path / "twice", max_steps=8, max_tokens=500, **kw), log=lambda m: None)


def test_fixed_arch_trains_that_arch(corpus_dir, tmp_path):
    arch = TINY_SPACE.smallest()
    arch.save(tmp_path / "small.yml")
    cfg = tiny_cfg(corpus_dir, tmp_path / "fixed", arch=str(tmp_path / "small.yml"), max_steps=3)
    s = train(cfg, log=lambda m: None)
    assert set(s.valid) == {"arch"}
    ck = load_checkpoint(s.last_checkpoint)
    assert ck.arch == arch and ck.default_arch() == arch


# ------------------------------------------------------------------------------------------------
# DDP: 2 CPU processes with gloo == 1 process on the combined batch
# ------------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, cfg: TrainConfig, init_file: str, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tr = Trainer.create(cfg, resume=False, log=lambda m: None)
        assert tr.dist.world_size == world and isinstance(tr.ddp, torch.nn.parallel.DistributedDataParallel)
        idx = tr.next_indices()
        res = tr.step()
        grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in tr.model.named_parameters()}
        torch.save({"idx": idx, "grads": grads, "state": _state(tr.model), "loss": res.loss, "ntokens": res.ntokens},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(corpus_dir, tmp_path):
    import torch.multiprocessing as mp

    # dropout 0: ranks draw different dropout masks, which one process cannot reproduce
    kw = dict(dropout=0.0, attention_dropout=0.0, label_smoothing=0.1, max_tokens=250)
    cfg2 = tiny_cfg(corpus_dir, tmp_path / "ddp", update_freq=1, **kw)
    mp.spawn(_ddp_worker, args=(2, cfg2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)

    # one process, two micro-batches = the two ranks' batches (rank r gets batch u*W + r)
    cfg1 = tiny_cfg(corpus_dir, tmp_path / "one", update_freq=2, **kw)
    one = Trainer.create(cfg1, resume=False, log=lambda m: None)
    assert sorted(one.next_indices()) == sorted(r0["idx"] + r1["idx"])
    res = one.step()
    assert res.ntokens == r0["ntokens"] == r1["ntokens"]  # all-reduced token count
    assert res.loss == pytest.approx(r0["loss"], rel=1e-6)
    n_unused = 0
    for n, p in one.model.named_parameters():
        g0, g1 = r0["grads"][n], r1["grads"][n]
        if p.grad is None:
            n_unused += 1
            assert g0 is None or torch.count_nonzero(g0) == 0, n
            continue
        assert torch.equal(g0, g1), n  # both ranks hold the same averaged gradient
        torch.testing.assert_close(g0, p.grad, rtol=1e-4, atol=1e-7, msg=n)
    for n, v in _state(one.model).items():
        torch.testing.assert_close(r0["state"][n], v, rtol=1e-4, atol=1e-6, msg=n)
    arch = sample_arch(TINY_SPACE, cfg1.seed, 0)
    if arch.decoder_layer_num < 2:
        assert n_unused > 0  # a shallow arch leaves layers unused: DDP must cope (find_unused_parameters)


# ------------------------------------------------------------------------------------------------
# checkpoint format
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck")
    return Path(train(tiny_cfg(corpus_dir, out, max_steps=2), log=lambda m: None).last_checkpoint)


def test_checkpoint_roundtrip_and_fields(tiny_ckpt, corpus_dir):
    doc = read_checkpoint(tiny_ckpt)
    assert doc["format"] == CHECKPOINT_FORMAT and doc["version"] == 1
    assert doc["train_state"]["position"]["step"] == 2 and doc["meta"]["data"]["n_test"] == 100
    ck = load_checkpoint(tiny_ckpt)
    assert not ck.model.training and ck.space == TINY_SPACE and ck.tokenizer.vocab_size == 300
    src = torch.tensor([ck.tokenizer.encode("Find Bar")])
    prev = torch.tensor([[2] + ck.tokenizer.encode("Suchleiste")[:-1]])
    arch = TINY_SPACE.largest()
    with torch.no_grad():
        ref = ck.model(src, prev, arch)
    again = load_checkpoint(save_checkpoint(corpus_dir / "again.pt", ck.model, ck.tokenizer, ck.space, meta=ck.meta))
    with torch.no_grad():
        assert torch.equal(again.model(src, prev, arch), ref)


def test_shipped_checkpoint_is_fp16_and_small(tiny_ckpt, tmp_path):
    shipped = ship_checkpoint(tiny_ckpt, tmp_path / "ship.pt")
    doc = read_checkpoint(shipped)
    assert doc["train_state"] is None and doc["meta"]["weights_dtype"] == "float16"
    assert all(v.dtype == torch.float16 for v in doc["state_dict"].values() if v.is_floating_point())
    assert shipped.stat().st_size < 0.3 * tiny_ckpt.stat().st_size  # no Adam moments, half precision
    a, b = load_checkpoint(tiny_ckpt), load_checkpoint(shipped)
    src = torch.tensor([a.tokenizer.encode("Enter the text to be searched.")])
    prev = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(a.model(src, prev), b.model(src, prev), rtol=0, atol=2e-2)


def test_checkpoint_errors_are_one_line(tmp_path, tiny_ckpt):
    with pytest.raises(UserError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(bad)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(tiny_ckpt.read_bytes()[: 5000])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(trunc)
    other = tmp_path / "other.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 99}, other)
    with pytest.raises(UserError, match="field 'version' is 99"):
        load_checkpoint(other)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(UserError, match="field 'format'"):
        load_checkpoint(foreign)
    with pytest.raises(UserError, match="is a directory"):
        load_checkpoint(tmp_path)
