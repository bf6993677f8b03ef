"""The folded SegFormer as an ONNX graph: shipped beside the weights, cached, run without torch.

Where the graph comes from, in this order (:func:`resolve_graph`):

1. **the model folder's own graph** -- ``model.onnx`` listed in ``hrpqct_model.json`` with
   its SHA256 (the bundled model ships one; ``python -m HRpQCTSegmentationEngine.export_onnx
   FOLDER`` adds one to any folder). The file is checked against that checksum before use;
   for the bundled model the metadata itself is checked against the package manifest.
2. **the user cache** -- a graph exported earlier for the same weights and architecture:
   ``$HRPQCT_CACHE_DIR/onnx/<key>.onnx`` (default ``~/.cache/hrpqct/onnx``, or
   ``$XDG_CACHE_HOME/hrpqct/onnx``), with a ``<key>.json`` beside it recording the graph's
   SHA256; a file that does not match it is never used (it is exported again).
3. **exported now** from the weights, which needs torch and transformers (and ``onnx``),
   then stored in the cache.

Graphs are exported with an open batch size and spatial size (rows and columns), so one
graph serves every network input size (:func:`.preprocessing.network_window` fits the input
to each scan's leg); a folder's graph recorded with a fixed ``onnx_input_yx`` (made by an
earlier version) serves only that size.

Running a graph needs only ``onnxruntime`` and numpy (:class:`OnnxSession`): this module
imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.artefacts import sha256_file
from HRpQCTCore.errors import ArtefactError

__all__ = [
    "ONNX_FILE",
    "ONNX_OPSET",
    "CACHE_ENV",
    "OnnxSession",
    "ResolvedGraph",
    "onnxruntime_available",
    "onnx_metadata",
    "folder_graph",
    "cache_dir",
    "cache_key",
    "cached_graph",
    "store_in_cache",
    "resolve_graph",
]

log = logging.getLogger(__name__)

#: File name of a model folder's graph.
ONNX_FILE = "model.onnx"
#: Opset of the exported graphs (the TorchScript exporter's default in fast.export_onnx).
ONNX_OPSET = 17
#: Environment variable naming the cache folder (its ``onnx`` subfolder holds the graphs).
CACHE_ENV = "HRPQCT_CACHE_DIR"
#: Version of the cache entries' layout and of the export recipe; bump to invalidate them.
#: 2: graphs of any spatial size (1: fixed to the model's input size).
CACHE_FORMAT = 2

#: Where each kind of graph came from, as logged and as stored on the runner.
SOURCE_BUNDLED = "bundled graph"
SOURCE_FOLDER = "model folder's graph"
SOURCE_CACHED = "cached graph"
SOURCE_EXPORTED = "exported now"


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime can be imported (all that running a graph needs)."""
    try:
        import onnxruntime  # noqa: F401
    except Exception:  # a broken install counts as missing
        return False
    return True


