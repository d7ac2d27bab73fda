"""The joint source/target subword tokenizer (SentencePiece).

Why SentencePiece: one joint model for both languages (HAT shares all embeddings), small (a 4k
unigram model is ~70 KB), fast (C++), a pure wheel with no Rust toolchain or Python-side
pre-tokeniser to version, and the whole model is a byte string: it is embedded in every checkpoint
and can be copied into an export bundle, so a model never travels without the exact tokenizer it
was trained with. Detokenisation is lossless (whitespace is a symbol, and hat-edge trains with the
`identity` normalisation rule, so decode(encode(x)) == x), which BLEU on raw text needs; it also
keeps the model small (no NFKC table).

Ids follow hat-edge's token conventions: pad=0, unk=1, bos=2, eos=3. `encode` appends EOS (source
sentences and targets end with EOS; the decoder input starts with BOS, added by the batcher).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Sequence

import sentencepiece as spm

from hat_edge.errors import UserError
from hat_edge.runtime.files import read_file

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """A SentencePiece model with hat-edge's special ids. Build with `train_tokenizer` or load."""

    def __init__(self, model_bytes: bytes, source: str = "<bytes>") -> None:
        self._bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
            raise UserError(f"{source}: not a SentencePiece model ({e.__class__.__name__})") from None
        got = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise UserError(
                f"{source}: tokenizer ids pad/unk/bos/eos are {got}, hat-edge needs "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)} (train it with hat-edge)"
            )

    # ---- ids ----
    kind = "sentencepiece"
    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    decoder_start_id = BOS_ID  # the decoder's first input token

    @property
    def src_vocab_size(self) -> int:
        return self.vocab_size  # one joint vocabulary

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    # ---- text <-> ids ----
    def encode(self, text: str, level: str = "raw", side: str = "src") -> list[int]:
        """Subword ids of one sentence, ending with EOS."""
        _raw_only(level)
        return list(self._sp.encode(text)) + [EOS_ID]

    def encode_batch(self, texts: Sequence[str], side: str = "src", level: str = "raw") -> list[list[int]]:
        """`encode` for many sentences in one C++ call (the corpus is encoded once, up front).
        One joint model: `side` changes nothing."""
        _raw_only(level)
        return [ids + [EOS_ID] for ids in self._sp.encode(list(texts))]

    def reference(self, text: str, level: str, out_level: str, side: str = "tgt") -> str:
        _raw_only(level)
        _raw_only(out_level)
        return text

    def decode(self, ids: Iterable[int], level: str = "raw") -> str:
        """Detokenised text; stops at the first EOS and drops pad/bos."""
        _raw_only(level)
        out: list[int] = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(i)
        return self._sp.decode(out)

    def pieces(self, text: str) -> list[str]:
        return list(self._sp.encode(text, out_type=str))

    # ---- persistence ----
    def to_bytes(self) -> bytes:
        return self._bytes

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.model` into `directory` (created if needed); returns the file."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / TOKENIZER_FILE
        path.write_bytes(self._bytes)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a `.model` file, or a directory holding `tokenizer.model`."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        data = read_file(p, "no such tokenizer file", UserError)
        assert isinstance(data, bytes)
        return cls(data, str(p))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other._bytes == self._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, {len(self._bytes)} bytes)"


def _raw_only(level: str) -> None:
    if level != "raw":
        raise UserError(f"text level {level!r} needs a model imported from HAT (fairseq dictionaries and BPE); "
                        "a SentencePiece model reads and writes raw text only")


def tokenizer_from_bytes(data: bytes, source: str = "<bytes>") -> Any:
    """A checkpoint's tokenizer field: SentencePiece model bytes, or an imported model's fairseq
    tokenizer (a JSON document, `hat_edge.data.fairseq_tokenizer`)."""
    if bytes(data[:1]) == b"{":
        from hat_edge.data.fairseq_tokenizer import FairseqTokenizer

        return FairseqTokenizer.from_bytes(data, source)
    return Tokenizer(data, source)


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer file (`tokenizer.model` or `tokenizer.json`), or a directory holding one (a bundle)."""
    p = Path(path)
    if p.is_dir():
        from hat_edge.data.fairseq_tokenizer import FAIRSEQ_TOKENIZER_FILE

        p = p / (FAIRSEQ_TOKENIZER_FILE if (p / FAIRSEQ_TOKENIZER_FILE).is_file() else TOKENIZER_FILE)
    data = read_file(p, "no such tokenizer file", UserError)
    assert isinstance(data, bytes)
    return tokenizer_from_bytes(data, str(p))


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4000,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed_sentences: int = 2_000_000,
    normalization: str = "identity",
) -> Tokenizer:
    """Train a joint SentencePiece model on `texts` (source and target sentences together).

    Deterministic for the same texts and settings (single-threaded training).
    """
    if vocab_size < 8:
        raise UserError(f"vocab size must be at least 8, got {vocab_size}")
    if model_type not in ("unigram", "bpe"):
        raise UserError(f"tokenizer model type '{model_type}' unknown: allowed unigram, bpe")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("cannot train a tokenizer on no text")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=seed_sentences,
            shuffle_input_sentence=False,
            max_sentence_length=1 << 16,
            num_threads=1,
            normalization_rule_name=normalization,
            minloglevel=2,
        )
    except RuntimeError as e:
        # e.g. "Vocabulary size too high" on a tiny corpus: say what to change.
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else e.__class__.__name__
        raise UserError(f"tokenizer training failed: {msg} (try a smaller --vocab-size)") from None
    return Tokenizer(buf.getvalue(), "<trained>")
