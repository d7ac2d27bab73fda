"""`translate(bundle, token ids)`: the device's decoding loop, run on the host.

Nothing here decodes by itself: it opens the bundle's graphs in their runtime and calls
`hat_edge.runtime.backends.translate` (greedy or beam search over a cached decoder step), the very
code the runner executes on a board. Opened models are kept (a few) so repeated calls skip session
creation.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

from hat_edge.errors import UserError
from hat_edge.exporters.bundle import Bundle, load_bundle
from hat_edge.runtime import backends
from hat_edge.runtime.backends import Model
from hat_edge.runtime.errors import RunnerError

_OPEN: "OrderedDict[tuple, Model]" = OrderedDict()
_KEEP = 4


def open_bundle(bundle: Union[str, Path, Bundle], threads: Optional[int] = None, device: str = "cpu") -> Model:
    """A runtime model for a bundle (loaded and hash-checked once; the last few are kept)."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    key = (str(Path(b.path).resolve()), b.manifest["manifest_sha256"], threads, device)
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    model = b.open(threads=threads, device=device)
    _OPEN[key] = model
    while len(_OPEN) > _KEEP:
        _OPEN.popitem(last=False)
    return model


def translate(
    bundle: Union[str, Path, Bundle],
    sources: Union[Sequence[int], Sequence[Sequence[int]]],
    beam: int = 5,
    max_len: Optional[int] = None,
    len_penalty: float = 1.0,
    threads: Optional[int] = None,
    min_len: int = 0,
) -> list[list[int]]:
    """Decode token-id sources (each ending with EOS) with a bundle; one id list per source.

    `sources` is a list of id lists, or one flat id list (one sentence). beam=1 is greedy. max_len
    defaults to 2 * longest source + 10 steps, capped at the model's max_positions (as
    `hat_edge.model.decode`).
    """
    if beam < 1:
        raise UserError(f"beam must be at least 1, got {beam}")
    if sources and all(isinstance(x, int) for x in sources):
        sources = [list(sources)]  # type: ignore[list-item]
    model = open_bundle(bundle, threads=threads)
    batch = [list(s) for s in sources]  # type: ignore[union-attr]
    for s in batch:
        bad = [t for t in s if not 0 <= int(t) < model.src_vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the bundle's vocabulary (source ids 0..{model.src_vocab_size - 1})")
    if max_len is None:
        longest = max((len(s) for s in batch), default=1)
        max_len = min(2 * longest + 10, int(model.manifest["model"].get("max_positions", 512)))
    try:
        return backends.translate(model, batch, beam=beam, max_len=max_len, len_penalty=len_penalty, min_len=min_len)
    except RunnerError as e:
        raise UserError(str(e)) from None
