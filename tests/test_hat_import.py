"""HAT's own checkpoints into hat-edge (`hat-edge import hat`, hat_edge/hat_import.py).

A checkpoint is laid out exactly as HAT saves one (a dict with an argparse.Namespace `args` and
the SuperTransformer-shaped `model` state dict under HAT's key names, tests/hat_reference.py),
with a small fairseq dictionary. The imported model is compared with an independent
re-implementation of HAT's TransformerSuperModel and fairseq's generator (tests/hat_reference.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hat_reference import EOS, PAD, HatReference, hat_args, hat_config, hat_state

from hat_edge.errors import UserError

WORDS = ("the a house is small big green red blue cat dog runs sleeps on under table chair window door "
         "das ein Haus ist klein groß grün rot blau Katze Hund läuft schläft auf unter Tisch Stuhl Fenster Tür").split()


def _dict_text(words) -> str:
    return "".join(f"{w} {100 - i}\n" for i, w in enumerate(words))


def _save_hat(path: Path, args: argparse.Namespace, state: dict) -> Path:
    # what fairseq's checkpoint_utils.save_state writes (minus the optimizer state, which import ignores)
    torch.save({"args": args, "model": state, "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
               "optimizer_name": "FairseqNAG", "num_updates": 40000}], "extra_state": {"val_loss": 4.25},
               "last_optimizer_state": None}, path)
    return path


@pytest.fixture(scope="module")
def hat_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hat")
    (d / "dict.en.txt").write_text(_dict_text(WORDS))
    V = 4 + len(WORDS)
    args = hat_args()
    state = hat_state(args, V, V, seed=1)
    _save_hat(d / "HAT_toy_super_space0.pt", args, state)
    return d, args, state


def _archs(space):
    a = space.largest().to_dict()
    b = dict(a, encoder_embed_dim=48, decoder_embed_dim=48, encoder_ffn_embed_dim=[64, 128, 96],
             encoder_self_attention_heads=[2, 4, 2], decoder_layer_num=2, decoder_ffn_embed_dim=[96, 64, 128],
             decoder_self_attention_heads=[2, 4, 4], decoder_ende_attention_heads=[4, 2, 2],
             decoder_arbitrary_ende_attn=[2, 1, -1])
    c = dict(a, decoder_layer_num=1, decoder_arbitrary_ende_attn=[1, -1, -1], encoder_embed_dim=64,
             decoder_embed_dim=48)
    return [a, b, c]


def _batch(rng, n: int, V: int):
    lens = rng.integers(3, 9, size=n)
    srcs = [list(rng.integers(4, V, size=k)) + [EOS] for k in lens]
    tgts = [list(rng.integers(4, V, size=k)) + [EOS] for k in rng.integers(2, 7, size=n)]
    return srcs, tgts


def _right_pad(seqs, width=None):
    w = width or max(len(s) for s in seqs)
    return torch.tensor([list(s) + [PAD] * (w - len(s)) for s in seqs])


def _left_pad(seqs):
    w = max(len(s) for s in seqs)
    return torch.tensor([[PAD] * (w - len(s)) + list(s) for s in seqs])


def test_import_keeps_fairseqs_ids_and_matches_hats_model(hat_files, tmp_path) -> None:
    """Log-probs equal HAT's TransformerSuperModel after set_sample_config (max |diff| <= 1e-4) for
    three SubTransformers, on the SuperTransformer and on the extracted SubTransformer; fairseq's
    ids (bos 0, pad 1, eos 2, unk 3; decoder starts with </s>) are kept."""
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.hat_import import import_hat
    from hat_edge.space import Arch

    d, args, state = hat_files
    out = import_hat(d / "HAT_toy_super_space0.pt", tmp_path / "toy.pt", src_dict=d / "dict.en.txt")
    assert out["vocab"] == {"src": 4 + len(WORDS), "tgt": 4 + len(WORDS), "joint": True}
    ck = load_checkpoint(tmp_path / "toy.pt")
    cfg = ck.model.cfg
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (1, 2, 2) and cfg.share_all_embeddings
    tok = ck.tokenizer
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.encode("the cat zebra", level="bpe") == [4, 4 + WORDS.index("cat"), 3, 2]
    sp = ck.space
    assert sp.encoder_embed_choice == (64, 48) and sp.decoder_layer_num_choice == (3, 2, 1) and sp.qkv_dim == 64

    ref = HatReference(args, state)
    rng = np.random.default_rng(0)
    V = 4 + len(WORDS)
    srcs, tgts = _batch(rng, 5, V)
    prev = [[EOS] + t[:-1] for t in tgts]
    worst = 0.0
    for a in _archs(sp):
        arch = Arch.from_dict(a)
        ref.set_sample_config(hat_config(a))
        want = ref.log_probs(_left_pad(srcs), _right_pad(prev))  # fairseq pads sources on the left
        with torch.no_grad():
            got_super = torch.log_softmax(ck.model(_right_pad(srcs), _right_pad(prev), arch), dim=-1)
            got_sub = torch.log_softmax(ck.model.extract(arch).eval()(_right_pad(srcs), _right_pad(prev)), dim=-1)
        for got in (got_super, got_sub):
            for i, t in enumerate(prev):
                diff = (got[i, : len(t)] - want[i, : len(t)])[:, [v for v in range(V) if v != PAD]].abs().max()
                worst = max(worst, float(diff))
    assert worst <= 1e-4, worst


def test_greedy_and_beam_tokens_equal_fairseqs_generator(hat_files, tmp_path) -> None:
    """HAT's test.sh decoding (beam 4, lenpen 0.6) and greedy: the same tokens as fairseq's
    SequenceGenerator over HAT's model, from PyTorch and from the exported ONNX bundle."""
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.exporters import export_bundle, translate, verify_bundle
    from hat_edge.hat_import import import_hat
    from hat_edge.model import decode
    from hat_edge.space import Arch

    d, args, state = hat_files
    import_hat(d / "HAT_toy_super_space0.pt", tmp_path / "toy.pt", src_dict=d / "dict.en.txt")
    ck = load_checkpoint(tmp_path / "toy.pt")
    ref = HatReference(args, state)
    rng = np.random.default_rng(3)
    V = 4 + len(WORDS)
    srcs, _ = _batch(rng, 6, V)
    a = _archs(ck.space)[1]
    ref.set_sample_config(hat_config(a))
    sub = ck.model.extract(Arch.from_dict(a)).eval()
    bundle = export_bundle(sub, tmp_path / "bundle", fmt="onnx", tokenizer=ck.tokenizer)
    v = verify_bundle(sub, bundle)
    assert v["tokens_equal"] and v["max_abs_diff"] < 1e-3
    max_b = 12  # fairseq's max_len_b; its loop runs max_len + 1 steps, the last EOS only
    for beam, lenpen in ((1, 1.0), (4, 0.6)):
        want = [ref.generate(s, beam, lenpen, max_len_b=max_b, min_len=1) for s in srcs]
        if beam == 1:
            got = decode.greedy(sub, _right_pad(srcs), max_len=max_b + 1, min_len=1)
        else:
            got = decode.beam(sub, _right_pad(srcs), beam=beam, max_len=max_b + 1, len_penalty=lenpen, min_len=1)
        assert [list(map(int, g)) for g in got] == want, beam
        onnx = translate(bundle, srcs, beam=beam, max_len=max_b + 1, len_penalty=lenpen, min_len=1)
        assert onnx == want, beam


