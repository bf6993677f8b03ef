"""Reduced precision for the segmentation network on the CPU: int8 and bfloat16 against float32.

Issue #16 allows int8 quantisation "only as an opt-in with measured accuracy". Before offering
one, this measures whether any reduced-precision variant of the bundled model is faster than
the float32 ONNX graph that ``hrpqct run`` uses, side by side in one process:

- ``onnx-fp32``: the bundled graph (the default engine);
- ``onnx-int8-dynamic``: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights,
  activations quantised per run);
- ``onnx-int8-static-qop`` / ``onnx-int8-static-qdq``: ``quantize_static`` (per-channel int8
  weights, activations calibrated on the network inputs of a *different* phantom), in ONNX
  Runtime's QOperator and QDQ formats;
- ``torch-fp32`` / ``torch-bf16``: the folded SegFormer in torch, without and with CPU
  autocast to bfloat16 (the AMX / AVX-512-BF16 path where the processor has one).

Every variant segments the same full-size phantom slices through
:func:`HRpQCTSegmentationEngine.inference.run_segmentation` (leg fit, label step and all),
``--rounds`` times in alternating order (the machine drifts); the median wall time per slice
is reported. Accuracy: the share of voxels whose label equals float32's, and per-class IoU
against the phantom's truth.

    python benchmarks/bench_network_precision.py --slices 6 --rounds 2 --json precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine

CALIBRATION_SEED_OFFSET = 1000


class _RecordingSegmenter:
    """Wraps an ONNX session, keeping every network input it is given (for calibration)."""

    def __init__(self, session) -> None:
        self.session = session
        self.inputs: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, pixel_values):
        self.inputs.append(np.array(pixel_values, dtype=np.float32))
        return self.session.run(pixel_values)


def _calibration_inputs(folder: Path, slices: int, seed: int) -> list[np.ndarray]:
    """Network inputs of a phantom other than the measured one (what static int8 calibrates on)."""
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTSegmentationEngine.inference import _OnnxRunner, prepare_segmenter, run_segmentation

    runner, config = prepare_segmenter(folder)
    recorder = _RecordingSegmenter(runner.segmenter)
    phantom = generate_phantom(PhantomParams(n_slices=slices), seed=seed)
    run_segmentation(phantom.scan, _OnnxRunner(recorder), config=config)
    return recorder.inputs


def _quantised_graphs(graph: Path, calibration: list[np.ndarray], out: Path) -> dict[str, Path]:
    """The three int8 variants of ``graph`` written under ``out``."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]) \
        .get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {input_name: item}

    prepared = out / "prepared.onnx"
    quant_pre_process(str(graph), str(prepared))
    paths = {"onnx-int8-dynamic": out / "dynamic.onnx",
             "onnx-int8-static-qop": out / "static-qop.onnx",
             "onnx-int8-static-qdq": out / "static-qdq.onnx"}
    quantize_dynamic(str(prepared), str(paths["onnx-int8-dynamic"]), weight_type=QuantType.QInt8)
    quantize_static(str(prepared), str(paths["onnx-int8-static-qop"]), Reader(),
                    quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantize_static(str(prepared), str(paths["onnx-int8-static-qdq"]), Reader(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return paths


def _bf16_module(fast_model):
    """The folded SegFormer under CPU autocast to bfloat16, returning float32 logits."""
    import torch

    class Bf16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = fast_model
            self.config = fast_model.config

        def forward(self, pixel_values):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(pixel_values).float()

    return Bf16().eval()


def _runners(folder: Path, graphs: dict[str, Path], threads: int) -> dict:
    """Variant name -> (runner, preprocessing config) for ``run_segmentation``."""
    import torch

    from HRpQCTSegmentationEngine.fast import FastSegformer, OnnxSegmenter
    from HRpQCTSegmentationEngine.inference import _OnnxRunner, _TorchRunner, prepare_segmenter
    from HRpQCTSegmentationEngine.model import load_model

    runner, config = prepare_segmenter(folder, num_threads=threads)
    out = {"onnx-fp32": runner}
    for name, path in graphs.items():
        out[name] = _OnnxRunner(OnnxSegmenter(path, threads))
    fast = FastSegformer(load_model(folder)).eval()
    out["torch-fp32"] = _TorchRunner(fast, torch.device("cpu"), "torch-fast")
    out["torch-bf16"] = _TorchRunner(_bf16_module(fast), torch.device("cpu"), "torch-bf16")
    for item in out.values():
        item.training_voxel_mm = runner.training_voxel_mm
    return {name: (item, config) for name, item in out.items()}


def _segment(runner, config, scan, threads: int):
    import torch

    from HRpQCTSegmentationEngine.inference import run_segmentation

    torch.set_num_threads(threads)
    start = time.perf_counter()
    labels = run_segmentation(scan, runner, config=config, num_threads=threads).labels
    return labels, time.perf_counter() - start


def _scores(truth: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict:
    from HRpQCTCore.regions import NETWORK_CLASSES
    from HRpQCTSegmentationEngine.metrics import scores_from_labels

    scores = scores_from_labels(truth, labels)
    return {"agreement_with_fp32": float((labels == reference).mean()),
            "voxels_differing_from_fp32": int((labels != reference).sum()),
            "iou": {c.key: round(float(scores.iou[c.label]), 4) for c in NETWORK_CLASSES
                    if c.label > 0},
            "mean_iou": round(scores.mean_foreground("iou"), 4)}


def main() -> None:
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder
    from HRpQCTSegmentationEngine.onnx_graph import ONNX_FILE

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=6, help="full-size slices measured")
    parser.add_argument("--seed", type=int, default=9300,
                        help="phantom seed (9300: the development range, outside both test sets)")
    parser.add_argument("--motion-grade", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration-slices", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    folder = resolve_model_folder(None)
    graph = folder / ONNX_FILE  # checked against its checksum when the default runner opens it
    phantom = generate_phantom(PhantomParams(n_slices=args.slices, motion_grade=args.motion_grade),
                               seed=args.seed)
    calibration = _calibration_inputs(folder, args.calibration_slices,
                                      args.seed + CALIBRATION_SEED_OFFSET)
    with tempfile.TemporaryDirectory(prefix="hrpqct-int8-") as tmp:
        graphs = _quantised_graphs(graph, calibration, Path(tmp))
        runners = _runners(folder, graphs, args.threads)
        times: dict[str, list[float]] = {name: [] for name in runners}
        labels: dict[str, np.ndarray] = {}
        for runner, config in runners.values():  # warm-up: sessions, caches, pools
            _segment(runner, config, np.asarray(phantom.scan.hu[:1]), args.threads)
        order = list(runners)
        for round_index in range(args.rounds):
            for name in (order if round_index % 2 == 0 else order[::-1]):
                runner, config = runners[name]
                labels[name], seconds = _segment(runner, config, phantom.scan, args.threads)
                times[name].append(seconds / args.slices)
    reference = labels["onnx-fp32"]
    result = {
        "machine": machine(), "load_average_at_end": os.getloadavg(),
        "slices": args.slices, "seed": args.seed, "motion_grade": args.motion_grade,
        "threads": args.threads, "rounds": args.rounds,
        "variants": {name: {"wall_s_per_slice": round(statistics.median(times[name]), 3),
                            "wall_s_per_slice_all": [round(t, 3) for t in times[name]],
                            **_scores(phantom.classes, labels[name], reference)}
                     for name in runners},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
