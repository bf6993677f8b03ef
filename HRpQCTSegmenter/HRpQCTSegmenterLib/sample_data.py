"""The sample scan offered in Slicer's Sample Data module: a *generated* synthetic phantom.

Slicer's Sample Data module downloads a file from a URL and checks its SHA256. This project
has no data hosting, and shipping ~80 MB of voxels in the extension would break the
extension index's size limit, so the sample is made on the user's machine instead: the
bundled phantom generator runs with the example's fixed parameters and seed
(:mod:`HRpQCTPhantom.example`, also made by ``hrpqct demo``, here with fewer slices), the
result is written as an uncompressed NRRD whose bytes depend only on the voxels and the
geometry, and its SHA256 is compared with :data:`SAMPLE_SHA256`, recorded when the
sample was defined.

What the checksum does and does not promise: it proves the generated file is the very scan
the self-tests and tutorials were written against. It is not a download integrity check
(nothing is downloaded). The generator is deterministic for a seed, but a different
numpy/scipy (Slicer bundles its own) could in principle change a few voxels; then the
checksum fails and :func:`write_sample_scan` says so instead of silently handing over a
different scan. The scan is synthetic: no patient data, no clinical meaning.

:func:`sample_data_source` gives the arguments of Slicer's
``SampleDataLogic.registerCustomSampleDataSource``: the module file only adds the function
that makes the file before Sample Data loads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.atomic import atomic_path
from HRpQCTCore.errors import ArtefactError
from HRpQCTCore.progress import CancelToken, ProgressCallback
from HRpQCTCore.scan import Scan

__all__ = [
    "SAMPLE_NAME",
    "SAMPLE_FILE_NAME",
    "SAMPLE_NODE_NAME",
    "SAMPLE_SLICES",
    "SAMPLE_SHA256",
    "SAMPLE_CATEGORY",
    "sample_checksum",
    "sample_data_source",
    "nrrd_bytes_header",
    "write_raw_nrrd",
    "generate_sample_scan",
    "write_sample_scan",
]

#: Name in Slicer's Sample Data module.
SAMPLE_NAME = "HRpQCTPhantom"
#: File name in Slicer's cache folder.
SAMPLE_FILE_NAME = "HRpQCTPhantom-v1.nrrd"
#: Node name of the loaded sample.
SAMPLE_NODE_NAME = "HRpQCTPhantom"
#: Slices of the sample (the demo's phantom, shortened so it is made in seconds).
SAMPLE_SLICES = 16
#: SHA256 of :data:`SAMPLE_FILE_NAME` as written by :func:`write_sample_scan`.
SAMPLE_SHA256 = "57ec663d2e9ce5613f8a5693d383e723d0a9deb719272a27fdcee285d35cebac"


#: Category of the sample in Slicer's Sample Data module.
SAMPLE_CATEGORY = "HR-pQCT"


def sample_checksum() -> str:
    """The checksum in Slicer's ``<algo>:<digest>`` form."""
    return f"SHA256:{SAMPLE_SHA256}"


def _number(value: float) -> str:
    # repr() is the shortest text that round-trips, the same on every platform.
    return repr(float(value))


def sample_data_source(cache_folder: str | Path, thumbnail_path: str | Path) -> dict[str, Any]:
    """Keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the sample.

    The address is a ``file://`` URL of the file in Slicer's cache folder (where
    :func:`write_sample_scan` puts it): nothing is downloaded. Sample Data checks the file
    against :data:`SAMPLE_SHA256` before loading it.
    """
    path = Path(cache_folder).absolute() / SAMPLE_FILE_NAME
    return {
        "category": SAMPLE_CATEGORY,
        "sampleName": SAMPLE_NAME,
        "thumbnailFileName": str(thumbnail_path),
        "uris": path.as_uri(),
        "fileNames": SAMPLE_FILE_NAME,
        "nodeNames": SAMPLE_NODE_NAME,
        "checksums": sample_checksum(),
        "loadFileTypes": "VolumeFile",
    }


