"""Segmenting a whole scan with a trained network, slice batch by slice batch.

Memory stays bounded: the output is one ``uint8`` label volume; inputs are cropped, scaled and
resized one batch at a time, and the full-resolution class scores of one slice at a time are
reduced to labels at once (no per-class float volume), band by band and only where a label
can be other than background (:mod:`.fast_labels`: the reference's labels exactly, ~5x less
CPU time than upsampling the whole crop). A 168 x 1600 x 1600 scan needs its own HU array,
0.43 GB of labels and a few hundred MB of working memory.

Engines: ``"torch"`` (any device; with ``fast=True`` the decoder is folded exactly, see
:mod:`.fast`) and ``"onnx"`` (ONNX Runtime on the CPU, fastest there). ``"auto"`` (default)
uses ONNX Runtime for a SegFormer on the CPU when ``onnxruntime`` is installed and ``fast``
is set, else torch. For a model folder the graph is the folder's own (the bundled model
ships one), else one cached from an earlier export, else exported now (needs torch,
transformers and onnx) and cached: see :mod:`.onnx_graph`. With a graph at hand,
segmenting needs neither torch nor transformers: without torch, the pre- and
post-processing run in numpy (:func:`.preprocessing.preprocess_slices_numpy`,
:func:`.preprocessing.logits_to_labels_numpy`); with torch installed they stay torch's, so
results with torch are unchanged. If ONNX Runtime cannot be used, ``"auto"`` falls back to
torch with a warning. ``device="auto"`` picks CUDA, then Apple MPS, then the CPU (the CPU
when torch is not installed); if the GPU runs out of memory the run continues on the CPU
with a warning.

Voxel size: a model folder records the in-plane voxel size of its training data
(``training_voxel_mm`` in ``hrpqct_model.json``; the bundled model: 0.0607 mm, XtremeCT
II). When the caller gives the scan's voxel size (``spacing_mm``) and it differs from the
model's by more than :data:`VOXEL_TOLERANCE` (e.g. 0.082 mm, first-generation XtremeCT),
each slice is resampled to the model's voxel size before the network and the class scores
back to the scan's grid before the arg-max: the crop window is taken in the model's
millimetres (``crop_yx * training / scan`` scan voxels, 1184 for 82 um) and brought to the
network's input by the same antialiased bicubic resize as always, and the logits are
upsampled bilinearly to that window, so labels are on the scan's grid, the scan is never
copied and the working memory is that of one slice. The network sees what it was trained
on: the same field in mm, the same mm per input pixel. At the model's own voxel size
(within the tolerance) nothing changes, bit for bit. A folder without the field (older
models) is not resampled; that, like a resampling, is logged. Slices are not resampled
along z (a 2.5D model's neighbours are the scan's adjacent slices, whatever its slice
spacing).

Inter-slice context: a model folder whose ``hrpqct_model.json`` records ``slice_context`` k
(1: a 2.5D model, input z-1, z, z+1) gets each slice with its k neighbours on each side as
``2k + 1`` channels, the edge slice repeated at the scan's ends
(:func:`.preprocessing.neighbour_indices`); a model object says it by its input channels.
The neighbours are preprocessed like the slice (same crop box, voxel-size resampling
included) and still batch by batch: a slice preprocessed for one batch is kept for the next
batch's neighbours only, so memory stays that of a few batches of preprocessed slices and
the scan is never copied. A 2D model (k = 0) runs exactly the loop it always did.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.errors import ArtefactError, HRpQCTError, InvalidScanError
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import BACKGROUND
from HRpQCTSegmentationEngine.fast_labels import logits_to_labels_fast
from HRpQCTSegmentationEngine.onnx_graph import (
    SOURCE_EXPORTED,
    OnnxSession,
    onnxruntime_available,
    resolve_graph,
)
from HRpQCTSegmentationEngine.preprocessing import (
    CropBox,
    PreprocessingConfig,
    neighbour_indices,
    network_window,
    preprocess_slices,
    preprocess_slices_numpy,
    slice_context_of_channels,
    torch_available,
    validate_volume,
)
from HRpQCTSegmentationEngine.uncertainty import UncertaintyTracker

__all__ = [
    "SegmentationResult",
    "segment_volume",
    "run_segmentation",
    "prepare_segmenter",
    "ENGINES",
    "VOXEL_TOLERANCE",
    "model_grid",
]

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx")
DEFAULT_GPU_BATCH = 4
PROGRESS_STAGE = "segmenting slices"
#: Slices are resampled when the scan's in-plane voxel size differs from the model's
#: training voxel size by more than this fraction (2 %: 60.7 um scans stay untouched).
VOXEL_TOLERANCE = 0.02


@dataclass
class SegmentationResult:
    """Output of :func:`run_segmentation`.

    Attributes
    ----------
    labels:
        ``uint8`` ``[z, y, x]`` network-class labels (values of
        :data:`~HRpQCTCore.regions.NETWORK_CLASSES`), on the scan's grid.
    slice_confidence:
        Per slice, the mean over the low-resolution logit pixels inside the scan of the
        largest softmax probability (1 = certain). For quality control.
    slice_foreground_confidence:
        The same restricted to pixels not predicted as background (NaN if none): air is easy,
        so this is the more sensitive figure for the leg itself.
    crop_box:
        The window of every slice the network saw: the paper's crop window, narrowed to the
        leg unless the preprocessing's ``input_fit`` is ``"field"``
        (:func:`.preprocessing.network_window`).
    device:
        Where the network finally ran (``"cpu"`` after an out-of-memory fallback).
    engine:
        ``"torch"``, ``"torch-fast"`` or ``"onnx"``.
    seconds:
        Wall time of the run.
    slice_uncertainty:
        Per slice, the uncertainty signal of ``uncertainty_method`` (higher = less certain;
        see :mod:`.uncertainty`); None for ``"none"``.
    uncertainty_method:
        ``"none"``, ``"margin"`` or ``"flip"`` (:data:`.uncertainty.UNCERTAINTY_METHODS`).
    uncertainty_signals:
        Every candidate signal computed (name -> per-slice values), for benchmarks.
    voxel_resampling:
        What was done about the voxel size (:func:`model_grid`): ``scan_voxel_mm``,
        ``model_voxel_mm``, ``resampled`` and ``crop_yx`` (scan voxels per crop), and
        ``reason`` when not resampled.
    """

    labels: np.ndarray
    slice_confidence: np.ndarray
    slice_foreground_confidence: np.ndarray
    crop_box: CropBox
    device: str
    engine: str
    seconds: float
    slice_uncertainty: np.ndarray | None = None
    uncertainty_method: str = "none"
    uncertainty_signals: dict[str, np.ndarray] | None = None
    voxel_resampling: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------
# Model preparation and device handling
# ------------------------------------------------------------------------------------------
def _is_oom(exc: BaseException) -> bool:
    import torch

    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _move(tensor_or_module, device):
    """Move to ``device`` (one place, so GPU transfers can be simulated in tests)."""
    return tensor_or_module.to(device)


class _TorchRunner:
    """Calls a torch model on a device; falls back to the CPU when the GPU memory runs out."""

    #: In-plane voxel size (mm) of the model's training data; None: unknown.
    training_voxel_mm: float | None = None

    def __init__(self, model, device, engine: str) -> None:
        from HRpQCTSegmentationEngine.model import slice_context_of_model

        #: Neighbour slices on each side the model takes (from its input channels).
        self.slice_context = slice_context_of_model(model)
        self.model = _move(model, device)
        self.device = device
        self.engine = engine

    def __call__(self, batch):
        import torch

        try:
            return self._forward(batch)
        except Exception as exc:
            if self.device.type == "cpu" or not _is_oom(exc):
                raise
            log.warning("Out of %s memory (%s); continuing on the CPU (slower). Use a "
                        "smaller batch size to stay on the GPU.", self.device.type,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.device = torch.device("cpu")
            self.model = _move(self.model, self.device)
            return self._forward(batch)

    def _forward(self, batch):
        out = self.model(_move(batch, self.device))
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float()  # stays on the device: upsampling and arg-max run there too


class _OnnxRunner:
    """Calls an ONNX Runtime session; returns torch tensors where torch does the rest.

    ``backend`` says who pre- and post-processes: ``"torch"`` whenever torch is installed
    (so results are those of the torch engine's preprocessing), ``"numpy"`` without it.
    """

    #: In-plane voxel size (mm) of the model's training data; None: unknown.
    training_voxel_mm: float | None = None

    def __init__(self, segmenter, source: str = SOURCE_EXPORTED) -> None:
        self.segmenter = segmenter
        self.engine = "onnx"
        self.device = None
        self.source = source
        self.backend = "torch" if torch_available() else "numpy"
        channels = getattr(segmenter, "num_channels", None)
        #: Neighbour slices on each side the graph takes (from its input channels).
        self.slice_context = 0 if channels is None else slice_context_of_channels(channels)

    @property
    def fixed_input_yx(self) -> tuple[int, int] | None:
        """The only input size the graph takes; None if it takes any (current exports)."""
        fixed = getattr(self.segmenter, "input_yx", None)
        return None if fixed is None else tuple(int(v) for v in fixed)

    def __call__(self, batch):
        logits = self.segmenter.run(batch)
        if self.backend == "numpy":
            return logits
        import torch

        return torch.from_numpy(logits)


class _ExportUnavailableError(HRpQCTError):
    """Exporting a graph needs torch, transformers and onnx, and one is missing."""


def prepare_segmenter(model_or_folder: Any, *, config: PreprocessingConfig | None = None,
                      device: str | Any = "auto", fast: bool = True, engine: str = "auto",
                      num_threads: int | None = None):
    """Resolve a model (object or folder) into a runner and its preprocessing settings.

    Returns ``(runner, config)``; ``runner(batch)`` maps ``[B, C, H, W]`` float32 CPU
    batches to float32 logits ``[B, K, h, w]`` (on the runner's device); ``C`` is
    ``2 * runner.slice_context + 1`` (1 for a 2D model). Building it once
    and passing it as ``model_or_folder`` to :func:`run_segmentation` avoids repeating the
    set-up for many scans.

    A model folder on the CPU with ONNX Runtime installed runs without torch when a graph
    is at hand: the folder's own (the bundled model ships one) or one cached from an earlier
    export (see :mod:`.onnx_graph`); otherwise the graph is exported once (needs torch) and
    cached. Which one was used is logged.
    """
    if isinstance(model_or_folder, (_TorchRunner, _OnnxRunner)):
        return model_or_folder, config or PreprocessingConfig()
    if engine not in ENGINES:
        raise HRpQCTError(f"Unknown inference engine {engine!r}; use one of {', '.join(ENGINES)}")
    if isinstance(model_or_folder, (str, Path)):
        return _prepare_folder(Path(model_or_folder), config, device, fast, engine,
                               num_threads)
    return _prepare_model(model_or_folder, config or PreprocessingConfig(), device, fast,
                          engine, num_threads)


def _prepare_folder(folder: Path, config: PreprocessingConfig | None, device: Any, fast: bool,
                    engine: str, num_threads: int | None):
    """:func:`prepare_segmenter` for a model folder: the graph if it fits, else torch."""
    from HRpQCTSegmentationEngine.model import load_model, read_model_metadata

    metadata = read_model_metadata(folder)
    config = config or metadata.preprocessing
    if _wants_onnx(engine, device, fast, metadata.architecture):
        try:
            runner = _folder_onnx_runner(folder, metadata, config, num_threads)
            _check_runner_context(runner, metadata, folder)
            runner.training_voxel_mm = metadata.training_voxel_mm
            return runner, config
        except ArtefactError:
            raise  # a damaged graph fails loudly, as damaged weights do
        except Exception as exc:
            if engine == "onnx" or not torch_available():
                raise
            level = logging.INFO if isinstance(exc, _ExportUnavailableError) else logging.WARNING
            log.log(level, "ONNX Runtime not used (%s); using the torch engine instead.",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            engine = "torch"
    model = load_model(folder, device="cpu")
    runner, config = _prepare_model(model, config, device, fast, engine, num_threads)
    _check_runner_context(runner, metadata, folder)
    runner.training_voxel_mm = metadata.training_voxel_mm
    return runner, config


def _check_runner_context(runner, metadata, folder: Path) -> None:
    """The network must take the slices the folder's metadata says (its one source)."""
    if runner.slice_context != metadata.slice_context:
        raise ArtefactError(
            f"The network of {folder} takes {2 * runner.slice_context + 1} input channel(s) "
            f"but its hrpqct_model.json records slice context {metadata.slice_context} "
            f"({metadata.num_channels} channels). The files come from different models: copy "
            "the folder again, or re-create its graph with 'python -m "
            "HRpQCTSegmentationEngine.export_onnx FOLDER'.")


def _wants_onnx(engine: str, device: Any, fast: bool, architecture: str) -> bool:
    """Whether a folder's model should run in ONNX Runtime (decided without torch)."""
    if engine == "torch" or architecture != "segformer":
        return False
    if engine == "onnx":
        return True
    return fast and _runs_on_cpu(device) and onnxruntime_available()


def _runs_on_cpu(device: Any) -> bool:
    """Whether ``device`` means the CPU; ``"auto"`` asks torch only if it is installed."""
    name = str(getattr(device, "type", device)).strip().lower()
    if name != "auto":
        return name == "cpu"
    if not torch_available():
        return True
    from HRpQCTSegmentationEngine.model import resolve_device

    return resolve_device("auto").type == "cpu"


def _folder_onnx_runner(folder: Path, metadata, config: PreprocessingConfig,
                        num_threads: int | None) -> _OnnxRunner:
    from HRpQCTSegmentationEngine.model import verify_weights

    verify_weights(folder, metadata)  # a damaged folder fails whichever graph is used
    graph = resolve_graph(folder, metadata, config.input_yx,
                          export=lambda path: _export_folder(folder, config, path))
    session = OnnxSession(graph.path, num_threads)
    if graph.temporary:  # the session holds the graph in memory
        shutil.rmtree(graph.path.parent, ignore_errors=True)
    log.info("Segmenting with ONNX Runtime, %s (%s)", graph.source, graph.path.name)
    return _OnnxRunner(session, source=graph.source)


def _export_folder(folder: Path, config: PreprocessingConfig, path: Path) -> Path:
    """Export a folder's model (folded) to ``path``; needs torch, transformers and onnx."""
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:
        raise _ExportUnavailableError(
            f"model folder {folder} has no ONNX graph, and exporting one needs torch, "
            f"transformers and onnx ({exc}). Install them once (pip install torch "
            "transformers onnx; the graph is then cached), or add the graph to the folder "
            "with 'python -m HRpQCTSegmentationEngine.export_onnx FOLDER'.") from None
    from HRpQCTSegmentationEngine.fast import export_onnx
    from HRpQCTSegmentationEngine.model import load_model

    log.info("Exporting the model to ONNX for ONNX Runtime (once per model; then cached)")
    return export_onnx(load_model(folder, device="cpu"), path, input_yx=config.input_yx)


def _prepare_model(model: Any, config: PreprocessingConfig, device: Any, fast: bool,
                   engine: str, num_threads: int | None):
    """:func:`prepare_segmenter` for a model object (torch; ONNX by exporting it now)."""
    if isinstance(model, OnnxSession):
        return _OnnxRunner(model), config
    if not callable(model):
        raise HRpQCTError(f"Not a model or model folder: {type(model)!r}")
    from HRpQCTSegmentationEngine.fast import FastSegformer, onnx_available
    from HRpQCTSegmentationEngine.model import resolve_device

    if hasattr(model, "eval"):
        model.eval()
    is_segformer = hasattr(model, "decode_head") and hasattr(model, "segformer")
    torch_device = resolve_device(device)
    if engine == "auto":
        engine = "onnx" if (torch_device.type == "cpu" and is_segformer and fast
                            and onnx_available()) else "torch"
        if engine == "onnx":
            try:
                return _onnx_runner(model, config, num_threads), config
            except Exception as exc:  # any export problem: the torch engine still works
                log.warning("ONNX export failed (%s); using the torch engine instead.",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                engine = "torch"
    if engine == "onnx":
        return _onnx_runner(model, config, num_threads), config
    if fast and is_segformer:
        return _TorchRunner(FastSegformer(model), torch_device, "torch-fast"), config
    return _TorchRunner(model, torch_device, "torch"), config


def _onnx_runner(model, config: PreprocessingConfig, num_threads: int | None) -> _OnnxRunner:
    from HRpQCTSegmentationEngine.fast import OnnxSegmenter

    log.info("Exporting the model to ONNX for ONNX Runtime (CPU; takes a few seconds)")
    return _OnnxRunner(OnnxSegmenter.from_model(model, input_yx=config.input_yx,
                                                num_threads=num_threads))


@contextmanager
def _torch_threads(num_threads: int | None):
    """Temporarily set torch's intra-op threads (restored after, not to disturb a host app)."""
    import torch

    if not num_threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _network_window(volume: np.ndarray, config: PreprocessingConfig,
                    runner: Any) -> tuple[CropBox, PreprocessingConfig]:
    """:func:`.preprocessing.network_window` for a runner (a graph of one fixed input size
    gets the whole window), with a log line saying what the network sees."""
    fixed = getattr(runner, "fixed_input_yx", None)
    if config.input_fit == "leg" and fixed is not None:
        log.info("The model's ONNX graph takes only %d x %d inputs, so the network sees the "
                 "whole crop window. Re-create the graph ('python -m "
                 "HRpQCTSegmentationEngine.export_onnx FOLDER') to let it see only the leg "
                 "(faster).", *fixed)
        config = replace(config, input_fit="field")
    full_yx = config.crop_yx
    box, fitted = network_window(volume, config)
    if fitted is not config:
        log.info("The network sees the leg's %d x %d voxels of the %d x %d crop window "
                 "(input %d x %d).", *box.shape, *full_yx, *fitted.input_yx)
    return box, fitted


def _inside_scan_mask(box: CropBox, logits_yx: tuple[int, int],
                      shape_yx: tuple[int, int]) -> np.ndarray:
    """Low-resolution logit pixels whose centre falls inside the scan (not in padding)."""
    masks = []
    for start, size, n_low, n_scan in zip((box.y0, box.x0), box.shape, logits_yx, shape_yx,
                                          strict=True):
        centres = start + (np.arange(n_low) + 0.5) * (size / n_low) - 0.5
        masks.append((centres >= -0.5) & (centres <= n_scan - 0.5))
    return masks[0][:, None] & masks[1][None, :]


def _top_probabilities(logits) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the largest softmax probability and its class, as numpy arrays."""
    if isinstance(logits, np.ndarray):
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return probabilities.max(axis=1), probabilities.argmax(axis=1)
    import torch

    top, label = torch.softmax(logits.float(), dim=1).max(dim=1)
    return top.numpy(), label.numpy()


def _confidences(logits, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top, label = _top_probabilities(logits)
    if inside.shape != top.shape[1:]:
        inside = np.ones(top.shape[1:], dtype=bool)
    overall = np.empty(top.shape[0], dtype=np.float32)
    foreground = np.empty(top.shape[0], dtype=np.float32)
    for i in range(top.shape[0]):
        overall[i] = top[i][inside].mean() if inside.any() else np.nan
        fg = inside & (label[i] != BACKGROUND.label)
        foreground[i] = top[i][fg].mean() if fg.any() else np.nan
    return overall, foreground


@contextmanager
def _full_float32_on_cuda(device: Any):
    """No TensorFloat-32 while a CUDA device segments (the previous setting restored after).

    cuDNN convolutions use TF32 by default on Ampere and newer GPUs: 10-bit mantissas move
    the logits by ~1e-3, enough to change labels at class boundaries. In float32 the GPU's
    labels are the CPU's (up to exact ties of the logits' last bits).
    """
    import torch

    if getattr(device, "type", None) != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _inference_context(backend: str, num_threads: int | None, device: Any = None):
    """torch's thread setting, inference mode and full float32 on CUDA, or nothing when
    torch is not used."""
    if backend == "numpy":
        return nullcontext()
    import torch

    stack = ExitStack()
    stack.enter_context(_torch_threads(num_threads))
    stack.enter_context(torch.inference_mode())
    stack.enter_context(_full_float32_on_cuda(device))
    return stack


def _in_plane_mm(spacing_mm: Any) -> tuple[float, float]:
    """``(y, x)`` voxel size from a ``(z, y, x)``, ``(y, x)`` or single spacing."""
    values = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64)).ravel()
    if values.size not in (1, 2, 3) or not (np.isfinite(values).all() and (values > 0).all()):
        raise HRpQCTError(f"spacing_mm must be positive voxel sizes, got {spacing_mm!r}")
    return (float(values[-1]),) * 2 if values.size == 1 else (float(values[-2]),
                                                               float(values[-1]))


def model_grid(config: PreprocessingConfig, spacing_mm: Any,
               training_voxel_mm: float | None,
               tolerance: float = VOXEL_TOLERANCE) -> tuple[PreprocessingConfig, dict]:
    """The preprocessing that brings a scan's slices to the model's voxel size.

    Parameters
    ----------
    config:
        The model's preprocessing (its ``crop_yx`` is in training voxels).
    spacing_mm:
        The scan's voxel size ``(z, y, x)`` (or ``(y, x)``) in mm; None: unknown.
    training_voxel_mm:
        The model's training in-plane voxel size in mm; None: unknown.
    tolerance:
        Relative difference up to which the scan is used as it is.

    Returns
    -------
    (PreprocessingConfig, dict)
        ``config`` itself when nothing is resampled, else a copy whose ``crop_yx`` is the
        same field in mm counted in scan voxels (the resize to ``input_yx`` then resamples);
        and the description stored in :attr:`SegmentationResult.voxel_resampling`.
    """
    info: dict[str, Any] = {"scan_voxel_mm": None, "model_voxel_mm": training_voxel_mm,
                            "resampled": False, "crop_yx": list(config.crop_yx)}
    if spacing_mm is None:
        info["reason"] = "scan voxel size not given"
        return config, info
    sy, sx = _in_plane_mm(spacing_mm)
    info["scan_voxel_mm"] = [sy, sx]
    if training_voxel_mm is None:
        info["reason"] = "the model records no training voxel size"
        log.info("The model records no training voxel size (training_voxel_mm); slices are "
                 "not resampled (scan voxel %.4f x %.4f mm).", sy, sx)
        return config, info
    model_mm = float(training_voxel_mm)
    if max(abs(sy / model_mm - 1.0), abs(sx / model_mm - 1.0)) <= tolerance:
        info["reason"] = f"scan voxel within {100 * tolerance:g} % of the model's"
        log.debug("Scan voxel %.4f x %.4f mm is the model's %.4f mm: not resampled.", sy, sx,
                  model_mm)
        return config, info
    crop = tuple(max(1, round(c * model_mm / s)) for c, s in zip(config.crop_yx, (sy, sx),
                                                                  strict=True))
    info.update(resampled=True, crop_yx=list(crop))
    log.info("Scan voxel %.4f x %.4f mm, model trained at %.4f mm: each slice is resampled to "
             "the model's voxel size before the network (a %d x %d voxel window, the model's "
             "%.1f mm field, resized to %d x %d) and the class scores back to the scan's grid "
             "before the arg-max; the labels are on the scan's grid.", sy, sx, model_mm,
             crop[0], crop[1], config.crop_yx[1] * model_mm, *config.input_yx)
    return replace(config, crop_yx=crop), info


# ------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------
def _checked_finite(volume: np.ndarray, z0: int, z1: int) -> np.ndarray:
    """Slices ``z0 .. z1 - 1``, refused if they hold NaN or infinite values."""
    slices = np.asarray(volume[z0:z1])  # a stored volume's HU: converted once, here
    if not np.issubdtype(volume.dtype, np.integer) and not np.isfinite(slices).all():
        raise InvalidScanError(
            f"Slices {z0}..{z1 - 1} contain NaN or infinite values; the scan is "
            "damaged or was converted wrongly. Re-export it, or replace the invalid "
            "voxels (e.g. with -1000 HU) before segmenting.")
    return slices


def _stack(items: list) -> Any:
    """``np.stack`` or ``torch.stack``, whichever the preprocessing returned."""
    if isinstance(items[0], np.ndarray):
        return np.stack(items)
    import torch

    return torch.stack(items)


class _NetworkInputs:
    """The network's input, batch by batch: each slice alone (2D) or with its neighbours.

    With a slice context k, the slices a batch needs (``z0 - k .. z1 - 1 + k``, clipped to
    the scan) are preprocessed once each; the 2k the next batch needs as neighbours are kept,
    the rest dropped, so the working memory is that of two batches of ``batch_size + 2k``
    preprocessed slices at most, whatever the scan's length.
    """

    def __init__(self, volume: np.ndarray, box: CropBox, config: PreprocessingConfig,
                 preprocess: Any, slice_context: int) -> None:
        self.volume, self.box, self.config = volume, box, config
        self.preprocess, self.slice_context = preprocess, int(slice_context)
        self._ready: dict[int, Any] = {}  # z -> preprocessed [H, W] slice

    def batch(self, z0: int, z1: int) -> Any:
        """``[z1 - z0, 2k + 1, H, W]`` float32 network input of slices ``z0 .. z1 - 1``."""
        if self.slice_context == 0:  # the 2D loop, exactly as it always was
            return self.preprocess(_checked_finite(self.volume, z0, z1), self.box, self.config)
        nz, k = self.volume.shape[0], self.slice_context
        start = max(z0 - k, 0, max(self._ready, default=-1) + 1)  # not yet preprocessed
        stop = min(z1 + k, nz)
        if start < stop:
            fresh = self.preprocess(_checked_finite(self.volume, start, stop), self.box,
                                    self.config)
            for i in range(stop - start):
                self._ready[start + i] = fresh[i, 0]
        batch = _stack([_stack([self._ready[int(j)] for j in neighbour_indices(z, nz, k)])
                        for z in range(z0, z1)])
        for z in [z for z in self._ready if z < z1 - k]:  # not a neighbour of later slices
            del self._ready[z]
        return batch


def run_segmentation(hu_volume: Any, model_or_folder: Any, *,
                     config: PreprocessingConfig | None = None, batch_size: int | None = None,
                     device: str | Any = "auto", fast: bool = True, engine: str = "auto",
                     num_threads: int | None = None, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None,
                     uncertainty: str = "none", spacing_mm: Any = None,
                     training_voxel_mm: float | None = None) -> SegmentationResult:
    """Segment a scan into the network's classes; see :func:`segment_volume` for parameters.

    ``spacing_mm`` (the scan's ``(z, y, x)`` voxel size; default: a
    :class:`~HRpQCTCore.scan.Scan`'s own) lets slices be resampled to the model's training
    voxel size (``training_voxel_mm``; default: the model folder's, see :func:`model_grid`).

    Returns
    -------
    SegmentationResult
        Labels plus per-slice confidence, crop box, device and timing.
    """
    start = time.perf_counter()
    if spacing_mm is None:
        spacing_mm = getattr(hu_volume, "spacing_mm", None)
    volume = validate_volume(hu_volume)
    if batch_size is not None and batch_size < 1:
        raise HRpQCTError(f"batch_size must be at least 1, got {batch_size}")
    runner, config = prepare_segmenter(model_or_folder, config=config, device=device,
                                       fast=fast, engine=engine, num_threads=num_threads)
    if batch_size is None:
        # On the CPU larger batches only add memory; a GPU is used better with a few slices.
        on_gpu = runner.device is not None and runner.device.type != "cpu"
        batch_size = DEFAULT_GPU_BATCH if on_gpu else 1
    nz, ny, nx = volume.shape
    if training_voxel_mm is None:
        training_voxel_mm = getattr(runner, "training_voxel_mm", None)
    config, resampling = model_grid(config, spacing_mm, training_voxel_mm)
    box, config = _network_window(volume, config, runner)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    confidence = np.full(nz, np.nan, dtype=np.float32)
    foreground_confidence = np.full(nz, np.nan, dtype=np.float32)
    inside = _inside_scan_mask(box, config.logits_yx, (ny, nx))
    tracker = UncertaintyTracker(uncertainty, nz, inside)  # measures only: labels unchanged
    report(progress, 0, nz, PROGRESS_STAGE)
    backend = getattr(runner, "backend", "torch")
    preprocess = preprocess_slices if backend == "torch" else preprocess_slices_numpy
    inputs = _NetworkInputs(volume, box, config, preprocess,
                            getattr(runner, "slice_context", 0))
    with _inference_context(backend, num_threads, runner.device):
        for z0 in range(0, nz, batch_size):
            check(cancel)
            z1 = min(z0 + batch_size, nz)
            pixel_values = inputs.batch(z0, z1)
            logits = runner(pixel_values)
            host_logits = logits if isinstance(logits, np.ndarray) else logits.cpu()
            confidence[z0:z1], foreground_confidence[z0:z1] = _confidences(host_logits, inside)
            # The reference's labels (logits_to_labels_batch), without upsampling the air.
            labels[z0:z1] = logits_to_labels_fast(logits, box, (ny, nx))
            tracker.add(z0, pixel_values, host_logits, runner)
            del pixel_values, logits
            report(progress, z1, nz, PROGRESS_STAGE)
    device_name = "cpu" if runner.device is None else str(runner.device)
    return SegmentationResult(
        labels=labels, slice_confidence=confidence,
        slice_foreground_confidence=foreground_confidence, crop_box=box,
        device=device_name, engine=runner.engine, seconds=time.perf_counter() - start,
        slice_uncertainty=tracker.per_slice, uncertainty_method=uncertainty,
        uncertainty_signals=tracker.signals, voxel_resampling=resampling)


def segment_volume(hu_volume: Any, model_or_folder: Any, *,
                   config: PreprocessingConfig | None = None, batch_size: int | None = None,
                   device: str | Any = "auto", fast: bool = True, engine: str = "auto",
                   num_threads: int | None = None, progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None, spacing_mm: Any = None) -> np.ndarray:
    """Segment a scan ``[z, y, x]`` in HU into the network's five classes plus background.

    Parameters
    ----------
    hu_volume:
        3D array in HU (or a :class:`~HRpQCTCore.scan.Scan`).
    model_or_folder:
        A model folder saved by :func:`.model.save_model`, a ``SegformerForSemanticSegmentation``
        (or the project's U-Net, or a :class:`.fast.FastSegformer` /
        :class:`.fast.OnnxSegmenter`), or a runner from :func:`prepare_segmenter` (then pass
        the config it returned, too).
    config:
        Preprocessing; default: the model folder's saved settings, else the paper's.
    batch_size:
        Slices per forward pass; default 1 on the CPU (larger batches are not faster there
        and need more memory), 4 on a GPU.
    device:
        ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
    fast:
        Fold the SegFormer decoder (exact; ~2x faster at 800 x 800 on a CPU). ``False``
        runs the stock transformers model with torch (the reference).
    engine:
        ``"auto"`` (ONNX Runtime on the CPU if installed, else torch), ``"torch"``, or
        ``"onnx"`` (ONNX Runtime, CPU only; exporting takes a few seconds per call -- reuse
        a runner from :func:`prepare_segmenter` for many scans).
    num_threads:
        CPU threads for torch (restored afterwards) and ONNX Runtime during the run
        (default: their own setting, one per physical core).
    progress, cancel:
        Progress callback (called after each batch) and cancellation token (checked before
        each batch).
    spacing_mm:
        The scan's voxel size ``(z, y, x)`` in mm (default: a Scan's own; None for an
        array: unknown). Where it differs from the model's training voxel size by more
        than :data:`VOXEL_TOLERANCE`, slices are resampled to the model's voxel size and the
        scores back (:func:`model_grid`); labels are always on the input's grid.

    Returns
    -------
    numpy.ndarray
        ``uint8`` label volume of the input's shape. Use :func:`run_segmentation` to also get
        per-slice confidences.

    Raises
    ------
    InvalidScanError
        If the input is not a finite 3D grey-value volume.
    ArtefactError
        If a model folder is incomplete, damaged, or fails its checksum.
    CancelledError
        If ``cancel`` was set.
    """
    return run_segmentation(
        hu_volume, model_or_folder, config=config, batch_size=batch_size, device=device,
        fast=fast, engine=engine, num_threads=num_threads, progress=progress,
        cancel=cancel, spacing_mm=spacing_mm).labels