@pytest.mark.parametrize("lenpen", [0.6, 1.0])
def test_the_runtimes_beam_search_is_fairseqs_on_many_small_models(lenpen: float) -> None:
    """On bigram models with a 6-symbol vocabulary (EOS among the candidates at most steps, so
    fairseq's EOS rules decide), the device's beam search picks fairseq's tokens for every seed."""
    from hat_reference import fairseq_beam

    from hat_edge.runtime.decoding import beam_search, greedy_search

    V = 6
    for seed in range(60):
        rng = np.random.default_rng(seed)
        logits = rng.normal(size=(9, V, V)) * 1.5  # per step and last token: no two hypotheses tie
        lp = logits - np.log(np.exp(logits).sum(axis=2, keepdims=True))
        lp[:, :, PAD] = -1e4  # the exported model pushes pad down itself (fairseq: -inf in the generator)
        for beam in (1, 2, 4):
            want = fairseq_beam(lambda tokens, lp=lp: torch.from_numpy(lp[tokens.size(1) - 1][tokens[:, -1].numpy()]),
                                beam, lenpen, 7, 1)

            def step(tok, order, lp=lp, calls=[]):  # noqa: B006 (one list per step function: its call count)
                calls.append(1)
                return lp[len(calls) - 1][tok]

            got = (greedy_search(step, 1, EOS, EOS, 8, min_len=1) if beam == 1 else
                   beam_search(step, 1, beam, EOS, EOS, 8, lenpen, min_len=1))
            assert got == [want], (seed, beam)