def nrrd_bytes_header(scan: Scan, dtype: np.dtype, comment: str = "") -> bytes:
    """A NRRD header for ``scan``'s geometry (LPS) and raw little-endian voxels of ``dtype``."""
    types = {np.dtype("int16"): "int16", np.dtype("uint8"): "uint8",
             np.dtype("float32"): "float"}
    if np.dtype(dtype) not in types:
        raise ValueError(f"Unsupported voxel type {dtype}")
    nz, ny, nx = scan.shape
    direction = np.asarray(scan.direction, dtype=float).reshape(3, 3)
    spacing_xyz = tuple(reversed(scan.spacing_mm))
    axes = " ".join(
        "(" + ",".join(_number(direction[row, axis] * spacing_xyz[axis]) for row in range(3))
        + ")" for axis in range(3))
    lines = ["NRRD0004"]
    if comment:
        lines.append(f"# {comment}")
    lines += [f"type: {types[np.dtype(dtype)]}", "dimension: 3",
              "space: left-posterior-superior", f"sizes: {nx} {ny} {nz}",
              f"space directions: {axes}", "kinds: domain domain domain",
              "endian: little", "encoding: raw",
              "space origin: (" + ",".join(_number(v) for v in scan.origin_mm) + ")"]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_raw_nrrd(scan: Scan, path: str | Path, dtype: str = "int16",
                   comment: str = "") -> str:
    """Write ``scan.hu`` as an uncompressed NRRD (atomically); returns the file's SHA256.

    The bytes depend only on the voxels and the geometry (no dates, no compression library),
    so the same scan always gives the same file and checksum.
    """
    values = np.asarray(scan.hu)
    target = np.dtype(dtype).newbyteorder("<")
    if np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        if values.size and (values.min() < info.min or values.max() > info.max
                            or not np.array_equal(values, np.rint(values))):
            raise ValueError(f"The voxels are not integers within the {dtype} range")
    header = nrrd_bytes_header(scan, np.dtype(dtype), comment)
    digest = hashlib.sha256(header)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(header)
        for z in range(values.shape[0]):  # slice by slice: no full-size converted copy
            chunk = np.ascontiguousarray(values[z], dtype=target).tobytes()
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def generate_sample_scan(progress: ProgressCallback | None = None,
                         cancel: CancelToken | None = None) -> Scan:
    """The sample phantom (the example's parameters and seed, :data:`SAMPLE_SLICES` slices)."""
    from HRpQCTPhantom import generate_phantom
    from HRpQCTPhantom.example import EXAMPLE_SEED, example_params

    phantom = generate_phantom(example_params(SAMPLE_SLICES), seed=EXAMPLE_SEED,
                               progress=progress, cancel=cancel)
    return phantom.scan


def write_sample_scan(folder: str | Path, *, verify: bool = True,
                      progress: ProgressCallback | None = None,
                      cancel: CancelToken | None = None,
                      generate: Callable[..., Scan] = generate_sample_scan) -> Path:
    """Make the sample scan in ``folder`` (reused if present and intact); returns its path.

    Raises
    ------
    ArtefactError
        If ``verify`` and the file's SHA256 differs from :data:`SAMPLE_SHA256` (the file is
        removed so a later call starts afresh).
    """
    from HRpQCTCore.artefacts import sha256_file

    path = Path(folder) / SAMPLE_FILE_NAME
    if path.is_file() and sha256_file(path) == SAMPLE_SHA256:
        return path
    scan = generate(progress=progress, cancel=cancel)
    digest = write_raw_nrrd(scan, path, comment=(
        "Synthetic HR-pQCT phantom (HRpQCTSegmenter sample data, seed-generated): not a "
        "patient scan, research use only. Voxels in HU."))
    if verify and digest != SAMPLE_SHA256:
        path.unlink(missing_ok=True)
        raise ArtefactError(
            f"The generated sample scan differs from the reference (SHA256 {digest[:12]}..., "
            f"expected {SAMPLE_SHA256[:12]}...). The phantom generator gave different voxels "
            "with this installation's numpy/scipy; please report it. Your own scans are not "
            "affected.")
    return path
