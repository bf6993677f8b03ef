"""Improve the model: corrected segmentations -> a training set -> a fine-tuned model folder.

Qt-free logic of the Segmenter's "Improve the model" section, also usable from a script:

1. :func:`add_to_training_set` writes the scan (NIfTI), the corrected seven regions
   (``.seg.nrrd``) and a row of ``manifest.csv`` into a training-set folder. Which slices
   count is decided here, robustly: when the segmenter's original result is at hand (the
   ``.seg.nrrd`` it wrote, or its labels), the slices whose labels differ from it are the
   corrected ones (:func:`corrected_slices`); otherwise every slice counts (a full
   annotation). The Slicer fingerprint only says *that* a node was edited, not *where*, so
   the voxel comparison is what the manifest's ``slices`` column records.
2. :func:`start_fine_tuning` runs ``python -m HRpQCTPipeline train-segmenter --init-from
   PARENT ... --progress machine`` in a :class:`~HRpQCTCore.background.process.BackgroundProcess`
   (the same command a researcher types, with progress and whole-tree cancel).
3. The new folder is selected with the Segmenter's parameters ``model="folder"``,
   ``model_folder=OUT`` (:func:`parameters_for_model`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.background.process import (
    BackgroundProcess,
    Launcher,
    engine_environment,
    module_folders,
    python_executable,
)
from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.scan import Scan

__all__ = ["MANIFEST_FILE", "MANIFEST_COLUMNS", "corrected_slices", "add_to_training_set",
           "add_segmentation_node", "fine_tune_command", "start_fine_tuning",
           "parameters_for_model"]

MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("subject", "image", "labels", "slices")
_ENGINE_PARENT_DIR = Path(__file__).resolve().parent.parent
#: Share of the progress bar of each stage the training command reports.
FINE_TUNE_SPANS: dict[str, tuple[float, float]] = {
    "loading training scans": (0.00, 0.05),
    "training": (0.05, 1.00),
}


def corrected_slices(labels: np.ndarray, original: np.ndarray) -> list[int]:
    """Axial slices (0-based z) where ``labels`` differ from the segmenter's ``original``."""
    labels, original = np.asarray(labels), np.asarray(original)
    if labels.shape != original.shape:
        raise HRpQCTError(f"The corrected segmentation has shape {labels.shape}, the original "
                          f"{original.shape}: they must be of the same scan")
    return [int(z) for z in np.flatnonzero((labels != original).reshape(len(labels), -1)
                                           .any(axis=1))]


def _read_rows(manifest: Path) -> list[dict[str, str]]:
    if not manifest.is_file():
        return []
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_rows(manifest: Path, rows: Sequence[Mapping[str, str]]) -> None:
    from HRpQCTCore.atomic import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k, "") for k in MANIFEST_COLUMNS} for row in rows)
    write_text_atomic(manifest, buffer.getvalue())


def add_to_training_set(training_dir: str | Path, scan: Scan, region_labels: np.ndarray,
                        subject: str, original_labels: np.ndarray | None = None) -> dict:
    """Write a scan and its corrected regions into ``training_dir`` and list them.

    Parameters
    ----------
    training_dir:
        The training-set folder (created); holds ``manifest.csv``, ``<subject>.nii.gz`` and
        ``<subject>_regions.seg.nrrd``.
    scan:
        The scan in HU.
    region_labels:
        The corrected seven-region map on the scan's grid.
    subject:
        Subject id (validation never mixes slices of two subjects when there are three or
        more); adding the same subject again replaces its row.
    original_labels:
        The segmenter's result before correction: only the slices that differ count. None:
        every slice counts.

    Returns
    -------
    dict
        The manifest row written (``slices`` empty: every slice).

    Raises
    ------
    HRpQCTError
        If an original is given and nothing was corrected (no slice would count).
    """
    from HRpQCTCore.io import write_label_map, write_scan
    from HRpQCTSegmentationEngine.training import format_slice_list

    folder = Path(training_dir)
    folder.mkdir(parents=True, exist_ok=True)
    slices = ""
    if original_labels is not None:
        changed = corrected_slices(region_labels, original_labels)
        if not changed:
            raise HRpQCTError("No slice differs from the segmenter's result: correct some "
                              "slices in the Segment Editor first.")
        slices = format_slice_list(changed)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in subject) or "scan"
    image = write_scan(scan, folder / f"{safe}.nii.gz")
    labels = folder / f"{safe}_regions.seg.nrrd"
    write_label_map(np.asarray(region_labels, dtype=np.uint8), scan, labels)
    row = {"subject": subject, "image": image.name, "labels": labels.name, "slices": slices}
    manifest = folder / MANIFEST_FILE
    rows = [r for r in _read_rows(manifest) if r.get("subject") != subject] + [row]
    _write_rows(manifest, rows)
    return row


def add_segmentation_node(training_dir: str | Path, segmentations_logic: Any, volume_node: Any,
                          segmentation_node: Any, subject: str,
                          original_path: str | Path | None = None) -> dict:
    """:func:`add_to_training_set` for Slicer nodes; ``original_path``: the ``.seg.nrrd`` the
    segmenter wrote (kept by the user), whose differing slices are the corrected ones."""
    from HRpQCTCore import slicer_bridge
    from HRpQCTCore.io import read_label_map

    scan = slicer_bridge.scan_from_volume_node(volume_node)
    labels = slicer_bridge.labels_from_segmentation_node(segmentations_logic, segmentation_node,
                                                        volume_node)
    original = None if not original_path else read_label_map(original_path, scan.shape)
    return add_to_training_set(training_dir, scan, labels, subject, original)


def fine_tune_command(training_dir: str | Path, parent_model: str | Path | None,
                      output_dir: str | Path, *, python: str | None = None,
                      max_steps: int | None = None, device: str = "auto",
                      extra: Sequence[str] = ()) -> list[str]:
    """``python -m HRpQCTPipeline train-segmenter`` fine-tuning ``parent_model`` (None: the
    bundled model) on the training set's manifest, with machine-readable progress."""
    command = [python or python_executable(), "-m", "HRpQCTPipeline", "train-segmenter",
               "--manifest", str(Path(training_dir) / MANIFEST_FILE), "--out", str(output_dir),
               "--init-from", str(parent_model) if parent_model else "bundled",
               "--device", device, "--progress", "machine"]
    if max_steps is not None:
        command += ["--max-steps", str(int(max_steps))]
    return command + list(extra)


def start_fine_tuning(training_dir: str | Path, parent_model: str | Path | None,
                      output_dir: str | Path, *, launcher: Launcher | None = None,
                      env: Mapping[str, str] | None = None, **kwargs) -> BackgroundProcess:
    """Start :func:`fine_tune_command` in the background; poll it, or cancel it."""
    if not (Path(training_dir) / MANIFEST_FILE).is_file():
        raise HRpQCTError(f"{training_dir} has no {MANIFEST_FILE}: add a corrected "
                          "segmentation to the training set first.")
    env = env if env is not None else engine_environment(module_folders(_ENGINE_PARENT_DIR))
    options = {"launcher": launcher} if launcher is not None else {}
    return BackgroundProcess(fine_tune_command(training_dir, parent_model, output_dir, **kwargs),
                             env, stage_spans=FINE_TUNE_SPANS, program="fine-tuning",
                             **options)


def parameters_for_model(parameters: Any, model_folder: str | Path) -> Any:
    """The Segmenter's parameters with the fine-tuned folder selected."""
    return replace(parameters, model="folder", model_folder=str(model_folder))
