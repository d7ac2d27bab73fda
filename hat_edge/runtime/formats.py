"""The wire formats' names, versions and closed sets: defined here once, read everywhere.

A device and a host agree on three file formats (docs/CONTRACTS.md):
  bundle   DIR/manifest.json   format "hat-edge-bundle", version BUNDLE_VERSION  (runtime.bundle)
  job      job.json            format "hat-edge-job",    version JOB_VERSION     (runtime.job)
  result   results.jsonl       one JSON object a line,   version RESULT_VERSION  (runtime.job)
and on `runner env`'s object (version RUNNER_VERSION, runtime.envinfo).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

RUNNER_VERSION = 1
# The oldest python the runner runs on (a board's; the host needs 3.11). Kept by
# tests/test_runner.py, which parses the runtime with this grammar.
RUNNER_MIN_PYTHON = (3, 8)
BUNDLE_FORMAT = "hat-edge-bundle"
BUNDLE_VERSION = 1
JOB_FORMAT = "hat-edge-job"
JOB_VERSION = 1
RESULT_VERSION = 1
MANIFEST = "manifest.json"
# The host's note in each job dir (`job-host.json`): which device, runtime, store key and archs
# the job's ids stand for, so a later command can store the results of a job whose host died.
JOB_HOST_FORMAT = "hat-edge-job-host"
JOB_HOST_VERSION = 1
JOB_FILE, RESULTS_FILE, JOB_HOST_FILE, RUNNER_LOG = "job.json", "results.jsonl", "job-host.json", "runner.log"
JOBS_DIR = "jobs"

# Closed sets. A runtime runs the graphs of exactly one export format.
RUNTIMES: Tuple[str, ...] = ("onnxruntime", "torchscript")
FORMATS: Tuple[str, ...] = ("onnx", "torchscript")
FORMAT_OF_RUNTIME: Dict[str, str] = {"onnxruntime": "onnx", "torchscript": "torchscript"}
RUNTIME_OF_FORMAT: Dict[str, str] = {f: r for r, f in FORMAT_OF_RUNTIME.items()}
PRECISIONS: Tuple[str, ...] = ("fp32", "int8")
QUANTIZE: Tuple[Optional[str], ...] = (None, "int8")  # None: fp32 (no quantisation)
DEVICES: Tuple[str, ...] = ("cpu", "cuda")
ORT_OPT_LEVELS: Tuple[str, ...] = ("disable", "basic", "extended", "all")
GRAPHS: Tuple[str, ...] = ("encoder", "decoder_step")
# The ONNX decoder step's optional search input/outputs (bundles exported since issue #17; older
# bundles lack them and run as before): k, then per row the k best log-probs and their ids.
TOPK_INPUT, TOPK_VALUES, TOPK_IDS = "topk", "topk_log_probs", "topk_ids"


def precision_of(quantize: Optional[str]) -> str:
    """The bundle precision a quantisation choice gives ("fp32" for none)."""
    return quantize or "fp32"
