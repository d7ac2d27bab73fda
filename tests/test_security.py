"""Crafted inputs, tried as an attacker would: bundles that try to leave their place, files that
try to ride along, secrets that must not reach the store. Each test builds the crafted input for
real (a real export, a real sshd on loopback, the local profile) and asserts the refusal is one
line naming the file and field, and that nothing was written where it should not be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hat_edge.errors import UserError
from hat_edge.space import Arch

SMALL = Arch(
    encoder_embed_dim=64, decoder_embed_dim=48, encoder_layer_num=2, decoder_layer_num=2,
    encoder_ffn_embed_dim=(128, 64), encoder_self_attention_heads=(4, 2),
    decoder_ffn_embed_dim=(96, 128), decoder_self_attention_heads=(2, 4),
    decoder_ende_attention_heads=(4, 2), decoder_arbitrary_ende_attn=(1, -1), qkv_dim=64,
)
SENTINEL = "s3cr3t-sentinel-7f1e"


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory) -> Path:
    from hat_edge.exporters import export_bundle
    from hat_edge.model import SubTransformer

    d = tmp_path_factory.mktemp("sec")
    return export_bundle(SubTransformer.random(SMALL, 300, seed=3), d / "b", fmt="onnx", exporter="torchscript")


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def _reseal(bundle: Path, **changes) -> None:
    """Edit manifest fields and recompute manifest_sha256, as anyone can (it is a checksum, not a
    signature): the crafted bundle passes the digest check and must be refused on its fields."""
    from hat_edge.runtime.bundle import manifest_digest

    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _local_profile(tmp: Path):
    from hat_edge.devices.profiles import profile_from_dict

    return profile_from_dict({"name": "local-sec", "threads": 1, "work_dir": str(tmp / "board" / "work"),
                              "env": {"HAT_SECRET": SENTINEL},
                              "measurement": {"warmup": 1, "min_repeats": 3, "min_time_s": 0.0,
                                              "vocab_size": 300, "timeout_s": 120.0}}, "<security test profile>")


# ------------------------------------------------------------------------------------------------
# bundles
# ------------------------------------------------------------------------------------------------
def test_precision_that_climbs_out_of_the_work_dir_is_refused_before_anything_is_written(
        good_bundle, tmp_path, sshd_server, ssh_profile) -> None:
    from hat_edge.app.deploy import deploy
    from hat_edge.exporters import load_bundle

    bad = _copy(good_bundle, tmp_path / "bad")
    _reseal(bad, precision="fp32/../../../escaped")
    with pytest.raises(UserError) as e:
        load_bundle(bad)
    msg = _one_line(e.value)
    assert str(bad) in msg and "field 'precision'" in msg and "fp32, int8" in msg

    # The local profile and a real sshd: deploy refuses it and writes nothing anywhere.
    for profile, board in ((_local_profile(tmp_path), tmp_path / "board"),
                           (ssh_profile(sshd_server), tmp_path / "board-work")):
        before = _files_under(tmp_path)
        with pytest.raises(UserError) as e:
            deploy(profile, bundle=bad, benchmark=False, log=lambda m: None)
        assert "field 'precision'" in _one_line(e.value)
        assert not (board / "deployed").exists()
        new = _files_under(tmp_path) - before
        assert not any("escaped" in p for p in _files_under(tmp_path))
        assert all(Path(p).name.startswith("runner-") or (tmp_path / p).is_dir() for p in new), new


def test_hidden_link_to_a_host_file_never_travels(good_bundle, tmp_path, sshd_server, ssh_profile) -> None:
    """`.x -> a 0600 file on the host` in a bundle dir: refused by the host and by the device's
    runner, and the host file's content reaches no file of the board."""
    from hat_edge.app.deploy import deploy
    from hat_edge.exporters import load_bundle
    from hat_edge.runtime import pack

    secret = tmp_path / "host-secret"
    secret.write_text(SENTINEL)
    secret.chmod(0o600)
    bad = _copy(good_bundle, tmp_path / "bad")
    (bad / ".x").symlink_to(secret)
    with pytest.raises(UserError) as e:
        load_bundle(bad)
    msg = _one_line(e.value)
    assert str(bad) in msg and "'.x'" in msg and "link" in msg
    r = subprocess.run([sys.executable, str(pack.build_runner()), "check", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "'.x'" in r.stderr and r.stderr.strip().count("\n") == 0
    with pytest.raises(UserError):
        deploy(ssh_profile(sshd_server), bundle=bad, benchmark=False, log=lambda m: None)
    board = tmp_path / "board-work"
    assert all(SENTINEL not in p.read_text(errors="replace") for p in board.rglob("*") if p.is_file())

    # A hidden plain file is refused too: a bundle dir holds exactly its listed files.
    os.unlink(bad / ".x")
    (bad / ".hidden").write_text("x")
    with pytest.raises(UserError, match="'.hidden' is not listed"):
        load_bundle(bad)


def test_deploy_pushes_only_the_listed_files(good_bundle, tmp_path) -> None:
    """The upload is the manifest's files and the manifest, by name: nothing else in the local
    directory (here: nothing else can be there, since load_bundle refuses it) and no subdirectory."""
    from hat_edge.app.deploy import deploy

    profile = _local_profile(tmp_path)
    r = deploy(profile, bundle=good_bundle, benchmark=False, log=lambda m: None)
    manifest = json.loads((good_bundle / "manifest.json").read_text())
    assert sorted(p.name for p in Path(r.remote_dir).iterdir()) == sorted([*manifest["files"], "manifest.json"])
    assert Path(r.remote_dir).parent == Path(profile.resolved_work_dir) / "deployed"


def test_a_bundles_exporter_text_is_shown_only_when_it_is_a_known_one(good_bundle, tmp_path) -> None:
    """The manifest's `exporter` goes into the deploy report and report.md: a crafted one (terminal
    escapes, markdown) reads as "unknown"; the real one as written by the export."""
    from hat_edge.app.deploy import deploy, render_deploy
    from hat_edge.exporters import load_bundle

    assert load_bundle(good_bundle).exporter == "torch.onnx.export(dynamo=False)"
    bad = _copy(good_bundle, tmp_path / "bad")
    _reseal(bad, exporter="\x1b[2J\x1b[31m| pwned |](http://x)")
    assert load_bundle(bad).exporter == "unknown"
    r = deploy(_local_profile(tmp_path), bundle=bad, benchmark=False, log=lambda m: None)
    assert r.exporter == "unknown" and "\x1b" not in render_deploy(r) and "pwned" not in json.dumps(r.to_dict())


def test_subdirectory_or_planted_device_link_is_refused(good_bundle, tmp_path) -> None:
    from hat_edge.app.deploy import deploy
    from hat_edge.exporters import load_bundle

    bad = _copy(good_bundle, tmp_path / "bad")
    (bad / "sub").mkdir()
    with pytest.raises(UserError, match="'sub' is a directory"):
        load_bundle(bad)

    # A link planted on the board where hat-edge would write (work_dir/deployed -> elsewhere).
    profile = _local_profile(tmp_path)
    work = Path(profile.resolved_work_dir)
    work.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (work / "deployed").symlink_to(elsewhere)
    with pytest.raises(UserError) as e:
        deploy(profile, bundle=good_bundle, benchmark=False, log=lambda m: None)
    assert "symbolic link" in _one_line(e.value) and str(work / "deployed") in str(e.value)
    assert list(elsewhere.iterdir()) == []


def test_generated_files_cannot_overwrite_checked_ones_or_fill_the_disk(good_bundle, tmp_path) -> None:
    from hat_edge.exporters import load_bundle
    from hat_edge.runtime.bundle import MAX_GENERATED_BYTES

    graph = json.loads((good_bundle / "manifest.json").read_text())["graphs"]["encoder"]["file"]
    bad = _copy(good_bundle, tmp_path / "overwrite")
    _reseal(bad, generated={graph: {"bytes": 4096, "seed": 0, "tensors": [[0, 4096, "float32"]]}})
    with pytest.raises(UserError) as e:
        load_bundle(bad)
    assert f"generated file '{graph}' is also a hashed file" in _one_line(e.value) and str(bad) in str(e.value)

    big = _copy(good_bundle, tmp_path / "big")
    n = MAX_GENERATED_BYTES + 4096
    _reseal(big, generated={"w.weights": {"bytes": n, "seed": 0, "tensors": [[0, n, "float32"]]}})
    with pytest.raises(UserError) as e:
        load_bundle(big)
    assert "'w.weights' has a malformed layout" in _one_line(e.value) and "bytes at most" in str(e.value)
    assert not (big / "w.weights").exists()

    sneaky = _copy(good_bundle, tmp_path / "sneaky")
    _reseal(sneaky, generated={"../w.weights": {"bytes": 8, "seed": 0, "tensors": []}})
    with pytest.raises(UserError, match="not a plain file name"):
        load_bundle(sneaky)


@pytest.mark.parametrize("field,value", [("runtime", "tflite"), ("files", {"../x": {"sha256": "0" * 64}}),
                                         ("files", {".hidden": {"sha256": "0" * 64}})])
def test_manifest_closed_sets_and_file_names(good_bundle, tmp_path, field, value) -> None:
    from hat_edge.exporters import load_bundle

    bad = _copy(good_bundle, tmp_path / "bad")
    _reseal(bad, **{field: value})
    with pytest.raises(UserError) as e:
        load_bundle(bad)
    assert f"field '{field}'" in _one_line(e.value) and str(bad) in str(e.value)


def test_manifest_vocab_size_that_is_not_the_graphs_is_refused(good_bundle, tmp_path) -> None:
    """The beam search splits the graph's flat top-k indices by the manifest's vocab_size: a manifest
    that disagrees with the decoder graph would reorder the beams silently, so it is refused."""
    from hat_edge.runtime.backends import open_model

    bad = _copy(good_bundle, tmp_path / "vocab")
    model = json.loads((bad / "manifest.json").read_text())["model"]
    _reseal(bad, model={**model, "vocab_size": 100})
    with pytest.raises(UserError) as e:
        open_model(bad, threads=1)
    assert "field 'model.vocab_size' is 100" in _one_line(e.value) and "300 tokens" in str(e.value)
    open_model(good_bundle, threads=1)  # the real one opens


# ------------------------------------------------------------------------------------------------
# numbers no float can hold: a 5,000-digit integer (json refuses it with a ValueError, not a
# JSONDecodeError), a 400-digit one (float() overflows), nesting deeper than the recursion limit
# ------------------------------------------------------------------------------------------------
HUGE_INT = "9" * 5000
BIG_INT = "9" * 400
DEEP = "[" * 100000 + "]" * 100000


def test_bundles_priors_predictors_and_jobs_with_unholdable_numbers_are_one_line_errors(good_bundle,
                                                                                        tmp_path) -> None:
    from hat_edge.exporters import load_bundle
    from hat_edge.latency.predictor import load_predictor
    from hat_edge.latency.prior import PACKAGED_PRIOR, load_prior
    from hat_edge.runtime.job import parse_job

    for i, text in enumerate((HUGE_INT, DEEP)):
        bad = _copy(good_bundle, tmp_path / f"b{i}")
        (bad / "manifest.json").write_text('{"format": "hat-edge-bundle", "version": %s}' % text)
        with pytest.raises(UserError) as e:
            load_bundle(bad)
        assert "manifest.json" in _one_line(e.value) and str(bad) in str(e.value)
        with pytest.raises(UserError) as e:
            parse_job('{"format": %s}' % text, "job.json")
        assert _one_line(e.value).startswith("job.json")

    doc = json.loads(PACKAGED_PRIOR.read_text())
    for i, (where, raw) in enumerate((("encoder", BIG_INT), ("encoder", HUGE_INT), ("noise", BIG_INT),
                                      ("encoder", "1e300"))):
        text = json.dumps(doc).replace(json.dumps(doc["devices"][0]["encoder"][:1])[:-1],
                                       "[" + raw, 1) if where == "encoder" else json.dumps(doc).replace(
            json.dumps(doc["devices"][0]["noise_log_q05_q95"]), "[-0.1, %s]" % raw, 1)
        path = tmp_path / f"prior{i}.json"
        path.write_text(text)
        with pytest.raises(UserError) as e:
            load_prior(path)
        msg = _one_line(e.value)
        assert msg.startswith(str(path)), msg
        if raw != HUGE_INT:
            assert "devices[0]." in msg, msg

    for i, body in enumerate(('{"format": %s}' % HUGE_INT, DEEP)):
        path = tmp_path / f"pred{i}.json"
        path.write_text(body)
        with pytest.raises(UserError) as e:
            load_predictor(path)
        assert _one_line(e.value).startswith(str(path))


# ------------------------------------------------------------------------------------------------
# profiles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[measurement]\ntimeout_s = inf", "[measurement]\nmin_time_s = nan",
                                  "[measurement]\ncooldown_s = inf"])
