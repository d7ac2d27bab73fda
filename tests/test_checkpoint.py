"""Checkpoint integrity: a sha256 of the contents checked on every read, legacy files (the bundled
demo) still load, and saves are atomic (unique temp file, fsync, replace) so a failed save keeps
the previous file."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from hat_edge.checkpoint import (
    CHECKSUM_FIELD,
    DEMO_CHECKPOINT,
    content_sha256,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from hat_edge.data.tokenizer import Tokenizer
from hat_edge.errors import UserError
from hat_edge.model import ModelConfig, SuperTransformer
from hat_edge.space import SearchSpace

SMALL_SPACE = SearchSpace(
    name="small",
    encoder_embed_choice=(32, 16),
    decoder_embed_choice=(32, 16),
    encoder_ffn_embed_dim_choice=(64, 32),
    encoder_layer_num_choice=(1,),
    decoder_ffn_embed_dim_choice=(64, 32),
    decoder_layer_num_choice=(1,),
    encoder_self_attention_heads_choice=(2,),
    decoder_self_attention_heads_choice=(2,),
    decoder_ende_attention_heads_choice=(2,),
    decoder_arbitrary_ende_attn_choice=(-1,),
    qkv_dim=32,
)


@pytest.fixture(scope="module")
def parts():
    """A small real model (random weights) with the demo's tokenizer: what save_checkpoint takes."""
    tok = Tokenizer(read_checkpoint("demo")["tokenizer"], "demo tokenizer")
    torch.manual_seed(0)
    model = SuperTransformer(ModelConfig(vocab_size=tok.vocab_size, max_positions=64), SMALL_SPACE)
    return model, tok


def _save(path: Path, parts, meta=None) -> Path:
    model, tok = parts
    return save_checkpoint(path, model, tok, SMALL_SPACE, meta=meta or {"step": 7})


def _biggest_weight(doc) -> tuple[str, torch.Tensor]:
    return max(doc["state_dict"].items(), key=lambda kv: kv[1].numel() if kv[1].is_floating_point() else 0)


def _assert_one_line(e: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg


# ------------------------------------------------------------------------------------------------
# the checksum
# ------------------------------------------------------------------------------------------------
def test_save_records_the_sha256_of_the_contents(tmp_path, parts):
    path = _save(tmp_path / "a.pt", parts)
    doc = read_checkpoint(path)
    assert len(doc[CHECKSUM_FIELD]) == 64 and doc[CHECKSUM_FIELD] == content_sha256(doc)
    ck = load_checkpoint(path)
    for k, v in parts[0].state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)
    # the digest covers every field, and is independent of key order
    assert content_sha256({**doc, "meta": {**doc["meta"], "step": 8}}) != doc[CHECKSUM_FIELD]
    assert content_sha256(dict(reversed(list(doc.items())))) == doc[CHECKSUM_FIELD]


def test_one_flipped_byte_inside_a_weight_tensor_is_refused(tmp_path, parts):
    path = _save(tmp_path / "a.pt", parts)
    name, weight = _biggest_weight(read_checkpoint(path))
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.contiguous().numpy().tobytes())
    assert at > 0 and raw.count(weight.numpy().tobytes()) == 1  # found the tensor's bytes, exactly once
    raw[at + weight.numel() * weight.element_size() // 2] ^= 0x01  # one bit, mid-tensor
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(raw)

    # torch itself reads the damaged file without complaint (it does not check the zip CRCs) ...
    changed = torch.load(bad, map_location="cpu", weights_only=True)["state_dict"][name]
    assert not torch.equal(changed, weight)
    # ... the checksum refuses it, in one line naming the file and what failed
    for reader in (read_checkpoint, load_checkpoint):
        with pytest.raises(UserError, match="integrity check failed") as e:
            reader(bad)
        _assert_one_line(e, bad)


def test_a_changed_value_reserialised_without_a_new_checksum_is_refused(tmp_path, parts):
    path = _save(tmp_path / "a.pt", parts)
    doc = read_checkpoint(path)
    name, weight = _biggest_weight(doc)
    weight.view(-1)[3] += 1e-3
    edited = tmp_path / "edited.pt"
    torch.save(doc, edited)  # a well-formed file whose recorded sha256 no longer matches
    with pytest.raises(UserError, match="integrity check failed") as e:
        load_checkpoint(edited)
    _assert_one_line(e, edited)

    doc = read_checkpoint(path)
    doc["tokenizer"] = doc["tokenizer"][:-1] + bytes([doc["tokenizer"][-1] ^ 1])  # not only tensors
    torch.save(doc, edited)
    with pytest.raises(UserError, match="integrity check failed"):
        read_checkpoint(edited)

    doc = read_checkpoint(path)
    doc[CHECKSUM_FIELD] = "not a digest"
    torch.save(doc, edited)
    with pytest.raises(UserError, match="field 'sha256' is 'not a digest', expected 64"):
        read_checkpoint(edited)


def test_legacy_checkpoints_without_a_checksum_still_load(tmp_path, parts, caplog):
    caplog.set_level(logging.WARNING, logger="hat_edge.checkpoint")
    assert CHECKSUM_FIELD not in torch.load(DEMO_CHECKPOINT, map_location="cpu", weights_only=True)
    ck = load_checkpoint("demo")  # the shipped demo: legacy, part of the install, no warning
    assert ck.space.name == "demo" and caplog.records == []

    doc = read_checkpoint(_save(tmp_path / "a.pt", parts))
    del doc[CHECKSUM_FIELD]
    old = tmp_path / "old.pt"
    torch.save(doc, old)  # what an earlier hat-edge wrote
    load_checkpoint(old)
    read_checkpoint(old)
    assert [r.getMessage() for r in caplog.records] == [
        f"{old}: legacy checkpoint without a sha256; loaded without an integrity check"
    ]  # one warning per file, however often it is read


# ------------------------------------------------------------------------------------------------
# atomic saves
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_save_keeps_the_previous_checkpoint_and_leaves_no_temp_file(tmp_path, parts, monkeypatch, exc):
    path = _save(tmp_path / "ck.pt", parts)
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **kw):
        import io

        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the file is on disk ...
        f.flush()
        raise exc  # ... when the writer dies

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(type(exc)):
        _save(path, parts, meta={"step": 8})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    monkeypatch.undo()
    load_checkpoint(path)


def test_saves_use_unique_temp_files_in_the_target_directory(tmp_path, parts, monkeypatch):
    """Two saves at once to the same file each write their own temp file; the last rename wins and
    the result is a whole, valid checkpoint (a fixed `NAME.tmp` would have two writers in one file)."""
    real_save, real_mkstemp = torch.save, tempfile.mkstemp
    names: list[str] = []
    both_open = threading.Barrier(2, timeout=30)

    def recording_mkstemp(*a, **kw):
        fd, name = real_mkstemp(*a, **kw)
        names.append(name)
        return fd, name

    def waiting_save(obj, f, *a, **kw):
        both_open.wait()  # both temp files exist at the same time
        real_save(obj, f, *a, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    monkeypatch.setattr(torch, "save", waiting_save)
    path = tmp_path / "ck.pt"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _save(path, parts)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(names)) == 2 and all(Path(n).parent == tmp_path for n in names)
    assert all(Path(n).name.startswith(".ck.pt.") and Path(n).name.endswith(".tmp") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    monkeypatch.undo()
    load_checkpoint(path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_saved_checkpoint_has_the_mode_a_plain_open_gives(tmp_path, parts):
    mask = os.umask(0o022)
    try:
        path = _save(tmp_path / "ck.pt", parts)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
