"""Exporters: ONNX / TorchScript bundles, parity with PyTorch, int8, tampering, the export CLI.

Everything is real: random-weight SubTransformers exported by the real exporters, run by the real
runtimes, compared with the real PyTorch model. The ONNX exports (torch's dynamo exporter takes
tens of seconds per HAT-sized model on one core) are marked slow.
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from hat_edge.cli import cli
from hat_edge.errors import UserError
from hat_edge.exporters import export_bundle, load_bundle, quantize_bundle, translate
from hat_edge.model import SubTransformer
from hat_edge.space import TRANSFORMER_BASE, Arch, SearchSpace

# HAT_wmt14ende_xeon@204.2ms_bleu@27.6 with its decoder's arbitrary encoder-decoder attention set to
# [2, 1] (HAT's published configs only use -1 and 1): layer 0 attends to the last THREE encoder layers.
HAT_ENDE2 = Arch(
    encoder_embed_dim=512, decoder_embed_dim=512, encoder_layer_num=6, decoder_layer_num=2,
    encoder_ffn_embed_dim=(3072,) * 6, encoder_self_attention_heads=(4, 8, 8, 4, 8, 8),
    decoder_ffn_embed_dim=(3072, 3072), decoder_self_attention_heads=(8, 8),
    decoder_ende_attention_heads=(8, 8), decoder_arbitrary_ende_attn=(2, 1),
)
# HAT_wmt14ende_xeon@137.9ms_bleu@25.8: a single decoder layer (attending to the last 2 encoder layers).
HAT_ONE_DECODER_LAYER = Arch(
    encoder_embed_dim=512, decoder_embed_dim=512, encoder_layer_num=6, decoder_layer_num=1,
    encoder_ffn_embed_dim=(3072,) * 6, encoder_self_attention_heads=(4, 8, 8, 8, 8, 8),
    decoder_ffn_embed_dim=(3072,), decoder_self_attention_heads=(8,),
    decoder_ende_attention_heads=(8,), decoder_arbitrary_ende_attn=(1,),
)
# small and quick, with every feature: unequal widths, per-layer heads, ende 2 and -1
SMALL = Arch(
    encoder_embed_dim=64, decoder_embed_dim=48, encoder_layer_num=3, decoder_layer_num=2,
    encoder_ffn_embed_dim=(128, 64, 128), encoder_self_attention_heads=(4, 2, 4),
    decoder_ffn_embed_dim=(96, 128), decoder_self_attention_heads=(2, 4),
    decoder_ende_attention_heads=(4, 2), decoder_arbitrary_ende_attn=(2, -1), qkv_dim=64,
)
VOCAB = 256
DEMO_CORPUS = Path(__file__).resolve().parents[1] / "hat_edge" / "assets" / "demo" / "libreoffice-help.en-de.tsv.xz"
TINY_SPACE = SearchSpace(
    name="tiny-export", encoder_embed_choice=(64, 48), decoder_embed_choice=(64, 48),
    encoder_ffn_embed_dim_choice=(128, 64), decoder_ffn_embed_dim_choice=(128, 64),
    encoder_layer_num_choice=(3,), decoder_layer_num_choice=(2, 1),
    encoder_self_attention_heads_choice=(4, 2), decoder_self_attention_heads_choice=(4, 2),
    decoder_ende_attention_heads_choice=(4, 2), decoder_arbitrary_ende_attn_choice=(-1, 1, 2), qkv_dim=64,
)


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _arch_file(tmp: Path, arch: Arch, name: str) -> Path:
    return arch.save(tmp / f"{name}.yml")  # HAT's *-subtransformer YAML


@pytest.fixture(scope="module")
def ts_bundle(tmp_path_factory) -> tuple[SubTransformer, Path]:
    sub = SubTransformer.random(SMALL, VOCAB, seed=3)
    return sub, export_bundle(sub, tmp_path_factory.mktemp("ts") / "b", fmt="torchscript")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real (untrained) checkpoint: tiny SuperTransformer, 300-piece tokenizer on real text."""
    from hat_edge.checkpoint import save_checkpoint
    from hat_edge.data.tokenizer import train_tokenizer
    from hat_edge.model import ModelConfig, SuperTransformer

    d = tmp_path_factory.mktemp("ckpt")
    with lzma.open(DEMO_CORPUS, "rt", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(400)]
    tok = train_tokenizer([s for ln in lines for s in ln.rstrip("\n").split("\t")], vocab_size=300)
    torch.manual_seed(0)
    model = SuperTransformer(ModelConfig(vocab_size=tok.vocab_size), TINY_SPACE).eval()
    return save_checkpoint(d / "tiny.pt", model, tok, TINY_SPACE)


