"""Training the five-class segmenter (SegFormer or the U-Net baseline) on labelled volumes.

The same code trains on our synthetic phantoms and on a user's own annotated scans: a
:class:`TrainingCase` is just an image volume (anything :func:`HRpQCTCore.io.read_scan`
reads) and a 5-class label volume on the same grid, plus a subject id so that the
train/validation split never puts slices of one subject on both sides.

Recipe (the paper's loss, the official SegFormer optimiser):

* slices are preprocessed exactly as at inference (:mod:`.preprocessing`: crop 1600, clip,
  scale, bicubic to 800) and cached as float16 / uint8;
* each step draws random ``crop_px`` x ``crop_px`` patches with random rotation, flips,
  intensity scaling/shift and extra noise (CPU-friendly; ``crop_px`` = 800 trains on whole
  slices on a GPU);
* loss = cross-entropy + soft Dice, equal weights;
* AdamW (no weight decay on norms and biases, decode head at ``head_lr_multiplier`` x lr),
  linear warm-up then polynomial decay;
* every ``checkpoint_every`` steps and at each epoch end the full training state is written
  atomically to ``checkpoint_dir/last.pt`` so an interrupted run resumes exactly
  (``resume=True``); randomness is derived from ``(seed, step)``, so a resumed run draws the same
  batches as an uninterrupted one;
* the weights with the best validation mean IoU are saved with :func:`.model.save_model`;
  validation scores each held-out slice on the part of it that segmenting feeds the network
  (the leg's window, :func:`.preprocessing.network_window`), so the scores in the model
  card are those of the input the model gets in use.

Fine-tuning (:func:`fine_tune_config`) starts from a saved model folder (the bundled one
included, its checksum verified), keeps its preprocessing, trains at a low learning rate for
a few hundred steps with the first encoder stage frozen, validates before the first step and
stops early when validation stops improving. Partial labels: a manifest's ``slices`` column
("3,7,10-12") names the slices a user corrected; only those are read, so the others never
reach the loss; pixels labelled :data:`.losses.IGNORE_INDEX` (255) are left out of the loss
as well.

Inter-slice context (2.5D, ``slice_context`` 1): each training slice is stored with its
neighbours z-1 and z+1 from the same scan (the edge slice repeated at the scan's ends) as
three channels; only the centre slice needs labels (the neighbours' are never read). A patch
gets one rotation, flip, crop and intensity change for all its channels, and noise of one SD
drawn independently per channel (neighbouring slices of a scan have independent noise).
Fine-tuning a 2D model folder into a 2.5D model inflates its first patch embedding
(:func:`.model.inflate_input_channels`: neighbour channels zero, so training starts from the
2D model's exact output) and keeps that kernel trainable even when the first stage is frozen.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from HRpQCTCore.errors import HRpQCTError, InputFileError
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import NETWORK_CLASSES

if TYPE_CHECKING:
    from HRpQCTSegmentationEngine.preprocessing import CropBox, PreprocessingConfig

log = logging.getLogger(__name__)

__all__ = [
    "AugmentationConfig",
    "TrainingConfig",
    "TrainingCase",
    "SliceDataset",
    "read_training_manifest",
    "parse_slice_list",
    "format_slice_list",
    "fine_tune_config",
    "is_model_folder",
    "split_by_subject",
    "split_by_slices",
    "load_slices",
    "window_in_input",
    "train_segmenter",
    "fit",
    "resolve_slice_context",
]


@dataclass(frozen=True)
class AugmentationConfig:
    """Random augmentation applied to each training patch."""

    rotation_deg: float = 180.0  # uniform in +-rotation_deg; HR-pQCT legs come in any pose
    flip_lr: bool = True  # left and right legs are mirror images
    flip_ud: bool = False
    intensity_scale: float = 0.10  # HU multiplied by U(1 - s, 1 + s)
    intensity_shift_hu: float = 50.0  # HU shifted by U(-d, d)
    extra_noise_sd_hu: float = 60.0  # added Gaussian noise SD ~ U(0, value)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that determines a training run (stored with the checkpoint and the model)."""

    architecture: str = "segformer"  # "segformer" or "unet"
    variant: str = "b0"  # MiT variant for SegFormer
    crop_px: int = 256
    batch_size: int = 8
    epochs: int = 30
    steps_per_epoch: int = 100
    learning_rate: float = 6e-4
    head_lr_multiplier: float = 10.0
    weight_decay: float = 0.01
    warmup_steps: int = 100
    poly_power: float = 1.0
    validation_fraction: float = 0.2
    slices_per_scan: int = 12
    validation_slices: int = 16
    checkpoint_every: int = 50
    foreground_crop_fraction: float = 0.9  # patches centred on leg tissue, not air
    seed: int = 0
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    # Fine-tuning controls; their defaults change nothing for training from scratch.
    freeze_stages: int = 0  # SegFormer encoder stages (patch embedding + blocks) not trained
    early_stop_patience: int = 0  # validations without improvement before stopping; 0: never
    #: Neighbour slices fed on each side (0: 2D, 1: z-1, z, z+1). None: the ``init_from``
    #: model folder's own, else 0.
    slice_context: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        data = dict(data)
        aug = AugmentationConfig(**data.pop("augmentation", {}))
        return cls(**data, augmentation=aug)


