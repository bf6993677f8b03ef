"""``hrpqct segment``, ``postprocess``, ``train-segmenter`` and ``evaluate-segmentation``."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from HRpQCTCore.cli_options import (
    EXAMPLES_FORMATTER,
    add_overwrite_option,
    add_progress_option,
    add_units_options,
    calibration_from_args,
    check_can_write,
    progress_from_args,
)
from HRpQCTCore.errors import HRpQCTError, InputFileError
from HRpQCTPipeline.commands.run import add_trust_options
from HRpQCTSegmentationEngine.bundled import resolve_model_folder

if TYPE_CHECKING:
    from collections.abc import Sequence

    from HRpQCTCore.regions import LabelDefinition
    from HRpQCTSegmentationEngine.postprocess import PostprocessConfig

ORDER = 20
log = logging.getLogger("hrpqct")


# ------------------------------------------------------------------------------------------
# segment
# ------------------------------------------------------------------------------------------
def _segments(classes_only: bool) -> Sequence[LabelDefinition]:
    """The segments of a ``.seg.nrrd`` output: the seven regions, or the network's classes."""
    from HRpQCTCore.regions import NETWORK_CLASSES, REGIONS

    return NETWORK_CLASSES[1:] if classes_only else REGIONS


def _postprocess_config(args: argparse.Namespace) -> PostprocessConfig:
    from dataclasses import replace

    from HRpQCTSegmentationEngine.postprocess import preset

    config = preset(args.preset)
    if args.keep_surfaces:
        config = config.without_surface_refinement()
    if args.soft_tissue_model is not None and config.soft_tissue_model != "none":
        config = replace(config, soft_tissue_model=str(args.soft_tissue_model))
    if args.soft_tissue_rules:
        config = replace(config, soft_tissue_model="none")
    return config.with_fixed_split() if args.fixed_soft_tissue_split else config


def _add_postprocess_options(p: argparse.ArgumentParser) -> None:
    """``--preset``, ``--keep-surfaces``, ``--soft-tissue-rules``, ``--soft-tissue-model``
    and ``--fixed-soft-tissue-split``, read back by
    :func:`_postprocess_config`."""
    p.add_argument("--preset", choices=("default", "paper"), default="default",
                   help="post-processing settings (paper: the paper's rules exactly)")
    p.add_argument("--keep-surfaces", action="store_true",
                   help="keep the network's skin and bone surfaces (no refinement to the HU "
                        "edges; the paper preset never refines them)")
    p.add_argument("--soft-tissue-rules", action="store_true",
                   help="split myotendinous from adipose tissue by the rules alone, without the "
                        "bundled learned split (trained on synthetic phantoms; the paper preset "
                        "never uses it)")
    p.add_argument("--soft-tissue-model", type=Path, metavar="FILE.json",
                   help="a learned myotendinous/adipose split of your own (made like "
                        "benchmarks/train_soft_tissue_model.py makes the bundled one) instead "
                        "of the bundled one")
    p.add_argument("--fixed-soft-tissue-split", action="store_true",
                   help="split myotendinous from adipose tissue at the fixed -50 HU, without "
                        "the scan's own fat and muscle levels, streak suppression or drift "
                        "correction (the paper preset always does)")


