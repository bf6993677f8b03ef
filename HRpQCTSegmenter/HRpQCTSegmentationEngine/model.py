"""The SegFormer segmenter: architecture variants as data, building, saving and loading.

A saved model is a folder with three files:

* ``model.safetensors`` -- the weights (safetensors only: never pickle / ``torch.load``);
* ``config.json`` -- the architecture, in transformers' format (so the folder also loads with
  ``SegformerForSemanticSegmentation.from_pretrained``);
* ``hrpqct_model.json`` -- this project's metadata: preprocessing settings
  (:class:`~.preprocessing.PreprocessingConfig`), class keys and names from
  :mod:`HRpQCTCore.regions`, the variant, training provenance, and the SHA256 of the
  weights file, which :func:`load_model` checks before reading the weights.

The network has six outputs (:data:`~HRpQCTCore.regions.NETWORK_CLASSES`: background + the
paper's five classes) and ``2 * slice_context + 1`` input channels (HU scaled to [0, 1]): one
for a 2D model (``slice_context`` 0, the bundled model), three for a 2.5D model that sees each
slice with its neighbours z-1 and z+1 (``slice_context`` 1). ``hrpqct_model.json`` records
``slice_context`` and ``num_channels`` (a folder without ``slice_context`` is 2D), and
:func:`read_model_metadata` checks that they agree; :func:`inflate_input_channels` turns a
2D model into a 2.5D one with the same output.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from HRpQCTCore.artefacts import sha256_file
from HRpQCTCore.atomic import write_bytes_atomic
from HRpQCTCore.errors import ArtefactError
from HRpQCTCore.regions import NETWORK_CLASSES
from HRpQCTSegmentationEngine.preprocessing import (
    PreprocessingConfig,
    channels_for_context,
    checked_slice_context,
    slice_context_of_channels,
)

__all__ = [
    "SegmenterConfig",
    "SEGFORMER_VARIANTS",
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "METADATA_FILE",
    "ModelMetadata",
    "ModelChecksumError",
    "CorruptModelError",
    "ModelFolderError",
    "build_model",
    "save_model",
    "read_model_metadata",
    "load_model",
    "load_pretrained_rgb_checkpoint",
    "find_first_patch_embedding",
    "resolve_device",
    "slice_context_of_model",
    "inflate_input_channels",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METADATA_FILE = "hrpqct_model.json"
METADATA_FORMAT = "hrpqct-segmenter-model"
METADATA_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
class ModelFolderError(ArtefactError):
    """A model folder is missing, incomplete, or not a model of this project."""


class ModelChecksumError(ArtefactError):
    """The weights file is intact but is not the file the metadata's SHA256 describes."""


class CorruptModelError(ArtefactError):
    """The weights file is truncated or damaged (unreadable as safetensors)."""


# ------------------------------------------------------------------------------------------
# Architecture variants as data
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmenterConfig:
    """A SegFormer architecture (Mix Transformer encoder MiT-Bx + all-MLP decoder).

    The numbers are those of the SegFormer paper (Xie et al. 2021) and transformers'
    ``SegformerConfig``; ``num_channels`` and ``num_labels`` are this project's (one grey
    channel per slice fed, see :func:`build_model`'s ``slice_context``; the six network
    classes).
    """

    variant: str
    hidden_sizes: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_attention_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    patch_sizes: tuple[int, int, int, int] = (7, 3, 3, 3)
    strides: tuple[int, int, int, int] = (4, 2, 2, 2)
    mlp_ratios: tuple[int, int, int, int] = (4, 4, 4, 4)
    decoder_hidden_size: int = 256
    drop_path_rate: float = 0.1
    classifier_dropout_prob: float = 0.1
    num_channels: int = 1
    num_labels: int = len(NETWORK_CLASSES)

    def to_hf_config(self):
        """The equivalent ``transformers.SegformerConfig`` (class names from regions.py)."""
        from transformers import SegformerConfig

        id2label = {c.label: c.key for c in NETWORK_CLASSES}
        if self.num_labels != len(id2label):
            id2label = {i: f"class_{i}" for i in range(self.num_labels)}
        data = asdict(self)
        data.pop("variant")
        data.pop("num_labels")
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return SegformerConfig(
            **data, num_encoder_blocks=4, id2label=id2label,
            label2id={v: k for k, v in id2label.items()})


