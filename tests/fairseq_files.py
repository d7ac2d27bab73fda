"""Writers of fairseq's two binarized-dataset index formats, for tests (written from the format
description in hat_edge/data/fairseq.py's brief, not from fairseq's code).

Every header field and table can be overridden, so a test can write exactly one corruption.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

import numpy as np

LEGACY_MAGIC = b"TNTIDX\x00\x00"
MMAP_MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.dtype("u1"): 1, np.dtype("i1"): 2, np.dtype("i2"): 3, np.dtype("i4"): 4, np.dtype("i8"): 5,
               np.dtype("f8"): 6, np.dtype("u2"): 8}


def _longs(values: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(values, dtype="<i8").tobytes()


def write_legacy(prefix: Path, items: Sequence[Sequence[int]], dtype: str | np.dtype = "int32", *,
                 magic: bytes = LEGACY_MAGIC, version: int = 1, code: int | None = None,
                 element_size: int | None = None, dim_offsets: Sequence[int] | None = None,
                 data_offsets: Sequence[int] | None = None, sizes: Sequence[int] | None = None) -> None:
    """IndexedDataset: PREFIX.bin holds the items back to back; PREFIX.idx is
    magic, <Q version, <QQ dtype code + element size, <QQ N + S, int64 dim_offsets[N+1],
    int64 data_offsets[N+1] (in elements), int64 sizes[S]."""
    dt = np.dtype(dtype).newbyteorder("<")
    arrays = [np.asarray(it, dtype=dt) for it in items]
    lengths = [len(a) for a in arrays]
    dim = list(range(len(arrays) + 1)) if dim_offsets is None else list(dim_offsets)
    data = [0, *np.cumsum(lengths, dtype=np.int64).tolist()] if data_offsets is None else list(data_offsets)
    shapes = lengths if sizes is None else list(sizes)
    n = len(data) - 1
    Path(f"{prefix}.bin").write_bytes(b"".join(a.tobytes() for a in arrays))
    Path(f"{prefix}.idx").write_bytes(
        magic
        + struct.pack("<Q", version)
        + struct.pack("<QQ", DTYPE_CODES[dt.newbyteorder("=")] if code is None else code,
                      dt.itemsize if element_size is None else element_size)
        + struct.pack("<QQ", n, len(shapes))
        + _longs(dim) + _longs(data) + _longs(shapes)
    )


def write_mmap(prefix: Path, items: Sequence[Sequence[int]], dtype: str | np.dtype = "uint16", *,
               docs: bool = True, magic: bytes = MMAP_MAGIC, version: int = 1, code: int | None = None,
               sizes: Sequence[int] | None = None, pointers: Sequence[int] | None = None,
               doc_idx: Sequence[int] | None = None) -> None:
    """MMapIndexedDataset: PREFIX.idx is magic, <Q version, <B dtype code, <Q N, [<Q D,] int32
    sizes[N], int64 pointers[N] (bytes), [int64 doc_idx[D]]. `docs=False` writes the layout without
    the document table (fairseq's own writer); `docs=True` the one with it (Megatron-style)."""
    dt = np.dtype(dtype).newbyteorder("<")
    arrays = [np.asarray(it, dtype=dt) for it in items]
    lens = [len(a) for a in arrays] if sizes is None else list(sizes)
    if pointers is None:
        ptrs = [0, *np.cumsum([len(a) * dt.itemsize for a in arrays], dtype=np.int64).tolist()][:-1]
    else:
        ptrs = list(pointers)
    docs_table = [0, len(arrays)] if doc_idx is None else list(doc_idx)
    Path(f"{prefix}.bin").write_bytes(b"".join(a.tobytes() for a in arrays))
    head = magic + struct.pack("<Q", version) + struct.pack("<B", DTYPE_CODES[dt.newbyteorder("=")]
                                                            if code is None else code)
    head += struct.pack("<Q", len(lens))
    if docs:
        head += struct.pack("<Q", len(docs_table))
    body = np.asarray(lens, dtype="<i4").tobytes() + _longs(ptrs)
    if docs:
        body += _longs(docs_table)
    Path(f"{prefix}.idx").write_bytes(head + body)