def run_segment(args: argparse.Namespace) -> int:
    from HRpQCTCore.io import label_map_format, read_scan, write_label_image, write_label_map
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.limits import check_device, require_segmentation_memory
    from HRpQCTSegmentationEngine.plausibility import require_plausible_scan
    from HRpQCTSegmentationEngine.postprocess import postprocess
    from HRpQCTSegmentationEngine.uncertainty import SIGNAL_OF_METHOD

    output = Path(args.output)
    outputs = [output] + ([Path(args.rings)] if args.rings else []) + (
        [Path(args.qc_json)] if args.qc_json else [])
    label_map_format(output)
    check_can_write(outputs, args.overwrite, inputs=[args.input])
    if len({Path(p).resolve() for p in outputs}) < len(outputs):
        raise HRpQCTError("The outputs (label map, --rings, --qc-json) must be different "
                          "files.")
    folder = resolve_model_folder(args.model)
    check_device(args.device)
    progress = progress_from_args(args)
    scan = read_scan(args.input, units=args.units, calibration=calibration_from_args(args))
    if not args.classes_only:  # refuse before the network runs, not after
        require_segmentation_memory(scan.shape, scan.spacing_mm, _postprocess_config(args))
    # a metal foam or a mask would be segmented confidently and wrongly: refuse it first
    plausibility = require_plausible_scan(scan.hu, scan.spacing_mm,
                                          accept_unusual=args.accept_unusual_scan)
    seg = run_segmentation(scan.hu, folder, batch_size=args.batch_size, device=args.device,
                           fast=not args.no_fast, engine=args.engine, progress=progress,
                           uncertainty=args.uncertainty, spacing_mm=scan.spacing_mm)
    labels, warnings, levels = seg.labels, [], None
    if not args.classes_only:
        config = _postprocess_config(args)
        result = postprocess(seg.labels, scan.hu, scan.spacing_mm, config,
                             with_rings=bool(args.rings), progress=progress)
        labels, warnings = result.regions, result.warnings
        levels = result.soft_tissue_levels.to_dict()
        if args.rings:
            write_label_image(result.rings, scan, Path(args.rings))
    write_label_map(labels, scan, output, segments=_segments(args.classes_only))
    if args.qc_json:
        from HRpQCTCore.atomic import write_text_atomic
        from HRpQCTSegmentationEngine.model_card import identity_for_qc

        qc = {"model": str(folder), "model_identity": identity_for_qc(folder),
              "device": seg.device, "engine": seg.engine,
              "seconds": seg.seconds, "warnings": warnings,
              "soft_tissue_levels": levels,
              "slice_confidence": [float(v) for v in seg.slice_confidence],
              "slice_foreground_confidence": [
                  None if np.isnan(v) else float(v) for v in seg.slice_foreground_confidence],
              "plausibility": plausibility.to_dict(),
              "uncertainty_method": seg.uncertainty_method,
              "uncertainty_signal": SIGNAL_OF_METHOD.get(seg.uncertainty_method),
              "slice_uncertainty": None if seg.slice_uncertainty is None else [
                  None if np.isnan(v) else float(v) for v in seg.slice_uncertainty],
              "voxel_resampling": seg.voxel_resampling}
        write_text_atomic(Path(args.qc_json), json.dumps(qc, indent=2))
    # The post-processing warnings were logged when found; logging them here again would
    # print each twice.
    log.info("Segmented %s in %.1f s on %s (%s) -> %s", args.input, seg.seconds, seg.device,
             seg.engine, output)
    return 0