def _variant(name: str, hidden: tuple, depths: tuple, decoder: int) -> SegmenterConfig:
    return SegmenterConfig(variant=name, hidden_sizes=hidden, depths=depths,
                           decoder_hidden_size=decoder)


#: MiT-B0 .. B5 (the paper uses B3; B0 is the CPU-friendly default of this project).
SEGFORMER_VARIANTS: dict[str, SegmenterConfig] = {
    "b0": _variant("b0", (32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": _variant("b1", (64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": _variant("b2", (64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": _variant("b3", (64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": _variant("b4", (64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": _variant("b5", (64, 128, 320, 512), (3, 6, 40, 3), 768),
}


def _variant_config(variant: str | SegmenterConfig) -> SegmenterConfig:
    if isinstance(variant, SegmenterConfig):
        return variant
    key = str(variant).strip().lower().removeprefix("mit-")
    if key not in SEGFORMER_VARIANTS:
        raise ValueError(
            f"Unknown SegFormer variant {variant!r}; choose one of "
            f"{', '.join(SEGFORMER_VARIANTS)}")
    return SEGFORMER_VARIANTS[key]


def _variant_name_of(hf_config) -> str:
    """``"b0"``..``"b5"`` when ``hf_config``'s encoder matches a known variant, else custom."""
    for name, v in SEGFORMER_VARIANTS.items():
        if (list(v.hidden_sizes) == list(hf_config.hidden_sizes)
                and list(v.depths) == list(hf_config.depths)
                and v.decoder_hidden_size == hf_config.decoder_hidden_size):
            return name
    return "custom"


def build_model(variant: str | SegmenterConfig = "b0", *, seed: int | None = None,
                slice_context: int = 0):
    """A randomly initialised six-class ``SegformerForSemanticSegmentation``.

    Parameters
    ----------
    variant:
        ``"b0"``..``"b5"`` or a :class:`SegmenterConfig`.
    seed:
        Seed for the initialisation (``torch.manual_seed``) when reproducibility matters.
    slice_context:
        Neighbour slices fed on each side: 0 (default) builds the one-channel 2D model, 1 a
        three-channel 2.5D model (z-1, z, z+1).
    """
    import torch
    from transformers import SegformerForSemanticSegmentation

    if seed is not None:
        torch.manual_seed(seed)
    config = _variant_config(variant)
    if slice_context:
        config = replace(config, num_channels=channels_for_context(slice_context))
    return SegformerForSemanticSegmentation(config.to_hf_config())


def resolve_device(device: str | Any = "auto"):
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; other values as given."""
    import torch

    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelMetadata:
    """Contents of ``hrpqct_model.json``."""

    architecture: str
    variant: str
    preprocessing: PreprocessingConfig
    class_keys: tuple[str, ...]
    weights_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: In-plane voxel size (mm) of the training data (``training_voxel_mm``); None for
    #: folders that do not record it (unknown: scans are then not resampled).
    training_voxel_mm: float | None = None
    #: Neighbour slices fed on each side (``slice_context``): 0 = 2D (folders that do not
    #: record it), 1 = z-1, z, z+1.
    slice_context: int = 0

    @property
    def num_channels(self) -> int:
        """Input channels of the network: ``2 * slice_context + 1``."""
        return channels_for_context(self.slice_context)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def _architecture_of(model) -> tuple[str, dict[str, Any], str]:
    """(architecture, config dict for config.json, variant) of a model to be saved."""
    from HRpQCTSegmentationEngine.unet import UNet

    if isinstance(model, UNet):
        return "unet", model.config.to_dict(), "unet"
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "segformer":
        raise TypeError(f"save_model expects a SegFormer or UNet model, got {type(model)!r}")
    return "segformer", config.to_dict(), _variant_name_of(config)


def save_model(model, folder: str | Path, extra_metadata: Mapping[str, Any] | None = None,
               preprocessing: PreprocessingConfig | None = None,
               training_voxel_mm: float | None = None) -> Path:
    """Write ``model`` to ``folder`` (weights, ``config.json``, ``hrpqct_model.json``).

    Each file is written atomically; the metadata, holding the weights' SHA256, is written
    last, so a folder with metadata is complete.

    Parameters
    ----------
    model:
        A ``SegformerForSemanticSegmentation`` (or the project's :class:`~.unet.UNet`).
    folder:
        Output folder (created if needed).
    extra_metadata:
        Provenance to record (e.g. ``{"training": {...}}``); must be JSON-serialisable and
        must not reuse the reserved keys of the metadata.
    preprocessing:
        The preprocessing the model was trained with (default: the paper's).
    training_voxel_mm:
        In-plane voxel size (mm) of the training scans, recorded as ``training_voxel_mm``
        (inference resamples other scans to it); None: not recorded (unknown).

    Returns
    -------
    Path
        The folder.
    """
    from safetensors.torch import save as safetensors_save

    from HRpQCTCore import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    architecture, config_dict, variant = _architecture_of(model)
    preprocessing = preprocessing or PreprocessingConfig()
    num_channels = int(config_dict.get("num_channels", 1))
    slice_context = slice_context_of_channels(num_channels)  # refuses even channel counts
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _atomic_write_bytes(folder / WEIGHTS_FILE, safetensors_save(state, metadata={"format": "pt"}))
    _atomic_write_bytes(folder / CONFIG_FILE,
                        (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode())
    metadata: dict[str, Any] = {
        "format": METADATA_FORMAT,
        "format_version": METADATA_FORMAT_VERSION,
        "architecture": architecture,
        "variant": variant,
        "num_channels": num_channels,
        "slice_context": slice_context,
        "class_keys": [c.key for c in NETWORK_CLASSES],
        "class_names": [c.name for c in NETWORK_CLASSES],
        "preprocessing": preprocessing.to_dict(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(folder / WEIGHTS_FILE),
        "saved_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software_version": __version__,
    }
    if training_voxel_mm is not None:
        metadata["training_voxel_mm"] = _checked_voxel_mm(training_voxel_mm, "training_voxel_mm")
    extra = dict(extra_metadata or {})
    clash = set(extra) & set(metadata)
    if clash:
        raise ValueError(f"extra_metadata reuses reserved keys: {', '.join(sorted(clash))}")
    metadata.update(extra)
    _atomic_write_bytes(folder / METADATA_FILE,
                        (json.dumps(metadata, indent=2, default=str) + "\n").encode())
    return folder


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------
def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None if its layout is consistent."""
    size = path.stat().st_size
    if size < 8:
        return f"it is only {size} bytes long"
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > size - 8:
            return f"its header claims {header_len} bytes but the file has {size}"
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "its header lists tensors without valid offsets"
    expected = 8 + header_len + end
    if expected != size:
        return (f"it is {size} bytes long but its header describes {expected} bytes "
                "(truncated or padded)")
    return None


def _check_weights(folder: Path, weights: Path, expected_sha256: str | None) -> None:
    if not weights.is_file():
        raise ModelFolderError(
            f"Model folder {folder} has no weights file {weights.name}. Copy the complete "
            "folder again, or choose another model folder.")
    problem = _safetensors_problem(weights)
    if problem is not None:
        raise CorruptModelError(
            f"The weights file {weights} is damaged: {problem}. The copy or download was "
            "probably interrupted; copy or download the model folder again.")
    if expected_sha256 is not None:
        actual = sha256_file(weights)
        if actual != expected_sha256:
            raise ModelChecksumError(
                f"The weights file {weights} does not match its checksum in "
                f"{METADATA_FILE} (expected {expected_sha256[:12]}..., found {actual[:12]}...). "
                "The file was modified or replaced. Use the folder exactly as saved by "
                "save_model/train-segmenter (re-copy it), or re-save the model to record the "
                "new weights' checksum.")


def _checked_voxel_mm(value: Any, name: str) -> float:
    """A positive, finite voxel size in mm (a plausible one: 0.001 .. 10 mm)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of mm, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.001 <= value <= 10.0):
        raise ValueError(f"{name} must be a voxel size in mm (0.001 .. 10), got {value!r}")
    return value


def read_model_metadata(folder: str | Path) -> ModelMetadata:
    """Read and validate ``hrpqct_model.json`` of a saved model folder.

    Raises
    ------
    ModelFolderError
        If the folder or its metadata is missing or not from this project, or the model was
        trained for other classes than :data:`~HRpQCTCore.regions.NETWORK_CLASSES`.
    """
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    if not folder.is_dir():
        raise ModelFolderError(f"Model folder {folder} does not exist; check the path.")
    if not meta_path.is_file():
        raise ModelFolderError(
            f"{folder} has no {METADATA_FILE}, so it is not a model saved by this project. "
            "For a transformers SegFormer checkpoint (RGB, e.g. from ImageNet) use "
            "load_pretrained_rgb_checkpoint and train it first.")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(
            f"{meta_path} is not valid JSON ({exc}); copy the model folder again.") from None
    if not isinstance(raw, dict) or raw.get("format") != METADATA_FORMAT:
        raise ModelFolderError(f"{meta_path} is not an HR-pQCT segmenter model description.")
    expected_keys = [c.key for c in NETWORK_CLASSES]
    if list(raw.get("class_keys", [])) != expected_keys:
        raise ModelFolderError(
            f"The model in {folder} predicts classes {raw.get('class_keys')}, but this "
            f"software expects {expected_keys}. Use a model trained with this version.")
    try:
        preprocessing = PreprocessingConfig.from_dict(raw.get("preprocessing", {}))
    except (TypeError, ValueError) as exc:
        raise ModelFolderError(f"{meta_path} has invalid preprocessing settings: {exc}") from None
    voxel = raw.get("training_voxel_mm")
    if voxel is not None:
        try:
            voxel = _checked_voxel_mm(voxel, "training_voxel_mm")
        except ValueError as exc:
            raise ModelFolderError(f"{meta_path}: {exc}") from None
    slice_context = _checked_metadata_context(raw, meta_path)
    reserved = {"architecture", "variant", "preprocessing", "class_keys", "weights_sha256",
                "slice_context"}
    return ModelMetadata(
        training_voxel_mm=voxel,
        slice_context=slice_context,
        architecture=str(raw.get("architecture", "segformer")),
        variant=str(raw.get("variant", "custom")),
        preprocessing=preprocessing,
        class_keys=tuple(expected_keys),
        weights_sha256=str(raw.get("weights_sha256", "")),
        extra={k: v for k, v in raw.items() if k not in reserved},
    )


def _checked_metadata_context(raw: dict, meta_path: Path) -> int:
    """The metadata's ``slice_context`` (missing: 0, a 2D folder), checked against its
    ``num_channels``."""
    try:
        slice_context = checked_slice_context(raw.get("slice_context", 0))
    except ValueError as exc:
        raise ModelFolderError(f"{meta_path}: {exc}. Re-save the model with save_model, or "
                               "copy the folder again.") from None
    channels = raw.get("num_channels", channels_for_context(slice_context))
    if isinstance(channels, bool) or channels != channels_for_context(slice_context):
        raise ModelFolderError(
            f"{meta_path} records num_channels {channels!r} but slice_context "
            f"{slice_context} (which needs {channels_for_context(slice_context)} input "
            "channels: the slice and its neighbours on each side). The file was edited or "
            "comes from another model; copy the folder again.")
    return slice_context


def _model_from_config_json(folder: Path, architecture: str):
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ModelFolderError(f"Model folder {folder} has no {CONFIG_FILE}; copy it again.")
    try:
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"{config_path} is not valid JSON ({exc}).") from None
    if architecture == "unet":
        from HRpQCTSegmentationEngine.unet import UNet, UNetConfig

        return UNet(UNetConfig.from_dict(config_dict))
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config_dict = {k: v for k, v in config_dict.items() if k != "transformers_version"}
    return SegformerForSemanticSegmentation(SegformerConfig.from_dict(config_dict))


# Parameter names of transformers 4.x (left) and 5.x (right) SegFormers; applied in order.
_KEYS_4_TO_5: tuple[tuple[str, str], ...] = (
    (r"encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"attention\.self\.query\.", "attention.q_proj."),
    (r"attention\.self\.key\.", "attention.k_proj."),
    (r"attention\.self\.value\.", "attention.v_proj."),
    (r"attention\.self\.sr\.", "attention.sequence_reduction.sequence_reduction."),
    (r"attention\.self\.layer_norm\.", "attention.sequence_reduction.layer_norm."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
    (r"mlp\.dense1\.", "mlp.fc1."),
    (r"mlp\.dense2\.", "mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
    (r"decode_head\.linear_c\.", "decode_head.linear_projections."),
)
_KEYS_5_TO_4: tuple[tuple[str, str], ...] = (
    (r"stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
    (r"attention\.q_proj\.", "attention.self.query."),
    (r"attention\.k_proj\.", "attention.self.key."),
    (r"attention\.v_proj\.", "attention.self.value."),
    (r"attention\.sequence_reduction\.sequence_reduction\.", "attention.self.sr."),
    (r"attention\.sequence_reduction\.layer_norm\.", "attention.self.layer_norm."),
    (r"attention\.o_proj\.", "attention.output.dense."),
    (r"mlp\.fc1\.", "mlp.dense1."),
    (r"mlp\.fc2\.", "mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
    (r"decode_head\.linear_projections\.", "decode_head.linear_c."),
)


def _rename_keys(state: dict, rules: tuple[tuple[str, str], ...]) -> dict:
    import re

    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _match_key_names(state: dict, expected: set[str]) -> dict:
    """``state`` with parameter names of the installed transformers version.

    A model saved under transformers 4.x loads under 5.x and vice versa: SegFormer's
    parameters were renamed between the two, not changed.
    """
    if set(state) == expected:
        return state
    for rules in (_KEYS_4_TO_5, _KEYS_5_TO_4):
        renamed = _rename_keys(state, rules)
        if set(renamed) == expected:
            return renamed
    return state


def verify_weights(folder: str | Path, metadata: ModelMetadata | None = None) -> None:
    """Check a folder's weights file (complete, and its recorded SHA256) without loading it.

    For runs that use an ONNX graph instead of the weights: a damaged folder is refused
    whichever file of it the run reads.

    Raises
    ------
    ModelFolderError, CorruptModelError, ModelChecksumError
        As :func:`load_model`.
    """
    folder = Path(folder)
    metadata = metadata or read_model_metadata(folder)
    _check_weights(folder, folder / WEIGHTS_FILE, metadata.weights_sha256)


def load_model(folder: str | Path, device: str | Any = "cpu"):
    """Load a model saved by :func:`save_model`, after checking the weights' SHA256.

    Parameters
    ----------
    folder:
        The model folder.
    device:
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.

    Returns
    -------
    torch.nn.Module
        The model in eval mode on ``device``.

    Raises
    ------
    ModelFolderError, CorruptModelError, ModelChecksumError
        (all :class:`~HRpQCTCore.errors.ArtefactError`) with what to do.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    metadata = read_model_metadata(folder)
    weights = folder / WEIGHTS_FILE
    if not metadata.weights_sha256:
        raise ModelFolderError(
            f"{folder / METADATA_FILE} records no weights checksum; re-save the model with "
            "save_model.")
    _check_weights(folder, weights, metadata.weights_sha256)
    model = _model_from_config_json(folder, metadata.architecture)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CorruptModelError(f"Cannot read {weights}: {exc}. Copy the folder again.") from None
    state = _match_key_names(state, set(model.state_dict()))
    if int(model.config.num_channels) != metadata.num_channels:
        raise ModelFolderError(
            f"{folder / CONFIG_FILE} describes a {model.config.num_channels}-channel network "
            f"but {METADATA_FILE} a slice context of {metadata.slice_context} "
            f"({metadata.num_channels} channels). The files come from different models; copy "
            "the complete folder again.")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[0]
        raise ModelFolderError(
            f"The weights in {weights} do not fit the architecture in {CONFIG_FILE} "
            f"({first_line}). The two files come from different models; copy the complete "
            "folder again.") from None
    model.eval()
    return model.to(resolve_device(device))


# ------------------------------------------------------------------------------------------
# Starting from an RGB checkpoint (ImageNet / Cityscapes)
# ------------------------------------------------------------------------------------------
def _checkpoint_tensors(folder: Path) -> list[Path]:
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    raise ModelFolderError(
        f"{folder} holds no {WEIGHTS_FILE} (or sharded safetensors). Only safetensors "
        "checkpoints are loaded (pickle files can run code); convert a pytorch_model.bin "
        "with transformers' save_pretrained(safe_serialization=True) first.")


def find_first_patch_embedding(named_tensors, num_channels: int,
                               kernel_shape: tuple[int, ...] | None = None):
    """The (name, tensor) of the first patch-embedding kernel, found by shape.

    It is the only 4D convolution kernel whose input-channel count is the image's
    ``num_channels`` (with ``num_channels == 1`` the depthwise 3 x 3 kernels of the Mix-FFN
    also have one input channel, so ``kernel_shape`` -- ``(out, kh, kw)`` -- disambiguates).
    Names differ between transformers 4.x (``encoder.patch_embeddings.0.proj``) and 5.x
    (``stages.0.patch_embeddings.proj``); shapes do not.
    """
    hits = [(name, t) for name, t in named_tensors
            if t.ndim == 4 and t.shape[1] == num_channels
            and (kernel_shape is None
                 or (t.shape[0], t.shape[2], t.shape[3]) == tuple(kernel_shape))]
    if len(hits) != 1:
        names = ", ".join(n for n, _ in hits) or "none"
        raise ModelFolderError(
            f"Expected exactly one {num_channels}-channel patch-embedding kernel, found: "
            f"{names}. Is this a SegFormer checkpoint?")
    return hits[0]


def load_pretrained_rgb_checkpoint(folder: str | Path):
    """A one-channel, six-class SegFormer initialised from an RGB SegFormer checkpoint.

    ``folder`` is a transformers checkpoint (``config.json`` + safetensors weights), e.g.
    ``nvidia/mit-b3`` (ImageNet) or ``nvidia/segformer-b3-finetuned-cityscapes-1024-1024``,
    downloaded by the user. As in the paper, the first patch embedding's RGB kernels are
    **averaged** into one grey kernel; all other encoder (and decoder) weights are kept. The
    classifier is re-initialised when the checkpoint has another number of labels than six
    (the decoder is freshly initialised for an encoder-only ImageNet checkpoint).

    Returns
    -------
    SegformerForSemanticSegmentation
        In training mode, on the CPU.
    """
    import torch
    from safetensors import safe_open
    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelFolderError(
            f"{folder} is not a transformers checkpoint folder (no {CONFIG_FILE}).")
    try:
        source_config = SegformerConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"Cannot read {folder / CONFIG_FILE}: {exc}") from None
    if getattr(source_config, "model_type", None) != "segformer":
        raise ModelFolderError(
            f"{folder} holds a {source_config.model_type!r} model, not a SegFormer.")
    in_channels = int(source_config.num_channels)
    if in_channels not in (1, 3):
        raise ModelFolderError(
            f"{folder} is a {in_channels}-channel model; only RGB (3) or grey (1) checkpoints "
            "can be adapted.")

    files = _checkpoint_tensors(folder)
    source_kernel = None
    for path in files:
        problem = _safetensors_problem(path)
        if problem is not None:
            raise CorruptModelError(f"{path} is damaged: {problem}. Download it again.")
        with safe_open(str(path), framework="pt") as fh:
            shapes = [(k, fh.get_slice(k).get_shape()) for k in fh.keys()]  # noqa: SIM118
            hits = [k for k, s in shapes if len(s) == 4 and s[1] == in_channels
                    and (in_channels != 1 or s[2] == source_config.patch_sizes[0])]
            for key in hits:
                if source_kernel is not None:
                    raise ModelFolderError(
                        f"{folder} has several {in_channels}-channel input kernels; "
                        "is this a SegFormer checkpoint?")
                source_kernel = fh.get_tensor(key)
    if source_kernel is None:
        raise ModelFolderError(f"No patch-embedding kernel found in {folder}.")

    id2label = {c.label: c.key for c in NETWORK_CLASSES}
    target_config = SegformerConfig.from_pretrained(
        str(folder), local_files_only=True, num_channels=1,
        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the mismatch warnings are expected and handled here
    try:
        model = SegformerForSemanticSegmentation.from_pretrained(
            str(folder), config=target_config, ignore_mismatched_sizes=True,
            use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"Cannot load the checkpoint in {folder}: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)

    grey_kernel = source_kernel.float().mean(dim=1, keepdim=True)
    name, param = find_first_patch_embedding(
        model.named_parameters(), 1,
        (grey_kernel.shape[0], grey_kernel.shape[2], grey_kernel.shape[3]))
    with torch.no_grad():
        param.copy_(grey_kernel.to(param.dtype))
    log.info("Initialised %s from %s (RGB kernels averaged; %d source labels, %d now)",
             name, folder, source_config.num_labels, len(NETWORK_CLASSES))
    model.train()
    return model


# ------------------------------------------------------------------------------------------
# Inter-slice context (2.5D)
# ------------------------------------------------------------------------------------------
def slice_context_of_model(model) -> int:
    """Neighbour slices on each side a model object takes, from its input channel count.

    Works for a SegFormer, the U-Net and a :class:`~.fast.FastSegformer` (all carry a
    ``config`` with ``num_channels``); 0 for anything without one (a 2D callable).
    """
    config = getattr(model, "config", None)
    return slice_context_of_channels(int(getattr(config, "num_channels", 1)))


def _with_channels(model, num_channels: int):
    """A fresh model of ``model``'s architecture taking ``num_channels`` input channels."""
    import copy

    from HRpQCTSegmentationEngine.unet import UNet

    if isinstance(model, UNet):
        return UNet(replace(model.config, num_channels=num_channels))
    if getattr(getattr(model, "config", None), "model_type", None) != "segformer":
        raise TypeError(f"Expected a SegFormer or UNet model, got {type(model)!r}")
    from transformers import SegformerForSemanticSegmentation

    config = copy.deepcopy(model.config)
    config.num_channels = num_channels
    return SegformerForSemanticSegmentation(config)


def inflate_input_channels(model, slice_context: int):
    """A copy of a model that takes more neighbour slices, with exactly the same output.

    The first patch embedding (the only kernel that sees the input) gets
    ``2 * slice_context + 1`` input channels: the model's own kernel in the centre channels
    and zeros in the new outer ones, so on any input the new model's logits are the old
    model's on the centre slice(s) (zero weights add nothing); training then learns what the
    neighbours add. Every other weight is copied. Used for ``--init-from`` a 2D model with
    ``--slice-context 1``.

    Parameters
    ----------
    model:
        A SegFormer (or the project's U-Net); not modified.
    slice_context:
        The new context, at least the model's own.

    Returns
    -------
    torch.nn.Module
        The inflated model (the same model when the context is already ``slice_context``),
        in the training mode of ``model``, on the CPU.

    Raises
    ------
    ValueError
        If ``slice_context`` is smaller than the model's (neighbours cannot be dropped
        without changing what the network computes).
    """
    import torch

    new_context, old_context = checked_slice_context(slice_context), slice_context_of_model(model)
    if new_context == old_context:
        return model
    if new_context < old_context:
        raise ValueError(
            f"The model takes {old_context} neighbour slice(s) on each side; it cannot be "
            f"turned into one with {new_context} (2D from 2.5D would drop trained input "
            f"weights). Train with slice context {old_context}, or from a 2D model.")
    old_channels, new_channels = (channels_for_context(old_context),
                                  channels_for_context(new_context))
    inflated = _with_channels(model, new_channels)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    target = inflated.state_dict()
    differing = [k for k in state if tuple(state[k].shape) != tuple(target[k].shape)]
    if len(differing) != 1 or state[differing[0]].ndim != 4 \
            or state[differing[0]].shape[1] != old_channels:
        raise ModelFolderError(
            f"Expected exactly one input kernel to inflate, found {', '.join(differing) or 'none'}")
    key = differing[0]
    kernel = torch.zeros(target[key].shape, dtype=state[key].dtype)
    first = new_context - old_context  # the old channels sit in the middle
    kernel[:, first:first + old_channels] = state[key]
    state[key] = kernel
    inflated.load_state_dict(state, strict=True)
    log.info("Inflated %s from %d to %d input channels (neighbour channels zero)", key,
             old_channels, new_channels)
    return inflated.train(model.training)