def fine_tune_config(**overrides) -> TrainingConfig:
    """Defaults for fine-tuning a trained model on a few corrected scans, on a CPU in minutes.

    * learning rate 1e-4 (the from-scratch peak is 6e-4; a trained model needs small steps
      so a few scans do not erase what it learnt) and the decode head at the same rate
      (``head_lr_multiplier`` 1: the head is trained already, not new);
    * 300 steps (6 validations of 50 steps) of batch 4, 256 px patches, 20 warm-up steps:
      about 2-5 minutes on a laptop CPU for a B0;
    * the first encoder stage frozen: its edge-like filters transfer between scanners, and
      not back-propagating through the largest feature maps saves time;
    * early stop after 2 validations without a better mean IoU;
    * every annotated slice used (``slices_per_scan`` 0), the existing augmentation.
    """
    base = TrainingConfig(
        learning_rate=1e-4, head_lr_multiplier=1.0, epochs=6, steps_per_epoch=50,
        batch_size=4, warmup_steps=20, slices_per_scan=0, checkpoint_every=25,
        freeze_stages=1, early_stop_patience=2)
    return replace(base, **overrides)


@dataclass(frozen=True)
class TrainingCase:
    """One labelled scan: image volume, 5-class label volume and its subject."""

    subject: str
    image_path: Path
    label_path: Path
    slices: tuple[int, ...] | None = None  # annotated slices (0-based z); None: all


def parse_slice_list(text: str | None) -> tuple[int, ...] | None:
    """``"3,7,10-12"`` -> ``(3, 7, 10, 11, 12)``; empty or None -> None (every slice).

    Raises
    ------
    InputFileError
        For anything that is not a comma-separated list of numbers and ranges.
    """
    text = (text or "").strip()
    if not text:
        return None
    found: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise InputFileError(
                f"Slice list {text!r}: {part!r} is not a slice number or a range such as "
                "10-12") from None
        if first < 0 or last < first:
            raise InputFileError(f"Slice list {text!r}: {part!r} is not a valid range")
        found.update(range(first, last + 1))
    return tuple(sorted(found))


def format_slice_list(slices) -> str:
    """Sorted slice numbers as the manifest writes them: runs become ranges ("3,7,10-12")."""
    values = sorted({int(v) for v in slices})
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ",".join(parts)


def is_model_folder(path: str | Path | None) -> bool:
    """Whether ``path`` is a model folder of this project (has ``hrpqct_model.json``)."""
    from HRpQCTSegmentationEngine.model import METADATA_FILE

    return path is not None and (Path(path) / METADATA_FILE).is_file()


def read_training_manifest(path: str | Path) -> list[TrainingCase]:
    """Read a CSV with columns ``subject``, ``image`` and ``labels`` (paths relative to it).

    The phantom cohort's ``manifest.csv`` is accepted as well (``subject_id``, ``scan_path``,
    ``classes_path``). An optional ``slices`` column ("3,7,10-12", 0-based) restricts a scan
    to the slices that were annotated or corrected; empty means every slice.
    """
    from HRpQCTCore.io.textfiles import ensure_text_file

    path = ensure_text_file(path, "Training manifest")
    cases = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if {"subject", "image", "labels"} <= columns:
            keys = ("subject", "image", "labels")
        elif {"subject_id", "scan_path", "classes_path"} <= columns:
            keys = ("subject_id", "scan_path", "classes_path")
        else:
            raise InputFileError(
                f"Training manifest {path} needs columns subject, image, labels (found: "
                f"{', '.join(sorted(columns)) or 'none'})")
        for row in reader:
            image, labels = (path.parent / row[keys[1]], path.parent / row[keys[2]])
            cases.append(TrainingCase(str(row[keys[0]]), image, labels,
                                      parse_slice_list(row.get("slices"))))
    if not cases:
        raise InputFileError(f"Training manifest {path} lists no scans")
    return cases


def split_by_subject(cases: Sequence[TrainingCase], validation_fraction: float, seed: int
                     ) -> tuple[list[TrainingCase], list[TrainingCase]]:
    """Split cases so that every subject is entirely in training or entirely in validation."""
    subjects = sorted({c.subject for c in cases})
    if len(subjects) < 2:
        raise HRpQCTError(
            "Training needs scans of at least two subjects so that validation is done on "
            f"subjects never seen in training (found {len(subjects)}).")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, round(validation_fraction * len(subjects))))
    val_subjects = {subjects[i] for i in order[:n_val]}
    train = [c for c in cases if c.subject not in val_subjects]
    val = [c for c in cases if c.subject in val_subjects]
    return train, val


def split_by_slices(data: SliceDataset, validation_fraction: float, seed: int
                    ) -> tuple[SliceDataset, SliceDataset]:
    """Hold out a share of the slices of each scan, for a run on one or two subjects.

    Neighbouring slices are alike, so this validation is optimistic: it shows that training
    did not break the model, not how it does on a new subject (the model card says so).
    """
    rng = np.random.default_rng(seed)
    val_idx = []
    for subject in dict.fromkeys(data.subjects):
        idx = [i for i, s in enumerate(data.subjects) if s == subject]
        if len(idx) < 2:
            continue  # a single slice has to train
        n_val = min(len(idx) - 1, max(1, round(validation_fraction * len(idx))))
        val_idx.extend(rng.choice(idx, size=n_val, replace=False).tolist())
    if not val_idx:
        raise HRpQCTError("Fine-tuning needs at least two annotated slices of one scan, so "
                          "that one can be held out for validation.")
    val_set = set(val_idx)
    train_idx = [i for i in range(len(data)) if i not in val_set]
    return _subset(data, train_idx), _subset(data, sorted(val_set))


def _subset(data: SliceDataset, idx: list[int]) -> SliceDataset:
    return SliceDataset(data.images[idx], data.labels[idx], [data.subjects[i] for i in idx],
                        [data.voxel_mm[i] for i in idx] if data.voxel_mm else [],
                        [data.windows[i] for i in idx] if data.windows else [])