def test_import_with_separate_dictionaries_and_unequal_widths(tmp_path) -> None:
    """HAT's other layouts: separate source/target dictionaries of different sizes, decoder input and
    output tied, an encoder wider than the decoder (encoder_attn as q/k/v_proj_weight)."""
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.hat_import import import_hat
    from hat_edge.space import Arch

    src_words, tgt_words = WORDS[:20], WORDS[20:]
    (tmp_path / "dict.de.txt").write_text(_dict_text(src_words))
    (tmp_path / "dict.en.txt").write_text(_dict_text(tgt_words))
    args = hat_args(share_all_embeddings=False, share_decoder_input_output_embed=True, encoder_embed_dim=64,
                    decoder_embed_dim=48, decoder_embed_choice=[48, 32], decoder_ffn_embed_dim=96,
                    decoder_ffn_embed_dim_choice=[96, 64], decoder_output_dim=48, qkv_dim=32)
    Vs, Vt = 4 + len(src_words), 4 + len(tgt_words)
    state = hat_state(args, Vs, Vt, seed=2)
    assert "decoder.layers.0.encoder_attn.k_proj_weight" in state
    _save_hat(tmp_path / "iwslt.pt", args, state)
    import_hat(tmp_path / "iwslt.pt", tmp_path / "out.pt", src_dict=tmp_path / "dict.de.txt",
               tgt_dict=tmp_path / "dict.en.txt", src_lang="de", tgt_lang="en")
    ck = load_checkpoint(tmp_path / "out.pt")
    assert ck.model.cfg.src_vocab_size == Vs and ck.model.cfg.vocab_size == Vt
    ref = HatReference(args, state)
    a = dict(ck.space.largest().to_dict(), encoder_embed_dim=48, decoder_embed_dim=32, decoder_ffn_embed_dim=[64, 96, 64],
             decoder_self_attention_heads=[2, 4, 2], decoder_arbitrary_ende_attn=[2, -1, 1])
    ref.set_sample_config(hat_config(a))
    rng = np.random.default_rng(1)
    srcs = [list(rng.integers(4, Vs, size=k)) + [EOS] for k in (5, 3, 7)]
    prev = [[EOS] + list(rng.integers(4, Vt, size=k)) for k in (4, 6, 2)]
    want = ref.log_probs(_left_pad(srcs), _right_pad(prev))
    with torch.no_grad():
        got = torch.log_softmax(ck.model(_right_pad(srcs), _right_pad(prev), Arch.from_dict(a)), dim=-1)
    for i, t in enumerate(prev):
        assert float((got[i, : len(t)] - want[i, : len(t)])[:, 2:].abs().max()) <= 1e-4


