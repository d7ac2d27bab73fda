"""Build a latency prior (per-device cost models) from latency datasets.

The packaged prior, hat_edge/assets/latency_prior/hat_wmt14ende.json, is HAT's three measured
latency datasets (MIT licence, HAT authors) summarised as per-device fitted cost-term coefficients;
rebuild it with (from the repository root, the shared data beside the checkout):

    .venv/bin/python scripts/build_latency_prior.py            # the packaged prior

Or any other set of devices (HAT-format or hat-edge CSVs):

    .venv/bin/python scripts/build_latency_prior.py --data pi5=pi5.csv --data n100=n100.csv \
        --out my_prior.json

(`hat-edge predictor train --prior FILE.csv` also accepts latency CSVs directly.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hat_edge.latency.features import read_latency_csv  # noqa: E402
from hat_edge.latency.prior import PACKAGED_PRIOR, build_prior  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "hat"
HAT_FILES = {
    "raspberrypi": "wmt14ende_cpu_raspberrypi_all.csv",
    "xeon": "wmt14ende_cpu_xeon_all.csv",
    "titanxp": "wmt14ende_gpu_titanxp_all.csv",
}
HAT_NOTICE_HEAD = (
    "Per-device cost-term coefficients fitted by hat-edge on the latency datasets of the "
    "Hardware-Aware Transformer (HAT) repository (mit-han-lab/hardware-aware-transformers): "
    "wmt14ende_cpu_raspberrypi_all.csv, wmt14ende_cpu_xeon_all.csv, wmt14ende_gpu_titanxp_all.csv "
    "(2,000 measured SubTransformers each). Those datasets are under the MIT licence below.\n\n"
)


def hat_notice(shared: Path) -> str:
    text = (shared / "LICENSE").read_text()
    # The first block of HAT's LICENSE file is the HAT software's own notice.
    head = text.split("------------------------- LICENSE FOR Fairseq")[0].strip()
    return HAT_NOTICE_HEAD + head


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", default=[], metavar="NAME=CSV",
                    help="a device and its latency CSV (repeat); default: HAT's three files")
    ap.add_argument("--shared", default=str(SHARED), help="HAT's shared data folder (for the default)")
    ap.add_argument("--notice-file", default=None, help="licence/attribution text to carry (default: HAT's)")
    ap.add_argument("--out", default=str(PACKAGED_PRIOR))
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    if args.data:
        pairs = []
        for item in args.data:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                ap.error(f"--data takes NAME=CSV, got {item!r}")
            pairs.append((name, Path(path)))
        notice = Path(args.notice_file).read_text() if args.notice_file else ""
    else:
        pairs = [(name, shared / "latency" / f) for name, f in HAT_FILES.items()]
        notice = Path(args.notice_file).read_text() if args.notice_file else hat_notice(shared)
    prior = build_prior([(name, read_latency_csv(p)) for name, p in pairs], notice=notice)
    out = prior.save(args.out)
    for d in prior.devices:
        print(f"{d.name:<14} {d.rows} rows  encoder {[round(v, 4) for v in d.encoder]}")
        print(f"{'':<14} decoder {[round(v, 4) for v in d.decoder]}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
