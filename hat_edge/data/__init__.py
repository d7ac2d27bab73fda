"""Corpus reading and splitting, the joint SentencePiece tokenizer, and token-budget batching."""

from hat_edge.data.batching import Batch, EncodedPairs, EpochBatches, collate, make_batches
from hat_edge.data.corpus import (
    DEMO_CORPUS,
    DataSpec,
    ParallelCorpus,
    Splits,
    read_pair,
    read_parallel,
    read_tsv,
    split_corpus,
)
from hat_edge.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

__all__ = [
    "Batch",
    "EncodedPairs",
    "EpochBatches",
    "collate",
    "make_batches",
    "DEMO_CORPUS",
    "DataSpec",
    "ParallelCorpus",
    "Splits",
    "read_pair",
    "read_parallel",
    "read_tsv",
    "split_corpus",
    "Tokenizer",
    "train_tokenizer",
    "PAD_ID",
    "UNK_ID",
    "BOS_ID",
    "EOS_ID",
]
