"""Which model made a result: a model folder's identity, lineage and generated model card.

A fine-tuned folder records, in ``hrpqct_model.json``, its ``name``, its ``parent`` (name and
weights SHA256, and the parent's own parent), whether the synthetic-phantom caveat applies
(``synthetic_caveat``: inherited from a parent trained on phantoms only) and, under
``training``, the manifest and its hash, the steps, learning rate, trained parts and the
validation scores before and after. :func:`write_model_card` turns that into ``MODEL_CARD.md``
beside the weights; :func:`model_identity` is what ``hrpqct info --model`` and the QC outputs
show.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["MODEL_CARD_FILE", "identity_for_qc", "is_bundled_weights", "lineage_metadata",
           "model_identity", "slice_context_text",
           "write_model_card"]

MODEL_CARD_FILE = "MODEL_CARD.md"


def is_bundled_weights(weights_sha256: str) -> bool:
    """Whether these weights are the bundled (synthetic-phantom) model's."""
    from HRpQCTCore.artefacts import list_artefacts
    from HRpQCTSegmentationEngine.bundled import BUNDLED_MODEL

    return any(a.name == f"{BUNDLED_MODEL}:weights" and a.sha256 == weights_sha256
               for a in list_artefacts())


def _synthetic_caveat(metadata_extra: dict, weights_sha256: str) -> bool:
    """The bundled model, and every model descended from it, carry the phantom caveat."""
    recorded = metadata_extra.get("synthetic_caveat")
    return bool(recorded) if recorded is not None else is_bundled_weights(weights_sha256)


def model_identity(folder: str | Path) -> dict[str, Any]:
    """Name, weights SHA256, parent and caveat of a model folder (metadata read, not weights).

    Parameters
    ----------
    folder:
        A model folder (bundled or from ``hrpqct train-segmenter``).
    """
    from HRpQCTSegmentationEngine.model import read_model_metadata

    folder = Path(folder)
    meta = read_model_metadata(folder)
    parent = meta.extra.get("parent")
    return {
        "name": str(meta.extra.get("name") or folder.resolve().name),
        "folder": str(folder),
        "architecture": meta.architecture,
        "variant": meta.variant,
        "weights_sha256": meta.weights_sha256,
        "parent": parent,
        "synthetic_caveat": _synthetic_caveat(meta.extra, meta.weights_sha256),
        "saved_utc": meta.extra.get("saved_utc"),
        "slice_context": meta.slice_context,
        "num_channels": meta.num_channels,
        "input": slice_context_text(meta.slice_context),
    }


def slice_context_text(slice_context: int) -> str:
    """What the network sees per slice, in words (``hrpqct info --model``, the card)."""
    if not slice_context:
        return "one slice (2D, slice context 0)"
    k = int(slice_context)
    neighbours = "z-1, z, z+1" if k == 1 else f"z-{k} .. z+{k}"
    return (f"each slice with {k} neighbour slice(s) on each side ({neighbours}: "
            f"{2 * k + 1} channels, 2.5D, slice context {k}; the edge slice repeated at the "
            "scan's ends)")


def lineage_metadata(output_dir: str | Path, provenance: dict) -> dict[str, Any]:
    """Top-level metadata keys of a fine-tuned folder: its name, parent and caveat."""
    parent = provenance.get("parent") or {}
    lineage: dict[str, Any] = {"name": Path(output_dir).resolve().name}
    if parent:
        lineage["parent"] = {k: parent.get(k) for k in ("name", "weights_sha256", "parent")}
        lineage["synthetic_caveat"] = bool(parent.get("synthetic_caveat"))
    return lineage


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{100 * float(value):.1f} %"


def _score_rows(before: dict | None, after: dict | None) -> list[str]:
    rows = ["| class | before fine-tuning | after |", "|---|---|---|"]
    keys = list(((after or before) or {}).get("val_iou", {}))
    for key in keys:
        rows.append(f"| {key} | {_pct((before or {}).get('val_iou', {}).get(key))} | "
                    f"{_pct((after or {}).get('val_iou', {}).get(key))} |")
    rows.append(f"| **mean (foreground)** | {_pct((before or {}).get('val_mean_iou'))} | "
                f"{_pct((after or {}).get('val_mean_iou'))} |")
    return rows