def test_non_finite_numbers_in_a_profile_are_refused(tmp_path, text) -> None:
    from hat_edge.devices.profiles import ProfileError, load_profile_file

    path = tmp_path / "p.toml"
    path.write_text(text + "\n")
    with pytest.raises(ProfileError) as e:
        load_profile_file(path)
    msg = _one_line(e.value)
    assert msg.startswith(f"{path}: field 'measurement.") and ("finite" in msg or "a number" in msg)


# ------------------------------------------------------------------------------------------------
# secrets
# ------------------------------------------------------------------------------------------------
@pytest.mark.ssh
def test_profile_env_values_reach_no_store_result_report_or_log(good_bundle, tmp_path, sshd_server, ssh_profile,
                                                                 caplog, capfd) -> None:
    """A sentinel env value in the profile: it is used on the device (the runner sees it), and
    appears nowhere in the store file, the results, the deploy report or the logs."""
    import logging

    from hat_edge.app.deploy import deploy, render_deploy
    from hat_edge.devices.measure import measure_archs, write_job_files
    from hat_edge.devices.transport import open_transport
    from hat_edge.latency.store import LatencyStore
    from hat_edge.runtime.job import make_job

    caplog.set_level(logging.DEBUG)
    profile = ssh_profile(sshd_server, env={"HAT_SECRET": SENTINEL}, measurement={"vocab_size": 300})
    store_path = tmp_path / "lat.sqlite"
    store = LatencyStore(store_path)
    recs = measure_archs(profile, [SMALL], store, progress=False, cache_dir=tmp_path / "cache")
    assert len(recs) == 1 and recs[0].env["measurement"]["settings"]["env"] == ["HAT_SECRET"]
    r = deploy(profile, bundle=good_bundle, log=logging.getLogger("deploy-test").info)
    assert r.ok
    store.close()
    out, err = capfd.readouterr()
    texts = {
        "store": store_path.read_bytes().decode("latin-1"),
        "deploy json": json.dumps(r.to_dict()),
        "deploy report": render_deploy(r),
        "logs": caplog.text,
        "stdout/stderr": out + err,
    }
    for wal in tmp_path.glob("lat.sqlite*"):
        texts[wal.name] = wal.read_bytes().decode("latin-1")
    for where, text in texts.items():
        assert SENTINEL not in text, where

    # Job files are created 0600 on the device (their env holds the values the runner applies).
    with open_transport(profile) as t:
        job_dir, job_path, _ = write_job_files(t, make_job([("x", "nowhere")], profile.measure_spec()))
        mode = t._lstat_mode(job_path)
        t.remove(job_dir)
    assert mode is not None and mode & 0o777 == 0o600


