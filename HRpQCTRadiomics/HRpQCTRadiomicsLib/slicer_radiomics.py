"""The HRpQCTRadiomics Slicer module's logic without Qt: segments -> regions -> features -> tables.

Everything the module does that does not need Qt lives here, so it runs (and is tested) in
plain Python with ``slicer-core``:

* :func:`map_segments` -- which segment of a (possibly user-corrected) segmentation is which
  of the seven regions: by terminology first (type code, and anatomic region where the type
  is shared, e.g. cortical bone of tibia vs fibula), then by segment name or region key
  (case-insensitive); missing regions, unknown and duplicate segments are reported in words.
* :func:`region_labels_from_mapping` -- the mapped segments as the engine's region label map
  on the volume's voxel grid (through :mod:`HRpQCTCore.slicer_bridge`).
* :class:`RadiomicsParameters` -- mode (``prediction``: only what the classifiers need;
  ``features``: full export), classifier files, settings, region/slice subsets.
* :class:`RadiomicsRun` -- extraction in a worker thread with progress and a
  :class:`~HRpQCTCore.progress.CancelToken`, polled from the GUI (a ``QTimer``);
  results go into table nodes in the caller's (GUI) thread.
* :func:`fill_feature_table_node`, :func:`fill_probability_table_node`,
  :func:`write_features_csv` -- results in MRML tables (the CSV schema of :mod:`.table`) and
  as an atomically written CSV.
* :func:`start_radiomics` (the Apply button) and :func:`run_radiomics` (scripts, self-tests),
  which the module's Logic calls; :func:`check_pyradiomics` says how to get pyradiomics into
  Slicer when it is missing.

Why a worker thread and not a ``hrpqct radiomics`` subprocess like the segmenter: the heavy
work already runs in the engine's worker processes (``n_jobs``), so the thread only waits; it
needs no temporary copy of the scan on disk (a full scan is ~0.9 GB), prediction mode passes
the classifier's feature list straight to :func:`~.extraction.extract_features` (the command
line has no such option), and cancel is the engine's own token, checked between slices.

``slicer`` and ``vtk`` are imported inside functions, so this module imports without Slicer.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore import slicer_bridge
from HRpQCTCore.background.process import JobState
from HRpQCTCore.errors import CancelledError, HRpQCTError
from HRpQCTCore.parameter_schema import node_field, values_from_node
from HRpQCTCore.progress import CancelToken
from HRpQCTCore.regions import REGIONS, LabelDefinition, region_by_label, region_by_name

__all__ = [
    "MODE_CHOICES",
    "MODE_PREDICTION",
    "MODE_FEATURES",
    "CAVEAT_ATTRIBUTE",
    "RESEARCH_USE",
    "SegmentMapping",
    "terminology_codes",
    "region_of_terminology",
    "map_segments",
    "region_labels_from_mapping",
    "bundled_classifier_paths",
    "RadiomicsParameters",
    "feature_request",
    "fill_feature_table_node",
    "probability_rows",
    "fill_probability_table_node",
    "write_features_csv",
    "RadiomicsRun",
    "check_pyradiomics",
    "start_radiomics",
    "run_radiomics",
]

MODE_PREDICTION = "prediction"
MODE_FEATURES = "features"
#: The module's modes: only the classifiers' features (fast), or every feature of the settings.
MODE_CHOICES = (MODE_PREDICTION, MODE_FEATURES)

#: Table node attribute holding the caveat that goes with every probability.
CAVEAT_ATTRIBUTE = "HRpQCT.Caveat"
RESEARCH_USE = "Research use only"


# ------------------------------------------------------------------------------------------
# segments -> regions
# ------------------------------------------------------------------------------------------
def terminology_codes(tag: str) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """``((type scheme, type value), (region scheme, region value))`` of a terminology tag.

    The tag is Slicer's ``context~category~type~typeModifier~regionContext~region~modifier``
    with coded parts ``scheme^value^meaning``; None when the tag holds no type code.
    """
    parts = (tag or "").split("~")
    if len(parts) < 3:
        return None

    def code(text: str) -> tuple[str, str]:
        pieces = text.split("^")
        return (pieces[0].strip(), pieces[1].strip()) if len(pieces) >= 2 else ("", "")

    type_code = code(parts[2])
    if not type_code[1]:
        return None
    region_code = code(parts[5]) if len(parts) > 5 else ("", "")
    return type_code, region_code


def region_of_terminology(tag: str,
                          regions: Sequence[LabelDefinition] = REGIONS) -> LabelDefinition | None:
    """The region whose terminology matches ``tag``: type code, then anatomic region if needed.

    Cortical (or trabecular) bone of the tibia and of the fibula share a type code; their
    anatomic region tells them apart. A tag whose type fits several regions and whose region
    fits none of them is not matched (None).
    """
    codes = terminology_codes(tag)
    if codes is None:
        return None
    type_code, region_code = codes
    candidates = [d for d in regions if d.terminology is not None
                  and (d.terminology.type.scheme, d.terminology.type.value) == type_code]
    if len(candidates) > 1:
        candidates = [d for d in candidates if (d.terminology.region.scheme,
                                                 d.terminology.region.value) == region_code]
    return candidates[0] if len(candidates) == 1 else None


@dataclass
class SegmentMapping:
    """Which segment is which region.

    Attributes
    ----------
    segment_of_region:
        Region label -> segment ID.
    how:
        Region label -> ``"terminology"`` or ``"name"``.
    unknown_segments:
        Names of segments that match no region (ignored).
    duplicate_segments:
        Names of segments matching a region another segment already has (ignored).
    segment_names:
        Segment ID -> segment name (for messages).
    """

    segment_of_region: dict[int, str] = field(default_factory=dict)
    how: dict[int, str] = field(default_factory=dict)
    unknown_segments: list[str] = field(default_factory=list)
    duplicate_segments: list[str] = field(default_factory=list)
    segment_names: dict[str, str] = field(default_factory=dict)

    def missing_regions(self, wanted: Sequence[int] | None = None) -> list[LabelDefinition]:
        """Regions (of ``wanted`` labels; default all seven) that no segment provides."""
        labels = [d.label for d in REGIONS] if wanted is None else list(wanted)
        return [region_by_label(lab) for lab in labels if lab not in self.segment_of_region]

    def message(self, wanted: Sequence[int] | None = None) -> str:
        """What was not found, in words with what to do; empty when all is well."""
        lines = []
        missing = self.missing_regions(wanted)
        if missing:
            lines.append(
                "No segment for region(s): " + ", ".join(d.name for d in missing) + ". Name a "
                "segment like the region (e.g. '" + missing[0].name + "' or '" + missing[0].key
                + "') or give it the region's terminology in the Segment Editor.")
        if self.unknown_segments:
            lines.append("Segments that are no HR-pQCT region (ignored): "
                         + ", ".join(repr(n) for n in self.unknown_segments) + ".")
        if self.duplicate_segments:
            lines.append("Segments for a region that another segment already provides "
                         "(ignored; merge them in the Segment Editor): "
                         + ", ".join(repr(n) for n in self.duplicate_segments) + ".")
        return "\n".join(lines)


def map_segments(segmentation_node: Any,
                 regions: Sequence[LabelDefinition] = REGIONS) -> SegmentMapping:
    """Map the node's segments to regions: terminology first, then name or key.

    All segments are matched by terminology before any by name, so a segment renamed by the
    user keeps its region when its terminology says which it is.
    """
    segmentation = segmentation_node.GetSegmentation()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segments.append((segment_id, segmentation.GetSegment(segment_id)))
    mapping = SegmentMapping(segment_names={sid: s.GetName() for sid, s in segments})
    matched: set[str] = set()

    def take(definition: LabelDefinition, segment_id: str, how: str) -> None:
        matched.add(segment_id)
        if definition.label in mapping.segment_of_region:
            mapping.duplicate_segments.append(mapping.segment_names[segment_id])
        else:
            mapping.segment_of_region[definition.label] = segment_id
            mapping.how[definition.label] = how

    for segment_id, segment in segments:
        definition = region_of_terminology(segment.GetTerminology(), regions)
        if definition is not None:
            take(definition, segment_id, "terminology")
    for segment_id, segment in segments:
        if segment_id in matched:
            continue
        try:
            definition = region_by_name(segment.GetName())
        except KeyError:
            definition = None
        if definition is None or definition not in regions:
            mapping.unknown_segments.append(segment.GetName())
        else:
            take(definition, segment_id, "name")
    return mapping


def region_labels_from_mapping(segmentations_logic: Any, segmentation_node: Any,
                               volume_node: Any, mapping: SegmentMapping) -> np.ndarray:
    """The mapped segments as a ``[z, y, x]`` uint8 region label map on the volume's grid.

    Rasterised by :func:`~HRpQCTCore.slicer_bridge.labels_from_segmentation_node`
    with each region named as its segment is. Two segments with one name would be ambiguous
    there, so that is refused with what to do.
    """
    segmentation = segmentation_node.GetSegmentation()
    renamed = []
    for label, segment_id in sorted(mapping.segment_of_region.items()):
        name = mapping.segment_names[segment_id]
        if segmentation.GetSegmentIdBySegmentName(name) != segment_id:
            raise HRpQCTError(f"Several segments are named {name!r}: rename or merge them in "
                              "the Segment Editor so each region has one segment.")
        renamed.append(replace(region_by_label(label), name=name))
    return slicer_bridge.labels_from_segmentation_node(
        segmentations_logic, segmentation_node, volume_node, renamed)


# ------------------------------------------------------------------------------------------
# parameters and classifiers
# ------------------------------------------------------------------------------------------
def bundled_classifier_paths() -> list[Path]:
    """The classifier shipped with the extension (checksum verified), or an empty list.

    Used in prediction mode when the user chose no classifier file.
    """
    from HRpQCTRadiomicsEngine.model_io import bundled_classifier_path

    path = bundled_classifier_path()
    return [] if path is None else [path]


def _paths_from_node(path: str | None) -> list[str]:
    """The node keeps one classifier path (empty: none); the run takes a list."""
    return [str(path)] if path else []


@dataclass
class RadiomicsParameters:
    """The user's choices for one run (the module's parameter node is generated from the
    fields made with :func:`~HRpQCTCore.parameter_schema.node_field`).

    Attributes
    ----------
    mode:
        ``"prediction"`` (only the classifiers' features, then probabilities) or
        ``"features"`` (every feature of ``settings``; probabilities too if classifiers are
        given).
    classifier_paths:
        Classifier JSON files from ``hrpqct train-classifier``.
    settings:
        Radiomics preset or YAML path for full export (prediction uses the classifiers').
    regions:
        Region labels to extract in full-export mode (None: all seven).
    slices:
        Slice indices (None: all).
    n_jobs:
        Worker processes (None: CPU cores).
    """

    mode: str = node_field("mode", MODE_FEATURES, choices=MODE_CHOICES)
    # node_field returns a dataclasses.field: the list is made per instance.
    classifier_paths: list[str] = node_field(  # noqa: RUF009
        "classifierPath", default_factory=list, node_type=str, node_default="",
        from_node=_paths_from_node)
    settings: str = "paper"
    regions: list[int] | None = None
    slices: list[int] | None = None
    n_jobs: int | None = None

    @classmethod
    def from_parameter_node(cls, parameter_node: Any = None,
                            **overrides: Any) -> RadiomicsParameters:
        """The choices of the module's parameter node, or the defaults without one, then
        ``overrides`` (field name -> value)."""
        values = {} if parameter_node is None else values_from_node(cls, parameter_node)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"RadiomicsParameters has no field {sorted(unknown)[0]!r}")
        return cls(**{**values, **overrides})

    def problems(self) -> list[str]:
        """What is wrong with the choices, each with what to do (empty when valid)."""
        found = []
        if self.mode not in MODE_CHOICES:
            found.append(f"Unknown mode {self.mode!r}: choose {' or '.join(MODE_CHOICES)}.")
        if self.mode == MODE_PREDICTION and not self.effective_classifier_paths():
            found.append("Prediction needs a classifier file, and the bundled classifier is "
                         "missing from this installation: choose one made by 'hrpqct "
                         "train-classifier', or choose full feature export.")
        for path in self.classifier_paths:
            if not Path(path).is_file():
                found.append(f"Classifier file {path} does not exist: choose the .json file "
                             "written by 'hrpqct train-classifier'.")
        return found

    def effective_classifier_paths(self) -> list[str]:
        """The chosen classifier files; in prediction mode without one, the bundled classifier.

        Full export applies only classifiers the user chose (its regions and settings may not
        hold the bundled classifier's features).
        """
        if self.classifier_paths or self.mode != MODE_PREDICTION:
            return list(self.classifier_paths)
        return [str(p) for p in bundled_classifier_paths()]

    def validate(self) -> None:
        """Raise :class:`HRpQCTError` listing :meth:`problems`, if any."""
        found = self.problems()
        if found:
            raise HRpQCTError(" ".join(found))


def feature_request(classifiers: Sequence[Any]) -> tuple[dict[int, list[str]], Any]:
    """What prediction mode extracts: region label -> feature names, and the settings.

    All classifiers must have been trained with the same radiomics settings (one extraction
    serves them all).
    """
    from HRpQCTRadiomicsEngine.classification import split_qualified_name

    if not classifiers:
        raise HRpQCTError("No classifier given: prediction needs one.")
    hashes = {c.settings.get("sha256") for c in classifiers}
    if len(hashes) > 1:
        raise HRpQCTError("The classifiers were trained with different radiomics settings; "
                          "run them one at a time.")
    request: dict[int, list[str]] = {}
    for classifier in classifiers:
        for name in classifier.features:
            region, feature = split_qualified_name(name)
            names = request.setdefault(region_by_name(region).label, [])
            if feature not in names:
                names.append(feature)
    return request, classifiers[0].radiomics_settings()


# ------------------------------------------------------------------------------------------
# results: table nodes, CSV, probabilities
# ------------------------------------------------------------------------------------------
def _csv_records(table: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the engine's CSV text (the one schema for files and table nodes)."""
    from HRpQCTRadiomicsEngine.table import table_to_csv_text

    reader = csv.reader(io.StringIO(table_to_csv_text(table)))
    header = next(reader)
    return header, list(reader)


def fill_feature_table_node(table_node: Any, table: Any) -> Any:
    """Replace ``table_node``'s content with ``table``: one row per slice and region.

    Columns follow the CSV schema of :mod:`.table`: the identifying columns as text, then one
    numeric column per feature (NaN where a region was skipped or failed).
    """
    import vtk

    from HRpQCTRadiomicsEngine.table import ID_COLUMNS

    header, records = _csv_records(table)
    vtk_table = vtk.vtkTable()
    for j, name in enumerate(header):
        if name in ID_COLUMNS:
            column = vtk.vtkStringArray()
            for record in records:
                column.InsertNextValue(record[j])
        else:
            column = vtk.vtkDoubleArray()
            for record in records:
                column.InsertNextValue(float(record[j]) if record[j] else float("nan"))
        column.SetName(name)
        vtk_table.AddColumn(column)
    table_node.SetAndObserveTable(vtk_table)
    table_node.SetUseColumnNameAsColumnHeader(True)
    table_node.SetAttribute("HRpQCT.RadiomicsSettings", str(table.settings.get("name", "")))
    table_node.Modified()
    return table_node


def _feature_rows(table: Any) -> Any:
    from HRpQCTRadiomicsEngine.table import ID_COLUMNS, FeatureRows

    header, records = _csv_records(table)
    id_index = [header.index(c) for c in ID_COLUMNS]
    feature_index = [j for j, n in enumerate(header) if n not in ID_COLUMNS]
    values = np.array([[float(r[j]) if r[j] else np.nan for j in feature_index]
                       for r in records], dtype=np.float64).reshape(len(records), -1)
    ids = [{c: r[j] for c, j in zip(ID_COLUMNS, id_index, strict=True)} for r in records]
    return FeatureRows(ids=ids, feature_names=[header[j] for j in feature_index], values=values)


@dataclass
class ProbabilityRow:
    """One line of the probability table."""

    classifier: str
    regions: str
    slices_used: int
    probability: float
    note: str


def probability_rows(table: Any, classifiers: Sequence[Any]) -> list[ProbabilityRow]:
    """Osteoporosis probability per classifier (its regions) and overall, for one scan.

    Per classifier: its slice probabilities aggregated as it was trained (mean or median).
    Overall: the unweighted mean of the classifiers' probabilities (with one classifier, the
    same number) -- a summary, not a validated combined model.
    """
    from HRpQCTRadiomicsEngine.classification import aggregate_by_subject, assemble_dataset

    rows = _feature_rows(table)
    out = []
    for classifier in classifiers:
        data = assemble_dataset(rows, classifier.regions, None, classifier.features)
        name = Path(classifier.path).name if classifier.path else classifier.kind
        if data.X.shape[0] == 0:
            raise HRpQCTError(
                f"No slice has all the regions classifier {name} needs "
                f"({', '.join(classifier.regions)}): check that the segmentation has them.")
        per_slice = classifier.predict_proba(data.X)
        _, aggregated, _ = aggregate_by_subject(per_slice, np.zeros(len(per_slice)), None,
                                                classifier.aggregation)
        out.append(ProbabilityRow(name, ", ".join(classifier.regions), len(per_slice),
                                  float(aggregated[0]),
                                  f"{classifier.aggregation} of slice probabilities"))
    if out:
        out.append(ProbabilityRow("overall", "all of the above",
                                  max(r.slices_used for r in out),
                                  float(np.mean([r.probability for r in out])),
                                  "unweighted mean of the classifiers above; not a validated "
                                  "combined model"))
    return out


def probability_caveat() -> str:
    """The caveat shown with every probability (the classifiers' model-card text)."""
    from HRpQCTRadiomicsEngine.classification import CAVEAT

    return CAVEAT


def fill_probability_table_node(table_node: Any, rows: Sequence[ProbabilityRow]) -> Any:
    """Put the probabilities in ``table_node``, with the caveat in a column and an attribute."""
    import vtk

    caveat = probability_caveat()
    vtk_table = vtk.vtkTable()
    text_columns = {"classifier": [r.classifier for r in rows],
                    "regions": [r.regions for r in rows]}
    for name, values in text_columns.items():
        column = vtk.vtkStringArray()
        column.SetName(name)
        for value in values:
            column.InsertNextValue(value)
        vtk_table.AddColumn(column)
    slices = vtk.vtkIntArray()
    slices.SetName("slices_used")
    probability = vtk.vtkDoubleArray()
    probability.SetName("osteoporosis_probability")
    for r in rows:
        slices.InsertNextValue(r.slices_used)
        probability.InsertNextValue(r.probability)
    vtk_table.AddColumn(slices)
    vtk_table.AddColumn(probability)
    for name, values in (("note", [r.note for r in rows]), ("caveat", [caveat] * len(rows))):
        column = vtk.vtkStringArray()
        column.SetName(name)
        for value in values:
            column.InsertNextValue(value)
        vtk_table.AddColumn(column)
    table_node.SetAndObserveTable(vtk_table)
    table_node.SetUseColumnNameAsColumnHeader(True)
    table_node.SetAttribute(CAVEAT_ATTRIBUTE, caveat)
    table_node.Modified()
    return table_node


def write_features_csv(path: str | Path, table: Any) -> Path:
    """Write the features with the engine's CSV writer (atomic: temporary file, rename)."""
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    return write_feature_csv(path, table)


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
class RadiomicsRun:
    """Features (and probabilities) of one volume + segmentation, in a worker thread.

    Inputs are read from the scene in the constructor (caller's thread); the thread only runs
    the engine; :meth:`poll` puts the results into table nodes in the caller's thread, because
    MRML nodes must not be touched from another thread.

    Parameters
    ----------
    scene, segmentations_logic:
        The MRML scene and the Segmentations module logic.
    volume_node:
        The scan, voxels in HU.
    segmentation_node:
        The 7-region segmentation (as made by the segmenter, possibly corrected).
    parameters:
        Mode, classifiers, settings, subsets.
    table_node, probability_table_node:
        Tables to fill; None creates new ones when results arrive.
    """

    def __init__(self, scene: Any, segmentations_logic: Any, volume_node: Any,
                 segmentation_node: Any, parameters: RadiomicsParameters | None = None, *,
                 table_node: Any = None, probability_table_node: Any = None,
                 scan_name: str = "") -> None:
        from HRpQCTRadiomicsEngine.model_io import load_classifier

        if volume_node is None or segmentation_node is None:
            raise HRpQCTError("Select an input volume and its HR-pQCT region segmentation.")
        self.scene = scene
        self.parameters = parameters or RadiomicsParameters()
        self.parameters.validate()
        self.volume_node = volume_node
        self.classifiers = [load_classifier(p)
                            for p in self.parameters.effective_classifier_paths()]
        if self.parameters.mode == MODE_PREDICTION:
            self.features, self.settings = feature_request(self.classifiers)
            wanted = sorted(self.features)
        else:
            self.features, self.settings = None, self.parameters.settings
            wanted = (sorted(self.parameters.regions) if self.parameters.regions
                      else [d.label for d in REGIONS])
        self.mapping = map_segments(segmentation_node)
        missing = self.mapping.missing_regions(wanted)
        if self.parameters.mode == MODE_PREDICTION and missing:
            raise HRpQCTError(self.mapping.message(wanted))
        if len(missing) == len(wanted):
            raise HRpQCTError("The segmentation has no segment for any requested region. "
                              + self.mapping.message(wanted))
        self.warnings = self.mapping.message(wanted)
        self.regions = [lab for lab in wanted if lab not in {d.label for d in missing}]
        labels = region_labels_from_mapping(segmentations_logic, segmentation_node,
                                            volume_node, self.mapping)
        scan = slicer_bridge.scan_from_volume_node(volume_node)
        self._hu, self._labels, self._spacing_mm = scan.hu, labels, scan.spacing_mm
        self.scan_name = scan_name or volume_node.GetName()
        self.table_node = table_node
        self.probability_table_node = probability_table_node
        self.table: Any = None
        self.probabilities: list[ProbabilityRow] = []
        self.state = JobState.NOT_STARTED
        self.message = ""
        self._progress: tuple[int, int, str] | None = None
        self._cancel = CancelToken()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._started = 0.0

    # -- running ---------------------------------------------------------------------------
    def _on_progress(self, done: int, total: int, stage: str) -> None:
        self._progress = (done, total, stage)  # read by poll() in the caller's thread

    def _work(self) -> None:
        from HRpQCTRadiomicsEngine.extraction import extract_features

        try:
            self.table = extract_features(
                self._hu, self._labels, self._spacing_mm, settings=self.settings,
                regions=None if self.features is not None else self.regions,
                features=self.features, slices=self.parameters.slices,
                n_jobs=self.parameters.n_jobs, scan=self.scan_name,
                subject=self.scan_name, progress=self._on_progress, cancel=self._cancel)
        except BaseException as exc:  # reported by poll() in the caller's thread
            self._error = exc

    def start(self) -> RadiomicsRun:
        """Start the worker thread; returns self."""
        self.state = JobState.RUNNING
        self.message = "Starting the feature extraction..."
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="hrpqct-radiomics",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def fraction(self) -> float:
        """Fraction done, for the progress bar."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        if self._progress is None or not self._progress[1]:
            return 0.0
        return min(1.0, self._progress[0] / self._progress[1])

    def status_text(self) -> str:
        """A short line for the status label."""
        if self.state != JobState.RUNNING or self._progress is None:
            return self.message
        done, total, stage = self._progress
        return f"{stage[:1].upper()}{stage[1:]}: {done} of {total}"

    def poll(self) -> JobState:
        """The state; when the thread has ended, results go into the table nodes."""
        if self._thread is None or self.state.finished:
            return self.state
        if self._thread.is_alive():
            return self.state
        self._thread = None
        self._hu = self._labels = None  # free the copies
        if isinstance(self._error, CancelledError):
            self.state, self.message = JobState.CANCELLED, "Cancelled; no table was changed."
        elif self._error is not None:
            self.state = JobState.FAILED
            self.message = (str(self._error) if isinstance(self._error, HRpQCTError) else
                            f"Feature extraction failed: {type(self._error).__name__}: "
                            f"{self._error}. Please report this with its traceback (the details).")
        else:
            self._store_results()
        return self.state

    def _store_results(self) -> None:
        try:
            if self.table_node is None or self.table_node.GetScene() is None:
                self.table_node = self.scene.AddNewNodeByClass(
                    "vtkMRMLTableNode", f"{self.scan_name} HR-pQCT features")
            fill_feature_table_node(self.table_node, self.table)
            if self.classifiers:
                self.probabilities = probability_rows(self.table, self.classifiers)
                if (self.probability_table_node is None
                        or self.probability_table_node.GetScene() is None):
                    self.probability_table_node = self.scene.AddNewNodeByClass(
                        "vtkMRMLTableNode", f"{self.scan_name} osteoporosis probability")
                fill_probability_table_node(self.probability_table_node, self.probabilities)
        except HRpQCTError as exc:
            self.state, self.message = JobState.FAILED, str(exc)
            return
        ok = len(self.table.ok_rows())
        skipped = len(self.table.rows) - ok
        seconds = time.monotonic() - self._started
        self.state = JobState.SUCCEEDED
        self.message = (f"Done in {seconds:.0f} s: {ok} region result(s), "
                        f"{len(self.table.feature_names)} feature(s)"
                        + (f", {skipped} skipped (see the status/reason columns)" if skipped
                           else "") + ".")

    def wait(self, timeout_s: float | None = None, interval_s: float = 0.05) -> JobState:
        """Block until the run ends (batch use and tests); returns the final state."""
        if self._thread is None and self.state == JobState.NOT_STARTED:
            raise RuntimeError("start() the run first")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.poll() == JobState.RUNNING:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval_s)
        return self.state

    def cancel(self) -> None:
        """Ask the engine to stop at its next check (between slices); tables stay as they are."""
        if self.state == JobState.RUNNING:
            self._cancel.cancel()

    def log_lines(self) -> list[str]:
        """The worker's traceback when it failed unexpectedly (details for a bug report)."""
        if self._error is None or isinstance(self._error, (CancelledError, HRpQCTError)):
            return []
        import traceback

        text = "".join(traceback.format_exception(type(self._error), self._error,
                                                  self._error.__traceback__))
        return text.splitlines()

    def probability_summary(self) -> str:
        """One line per probability, with 'research use' and the caveat (for the panel)."""
        if not self.probabilities:
            return ""
        lines = [f"{RESEARCH_USE}. Osteoporosis probability:"]
        lines += [f"  {r.classifier} ({r.regions}): {r.probability:.2f}"
                  for r in self.probabilities]
        lines.append(probability_caveat())
        return "\n".join(lines)



# ------------------------------------------------------------------------------------------
# what the module's Logic calls
# ------------------------------------------------------------------------------------------
def check_pyradiomics() -> None:
    """Raise :class:`HRpQCTError` saying how to install pyradiomics when it is missing
    (found without importing it)."""
    import importlib.util

    if importlib.util.find_spec("radiomics") is None:
        raise HRpQCTError(
            "pyradiomics is not installed in this Python: in Slicer, install the "
            "SlicerRadiomics extension (Extensions Manager) and restart Slicer; elsewhere, "
            "pip install the engine's radiomics dependencies.")


def start_radiomics(scene: Any, segmentations_logic: Any, volume_node: Any,
                    segmentation_node: Any, parameters: RadiomicsParameters | None = None, *,
                    table_node: Any = None, probability_table_node: Any = None) -> RadiomicsRun:
    """Start the extraction in a worker thread (the Apply button); poll the returned run.

    Raises
    ------
    HRpQCTError
        pyradiomics missing, invalid choices, or a segmentation without the needed regions
        (the message says what to do).
    """
    check_pyradiomics()
    return RadiomicsRun(scene, segmentations_logic, volume_node, segmentation_node,
                        parameters, table_node=table_node,
                        probability_table_node=probability_table_node).start()


def run_radiomics(scene: Any, segmentations_logic: Any, volume_node: Any,
                  segmentation_node: Any, parameters: RadiomicsParameters | None = None, *,
                  timeout_s: float | None = None, **options: Any) -> RadiomicsRun:
    """Run to the end (scripts, batch use, self-tests); returns the finished run, whose
    ``table_node``, ``table``, ``probabilities`` and ``probability_table_node`` hold the
    results. ``options`` are those of :func:`start_radiomics`.

    Raises
    ------
    HRpQCTError
        When the run fails, is cancelled or does not finish within ``timeout_s``.
    """
    run = start_radiomics(scene, segmentations_logic, volume_node, segmentation_node,
                          parameters, **options)
    state = run.wait(timeout_s)
    if state == JobState.RUNNING:
        run.cancel()
        raise HRpQCTError(f"The feature extraction did not finish within {timeout_s} s; it "
                          "was cancelled.")
    if state == JobState.CANCELLED:
        raise CancelledError(run.message)
    if state != JobState.SUCCEEDED:
        raise HRpQCTError("\n".join([run.message, *run.log_lines()[-20:]]))
    return run