@dataclass
class SliceDataset:
    """Preprocessed slices in memory: images float16 in [0, 1], labels uint8, same size.

    2D: ``images`` is ``[N, H, W]``. With inter-slice context ``k`` it is
    ``[N, 2k + 1, H, W]``: each slice with its neighbours (centre channel ``k``); the labels
    are the centre slice's.
    """

    images: np.ndarray  # [N, H, W] or [N, C, H, W] float16
    labels: np.ndarray  # [N, H, W] uint8
    subjects: list[str]
    #: In-plane voxel size (mm) of each slice's scan (empty when not known).
    voxel_mm: list[float] = field(default_factory=list)
    #: Per slice, the image pixels the network sees when it segments the scan,
    #: ``(row0, row1, col0, col1)`` (ends exclusive): the leg's window with the default
    #: ``input_fit="leg"`` (:func:`.preprocessing.network_window`). Empty: the whole image.
    windows: list[tuple[int, int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def seen(self, i: int) -> tuple[slice, slice]:
        """Rows and columns of slice ``i``'s image that the network sees when segmenting."""
        if not self.windows:
            return slice(None), slice(None)
        r0, r1, c0, c1 = self.windows[i]
        return slice(r0, r1), slice(c0, c1)

    @property
    def slice_context(self) -> int:
        """Neighbour slices on each side stored with each slice (0: 2D)."""
        from HRpQCTSegmentationEngine.preprocessing import slice_context_of_channels

        return 0 if self.images.ndim == 3 else slice_context_of_channels(self.images.shape[1])


def _slice_indices(n_slices: int, wanted: int) -> np.ndarray:
    if wanted <= 0 or wanted >= n_slices:
        return np.arange(n_slices)
    return np.unique(np.linspace(0, n_slices - 1, wanted).round().astype(int))


def _read_training_labels(case: TrainingCase, shape: tuple[int, ...]) -> np.ndarray:
    """The case's labels as network classes (255: not annotated), checked against the scan.

    A 7-region map (a ``.seg.nrrd`` from Slicer or the segmenter, a NIfTI) is collapsed with
    :func:`~HRpQCTCore.regions.regions_to_classes`; a 5-class map passes unchanged, since the
    collapse maps labels 0-5 to themselves.
    """
    from HRpQCTCore.io import read_label_map
    from HRpQCTCore.regions import regions_to_classes
    from HRpQCTSegmentationEngine.losses import IGNORE_INDEX

    lab = read_label_map(case.label_path, name="Label volume")
    if lab.shape != tuple(shape):
        raise InputFileError(
            f"Label volume {case.label_path} has shape {lab.shape} but image "
            f"{case.image_path} has {tuple(shape)}: they must share one grid")
    unlabelled = lab == IGNORE_INDEX
    known = lab[~unlabelled]
    top = 7  # the seven regions; 5-class maps are a subset
    if known.size and known.max() > top:
        raise InputFileError(
            f"Label volume {case.label_path} has values up to {int(known.max())}; training "
            f"takes 5-class maps (0..{len(NETWORK_CLASSES) - 1}) or 7-region maps (0..7), "
            f"with {IGNORE_INDEX} for voxels nobody annotated")
    classes = regions_to_classes(np.where(unlabelled, 0, lab))
    classes[unlabelled] = IGNORE_INDEX
    return classes


def _case_slices(case: TrainingCase, n_slices: int, slices_per_scan: int) -> np.ndarray:
    """The slices of a case to train on: its annotated ones, else evenly spaced ones."""
    if case.slices is None:
        return _slice_indices(n_slices, slices_per_scan)
    outside = [z for z in case.slices if z >= n_slices]
    if outside:
        raise InputFileError(
            f"Training manifest names slices {format_slice_list(outside)} of {case.image_path}, "
            f"which has {n_slices} slices (numbered from 0)")
    chosen = np.asarray(case.slices, dtype=int)
    return chosen[_slice_indices(len(chosen), slices_per_scan)]


def load_slices(cases: Sequence[TrainingCase], preprocessing, slices_per_scan: int,
                progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None, slice_context: int = 0,
                voxel_mm: float | None = None) -> SliceDataset:
    """Read cases and preprocess ``slices_per_scan`` evenly spaced slices of each.

    Labels are brought to the model's input grid with the same crop and nearest-neighbour
    resampling, so a label pixel sits exactly under the image pixel it annotates. With
    ``slice_context`` k > 0 each slice comes with its k neighbours on each side from the
    same scan (:func:`.preprocessing.neighbour_indices`: the edge slice repeated at the
    ends), preprocessed with the same crop box; only the centre slice's labels are read.

    ``voxel_mm`` (in-plane, mm; fine-tuning passes the parent model's training voxel size):
    a scan more than 2 % off it is brought to it exactly as at inference
    (:func:`.inference.model_grid`: the model's field in mm, resized to the network input),
    so a model fine-tuned on 82 um scans still sees structures at the size it was trained
    on, and segmenting with it resamples the same way. None: scans are used as they are.

    The images cover the whole crop window (training draws patches anywhere in it); each
    slice also records the part of it that segmenting feeds the network (``windows``, the
    leg's window), where validation scores the model.
    """
    from HRpQCTCore.io import read_scan
    from HRpQCTSegmentationEngine import preprocessing as pp
    from HRpQCTSegmentationEngine.inference import model_grid

    images, labels, subjects, voxels, windows = [], [], [], [], []
    for i, case in enumerate(cases):
        check(cancel)
        scan = read_scan(case.image_path)
        lab = _read_training_labels(case, scan.hu.shape)
        on_grid, grid = model_grid(preprocessing, scan.spacing_mm, voxel_mm)
        box, window, _ = pp.crop_and_network_windows(scan.hu, on_grid)
        seen = window_in_input(box, window, on_grid)
        stacker = _NeighbourStack(scan.hu, box, on_grid, slice_context)
        seen_mm = voxel_mm if grid["resampled"] else float(np.mean(scan.spacing_mm[1:]))
        for z in _case_slices(case, scan.n_slices, slices_per_scan):
            images.append(stacker.image(int(z)))
            labels.append(pp.labels_to_model_grid(lab[z].astype(np.uint8), box, on_grid))
            subjects.append(case.subject)
            voxels.append(seen_mm)
            windows.append(seen)
        report(progress, i + 1, len(cases), "loading training scans")
    return SliceDataset(np.stack(images), np.stack(labels), subjects, voxels, windows)


def window_in_input(box: CropBox, window: CropBox,
                    preprocessing: PreprocessingConfig) -> tuple[int, int, int, int]:
    """The network-input pixels of crop window ``box`` that its sub-window ``window`` covers.

    ``(row0, row1, col0, col1)``, ends exclusive. Both windows come from
    :func:`.preprocessing.crop_and_network_windows` for one scan and ``preprocessing``:
    ``window`` is ``box`` itself, or a part of it starting on a network-pixel boundary. There
    the input pixels of ``box`` are those segmenting computes, but for a few at the edges (in
    the leg's air margin), where segmenting's resize sees the window's edge.
    """
    rows, cols = preprocessing.input_yx
    if window == box:
        return 0, rows, 0, cols
    scale_y, scale_x = box.height // rows, box.width // cols
    r0, c0 = (window.y0 - box.y0) // scale_y, (window.x0 - box.x0) // scale_x
    return r0, r0 + window.height // scale_y, c0, c0 + window.width // scale_x


class _NeighbourStack:
    """Preprocessed slices of one scan, alone (2D) or with their neighbours as channels.

    Each slice is preprocessed once and reused by the neighbouring training slices.
    """

    def __init__(self, hu: np.ndarray, box, preprocessing, slice_context: int) -> None:
        from HRpQCTSegmentationEngine.preprocessing import checked_slice_context

        self.hu, self.box, self.preprocessing = hu, box, preprocessing
        self.slice_context = checked_slice_context(slice_context)
        self._done: dict[int, np.ndarray] = {}

    def _slice(self, z: int) -> np.ndarray:
        from HRpQCTSegmentationEngine.preprocessing import preprocess_slice

        if z not in self._done:
            self._done[z] = preprocess_slice(self.hu[z], self.box,
                                             self.preprocessing).astype(np.float16)
        return self._done[z]

    def image(self, z: int) -> np.ndarray:
        """``[H, W]`` (2D) or ``[2k + 1, H, W]`` float16 network input of slice ``z``."""
        from HRpQCTSegmentationEngine.preprocessing import neighbour_indices

        if self.slice_context == 0:
            return self._slice(z)
        return np.stack([self._slice(int(n)) for n in
                         neighbour_indices(z, self.hu.shape[0], self.slice_context)])


def training_voxel_mm(*datasets: SliceDataset) -> float | None:
    """The in-plane voxel size (mm) of the training data, for ``training_voxel_mm``.

    The median over the slices (None when unknown). Scans of different voxel sizes are
    used as they are (not resampled to one): a spread of more than 2 % is logged.
    """
    voxels = np.array([v for d in datasets for v in d.voxel_mm], dtype=np.float64)
    if voxels.size == 0:
        return None
    median = float(np.median(voxels))
    if voxels.max() > 1.02 * median or voxels.min() < 0.98 * median:
        log.warning("The training scans have different voxel sizes (%.4f .. %.4f mm); the "
                    "model records their median, %.4f mm, as its training voxel size.",
                    voxels.min(), voxels.max(), median)
    return round(median, 6)


# --------------------------------------------------------------------------------------
# Batches with augmentation
# --------------------------------------------------------------------------------------
def _as_batch(images: np.ndarray):
    """Stored slices ``[B, H, W]`` (2D) or ``[B, C, H, W]`` as a float32 ``[B, C, H, W]``
    torch tensor."""
    import torch

    batch = torch.from_numpy(images.astype(np.float32))
    return batch.unsqueeze(1) if batch.ndim == 3 else batch


def _sample_batch(data: SliceDataset, config: TrainingConfig, rng: np.random.Generator):
    """Draw ``batch_size`` augmented patches: returns torch tensors (images, labels)."""
    import torch
    import torch.nn.functional as F

    aug = config.augmentation
    n, h, w = data.labels.shape
    crop = config.crop_px
    idx = rng.integers(0, n, size=config.batch_size)
    images = _as_batch(data.images[idx])  # [B, C, H, W]: one geometry for all channels
    labels = torch.from_numpy(data.labels[idx]).unsqueeze(1).float()

    thetas = []
    for k in range(config.batch_size):
        lab = data.labels[idx[k]]
        if rng.random() < config.foreground_crop_fraction and lab.any():
            ys, xs = np.nonzero(lab[::4, ::4])
            j = rng.integers(0, len(ys))
            cy, cx = ys[j] * 4, xs[j] * 4
        else:
            cy, cx = rng.integers(0, h), rng.integers(0, w)
        angle = math.radians(rng.uniform(-aug.rotation_deg, aug.rotation_deg))
        sx = -1.0 if (aug.flip_lr and rng.random() < 0.5) else 1.0
        sy = -1.0 if (aug.flip_ud and rng.random() < 0.5) else 1.0
        cos, sin = math.cos(angle), math.sin(angle)
        # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1]
        ax, ay = crop / w, crop / h
        tx = 2.0 * (cx + 0.5) / w - 1.0
        ty = 2.0 * (cy + 0.5) / h - 1.0
        thetas.append([[cos * ax * sx, -sin * ax * sy, tx],
                       [sin * ay * sx, cos * ay * sy, ty]])
    theta = torch.tensor(thetas, dtype=torch.float32)
    grid = F.affine_grid(theta, [config.batch_size, 1, crop, crop], align_corners=False)
    # Out-of-slice samples become air: image value of -1000 HU, label background.
    air = (-1000.0 + 4000.0) / 10000.0
    x = F.grid_sample(images - air, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=False) + air
    y = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros",
                      align_corners=False).squeeze(1).long()

    # Intensity augmentation in HU, mapped to the normalised scale (an affine map).
    scale = torch.from_numpy(rng.uniform(1 - aug.intensity_scale, 1 + aug.intensity_scale,
                                         (config.batch_size, 1, 1, 1)).astype(np.float32))
    shift_hu = rng.uniform(-aug.intensity_shift_hu, aug.intensity_shift_hu,
                           (config.batch_size, 1, 1, 1)).astype(np.float32)
    noise_sd = rng.uniform(0, aug.extra_noise_sd_hu, (config.batch_size, 1, 1, 1)).astype(
        np.float32)
    hu = x * 10000.0 - 4000.0
    hu = hu * scale + torch.from_numpy(shift_hu)
    noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)) * torch.from_numpy(
        noise_sd)
    x = ((hu + noise + 4000.0) / 10000.0).clamp_(0.0, 1.0)
    return x, y