class OnnxSession:
    """An ONNX Runtime session on the CPU: ``[B, C, H, W]`` float32 in, numpy logits out.

    ``C`` is the graph's input channels (:attr:`num_channels`: 1 for a 2D model, 3 for a
    2.5D one taking z-1, z, z+1).

    Parameters
    ----------
    path:
        The ``.onnx`` file (read into memory: the file may be removed afterwards).
    num_threads:
        Intra-op threads (default: ONNX Runtime's, one per physical core).
    allow_spinning:
        Let idle intra-op threads busy-wait for the next operator (ONNX Runtime's default).
        Off here: on a 2-core CPU shared with anything else (Slicer, a second scan, other
        jobs) the spinning thread competes with the one doing the work. Measured on the
        bundled model at load ~5: 1.9-2.3 s CPU and 1.7-2.3 s wall per slice spinning,
        0.98-1.16 s CPU and 0.92-1.09 s wall not; the logits are bit-identical either way
        (the work is split the same).
    memory_pattern:
        Let ONNX Runtime plan one block for all of a run's intermediate tensors from the first
        run's allocations (its default). Off here: the planned block holds every intermediate
        at once, the arena serving tensors one by one reuses freed ones. Measured on the
        bundled model (800 x 800): +0.52 GiB resident with the pattern, +0.31 without; the
        logits are bit-identical (``benchmarks/bench_onnx_memory.py``).
    """

    def __init__(self, path: str | Path, num_threads: int | None = None, *,
                 allow_spinning: bool = False, memory_pattern: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = bool(memory_pattern)
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "1" if allow_spinning else "0")
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.input_yx = tuple(int(s) for s in shape[-2:]) if all(
            isinstance(s, int) for s in shape[-2:]) else None
        #: Input channels of the graph (None if the graph leaves them open).
        self.num_channels = int(shape[1]) if len(shape) == 4 and isinstance(shape[1], int) \
            else None

    def run(self, pixel_values: Any) -> np.ndarray:
        """Logits ``[B, K, H/4, W/4]`` (float32 numpy) of a numpy array or CPU tensor."""
        array = pixel_values.detach().cpu().numpy() if hasattr(pixel_values, "detach") \
            else np.asarray(pixel_values)
        array = np.ascontiguousarray(array, dtype=np.float32)
        (logits,) = self.session.run(None, {self.input_name: array})
        return logits

    __call__ = run


@dataclass(frozen=True)
class ResolvedGraph:
    """A verified graph file and where it came from (one of the ``SOURCE_*`` strings).

    ``temporary`` graphs (the cache was not writable) are removed once a session holds them.
    """

    path: Path
    source: str
    temporary: bool = False


# ------------------------------------------------------------------------------------------
# The model folder's own graph
# ------------------------------------------------------------------------------------------
def onnx_metadata(onnx_path: Path, weights_sha256: str,
                  input_yx: tuple[int, int] | None = None,
                  opset: int = ONNX_OPSET) -> dict[str, Any]:
    """The keys ``hrpqct_model.json`` gets for a graph exported from its weights.

    ``input_yx`` is the graph's fixed input size, None (recorded as null) for a graph of
    any size (what :func:`.fast.export_onnx` makes).
    """
    return {"onnx_file": onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
            "onnx_weights_sha256": weights_sha256,
            "onnx_input_yx": None if input_yx is None else list(input_yx),
            "onnx_opset": int(opset), "onnx_decoder": "folded"}


def _is_bundled(folder: Path) -> bool:
    resources = (Path(__file__).resolve().parent / "resources").resolve()
    return resources in folder.resolve().parents


def folder_graph(folder: str | Path, metadata, input_yx: tuple[int, int]
                 ) -> ResolvedGraph | None:
    """The folder's listed graph after its checksum check; None if it lists none (or one
    made for other weights, or fixed to another input size than ``input_yx``).

    Raises
    ------
    ArtefactError
        If the listed graph is missing or fails its checksum (a damaged or replaced file
        fails loudly, as damaged weights do).
    """
    folder = Path(folder)
    extra = metadata.extra
    name, expected = extra.get("onnx_file"), extra.get("onnx_sha256")
    if not name or not expected:
        return None
    fixed_yx = extra.get("onnx_input_yx")
    if (extra.get("onnx_weights_sha256") != metadata.weights_sha256
            or (fixed_yx is not None and list(fixed_yx) != list(input_yx))):
        log.info("The ONNX graph in %s is for other weights or another input size; "
                 "not using it", folder)
        return None
    path = folder / Path(str(name)).name  # a bare file name: never a path outside
    if not path.is_file():
        raise ArtefactError(
            f"The model folder {folder} lists the ONNX graph {path.name}, which is missing. "
            "Copy the complete folder again (or reinstall the package for the bundled "
            "model).")
    actual = sha256_file(path)
    if actual != expected:
        raise ArtefactError(
            f"The ONNX graph {path} does not match its checksum in hrpqct_model.json "
            f"(expected {str(expected)[:12]}..., found {actual[:12]}...). The file is damaged "
            "or was replaced: copy the folder again, or re-create the graph with "
            "'python -m HRpQCTSegmentationEngine.export_onnx FOLDER'.")
    return ResolvedGraph(path, SOURCE_BUNDLED if _is_bundled(folder) else SOURCE_FOLDER)