# ------------------------------------------------------------------------------------------------
# the bundle
# ------------------------------------------------------------------------------------------------
def test_manifest_describes_the_bundle(ts_bundle) -> None:
    sub, path = ts_bundle
    m = load_bundle(path).manifest
    assert m["format"] == "hat-edge-bundle" and m["version"] == 1 and m["runtime"] == "torchscript"
    assert Arch.from_dict(m["arch"]) == SMALL and m["model"]["vocab_size"] == VOCAB
    assert m["model"]["self_cache"] == [[2, 32], [4, 16]]  # heads, head dim per decoder layer
    assert set(m["files"]) == {"encoder.pt", "decoder_step.pt"}
    dec = m["graphs"]["decoder_step"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[:3] == ["tokens", "position", "src_bias"] and names[-1] == "self_v_1"
    assert dec["inputs"][3]["shape"] == ["batch", 4, "src_len*3", 16]  # cross_k_0: ende 2 -> 3 layers
    assert m["parity"]["max_abs_diff"] <= 1e-4 and m["hat_edge_version"]


def _tamper(src: Path, dst: Path, how: str) -> None:
    shutil.copytree(src, dst)
    mpath = dst / "manifest.json"
    if how == "byte":
        f = dst / "decoder_step.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "missing":
        (dst / "encoder.pt").unlink()
    elif how == "version":
        m = json.loads(mpath.read_text())
        m["version"] = 2
        mpath.write_text(json.dumps(m))
    elif how == "manifest":
        m = json.loads(mpath.read_text())
        m["arch"]["decoder_ffn_embed_dim"] = [128, 128]
        mpath.write_text(json.dumps(m))
    elif how == "extra":
        (dst / "payload.sh").write_text("echo hi\n")
    elif how == "no-manifest":
        mpath.unlink()


@pytest.mark.parametrize("how, message", [
    ("byte", "sha256 of 'decoder_step.pt' does not match"),
    ("missing", "missing file 'encoder.pt'"),
    ("version", "field 'version' is 2"),
    ("manifest", "manifest.json was modified"),
    ("extra", "'payload.sh' is not listed"),
    ("no-manifest", "missing manifest.json"),
])
def test_tampered_or_incomplete_bundle_is_rejected(ts_bundle, tmp_path, how, message) -> None:
    bad = tmp_path / how
    _tamper(ts_bundle[1], bad, how)
    with pytest.raises(UserError) as e:
        load_bundle(bad)
    assert message in str(e.value) and "\n" not in str(e.value)
    # the device's runner refuses it the same way (exit 2, one line)
    import subprocess
    import sys

    from hat_edge.runtime import pack

    r = subprocess.run([sys.executable, str(pack.build_runner()), "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr


def test_host_translate_is_the_torch_decoding(ts_bundle) -> None:
    from hat_edge.model import decode

    sub, path = ts_bundle
    src = [[17, 40, 9, 3], [5, 3]]
    padded = torch.tensor([[17, 40, 9, 3], [5, 3, 0, 0]])
    assert translate(path, src, beam=4, max_len=9) == decode.beam(sub, padded, beam=4, max_len=9)
    assert translate(path, src, beam=1, max_len=9) == decode.greedy(sub, padded, max_len=9)
    assert translate(path, [17, 40, 9, 3], beam=1, max_len=9) == decode.greedy(sub, padded[:1], max_len=9)
    with pytest.raises(UserError, match="outside the bundle's vocabulary"):
        translate(path, [[VOCAB + 5, 3]])


def test_export_replaces_a_bundle_but_not_other_directories(ts_bundle, tmp_path) -> None:
    sub, _ = ts_bundle
    out = tmp_path / "b"
    export_bundle(sub, out, fmt="torchscript")
    first = load_bundle(out).manifest["created_at"]
    export_bundle(sub, out, fmt="torchscript")  # a bundle is replaced whole
    assert load_bundle(out).manifest["files"] and first
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no bundle"):
        export_bundle(sub, other, fmt="torchscript")
    assert (other / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_quantize_bundle_makes_an_int8_copy(ts_bundle, tmp_path) -> None:
    sub, ts_path = ts_bundle
    # the TorchScript-based ONNX exporter: seconds (the dynamo path is covered by the slow tests)
    fp32 = export_bundle(sub, tmp_path / "fp32", fmt="onnx", exporter="torchscript")
    q = load_bundle(quantize_bundle(fp32, tmp_path / "q", sub=sub))
    assert q.precision == "int8" and q.manifest["parity"]["max_abs_diff"] > 0
    ops = {n.op_type for n in onnx.load(str(q.path / "decoder_step.onnx")).graph.node}
    assert "MatMulInteger" in ops
    assert len(translate(q, [[9, 8, 3]], beam=2, max_len=4)[0]) <= 4
    assert load_bundle(fp32).precision == "fp32"  # the source is untouched
    with pytest.raises(UserError, match="needs an fp32 ONNX bundle"):
        quantize_bundle(ts_path, tmp_path / "nope")


def _strip_search_topk(bundle: Path, out: Path) -> Path:
    """A copy of an ONNX bundle as exported before the search's TopK (issue #17): the decoder
    step without the `topk` input, the TopK node and its two outputs, manifest resealed."""
    from hat_edge.exporters.bundle import write_manifest

    shutil.copytree(bundle, out)
    path = out / "decoder_step.onnx"
    m = onnx.load(str(path))
    g = m.graph
    keep_nodes = [n for n in g.node if n.op_type != "TopK"]
    del g.node[:]
    g.node.extend(keep_nodes)
    for field, drop in ((g.input, {"topk"}), (g.output, {"topk_log_probs", "topk_ids"})):
        keep = [v for v in field if v.name not in drop]
        del field[:]
        field.extend(keep)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    io = manifest["graphs"]["decoder_step"]
    io["inputs"] = [t for t in io["inputs"] if t["name"] != "topk"]
    io["outputs"] = [t for t in io["outputs"] if not t["name"].startswith("topk")]
    write_manifest(out, manifest)
    return out


def test_search_topk_in_the_graph_same_tokens_and_older_bundles_still_run(ts_bundle, tmp_path) -> None:
    """The ONNX decoder step carries the search's TopK: a step returns N x k values, the tokens
    equal PyTorch's search and the older way (N x V log-probs to numpy); a bundle exported without
    it (the format before) still loads and decodes the same."""
    from hat_edge.model import decode
    from hat_edge.runtime import backends

    sub, _ = ts_bundle
    b = load_bundle(export_bundle(sub, tmp_path / "b", fmt="onnx", exporter="torchscript"))
    io = b.manifest["graphs"]["decoder_step"]
    assert [t["name"] for t in io["inputs"]][-1] == "topk"
    assert [t["name"] for t in io["outputs"]][-2:] == ["topk_log_probs", "topk_ids"]
    assert b.manifest["parity"]["topk_equal"] is True and b.manifest["parity"]["max_abs_diff"] <= 1e-4
    old = load_bundle(_strip_search_topk(b.path, tmp_path / "old"))
    assert "topk" not in [i.name for i in old.open().dec.get_inputs()]
    src = torch.tensor([[17, 40, 9, 3], [5, 3, 0, 0], [200, 101, 7, 3]])
    for beam in (1, 4):
        for fixed in (False, True):
            want = (decode.greedy(sub, src, max_len=9, fixed_steps=fixed) if beam == 1
                    else decode.beam(sub, src, beam=beam, max_len=9, fixed_steps=fixed))
            new, legacy, older = b.open(), b.open(), old.open()
            legacy.search_in_graph = False
            calls: list[int] = []
            new.stepper = _counting(new.stepper, calls)  # type: ignore[method-assign]
            for m in (new, legacy, older):
                assert backends.translate(m, src.numpy(), beam=beam, max_len=9, fixed_steps=fixed) == want
            if beam > 1:  # beam search asks the graph for N x k values a step, k small
                assert calls and all(k <= 2 * beam + 1 for k in calls)


def _counting(stepper, calls: list):
    """A model's stepper whose steps record the k of every top-k call (the search must use the
    graph's TopK)."""
    def make(enc, rows):
        step = stepper(enc, rows)
        inner = step.topk

        def topk(tokens, order, k):
            calls.append(k)
            return inner(tokens, order, k)

        step.topk = topk
        return step

    return make


# ------------------------------------------------------------------------------------------------
# the CLI: bad inputs are one line
# ------------------------------------------------------------------------------------------------
def _one_line_error(res, *needles: str) -> None:
    # UserError -> click.ClickException in hat_edge/cli.py (exit status 1); usage errors exit 2
    assert res.exit_code in (1, 2), res.output
    assert "Traceback" not in res.output, res.output
    line = res.output.strip().splitlines()[-1]  # earlier lines: progress on stderr
    for n in needles:
        assert n in line, line


def test_cli_bad_inputs(tmp_path, checkpoint) -> None:
    arch = str(_arch_file(tmp_path, SMALL, "small"))
    out = str(tmp_path / "out")
    # arch outside the checkpoint's space: names the field and the allowed values
    _one_line_error(_cli("export", "transformer-base", "--checkpoint", str(checkpoint), "--out", out),
                    "qkv_dim", "allowed")
    _one_line_error(_cli("export", arch, "--checkpoint", str(tmp_path / "nope.pt"), "--out", out),
                    "no such checkpoint file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    _one_line_error(_cli("export", arch, "--checkpoint", str(corrupt), "--out", out), "corrupt")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(_cli("export", arch, "--random-init", "--format", "torchscript", "--out", str(blocker / "b")),
                    "cannot write")
    _one_line_error(_cli("export", str(tmp_path / "missing.yml"), "--random-init", "--out", out), "no such file")
    res = _cli("export", arch, "--out", out)  # neither weights source
    assert res.exit_code == 2 and "--checkpoint" in res.output
    res = _cli("export", arch, "--random-init", "--format", "torchscript", "--quantize", "int8", "--out", out)
    assert res.exit_code == 2 and "onnx" in res.output


def test_cli_export_from_checkpoint_with_tokenizer(tmp_path, checkpoint) -> None:
    out = tmp_path / "ck"
    res = _cli("export", "largest", "--checkpoint", str(checkpoint), "--format", "torchscript",
               "--out", str(out), "--verify", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output[res.output.index("{"):])
    assert r["max_abs_diff"] <= 1e-4 and r["tokens_equal"] is True and r["passed"] is True
    b = load_bundle(out)
    assert b.tokenizer_file is not None and b.tokenizer_file.name in r["files"]
    from hat_edge.data.tokenizer import Tokenizer

    tok = Tokenizer.load(b.tokenizer_file)
    ids = tok.encode("Click the button.")
    assert len(translate(b, ids, beam=2, max_len=5)[0]) <= 5
    assert b.manifest["parity"]["verify"]["tokens_equal"] is True  # recorded in the manifest


# ------------------------------------------------------------------------------------------------
# export + verify for HAT configs and Transformer-Base
# ------------------------------------------------------------------------------------------------
ARCHS = {"hat-ende2": HAT_ENDE2, "hat-1-decoder-layer": HAT_ONE_DECODER_LAYER, "transformer-base": TRANSFORMER_BASE}


def _export_verify(tmp_path: Path, name: str, fmt: str, *extra: str) -> dict:
    arch_arg = "transformer-base" if name == "transformer-base" else str(_arch_file(tmp_path, ARCHS[name], name))
    res = _cli("export", arch_arg, "--random-init", "--vocab-size", str(VOCAB), "--seed", "1", "--format", fmt,
               "--out", str(tmp_path / "b"), "--verify", "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


@pytest.mark.parametrize("name", list(ARCHS))
def test_torchscript_export_verifies(tmp_path, name) -> None:
    r = _export_verify(tmp_path, name, "torchscript")
    assert r["max_abs_diff"] <= 1e-4 and r["tokens_equal"] is True and r["passed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_onnx_export_verifies(tmp_path, name) -> None:
    r = _export_verify(tmp_path, name, "onnx")
    assert r["max_abs_diff"] <= 1e-4 and r["tokens_equal"] is True and r["passed"] is True
    assert r["verify"]["greedy_equal"] and r["verify"]["beam_equal"]
    arch = ARCHS[name]
    for graph in ("encoder.onnx", "decoder_step.onnx"):
        model = onnx.load(str(tmp_path / "b" / graph))
        onnx.checker.check_model(model)
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                for i in list(model.graph.input) + list(model.graph.output)}
        if graph == "decoder_step.onnx":
            assert dims["tokens"] == ["batch", 1]
            last = arch.decoder_layer_num - 1
            assert dims[f"self_k_{last}"][0] == "batch" and dims[f"self_k_{last}"][2] == "past_len"
            n = arch.ende_layers(0)
            assert dims["cross_k_0"][2] == ("src_len" if n == 1 else f"src_len*{n}")
            assert dims["log_probs"] == ["batch", VOCAB]
        else:
            assert dims["src_tokens"] == ["batch", "src_len"]


@pytest.mark.slow
def test_int8_export_runs_and_reports_agreement(tmp_path) -> None:
    arch_file = str(_arch_file(tmp_path, SMALL, "small"))
    res = _cli("export", arch_file, "--random-init", "--vocab-size", str(VOCAB), "--format", "onnx",
               "--quantize", "int8", "--out", str(tmp_path / "q"), "--verify", "--json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.output[res.output.index("{"):])
    assert r["precision"] == "int8" and 0.0 <= r["greedy_agreement"] <= 1.0 and 0.0 <= r["beam_agreement"] <= 1.0
    assert isinstance(r["tokens_equal"], bool)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "decoder_step.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "Gemm" not in ops  # output projection too
    b = load_bundle(tmp_path / "q")
    assert b.precision == "int8" and len(translate(b, [[9, 8, 3]], beam=3, max_len=6)[0]) <= 6


@pytest.mark.slow
def test_int8_agreement_is_measured_on_real_sentences(tmp_path) -> None:
    """deploy verifies an int8 bundle on 20 test sentences: there the demo's largest
    SubTransformer agrees with PyTorch above the stated levels (on random ids it does not: about
    0.5 on this VM, which made `deploy --quantize int8` report LOW for a sound bundle)."""
    from hat_edge.app.deploy import VERIFY_SENTENCES
    from hat_edge.checkpoint import load_checkpoint
    from hat_edge.evaluate import load_split
    from hat_edge.exporters import export_bundle, verify_bundle
    from hat_edge.exporters.verify import INT8_AGREEMENT

    ck = load_checkpoint("demo")
    sub = ck.model.extract(ck.space.largest()).eval()
    path = export_bundle(sub, tmp_path / "q", fmt="onnx", quantize="int8", tokenizer=ck.tokenizer)
    srcs = [ck.tokenizer.encode(s) for s in load_split(ck, "test").src[:VERIFY_SENTENCES]]
    r = verify_bundle(sub, path, sources=srcs, record=False)
    assert r["source"] == "given" and r["sentences"] == VERIFY_SENTENCES and r["precision"] == "int8"
    assert r["greedy_agreement"] >= INT8_AGREEMENT["greedy"] and r["beam_agreement"] >= INT8_AGREEMENT["beam"], r
    # the aligned agreement: one token inserted early is one difference, not a whole suffix
    from hat_edge.exporters.verify import token_agreement

    assert token_agreement([[5, 6, 7, 8, 9]], [[4, 5, 6, 7, 8, 9]]) == 5 / 6
    assert token_agreement([[], [1, 2]], [[], [1, 2]]) == 1.0  # an empty translation on both sides agrees
    assert token_agreement([[], [1, 2]], [[3], [1, 2]]) == 2 / 3