# --------------------------------------------------------------------------------------
# Model, optimiser, schedule
# --------------------------------------------------------------------------------------
def resolve_slice_context(config: TrainingConfig, init_from: str | Path | None
                          ) -> TrainingConfig:
    """``config`` with its ``slice_context`` decided: as given, else the ``init_from``
    model folder's (fine-tuning keeps a 2.5D model 2.5D), else 0 (2D).

    Raises
    ------
    HRpQCTError
        For a context that is not a whole number 0 .. MAX_SLICE_CONTEXT.
    """
    from HRpQCTSegmentationEngine.preprocessing import checked_slice_context

    context = config.slice_context
    if context is None:
        if not is_model_folder(init_from):
            return replace(config, slice_context=0)
        from HRpQCTSegmentationEngine.model import read_model_metadata

        return replace(config, slice_context=read_model_metadata(init_from).slice_context)
    try:
        return replace(config, slice_context=checked_slice_context(context))
    except ValueError as exc:
        raise HRpQCTError(f"Training setting {exc}") from None


def _build(config: TrainingConfig, init_from: str | Path | None):
    """The model to train and, when its input was inflated, a note saying from what."""
    from HRpQCTSegmentationEngine import model as model_lib
    from HRpQCTSegmentationEngine.preprocessing import channels_for_context
    from HRpQCTSegmentationEngine.unet import UNet, UNetConfig

    context = int(config.slice_context or 0)
    if is_model_folder(init_from):  # fine-tuning: the folder's architecture, checksum checked
        model = model_lib.load_model(init_from, device="cpu")
        model.train()
        return _inflated(model, context, f"the model folder {Path(init_from).name}")
    if config.architecture == "unet":
        return UNet(UNetConfig(num_channels=channels_for_context(context))), None
    if config.architecture != "segformer":
        raise HRpQCTError(f"Unknown architecture {config.architecture!r}: segformer or unet")
    if init_from is not None:
        model = model_lib.load_pretrained_rgb_checkpoint(init_from)
        return _inflated(model, context, f"the grey-averaged checkpoint {Path(init_from).name}")
    return model_lib.build_model(config.variant, slice_context=context), None


