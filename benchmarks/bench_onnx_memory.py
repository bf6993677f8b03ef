"""ONNX Runtime's memory pattern on and off: memory, speed and logits (issue #16).

Usage: python benchmarks/bench_onnx_memory.py [--slices 20] [--threads 2]

Each arm runs in its own fresh process (so that neither inherits the other's heap): it opens
the bundled model's graph (:class:`~HRpQCTSegmentationEngine.onnx_graph.OnnxSession`) with
ONNX Runtime's memory pattern on (its default) or off (ours), runs ``--slices`` network inputs
of the bundled size (800 x 800, the same seeded values in both arms) one at a time, and
reports the process's resident memory before the session, its high-water mark after the
slices, the wall and CPU time per slice (the first slice apart: it allocates), and a checksum
of every slice's logits. The arms' logits are compared bit for bit. Prints machine, load and date.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import cpu_s as _cpu_s
from _common import machine
from _common import status_gib as _status_gib


def _arm(pattern: bool, slices: int, threads: int) -> dict:
    import numpy as np

    from HRpQCTSegmentationEngine.bundled import resolve_model_folder
    from HRpQCTSegmentationEngine.onnx_graph import OnnxSession

    rng = np.random.default_rng(16)
    inputs = [rng.normal(0.0, 1.0, (1, 1, 800, 800)).astype(np.float32)
              for _ in range(slices)]
    before = _status_gib("VmRSS")
    session = OnnxSession(resolve_model_folder(None) / "model.onnx", threads,
                          memory_pattern=pattern)
    digests, walls, cpus = [], [], []
    for array in inputs:
        wall, cpu = time.perf_counter(), _cpu_s()
        logits = session.run(array)
        walls.append(time.perf_counter() - wall)
        cpus.append(_cpu_s() - cpu)
        digests.append(hashlib.sha256(logits.tobytes()).hexdigest())
    steady = walls[1:] or walls
    return {"memory_pattern": pattern, "rss_before_gib": before,
            "hwm_after_gib": _status_gib("VmHWM"),
            "rss_after_gib": _status_gib("VmRSS"), "wall_s_per_slice": sum(steady) / len(steady),
            "cpu_s_per_slice": sum(cpus[1:] or cpus) / len(steady), "first_wall_s": walls[0],
            "digests": digests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arm", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(_arm(args.arm == "on", args.slices, args.threads)))
        return
    print(machine(), "| load average", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    results = {}
    for arm in ("on", "off", "on", "off"):  # interleaved, twice: load drifts
        out = subprocess.run([sys.executable, __file__, "--arm", arm, "--slices",
                              str(args.slices), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        results.setdefault(arm, []).append(result)
        print(f"memory pattern {arm:3s}: RSS before session {result['rss_before_gib']:.3f} GiB, "
              f"peak after {args.slices} slices {result['hwm_after_gib']:.3f} GiB "
              f"(+{result['hwm_after_gib'] - result['rss_before_gib']:.3f}), RSS after "
              f"{result['rss_after_gib']:.3f}; {result['wall_s_per_slice']:.3f} s wall, "
              f"{result['cpu_s_per_slice']:.3f} s CPU per slice "
              f"(first {result['first_wall_s']:.2f} s)")
    same = results["on"][0]["digests"] == results["off"][0]["digests"] == \
        results["on"][1]["digests"] == results["off"][1]["digests"]
    print("logits bit-identical across arms and repeats:", same)
    print("load average at the end", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
