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
* the weights with the best validation mean IoU are saved with :func:`.model.save_model`.
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
from pathlib import Path

import numpy as np

from HRpQCTCore.errors import HRpQCTError, InputFileError
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import NETWORK_CLASSES

log = logging.getLogger(__name__)

__all__ = [
    "AugmentationConfig",
    "TrainingConfig",
    "TrainingCase",
    "SliceDataset",
    "read_training_manifest",
    "split_by_subject",
    "load_slices",
    "train_segmenter",
    "fit",
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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        data = dict(data)
        aug = AugmentationConfig(**data.pop("augmentation", {}))
        return cls(**data, augmentation=aug)


@dataclass(frozen=True)
class TrainingCase:
    """One labelled scan: image volume, 5-class label volume and its subject."""

    subject: str
    image_path: Path
    label_path: Path


def read_training_manifest(path: str | Path) -> list[TrainingCase]:
    """Read a CSV with columns ``subject``, ``image`` and ``labels`` (paths relative to it).

    The phantom cohort's ``manifest.csv`` is accepted as well (``subject_id``, ``scan_path``,
    ``classes_path``).
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
            cases.append(TrainingCase(str(row[keys[0]]), image, labels))
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


@dataclass
class SliceDataset:
    """Preprocessed slices in memory: images float16 in [0, 1], labels uint8, same size."""

    images: np.ndarray  # [N, H, W] float16
    labels: np.ndarray  # [N, H, W] uint8
    subjects: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _slice_indices(n_slices: int, wanted: int) -> np.ndarray:
    if wanted <= 0 or wanted >= n_slices:
        return np.arange(n_slices)
    return np.unique(np.linspace(0, n_slices - 1, wanted).round().astype(int))


def load_slices(cases: Sequence[TrainingCase], preprocessing, slices_per_scan: int,
                progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None) -> SliceDataset:
    """Read cases and preprocess ``slices_per_scan`` evenly spaced slices of each.

    Labels are brought to the model's input grid with the same crop and nearest-neighbour
    resampling, so a label pixel sits exactly under the image pixel it annotates.
    """
    from HRpQCTCore.io import read_scan
    from HRpQCTSegmentationEngine import preprocessing as pp

    images, labels, subjects = [], [], []
    for i, case in enumerate(cases):
        check(cancel)
        scan = read_scan(case.image_path)
        label_scan = read_scan(case.label_path, units="hu")  # labels: integer values as read
        lab = np.asarray(label_scan.hu)
        if lab.shape != scan.hu.shape:
            raise InputFileError(
                f"Label volume {case.label_path} has shape {lab.shape} but image "
                f"{case.image_path} has {scan.hu.shape}: they must share one grid")
        if lab.min() < 0 or lab.max() >= len(NETWORK_CLASSES):
            raise InputFileError(
                f"Label volume {case.label_path} has values {lab.min()}..{lab.max()}; a "
                f"5-class label map has values 0..{len(NETWORK_CLASSES) - 1} "
                "(convert 7-region maps with regions.regions_to_classes)")
        box = pp.crop_box_for_scan(scan.hu, preprocessing)
        for z in _slice_indices(scan.n_slices, slices_per_scan):
            images.append(pp.preprocess_slice(scan.hu[z], box, preprocessing).astype(np.float16))
            labels.append(pp.labels_to_model_grid(lab[z].astype(np.uint8), box, preprocessing))
            subjects.append(case.subject)
        report(progress, i + 1, len(cases), "loading training scans")
    return SliceDataset(np.stack(images), np.stack(labels), subjects)


# --------------------------------------------------------------------------------------
# Batches with augmentation
# --------------------------------------------------------------------------------------
def _sample_batch(data: SliceDataset, config: TrainingConfig, rng: np.random.Generator):
    """Draw ``batch_size`` augmented patches: returns torch tensors (images, labels)."""
    import torch
    import torch.nn.functional as F

    aug = config.augmentation
    n, h, w = data.images.shape
    crop = config.crop_px
    idx = rng.integers(0, n, size=config.batch_size)
    images = torch.from_numpy(data.images[idx].astype(np.float32)).unsqueeze(1)
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
def _build(config: TrainingConfig, init_from: str | Path | None):
    from HRpQCTSegmentationEngine import model as model_lib
    from HRpQCTSegmentationEngine.unet import UNet, UNetConfig

    if config.architecture == "unet":
        return UNet(UNetConfig())
    if config.architecture != "segformer":
        raise HRpQCTError(f"Unknown architecture {config.architecture!r}: segformer or unet")
    if init_from is not None:
        return model_lib.load_pretrained_rgb_checkpoint(init_from)
    return model_lib.build_model(config.variant)


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

    from HRpQCTSegmentationEngine.losses import ce_dice_loss
    from HRpQCTSegmentationEngine.metrics import confusion_matrix, iou_from_confusion

    model.eval()
    n = len(data)
    chosen = _slice_indices(n, config.validation_slices)
    conf = np.zeros((len(NETWORK_CLASSES),) * 2, dtype=np.int64)
    losses = []
    with torch.inference_mode():
        for i in chosen:
            x = torch.from_numpy(data.images[i:i + 1].astype(np.float32)).unsqueeze(1).to(device)
            y = torch.from_numpy(data.labels[i:i + 1]).long().to(device)
            logits = _forward_logits(model, x)
            losses.append(float(ce_dice_loss(logits, y)))
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear",
                                   align_corners=False)
            pred = logits.argmax(1).to(torch.uint8).cpu().numpy()
            conf += confusion_matrix(data.labels[i:i + 1], pred, len(NETWORK_CLASSES))
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
        patch embedding is adapted by averaging the RGB kernels.
    max_steps:
        Stop after this many optimiser steps in this call (for time-boxed sessions); the
        schedule still spans ``epochs * steps_per_epoch``.

    Returns
    -------
    dict
        Training history and the best validation metrics.
    """
    from HRpQCTSegmentationEngine import preprocessing as pp

    config = config or TrainingConfig()
    preprocessing = preprocessing or pp.PreprocessingConfig()
    train_cases, val_cases = split_by_subject(cases, config.validation_fraction, config.seed)
    log.info("Training on %d scans (%d subjects), validating on %d scans (%d subjects)",
             len(train_cases), len({c.subject for c in train_cases}), len(val_cases),
             len({c.subject for c in val_cases}))
    train_data = load_slices(train_cases, preprocessing, config.slices_per_scan, progress, cancel)
    val_data = load_slices(val_cases, preprocessing, config.slices_per_scan, None, cancel)
    return fit(train_data, val_data, output_dir, config=config, checkpoint_dir=checkpoint_dir,
               resume=resume, preprocessing=preprocessing, init_from=init_from, device=device,
               max_steps=max_steps, progress=progress, cancel=cancel)


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
) -> dict:
    """The training loop on preprocessed slices (see :func:`train_segmenter`)."""
    import torch

    from HRpQCTSegmentationEngine import model as model_lib
    from HRpQCTSegmentationEngine import preprocessing as pp
    from HRpQCTSegmentationEngine.losses import ce_dice_loss

    config = config or TrainingConfig()
    preprocessing = preprocessing or pp.PreprocessingConfig()
    output_dir = Path(output_dir)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else output_dir / "checkpoints"
    dev = model_lib.resolve_device(device)
    torch.manual_seed(config.seed)

    model = _build(config, init_from).to(dev)
    model.train()
    optimizer = _optimizer(model, config)
    total_steps = config.epochs * config.steps_per_epoch
    step, history, best = 0, [], {"val_mean_iou": -1.0}
    last = checkpoint_dir / "last.pt"
    if resume and last.is_file():
        state = _load_checkpoint(last)
        if state["config"] != config.to_dict():
            raise HRpQCTError(
                f"Checkpoint {last} was written with other training settings; resume with the "
                "same settings or start a new checkpoint folder.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = int(state["step"]), json.loads(state["history"])
        best = json.loads(state["best"])
        log.info("Resumed from %s at step %d of %d", last, step, total_steps)

    def checkpoint() -> None:
        _save_checkpoint(last, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
            "config": config.to_dict(), "history": json.dumps(history),
            "best": json.dumps(best)})

    steps_this_call = 0
    running, t0 = [], time.perf_counter()
    while step < total_steps:
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
                _save_final(model, output_dir, config, preprocessing, history, best, model_lib)
            checkpoint()
        elif step % config.checkpoint_every == 0:
            checkpoint()
    if steps_this_call:
        checkpoint()
    return {"step": step, "total_steps": total_steps, "history": history, "best": best,
            "finished": step >= total_steps}


def _save_final(model, output_dir: Path, config: TrainingConfig, preprocessing, history,
                best, model_lib) -> None:
    provenance = {
        "training_config": config.to_dict(),
        "best_validation": best,
        "history": history,
    }
    cfg = replace(preprocessing) if hasattr(preprocessing, "__dataclass_fields__") else None
    model_lib.save_model(model, output_dir, extra_metadata={"training": provenance},
                         preprocessing=cfg)
