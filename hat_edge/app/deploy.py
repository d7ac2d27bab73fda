"""Deploy a SubTransformer to a device: export, push, verify there, benchmark there.

    deploy(profile, arch=ARCH, checkpoint=CKPT)     export the checkpoint's weights for ARCH first
    deploy(profile, bundle=DIR)                     an exported bundle as it is

Steps, each reported:
  1. connect and describe the device (`runner.py env`): an unreachable device fails here, first
  2. export the bundle (arch + checkpoint) and check it on the host against PyTorch (`verify_bundle`)
  3. push it to `<work_dir>/deployed/<name>`: every file is sha256-checked and skipped when the
     device already has it, so deploying again sends nothing (or only a re-written manifest)
  4. `runner.py check` on the device: manifest version and the sha256 of every file
  5. `runner.py translate` on the device: test sentences, compared token for token with the same
     bundle decoded on the host (same runner code, same runtime: they must be identical)
  6. `runner.py run`: the benchmark, with the profile's measurement settings
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from hat_edge.checkpoint import Checkpoint, load_checkpoint
from hat_edge.data.tokenizer import load_tokenizer
from hat_edge.devices.measure import device_env, last_json_line, push_runner, require_runtime, run_one_job
from hat_edge.devices.profiles import DeviceProfile
from hat_edge.devices.transport import Result, Transport, TransportError, open_transport
from hat_edge.errors import UserError
from hat_edge.exporters import export_bundle, load_bundle, verify_bundle
from hat_edge.exporters import translate as host_translate
from hat_edge.exporters.verify import INT8_AGREEMENT, token_agreement
from hat_edge.runtime.formats import FORMAT_OF_RUNTIME, MANIFEST, PRECISIONS, RUNTIMES
from hat_edge.space import Arch

RUNTIME_MODULE = {"onnxruntime": "onnxruntime", "torchscript": "torch"}  # the env key of each runtime's version
DEPLOY_FORMAT = "hat-edge-deploy"
DEPLOY_VERSION = 1

def _level(beam: int) -> float:
    """The int8 agreement level of a decoding (`INT8_AGREEMENT`): greedy's, or beam search's."""
    return INT8_AGREEMENT["greedy" if beam <= 1 else "beam"]


# Test sentences the host check of a deployed bundle decodes (int8's agreement wants a few dozen).
VERIFY_SENTENCES = 20


@dataclass(frozen=True)
class Translation:
    source: str  # text, or the token ids when there is no tokenizer
    reference: str | None
    device: str  # the device's output, detokenised (or ids)
    device_tokens: tuple[int, ...]
    host_equal: bool  # the host decoded the same bundle to the same tokens


@dataclass(frozen=True)
class DeployResult:
    profile: str
    bundle: str  # local bundle dir
    remote_dir: str
    runtime: str
    precision: str
    arch: Arch
    files_total: int
    files_sent: int
    hashes_ok: bool
    parity: bool  # fp32: device == host for every test translation; int8: their agreement >= the level
    translations: tuple[Translation, ...]
    host_verify: Mapping[str, Any] | None  # bundle vs PyTorch on the host (None for --bundle)
    bench: Mapping[str, Any]  # median_ms, p90_ms, iqr_ms, cv, mean_10_90_ms, runs, peak_rss_mb
    env: Mapping[str, Any] = field(default_factory=dict)
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    # int8: the share of tokens the device's and the host's translations have in common (their
    # int8 kernels differ, e.g. ARM vs x86, so identical tokens are not expected); None for fp32
    device_agreement: float | None = None
    beam: int = 5  # of the test translations
    exporter: str = ""  # the bundle's exporter (`Bundle.exporter`), e.g. "torch.onnx.export(dynamo=True)"

    @property
    def files_skipped(self) -> int:
        return self.files_total - self.files_sent

    @property
    def median_ms(self) -> float | None:
        """The benchmark's median latency on the device (None without a benchmark)."""
        return self.bench.get("median_ms")

    @property
    def p90_ms(self) -> float | None:
        return self.bench.get("p90_ms")

    @property
    def cv(self) -> float | None:
        return self.bench.get("cv")

    @property
    def quantize(self) -> str | None:
        """The precision when not fp32 (e.g. "int8"), else None."""
        return None if self.precision == "fp32" else self.precision

    @property
    def ok(self) -> bool:
        host_ok = self.host_verify is None or bool(self.host_verify.get("passed", True))
        return self.hashes_ok and self.parity and host_ok

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": DEPLOY_FORMAT,
            "version": DEPLOY_VERSION,
            "profile": self.profile,
            "bundle": self.bundle,
            "remote_dir": self.remote_dir,
            "runtime": self.runtime,
            "precision": self.precision,
            "quantize": self.quantize,
            "exporter": self.exporter,
            "arch": self.arch.to_dict(),
            "params": self.arch.params(),
            "files_total": self.files_total,
            "files_sent": self.files_sent,
            "files_skipped": self.files_skipped,
            "hashes_ok": self.hashes_ok,
            "parity": self.parity,
            "device_agreement": self.device_agreement,
            "ok": self.ok,
            "host_verify": dict(self.host_verify) if self.host_verify is not None else None,
            "translations": [asdict(t) for t in self.translations],
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "cv": self.cv,
            "bench": dict(self.bench),
            "env": dict(self.env),
            "timings_ms": dict(self.timings_ms),
        }


