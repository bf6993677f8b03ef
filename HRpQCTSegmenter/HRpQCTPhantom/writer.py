"""Write a phantom beside its truth, in the formats real scans come in.

``<stem>.nii.gz`` (int16 HU), ``<stem>_classes.nii.gz`` and ``<stem>_regions.nii.gz`` (uint8
labels, same geometry) and ``<stem>_truth.json``. Every file is written to a temporary name in
the target folder and renamed, so a crash never leaves a half-written file under the final
name. Scanco AIM output is used when the engine's I/O package provides an AIM writer
(``HRpQCTCore.io.write_scan_aim``); SimpleITK itself writes no AIM.
"""

from __future__ import annotations

import json
from pathlib import Path

from HRpQCTCore.atomic import write_text_atomic
from HRpQCTCore.errors import HRpQCTError, UnsupportedFormatError
from HRpQCTCore.outputs import ensure_folder
from HRpQCTPhantom.generator import Phantom

__all__ = ["write_phantom", "phantom_paths", "FORMATS"]

FORMATS = ("nifti", "aim")


def _write_image(image, final: Path) -> None:
    from HRpQCTCore.io.writers import write_sitk_image

    # Level 1 deflate: 3-4x faster than the default for ~10 % larger files. Read back and
    # checked before the rename: a full disk raises OutputError, leaving nothing behind.
    write_sitk_image(image, final, compress=True, level=1)


def _write_json(data: dict, final: Path) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_text_atomic(final, text)


def phantom_paths(out_dir: str | Path, stem: str,
                  formats: tuple[str, ...] = ("nifti",)) -> dict[str, Path]:
    """The files :func:`write_phantom` writes, ``{kind: path}`` (nothing is written).

    Raises
    ------
    UnsupportedFormatError
        If a format is unknown.
    HRpQCTError
        If ``stem`` is not a plain file name.
    """
    from HRpQCTCore.outputs import plain_name

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UnsupportedFormatError(
            f"Unknown phantom output format(s) {unknown}; use any of {', '.join(FORMATS)}.")
    stem = plain_name(stem, "file name stem")
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    if "nifti" in formats:
        paths.update(scan=out / f"{stem}.nii.gz", classes=out / f"{stem}_classes.nii.gz",
                     regions=out / f"{stem}_regions.nii.gz")
    if "aim" in formats:
        paths["scan_aim"] = out / f"{stem}.aim"
    paths["truth"] = out / f"{stem}_truth.json"
    return paths


def refuse_existing(paths) -> None:
    """Refuse (before any work) when one of ``paths`` exists: nothing is replaced silently."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        raise HRpQCTError(
            f"Output already exists: {', '.join(existing)}. Choose another folder or "
            "--stem, or pass --overwrite to replace it.")


def write_phantom(phantom: Phantom, out_dir: str | Path, stem: str,
                  formats: tuple[str, ...] = ("nifti",), *,
                  overwrite: bool = True) -> dict[str, Path]:
    """Write a phantom's scan, labels and truth; return ``{kind: path}``.

    Kinds: ``scan``, ``classes``, ``regions``, ``truth`` (and ``scan_aim`` with ``"aim"``).
    ``overwrite=False`` refuses (before writing anything) when one of the files exists;
    the command line passes it unless ``--overwrite`` is given.

    Raises
    ------
    UnsupportedFormatError
        If a format is unknown, or ``"aim"`` is asked for but no AIM writer is installed.
    HRpQCTError
        If a file exists and ``overwrite`` is false.
    OutputError
        If a file cannot be written (nothing partial is left under its name).
    """
    planned = phantom_paths(out_dir, stem, formats)
    if not overwrite:
        refuse_existing(planned.values())
    ensure_folder(out_dir)
    paths: dict[str, Path] = {}
    scan = phantom.scan
    if "nifti" in formats:
        paths["scan"] = planned["scan"]
        _write_image(scan.to_sitk(), paths["scan"])
        paths["classes"] = planned["classes"]
        _write_image(scan.to_sitk(phantom.classes), paths["classes"])
        paths["regions"] = planned["regions"]
        _write_image(scan.to_sitk(phantom.regions), paths["regions"])
    if "aim" in formats:
        try:
            from HRpQCTCore.io import write_scan_aim  # type: ignore[attr-defined]
        except ImportError:
            raise UnsupportedFormatError(
                "AIM output needs HRpQCTCore.io.write_scan_aim, which this install "
                "does not have; write NIfTI instead (formats=('nifti',)).") from None
        paths["scan_aim"] = planned["scan_aim"]
        write_scan_aim(scan, paths["scan_aim"])
    paths["truth"] = planned["truth"]
    truth = dict(phantom.truth)
    truth["files"] = {k: p.name for k, p in paths.items() if k != "truth"}
    _write_json(truth, paths["truth"])
    return paths
