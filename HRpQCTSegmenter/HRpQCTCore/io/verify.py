"""Read-back checks of written images, run before a temporary file is renamed into place.

SimpleITK writes through its own C++ I/O: a full disk or a file-size limit may surface as a
``RuntimeError`` or, with gzip streams, not at all (a silently short file). So every image the
engine writes is checked before its rename: the header is read back
(``ImageFileReader.ReadImageInformation``) and the voxel data must be all there: for
compressed files the deflate stream must reach its end (gzip also checks its CRC and length),
for raw files the file must hold every voxel byte. Only a few MB are in memory at a time, so
the check also suits multi-GB scans.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

from HRpQCTCore.io.suffixes import compound_suffix

__all__ = ["check_image_file"]

_CHUNK = 1 << 20
#: Largest piece of decompressed data held at once (labels compress ~1000:1).
_MAX_OUT = 1 << 24
#: Header size of a NIfTI-1 file written by ITK (348 bytes and a 4-byte extension flag;
#: NIfTI-2's is larger, so this is a lower bound).
_NIFTI_HEADER = 352


def check_image_file(path: str | Path) -> None:
    """Raise :class:`OSError` unless ``path`` is a complete image file.

    Raises
    ------
    OSError
        If the header cannot be read back, or the voxel data are short or cut off.
    """
    path = Path(path)
    expected = _voxel_bytes(path)
    suffix = compound_suffix(path).lower()
    if suffix == ".nii.gz":
        _check_stream(path, 0, 31, expected)
    elif suffix == ".nii":
        _check_raw(path, _NIFTI_HEADER, expected)
    elif suffix in (".nrrd", ".seg.nrrd"):
        _check_nrrd(path, expected)
    elif suffix == ".mha":
        _check_metaimage(path, expected)


def _voxel_bytes(path: Path) -> int:
    """Bytes of voxel data the header announces (the header read back with SimpleITK)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise OSError(0, f"the written file's header cannot be read back ({_first_line(exc)})"
                      ) from None
    count = 1
    for n in reader.GetSize():
        count *= int(n)
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = re.search(r"(\d+)-bit", name)
    per_component = int(bits.group(1)) // 8 if bits else 1
    return count * per_component * max(1, int(reader.GetNumberOfComponents()))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _short(what: str) -> OSError:
    return OSError(0, f"the written file is incomplete ({what}; was the disk full or a "
                      "file-size limit reached?)")


def _check_raw(path: Path, offset: int, expected: int) -> None:
    size = path.stat().st_size
    if size < offset + expected:
        raise _short(f"{size} bytes, {offset + expected} expected")


def _check_stream(path: Path, offset: int, wbits: int, expected: int) -> None:
    """The deflate stream from ``offset`` ends properly and yields ``expected`` bytes."""
    inflater = zlib.decompressobj(wbits)
    produced = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        try:
            while not inflater.eof:
                chunk = fh.read(_CHUNK)
                if not chunk:
                    break
                produced += len(inflater.decompress(chunk, _MAX_OUT))
                while inflater.unconsumed_tail and not inflater.eof:
                    produced += len(inflater.decompress(inflater.unconsumed_tail, _MAX_OUT))
        except zlib.error as exc:
            raise _short(f"corrupt compressed data: {exc}") from None
    if not inflater.eof:
        raise _short("the compressed data stop before their end")
    if produced < expected:
        raise _short(f"{produced} bytes of voxel data, {expected} expected")


def _header_end(path: Path, marker: bytes) -> tuple[int, bytes]:
    """Offset just after ``marker`` and the header text before it."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    end = head.find(marker)
    if end < 0:
        raise _short("the header has no end")
    return end + len(marker), head[:end]


def _check_nrrd(path: Path, expected: int) -> None:
    offset, header = _header_end(path, b"\n\n")
    if re.search(rb"^data ?file:", header, re.M | re.I):
        return  # detached data (never written here): the header check is all there is
    encoding = re.search(rb"^encoding: *(\w+)", header, re.M | re.I)
    kind = encoding.group(1).lower() if encoding else b"raw"
    if kind in (b"gzip", b"gz"):
        _check_stream(path, offset, 31, expected)
    elif kind == b"raw":
        _check_raw(path, offset, expected)


def _check_metaimage(path: Path, expected: int) -> None:
    offset, header = _header_end(path, b"ElementDataFile = LOCAL\n")
    compressed = re.search(rb"^CompressedData *= *True", header, re.M | re.I)
    if compressed:
        _check_stream(path, offset, 15, expected)
    else:
        _check_raw(path, offset, expected)
