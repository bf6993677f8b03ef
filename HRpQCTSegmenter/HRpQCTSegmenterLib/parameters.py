"""The Segmenter module's choices, checked, and the ``hrpqct segment`` command line they give.

:class:`SegmenterParameters` is the one schema of the module's choices: each field also says
which parameter node attribute keeps it, with its choices or range
(:func:`~HRpQCTCore.parameter_schema.node_field`), so the module's parameter node wrapper is
generated from it and reads back into it (:meth:`SegmenterParameters.from_parameter_node`).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from HRpQCTCore.errors import ArtefactError, HRpQCTError
from HRpQCTCore.parameter_schema import node_field, values_from_node
from HRpQCTCore.scan import Calibration

__all__ = [
    "UNITS_CHOICES",
    "MODEL_CHOICES",
    "DEVICE_CHOICES",
    "CALIBRATED_UNITS",
    "CALIBRATION_RANGES",
    "MODEL_METADATA_FILE",
    "SegmenterParameters",
    "build_segment_command",
]

#: Input units the module offers (``auto``: from the volume's attributes or the value range).
UNITS_CHOICES = ("auto", "hu", "native", "density")
#: Model choices: the bundled model, or a folder written by ``hrpqct train-segmenter``.
MODEL_CHOICES = ("bundled", "folder")
#: Device choices shown to the user; ``gpu`` becomes ``cuda`` (``mps`` on macOS).
DEVICE_CHOICES = ("auto", "cpu", "gpu")
#: File in a model folder that marks it as written by the engine (see the segmentation model).
MODEL_METADATA_FILE = "hrpqct_model.json"

#: Units whose conversion to HU needs the scanner's calibration constants.
CALIBRATED_UNITS = ("native", "density")
#: Accepted range of each calibration constant (the panel's spin boxes use the same limits).
#: Wide on purpose: they catch typing slips (a zero, a sign), not unusual scanners.
CALIBRATION_RANGES: dict[str, tuple[float, float]] = {
    "mu_scaling": (1.0, 1.0e6),
    "mu_water": (1.0e-3, 10.0),
    "density_slope": (1.0e-3, 1.0e5),
    "density_intercept": (-1.0e5, 1.0e5),
}
#: The command-line option of each calibration constant (``HRpQCTCore.cli_options``).
_CALIBRATION_OPTIONS = {"mu_scaling": "--mu-scaling", "mu_water": "--mu-water",
                        "density_slope": "--density-slope",
                        "density_intercept": "--density-intercept"}
_DEFAULT_CALIBRATION = Calibration()


def _text_or_empty(value: Any) -> str:
    """An empty path widget gives None or "": both mean "no folder"."""
    return value or ""


@dataclass
class SegmenterParameters:
    """The user's choices for one segmentation run (the parameter node is generated from it).

    Attributes
    ----------
    units:
        Units of the input volume's voxels, one of :data:`UNITS_CHOICES`.
    model:
        ``"bundled"`` or ``"folder"`` (:data:`MODEL_CHOICES`).
    model_folder:
        The user's model folder when ``model == "folder"``.
    device:
        One of :data:`DEVICE_CHOICES`.
    mu_scaling, mu_water, density_slope, density_intercept:
        The scanner's calibration (see :class:`~HRpQCTCore.scan.Calibration`), used only
        when ``units`` is ``native`` or ``density`` (:data:`CALIBRATED_UNITS`). Defaults:
        Scanco XtremeCT II values, which the user should replace with those of the scan's
        header or the scanner's calibration report.
    """

    units: str = node_field("inputUnits", "auto", choices=UNITS_CHOICES)
    model: str = node_field("model", "bundled", choices=MODEL_CHOICES)
    model_folder: str = node_field("modelFolder", "", from_node=_text_or_empty)
    device: str = node_field("device", "auto", choices=DEVICE_CHOICES)
    mu_scaling: float = node_field("muScaling", _DEFAULT_CALIBRATION.mu_scaling,
                                   value_range=CALIBRATION_RANGES["mu_scaling"])
    mu_water: float = node_field("muWater", _DEFAULT_CALIBRATION.mu_water,
                                 value_range=CALIBRATION_RANGES["mu_water"])
    density_slope: float = node_field("densitySlope", _DEFAULT_CALIBRATION.density_slope,
                                      value_range=CALIBRATION_RANGES["density_slope"])
    density_intercept: float = node_field("densityIntercept",
                                          _DEFAULT_CALIBRATION.density_intercept,
                                          value_range=CALIBRATION_RANGES["density_intercept"])
    #: Segment even a scan the plausibility check refuses as not a distal tibia/fibula
    #: HR-pQCT scan (``hrpqct segment --accept-unusual-scan``); the result is flagged.
    accept_unusual_scan: bool = node_field("acceptUnusualScan", False)

    @classmethod
    def from_parameter_node(cls, parameter_node: Any) -> SegmenterParameters:
        """The choices held by the module's parameter node; works with any object having
        the node attributes named in the fields."""
        return cls(**values_from_node(cls, parameter_node))

    @property
    def needs_calibration(self) -> bool:
        """Whether the units need the calibration constants to be converted to HU."""
        return self.units in CALIBRATED_UNITS

    def calibration(self) -> Calibration | None:
        """The user's calibration when the units need one, else None.

        Raises
        ------
        HRpQCTError
            When a constant is out of :data:`CALIBRATION_RANGES` or not a number.
        """
        if not self.needs_calibration:
            return None
        found = self._calibration_problems()
        if found:
            raise HRpQCTError(" ".join(found))
        return Calibration(**{name: float(getattr(self, name)) for name in CALIBRATION_RANGES},
                           source="user")

    def _calibration_problems(self) -> list[str]:
        found = []
        for name, (low, high) in CALIBRATION_RANGES.items():
            value = getattr(self, name)
            try:
                ok = math.isfinite(float(value)) and low <= float(value) <= high
            except (TypeError, ValueError):
                ok = False
            if not ok:
                found.append(f"Calibration {name} = {value!r} is outside {low:g}..{high:g}: "
                             "enter the value from the scan's header or the scanner's "
                             "calibration report.")
        return found

    def _model_problems(self) -> list[str]:
        if self.model not in MODEL_CHOICES:
            return [f"Unknown model choice {self.model!r}: choose bundled or folder."]
        if self.model != "folder":
            return []
        folder = Path(self.model_folder) if self.model_folder else None
        if folder is None:
            return ["Choose the folder holding your trained model, or select the bundled "
                    "model."]
        if not folder.is_dir():
            return [f"Model folder {folder} does not exist: choose a folder written by "
                    "'hrpqct train-segmenter'."]
        if not (folder / MODEL_METADATA_FILE).is_file():
            return [f"{folder} has no {MODEL_METADATA_FILE}, so it is not a model folder "
                    "written by 'hrpqct train-segmenter': choose that folder."]
        return []

    def problems(self) -> list[str]:
        """What is wrong with the choices, each with what to do (empty when valid)."""
        found = []
        if self.units not in UNITS_CHOICES:
            found.append(f"Unknown input units {self.units!r}: choose one of "
                         f"{', '.join(UNITS_CHOICES)}.")
        elif self.needs_calibration:
            found += self._calibration_problems()
        found += self._model_problems()
        if self.device not in DEVICE_CHOICES:
            found.append(f"Unknown device {self.device!r}: choose auto, cpu or gpu.")
        return found

    def validate(self) -> None:
        """Raise :class:`~HRpQCTCore.errors.HRpQCTError` listing every problem, if any."""
        found = self.problems()
        if found:
            error = ArtefactError if any("model" in p.lower() for p in found) else HRpQCTError
            raise error(" ".join(found))

    def device_argument(self, platform: str = sys.platform) -> str:
        """The ``--device`` value for the command line."""
        if self.device == "gpu":
            return "mps" if platform == "darwin" else "cuda"
        return self.device


def build_segment_command(python: str | os.PathLike, input_path: str | os.PathLike,
                          output_path: str | os.PathLike, parameters: SegmenterParameters,
                          *, qc_json: str | os.PathLike | None = None) -> list[str]:
    """The ``hrpqct segment`` command line run in the background process.

    Parameters
    ----------
    python:
        Interpreter with the engine's dependencies (Slicer's ``PythonSlicer``).
    input_path:
        The input volume written by the module (NRRD).
    output_path:
        Where the command writes the 7-region ``.seg.nrrd``.
    parameters:
        The user's choices (validated here). With native or density units the four
        calibration constants are passed on (``--mu-scaling=8192.0`` ...), written so they
        read back exactly.
    qc_json:
        Optional per-slice confidence report.
    """
    parameters.validate()
    command = [str(python), "-m", "HRpQCTPipeline", "segment", str(input_path),
               str(output_path), "--progress", "machine", "--units", parameters.units,
               "--device", parameters.device_argument(), "--overwrite"]
    calibration = parameters.calibration()
    if calibration is not None:  # "--option=value": a negative intercept is no option name
        for name, option in _CALIBRATION_OPTIONS.items():
            command.append(f"{option}={float(getattr(calibration, name))!r}")
    if parameters.model == "folder":
        command += ["--model", str(parameters.model_folder)]
    if parameters.accept_unusual_scan:
        command.append("--accept-unusual-scan")
    if qc_json is not None:
        command += ["--qc-json", str(qc_json)]
    return command
