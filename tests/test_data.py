"""Data room: corpus reading and its errors, the seeded split, the tokenizer, token-budget batching."""

from __future__ import annotations

import lzma

import numpy as np
import pytest
from click.testing import CliRunner

from hat_edge.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    DataSpec,
    EncodedPairs,
    EpochBatches,
    Tokenizer,
    collate,
    make_batches,
    read_pair,
    read_parallel,
    read_tsv,
    split_corpus,
    train_tokenizer,
)
from hat_edge.data.corpus import DEMO_CORPUS
from hat_edge.errors import UserError


@pytest.fixture(scope="module")
def real_pairs() -> list[tuple[str, str]]:
    """The first 1,500 pairs of the vendored LibreOffice help corpus (real text, read with lzma)."""
    with lzma.open(DEMO_CORPUS, "rt", encoding="utf-8") as fh:
        lines = [next(fh).rstrip("\n") for _ in range(1500)]
    return [tuple(line.split("\t")) for line in lines]  # type: ignore[misc]


@pytest.fixture(scope="module")
def small_tok(real_pairs) -> Tokenizer:
    return train_tokenizer([s for p in real_pairs for s in p], vocab_size=300)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def test_demo_corpus_reads_completely():
    c = read_parallel("demo")
    assert len(c) == 34205
    assert c.src[0] == "Find Bar" and c.tgt[0] == "Suchleiste"
    assert all(s and t for s, t in zip(c.src[:1000], c.tgt[:1000]))


def test_tsv_and_pair_read_the_same(tmp_path, real_pairs):
    pairs = real_pairs[:50]
    tsv = tmp_path / "c.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    (tmp_path / "c.en").write_text("".join(f"{s}\n" for s, _ in pairs), encoding="utf-8")
    (tmp_path / "c.de").write_text("".join(f"{t}\n" for _, t in pairs), encoding="utf-8")
    a = read_tsv(tsv)
    b = read_pair(tmp_path / "c.en", tmp_path / "c.de")
    assert a.src == b.src and a.tgt == b.tgt and len(a) == 50


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("a\tb\n\nc\td\n", 2, "empty line"),
        ("a\tb\nno tab here\n", 2, "found 1"),
        ("a\tb\nc\td\te\n", 2, "found 3"),
        ("a\tb\nc\t \n", 2, "empty target side"),
        ("\tb\n", 1, "empty source side"),
    ],
)
def test_malformed_tsv_lines_name_file_and_line(tmp_path, text, line, what):
    p = tmp_path / "bad.tsv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        read_tsv(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}: ") and what in msg and "\n" not in msg


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_bytes(b"a\tb\nc\t\xff\xfe\n")
    with pytest.raises(UserError, match=r"bad.tsv:2: not valid UTF-8"):
        read_tsv(p)