# ------------------------------------------------------------------------------------------
# The user cache
# ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$HRPQCT_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/hrpqct/onnx``, else
    ``~/.cache/hrpqct/onnx``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hrpqct" / "onnx"


def cache_key(folder: str | Path, metadata, opset: int = ONNX_OPSET) -> str:
    """SHA256 naming a cached graph: the weights, the architecture (``config.json``), the
    opset and the export recipe -- everything the exported graph depends on (it takes any
    input size)."""
    import hashlib

    from HRpQCTSegmentationEngine.model import CONFIG_FILE

    config = Path(folder) / CONFIG_FILE
    identity = {"format": CACHE_FORMAT, "weights_sha256": metadata.weights_sha256,
                "config_sha256": sha256_file(config) if config.is_file() else None,
                "architecture": metadata.architecture, "opset": int(opset),
                "decoder": "folded"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _record_path(graph: Path) -> Path:
    return graph.with_suffix(".json")


def cached_graph(key: str, directory: Path | None = None) -> ResolvedGraph | None:
    """The cached graph ``key`` if present and matching the SHA256 recorded beside it."""
    graph = (directory or cache_dir()) / f"{key}.onnx"
    try:
        record = json.loads(_record_path(graph).read_text(encoding="utf-8"))
        expected = record["onnx_sha256"]
        if graph.is_file() and sha256_file(graph) == expected:
            return ResolvedGraph(graph, SOURCE_CACHED)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if graph.exists():
        log.warning("Ignoring the cached ONNX graph %s: it does not match its recorded "
                    "checksum (it is exported again)", graph)
    return None


def store_in_cache(key: str, export: Callable[[Path], Path],
                   directory: Path | None = None) -> Path:
    """Export a graph into the cache with ``export(tmp_path)`` and record its SHA256.

    Both files are written atomically (temporary file, then rename); the record last, so a
    graph without a matching record is never trusted.
    """
    from HRpQCTCore.atomic import atomic_path, write_text_atomic

    directory = directory or cache_dir()
    graph = directory / f"{key}.onnx"
    with atomic_path(graph) as tmp:
        export(tmp)
        digest = sha256_file(tmp)
    write_text_atomic(_record_path(graph), json.dumps(
        {"onnx_sha256": digest, "format": CACHE_FORMAT}, indent=2) + "\n")
    return graph


def resolve_graph(folder: str | Path, metadata, input_yx: tuple[int, int],
                  export: Callable[[Path], Path]) -> ResolvedGraph:
    """The graph to run for a model folder: its own, else the cached one, else exported now.

    ``export(path)`` writes a freshly exported graph to ``path`` (it needs torch); it is
    called only when neither the folder nor the cache has a valid graph. When the cache
    folder cannot be written, the graph goes to a temporary file instead.
    """
    own = folder_graph(folder, metadata, input_yx)
    if own is not None:
        return own
    key = cache_key(folder, metadata)
    cached = cached_graph(key)
    if cached is not None:
        return cached
    try:
        return ResolvedGraph(store_in_cache(key, export), SOURCE_EXPORTED)
    except OSError as exc:
        log.warning("Cannot write the ONNX cache in %s (%s); exporting to a temporary file",
                    cache_dir(), exc)
    tmp = Path(tempfile.mkdtemp(prefix="hrpqct-onnx-")) / ONNX_FILE
    return ResolvedGraph(export(tmp), SOURCE_EXPORTED, temporary=True)
