"""Radiomics settings: one YAML parameter file is the single source of the feature set.

A settings file is a pyradiomics parameter file (sections ``setting``, ``imageType``,
``featureClass``) plus an ``hrpqct`` section that only this package reads:

``name``
    Short name written into outputs and saved classifiers.
``description``
    One line for humans.
``sliceGeometry``
    How a slice is given to pyradiomics in per-slice mode: ``volume`` (a one-slice 3D volume
    with ``force2D``; the paper's 939-feature form) or ``image2d`` (a true 2D image; needed for
    LoG to run on a single slice).

Two presets ship in ``resources/``: :data:`PRESETS` ``"paper"`` (default, 939 features) and
``"complete"`` (1311 features: LoG and LBP-2D contribute). Any other YAML file with the same
layout can be used instead; its SHA256 is recorded in outputs and saved classifiers.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from HRpQCTCore.errors import HRpQCTError, InputFileError

__all__ = [
    "PRESETS",
    "DEFAULT_PRESET",
    "RadiomicsSettings",
    "load_settings",
    "preset_path",
    "settings_for_mode",
]

#: Preset name -> file in ``HRpQCTRadiomicsEngine/resources``.
PRESETS: dict[str, str] = {
    "paper": "hrpqct_radiomics_paper.yaml",
    "complete": "hrpqct_radiomics_complete.yaml",
}
DEFAULT_PRESET = "paper"

_SLICE_GEOMETRIES = ("volume", "image2d")
_PYRADIOMICS_SECTIONS = ("setting", "imageType", "featureClass", "voxelSetting")


@dataclass(frozen=True)
class RadiomicsSettings:
    """A parsed settings file.

    Attributes
    ----------
    name:
        Preset or file name (``hrpqct.name``, else the file stem).
    description:
        One-line description.
    slice_geometry:
        ``"volume"`` or ``"image2d"`` (see module docstring).
    params:
        The pyradiomics part (``setting``, ``imageType``, ``featureClass``) as a plain dict,
        ready for ``RadiomicsFeatureExtractor(params)``.
    text:
        The file's full text (recorded with results).
    sha256:
        SHA256 of ``text`` encoded as UTF-8.
    source:
        Where the settings came from (preset name or path).
    """

    name: str
    description: str
    slice_geometry: str
    params: dict[str, Any]
    text: str
    sha256: str
    source: str

    @property
    def image_types(self) -> dict[str, dict[str, Any]]:
        """Enabled image types with their custom settings (pyradiomics ``imageType``)."""
        return self.params.get("imageType") or {"Original": {}}

    @property
    def feature_classes(self) -> dict[str, list[str] | None]:
        """Enabled feature classes; an empty list or None means all of the class's features."""
        return self.params.get("featureClass") or {}

    def provenance(self) -> dict[str, Any]:
        """Name, source and hash, for CSV headers and saved classifiers."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256,
                "slice_geometry": self.slice_geometry}


def preset_path(name: str) -> Path:
    """Path of the bundled preset ``name`` (``"paper"`` or ``"complete"``)."""
    try:
        file_name = PRESETS[name]
    except KeyError:
        raise HRpQCTError(
            f"Unknown radiomics preset {name!r}: use one of {', '.join(PRESETS)}, or give the "
            "path of a YAML parameter file.") from None
    return Path(str(resources.files("HRpQCTRadiomicsEngine") / "resources" / file_name))


def _validate_pyradiomics(params: dict[str, Any], source: str) -> None:
    """Let pyradiomics' own schema check the parameter sections (clear error if invalid)."""
    import logging

    from radiomics import featureextractor

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    try:
        featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
    except Exception as exc:  # pykwalify raises its own error types
        raise HRpQCTError(
            f"The radiomics parameter file {source} is not valid for pyradiomics: {exc}. "
            "Start from a bundled preset (hrpqct_radiomics_paper.yaml) and change values "
            "only.") from None


def parse_settings(text: str, source: str, default_name: str) -> RadiomicsSettings:
    """Parse settings from YAML text (see :func:`load_settings`)."""
    import yaml

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise HRpQCTError(f"Radiomics parameter file {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise HRpQCTError(f"Radiomics parameter file {source} must hold a mapping at top level.")
    own = data.pop("hrpqct", None) or {}
    unknown = sorted(set(data) - set(_PYRADIOMICS_SECTIONS))
    if unknown:
        raise HRpQCTError(
            f"Radiomics parameter file {source} has unknown sections {unknown}; allowed: "
            f"hrpqct, {', '.join(_PYRADIOMICS_SECTIONS)}.")
    geometry = str(own.get("sliceGeometry", "volume"))
    if geometry not in _SLICE_GEOMETRIES:
        raise HRpQCTError(
            f"hrpqct.sliceGeometry in {source} is {geometry!r}; use 'volume' or 'image2d'.")
    _validate_pyradiomics(data, source)
    return RadiomicsSettings(
        name=str(own.get("name", default_name)),
        description=" ".join(str(own.get("description", "")).split()),
        slice_geometry=geometry,
        params=data,
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        source=source,
    )


def load_settings(preset_or_path: str | Path | RadiomicsSettings = DEFAULT_PRESET
                  ) -> RadiomicsSettings:
    """Load a bundled preset by name or a YAML parameter file by path.

    Raises
    ------
    InputFileError
        If a path is given and does not exist.
    HRpQCTError
        If the preset is unknown or the file is not a valid parameter file.
    """
    if isinstance(preset_or_path, RadiomicsSettings):
        return preset_or_path
    text_name = str(preset_or_path)
    if text_name in PRESETS:
        path = preset_path(text_name)
        return parse_settings(path.read_text(encoding="utf-8"), f"preset:{text_name}", text_name)
    path = Path(preset_or_path)
    if not path.is_file():
        raise InputFileError(
            f"Radiomics parameter file {path} does not exist. Give a preset name "
            f"({', '.join(PRESETS)}) or the path of a YAML file.")
    return parse_settings(path.read_text(encoding="utf-8"), str(path), path.stem)


def settings_for_mode(settings: RadiomicsSettings, mode: str) -> dict[str, Any]:
    """The pyradiomics parameter dict for an extraction mode.

    ``"slice"``: the file as written, except that for ``sliceGeometry: image2d`` ``force2D``
    is switched off (on a true 2D image ``force2D`` would reduce the wavelet to one axis).
    ``"scan"`` (3D): ``force2D`` off and ``shape2D`` replaced by the 3D ``shape`` class.
    """
    params = copy.deepcopy(settings.params)
    setting = params.setdefault("setting", {})
    if mode == "slice":
        if settings.slice_geometry == "image2d":
            setting["force2D"] = False
        return params
    if mode != "scan":
        raise ValueError(f"mode must be 'slice' or 'scan', got {mode!r}")
    setting["force2D"] = False
    classes = params.get("featureClass") or {}
    if "shape2D" in classes:
        classes = {("shape" if k == "shape2D" else k): v for k, v in classes.items()}
        if classes.get("shape"):
            classes["shape"] = None  # shape-2D feature names do not exist in 3D: take all
        params["featureClass"] = classes
    return params