def _refuse_fewer_neighbours(own: int, wanted: int, source: str) -> None:
    """A model cannot lose input channels (2.5D -> 2D): its trained kernels need them."""
    if wanted < own:
        raise HRpQCTError(
            f"{source[0].upper()}{source[1:]} is a 2.5D model (slice context {own}: "
            f"{2 * own + 1} slices per input); it cannot be fine-tuned into a model with slice "
            f"context {wanted}. Keep --slice-context {own} (the default when fine-tuning), or "
            "start from a 2D model.")


def _inflated(model, slice_context: int, source: str):
    """``model`` inflated to ``slice_context`` (:func:`.model.inflate_input_channels`) and
    a provenance note; refuses to drop neighbours with a message saying what to do."""
    from HRpQCTSegmentationEngine.model import inflate_input_channels, slice_context_of_model

    own = slice_context_of_model(model)
    if own == slice_context:
        return model, None
    _refuse_fewer_neighbours(own, slice_context, source)
    inflated = inflate_input_channels(model, slice_context)
    note = (f"first patch embedding inflated from {2 * own + 1} to {2 * slice_context + 1} "
            f"input channels from {source}: its kernel in the centre channel(s), zeros for "
            "the new neighbour channels, so training started from its exact output")
    return inflated, note


#: The first patch embedding's input convolution (transformers 4.x and 5.x names).
_INPUT_KERNEL = r"(?:encoder\.patch_embeddings\.0\.|stages\.0\.patch_embeddings\.)proj\."