# ------------------------------------------------------------------------------------------
# postprocess
# ------------------------------------------------------------------------------------------
def _check_classes(classes: np.ndarray, path: Path) -> None:
    """Refuse a ``postprocess`` input with values beyond the network's five classes.

    Raises
    ------
    InputFileError
        Saying whether it looks like a 7-region map (values 6-7) or holds unknown labels.
    """
    from HRpQCTCore.regions import NETWORK_CLASSES, REGIONS

    top_class = len(NETWORK_CLASSES) - 1
    values = np.unique(classes)
    unknown = [int(v) for v in values if v > top_class]
    if not unknown:
        return
    expected = ("postprocess takes the network's 5 classes (0 background, 1-5: tibial "
                "cortical and trabecular, fibular cortical and trabecular, soft tissue), as "
                "written by `hrpqct segment --classes-only`.")
    if max(unknown) <= max(d.label for d in REGIONS):
        raise InputFileError(
            f"Label volume {path} holds values up to {max(unknown)}: it looks like a 7-region "
            f"map (already post-processed), not network classes. {expected} A 7-region map "
            "goes to `hrpqct radiomics` or `hrpqct run --regions` directly.")
    shown = ", ".join(str(v) for v in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
    raise InputFileError(
        f"Label volume {path} holds label values no class has ({shown}). {expected}")


def run_postprocess(args: argparse.Namespace) -> int:
    from HRpQCTCore.io import (
        label_map_format,
        read_label_map,
        read_scan,
        write_label_image,
        write_label_map,
    )
    from HRpQCTSegmentationEngine.postprocess import postprocess

    output = Path(args.output)
    label_map_format(output)
    check_can_write([output] + ([Path(args.rings)] if args.rings else []), args.overwrite,
                    inputs=[args.scan, args.classes])
    scan = read_scan(args.scan, units=args.units, calibration=calibration_from_args(args))
    classes = read_label_map(args.classes, scan, name="Label volume")
    _check_classes(classes, Path(args.classes))
    config = _postprocess_config(args)
    result = postprocess(classes, scan.hu, scan.spacing_mm, config, with_rings=bool(args.rings),
                         progress=progress_from_args(args))
    write_label_map(result.regions, scan, output)
    if args.rings:
        write_label_image(result.rings, scan, Path(args.rings))
    return 0  # the post-processing warnings were logged when found


# ------------------------------------------------------------------------------------------
# train-segmenter
# ------------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from HRpQCTSegmentationEngine.limits import check_device
    from HRpQCTSegmentationEngine.training import (
        TrainingConfig,
        fine_tune_config,
        is_model_folder,
        read_training_manifest,
        train_segmenter,
    )

    check_device(args.device)
    cases = read_training_manifest(args.manifest)
    init_from, extra = _init_from(args.init_from), None
    config = TrainingConfig()
    if is_model_folder(init_from):  # fine-tuning: its defaults and the parent's architecture
        from HRpQCTCore.artefacts import sha256_file
        from HRpQCTSegmentationEngine.model import read_model_metadata

        parent = read_model_metadata(init_from)
        config = fine_tune_config(architecture=parent.architecture,
                                  variant=parent.variant if parent.architecture == "segformer"
                                  else "b0", slice_context=parent.slice_context)
        extra = {"manifest": str(args.manifest), "manifest_sha256": sha256_file(args.manifest)}
    overrides = {k: getattr(args, k) for k in (
        "architecture", "variant", "crop_px", "batch_size", "epochs", "steps_per_epoch",
        "learning_rate", "slices_per_scan", "seed", "validation_fraction", "freeze_stages",
        "early_stop_patience", "warmup_steps", "slice_context")
        if getattr(args, k, None) is not None}
    config = replace(config, **overrides)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise HRpQCTError(
            f"Model folder {out} is not empty. Pass --resume to continue its training, "
            "--overwrite to replace it, or choose another folder.")
    result = train_segmenter(
        cases, out, config=config, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        init_from=init_from, device=args.device, max_steps=args.max_steps,
        progress=progress_from_args(args), extra_provenance=extra)
    best = result["best"]
    summary = {"step": result["step"], "total_steps": result["total_steps"],
               "finished": result["finished"], "best": best}
    if extra is not None:
        summary.update(stopped_early=result["stopped_early"],
                       validation_before=result["validation_before"], model=str(out))
    print(json.dumps(summary, indent=2))
    return 0


def _init_from(value: str | None) -> str | Path | None:
    """``--init-from``: ``bundled`` (the bundled model, checksums verified), a model folder
    (checked by the loader), a 3-channel pretrained checkpoint, or nothing."""
    if value is None:
        return None
    if value.strip().lower() == "bundled":
        return resolve_model_folder(None)
    return value


# ------------------------------------------------------------------------------------------
# evaluate-segmentation
# ------------------------------------------------------------------------------------------
def run_evaluate(args: argparse.Namespace) -> int:
    from HRpQCTCore.io import read_label_map
    from HRpQCTSegmentationEngine.metrics import (
        format_class_table,
        scores_from_labels,
        summarise_scores,
    )

    rows = _read_eval_manifest(Path(args.manifest))
    scores = []
    for row in rows:
        truth = read_label_map(row["truth"])
        pred = read_label_map(row["prediction"])
        if truth.shape != pred.shape:
            raise InputFileError(
                f"{row['prediction']} has shape {pred.shape}, its truth {truth.shape}")
        if args.labels == "classes" and truth.max() > 5:
            from HRpQCTCore.regions import regions_to_classes

            truth = regions_to_classes(truth)
        scores.append(scores_from_labels(truth, pred))
    summary = summarise_scores(scores)
    print(format_class_table(summary))
    if args.json:
        from HRpQCTCore.atomic import write_text_atomic

        write_text_atomic(Path(args.json), json.dumps(summary.to_dict(), indent=2))
    return 0


def _read_eval_manifest(path: Path) -> list[dict]:
    from HRpQCTCore.io.textfiles import ensure_text_file

    ensure_text_file(path, "Manifest")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not {"prediction", "truth"} <= set(reader.fieldnames or ()):
            raise InputFileError(f"Manifest {path} needs columns 'prediction' and 'truth'")
        rows = [{k: str(path.parent / v) if k in ("prediction", "truth") else v
                 for k, v in row.items()} for row in reader]
    if not rows:
        raise InputFileError(f"Manifest {path} lists no scans")
    return rows


# ------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="segment a scan into the 7 regions (or the 5 network classes)",
        formatter_class=EXAMPLES_FORMATTER,
        description=(
            "Segment every slice with the SegFormer, then post-process into the seven regions "
            "(tibial/fibular cortical and trabecular bone, skin, myotendinous and adipose "
            "tissue). The bundled model is trained on synthetic phantoms: research use only.\n\n"
            "examples:\n"
            "  hrpqct segment scan.AIM scan_regions.seg.nrrd      # open in 3D Slicer\n"
            "  hrpqct segment scan.nii.gz regions.nii.gz --model my_model/ --device cuda\n"
            "  hrpqct segment scan.nii.gz classes.nii.gz --classes-only"))
    p.add_argument("input", help="scan (AIM, ISQ, NIfTI, NRRD, MHA, DICOM folder)")
    p.add_argument("output", help="label output: .seg.nrrd (Slicer), .nii.gz, .nrrd or .mha")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--batch-size", type=int,
                   help="slices per forward pass (default: 1 on CPU, 4 on GPU)")
    p.add_argument("--engine", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: ONNX Runtime on the CPU when installed (fastest), else torch")
    p.add_argument("--no-fast", action="store_true", help="disable the exact folded decoder")
    p.add_argument("--classes-only", action="store_true",
                   help="write the network's 5 classes, without post-processing")
    _add_postprocess_options(p)
    p.add_argument("--rings", metavar="PATH", help="also write soft-tissue distance rings")
    p.add_argument("--qc-json", metavar="PATH",
                   help="write per-slice confidence, uncertainty and warnings")
    add_trust_options(p)
    add_units_options(p)
    add_progress_option(p)
    add_overwrite_option(p)
    p.set_defaults(func=run_segment)

    p = subparsers.add_parser(
        "postprocess", help="clean a 5-class prediction and split soft tissue into 7 regions",
        formatter_class=EXAMPLES_FORMATTER,
        description=("Apply the post-processing rules to a 5-class label volume.\n\n"
                     "example:\n  hrpqct postprocess scan.nii.gz classes.nii.gz "
                     "regions.seg.nrrd --rings rings.nii.gz"))
    p.add_argument("scan", help="the scan the labels belong to (HU needed for soft tissue)")
    p.add_argument("classes", help="5-class label volume on the scan's grid")
    p.add_argument("output", help=".seg.nrrd, .nii.gz, .nrrd or .mha")
    _add_postprocess_options(p)
    p.add_argument("--rings", metavar="PATH", help="also write soft-tissue distance rings")
    add_units_options(p)
    add_progress_option(p)
    add_overwrite_option(p)
    p.set_defaults(func=run_postprocess)

    p = subparsers.add_parser(
        "train-segmenter", help="train the SegFormer (or U-Net baseline) on labelled scans",
        formatter_class=EXAMPLES_FORMATTER,
        description=(
            "Train on image + label volumes listed in a CSV (columns subject, image, labels, "
            "optional slices such as 3,7,10-12 naming the annotated slices; labels: 5-class "
            "maps or 7-region maps such as a .seg.nrrd from Slicer, collapsed automatically; "
            "a phantom cohort's manifest.csv also works). Validation uses whole subjects "
            "never seen in training. Interrupted runs continue with --resume.\n\n"
            "Fine-tuning: --init-from a model folder (or 'bundled') starts from its weights "
            "and preprocessing with fine-tuning defaults (learning rate 1e-4, 300 steps, "
            "first encoder stage frozen, early stop); with fewer than three subjects it "
            "validates on held-out slices of the same scans. The new folder gets a model "
            "card naming its parent.\n\n"
            "2.5D: --slice-context 1 feeds each slice with its neighbours z-1 and z+1 (the "
            "edge slice repeated at the scan's ends) as three input channels; the model "
            "folder records it, and segmenting with it feeds the neighbours by itself. With "
            "--init-from a 2D model the first patch embedding is inflated (neighbour "
            "channels start at zero, so training starts from the 2D model's exact output); "
            "fine-tuning a 2.5D model keeps its slice context.\n\n"
            "examples:\n"
            "  hrpqct train-segmenter --manifest cohort/manifest.csv --out my_model\n"
            "  hrpqct train-segmenter --manifest corrected.csv --out my_model --init-from "
            "bundled\n"
            "  hrpqct train-segmenter --manifest corrected.csv --out my_25d --init-from "
            "bundled --slice-context 1\n"
            "  hrpqct train-segmenter --manifest mine.csv --out m --checkpoint-dir /scratch/ck "
            "--resume --max-steps 500"))
    p.add_argument("--manifest", required=True, help="CSV of training scans")
    p.add_argument("--out", required=True, help="folder for the best model")
    p.add_argument("--checkpoint-dir", help="resumable state (default OUT/checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--architecture", choices=("segformer", "unet"))
    p.add_argument("--variant", help="SegFormer variant b0..b5 (default b0)")
    p.add_argument("--init-from", metavar="FOLDER",
                   help="fine-tune a model folder ('bundled': the bundled model), or start "
                        "from a 3-channel pretrained SegFormer folder (HF format)")
    p.add_argument("--slice-context", type=int, metavar="K",
                   help="neighbour slices fed on each side: 0 = 2D, 1 = z-1, z, z+1 (2.5D); "
                        "default: the --init-from model folder's, else 0")
    p.add_argument("--freeze-stages", type=int,
                   help="SegFormer encoder stages not trained (fine-tuning default 1)")
    p.add_argument("--early-stop-patience", type=int,
                   help="validations without improvement before stopping (0: never; "
                        "fine-tuning default 2)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--crop-px", type=int, help="training patch size (800 = whole slices)")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--slices-per-scan", type=int)
    p.add_argument("--validation-fraction", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-steps", type=int, help="stop after this many steps in this call")
    p.add_argument("--device", default="auto")
    add_progress_option(p)
    add_overwrite_option(p)
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "evaluate-segmentation", help="per-class IoU and F1 (mean ± SD over scans)",
        formatter_class=EXAMPLES_FORMATTER,
        description=("Compare predicted label volumes with ground truth; prints the table in "
                     "the layout of the paper's segmentation table.\n\nexample:\n"
                     "  hrpqct evaluate-segmentation pairs.csv --json scores.json\n"
                     "(pairs.csv has columns prediction, truth)"))
    p.add_argument("manifest", help="CSV with columns prediction, truth")
    p.add_argument("--labels", choices=("classes", "regions"), default="classes",
                   help="compare 5-class maps (7-region truth is collapsed) or 7-region maps")
    p.add_argument("--json", metavar="PATH", help="write the scores as JSON")
    p.set_defaults(func=run_evaluate)
