"""HTML report of a 30-sample scan: file size, time to write it, and time to open it in headless Chromium.

Targets (issue 13): the report of a scan of the 30 bundled samples opens in under 2 s and stays under 10 MB.
"Opens" = from navigation start until every figure and the token view are drawn (page.js sets
`window.plipyReadyMs`); each load is a fresh page in one browser, the median is reported, beside the page's
main-thread CPU time (Chromium's ThreadTime), which other work on a shared machine inflates far less. Needs Debian's
`chromium` and playwright. Run by hand (`make bench`); paste the printed table into benchmarks/RESULTS.md.

    python benchmarks/html_report.py [--result results/scan.json] [--loads 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import plipy
from plipy.report.html import browser as hb

GROUPS = "python_doctest,rust_test,python_baseline,rust_baseline"  # all 30 samples of the bundled corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--result", type=Path, help="a saved scan (with its -rows.npz); default: scan all 30 samples")
    ap.add_argument("--loads", type=int, default=7)
    args = ap.parse_args()
    result = plipy.load_result(args.result) if args.result else plipy.scan("smollm2-135m", groups=GROUPS)
    n = sum("attention" in s for s in result["samples"])
    out = Path(tempfile.mkdtemp(prefix="plipy-bench-")) / "scan.html"
    t = time.perf_counter()
    result.to_html(out)
    write_s = time.perf_counter() - t
    size = out.stat().st_size
    loads, starts, cpu = [], [], []
    with hb.chromium() as browser:
        for _ in range(args.loads):
            opened = hb.open_report(browser, out, metrics=True)
            assert not opened.errors and not opened.foreign_requests(), (opened.errors, opened.foreign_requests())
            loads.append(opened.ready_ms / 1000)
            starts.append(opened.start_ms / 1000)
            cpu.append(opened.metrics.get("ThreadTime", float("nan")))
            opened.page.close()
    print(
        f"{platform.processor() or platform.machine()}, {n} samples × {len(result['layers_scanned'])} layers, "
        f"Chromium {hb.find_chromium()}"
    )
    print("| measure | value | target |\n|---|---|---|")
    print(f"| file size | {size / 1e6:.2f} MB | < 10 MB |")
    print(f"| write (`to_html`) | {write_s:.2f} s | — |")
    print(f"| open → drawn, first page of a fresh browser | {loads[0]:.2f} s | < 2 s |")
    print(
        f"| open → drawn, median of {len(loads)} | {statistics.median(loads):.2f} s "
        f"(min {min(loads):.2f}, max {max(loads):.2f}) | < 2 s |"
    )
    print(f"| … of which plotly.js and the HTML parsed and run (median) | {statistics.median(starts):.2f} s | — |")
    print(f"| main-thread CPU time of the page (median) | {statistics.median(cpu):.2f} s | — |")


if __name__ == "__main__":
    main()