def default_bundle_dir(profile_name: str, arch: Arch, quantize: str | None) -> Path:
    """hat-edge-deploy/<profile>-<arch hash>[-int8]: one bundle per (device, arch, precision)."""
    h = hashlib.sha256(arch.to_json().encode()).hexdigest()[:10]
    return Path("hat-edge-deploy") / f"{profile_name}-{h}{'-' + quantize if quantize else ''}"


def _remote_name(manifest: Mapping[str, Any]) -> str:
    """A stable device dir name for a bundle: same arch, runtime, precision and file set -> same dir,
    so a re-deploy overwrites in place and unchanged files are skipped. The file set is part of the
    name because the runner rejects a bundle dir holding files its manifest does not list. Built
    from checked parts only: runtime and precision are members of their closed sets (a manifest
    read by `load_bundle` has them), the rest is a hash."""
    runtime, precision = manifest["runtime"], manifest.get("precision", "fp32")
    if runtime not in RUNTIMES or precision not in PRECISIONS:
        raise UserError(f"bundle manifest: runtime {runtime!r} / precision {precision!r} not allowed "
                        f"(runtime: {', '.join(RUNTIMES)}; precision: {', '.join(PRECISIONS)})")
    arch = json.dumps(manifest["arch"], sort_keys=True, separators=(",", ":"))
    files = ",".join(sorted(manifest["files"]))
    key = f"{arch}|{runtime}|{precision}|{files}"
    return f"{hashlib.sha256(key.encode()).hexdigest()[:16]}-{runtime}-{precision}"


def _runner_json(res: Result, what: str) -> dict[str, Any]:
    if res.returncode != 0:
        tail = " | ".join((res.stderr or "").strip().splitlines()[-3:])
        raise TransportError(f"{what}: exit status {res.returncode}: {tail or 'no output'}")
    return last_json_line(res.stdout, what)


def export_key(sub: Any, arch: Arch, fmt: str, quantize: str | None, tokenizer: Any, exporter: str = "dynamo") -> str:
    """What an exported bundle is made of: the SubTransformer's weights (every tensor's bytes), its
    arch, format, precision, ONNX exporter and the tokenizer's files. Equal keys: the export would
    be the same."""
    from hat_edge.checkpoint import content_sha256

    files: dict[str, bytes] = {}
    if tokenizer is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            tokenizer.save(d)
            files = {str(f.relative_to(d)): f.read_bytes() for f in Path(d).rglob("*") if f.is_file()}
    return content_sha256({"arch": arch.to_json(), "format": fmt, "quantize": quantize,
                           "exporter": exporter if fmt == "onnx" else None,
                           "weights": sub.state_dict(), "tokenizer": files})


def _key_file(out: Path) -> Path:
    # beside the bundle, not in it: a bundle holds exactly its manifest's files
    return out.parent / f"{out.name}.export-key.json"


