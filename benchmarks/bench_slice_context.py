"""Inter-slice context (2.5D) against the 2D segmenter at equal training budget (issue #18).

From the bundled model, two fine-tunes with the same data, steps, batch, learning rate and
seed, each run as ``hrpqct train-segmenter --init-from <bundled> ...`` in this process (the
command's own code, so the benchmark cannot drift from it):

(a) **2D**: the bundled model fine-tuned as it is (``--slice-context 0``);
(b) **2.5D**: the bundled model inflated to z-1, z, z+1 (``--slice-context 1``: the first
    patch embedding's neighbour channels start at zero, so it starts from (a)'s exact
    output) and fine-tuned the same way.

Fine-tuning defaults are the command's (learning rate 1e-4, first encoder stage frozen --
the inflated input kernel of (b) stays trainable, or its neighbour channels would stay
zero); early stopping is off by default so both run every step, and each keeps the weights
of its best validation. Then the untouched bundled model (reference), (a) and (b) segment
every scan of each test-set manifest (``make_test_set.py``: columns subject, image, labels,
regions, noise_sd_hu, motion_grade), scored on the raw network output against the 5-class
truth with ``bench_segmentation_accuracy``'s functions: IoU per class and mean, over all
scans and by motion grade. Prints Markdown tables, the CPU time of each fine-tune, the
machine and its load; writes everything to ``OUT/results.json``. Synthetic phantoms only.

Usage (the real comparison; CPU-heavy: two fine-tunes and 3 x 18 test scans):
  hrpqct cohort /work/data/train_v1 --subjects 48 --slices 12 --seed 1000
  python benchmarks/make_test_set.py /work/data/test_v1
  python benchmarks/make_test_set.py /work/data/confirm_v1 --seed-base 9500
  python benchmarks/bench_slice_context.py --train-manifest /work/data/train_v1/manifest.csv \\
      --test-manifest /work/data/test_v1/manifest.csv \\
      --test-manifest /work/data/confirm_v1/manifest.csv \\
      --steps 300 --batch-size 4 --out /tmp/slice_context
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, peak_rss_gb
from bench_segmentation_accuracy import read_test_case, score_raw
from bench_soft_tissue_motion import middle_slices as middle_slices_of

from HRpQCTPipeline.cli import main as hrpqct
from HRpQCTSegmentationEngine.bundled import resolve_model_folder
from HRpQCTSegmentationEngine.inference import prepare_segmenter
from HRpQCTSegmentationEngine.metrics import format_comparison_table, summarise_scores
from HRpQCTSegmentationEngine.model import read_model_metadata

#: The two arms: name -> slice context.
ARMS = {"2D": 0, "2.5D": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Usage" + __doc__.split("Usage", 1)[1])
    parser.add_argument("--train-manifest", required=True, type=Path,
                        help="training scans (hrpqct train-segmenter's manifest)")
    parser.add_argument("--test-manifest", required=True, action="append", type=Path,
                        help="a test set's manifest.csv (repeatable)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each arm")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the two model folders and results.json")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--validate-every", type=int, default=50,
                        help="steps between validations (must divide --steps)")
    parser.add_argument("--slices-per-scan", type=int, default=6,
                        help="training slices per scan (0: all; the 2.5D arm holds three "
                             "channels per slice in memory)")
    parser.add_argument("--crop-px", type=int, default=256)
    parser.add_argument("--freeze-stages", type=int, default=1)
    parser.add_argument("--early-stop-patience", type=int, default=0,
                        help="0 (default): both arms run every step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, help="only the first N scans of each test set")
    parser.add_argument("--score-only", action="store_true",
                        help="score the two arms already fine-tuned in --out (no training)")
    parser.add_argument("--middle-slices", type=int, metavar="N",
                        help="score only the middle N slices of each test scan")
    parser.add_argument("--without-bundled", action="store_true",
                        help="do not score the untouched bundled model")
    args = parser.parse_args(argv)
    args.validate_every = min(args.validate_every, args.steps)
    if args.steps < 1 or args.steps % args.validate_every:
        parser.error(f"--validate-every ({args.validate_every}) must divide --steps "
                     f"({args.steps})")
    return args


def train_command(args: argparse.Namespace, parent: Path, slice_context: int,
                  out: Path) -> list[str]:
    """The ``hrpqct train-segmenter`` arguments of one arm (only the context differs)."""
    return ["train-segmenter", "--manifest", str(args.train_manifest), "--out", str(out),
            "--init-from", str(parent), "--slice-context", str(slice_context),
            "--epochs", str(args.steps // args.validate_every),
            "--steps-per-epoch", str(args.validate_every), "--batch-size", str(args.batch_size),
            "--learning-rate", str(args.learning_rate), "--crop-px", str(args.crop_px),
            "--slices-per-scan", str(args.slices_per_scan),
            "--freeze-stages", str(args.freeze_stages),
            "--early-stop-patience", str(args.early_stop_patience), "--seed", str(args.seed),
            "--device", args.device, "--progress", "none", "--overwrite"]


def fine_tune(args: argparse.Namespace, parent: Path, name: str) -> dict:
    """Run one arm's fine-tune; its summary, CPU and wall time."""
    out = args.out / ("model-" + name.replace(".", "_"))
    command = train_command(args, parent, ARMS[name], out)
    printed = io.StringIO()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(printed):
        code = hrpqct(command)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    if code != 0:
        raise SystemExit(f"hrpqct {' '.join(command)} failed with exit code {code}")
    summary = json.loads(printed.getvalue())
    print(f"fine-tuned {name}: {summary['step']} steps, best validation mIoU "
          f"{summary['best']['val_mean_iou']:.4f} at step {summary['best']['step']}; "
          f"{cpu:.0f} CPU s, {wall:.0f} s wall", flush=True)
    return {"folder": str(out), "command": "hrpqct " + " ".join(command),
            "cpu_seconds": cpu, "wall_seconds": wall, "summary": summary,
            "slice_context": read_model_metadata(out).slice_context}


