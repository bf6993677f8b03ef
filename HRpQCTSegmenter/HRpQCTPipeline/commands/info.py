"""``hrpqct info``: versions, compute devices and bundled artefacts."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform

ORDER = 0

_DISTRIBUTIONS = (
    "hrpqct-segmenter", "numpy", "scipy", "SimpleITK", "scikit-image", "scikit-learn",
    "torch", "transformers", "safetensors", "pyradiomics-bhklab", "pyradiomics",
    "aimio-py", "onnxruntime", "slicer-core",
)


def collect_info() -> dict:
    """Versions, devices and artefact status as a JSON-ready dict."""
    from HRpQCTCore.artefacts import list_artefacts

    versions = {}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    devices: dict = {"cpu": {"threads": None}}
    try:
        import torch

        devices["cpu"]["threads"] = torch.get_num_threads()
        devices["cuda"] = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
        mps = getattr(torch.backends, "mps", None)
        devices["mps"] = bool(mps and mps.is_available())
    except ImportError:
        devices["torch"] = "not installed"
    artefacts = [
        {"name": a.name, "kind": a.kind, "file": str(a.path), "present": a.present,
         "checksum_ok": a.verify(), "description": a.description}
        for a in list_artefacts()
    ]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "devices": devices,
        "artefacts": artefacts,
    }


def model_info(folder: str) -> dict:
    """Identity and checksum status of a model folder (``hrpqct info --model``)."""
    from pathlib import Path

    from HRpQCTCore.artefacts import sha256_file
    from HRpQCTSegmentationEngine.model import WEIGHTS_FILE
    from HRpQCTSegmentationEngine.model_card import MODEL_CARD_FILE, model_identity

    identity = model_identity(folder)  # raises ModelFolderError (exit 6) for a bad folder
    weights = Path(folder) / WEIGHTS_FILE
    identity["checksum_ok"] = weights.is_file() and \
        sha256_file(weights) == identity["weights_sha256"]
    card = Path(folder) / MODEL_CARD_FILE
    identity["model_card"] = str(card) if card.is_file() else None
    return identity


def _print_model(model: dict) -> None:
    print(f"Model {model['name']} ({model['architecture']} {model['variant']}) in "
          f"{model['folder']}")
    print(f"  weights sha256 {model['weights_sha256']} "
          f"{'ok' if model['checksum_ok'] else 'CHECKSUM MISMATCH'}")
    print(f"  input: {model['input']}")
    parent = model.get("parent") or {}
    if parent:
        print(f"  fine-tuned from {parent.get('name')} (sha256 {parent.get('weights_sha256')})")
    if model["synthetic_caveat"]:
        print("  trained on synthetic phantoms (or descended from such a model): research "
              "use only")
    if model["model_card"]:
        print(f"  model card {model['model_card']}")


def run(args: argparse.Namespace) -> int:
    info = collect_info()
    if getattr(args, "model", None):
        info["model"] = model_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"Python {info['python']} on {info['platform']}")
    print("Packages:")
    for name, version in info["versions"].items():
        print(f"  {name:20s} {version or '-'}")
    dev = info["devices"]
    print("Devices:")
    print(f"  cpu     threads={dev['cpu']['threads']}")
    if "cuda" in dev:
        print(f"  cuda    {', '.join(dev['cuda']) or 'not available'}")
        print(f"  mps     {'available' if dev['mps'] else 'not available'}")
    print("Bundled artefacts:")
    for a in info["artefacts"]:
        status = "ok" if a["checksum_ok"] else ("CHECKSUM MISMATCH" if a["present"] else "MISSING")
        print(f"  {a['name']:28s} {a['kind']:12s} {status}")
    if "model" in info:
        _print_model(info["model"])
    bad = [a for a in info["artefacts"] if not a["checksum_ok"]]
    if "model" in info and not info["model"]["checksum_ok"]:
        return 6
    return 6 if bad else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="show versions, devices and bundled artefacts",
        description="Show package versions, compute devices and the bundled artefacts with "
                    "their checksum status. Exit code 6 if an artefact fails its checksum.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--model", metavar="FOLDER",
                   help="also show a model folder's name, weights checksum, parent and "
                        "slice context (2D or 2.5D input)")
    p.set_defaults(func=run)