def freeze_encoder_stages(model, n_stages: int, train_input_kernel: bool = False) -> list[str]:
    """Stop training the first ``n_stages`` SegFormer encoder stages; returns what still trains.

    A stage is its patch embedding, its transformer blocks and its layer norm. Parameter names
    differ between transformers 4.x (``encoder.block.0``) and 5.x (``stages.0.blocks``), so
    both spellings are matched. The U-Net has no stages; nothing is frozen there.
    ``train_input_kernel`` keeps the first patch embedding's convolution trainable (an
    inflated 2.5D input: frozen, its zero neighbour channels would never learn anything).
    """
    import re

    if n_stages > 0 and hasattr(model, "config") and hasattr(model.config, "depths"):
        pattern = re.compile(
            r"(?:encoder\.(?:patch_embeddings|block|layer_norm)\.(\d+)\."
            r"|stages\.(\d+)\.)")
        for name, param in model.named_parameters():
            hit = pattern.search(name)
            if train_input_kernel and re.search(_INPUT_KERNEL, name):
                continue
            if hit and int(hit.group(1) or hit.group(2)) < n_stages:
                param.requires_grad_(False)
    return trained_parts(model)


def trained_parts(model) -> list[str]:
    """Top-level parts of the model with trainable parameters, e.g. ``segformer.encoder
    stages 1-3``, for the model card (coarse on purpose: a list of 200 names says nothing)."""
    import re

    stage = re.compile(r"(?:encoder\.(?:patch_embeddings|block|layer_norm)\.(\d+)\."
                       r"|stages\.(\d+)\.)")
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    # a stage of which only the input convolution trains (an inflated 2.5D input) says so
    whole_stages = {int(hit.group(1) or hit.group(2)) for name in trainable
                    if (hit := stage.search(name)) and not re.search(_INPUT_KERNEL, name)}
    parts: dict[str, None] = {}
    for name in trainable:
        hit = stage.search(name)
        if hit:
            index = int(hit.group(1) or hit.group(2))
            label = f"encoder stage {index + 1}"
            parts[label if index in whole_stages else f"{label} input kernel"] = None
        else:
            parts[name.split(".")[0] if "decode_head" not in name else "decode head"] = None
    return list(parts)


def _forward_logits(model, x):
    """Logits of either architecture (SegFormer returns an output object, U-Net a tensor)."""
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out


