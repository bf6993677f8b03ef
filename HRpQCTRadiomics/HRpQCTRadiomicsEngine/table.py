"""Feature tables as CSV: the documented schema, atomic writing, and reading back.

Wide format (default), one row per region and slice (or per region in per-scan mode):

=================  ========================================================================
column             meaning
=================  ========================================================================
scan               scan identifier (file stem or user-given); never a patient name
subject            subject identifier (user-given; groups slices and scans of one person)
slice              0-based slice index ``z`` of the scan array; ``all`` in per-scan mode
region             region key from ``regions.REGIONS`` (e.g. ``adipose``)
region_label       region label value (1..7)
voxel_count        voxels of the region in that slice (scan)
status             ``ok``, ``skipped`` (absent or too small) or ``failed`` (pyradiomics error)
reason             why a region was skipped or failed; empty when ok
settings           name of the radiomics settings (preset) used
settings_sha256    SHA256 of the settings YAML text
<feature>...       one column per feature, pyradiomics names ``<image>_<class>_<feature>``
                   (e.g. ``wavelet-LH_glcm_Contrast``); empty for skipped/failed rows
=================  ========================================================================

Long format (``long=True``): the ten identifying columns, then ``feature`` and ``value``;
one line per feature, and one line with empty ``feature`` for a skipped/failed region.

Floats are written with ``repr`` (shortest form that reads back to the same double).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from HRpQCTCore.atomic import write_text_atomic
from HRpQCTCore.errors import InputFileError
from HRpQCTCore.io.textfiles import ensure_text_file
from HRpQCTCore.regions import region_by_label
from HRpQCTRadiomicsEngine.extraction import STATUS_OK, FeatureTable

__all__ = [
    "ID_COLUMNS",
    "LONG_COLUMNS",
    "table_to_csv_text",
    "write_feature_csv",
    "FeatureRows",
    "read_feature_csv",
]

ID_COLUMNS: tuple[str, ...] = (
    "scan", "subject", "slice", "region", "region_label", "voxel_count", "status", "reason",
    "settings", "settings_sha256",
)
LONG_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, "feature", "value")


def _format(value: float | None) -> str:
    if value is None:
        return ""
    value = float(value)
    if math.isnan(value):
        return "nan"
    return repr(value)


def _id_values(table: FeatureTable, row) -> list[str]:
    return [
        table.scan, table.subject,
        "all" if row.slice_index is None else str(row.slice_index),
        region_by_label(row.region_label).key, str(row.region_label), str(row.voxel_count),
        row.status, row.reason,
        str(table.settings.get("name", "")), str(table.settings.get("sha256", "")),
    ]


def table_to_csv_text(tables: FeatureTable | Sequence[FeatureTable], long: bool = False) -> str:
    """CSV text of one or more tables (several scans go into one file)."""
    if isinstance(tables, FeatureTable):
        tables = [tables]
    names: dict[str, None] = {}
    for t in tables:
        for n in t.feature_names:
            names.setdefault(n, None)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if long:
        writer.writerow(LONG_COLUMNS)
        for t in tables:
            for row in t.rows:
                ids = _id_values(t, row)
                if row.status != STATUS_OK or not row.features:
                    writer.writerow([*ids, "", ""])
                    continue
                for name, value in row.features.items():
                    writer.writerow([*ids, name, _format(value)])
    else:
        feature_names = list(names)
        writer.writerow([*ID_COLUMNS, *feature_names])
        for t in tables:
            for row in t.rows:
                values = [_format(row.features.get(n)) if row.status == STATUS_OK else ""
                          for n in feature_names]
                writer.writerow([*_id_values(t, row), *values])
    return buffer.getvalue()


def write_feature_csv(path: str | Path, tables: FeatureTable | Sequence[FeatureTable],
                      long: bool = False) -> Path:
    """Write tables as CSV atomically (temporary file, then rename)."""
    path = Path(path)
    write_text_atomic(path, table_to_csv_text(tables, long=long))
    return path


@dataclass
class FeatureRows:
    """Feature rows read from wide CSV files.

    Attributes
    ----------
    ids:
        One dict per row with the identifying columns (strings).
    feature_names:
        Feature column names, in file order.
    values:
        ``float64`` array ``(rows, features)``; NaN where empty.
    """

    ids: list[dict[str, str]]
    feature_names: list[str]
    values: np.ndarray

    def where(self, **conditions: str) -> np.ndarray:
        """Boolean row mask for identifying columns equal to the given strings."""
        keep = np.ones(len(self.ids), dtype=bool)
        for key, wanted in conditions.items():
            keep &= np.array([r.get(key) == wanted for r in self.ids], dtype=bool)
        return keep


def read_feature_csv(paths: str | Path | Iterable[str | Path]) -> FeatureRows:
    """Read wide feature CSVs written by :func:`write_feature_csv` (several files: union).

    Raises
    ------
    InputFileError
        If a file is missing or is not a feature table (identifying columns absent).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    ids: list[dict[str, str]] = []
    rows_values: list[dict[str, str]] = []
    names: dict[str, None] = {}
    for path in paths:
        path = ensure_text_file(path, "Feature table", "a feature table (CSV)")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in ID_COLUMNS if c not in header]
            if missing:
                hint = (" It looks like a long-format table; write the wide format for training."
                        if "feature" in header else "")
                raise InputFileError(
                    f"{path} is not a wide feature table from `hrpqct radiomics`: columns "
                    f"{missing} are missing.{hint}")
            for n in header:
                if n not in ID_COLUMNS:
                    names.setdefault(n, None)
            for record in reader:
                ids.append({c: record[c] or "" for c in ID_COLUMNS})
                rows_values.append((path, reader.line_num, record))
    feature_names = list(names)
    values = np.full((len(ids), len(feature_names)), np.nan, dtype=np.float64)
    for i, (path, line, record) in enumerate(rows_values):
        for j, n in enumerate(feature_names):
            text = record.get(n) or ""
            if text:
                values[i, j] = _number(text, path, line, n)
    return FeatureRows(ids=ids, feature_names=feature_names, values=values)


def _number(text: str, path: Path, line: int, column: str) -> float:
    """A feature value, or a message naming the file, line and column of one that is not."""
    try:
        return float(text)
    except ValueError:
        raise InputFileError(
            f"{path}, line {line}, column {column!r}: {text[:40]!r} is not a number. A feature "
            "table holds numbers (or empty cells); write it again with `hrpqct radiomics`, or "
            "fix that cell.") from None
