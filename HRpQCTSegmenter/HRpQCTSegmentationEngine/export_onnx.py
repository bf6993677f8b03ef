"""Add the folded ONNX graph to a model folder, so that it segments without torch.

Usage::

    python -m HRpQCTSegmentationEngine.export_onnx MODEL_FOLDER

loads the folder's weights (after their checksum check), exports the exact folded model
(:func:`.fast.export_onnx`; any input size, the folder's input channels: three
for a 2.5D model, ``slice_context`` 1) to ``model.onnx`` and records
the graph's SHA256 in ``hrpqct_model.json`` (both written atomically). For the bundled model
the package manifest (``resources/segmentation-artefacts.json``) is updated too: the metadata
file changed, and the graph becomes an artefact of its own. Needs torch, transformers and
onnx; running the graph later needs only onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from HRpQCTCore.artefacts import register_artefact
from HRpQCTCore.atomic import write_text_atomic
from HRpQCTSegmentationEngine.model import METADATA_FILE, load_model, read_model_metadata
from HRpQCTSegmentationEngine.onnx_graph import ONNX_FILE, ONNX_OPSET, onnx_metadata

__all__ = ["add_onnx_graph", "register_bundled", "main"]

log = logging.getLogger(__name__)

RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
MANIFEST_NAME = "segmentation-artefacts.json"
ONNX_DESCRIPTION = ("Bundled segmentation model: the exact folded network as an ONNX graph "
                    "(runs with onnxruntime alone; made by 'python -m "
                    "HRpQCTSegmentationEngine.export_onnx')")


def add_onnx_graph(folder: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Export ``folder``'s model to ``folder/model.onnx`` and record it in its metadata.

    Parameters
    ----------
    folder:
        A model folder written by :func:`.model.save_model` (a SegFormer).
    opset:
        ONNX opset of the graph.

    Returns
    -------
    Path
        The graph file.
    """
    from HRpQCTSegmentationEngine.fast import export_onnx

    folder = Path(folder)
    metadata = read_model_metadata(folder)
    if metadata.architecture != "segformer":
        raise ValueError(f"Only SegFormer folders get an ONNX graph, not {metadata.architecture}")
    model = load_model(folder, device="cpu")
    input_yx = metadata.preprocessing.input_yx
    graph = export_onnx(model, folder / ONNX_FILE, input_yx=input_yx, opset=opset)
    meta_path = folder / METADATA_FILE
    raw = json.loads(meta_path.read_text(encoding="utf-8"))
    raw.update(onnx_metadata(graph, metadata.weights_sha256, None, opset))
    # same layout as save_model writes, so the file stays diff-friendly
    write_text_atomic(meta_path, json.dumps(raw, indent=2, default=str) + "\n")
    return graph


def _manifest_entries() -> list[dict]:
    manifest = RESOURCES_DIR / MANIFEST_NAME
    return json.loads(manifest.read_text(encoding="utf-8"))["artefacts"]


def register_bundled(folder: str | Path) -> str | None:
    """Re-register a bundled folder's metadata and graph in the manifest.

    Returns the bundled model's artefact name, or None if ``folder`` is not bundled.
    """
    folder = Path(folder).resolve()
    try:
        relative = folder.relative_to(RESOURCES_DIR)
    except ValueError:
        return None
    meta_file = (relative / METADATA_FILE).as_posix()
    entry = next((e for e in _manifest_entries() if e["file"] == meta_file), None)
    if entry is None:
        return None
    name = entry["name"]
    register_artefact(RESOURCES_DIR, name, meta_file, entry.get("kind", ""),
                      entry.get("description", ""), manifest_name=MANIFEST_NAME)
    register_artefact(RESOURCES_DIR, f"{name}:onnx", (relative / ONNX_FILE).as_posix(),
                      entry.get("kind", ""), ONNX_DESCRIPTION, manifest_name=MANIFEST_NAME)
    return name


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m HRpQCTSegmentationEngine.export_onnx", description=__doc__.split(
            "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="model folder (from 'hrpqct train-segmenter')")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    graph = add_onnx_graph(args.folder, opset=args.opset)
    name = register_bundled(args.folder)
    print(f"wrote {graph} ({graph.stat().st_size / 1e6:.1f} MB) and its SHA256 in "
          f"{METADATA_FILE}" + (f"; re-registered {name!r} in {MANIFEST_NAME}" if name else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