def _voxel_line(voxel_mm: Any) -> str:
    if voxel_mm is None:
        return ("training voxel size: not recorded (unknown), so scans are segmented at "
                "their own voxel size, not resampled")
    return (f"training voxel size: {float(voxel_mm):.4f} mm in-plane (`training_voxel_mm`); "
            "scans more than 2 % off are resampled to it slice by slice, and the labels "
            "back to the scan's grid")


def model_card_text(metadata: dict) -> str:
    """The Markdown model card of a fine-tuned model, from its ``hrpqct_model.json``."""
    training = metadata.get("training", {})
    config = training.get("training_config", {})
    parent = metadata.get("parent") or {}
    best = training.get("best_validation", {})
    name = metadata.get("name", "model")
    manifest = training.get("manifest") or "an unnamed manifest"
    lines = [f"# Model card: `{name}`", ""]
    if metadata.get("synthetic_caveat"):
        lines += ["**Research software. Fine-tuned from a model trained on synthetic phantoms "
                  "only; a few corrected scans do not validate it. Not for clinical use.**", ""]
    else:
        lines += ["**Research software. Not for clinical use.**", ""]
    lines += [
        "## Where it comes from", "",
        f"- parent model: `{parent.get('name')}` (weights SHA256 "
        f"`{parent.get('weights_sha256')}`)",
        f"- trained on {training.get('n_scans', '?')} scans "
        f"({training.get('n_subjects', '?')} subjects, {training.get('n_train_slices', '?')} "
        f"training slices) from `{manifest}` (SHA256 `{training.get('manifest_sha256')}`)",
        f"- annotated slices: {training.get('annotated_slices') or 'every slice'}",
        f"- network input: {slice_context_text(metadata.get('slice_context', 0))}"
        + (f"; {training['slice_context_init']}" if training.get("slice_context_init") else ""),
        f"- {_voxel_line(metadata.get('training_voxel_mm'))}",
        f"- steps: best at step {best.get('step', '?')} of {training.get('steps_run', '?')} "
        f"run ({config.get('epochs', 0) * config.get('steps_per_epoch', 0)} planned), batch "
        f"{config.get('batch_size')} of {config.get('crop_px')} px patches",
        f"- learning rate {config.get('learning_rate')} (decode head x "
        f"{config.get('head_lr_multiplier')}), warm-up {config.get('warmup_steps')} steps, "
        "then polynomial decay",
        f"- trained: {', '.join(training.get('trained_parts', [])) or '?'}; frozen: the first "
        f"{config.get('freeze_stages', 0)} encoder stage(s)",
        f"- validation: {training.get('validation', '?')}",
        f"- weights SHA256 `{metadata.get('weights_sha256')}` (checked by the loader)",
        "", "## Validation IoU (network classes)", "",
        *_score_rows(training.get("validation_before"), best),
        "", "Made by `hrpqct train-segmenter --init-from`; the full history is in "
        "`hrpqct_model.json`.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path) -> Path:
    """Write ``MODEL_CARD.md`` into a model folder from its metadata; returns the path."""
    import json

    from HRpQCTCore.atomic import write_text_atomic
    from HRpQCTSegmentationEngine.model import METADATA_FILE

    folder = Path(folder)
    metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    path = folder / MODEL_CARD_FILE
    write_text_atomic(path, model_card_text(metadata))
    return path


def identity_for_qc(folder: str | Path | None) -> dict[str, Any] | None:
    """The short identity a QC JSON or report records: name, weights SHA256, parent.

    None when there is no folder or its metadata cannot be read (the QC output must still be
    written; the segmentation itself would have failed on a broken folder).
    """
    if folder is None:
        return None
    from HRpQCTCore.errors import ArtefactError

    try:
        identity = model_identity(folder)
    except (ArtefactError, OSError, ValueError):
        return None
    parent = identity["parent"] or {}
    return {"name": identity["name"], "weights_sha256": identity["weights_sha256"],
            "parent": parent.get("name"), "parent_weights_sha256": parent.get("weights_sha256"),
            "synthetic_caveat": identity["synthetic_caveat"]}
