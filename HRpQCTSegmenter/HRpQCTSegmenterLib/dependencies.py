"""What the HR-pQCT Segmenter module needs installed: the one declaration of its packages.

The module runs ``hrpqct segment`` in Slicer's Python, so this lists what that command
imports for the user's choices, besides what Slicer ships:

* the bundled model (or a model folder with its own ONNX graph) on the CPU: ONNX Runtime,
  one small wheel -- no PyTorch;
* a GPU, or a model folder without an ONNX graph: PyTorch (through Slicer's PyTorch
  extension, which picks the build for the GPU), transformers and safetensors.

numpy, scipy and SimpleITK come with Slicer; they are listed (installer ``slicer``) so their
versions are checked too. The Slicer-like CI run installs only what this declares, then
segments the sample scan: a package the command imports but this list forgets fails there.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

from HRpQCTCore.background.dependencies import PYTORCH, SLICER_PACKAGES, Dependency
from HRpQCTSegmenterLib.parameters import MODEL_METADATA_FILE, SegmenterParameters

__all__ = [
    "ONNX_PACKAGES",
    "TORCH_PACKAGES",
    "SEGMENTER_DEPENDENCIES",
    "FINE_TUNING_DEPENDENCIES",
    "folder_has_onnx_graph",
    "needs_torch",
    "segmenter_dependencies",
]

#: Segmenting with an ONNX graph on the CPU (the bundled model ships one).
ONNX_PACKAGES: tuple[Dependency, ...] = (
    Dependency("onnxruntime", "onnxruntime>=1.17",
               alternatives=("onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon")),
)
#: Segmenting with PyTorch (a GPU, or a model folder without an ONNX graph).
TORCH_PACKAGES: tuple[Dependency, ...] = (
    Dependency("torch", "torch>=2.1", installer=PYTORCH),
    Dependency("transformers", "transformers>=4.40,<6"),
    Dependency("safetensors", "safetensors>=0.4"),
)
#: Every package the module may need, whatever the choices (for checks and the range test).
SEGMENTER_DEPENDENCIES: tuple[Dependency, ...] = SLICER_PACKAGES + ONNX_PACKAGES + TORCH_PACKAGES
#: Fine-tuning a model ("Improve the model": ``hrpqct train-segmenter``) always needs PyTorch.
FINE_TUNING_DEPENDENCIES: tuple[Dependency, ...] = SLICER_PACKAGES + TORCH_PACKAGES


def folder_has_onnx_graph(folder: str | Path) -> bool:
    """Whether a model folder lists an ONNX graph made from its weights, and holds it.

    Read from ``hrpqct_model.json`` without importing the engine (the engine checks the
    graph's checksum before use).
    """
    try:
        metadata = json.loads((Path(folder) / MODEL_METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    name = metadata.get("onnx_file") if isinstance(metadata, dict) else None
    return bool(name and metadata.get("onnx_sha256")
                and metadata.get("onnx_weights_sha256") == metadata.get("weights_sha256")
                and (Path(folder) / Path(str(name)).name).is_file())


def _torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _bundled_folder() -> Path | None:
    from HRpQCTCore.errors import ArtefactError
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder

    try:
        return resolve_model_folder(None)
    except ArtefactError:
        return None


def needs_torch(parameters: SegmenterParameters, *,
                torch_installed: Callable[[], bool] = _torch_installed) -> bool:
    """Whether ``hrpqct segment`` needs PyTorch for these choices.

    The GPU runs through torch; on the CPU an ONNX graph is enough: the bundled model's, or
    one in the user's folder. ``auto`` runs on the CPU when torch is not installed, but on
    the GPU when it is (torch from another extension): then transformers is needed too.
    """
    if parameters.device == "gpu" or (parameters.device == "auto" and torch_installed()):
        return True
    folder = Path(parameters.model_folder) if parameters.model == "folder" else _bundled_folder()
    return folder is None or not folder_has_onnx_graph(folder)


def segmenter_dependencies(parameters: SegmenterParameters | None = None, *,
                           torch_installed: Callable[[], bool] = _torch_installed
                           ) -> tuple[Dependency, ...]:
    """What the module installs before segmenting with ``parameters`` (default choices
    without torch installed: the bundled model on the CPU, so ONNX Runtime, no PyTorch)."""
    parameters = parameters or SegmenterParameters()
    torch = needs_torch(parameters, torch_installed=torch_installed)
    return SLICER_PACKAGES + (TORCH_PACKAGES if torch else ONNX_PACKAGES)
