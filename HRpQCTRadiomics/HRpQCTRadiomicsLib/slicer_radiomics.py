"""The HRpQCTRadiomics Slicer module's logic without Qt: segments -> regions -> features -> tables.

Everything the module does that does not need Qt lives here, so it runs (and is tested) in
plain Python with ``slicer-core``. Segments of a (possibly user-corrected) segmentation are
recognised by their terminology first (type code, and anatomic region where the type is
shared, e.g. cortical bone of tibia vs fibula), then by name, and missing, unknown or
duplicate segments are reported in words. The extraction runs ``hrpqct radiomics ...
--progress machine`` in a background process on files written to a temporary folder, like
the Segmenter's; its CSV and probabilities come back into table nodes in the GUI thread,
because MRML nodes must not be touched from another thread.

Why a process and not a thread: in Slicer the main thread holds Python's GIL while it idles
in the Qt event loop, so a Python worker thread in Slicer's process barely runs.

What the panel calls on every parameter change (:meth:`RadiomicsParameters.problems`)
imports nothing heavy: no scikit-learn, pyradiomics or YAML (a test checks it). ``slicer``
and ``vtk`` are imported inside functions, so this module imports without Slicer.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore import slicer_bridge
from HRpQCTCore.background.process import (
    BackgroundProcess,
    JobState,
    Launcher,
    ProcessRun,
    engine_environment,
    module_folders,
    popen_launcher,
    python_executable,
)
from HRpQCTCore.background.protocol import (
    LOADING_SPAN,
    RADIOMICS_EXIT_CODE_ADVICE,
    RADIOMICS_STAGE_SPANS,
)
from HRpQCTCore.errors import CancelledError, HRpQCTError
from HRpQCTCore.parameter_schema import node_field, values_from_node
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
    "FeatureCsv",
    "fill_feature_table_node",
    "ProbabilityRow",
    "probability_rows",
    "fill_probability_table_node",
    "write_features_csv",
    "build_radiomics_command",
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
#: Folder of this package's parent: the Radiomics module's folder (with the radiomics engine).
_MODULE_FOLDER = Path(__file__).resolve().parent.parent


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


def _classifier_regions(path: str | Path) -> list[str]:
    """The region keys a classifier file needs, read without loading the classifier.

    The background process verifies and loads the file (scikit-learn is imported there, not
    in Slicer's process); this only tells which segments must be present.
    """
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        regions = [str(key) for key in payload["regions"]]
        for key in regions:
            region_by_name(key)
    except (OSError, ValueError, KeyError, TypeError):
        raise HRpQCTError(f"{path} is not a classifier file written by 'hrpqct "
                          "train-classifier': choose that .json file.") from None
    return regions


# ------------------------------------------------------------------------------------------
# results: table nodes, CSV, probabilities
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureCsv:
    """The features CSV the background process wrote (the schema of
    ``HRpQCTRadiomicsEngine.table``), kept as text: the feature table node is filled from it
    and Export CSV writes it unchanged."""

    text: str

    @classmethod
    def read(cls, path: str | Path) -> FeatureCsv:
        """The CSV at ``path``."""
        return cls(Path(path).read_text(encoding="utf-8"))

    def records(self) -> tuple[list[str], list[list[str]]]:
        """The header and the rows."""
        reader = csv.reader(io.StringIO(self.text))
        header = next(reader, [])
        return header, [record for record in reader if record]

    def column(self, name: str) -> list[str]:
        """The values of one column, row by row."""
        header, records = self.records()
        index = header.index(name)
        return [record[index] for record in records]

    @property
    def feature_names(self) -> list[str]:
        """The feature columns (after the identifying ones)."""
        from HRpQCTRadiomicsEngine.table import ID_COLUMNS

        return [name for name in self.records()[0] if name not in ID_COLUMNS]

    @property
    def settings_name(self) -> str:
        """Name of the radiomics settings the features were computed with."""
        names = self.column("settings")
        return names[0] if names else ""


def _csv_records(table: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a :class:`FeatureCsv` or of the engine's ``FeatureTable``."""
    if isinstance(table, FeatureCsv):
        return table.records()
    from HRpQCTRadiomicsEngine.table import table_to_csv_text

    return FeatureCsv(table_to_csv_text(table)).records()


def _settings_name(table: Any) -> str:
    if isinstance(table, FeatureCsv):
        return table.settings_name
    return str(table.settings.get("name", ""))


def fill_feature_table_node(table_node: Any, table: Any) -> Any:
    """Replace ``table_node``'s content with ``table``: one row per slice and region.

    ``table`` is a :class:`FeatureCsv` (what the module's run gives) or the engine's
    ``FeatureTable``. Columns follow the CSV schema: the identifying columns as text, then one
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
    table_node.SetAttribute("HRpQCT.RadiomicsSettings", _settings_name(table))
    table_node.Modified()
    return table_node


@dataclass
class ProbabilityRow:
    """One line of the probability table; ``probability`` is None when it was withheld
    because quality control failed for the classifier's regions (``note`` says why)."""

    classifier: str
    regions: str
    slices_used: int
    probability: float | None
    note: str
    #: The class this row's probability is of; None for a binary classifier (osteoporosis).
    class_name: str | None = None


def _probability_row(classifier: str, regions: str, entry: Mapping[str, Any],
                     note: str) -> ProbabilityRow:
    withheld = entry.get("withheld") or entry["probability"] is None
    return ProbabilityRow(classifier, regions, int(entry["slices_used"]),
                          None if withheld else float(entry["probability"]),
                          str(entry.get("withheld_reason", "withheld")) if withheld else note)


def _class_rows(entry: Mapping[str, Any], note: str) -> list[ProbabilityRow]:
    """A multiclass classifier's lines: one per class, all withheld when it is withheld."""
    name, regions = str(entry["classifier"]), ", ".join(entry["regions"])
    withheld = bool(entry.get("withheld"))
    rows = []
    for class_name, p in entry["class_probabilities"].items():
        blank = withheld or p is None
        rows.append(ProbabilityRow(
            name, regions, int(entry["slices_used"]), None if blank else float(p),
            str(entry.get("withheld_reason", "withheld")) if blank else note, str(class_name)))
    return rows


def probability_rows(result: Mapping[str, Any]) -> list[ProbabilityRow]:
    """The probability table's lines from the JSON ``hrpqct radiomics --probabilities`` wrote.

    Per classifier: its slice probabilities aggregated as it was trained (mean or median);
    then ``overall``, the unweighted mean of the classifiers' probabilities (with one
    classifier, the same number) -- a summary, not a validated combined model. A withheld
    probability stays withheld: no number, the reason as its note. A multiclass classifier
    (``class_probabilities`` in its entry) gives one line per class (``class_name`` set);
    ``overall`` then averages the osteoporosis class.
    """
    rows: list[ProbabilityRow] = []
    for entry in result["classifiers"]:
        note = f"{entry['aggregation']} of slice probabilities"
        if entry.get("class_probabilities"):
            rows += _class_rows(entry, note)
        else:
            rows.append(_probability_row(str(entry["classifier"]), ", ".join(entry["regions"]),
                                         entry, note))
    if rows:
        overall = _probability_row("overall", "all of the above", result["overall"],
                                   str(result["overall"]["note"]))
        if any(r.class_name for r in rows):
            overall.class_name = "osteoporosis"
        rows.append(overall)
    return rows


def probability_caveat() -> str:
    """The caveat shown with every probability (the classifiers' model-card text)."""
    from HRpQCTRadiomicsEngine.classification import CAVEAT

    return CAVEAT


def _string_column(name: str, values: Sequence[str]) -> Any:
    import vtk

    column = vtk.vtkStringArray()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    return column


def fill_probability_table_node(table_node: Any, rows: Sequence[ProbabilityRow]) -> Any:
    """Put the probabilities in ``table_node``, with the caveat in a column and an attribute.

    With a multiclass classifier among the rows the table gains a ``class`` column and its
    probability column is named ``probability`` (binary-only tables stay as they were:
    ``osteoporosis_probability``, no ``class`` column).
    """
    import vtk

    caveat = probability_caveat()
    multiclass = any(r.class_name for r in rows)
    vtk_table = vtk.vtkTable()
    vtk_table.AddColumn(_string_column("classifier", [r.classifier for r in rows]))
    vtk_table.AddColumn(_string_column("regions", [r.regions for r in rows]))
    if multiclass:
        vtk_table.AddColumn(_string_column("class", [r.class_name or "osteoporosis"
                                                     for r in rows]))
    slices = vtk.vtkIntArray()
    slices.SetName("slices_used")
    probability = vtk.vtkDoubleArray()
    probability.SetName("probability" if multiclass else "osteoporosis_probability")
    for r in rows:
        slices.InsertNextValue(r.slices_used)
        # a withheld probability is an empty (NaN) cell, never a number
        probability.InsertNextValue(float("nan") if r.probability is None else r.probability)
    vtk_table.AddColumn(slices)
    vtk_table.AddColumn(probability)
    vtk_table.AddColumn(_string_column("note", [r.note for r in rows]))
    vtk_table.AddColumn(_string_column("caveat", [caveat] * len(rows)))
    table_node.SetAndObserveTable(vtk_table)
    table_node.SetUseColumnNameAsColumnHeader(True)
    table_node.SetAttribute(CAVEAT_ATTRIBUTE, caveat)
    table_node.Modified()
    return table_node


def write_features_csv(path: str | Path, table: Any) -> Path:
    """Write the features (a :class:`FeatureCsv` as it is, or the engine's ``FeatureTable``
    with its CSV writer), atomically: temporary file, then rename."""
    if isinstance(table, FeatureCsv):
        from HRpQCTCore.atomic import write_text_atomic

        write_text_atomic(path, table.text)
        return Path(path)
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    return write_feature_csv(path, table)


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------
def _settings_options(settings: str) -> list[str]:
    """``--params FILE`` for a YAML file, else ``--preset NAME``."""
    if Path(settings).suffix.lower() in (".yaml", ".yml"):
        return ["--params", str(settings)]
    return ["--preset", settings]


def build_radiomics_command(python: str | Path, volume_path: str | Path,
                            labels_path: str | Path, features_path: str | Path,
                            probabilities_path: str | Path, parameters: RadiomicsParameters,
                            *, regions: Sequence[int], classifier_paths: Sequence[str],
                            scan_name: str) -> list[str]:
    """The ``hrpqct radiomics`` command line run in the background process.

    Prediction mode extracts only what the classifiers need (``--classifier-features``);
    full export extracts every feature of the settings in ``regions``. Either way, each
    classifier's probability goes to ``probabilities_path``.
    """
    command = [str(python), "-m", "HRpQCTPipeline", "radiomics", str(volume_path),
               str(labels_path), "-o", str(features_path), "--units", "hu", "--progress",
               "machine", "--overwrite", "--scan-id", scan_name, "--subject", scan_name]
    if parameters.mode == MODE_PREDICTION:
        command.append("--classifier-features")
    else:
        command += _settings_options(parameters.settings)
        command += ["--regions", ",".join(region_by_label(label).key for label in regions)]
    for path in classifier_paths:
        command += ["--classifier", str(path)]
    if classifier_paths:
        command += ["--probabilities", str(probabilities_path)]
    if parameters.slices is not None:
        command += ["--slices", ",".join(str(int(z)) for z in parameters.slices)]
    if parameters.n_jobs is not None:
        command += ["--jobs", str(int(parameters.n_jobs))]
    return command


class RadiomicsRun(ProcessRun):
    """Features (and probabilities) of one volume + segmentation, in a background process.

    The constructor reads the inputs from the scene (caller's thread): which segment is
    which region, and the region label map. :meth:`start` writes the volume and the label map
    to a temporary folder and starts ``hrpqct radiomics`` (:func:`build_radiomics_command`);
    :meth:`poll`, called from the GUI's timer, collects the progress and, once the process has
    succeeded, puts the results into table nodes in the caller's thread (MRML nodes must not
    be touched from another thread). The temporary folder is always removed.

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
    scan_name:
        Identifier of the scan in the table (default: the volume's name).
    launcher, python, env:
        How the process starts (defaults: ``subprocess.Popen`` of ``PythonSlicer``, with both
        module folders on ``PYTHONPATH``).
    on_log:
        Called with each line the process prints (besides progress lines).
    """

    def __init__(self, scene: Any, segmentations_logic: Any, volume_node: Any,
                 segmentation_node: Any, parameters: RadiomicsParameters | None = None, *,
                 table_node: Any = None, probability_table_node: Any = None,
                 scan_name: str = "", launcher: Launcher = popen_launcher,
                 python: str | None = None, env: Mapping[str, str] | None = None,
                 on_log: Callable[[str], None] | None = None) -> None:
        if volume_node is None or segmentation_node is None:
            raise HRpQCTError("Select an input volume and its HR-pQCT region segmentation.")
        self.scene = scene
        self.parameters = parameters or RadiomicsParameters()
        self.parameters.validate()
        self.volume_node = volume_node
        self.classifier_paths = self.parameters.effective_classifier_paths()
        wanted = self._wanted_regions()
        self.mapping = map_segments(segmentation_node)
        missing = self.mapping.missing_regions(wanted)
        if self.parameters.mode == MODE_PREDICTION and missing:
            raise HRpQCTError(self.mapping.message(wanted))
        if len(missing) == len(wanted):
            raise HRpQCTError("The segmentation has no segment for any requested region. "
                              + self.mapping.message(wanted))
        self.warnings = self.mapping.message(wanted)
        self.regions = [lab for lab in wanted if lab not in {d.label for d in missing}]
        self._labels: np.ndarray | None = region_labels_from_mapping(
            segmentations_logic, segmentation_node, volume_node, self.mapping)
        self.scan_name = scan_name or volume_node.GetName()
        self.table_node = table_node
        self.probability_table_node = probability_table_node
        self._launcher, self._python, self._env = launcher, python or python_executable(), env
        self._on_log = on_log
        self.table: FeatureCsv | None = None
        self.probabilities: list[ProbabilityRow] = []
        self.process: BackgroundProcess | None = None
        self.state = JobState.NOT_STARTED
        self.message = ""
        self._work_dir: Path | None = None

    def _wanted_regions(self) -> list[int]:
        if self.parameters.mode == MODE_PREDICTION:
            keys = {key for path in self.classifier_paths for key in _classifier_regions(path)}
            return sorted(region_by_name(key).label for key in keys)
        return (sorted(self.parameters.regions) if self.parameters.regions
                else [d.label for d in REGIONS])

    # -- running ---------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        assert self._work_dir is not None, "start() first"
        return self._work_dir / name

    def command(self) -> list[str]:
        """The command line (paths in the run's temporary folder)."""
        return build_radiomics_command(
            self._python, self._path("volume.nrrd"), self._path("regions.nrrd"),
            self._path("features.csv"), self._path("probabilities.json"), self.parameters,
            regions=self.regions, classifier_paths=self.classifier_paths,
            scan_name=self.scan_name)

    def _write_inputs(self) -> None:
        from HRpQCTCore.io.writers import write_label_image, write_scan

        # One Scan for both files, so the label map's geometry is the volume's exactly.
        scan = slicer_bridge.scan_from_volume_node(self.volume_node)
        write_scan(scan, self._path("volume.nrrd"), dtype="float32")
        write_label_image(self._labels, scan, self._path("regions.nrrd"))
        self._labels = None  # free the copy

    def start(self) -> RadiomicsRun:
        """Write the inputs and start the background process; returns self."""
        self._work_dir = Path(tempfile.mkdtemp(prefix="hrpqct-radiomics-"))
        try:
            self._write_inputs()
            env = self._env if self._env is not None else engine_environment(
                [*module_folders(), _MODULE_FOLDER])
            self.process = BackgroundProcess(
                self.command(), env, launcher=self._launcher, on_log=self._on_log,
                stage_spans=RADIOMICS_STAGE_SPANS, advice=RADIOMICS_EXIT_CODE_ADVICE,
                program="feature extraction")
        except BaseException:
            self._cleanup()
            raise
        self.state = JobState.RUNNING
        self.message = "Starting the feature extraction..."
        return self

    @property
    def fraction(self) -> float:
        """Fraction done, for the progress bar."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return self.process.fraction if self.process is not None else 0.0

    def status_text(self) -> str:
        """A short line for the status label."""
        update = self.process.progress if self.process is not None else None
        if self.state != JobState.RUNNING or update is None:
            return self.message
        return f"{update.stage[:1].upper()}{update.stage[1:]}: {update.done} of {update.total}"

    def poll(self) -> JobState:
        """Collect progress; when the process has ended, results go into the table nodes.

        Never blocks on the process (reading the results takes a moment in this thread).
        """
        if self.process is None or self.state.finished:
            return self.state
        state = self.process.poll()
        if state == JobState.RUNNING:
            return self.state
        try:
            if state == JobState.SUCCEEDED:
                self._store_results()
            elif state == JobState.CANCELLED:
                self.state, self.message = state, "Cancelled; no table was changed."
            else:
                self.state, self.message = state, self.process.failure_message()
        finally:
            self._cleanup()
        return self.state

    def _read_results(self) -> tuple[FeatureCsv, list[ProbabilityRow]]:
        table = FeatureCsv.read(self._path("features.csv"))
        rows = []
        if self.classifier_paths:
            result = json.loads(self._path("probabilities.json").read_text(encoding="utf-8"))
            rows = probability_rows(result)
        return table, rows

    def _table(self, node: Any, name: str) -> Any:
        if node is None or node.GetScene() is None:  # none chosen, or deleted meanwhile
            node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.scan_name} {name}")
        return node

    def _store_results(self) -> None:
        self.state, self.message = JobState.LOADING, "Loading the results..."
        try:
            self.table, self.probabilities = self._read_results()
            self.table_node = self._table(self.table_node, "HR-pQCT features")
            fill_feature_table_node(self.table_node, self.table)
            if self.probabilities:
                self.probability_table_node = self._table(self.probability_table_node,
                                                          "osteoporosis probability")
                fill_probability_table_node(self.probability_table_node, self.probabilities)
        except Exception as exc:  # a broken output must show as an error, not a traceback
            self.state = JobState.FAILED
            self.message = (f"The feature extraction finished but its result could not be "
                            f"loaded: {exc}. Please report this with the log.")
            return
        statuses = self.table.column("status")
        ok = statuses.count("ok")
        skipped = len(statuses) - ok
        self.state = JobState.SUCCEEDED
        self.message = (f"Done in {self.process.seconds:.0f} s: {ok} region result(s), "
                        f"{len(self.table.feature_names)} feature(s)"
                        + (f", {skipped} skipped (see the status/reason columns)" if skipped
                           else "") + ".")
        self.process.fraction = LOADING_SPAN[1]

    def _cleanup(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    def probability_summary(self) -> str:
        """One line per probability, with 'research use' and the caveat (for the panel)."""
        if not self.probabilities:
            return ""
        multiclass = any(r.class_name for r in self.probabilities)
        lines = [f"{RESEARCH_USE}. " + ("Class probabilities:" if multiclass
                                        else "Osteoporosis probability:")]
        lines += [f"  {r.classifier} ({r.regions})"
                  + (f" {r.class_name}" if r.class_name else "") + ": "
                  + (f"{r.probability:.2f}" if r.probability is not None else r.note)
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
                    segmentation_node: Any, parameters: RadiomicsParameters | None = None,
                    **options: Any) -> RadiomicsRun:
    """Start the extraction in a background process (the Apply button); poll the returned
    run. ``options`` are :class:`RadiomicsRun`'s keyword arguments (tables, launcher, ...).

    Raises
    ------
    HRpQCTError
        pyradiomics missing, invalid choices, or a segmentation without the needed regions
        (the message says what to do).
    """
    check_pyradiomics()
    return RadiomicsRun(scene, segmentations_logic, volume_node, segmentation_node,
                        parameters, **options).start()


def run_radiomics(scene: Any, segmentations_logic: Any, volume_node: Any,
                  segmentation_node: Any, parameters: RadiomicsParameters | None = None, *,
                  timeout_s: float | None = None, **options: Any) -> RadiomicsRun:
    """Run to the end (scripts, batch use, self-tests); returns the finished run, whose
    ``table_node``, ``table``, ``probabilities`` and ``probability_table_node`` hold the
    results. ``options`` are those of :func:`start_radiomics`.

    Raises
    ------
    HRpQCTError
        When the run fails, is cancelled or does not finish within ``timeout_s``; the
        message ends with the last lines the process printed.
    """
    run = start_radiomics(scene, segmentations_logic, volume_node, segmentation_node,
                          parameters, **options)
    try:
        state = run.wait(timeout_s)
    except TimeoutError:
        raise HRpQCTError(f"The feature extraction did not finish within {timeout_s} s; it "
                          "was cancelled.") from None
    if state == JobState.CANCELLED:
        raise CancelledError(run.message)
    if state != JobState.SUCCEEDED:
        raise HRpQCTError("\n".join([run.message, *run.log_lines()[-20:]]))
    return run