def reusable_bundle(out: Path, key: str) -> Path | None:
    """`out`, when it holds an intact bundle (every hash checked) exported from the same `key`; else
    None. A second `hat-edge run` (or deploy) of the same winner skips the export (~15 s for the
    demo, a minute for a WMT model). Links are never followed."""
    kf = _key_file(out)
    try:
        if kf.is_symlink() or out.is_symlink() or not kf.is_file() or not out.is_dir():
            return None
        if json.loads(kf.read_text()) != {"version": 1, "key": key}:
            return None
        load_bundle(out)
    except (OSError, ValueError, UserError):
        return None
    return out


def deploy(
    profile: DeviceProfile,
    *,
    bundle: str | Path | None = None,
    arch: Arch | None = None,
    checkpoint: Checkpoint | str | None = None,
    out_dir: str | Path | None = None,
    quantize: str | None = None,
    sentences: Sequence[str] | None = None,
    references: Sequence[str] | None = None,
    verify_sentences: Sequence[str] | None = None,
    beam: int = 5,
    benchmark: bool = True,
    trust_new_host: bool = False,
    env: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    level: str = "raw",
    exporter: str = "dynamo",
) -> DeployResult:
    """Export (if given an arch), push, check, translate and benchmark on `profile`'s device.

    sentences: test sentences (text) to translate on the device; without a tokenizer in the bundle
    a few fixed token-id sources are used instead. `verify_sentences`: the sentences the host
    check against PyTorch decodes (default: `sentences`; int8's agreement wants a few dozen real
    ones). `env`: a fresh `device_env` result, when the
    caller has just checked the device (skips the first step). `level`: the sentences' text level
    ("raw", or "bpe" for HAT's BPE'd data with a model imported from HAT); the device's output
    comes back as raw text either way. `exporter`: the ONNX exporter of an arch's export ("dynamo",
    or "torchscript": the one every latency measurement uses, 16x faster to export the demo).
    """
    say = log or (lambda m: print(m, file=sys.stderr))
    if (bundle is None) == (arch is None):
        raise UserError("deploy needs either ARCH_FILE with --checkpoint, or --bundle DIR (not both)")
    if arch is not None and checkpoint is None:
        raise UserError("ARCH_FILE needs --checkpoint (a checkpoint file or 'demo') for the weights")
    if bundle is not None and quantize:
        raise UserError("--quantize applies when exporting an ARCH_FILE; a --bundle is deployed as it is")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # 1. the device first: nothing is exported for a device that cannot be reached
    if env is None:
        say(f"connecting to '{profile.name}' ...")
        env = device_env(profile, trust_new_host=trust_new_host)
    # A runtime the device lacks fails here, before anything is exported or sent.
    require_runtime(profile, bool(env.get(RUNTIME_MODULE[profile.runtime])), profile.remote_python)
    timings["connect_ms"] = (time.perf_counter() - t0) * 1e3

    # 2. the bundle
    tok = None
    host_verify = None
    if arch is not None:
        assert checkpoint is not None  # refused above
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        ckpt.space.validate(arch, "ARCH_FILE")
        fmt = FORMAT_OF_RUNTIME[profile.runtime]
        out = Path(out_dir) if out_dir else default_bundle_dir(profile.name, arch, quantize)
        t = time.perf_counter()
        sub = ckpt.model.extract(arch).eval()
        key = export_key(sub, arch, fmt, quantize, ckpt.tokenizer, exporter)
        path = reusable_bundle(out, key)
        if path is not None:
            say(f"reusing the export of {arch.describe()} in {out} (same weights, format, exporter and precision)")
        else:
            how = fmt + (f", {exporter} exporter" if fmt == "onnx" else "") + (f", {quantize}" if quantize else "")
            say(f"exporting {arch.describe()} ({how}) to {out}")
            _key_file(out).unlink(missing_ok=True)  # an export that fails leaves no key behind
            path = export_bundle(sub, out, fmt=fmt, quantize=quantize, tokenizer=ckpt.tokenizer, exporter=exporter)
            _key_file(out).write_text(json.dumps({"version": 1, "key": key}))
        timings["export_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        # int8's agreement with PyTorch is measured on the test sentences when there are any
        # (on random ids it says little; `verify_bundle`)
        check = verify_sentences or sentences
        host_verify = verify_bundle(sub, path, sources=[ckpt.tokenizer.encode(x, level=level) for x in check] if check else None)
        timings["host_verify_ms"] = (time.perf_counter() - t) * 1e3
        tok = ckpt.tokenizer
        b = load_bundle(path)
    else:
        assert bundle is not None  # one of bundle and arch, checked above
        b = load_bundle(bundle)  # hashes checked on the host before anything is sent
        if b.runtime != profile.runtime:
            raise UserError(
                f"--bundle {bundle}: runtime '{b.runtime}' but profile '{profile.name}' uses '{profile.runtime}'"
            )
        if b.tokenizer_file is not None:
            tok = load_tokenizer(b.tokenizer_file)
    local_dir = Path(b.path)
    manifest = b.manifest

    # Test sources: the sentences as ids, or fixed id sequences without a tokenizer.
    if tok is not None and sentences:
        sources = [tok.encode(s, level=level) for s in sentences]
        shown = [tok.reference(s, level, "raw", side="src") for s in sentences] if level != "raw" else list(sentences)
        if references and level != "raw":
            references = [tok.reference(r, level, "raw") for r in references]
    else:
        rng = np.random.default_rng(0)
        m = manifest["model"]
        V = int(m.get("src_vocab_size", m["vocab_size"]))
        eos = int(m.get("eos_id", 3))
        sources = [[int(x) for x in rng.integers(4, V, size=n)] + [eos] for n in (7, 12, 5)]
        shown = [" ".join(map(str, s)) for s in sources]
        references = None

    with open_transport(profile, trust_new_host=trust_new_host) as tr:
        # 3. push (sha256-checked, unchanged files skipped)
        t = time.perf_counter()
        runner = push_runner(tr)
        remote_dir = tr.work_path("deployed", _remote_name(manifest))
        # Exactly the bundle's checked files (names plain, listed in its manifest), nothing else in
        # the directory: not a hidden file, not a link, not generated weights.
        files = [local_dir / name for name in sorted(manifest["files"])] + [local_dir / MANIFEST]
        sent = tr.push_many([(f, tr.join(remote_dir, f.name)) for f in files])
        timings["push_ms"] = (time.perf_counter() - t) * 1e3
        say(f"pushed to {profile.name}:{remote_dir}: {sent} file(s) sent, {len(files) - sent} unchanged")
        penv = profile.env_dict

        # 4. hashes, checked by the device itself
        t = time.perf_counter()
        res = tr.run([tr.python, runner, "check", remote_dir], timeout=120)  # hashing needs no env
        timings["check_ms"] = (time.perf_counter() - t) * 1e3
        if res.returncode != 0:
            why = " | ".join(res.stderr.strip().splitlines()[-2:]) or f"exit status {res.returncode}"
            raise UserError(f"{profile.name}: the pushed bundle failed its check on the device: {why}")
        hashes_ok = bool(_runner_json(res, f"{profile.name}: runner check").get("ok"))

        # 5. translations on the device vs the same bundle on the host
        t = time.perf_counter()
        argv = [tr.python, runner, "translate", remote_dir, "--beam", str(beam)]
        if profile.threads:
            argv += ["--threads", str(profile.threads)]
        for s in sources:
            argv += ["--src", " ".join(map(str, s))]
        dev_tokens = _runner_json(tr.run(argv, timeout=300, env=penv), f"{profile.name}: runner translate")["tokens"]
        host_tokens = host_translate(local_dir, sources, beam=beam)
        timings["translate_ms"] = (time.perf_counter() - t) * 1e3
        translations = tuple(
            Translation(
                source=shown[i],
                reference=references[i] if references else None,
                device=tok.decode(d) if tok is not None else " ".join(map(str, d)),
                device_tokens=tuple(int(x) for x in d),
                host_equal=list(map(int, d)) == list(map(int, h)),
            )
            for i, (d, h) in enumerate(zip(dev_tokens, host_tokens))
        )
        device_agreement = None
        if b.precision == "fp32":
            parity = len(dev_tokens) == len(sources) and all(x.host_equal for x in translations)
        else:
            device_agreement = token_agreement([list(map(int, h)) for h in host_tokens],
                                               [list(map(int, d)) for d in dev_tokens])
            parity = len(dev_tokens) == len(sources) and device_agreement >= _level(beam)

        # 6. the benchmark, with the profile's settings
        bench: dict[str, Any] = {}
        if benchmark:
            t = time.perf_counter()
            quantize = None if b.precision == "fp32" else b.precision
            bench = _benchmark(tr, profile, remote_dir, quantize)
            bench["settings"] = profile.measure_spec(quantize).identity()
            timings["bench_ms"] = (time.perf_counter() - t) * 1e3
    timings["total_ms"] = (time.perf_counter() - t0) * 1e3
    return DeployResult(
        profile=profile.name, bundle=str(local_dir), remote_dir=remote_dir, runtime=b.runtime, precision=b.precision,
        arch=b.arch, files_total=len(files), files_sent=sent, hashes_ok=hashes_ok, parity=parity,
        translations=translations, host_verify=host_verify, bench=bench, env=env, timings_ms=timings,
        device_agreement=device_agreement, beam=beam, exporter=b.exporter,
    )


def _benchmark(tr: Transport, profile: DeviceProfile, remote_dir: str, quantize: str | None = None) -> dict[str, Any]:
    """One runner job with the deployed bundle; returns the result line's statistics."""
    what = f"{profile.name}: benchmark of the deployed bundle"
    lines = run_one_job(tr, [("deployed", remote_dir)], profile.measure_spec(quantize), what)
    line = next((x for x in lines if x.get("id") == "deployed"), None)
    if line is None or "error" in line:
        raise TransportError(f"{what} failed: {line.get('error') if line else 'no result line'}")
    keep = ("median_ms", "mean_10_90_ms", "p90_ms", "iqr_ms", "cv", "encoder_median_ms", "decoder_median_ms",
            "peak_rss_mb", "throttled", "warmup")
    out = {k: line.get(k) for k in keep}
    out["runs"] = [float(r["total_ms"]) for r in line.get("runs", [])]
    return out


def render_deploy(r: DeployResult) -> str:
    """The human report of one deployment."""
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    hv = r.host_verify
    lines = [
        f"deployed {r.arch.describe()}",
        f"  bundle        {r.bundle} ({r.runtime}, {r.precision}{', ' + r.exporter if r.exporter else ''})",
        f"  device        {r.profile}:{r.remote_dir}",
        f"  push          {r.files_sent} file(s) sent, {r.files_skipped} unchanged",
        f"  hashes        {yes(r.hashes_ok)} (checked on the device)",
    ]
    if hv is not None and hv.get("precision", "fp32") != "fp32":
        g, b = float(hv.get("greedy_agreement", float("nan"))), float(hv.get("beam_agreement", float("nan")))
        ok = g >= INT8_AGREEMENT["greedy"] and b >= INT8_AGREEMENT["beam"]
        lines.append(
            f"  host parity   {hv.get('precision')}: tokens agreeing with PyTorch: greedy {g:.2f}, beam {b:.2f} "
            f"(expected >= {INT8_AGREEMENT['greedy']:.2f} / {INT8_AGREEMENT['beam']:.2f}: {'ok' if ok else 'LOW'})"
        )
    elif hv is not None:
        lines.append(
            f"  host parity   max |diff| vs PyTorch {hv.get('max_abs_diff', float('nan')):.2e}, "
            f"tokens equal: {yes(hv.get('tokens_equal'))}"
        )
    if r.device_agreement is not None:
        lines.append(f"  device parity {r.precision}: tokens agreeing with the host's: {r.device_agreement:.2f} "
                     f"(expected >= {_level(r.beam):.2f}: {'ok' if r.parity else 'LOW'}; int8 kernels differ between CPUs)")
    else:
        lines.append(f"  device parity {yes(r.parity)} ({len(r.translations)} translations identical to the host's)")
    if r.bench:
        b = r.bench
        lines.append(
            f"  benchmark     median {b['median_ms']:.2f} ms, p90 {b['p90_ms']:.2f} ms, CV {b['cv']:.3f} "
            f"({len(b.get('runs', []))} runs)"
        )
    for t in r.translations:
        lines.append(f"    > {t.source}")
        lines.append(f"    < {t.device}")
    return "\n".join(lines)


__all__ = ["DeployResult", "Translation", "default_bundle_dir", "deploy", "render_deploy"]
