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

The module panel's flow (Slicer nodes, still without Qt):

* the segmenter's original result is kept per segmentation node: when a run loads its
  ``.seg.nrrd``, :func:`keep_original_result` copies that file into a cache folder and records
  its path in the node attribute :data:`ORIGINAL_RESULT_ATTRIBUTE` (saved with the scene; a
  re-run into the same node replaces the copy). A file, not an array in memory: it survives
  a scene save and reload while the cache does, and it is the exact voxels the node was
  loaded from, so an unedited node compares equal slice for slice;
* :func:`add_corrected_node` adds the input volume and its segmentation: against the kept
  original when there is one; as a full annotation when the segmenter never made the node
  (drawn or loaded by the user); refused when the segmenter made it but its original is gone
  (every uncorrected slice would otherwise be taught as truth);
* :func:`training_set_summary` says what the folder holds (the panel's label);
* :class:`FineTuneRun` (:func:`start_fine_tune_run`) is the fine-tuning as a run the shared
  run panel drives, into a new folder under the training set (:func:`next_model_folder`).
"""

from __future__ import annotations

import csv
import io
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.background.process import (
    BackgroundProcess,
    JobState,
    Launcher,
    ProcessRun,
    engine_environment,
    module_folders,
    python_executable,
)
from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.scan import Scan

__all__ = ["MANIFEST_FILE", "MANIFEST_COLUMNS", "corrected_slices", "add_to_training_set",
           "add_segmentation_node", "fine_tune_command", "start_fine_tuning",
           "parameters_for_model", "ORIGINAL_RESULT_ATTRIBUTE", "keep_original_result",
           "original_result_path", "add_corrected_node", "TrainingSetSummary",
           "training_set_summary", "MODELS_FOLDER", "next_model_folder", "FineTuneRun",
           "start_fine_tune_run"]

MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("subject", "image", "labels", "slices")
#: Segmentation node attribute: path of the copy of the segmenter's original ``.seg.nrrd``.
ORIGINAL_RESULT_ATTRIBUTE = "HRpQCTSegmenter.OriginalResult"
#: Sub-folder of a training set that receives the fine-tuned model folders.
MODELS_FOLDER = "models"
#: File a model folder written by ``hrpqct train-segmenter`` always holds.
_MODEL_METADATA_FILE = "hrpqct_model.json"
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


# ------------------------------------------------------------------------------------------
# the module panel's flow
# ------------------------------------------------------------------------------------------
def keep_original_result(segmentation_node: Any, result_path: str | Path,
                         cache_dir: str | Path) -> Path:
    """Copy the segmenter's ``.seg.nrrd`` into ``cache_dir`` and record it on the node.

    The copy this node had before (a re-run replacing its content) is removed when it lies in
    ``cache_dir``. Returns the copy's path.
    """
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"original-{uuid.uuid4().hex}.seg.nrrd"
    shutil.copyfile(result_path, copy)
    previous = original_result_path(segmentation_node)
    segmentation_node.SetAttribute(ORIGINAL_RESULT_ATTRIBUTE, str(copy))
    if previous is not None and previous.parent.resolve() == folder.resolve():
        previous.unlink(missing_ok=True)
    return copy


def original_result_path(segmentation_node: Any) -> Path | None:
    """The kept original of a segmentation node, or None (never kept, or its file is gone)."""
    recorded = segmentation_node.GetAttribute(ORIGINAL_RESULT_ATTRIBUTE) if (
        segmentation_node is not None) else None
    return Path(recorded) if recorded and Path(recorded).is_file() else None


def add_corrected_node(training_dir: str | Path, segmentations_logic: Any, volume_node: Any,
                       segmentation_node: Any, subject: str | None = None) -> dict:
    """Add the panel's input volume and its corrected segmentation to the training set.

    Which slices count: those differing from the kept original (:func:`keep_original_result`);
    every slice when the segmenter never made the node (a full annotation by the user).
    ``subject`` defaults to the volume's name.

    Raises
    ------
    HRpQCTError
        No folder, volume or segmentation; a segmentation made from another volume; one the
        segmenter made whose original is no longer kept; or nothing corrected.
    """
    from HRpQCTCore import slicer_bridge

    if not training_dir:
        raise HRpQCTError("Choose a training-set folder first.")
    if volume_node is None or segmentation_node is None:
        raise HRpQCTError("Select the input volume and its output segmentation (corrected in "
                          "the Segment Editor) first.")
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        raise HRpQCTError(f"Segmentation {segmentation_node.GetName()!r} is empty.")
    source = segmentation_node.GetAttribute(slicer_bridge.SOURCE_VOLUME_ATTRIBUTE)
    if source and source != volume_node.GetID():
        raise HRpQCTError(f"Segmentation {segmentation_node.GetName()!r} was made from another "
                          f"volume than {volume_node.GetName()!r}: select that volume as the "
                          "input.")
    made_by_segmenter = bool(segmentation_node.GetAttribute(slicer_bridge.FINGERPRINT_ATTRIBUTE))
    original = original_result_path(segmentation_node)
    if made_by_segmenter and original is None:
        raise HRpQCTError(
            f"The segmenter's original result of {segmentation_node.GetName()!r} is no longer "
            "kept, so the corrected slices cannot be told from the uncorrected ones. Segment "
            "the volume again (into a new segmentation), correct it, then add it.")
    return add_segmentation_node(training_dir, segmentations_logic, volume_node,
                                 segmentation_node, subject or volume_node.GetName(), original)


@dataclass(frozen=True)
class TrainingSetSummary:
    """What a training-set folder holds: scans, corrected slices, fully annotated scans."""

    scans: int = 0
    corrected_slices: int = 0
    full_scans: int = 0

    def text(self) -> str:
        """The panel's line, e.g. ``2 scans: 14 corrected slices``."""
        if not self.scans:
            return "The training set is empty."
        parts = []
        if self.corrected_slices or self.scans > self.full_scans:
            parts.append(f"{self.corrected_slices} corrected slice"
                         f"{'s' if self.corrected_slices != 1 else ''}")
        if self.full_scans:
            parts.append(f"{self.full_scans} fully annotated")
        return f"{self.scans} scan{'s' if self.scans != 1 else ''}: {', '.join(parts)}."


def training_set_summary(training_dir: str | Path | None) -> TrainingSetSummary:
    """Count the rows of the folder's manifest (an empty summary for no folder or manifest)."""
    from HRpQCTSegmentationEngine.training import parse_slice_list

    if not training_dir:
        return TrainingSetSummary()
    rows = _read_rows(Path(training_dir) / MANIFEST_FILE)
    slices = [parse_slice_list(row.get("slices")) for row in rows]
    return TrainingSetSummary(len(rows), sum(len(s) for s in slices if s is not None),
                              sum(1 for s in slices if s is None))


def next_model_folder(training_dir: str | Path, now: float | None = None) -> Path:
    """A new folder ``<training set>/models/fine-tuned-YYYYMMDD-HHMMSS`` (never existing)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    base = Path(training_dir) / MODELS_FOLDER / f"fine-tuned-{stamp}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


class FineTuneRun(ProcessRun):
    """Fine-tuning as a run the module's run panel drives (poll, status, cancel, log).

    ``options`` go to :func:`start_fine_tuning` (``launcher``, ``env``, ``python``,
    ``device``, ``max_steps``, ``extra``).
    """

    def __init__(self, training_dir: str | Path, parent_model: str | Path | None,
                 output_dir: str | Path, **options: Any) -> None:
        self.training_dir = Path(training_dir)
        self.parent_model = parent_model
        self.output_dir = Path(output_dir)
        self._options = options
        self.process: BackgroundProcess | None = None
        self.state = JobState.NOT_STARTED
        self.message = ""

    def start(self) -> FineTuneRun:
        """Start the background process; returns self."""
        self.process = start_fine_tuning(self.training_dir, self.parent_model, self.output_dir,
                                         **self._options)
        self.state = JobState.RUNNING
        self.message = "Starting the fine-tuning..."
        return self

    @property
    def fraction(self) -> float:
        """Fraction done, for the progress bar."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return self.process.fraction if self.process is not None else 0.0

    def status_text(self) -> str:
        """A short line for the status label."""
        update = self.process.progress if self.process is not None else None
        if self.state != JobState.RUNNING or update is None:
            return self.message
        return (f"Fine-tuning, {update.stage}: {update.done} of {update.total}")

    def poll(self) -> JobState:
        """Collect progress; the final state once the process has ended."""
        if self.process is None or self.state.finished:
            return self.state
        state = self.process.poll()
        if state == JobState.RUNNING:
            return self.state
        if state == JobState.SUCCEEDED and not (self.output_dir / _MODEL_METADATA_FILE).is_file():
            self.state = JobState.FAILED
            self.message = (f"The fine-tuning ended without writing a model to "
                            f"{self.output_dir}. Please report this with the log.")
        elif state == JobState.SUCCEEDED:
            self.state = state
            self.message = (f"Fine-tuned in {self.process.seconds:.0f} s: new model folder "
                            f"{self.output_dir} (its model card names the parent and the "
                            "training data).")
        else:
            self.state = state
            self.message = self.process.failure_message()
        return self.state


def start_fine_tune_run(training_dir: str | Path | None, parameters: Any, *,
                        now: float | None = None, **options: Any) -> FineTuneRun:
    """Fine-tune the model the Segmenter's ``parameters`` select (the bundled one, or their
    model folder) on the training set, on their device, into :func:`next_model_folder`.

    Raises
    ------
    HRpQCTError
        No folder, an empty training set, or a model folder that is not one.
    """
    if not training_dir:
        raise HRpQCTError("Choose a training-set folder first.")
    if not training_set_summary(training_dir).scans:
        raise HRpQCTError(f"The training set {training_dir} is empty: add a corrected "
                          "segmentation to it first.")
    problems = [p for p in parameters.problems() if "model" in p.lower()]
    if problems:
        raise HRpQCTError(" ".join(problems))
    parent = parameters.model_folder if parameters.model == "folder" else None
    options.setdefault("device", parameters.device_argument())
    return FineTuneRun(training_dir, parent, next_model_folder(training_dir, now),
                       **options).start()