def test_job_env_is_applied_from_the_job_file_before_numpy(tmp_path, monkeypatch) -> None:
    """The runner takes the profile's env from the 0600 job file, before it imports numpy or a
    runtime: no value needs to ride on the device's command line."""
    import zipfile

    from hat_edge.runtime import pack
    from hat_edge.runtime.job import MeasureSpec, apply_job_env, write_job

    job = write_job(tmp_path / "job.json", [("a", "nowhere")], MeasureSpec(env=(("HAT_TEST_VAR", SENTINEL),)))
    assert job.stat().st_mode & 0o777 == 0o600
    monkeypatch.delenv("HAT_TEST_VAR", raising=False)
    apply_job_env(["run", str(job), "--out", "x"])
    assert os.environ["HAT_TEST_VAR"] == SENTINEL
    main = zipfile.ZipFile(pack.build_runner()).read("__main__.py").decode()
    assert main.index("apply_job_env(sys.argv[1:])") < main.index("hat_edge.runtime.runner")
    # What the entry point imports before the env is set (job and its own imports) needs no numpy.
    import ast

    for name in ("job", "files", "formats", "errors"):
        tree = ast.parse((Path(pack.__file__).parent / f"{name}.py").read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert not {m for m in mods if m.split(".")[0] in ("numpy", "onnxruntime", "torch")}, name