def trained_arm(args: argparse.Namespace, name: str) -> dict:
    """An arm fine-tuned by an earlier run (``--score-only``); its cost is in that run's log."""
    out = args.out / ("model-" + name.replace(".", "_"))
    metadata = read_model_metadata(out)
    best = metadata.extra.get("training", {})
    summary = {"step": float("nan"), "best": best.get("best_validation",
                                                      {"val_mean_iou": float("nan"),
                                                       "step": float("nan")})}
    return {"folder": str(out), "command": "(fine-tuned by an earlier run)",
            "cpu_seconds": float("nan"), "wall_seconds": float("nan"), "summary": summary,
            "slice_context": metadata.slice_context}


def score_test_set(manifest: Path, models: dict[str, Path], limit: int | None,
                   middle_slices: int | None = None) -> dict:
    """Raw-output scores of every model on one test set, all scans and per motion grade."""
    with open(manifest, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))[:limit]
    runners = {name: prepare_segmenter(folder) for name, folder in models.items()}
    scores: dict[str, list] = defaultdict(list)
    by_grade: dict[tuple[str, str], list] = defaultdict(list)
    seconds: dict[str, list] = defaultdict(list)
    for row in rows:
        scan, truth, regions = read_test_case(manifest, row)
        if middle_slices:
            scan, truth, _ = middle_slices_of(middle_slices, scan, truth, regions)
        grade = str(row.get("motion_grade", "?"))
        for name, (runner, config) in runners.items():
            raw, _, took = score_raw(scan, truth, runner, config)
            scores[name].append(raw)
            by_grade[(name, grade)].append(raw)
            seconds[name].append(took)
        print(f"{manifest.parent.name} {row['subject']} (motion {grade}): done", flush=True)
    return {"rows": rows, "scores": scores, "by_grade": by_grade, "seconds": seconds}


def report(name: str, result: dict) -> dict:
    """Print a test set's tables; its summaries as JSON-ready dicts."""
    overall = {model: summarise_scores(s) for model, s in result["scores"].items()}
    print(f"\n### {name}: raw network output, all {len(result['rows'])} scans "
          "(IoU %, mean ± SD over scans)\n")
    print(format_comparison_table(overall))
    grades = sorted({grade for _, grade in result["by_grade"]})
    per_grade = {f"{model}, motion {grade}": summarise_scores(result["by_grade"][(model, grade)])
                 for grade in grades for model in overall if (model, grade) in result["by_grade"]}
    print(f"### {name}: by motion grade\n")
    print(format_comparison_table(per_grade))
    print(f"### {name}: mean IoU, 2.5D minus 2D (percentage points)\n")
    print("| scans | n | 2.5D - 2D |\n|---|---|---|")
    for label, key in [("all", None)] + [(f"motion {g}", g) for g in grades]:
        flat = overall["2D"] if key is None else per_grade[f"2D, motion {key}"]
        deep = overall["2.5D"] if key is None else per_grade[f"2.5D, motion {key}"]
        print(f"| {label} | {flat.n_scans} | {100 * (deep.mean_iou[0] - flat.mean_iou[0]):+.2f} |")
    return {"all": {m: s.to_dict() for m, s in overall.items()},
            "by_motion_grade": {k: s.to_dict() for k, s in per_grade.items()},
            "seconds_per_scan": {m: sum(v) / len(v) for m, v in result["seconds"].items()}}


def warm_up() -> None:
    """Import torch and transformers and build a model once, so that the first arm's CPU
    time does not include the one-time start-up the second arm would not pay."""
    from HRpQCTSegmentationEngine.model import build_model

    build_model("b0")


def main(argv: list[str] | None = None) -> int:
    """Fine-tune both arms, score them and the bundled model, print and write the results."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    parent = resolve_model_folder(None)  # checksums verified
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()
    warm_up()
    arms = {name: trained_arm(args, name) if args.score_only else fine_tune(args, parent, name)
            for name in ARMS}
    models = {} if args.without_bundled else {"bundled (untouched)": parent}
    models.update({name: Path(arm["folder"]) for name, arm in arms.items()})
    results = {"machine": machine(), "started": started, "load_before": load_before,
               "arguments": {k: str(v) for k, v in vars(args).items()}, "arms": arms,
               "test_sets": {}}
    for manifest in args.test_manifest:
        name = f"{manifest.parent.name}/{manifest.name}"
        results["test_sets"][name] = report(name, score_test_set(manifest, models, args.limit,
                                                                 args.middle_slices))
    print("\n### fine-tuning cost (same steps, batch, learning rate, seed and data)\n")
    print("| arm | slice context | steps | best val mIoU (step) | CPU s | wall s |")
    print("|---|---|---|---|---|---|")
    for name, arm in arms.items():
        best = arm["summary"]["best"]
        print(f"| {name} | {arm['slice_context']} | {arm['summary']['step']} | "
              f"{best['val_mean_iou']:.4f} ({best['step']}) | {arm['cpu_seconds']:.0f} | "
              f"{arm['wall_seconds']:.0f} |")
    results["load_after"] = os.getloadavg()
    results["peak_rss_gb"] = peak_rss_gb()
    print(f"\nSynthetic phantoms only. {machine()}; load average before "
          f"{load_before[0]:.1f}, after {results['load_after'][0]:.1f}; peak RSS "
          f"{results['peak_rss_gb']:.1f} GB; started {started}")
    for name, arm in arms.items():
        print(f"{name}: {arm['command']}")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str),
                                           encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
