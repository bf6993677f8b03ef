"""Wall time, CPU time, peak memory and disk use of the README's main command, ``hrpqct demo``.

Usage: python benchmarks/bench_demo.py [--slices 168] [--model FOLDER] [--classifier FILE]
                                       [--slice-step 4] [--keep DIR] [--stock] [--rerun]

Runs ``hrpqct demo`` as a child process (exactly what a user types, with the bundled model and
classifier unless given) into a temporary folder, and prints the total wall time, the CPU time
of the child (user + system, all threads), the time of each step as the demo reports it, the
peak resident memory of the child, the files it wrote with their sizes, and what the demo
skipped (missing bundled artefacts). ``--stock`` runs the same demo a second time with this
project's exact speed-ups of 2026-12-01 switched off (reference label upsampling, ONNX Runtime's
busy-waiting threads, and the old step that read the example once more and wrote a gzipped
NIfTI copy), side by side with the first run; the two runs' regions, features and probability
are compared byte for byte. ``--rerun`` then runs our demo once more in the same folder, as a
user does who runs the README's command twice (the example and the run's steps are reused).

Target (issue #16): the full 168-slice example within 150 s on a 2-core CPU. On a shared
machine compare CPU times; wall times must be measured on a quiet one (load average ~1).
"""

from __future__ import annotations

import argparse
import filecmp
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

TARGET_SECONDS = 150.0
#: The outputs that must not change between the stock and our run.
COMPARED = ("example_regions.nii.gz", "example_regions.seg.nrrd", "example_features.csv",
            "example_probability.json")

#: The demo with the speed-ups of 2026-12-01 undone (run with ``python -c``).
_STOCK = """
import sys
from HRpQCTCore import io
from HRpQCTPipeline.commands import demo
from HRpQCTSegmentationEngine import inference, onnx_graph, preprocessing

inference.logits_to_labels_fast = lambda lg, box, shape: preprocessing.logits_to_labels_batch(
    lg, box, shape)
_init = onnx_graph.OnnxSession.__init__
onnx_graph.OnnxSession.__init__ = lambda self, path, num_threads=None, **k: _init(
    self, path, num_threads, allow_spinning=True)
_run_job = demo._run_job

def _old_step_then_run(args, example, out, *rest):
    scan = io.read_scan(example)  # the old step 2: read once more, write a NIfTI copy
    io.write_scan(scan, out / "example_scan_hu.nii.gz", dtype="int16")
    del scan
    return _run_job(args, example, out, *rest)

demo._run_job = _old_step_then_run
from HRpQCTPipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _load() -> float:
    return os.getloadavg()[0]


def _run(command: list[str], out: Path) -> dict:
    """Run one demo child; its wall and CPU seconds, peak RSS, stdout and files."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())} if out.is_dir() else {}
    return {"rc": process.returncode, "stdout": process.stdout, "stderr": process.stderr,
            "seconds": seconds,
            "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            # ru_maxrss of children is the largest child so far (kB on Linux)
            "peak_gb": after.ru_maxrss / 2**20, "files": files}


def _steps(stdout: str) -> list[tuple[str, str]]:
    """``(seconds, step title)`` for each step the demo reported."""
    found, step = [], None
    for line in stdout.splitlines():
        if line.startswith("== "):
            step = line[3:]
        match = re.search(r"\((\d+(?:\.\d+)?) s\)\s*$", line)
        if match and step:
            found.append((match.group(1), step))
    return found


def _print_run(name: str, r: dict) -> None:
    print(f"-- {name}: wall {r['seconds']:.1f} s, CPU {r['cpu_seconds']:.1f} s, peak RSS "
          f"{r['peak_gb']:.2f} GB, {sum(r['files'].values()) / 1e6:.0f} MB in "
          f"{len(r['files'])} files")
    for seconds, step in _steps(r["stdout"]):
        print(f"  {seconds:>7s} s  {step}")
    for line in r["stdout"].splitlines():
        if "skipped" in line:
            print(f"  note: {line.strip()}")
    for file, size in r["files"].items():
        print(f"  {size / 1e6:10.1f} MB  {file}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=168)
    parser.add_argument("--model", help="segmentation model folder (default: bundled)")
    parser.add_argument("--classifier", help="classifier file (default: bundled)")
    parser.add_argument("--slice-step", type=int, help="features of every n-th slice "
                                                       "(default: the demo's)")
    parser.add_argument("--keep", help="write the demo output here instead of a temporary "
                                       "folder (kept)")
    parser.add_argument("--stock", action="store_true",
                        help="also run the demo with the 2026-12-01 speed-ups undone")
    parser.add_argument("--rerun", action="store_true",
                        help="then run the demo again in the same folder (without "
                             "--overwrite: the example and the run's steps reused)")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_demo_"))
    demo_args = ["demo", "--slices", str(args.slices), "--progress", "none", "--overwrite"]
    for option, value in (("--model", args.model), ("--classifier", args.classifier),
                          ("--slice-step", args.slice_step)):
        if value is not None:
            demo_args += [option, str(value)]
    print(f"machine: {machine()}; load average {_load():.2f} at the start")
    runs = {"ours": [sys.executable, "-m", "HRpQCTPipeline.cli"]}
    if args.stock:
        runs["stock"] = [sys.executable, "-c", _STOCK]
    results = {}
    for name, prefix in runs.items():
        out = root / name
        command = [*prefix, *demo_args, "--out", str(out)]
        print(f"{name}: {' '.join(command[:2])} ... {' '.join(command[-len(demo_args) - 2:])}",
              flush=True)
        results[name] = r = _run(command, out)
        if r["rc"] != 0:
            print(r["stdout"], r["stderr"], sep="\n")
            print(f"demo ({name}) failed with exit code {r['rc']}")
            return r["rc"]
        _print_run(name, r)
        print(f"  load average {_load():.2f} after this run", flush=True)
    if args.rerun:
        out = root / "ours"
        command = [*runs["ours"], *[a for a in demo_args if a != "--overwrite"], "--out", str(out)]
        rerun = _run(command, out)
        if rerun["rc"] != 0:
            print(rerun["stdout"], rerun["stderr"], sep="\n")
            print(f"demo (rerun) failed with exit code {rerun['rc']}")
            return rerun["rc"]
        reused = "reusing" in rerun["stdout"]
        print(f"-- rerun in the same folder: wall {rerun['seconds']:.1f} s, CPU "
              f"{rerun['cpu_seconds']:.1f} s; example reused: {reused}")
    ours = results["ours"]
    status = "met" if ours["seconds"] <= TARGET_SECONDS else "MISSED"
    print(f"total (ours) {ours['seconds']:.1f} s wall (target <= {TARGET_SECONDS:.0f} s: "
          f"{status}; meaningful only on a quiet machine), {ours['cpu_seconds']:.1f} s CPU")
    if "stock" in results:
        stock = results["stock"]
        same = all(filecmp.cmp(root / "ours" / f, root / "stock" / f, shallow=False)
                   for f in COMPARED)
        print("| | stock | ours |\n|---|---|---|")
        for label, key, fmt in (("wall s", "seconds", "{:.1f}"), ("CPU s", "cpu_seconds",
                                "{:.1f}"), ("peak RSS GB", "peak_gb", "{:.2f}")):
            print(f"| {label} | {fmt.format(stock[key])} | {fmt.format(ours[key])} |")
        print(f"| MB written | {sum(stock['files'].values()) / 1e6:.0f} | "
              f"{sum(ours['files'].values()) / 1e6:.0f} |")
        print(f"regions, features and probability byte-identical: {same}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
