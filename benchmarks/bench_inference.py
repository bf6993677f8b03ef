"""Benchmark SegFormer inference on the CPU: stock vs folded head vs ONNX Runtime.

Measures, for randomly initialised weights (speed does not depend on the values):

1. ``model``: the network alone on one 800 x 800 slice (median of ``--repeats`` after one
   warm-up call), for each engine;
2. ``pipeline``: :func:`segment_volume` on a synthetic scan of ``--slices`` slices of
   ``--size`` x ``--size`` voxels (crop, clip, resize, network, upsample, arg-max, uncrop),
   projected to a 168-slice scan; peak RSS of the process.
3. ``--full-scan``: a real 168 x 1600 x 1600 float32 scan through ``segment_volume`` with one
   engine (time and peak RSS);
4. ``labels``: the step after the network (bilinear upsampling of the logits, arg-max,
   un-crop) on the bundled model's logits of the example phantom: the reference
   (``logits_to_labels_batch``, "stock") against :mod:`.fast_labels` ("ours"), both on the
   same logits in one process, with a check that the labels are equal.

Engine ``onnx-spin`` is ONNX Runtime with its default busy-waiting threads (the project's
sessions turn it off; see :class:`.onnx_graph.OnnxSession`).

Every figure comes with CPU time (all threads) beside wall time: on a shared machine other
jobs stretch wall time but hardly CPU time, so compare CPU times there and re-measure wall
times on a quiet machine. Every measurement runs in its own subprocess so that peak RSS
belongs to it alone.

Usage::

    python benchmarks/bench_inference.py                 # model + pipeline, B0, all engines
    python benchmarks/bench_inference.py --mode labels --slices 4
    python benchmarks/bench_inference.py --full-scan --engine onnx
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

ENGINES = ("stock", "folded", "onnx", "onnx-spin")
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
    if engine == "onnx":
        return OnnxSegmenter.from_model(model, input_yx=input_yx), True
    return _spinning_session(model, input_yx), True


def _spinning_session(model, input_yx):
    """The folded graph in a session with ONNX Runtime's default, busy-waiting threads."""
    import tempfile

    from HRpQCTSegmentationEngine.fast import OnnxSegmenter, export_onnx

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        path = export_onnx(model, Path(tmp) / "segformer.onnx", input_yx)
        return OnnxSegmenter(path, allow_spinning=True)


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
    times, cpu_times = [], []
    with torch.inference_mode():
        for i in range(args.repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            net(x)
            if i:  # the first call builds kernels and buffers
                times.append((time.perf_counter() - t0) / args.batch)
                cpu_times.append((time.process_time() - c0) / args.batch)
    return {"mode": "model", "engine": args.engine, "variant": args.variant,
            "batch": args.batch, "s_per_slice": statistics.median(times),
            "s_per_slice_min": min(times), "cpu_s_per_slice": statistics.median(cpu_times),
            "prepare_s": prepare_s, "peak_rss_mb": _peak_rss_mb()}


def run_pipeline(args) -> dict:
    from HRpQCTSegmentationEngine.inference import run_segmentation

    model = _model(args.variant)
    volume = _synthetic_scan(args.slices, args.size, args.dtype)
    engine = "onnx" if args.engine.startswith("onnx") else "torch"
    t0 = time.perf_counter()
    from HRpQCTSegmentationEngine.inference import prepare_segmenter
    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    if args.engine == "onnx-spin":
        model = _spinning_session(model, PreprocessingConfig().input_yx)

    runner, config = prepare_segmenter(model, device="cpu", fast=args.engine != "stock",
                                       engine=engine)
    prepare_s = time.perf_counter() - t0
    run_segmentation(volume[:args.batch], runner, config=config, batch_size=args.batch)  # warm
    c0 = time.process_time()
    result = run_segmentation(volume, runner, config=config, batch_size=args.batch)
    cpu_per_slice = (time.process_time() - c0) / args.slices
    per_slice = result.seconds / args.slices
    return {"mode": "pipeline" if args.slices < FULL_SCAN_SLICES else "full-scan",
            "engine": args.engine, "variant": args.variant, "batch": args.batch,
            "slices": args.slices, "size": args.size, "dtype": args.dtype,
            "s_per_slice": per_slice, "cpu_s_per_slice": cpu_per_slice,
            "seconds": result.seconds, "prepare_s": prepare_s,
            "projected_168_s": prepare_s + FULL_SCAN_SLICES * per_slice,
            "peak_rss_mb": _peak_rss_mb(),
            "labels_mb": result.labels.nbytes / 2**20, "input_mb": volume.nbytes / 2**20}


def run_labels(args) -> dict:
    """Stock (reference) against ours (fast_labels) on the bundled model's logits."""
    import numpy as np
    import torch

    from HRpQCTPhantom import generate_phantom
    from HRpQCTPhantom.example import EXAMPLE_SEED, example_params
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder
    from HRpQCTSegmentationEngine.fast_labels import logits_to_labels_fast
    from HRpQCTSegmentationEngine.inference import prepare_segmenter
    from HRpQCTSegmentationEngine.preprocessing import (
        crop_box_for_scan,
        logits_to_labels_batch,
        preprocess_slices,
    )

    hu = generate_phantom(example_params(args.slices), seed=EXAMPLE_SEED).scan.hu
    runner, config = prepare_segmenter(resolve_model_folder(None), device="cpu")
    box = crop_box_for_scan(hu, config)
    shape = hu.shape[1:]
    with torch.inference_mode():
        logits = [runner(preprocess_slices(s[None], box, config)) for s in hu]
    variants = {"stock": lambda lg: logits_to_labels_batch(lg, box, shape),
                "ours": lambda lg: logits_to_labels_fast(lg, box, shape),
                "ours-numpy": lambda lg: logits_to_labels_fast(lg.numpy(), box, shape)}
    result = {"mode": "labels", "slices": args.slices, "torch_threads": torch.get_num_threads()}
    labels = {}
    for name, fn in variants.items():
        fn(logits[0])  # warm-up
        c0, t0 = time.process_time(), time.perf_counter()
        labels[name] = [fn(lg) for lg in logits]
        result[f"{name}_cpu_s_per_slice"] = (time.process_time() - c0) / args.slices
        result[f"{name}_s_per_slice"] = (time.perf_counter() - t0) / args.slices
    result["labels_equal"] = all(np.array_equal(a, b) for name in ("ours", "ours-numpy")
                                 for a, b in zip(labels["stock"], labels[name], strict=True))
    return result


def _load() -> str:
    """The 1-minute load average."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
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
    parser.add_argument("--mode", choices=("model", "pipeline", "labels"), default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        run = {"model": run_model, "pipeline": run_pipeline, "labels": run_labels}[args.mode]
        print(json.dumps(run(args)))
        return

    load_before = _load()
    print(f"Machine: {machine()}; load average {load_before} at the start", flush=True)
    if args.mode == "labels":
        r = _child(["--mode", "labels", "--slices", str(args.slices)])
        print(json.dumps(r))
        print(f"load average at the end {_load()}")
        print("| step after the network | CPU s/slice | wall s/slice |")
        print("|---|---|---|")
        for name in ("stock", "ours", "ours-numpy"):
            print(f"| {name} | {r[f'{name}_cpu_s_per_slice']:.3f} | "
                  f"{r[f'{name}_s_per_slice']:.3f} |")
        print(f"labels equal to stock: {r['labels_equal']}")
        return
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
    print("| mode | engine | batch | wall s/slice | CPU s/slice | 168-slice scan (s, wall) | "
          "peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        projected = r.get("projected_168_s")
        if r["mode"] == "full-scan":
            projected = r["seconds"] + r["prepare_s"]
        print(f"| {r['mode']} | {r['engine']} | {r['batch']} | {r['s_per_slice']:.3f} | "
              f"{r['cpu_s_per_slice']:.3f} | {'' if projected is None else f'{projected:.0f}'} "
              f"| {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
