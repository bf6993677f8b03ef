"""Benchmark SegFormer inference on the CPU: stock vs folded head vs ONNX Runtime.

Measures, for randomly initialised weights (speed does not depend on the values):

1. ``model``: the network alone on one 800 x 800 slice (median of ``--repeats`` after one
   warm-up call), for each engine;
2. ``pipeline``: :func:`segment_volume` on a synthetic scan of ``--slices`` slices of
   ``--size`` x ``--size`` voxels (crop, clip, resize, network, upsample, arg-max, uncrop),
   projected to a 168-slice scan; peak RSS of the process.
3. ``--full-scan``: a real 168 x 1600 x 1600 float32 scan through ``segment_volume`` with one
   engine (time and peak RSS).

Every measurement runs in its own subprocess so that peak RSS belongs to it alone.

Usage::

    python benchmarks/bench_inference.py                 # model + pipeline, B0, all engines
    python benchmarks/bench_inference.py --full-scan --engine onnx
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

ENGINES = ("stock", "folded", "onnx")
FULL_SCAN_SLICES = 168


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _model(variant: str):
    import torch

    from HRpQCTSegmentationEngine.model import build_model

    model = build_model(variant, seed=0)
    bn = model.decode_head.batch_norm
    with torch.no_grad():  # non-trivial statistics, as after training
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _segmenter(model, engine: str, input_yx):
    from HRpQCTSegmentationEngine.fast import FastSegformer, OnnxSegmenter

    if engine == "stock":
        return model, False
    if engine == "folded":
        return FastSegformer(model), True
    return OnnxSegmenter.from_model(model, input_yx=input_yx), True


def _synthetic_scan(n_slices: int, size: int, dtype: str):
    import numpy as np

    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size * 0.52, xx - size * 0.48)
    slice_ = np.where(r < size * 0.3, 40.0, -1000.0)
    slice_ = np.where((r < size * 0.15) & (r > size * 0.12), 1500.0, slice_)
    slice_ = slice_.astype(dtype)
    volume = np.empty((n_slices, size, size), dtype=dtype)
    volume[:] = slice_
    return volume


def run_model(args) -> dict:
    import torch

    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    input_yx = PreprocessingConfig().input_yx
    model = _model(args.variant)
    t0 = time.perf_counter()
    net, _ = _segmenter(model, args.engine, input_yx)
    prepare_s = time.perf_counter() - t0
    x = torch.rand(args.batch, 1, *input_yx)
    times = []
    with torch.inference_mode():
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            net(x)
            if i:  # the first call builds kernels and buffers
                times.append((time.perf_counter() - t0) / args.batch)
    return {"mode": "model", "engine": args.engine, "variant": args.variant,
            "batch": args.batch, "s_per_slice": statistics.median(times),
            "s_per_slice_min": min(times), "prepare_s": prepare_s,
            "peak_rss_mb": _peak_rss_mb()}


def run_pipeline(args) -> dict:
    from HRpQCTSegmentationEngine.inference import run_segmentation

    model = _model(args.variant)
    volume = _synthetic_scan(args.slices, args.size, args.dtype)
    engine = "onnx" if args.engine == "onnx" else "torch"
    t0 = time.perf_counter()
    from HRpQCTSegmentationEngine.inference import prepare_segmenter

    runner, config = prepare_segmenter(model, device="cpu", fast=args.engine != "stock",
                                       engine=engine)
    prepare_s = time.perf_counter() - t0
    run_segmentation(volume[:args.batch], runner, config=config, batch_size=args.batch)  # warm
    result = run_segmentation(volume, runner, config=config, batch_size=args.batch)
    per_slice = result.seconds / args.slices
    return {"mode": "pipeline" if args.slices < FULL_SCAN_SLICES else "full-scan",
            "engine": args.engine, "variant": args.variant, "batch": args.batch,
            "slices": args.slices, "size": args.size, "dtype": args.dtype,
            "s_per_slice": per_slice, "seconds": result.seconds, "prepare_s": prepare_s,
            "projected_168_s": prepare_s + FULL_SCAN_SLICES * per_slice,
            "peak_rss_mb": _peak_rss_mb(),
            "labels_mb": result.labels.nbytes / 2**20, "input_mb": volume.nbytes / 2**20}


def _load() -> str:
    try:
        with open("/proc/loadavg", encoding="utf-8") as fh:
            return fh.read().split()[0]
    except OSError:
        return "n/a"


def _child(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="b0")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="one engine (default: all)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=1600)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--full-scan", action="store_true",
                        help=f"run a real {FULL_SCAN_SLICES}-slice scan instead")
    parser.add_argument("--mode", choices=("model", "pipeline"), default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_model(args) if args.mode == "model" else run_pipeline(args)
        print(json.dumps(result))
        return

    load_before = _load()
    engines = [args.engine] if args.engine else list(ENGINES)
    common = ["--variant", args.variant, "--batch", str(args.batch), "--dtype", args.dtype,
              "--size", str(args.size)]
    results = []
    if args.full_scan:
        for engine in engines:
            results.append(_child([*common, "--mode", "pipeline", "--engine", engine,
                                   "--slices", str(FULL_SCAN_SLICES)]))
    else:
        modes = [args.mode] if args.mode else ["model", "pipeline"]
        for mode in modes:
            for engine in engines:
                results.append(_child([*common, "--mode", mode, "--engine", engine,
                                       "--repeats", str(args.repeats),
                                       "--slices", str(args.slices)]))
    for r in results:
        print(json.dumps(r))
    print()
    print(f"Machine: {machine()}; load average before/after: {load_before} / "
          f"{_load()}")
    print("| mode | engine | batch | s/slice | 168-slice scan (s) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        projected = r.get("projected_168_s")
        if r["mode"] == "full-scan":
            projected = r["seconds"] + r["prepare_s"]
        print(f"| {r['mode']} | {r['engine']} | {r['batch']} | {r['s_per_slice']:.3f} | "
              f"{'' if projected is None else f'{projected:.0f}'} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