def test_a_subtransformer_checkpoint_with_its_yaml_is_a_fixed_arch(hat_files, tmp_path) -> None:
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.cli import cli
    from hat_edge.space import Arch

    from hat_edge.hat_import import import_hat

    d, args, state = hat_files
    import_hat(d / "HAT_toy_super_space0.pt", tmp_path / "super.pt", src_dict=d / "dict.en.txt")
    arch = Arch.from_dict(_archs(load_checkpoint(tmp_path / "super.pt").space)[1])
    yml = tmp_path / "HAT_toy_raspberrypi@1.0s_bleu@1.0.yml"
    yml.write_text(arch.to_hat_yaml())
    r = CliRunner().invoke(cli, ["import", "hat", str(d / "HAT_toy_super_space0.pt"), "--dict", str(d / "dict.en.txt"),
                                 "--arch", str(yml), "--out", str(tmp_path / "sub.pt"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["arch"] == arch.to_dict()
    ck = load_checkpoint(tmp_path / "sub.pt")
    assert ck.default_arch() == arch and ck.meta["imported_from"]["arch"] == yml.name


def test_bad_hat_inputs_are_one_line_errors_naming_the_key_or_file(hat_files, tmp_path) -> None:
    from hat_edge.hat_import import import_hat

    d, args, state = hat_files
    dict_ = d / "dict.en.txt"

    def err(state_=None, args_=None, dict_path=dict_) -> str:
        p = _save_hat(tmp_path / "x.pt", args_ or args, state if state_ is None else state_)
        with pytest.raises(UserError) as e:
            import_hat(p, tmp_path / "o.pt", src_dict=dict_path)
        msg = str(e.value)
        assert "\n" not in msg and not (tmp_path / "o.pt").exists()
        return msg

    s = dict(state)
    del s["decoder.layers.1.encoder_attn.in_proj_bias"]
    assert "missing key 'decoder.layers.1.encoder_attn.in_proj_bias'" in err(s)
    s = dict(state, **{"decoder.layers.0.extra.weight": torch.zeros(3)})
    assert "unexpected key 'decoder.layers.0.extra.weight'" in err(s)
    s = dict(state, **{"encoder.layers.2.fc1.weight": torch.zeros(128, 32)})
    assert "'encoder.layers.2.fc1.weight' has shape [128, 32], expected [128, 64]" in err(s)
    small = tmp_path / "dict.small.txt"
    small.write_text(_dict_text(WORDS[:-3]))
    msg = err(dict_path=small)
    assert str(small) in msg and "symbols" in msg and "rows" in msg
    bad_args = argparse.Namespace(**{**vars(args), "encoder_normalize_before": True})
    assert "args.encoder_normalize_before" in err(args_=bad_args)
    bad_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "decoder_ffn_embed_dim_choice"})
    assert "decoder_ffn_embed_dim_choice" in err(args_=bad_args)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_a_crafted_pickle_is_refused_and_nothing_runs(tmp_path) -> None:
    from hat_edge.cli import cli

    _Evil.marker = str(tmp_path / "pwned")
    p = tmp_path / "HAT_evil.pt"
    torch.save({"args": argparse.Namespace(x=1), "model": {}, "payload": _Evil()}, p)
    (tmp_path / "dict.en.txt").write_text(_dict_text(WORDS))
    r = CliRunner().invoke(cli, ["import", "hat", str(p), "--dict", str(tmp_path / "dict.en.txt"), "--out",
                                 str(tmp_path / "o.pt")])
    assert r.exit_code != 0 and not (tmp_path / "pwned").exists() and not (tmp_path / "o.pt").exists()
    line = r.output.strip()
    assert "\n" not in line and "refused" in line and "system" in line and "Namespace" in line
    # a plain (non-torch) pickle with a global is refused the same way
    p2 = tmp_path / "plain.pt"
    p2.write_bytes(pickle.dumps({"args": argparse.Namespace(), "model": _Evil()}))
    r = CliRunner().invoke(cli, ["import", "hat", str(p2), "--dict", str(tmp_path / "dict.en.txt"), "--out",
                                 str(tmp_path / "o.pt")])
    assert r.exit_code != 0 and not (tmp_path / "pwned").exists() and "refused" in r.output


RAW_EN = ["The small cat sleeps under the table.", "A big dog runs on the green chair.",
          "The red door is small.", "A blue window & a red-green house.", "The dog's house is big."]
RAW_DE = ["Die kleine Katze schläft unter dem Tisch.", "Ein großer Hund läuft auf dem grünen Stuhl.",
          "Die rote Tür ist klein.", "Ein blaues Fenster & ein rot-grünes Haus.", "Das Haus des Hundes ist groß."]


@pytest.fixture(scope="module")
def hat_bpe(tmp_path_factory):
    """A HAT-layout checkpoint whose joint dictionary is the BPE'd text of a tiny corpus, its BPE
    codes (learned with subword-nmt) and a data directory of BPE'd valid/test text, imported."""
    import io

    from subword_nmt.learn_bpe import learn_bpe

    from hat_edge.data.fairseq import TextPipeline
    from hat_edge.hat_import import import_hat

    d = tmp_path_factory.mktemp("hatbpe")
    plain = TextPipeline("en", "de", None)
    tok_lines = [plain.tokenize(s, "en") for s in RAW_EN] + [plain.tokenize(s, "de") for s in RAW_DE]
    codes = io.StringIO()
    learn_bpe(io.StringIO("\n".join(tok_lines * 3) + "\n"), codes, num_symbols=40)
    (d / "bpe.codes").write_text(codes.getvalue())
    pipe = TextPipeline("en", "de", codes.getvalue())
    bpe_en = [pipe.encode(s, "en") for s in RAW_EN]
    bpe_de = [pipe.encode(s, "de") for s in RAW_DE]
    symbols = sorted({w for line in bpe_en + bpe_de for w in line.split()})
    (d / "dict.en.txt").write_text(_dict_text(symbols))
    data = d / "data"
    data.mkdir()
    for split in ("valid", "test"):
        (data / f"{split}.en").write_text("\n".join(bpe_en) + "\n")
        (data / f"{split}.de").write_text("\n".join(bpe_de) + "\n")
    V = 4 + len(symbols)
    args = hat_args()
    _save_hat(d / "HAT_toy.pt", args, hat_state(args, V, V, seed=4))
    import_hat(d / "HAT_toy.pt", d / "toy.pt", src_dict=d / "dict.en.txt", bpe_codes=d / "bpe.codes", data=data)
    return d, bpe_en, bpe_de


def test_raw_text_in_and_out_and_hats_bleu_end_to_end(hat_bpe) -> None:
    """Raw text -> Moses -> BPE -> fairseq ids and back is lossless; evaluate() on the BPE'd test
    set gives HAT's two BLEU figures, each equal to sacreBLEU computed here on the same output."""
    import sacrebleu

    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.evaluate import HAT_DECODING, evaluate, split_compounds, translate

    d, bpe_en, bpe_de = hat_bpe
    ck = load_checkpoint(d / "toy.pt")
    tok = ck.tokenizer
    for raw, bpe in zip(RAW_DE, bpe_de):
        ids = tok.encode(raw, side="tgt")
        assert ids == tok.encode(bpe, level="bpe", side="tgt") and 3 not in ids  # no <unk>
        assert tok.decode(ids) == raw  # detokenised, BPE removed
    moses = tok.pipeline.tokenize(RAW_DE[3], "de")  # fairseq's WMT preparation: escaped, -a dash splits
    assert "&amp;" in moses and "rot @-@ grünes" in moses and "@@ " in " ".join(bpe_de)
    arch = ck.space.sample_n(1, seed=3)[0]
    hyps_raw = translate(ck.model, tok, RAW_EN, arch=arch, decoding=HAT_DECODING)
    hyps_tok = translate(ck.model, tok, bpe_en, arch=arch, decoding=HAT_DECODING, level="bpe", out_level="tok")
    assert all("@@" not in h for h in hyps_raw + hyps_tok) and any(h for h in hyps_raw)
    assert hyps_raw == [tok.pipeline.detokenize(h, "de") for h in hyps_tok]  # same tokens from raw and BPE input
    res = evaluate(ck, arch, split="test")
    assert res["bleu_metric"] == "hat-normal" and res["beam"] == 4 and res["len_penalty"] == 0.6
    refs_tok = [tok.pipeline.tokenize(s, "de") for s in RAW_DE]
    want = sacrebleu.BLEU(tokenize="none", smooth_method="none", force=True).corpus_score(
        [split_compounds(h) for h in hyps_tok], [[split_compounds(r) for r in refs_tok]]).score
    assert res["bleu"] == pytest.approx(want)
    sacre = evaluate(ck, arch, split="test", metric="hat-sacre", do_bleu=True)
    from sacremoses import MosesDetokenizer

    det = MosesDetokenizer(lang="en")
    want = sacrebleu.BLEU().corpus_score([det.detokenize(h.split()) for h in hyps_tok],
                                         [[det.detokenize(r.split()) for r in refs_tok]]).score
    assert sacre["bleu"] == pytest.approx(want)
    # the references of a perfect system score 100 through the same path
    assert sacrebleu.BLEU(tokenize="none", force=True).corpus_score(
        [split_compounds(r) for r in refs_tok], [[split_compounds(r) for r in refs_tok]]).score == pytest.approx(100)


@pytest.mark.slow
@pytest.mark.ssh
def test_imported_model_deploys_on_local_cpu_and_over_ssh(hat_bpe, tmp_path, sshd_server, ssh_profile) -> None:
    """Export + verify + push + translate raw sentences on the device + benchmark, on local-cpu and
    on a board over the test sshd: the device's tokens equal the host's, the text comes back raw."""
    from local_device import fast_local_profile

    from hat_edge.app.deploy import deploy
    from hat_edge.checkpoint import load_checkpoint

    d, _, _ = hat_bpe
    ck = load_checkpoint(d / "toy.pt")
    arch = ck.space.sample_n(1, seed=5)[0]
    for profile in (fast_local_profile(tmp_path, ck.model.cfg.vocab_size), ssh_profile(sshd_server)):
        r = deploy(profile, arch=arch, checkpoint=str(d / "toy.pt"), sentences=RAW_EN[:3], references=RAW_DE[:3],
                   out_dir=tmp_path / f"bundle-{profile.name}", beam=4, benchmark=profile.transport == "local",
                   log=lambda m: None)
        assert r.ok and r.parity and len(r.translations) == 3
        assert all(t.host_equal and "@@" not in t.device and t.source in RAW_EN for t in r.translations)
        assert (Path(r.bundle) / "tokenizer.json").exists()
        if profile.transport == "local":
            assert r.bench["median_ms"] > 0


def test_every_checkpoint_command_takes_the_imported_file(hat_bpe, tmp_path) -> None:
    """evaluate, export and search through the CLI, as a user types them, on the imported model
    (deploy and run: the tests above and bench/hat_scale.py; loop shares search's fitness)."""
    from shared_data import HAT_LATENCY

    from hat_edge.cli import cli

    d, _, _ = hat_bpe
    ck = str(d / "toy.pt")
    run = CliRunner().invoke
    r = run(cli, ["evaluate", "--checkpoint", ck, "--max-sentences", "3", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.output.strip().splitlines()[-1])
    assert ev["bleu_metric"] == "hat-normal" and ev["beam"] == 4 and ev["n_sentences"] == 3 and ev["loss"] > 0
    r = run(cli, ["evaluate", "--checkpoint", ck, "--data", str(d / "data"), "--split", "valid", "--max-sentences", "2",
                  "--bleu", "hat-sacre", "--beam", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["bleu_metric"] == "hat-sacre"
    r = run(cli, ["export", "smallest", "--checkpoint", ck, "--out-dir", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "fairseq" and manifest["model"]["pad_id"] == 1
    r = run(cli, ["evaluate", "--bundle", str(tmp_path / "b"), "--checkpoint", ck, "--max-sentences", "2", "--json"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["predictor", "train", "--data", str(HAT_LATENCY / "wmt14ende_cpu_raspberrypi_all.csv"),
                  "--out", str(tmp_path / "pi.json")])
    assert r.exit_code == 0, r.output
    r = run(cli, ["search", "--checkpoint", ck, "--predictor", str(tmp_path / "pi.json"), "--budget", "1e9",
                  "--search-size", "quick", "--valid-sentences", "3", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert "encoder_embed_dim" in r.output
    r = run(cli, ["loop", "--checkpoint", ck, "--profile", "sim:hat-pi4", "--budget", "1e6", "--rounds", "1",
                  "--initial", "8", "--search-size", "quick", "--valid-sentences", "3", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["simulated"]
