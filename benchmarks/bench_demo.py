"""Wall time and peak memory of the README's main command, ``hrpqct demo``.

Usage: python benchmarks/bench_demo.py [--slices 168] [--model FOLDER] [--classifier FILE]
                                       [--slice-step 4] [--keep DIR]

Runs ``hrpqct demo`` as a child process (exactly what a user types, with the bundled model and
classifier unless given) into a temporary folder, and prints the total wall time, the time of
each step as the demo reports it, the peak resident memory of the child, and what the demo
skipped (missing bundled artefacts). Target: the full 168-slice example within 5 minutes on a
2-core CPU. Measure on a quiet machine (no training or tests running) before recording numbers
in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

TARGET_SECONDS = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=168)
    parser.add_argument("--model", help="segmentation model folder (default: bundled)")
    parser.add_argument("--classifier", help="classifier file (default: bundled)")
    parser.add_argument("--slice-step", type=int, help="features of every n-th slice "
                                                       "(default: the demo's)")
    parser.add_argument("--keep", help="write the demo output here instead of a temporary "
                                       "folder (kept)")
    args = parser.parse_args()

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_demo_")) / "d"
    command = [sys.executable, "-m", "HRpQCTPipeline.cli", "demo", "--out", str(out),
               "--slices", str(args.slices), "--progress", "none"]
    if args.keep:
        command.append("--overwrite")
    for option, value in (("--model", args.model), ("--classifier", args.classifier),
                          ("--slice-step", args.slice_step)):
        if value is not None:
            command += [option, str(value)]
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f} at start")
    print("command:", " ".join(command))
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if process.returncode != 0:
        print(process.stdout, process.stderr, sep="\n")
        print(f"demo failed with exit code {process.returncode}")
        return process.returncode
    step = None
    for line in process.stdout.splitlines():
        if line.startswith("== "):
            step = line[3:]
        match = re.search(r"\((\d+(?:\.\d+)?) s\)\s*$", line)
        if match and step:
            print(f"  {match.group(1):>7s} s  {step}")
        if "skipped" in line:
            print(f"  note: {line.strip()}")
    status = "met" if seconds <= TARGET_SECONDS else "MISSED"
    print(f"total {seconds:.1f} s (target <= {TARGET_SECONDS:.0f} s: {status}); peak RSS of "
          f"the demo process {peak_gb:.2f} GB; load average {os.getloadavg()[0]:.2f} at end")
    if not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