def _optimizer(model, config: TrainingConfig):
    import torch

    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = name.startswith("decode_head") or name.startswith("classifier")
        plain = p.ndim <= 1  # norms and biases: no weight decay
        (head_no_decay if is_head and plain else head_decay if is_head
         else no_decay if plain else decay).append(p)
    lr, head_lr = config.learning_rate, config.learning_rate * config.head_lr_multiplier
    groups = [
        {"params": decay, "lr": lr, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": head_decay, "lr": head_lr, "weight_decay": config.weight_decay},
        {"params": head_no_decay, "lr": head_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, power: float) -> float:
    """Linear warm-up to 1, then polynomial decay ``(1 - progress) ** power`` to 0."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - (step - warmup_steps) / span) ** power


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def _validate(model, data: SliceDataset, config: TrainingConfig, device) -> dict:
    import torch
    import torch.nn.functional as F

    from HRpQCTSegmentationEngine.losses import IGNORE_INDEX, ce_dice_loss
    from HRpQCTSegmentationEngine.metrics import confusion_matrix, iou_from_confusion

    model.eval()
    n = len(data)
    chosen = _slice_indices(n, config.validation_slices)
    conf = np.zeros((len(NETWORK_CLASSES),) * 2, dtype=np.int64)
    losses = []
    with torch.inference_mode():
        for i in chosen:
            # scored on what segmenting feeds the network: the leg's window by default
            rows, cols = data.seen(int(i))
            image = data.images[i:i + 1][..., rows, cols]
            truth = data.labels[i:i + 1][..., rows, cols]
            x = _as_batch(image).to(device)
            y = torch.from_numpy(truth).long().to(device)
            logits = _forward_logits(model, x)
            losses.append(float(ce_dice_loss(logits, y)))
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear",
                                   align_corners=False)
            pred = logits.argmax(1).to(torch.uint8).cpu().numpy()
            known = truth != IGNORE_INDEX  # unannotated pixels are not scored
            conf += confusion_matrix(truth[known], pred[known], len(NETWORK_CLASSES))
    model.train()
    iou = iou_from_confusion(conf)
    foreground = [float(v) for v in iou[1:] if not math.isnan(v)]
    return {
        "val_loss": float(np.mean(losses)),
        "val_iou": {c.key: float(iou[c.label]) for c in NETWORK_CLASSES},
        "val_mean_iou": float(np.mean(foreground)) if foreground else float("nan"),
    }


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------
def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict:
    import torch

    # weights_only=True: tensors and plain containers only, no arbitrary code on load.
    return torch.load(path, map_location="cpu", weights_only=True)


def train_segmenter(
    cases: Sequence[TrainingCase],
    output_dir: str | Path,
    *,
    config: TrainingConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    preprocessing=None,
    init_from: str | Path | None = None,
    device: str = "auto",
    max_steps: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    extra_provenance: dict | None = None,
) -> dict:
    """Train a segmenter and save the best weights to ``output_dir``.

    Parameters
    ----------
    cases:
        Labelled scans (see :func:`read_training_manifest`).
    output_dir:
        Folder receiving the best model (safetensors + configs + training history).
    config:
        Hyper-parameters; defaults are the documented CPU recipe.
    checkpoint_dir:
        Where the resumable training state goes (default ``output_dir/checkpoints``); keep it
        outside a git repository for long runs.
    resume:
        Continue from ``checkpoint_dir/last.pt`` if it exists.
    preprocessing:
        A :class:`.preprocessing.PreprocessingConfig`; default: the paper's.
    init_from:
        Optional folder of a 3-channel pretrained SegFormer checkpoint (HF format) whose
        patch embedding is adapted by averaging the RGB kernels, or a model folder of this
        project (fine-tuning: its weights, checksum verified, and its preprocessing; with
        fewer than three subjects validation holds out slices, see :func:`split_by_slices`).
        With ``config.slice_context`` larger than the model's own (a 2D model into a 2.5D
        one) its first patch embedding is inflated (:func:`.model.inflate_input_channels`);
        a smaller one is refused.
    max_steps:
        Stop after this many optimiser steps in this call (for time-boxed sessions); the
        schedule still spans ``epochs * steps_per_epoch``.
    extra_provenance:
        Recorded under ``training`` in the saved metadata and in the model card (e.g. the
        manifest and its hash).

    Returns
    -------
    dict
        Training history and the best validation metrics.
    """
    from HRpQCTSegmentationEngine import preprocessing as pp

    config = resolve_slice_context(config or TrainingConfig(), init_from)
    context = config.slice_context
    fine_tuning = is_model_folder(init_from)
    if fine_tuning:
        from HRpQCTSegmentationEngine.model import read_model_metadata

        parent = read_model_metadata(init_from)
        # refused before any scan is read, not after
        _refuse_fewer_neighbours(parent.slice_context, context,
                                 f"the model folder {Path(init_from).name}")
    if fine_tuning and preprocessing is None:  # the parent's preprocessing, not the paper's
        preprocessing = parent.preprocessing
    preprocessing = preprocessing or pp.PreprocessingConfig()
    # A fine-tune keeps its parent's voxel size: other scans are resampled to it.
    voxel_mm = parent.training_voxel_mm if fine_tuning else None
    load = partial(load_slices, preprocessing=preprocessing,
                   slices_per_scan=config.slices_per_scan, cancel=cancel,
                   slice_context=context, voxel_mm=voxel_mm)
    n_subjects = len({c.subject for c in cases})
    if fine_tuning and n_subjects < 3:
        # One or two corrected scans: no subject can be spared for validation.
        data = load(cases, progress=progress)
        train_data, val_data = split_by_slices(data, config.validation_fraction, config.seed)
        validation = (f"held-out slices of the same {len(cases)} scan(s) ({len(val_data)} "
                      "slices): optimistic, not an independent subject")
    else:
        train_cases, val_cases = split_by_subject(cases, config.validation_fraction,
                                                  config.seed)
        log.info("Training on %d scans (%d subjects), validating on %d scans (%d subjects)",
                 len(train_cases), len({c.subject for c in train_cases}), len(val_cases),
                 len({c.subject for c in val_cases}))
        train_data = load(train_cases, progress=progress)
        val_data = load(val_cases)
        validation = (f"{len({c.subject for c in val_cases})} held-out subject(s) never seen "
                      "in training")
    provenance = {"validation": validation, "n_scans": len(cases),
                  "n_subjects": n_subjects, "n_train_slices": len(train_data),
                  "training_voxel_mm": training_voxel_mm(train_data, val_data)}
    if any(c.slices is not None for c in cases):
        provenance["annotated_slices"] = {
            str(c.label_path.name): format_slice_list(c.slices) for c in cases
            if c.slices is not None}
    return fit(train_data, val_data, output_dir, config=config, checkpoint_dir=checkpoint_dir,
               resume=resume, preprocessing=preprocessing, init_from=init_from, device=device,
               max_steps=max_steps, progress=progress, cancel=cancel,
               provenance={**provenance, **(extra_provenance or {})})


def fit(
    train_data: SliceDataset,
    val_data: SliceDataset,
    output_dir: str | Path,
    *,
    config: TrainingConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    preprocessing=None,
    init_from: str | Path | None = None,
    device: str = "auto",
    max_steps: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    provenance: dict | None = None,
) -> dict:
    """The training loop on preprocessed slices (see :func:`train_segmenter`)."""
    import torch

    from HRpQCTSegmentationEngine import model as model_lib
    from HRpQCTSegmentationEngine import preprocessing as pp
    from HRpQCTSegmentationEngine.losses import ce_dice_loss

    config = resolve_slice_context(config or TrainingConfig(), init_from)
    _check_data_context(config.slice_context, train_data, val_data)
    preprocessing = preprocessing or pp.PreprocessingConfig()
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output_dir / "checkpoints"
    dev = model_lib.resolve_device(device)
    torch.manual_seed(config.seed)

    model, inflation = _build(config, init_from)
    model = model.to(dev)
    model.train()
    provenance = dict(provenance or {})
    if provenance.get("training_voxel_mm") is None:
        provenance["training_voxel_mm"] = training_voxel_mm(train_data, val_data)
    provenance["trained_parts"] = freeze_encoder_stages(
        model, config.freeze_stages, train_input_kernel=inflation is not None)
    if inflation is not None:
        provenance["slice_context_init"] = inflation
    if is_model_folder(init_from):
        provenance["parent"] = parent_description(init_from)
    optimizer = _optimizer(model, config)
    total_steps = config.epochs * config.steps_per_epoch
    step, history, best = 0, [], {"val_mean_iou": -1.0}
    last = checkpoint_dir / "last.pt"
    if resume and last.is_file():
        state = _load_checkpoint(last)
        # from_dict fills settings added since the checkpoint with their defaults
        if resolve_slice_context(TrainingConfig.from_dict(state["config"]), init_from) != config:
            raise HRpQCTError(
                f"Checkpoint {last} was written with other training settings; resume with the "
                "same settings or start a new checkpoint folder.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), json.loads(state["history"])
        best = json.loads(state["best"])
        provenance.update(json.loads(state.get("provenance", "{}")))
        log.info("Resumed from %s at step %d of %d", last, step, total_steps)
    elif "parent" in provenance:
        # the parent's score on this validation set: what fine-tuning has to beat
        provenance["validation_before"] = _validate(model, val_data, config, dev)

    def checkpoint() -> None:
        _save_checkpoint(last, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "config": config.to_dict(), "history": json.dumps(history),
            "best": json.dumps(best), "provenance": json.dumps(provenance, default=str)})

    steps_this_call, stopped_early = 0, False
    running, t0 = [], time.perf_counter()
    while step < total_steps and not stopped_early:
        check(cancel)
        if max_steps is not None and steps_this_call >= max_steps:
            break
        factor = lr_factor(step, total_steps, config.warmup_steps, config.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        rng = np.random.default_rng([config.seed, step])
        torch.manual_seed(config.seed * 1_000_003 + step)
        x, y = _sample_batch(train_data, config, rng)
        logits = _forward_logits(model, x.to(dev))
        loss = ce_dice_loss(logits, y.to(dev))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(float(loss.detach()))
        step += 1
        steps_this_call += 1
        report(progress, step, total_steps, "training")
        if step % config.steps_per_epoch == 0 or step == total_steps:
            metrics = _validate(model, val_data, config, dev)
            entry = {"step": step, "epoch": step / config.steps_per_epoch,
                     "train_loss": float(np.mean(running)),
                     "seconds": time.perf_counter() - t0, **metrics}
            history.append(entry)
            running, t0 = [], time.perf_counter()
            log.info("epoch %.1f  train loss %.4f  val loss %.4f  val mIoU %.4f",
                     entry["epoch"], entry["train_loss"], metrics["val_loss"],
                     metrics["val_mean_iou"])
            if metrics["val_mean_iou"] > best["val_mean_iou"]:
                best = {"step": step, **metrics}
                _save_final(model, output_dir, config, preprocessing, history, best, model_lib,
                            provenance)
            stopped_early = _should_stop(history, best, config.early_stop_patience)
            if stopped_early:
                log.info("Early stop at step %d: %d validations without a better mean IoU",
                         step, config.early_stop_patience)
            checkpoint()
        elif step % config.checkpoint_every == 0:
            checkpoint()
    if steps_this_call:
        checkpoint()
    stopped_early = stopped_early or _should_stop(history, best, config.early_stop_patience)
    if "parent" in provenance and steps_this_call:
        _finish_metadata(output_dir, step, history, stopped_early)
    return {"step": step, "total_steps": total_steps, "history": history, "best": best,
            "finished": step >= total_steps or stopped_early, "stopped_early": stopped_early,
            "validation_before": provenance.get("validation_before")}


def _check_data_context(slice_context: int, *datasets: SliceDataset) -> None:
    """Refuse slices stored with another number of neighbours than the model takes."""
    for data in datasets:
        if data.slice_context != slice_context:
            raise HRpQCTError(
                f"The training slices carry slice context {data.slice_context} but the model "
                f"is trained with slice context {slice_context}; load them with "
                f"load_slices(..., slice_context={slice_context}).")


def _finish_metadata(output_dir: Path, step: int, history: list[dict],
                     stopped_early: bool) -> None:
    """Record the whole run (not only up to the best step) in a fine-tuned folder's metadata
    and card; the weights, and so their checksum, stay those of the best step."""
    from HRpQCTCore.atomic import write_text_atomic
    from HRpQCTSegmentationEngine.model import METADATA_FILE
    from HRpQCTSegmentationEngine.model_card import write_model_card

    path = output_dir / METADATA_FILE
    if not path.is_file():
        return  # no validation improved on nothing yet: no model saved
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["training"].update({"history": history, "steps_run": step,
                             "stopped_early": stopped_early})
    write_text_atomic(path, json.dumps(meta, indent=2, default=str) + "\n")
    write_model_card(output_dir)


def _should_stop(history: list[dict], best: dict, patience: int) -> bool:
    """Whether the last ``patience`` validations all came after the best one."""
    if patience <= 0 or not history or "step" not in best:
        return False
    return sum(1 for h in history if h["step"] > best["step"]) >= patience


def parent_description(folder: str | Path) -> dict:
    """Name, weights checksum and lineage of a model folder, for its children's provenance."""
    from HRpQCTSegmentationEngine.model_card import model_identity

    identity = model_identity(folder)
    return {k: identity[k] for k in ("name", "weights_sha256", "parent", "synthetic_caveat")}


def _save_final(model, output_dir: Path, config: TrainingConfig, preprocessing, history,
                best, model_lib, provenance: dict | None = None) -> None:
    from HRpQCTSegmentationEngine.model_card import lineage_metadata, write_model_card

    provenance = dict(provenance or {})
    voxel_mm = provenance.pop("training_voxel_mm", None)  # top level, not under training
    training = {
        "training_config": config.to_dict(),
        "best_validation": best,
        "history": history,
    }
    extra: dict = {"training": training}
    training.update(provenance)
    training["steps_run"] = history[-1]["step"] if history else 0
    if "parent" in provenance:  # a fine-tuned model: its name, parent and caveat on top
        extra.update(lineage_metadata(output_dir, provenance))
    cfg = replace(preprocessing) if hasattr(preprocessing, "__dataclass_fields__") else None
    model_lib.save_model(model, output_dir, extra_metadata=extra, preprocessing=cfg,
                         training_voxel_mm=voxel_mm)
    if "parent" in provenance:
        write_model_card(output_dir)