def test_mismatched_pair_and_empty_line(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "a.de").write_text("eins\nzwei\n")
    with pytest.raises(UserError) as e:
        read_pair(tmp_path / "a.en", tmp_path / "a.de")
    assert "a.en has 3 lines but" in str(e.value) and "a.de has 2" in str(e.value)
    (tmp_path / "b.en").write_text("one\n\nthree\n")
    (tmp_path / "b.de").write_text("eins\nzwei\ndrei\n")
    with pytest.raises(UserError, match=r"b.en:2: empty line"):
        read_pair(tmp_path / "b.en", tmp_path / "b.de")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_tsv(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(UserError, match="empty file"):
        read_tsv(tmp_path / "empty.tsv")


def test_cli_reports_a_bad_corpus_in_one_line(tmp_path):
    from hat_edge.cli import cli

    p = tmp_path / "bad.tsv"
    p.write_text("Hello\tHallo\nbroken line\n")
    res = CliRunner().invoke(cli, ["train", "--data", str(p), "--out-dir", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code != 0
    err_lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(err_lines) == 1 and f"{p}:2:" in err_lines[0], res.output
    assert "Traceback" not in res.output


# ------------------------------------------------------------------------------------------------
# split
# ------------------------------------------------------------------------------------------------
def test_split_is_seeded_disjoint_and_complete():
    c = read_parallel("demo")
    s1 = split_corpus(c, 1000, 1000, seed=0)
    s2 = split_corpus(c, 1000, 1000, seed=0)
    s3 = split_corpus(c, 1000, 1000, seed=1)
    assert (len(s1.train), len(s1.valid), len(s1.test)) == (32205, 1000, 1000)
    assert s1.test.src == s2.test.src and s1.valid.tgt == s2.valid.tgt
    assert s1.test.src != s3.test.src
    keys = lambda cc: set(zip(cc.src, cc.tgt))  # noqa: E731  (pairs are unique in this corpus)
    assert not keys(s1.test) & keys(s1.train) and not keys(s1.valid) & keys(s1.train)
    assert not keys(s1.valid) & keys(s1.test)
    assert DataSpec("demo").load().test.src == s1.test.src
    with pytest.raises(UserError, match="cannot give"):
        split_corpus(c.head(100), 60, 40)


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------
def test_tokenizer_ids_roundtrip_and_bytes(small_tok, real_pairs, tmp_path):
    tok = small_tok
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert tok.vocab_size == 300
    for s, t in real_pairs[:200]:
        for text in (s, t):
            ids = tok.encode(text)
            assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1] and PAD_ID not in ids and BOS_ID not in ids
            assert tok.decode(ids) == text  # identity normalisation: lossless
    assert tok.decode([BOS_ID] + tok.encode("Find Bar") + [PAD_ID, 17]) == "Find Bar"  # stops at EOS
    again = Tokenizer.load(tok.save(tmp_path))
    assert again == tok and again.encode("Suchleiste") == tok.encode("Suchleiste")
    assert Tokenizer(tok.to_bytes()).vocab_size == 300


def test_tokenizer_training_is_deterministic(real_pairs):
    texts = [s for p in real_pairs[:400] for s in p]
    assert train_tokenizer(texts, 200).to_bytes() == train_tokenizer(texts, 200).to_bytes()


def test_bad_tokenizer_file(tmp_path):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer.load(p)
    with pytest.raises(UserError, match="no such tokenizer"):
        Tokenizer.load(tmp_path / "missing.model")


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(real_pairs, small_tok) -> EncodedPairs:
    from hat_edge.data.corpus import ParallelCorpus

    c = ParallelCorpus(tuple(s for s, _ in real_pairs), tuple(t for _, t in real_pairs))
    return EncodedPairs.from_corpus(c, small_tok).filter_max_len(100)


def test_batches_respect_budget_and_cover_everything_once(encoded):
    s, t = encoded.src_lens, encoded.tgt_lens
    batches = make_batches(s, t, max_tokens=800, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(encoded)))
    for b in batches:
        assert max(max(s[i], t[i]) for i in b) * len(b) <= 800 or len(b) == 1
    # length bucketing: little padding
    real = sum(s[i] + t[i] for b in batches for i in b)
    padded = sum(len(b) * (max(s[i] for i in b) + max(t[i] for i in b)) for b in batches)
    assert real / padded > 0.75


def test_batches_are_deterministic_per_seed_and_epoch(encoded):
    s, t = encoded.src_lens, encoded.tgt_lens
    a = make_batches(s, t, 800, seed=1, epoch=2)
    assert a == make_batches(s, t, 800, seed=1, epoch=2)
    assert a != make_batches(s, t, 800, seed=1, epoch=3)
    assert a != make_batches(s, t, 800, seed=2, epoch=2)
    fixed = make_batches(s, t, 800, shuffle=False)
    assert fixed == make_batches(s, t, 800, seed=9, epoch=9, shuffle=False)


def test_collate_shifts_target_into_decoder_input(encoded):
    b = collate(encoded, [0, 5, 9])
    assert b.src.shape[0] == 3 and b.prev.shape == b.target.shape
    assert (b.prev[:, 0] == BOS_ID).all()
    for r, i in enumerate([0, 5, 9]):
        n = len(encoded.tgt[i])
        assert b.target[r, :n].tolist() == encoded.tgt[i].tolist() and b.target[r, n - 1] == EOS_ID
        assert b.prev[r, 1:n].tolist() == encoded.tgt[i][:-1].tolist()
        assert (b.target[r, n:] == PAD_ID).all() and (b.src[r, len(encoded.src[i]):] == PAD_ID).all()
    assert b.ntokens == sum(len(encoded.tgt[i]) for i in [0, 5, 9])


def test_ranks_split_the_same_epoch(encoded):
    one = EpochBatches(encoded, 500, seed=4, update_freq=2, world_size=1, rank=0)
    r0 = EpochBatches(encoded, 500, seed=4, update_freq=1, world_size=2, rank=0)
    r1 = EpochBatches(encoded, 500, seed=4, update_freq=1, world_size=2, rank=1)
    for k in range(3):
        assert sorted(one.step_indices(0, k)) == sorted(r0.step_indices(0, k) + r1.step_indices(0, k))
    assert set(r0.step_indices(1, 0)).isdisjoint(r1.step_indices(1, 0))
    assert np.all(EncodedPairs.truncate(encoded, 5).src_lens <= 5)
