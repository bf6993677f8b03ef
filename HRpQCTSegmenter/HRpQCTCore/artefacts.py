"""Bundled artefacts (terminology, model weights, classifier, example scan) and their checksums.

Every file the engine ships and later loads is listed in ``resources/artefacts.json`` with its
SHA256. Loading goes through :func:`verified_path`, which refuses a file whose checksum does not
match: a corrupted download or a swapped file fails loudly instead of giving wrong results.
User-supplied artefacts (own weights, own classifier) carry their checksum in their own folder
and are verified by the loader that reads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from HRpQCTCore.errors import ArtefactError

__all__ = ["Artefact", "MANIFEST_NAME", "list_artefacts", "verified_path", "sha256_file",
           "register_artefact"]

MANIFEST_NAME = "artefacts.json"
#: Packages whose ``resources/*artefacts.json`` manifests are searched, in this order: the
#: core's (terminology), the segmentation engine's (models), the radiomics engine's
#: (classifier). Names only: the core imports none of them.
ARTEFACT_PACKAGES = ("HRpQCTCore", "HRpQCTSegmentationEngine", "HRpQCTRadiomicsEngine")


@dataclass(frozen=True)
class Artefact:
    """One bundled file."""

    name: str
    path: Path
    sha256: str
    kind: str
    description: str

    @property
    def present(self) -> bool:
        """Whether the file exists on disk."""
        return self.path.is_file()

    def verify(self) -> bool:
        """Whether the file exists and its SHA256 matches the manifest."""
        return self.present and sha256_file(self.path) == self.sha256


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _resources_dir(package: str) -> Path:
    return Path(str(resources.files(package) / "resources"))


def list_artefacts(packages: tuple[str, ...] = ARTEFACT_PACKAGES
                   ) -> list[Artefact]:
    """All artefacts declared in the manifests of the given engine packages."""
    found: list[Artefact] = []
    for package in packages:
        try:
            base = _resources_dir(package)
        except ModuleNotFoundError:
            continue
        # one manifest per package; names differ (e.g. radiomics-artefacts.json) because
        # Slicer finds module resources by file name
        for manifest in sorted(base.glob(f"*{MANIFEST_NAME}")):
            for entry in json.loads(manifest.read_text(encoding="utf-8"))["artefacts"]:
                found.append(Artefact(
                    name=entry["name"], path=base / entry["file"], sha256=entry["sha256"],
                    kind=entry.get("kind", ""), description=entry.get("description", "")))
    return found


def verified_path(name: str) -> Path:
    """Path of the bundled artefact ``name`` after checking its SHA256.

    Raises
    ------
    ArtefactError
        If the artefact is unknown, missing, or its checksum does not match.
    """
    for artefact in list_artefacts():
        if artefact.name == name:
            if not artefact.present:
                raise ArtefactError(
                    f"Bundled artefact {name!r} is missing ({artefact.path}). Reinstall the "
                    "package (pip install --force-reinstall hrpqct-segmenter).")
            actual = sha256_file(artefact.path)
            if actual != artefact.sha256:
                raise ArtefactError(
                    f"Bundled artefact {name!r} at {artefact.path} fails its checksum "
                    f"(expected {artefact.sha256[:12]}..., found {actual[:12]}...). The file is "
                    "damaged or was replaced; reinstall the package.")
            return artefact.path
    known = ", ".join(a.name for a in list_artefacts()) or "none"
    raise ArtefactError(f"No bundled artefact named {name!r} (bundled: {known})")


def register_artefact(resources_dir: str | Path, name: str, file: str, kind: str,
                      description: str, manifest_name: str = MANIFEST_NAME) -> Artefact:
    """Add (or update) an entry of ``resources_dir/artefacts.json`` with the file's SHA256.

    For maintainers bundling a new model or classifier: copy the file under
    ``resources_dir`` first; ``file`` is its path relative to that folder. The manifest is
    rewritten atomically, entries keep their order, and an entry of the same name is replaced.
    ``manifest_name`` must end with ``artefacts.json`` (each package's manifest has its own
    name, as Slicer finds resources by file name).
    """
    from HRpQCTCore.atomic import write_text_atomic

    base = Path(resources_dir)
    path = base / file
    if not path.is_file():
        raise ArtefactError(f"Cannot register {name!r}: {path} does not exist.")
    if not manifest_name.endswith(MANIFEST_NAME):
        raise ValueError(f"A manifest name must end with {MANIFEST_NAME}: {manifest_name!r}")
    manifest = base / manifest_name
    entries = (json.loads(manifest.read_text(encoding="utf-8"))["artefacts"]
               if manifest.is_file() else [])
    entry = {"name": name, "file": Path(file).as_posix(), "sha256": sha256_file(path),
             "kind": kind, "description": description}
    for i, old in enumerate(entries):
        if old["name"] == name:
            entries[i] = entry
            break
    else:
        entries.append(entry)
    write_text_atomic(manifest, json.dumps({"artefacts": entries}, indent=2) + "\n")
    return Artefact(name, path, entry["sha256"], kind, description)
