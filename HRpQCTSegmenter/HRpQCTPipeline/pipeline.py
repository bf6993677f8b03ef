"""The whole job for one scan: 7 regions, features, probability and a QC report, resumable.

:func:`run_scan` is what ``hrpqct run``, ``hrpqct batch`` and ``hrpqct demo`` call. It reuses
the engine's stages (no logic of its own beyond bookkeeping):

1. **segmentation** -- :func:`HRpQCTSegmentationEngine.inference.run_segmentation` and
   :func:`HRpQCTSegmentationEngine.postprocess.postprocess`; written as a Slicer ``.seg.nrrd``
   and a NIfTI label map (or skipped when the job brings its own 7-region map, e.g. one corrected in
   Slicer);
2. **radiomics** -- :func:`HRpQCTRadiomicsEngine.extraction.extract_features` (locally with
   joblib, or slice by slice on a Dask cluster), written by
   :func:`HRpQCTRadiomicsEngine.table.write_feature_csv`;
3. **classification** -- :func:`HRpQCTRadiomicsEngine.prediction.predict_rows` with a saved
   classifier;
4. **report** -- :mod:`.qc` (region sizes, confidence, motion) and :mod:`.report` (PNG, HTML).

**Resume.** ``run.json`` in the output folder records, per stage, a key (SHA256 of the input
file's content, the settings, the model and classifier files, and the keys of the stages it
depends on) and the SHA256 of every file the stage wrote. A later call reuses a stage whose key
is unchanged and whose files are unchanged; anything else is recomputed, and only what depends
on it. A file the record does not know (not written by a previous run) is never replaced without
``overwrite``, and neither is a recorded output that was changed since (e.g. edited by hand).

**Missing artefacts.** Without a bundled segmentation model (and no ``--model``) or without a
bundled classifier (and no ``--classifier``) the stage is skipped with a message saying so; the
other stages still run where they can.

**Feature sets** (``RunSettings.features``): ``classifier`` (only what the classifier uses:
prediction mode), ``basic`` (shape and first-order features of the original image, every
region; cheap), ``full`` (the whole preset: slow), ``none``; ``auto`` is ``classifier`` when a
classifier is used, else ``basic``. The classifier's features are always added to the set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.artefacts import sha256_file
from HRpQCTCore.atomic import write_text_atomic
from HRpQCTCore.errors import ArtefactError, HRpQCTError, InputFileError
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import REGIONS, region_by_name
from HRpQCTRadiomicsEngine.model_io import BUNDLED_CLASSIFIER

__all__ = [
    "BUNDLED_CLASSIFIER",
    "FEATURE_SETS",
    "BASIC_FEATURES",
    "RECORD_NAME",
    "RunSettings",
    "ScanJob",
    "ScanResult",
    "output_paths",
    "run_scan",
    "read_record",
    "extract_on_cluster",
    "scan_log",
]

log = logging.getLogger("hrpqct")

FEATURE_SETS = ("auto", "classifier", "basic", "full", "none")
#: The ``basic`` set: 2D shape and first-order statistics of the original image (27 per
#: region and slice; a subset of the paper preset).
BASIC_FEATURES: tuple[str, ...] = tuple(
    [f"original_shape2D_{n}" for n in (
        "Elongation", "MajorAxisLength", "MaximumDiameter", "MeshSurface", "MinorAxisLength",
        "Perimeter", "PerimeterSurfaceRatio", "PixelSurface", "Sphericity")]
    + [f"original_firstorder_{n}" for n in (
        "10Percentile", "90Percentile", "Energy", "Entropy", "InterquartileRange", "Kurtosis",
        "Maximum", "MeanAbsoluteDeviation", "Mean", "Median", "Minimum", "Range",
        "RobustMeanAbsoluteDeviation", "RootMeanSquared", "Skewness", "TotalEnergy",
        "Uniformity", "Variance")])
#: Features shown per region in the report when no classifier chooses them.
REPORT_FEATURES = ("original_shape2D_PixelSurface", "original_firstorder_Mean",
                   "original_firstorder_10Percentile", "original_firstorder_90Percentile",
                   "original_firstorder_Entropy")
RECORD_NAME = "run.json"
LOG_NAME = "run.log"
RECORD_FORMAT = "hrpqct-run"
RECORD_VERSION = 1
#: Bumped when a stage's output would change for the same inputs (invalidates old records).
STAGE_VERSIONS = {"segmentation": 1, "radiomics": 1, "classification": 1, "report": 1}
STAGES = ("segmentation", "radiomics", "classification", "report")


# --- settings and jobs ---------------------------------------------------------------------

@dataclass
class RunSettings:
    """What to run and how; the same for every scan of a batch.

    Attributes
    ----------
    model:
        Segmentation model folder; None: the bundled model (stage skipped if there is none).
    classifier:
        Classifier JSON; None: the bundled one (stage skipped if there is none); ``"none"``:
        no classification.
    features:
        One of :data:`FEATURE_SETS` (see the module docstring).
    preset, params:
        Radiomics settings for ``basic``/``full`` (preset name or YAML file); with a
        classifier, its own stored settings are used and must match for ``full``.
    postprocess:
        Post-processing preset (``default`` or ``paper``).
    device, engine, batch_size, fast:
        Inference options (see :func:`~HRpQCTSegmentationEngine.inference.segment_volume`);
        they do not change results, so they are not part of the resume key.
    units, calibration:
        How to read the scan (see :func:`HRpQCTCore.io.read_scan`).
    jobs:
        Worker processes for per-slice radiomics (None: CPU cores).
    slice_step:
        Extract features on every n-th slice (1: all).
    report:
        Write the QC report.
    """

    model: str | None = None
    classifier: str | None = None
    features: str = "auto"
    preset: str = "paper"
    params: str | None = None
    postprocess: str = "default"
    device: str = "auto"
    engine: str = "auto"
    batch_size: int | None = None
    fast: bool = True
    units: str = "auto"
    calibration: Any = None
    jobs: int | None = None
    slice_step: int = 1
    report: bool = True

    def __post_init__(self) -> None:
        if self.features not in FEATURE_SETS:
            raise HRpQCTError(f"Unknown feature set {self.features!r}; use one of "
                              f"{', '.join(FEATURE_SETS)}.")
        if int(self.slice_step) < 1:
            raise HRpQCTError(f"The slice step must be at least 1, got {self.slice_step}.")

    def describe(self) -> dict[str, Any]:
        """JSON form (recorded in ``run.json``)."""
        out = asdict(self)
        out["calibration"] = (None if self.calibration is None
                              else self.calibration.to_dict())
        return out


@dataclass
class ScanJob:
    """One scan to process.

    Attributes
    ----------
    scan:
        The scan file (or DICOM folder).
    scan_id:
        Identifier used in file names and tables (from the file name or a manifest; never
        from a header).
    subject:
        Subject identifier (groups scans of one person; default: the scan id).
    regions:
        Optional 7-region label map of the scan (e.g. corrected in Slicer): then it is used
        instead of segmenting.
    """

    scan: Path
    scan_id: str
    subject: str = ""
    regions: Path | None = None

    @classmethod
    def from_path(cls, scan: str | Path, scan_id: str | None = None, subject: str = "",
                  regions: str | Path | None = None) -> ScanJob:
        """A job whose id defaults to the file name without extensions."""
        from HRpQCTRadiomicsEngine.inputs import scan_id_from_path

        scan = Path(scan)
        return cls(scan=scan, scan_id=scan_id or scan_id_from_path(scan), subject=subject or "",
                   regions=Path(regions) if regions else None)


@dataclass
class ScanResult:
    """What :func:`run_scan` did for one scan.

    Attributes
    ----------
    stages:
        Stage -> ``"ran"``, ``"reused"`` (up to date), ``"skipped"`` or ``"provided"``.
    skipped:
        Why stages were skipped (missing artefacts, options).
    warnings:
        QC warnings (``{code, message}``).
    outputs:
        Output name -> path.
    """

    scan_id: str
    subject: str
    out_dir: Path
    stages: dict[str, str]
    skipped: list[str]
    warnings: list[dict[str, str]]
    outputs: dict[str, str]
    probability: float | None
    volumes_mm3: dict[str, float]
    seconds: float

    @property
    def action(self) -> str:
        """``"up to date"`` when nothing ran, else the stages that ran."""
        ran = [s for s, v in self.stages.items() if v == "ran"]
        return "up to date" if not ran else "ran " + ", ".join(ran)

    def summary_row(self) -> dict[str, Any]:
        """A flat row for the cohort summary."""
        return {
            "scan_id": self.scan_id, "subject": self.subject, "status": "ok",
            "probability": self.probability,
            "warning_codes": sorted({w["code"] for w in self.warnings}),
            "warnings": [w["message"] for w in self.warnings],
            "volumes_mm3": self.volumes_mm3, "report": self.outputs.get("report"),
            "features": self.outputs.get("features"), "action": self.action,
            "skipped": self.skipped, "out_dir": str(self.out_dir), "seconds": self.seconds,
        }


def output_paths(out_dir: str | Path, scan_id: str) -> dict[str, Path]:
    """Every file :func:`run_scan` may write for ``scan_id`` in ``out_dir``."""
    out_dir = Path(out_dir)
    names = {
        "regions_seg_nrrd": "_regions.seg.nrrd", "regions_nifti": "_regions.nii.gz",
        "segmentation_qc": "_segmentation_qc.json", "features": "_features.csv",
        "probability": "_probability.json", "qc": "_qc.json", "report": "_report.html",
        "overlay_png": "_overlay.png", "profiles_png": "_profiles.png",
    }
    return {k: out_dir / f"{scan_id}{v}" for k, v in names.items()}


_STAGE_FILES = {
    "segmentation": ("regions_seg_nrrd", "regions_nifti", "segmentation_qc"),
    "radiomics": ("features",),
    "classification": ("probability",),
    "report": ("qc", "report", "overlay_png", "profiles_png"),
}


# --- hashing and the record ----------------------------------------------------------------

def _key(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _fingerprint(path: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size, mtime and SHA256 of a file or folder (content hash reused if size/mtime match)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        mtime = max((p.stat().st_mtime_ns for p in files), default=0)
    else:
        stat = path.stat()
        size, mtime, files = stat.st_size, stat.st_mtime_ns, [path]
    if previous and previous.get("size") == size and previous.get("mtime_ns") == mtime \
            and previous.get("sha256"):
        digest = previous["sha256"]
    elif path.is_dir():
        h = hashlib.sha256()
        for p in files:
            h.update(p.relative_to(path).as_posix().encode())
            h.update(sha256_file(p).encode())
        digest = h.hexdigest()
    else:
        digest = sha256_file(path)
    return {"size": size, "mtime_ns": mtime, "sha256": digest}


def _model_sha256(folder: Path) -> str:
    from HRpQCTSegmentationEngine.model import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE

    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE):
        if (folder / name).is_file():
            h.update(name.encode())
            h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


def read_record(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``run.json`` of a previous run in ``out_dir`` (None if absent or unreadable)."""
    path = Path(out_dir) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("Ignoring the unreadable %s (outputs will be recomputed)", path)
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    return record


def _recorded_file(record: dict | None, name: str) -> dict | None:
    if not record:
        return None
    for stage in (record.get("stages") or {}).values():
        entry = (stage.get("files") or {}).get(name)
        if entry:
            return entry
    return None


def _file_unchanged(path: Path, entry: dict | None) -> bool:
    if entry is None or not path.is_file():
        return False
    return _fingerprint(path, entry)["sha256"] == entry.get("sha256")


# --- logging ---------------------------------------------------------------------------------

class _ThreadFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread


_LOGGERS = ("hrpqct", "HRpQCTCore", "HRpQCTPhantom", "HRpQCTSegmentationEngine",
            "HRpQCTRadiomicsEngine", "HRpQCTPipeline")
_log_lock = threading.Lock()
_log_users = 0
_saved_levels: dict[str, int] = {}


@contextmanager
def scan_log(path: str | Path) -> Iterator[Path]:
    """Append the engine's log messages of this thread to ``path`` while the block runs.

    The engine's loggers are lowered to INFO for the duration if they were quieter (the
    console keeps its own level only if its handler has one; the command line sets it).
    """
    global _log_users
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ThreadFilter())
    root = logging.getLogger()
    with _log_lock:
        if _log_users == 0:
            for name in _LOGGERS:
                logger = logging.getLogger(name)
                if logger.getEffectiveLevel() > logging.INFO:
                    _saved_levels[name] = logger.level
                    logger.setLevel(logging.INFO)
        _log_users += 1
        root.addHandler(handler)
    try:
        yield path
    finally:
        with _log_lock:
            root.removeHandler(handler)
            _log_users -= 1
            if _log_users == 0:
                for name, level in _saved_levels.items():
                    logging.getLogger(name).setLevel(level)
                _saved_levels.clear()
        handler.close()


# --- stage helpers -----------------------------------------------------------------------------

_runner_lock = threading.Lock()
_runners: dict[tuple, tuple[Any, Any]] = {}


def _segmenter(folder: Path, settings: RunSettings):
    """A prepared model runner, kept per process so a batch loads (and exports) it once."""
    from HRpQCTSegmentationEngine.inference import prepare_segmenter

    key = (str(folder.resolve()), _model_sha256(folder), settings.device, settings.engine,
           settings.fast)
    with _runner_lock:
        if key not in _runners:
            _runners.clear()  # one model at a time: they are large
            _runners[key] = prepare_segmenter(folder, device=settings.device,
                                              fast=settings.fast, engine=settings.engine)
        return _runners[key]


def _resolve_model(settings: RunSettings) -> tuple[Path | None, str | None]:
    from HRpQCTPipeline.commands.segment import resolve_model_folder

    try:
        return resolve_model_folder(settings.model), None
    except ArtefactError as exc:
        if settings.model:
            raise
        return None, f"segmentation skipped: {exc}"


def _resolve_classifier(settings: RunSettings) -> tuple[Any, str | None]:
    from HRpQCTRadiomicsEngine.model_io import load_classifier

    if settings.classifier and settings.classifier.lower() == "none":
        return None, "classification skipped: disabled (--classifier none)"
    if settings.classifier:
        return load_classifier(settings.classifier), None
    from HRpQCTCore.artefacts import verified_path

    try:
        path = verified_path(BUNDLED_CLASSIFIER)
    except ArtefactError as exc:
        return None, (f"classification skipped: {exc}. No bundled classifier is available in "
                      "this installation; train one with 'hrpqct train-classifier' and pass it "
                      "with --classifier.")
    return load_classifier(path), None


#: pyradiomics' parameter validation (pykwalify) is not thread-safe: scans running in threads
#: of one Dask worker parse their settings one at a time.
_settings_lock = threading.Lock()


def _feature_request(settings: RunSettings, classifier) -> tuple[Any, Any, str]:
    """(radiomics settings, request for extract_features' ``features=``, set name).

    The request is None for the full preset, else a mapping region label -> names.
    """
    with _settings_lock:
        return _feature_request_unlocked(settings, classifier)


def _feature_request_unlocked(settings: RunSettings, classifier) -> tuple[Any, Any, str]:
    from HRpQCTRadiomicsEngine.prediction import features_by_region
    from HRpQCTRadiomicsEngine.settings import load_settings

    chosen = settings.features
    if chosen == "auto":
        chosen = "classifier" if classifier is not None else "basic"
    if chosen == "none":
        return None, None, "none"
    if chosen == "classifier" and classifier is None:
        raise HRpQCTError("--features classifier needs a classifier: pass --classifier FILE, "
                          "or choose --features basic or full.")
    if classifier is not None:
        rad_settings = classifier.radiomics_settings()
        if chosen in ("basic", "full") and (settings.params or settings.preset):
            own = load_settings(settings.params or settings.preset)
            if own.sha256 != rad_settings.sha256:
                raise HRpQCTError(
                    f"The classifier was trained with radiomics settings "
                    f"{classifier.settings.get('name')!r}, not {own.name!r}: extract with the "
                    "classifier's settings (--features classifier) or pass the same "
                    "--preset/--params.")
    else:
        rad_settings = load_settings(settings.params or settings.preset)
    if chosen == "full":
        return rad_settings, None, "full"
    request: dict[int, list[str]] = {}
    if chosen == "basic":
        request = {d.label: list(BASIC_FEATURES) for d in REGIONS}
    if classifier is not None:
        for label, names in features_by_region(classifier.features).items():
            request.setdefault(label, [])
            request[label] += [n for n in names if n not in request[label]]
    return rad_settings, request, chosen


def extract_on_cluster(client, hu: np.ndarray, regions_map: np.ndarray,
                       spacing_mm: tuple[float, float, float], *, settings,
                       features=None, slices=None, scan: str = "", subject: str = "",
                       progress: ProgressCallback | None = None,
                       cancel: CancelToken | None = None):
    """``extract_features`` (per slice) with one Dask task per slice.

    Gives the same :class:`.extraction.FeatureTable` as the local function (each task calls
    the public :func:`.extraction.extract_slice_features`).
    """
    from dask.distributed import as_completed

    from HRpQCTRadiomicsEngine.extraction import FeatureTable, extract_slice_features
    from HRpQCTRadiomicsEngine.settings import load_settings

    settings = load_settings(settings)
    regions_map = np.asarray(regions_map, dtype=np.uint8)
    indices = list(range(hu.shape[0])) if slices is None else [int(s) for s in slices]
    stage = "radiomics (slices, cluster)"
    report(progress, 0, len(indices), stage)
    spacing_mm = tuple(float(s) for s in spacing_mm)
    futures = {}
    for z in indices:
        future = client.submit(extract_slice_features, np.asarray(hu[z], dtype=np.float32),
                               regions_map[z], spacing_mm, settings=settings, regions=None,
                               features=features, slice_index=z, pure=False,
                               key=f"hrpqct-radiomics-{scan}-{z}-{time.time_ns()}")
        futures[future] = z
    by_slice: dict[int, list] = {}
    try:
        for done, future in enumerate(as_completed(list(futures)), start=1):
            by_slice[futures[future]] = future.result()
            report(progress, done, len(indices), stage)
            check(cancel)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
    rows = [row for z in indices for row in by_slice[z]]
    names: dict[str, None] = {}
    for row in rows:
        for name in row.features:
            names.setdefault(name, None)
    return FeatureTable(rows=rows, feature_names=list(names), mode="slice",
                        settings=settings.provenance(), scan=scan, subject=subject)


def _mean_features(rows, wanted: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Region key -> feature -> mean over the region's ok slices (for the report)."""
    column = {n: j for j, n in enumerate(rows.feature_names)}
    out: dict[str, dict[str, float]] = {}
    for region_key, names in wanted.items():
        mask = rows.where(region=region_key, status="ok")
        values = {}
        for name in names:
            if name in column and mask.any():
                col = rows.values[mask, column[name]]
                col = col[np.isfinite(col)]
                values[name] = float(col.mean()) if col.size else math.nan
        if values:
            out[region_by_name(region_key).name] = values
    return out


# --- the pipeline ------------------------------------------------------------------------------

def _check_not_foreign(paths: dict[str, Path], record: dict | None, overwrite: bool) -> None:
    if overwrite:
        return
    foreign = [str(p) for name, p in paths.items()
               if p.exists() and _recorded_file(record, name) is None]
    if foreign:
        raise HRpQCTError(
            f"Output already exists and was not written by a previous hrpqct run here: "
            f"{', '.join(foreign)}. Choose another output folder, or pass --overwrite to "
            "replace it.")


def _check_replaceable(names, paths: dict[str, Path], record: dict | None,
                       overwrite: bool) -> None:
    if overwrite:
        return
    edited = [str(paths[n]) for n in names if paths[n].exists()
              and not _file_unchanged(paths[n], _recorded_file(record, n))]
    if edited:
        raise HRpQCTError(
            f"{', '.join(edited)} changed after hrpqct wrote it (edited by hand?) and would be "
            "recomputed. Move it away to keep it, or pass --overwrite to replace it.")


def run_scan(job: ScanJob, out_dir: str | Path, settings: RunSettings | None = None, *,
             overwrite: bool = False, client: Any = None,
             progress: ProgressCallback | None = None,
             cancel: CancelToken | None = None) -> ScanResult:
    """Run the pipeline for one scan into ``out_dir`` (files named after ``job.scan_id``).

    Parameters
    ----------
    job:
        The scan (and optional ready-made 7-region map).
    out_dir:
        Output folder; holds ``run.json`` (the resume record) and ``run.log``.
    settings:
        What to run (default :class:`RunSettings`).
    overwrite:
        Recompute everything and replace any existing file.
    client:
        A ``dask.distributed.Client``: per-slice radiomics run as tasks on its cluster.
    progress, cancel:
        Progress callback (stages: segmenting slices, post-processing, radiomics, report)
        and cancellation token.

    Returns
    -------
    ScanResult

    Raises
    ------
    HRpQCTError
        (and subclasses) for unreadable inputs, missing user artefacts, outputs that would
        be replaced without ``overwrite``, or cancellation.
    """
    settings = settings or RunSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with scan_log(out_dir / LOG_NAME):
        log.info("=== hrpqct %s: scan %s (%s) -> %s", _version(), job.scan_id, job.scan, out_dir)
        try:
            return _run_scan(job, out_dir, settings, overwrite, client, progress, cancel)
        except Exception as exc:
            log.error("failed: %s: %s", type(exc).__name__, exc)
            raise


def _version() -> str:
    from HRpQCTCore import __version__

    return __version__


def _run_scan(job: ScanJob, out_dir: Path, settings: RunSettings, overwrite: bool, client,
              progress, cancel) -> ScanResult:
    start = time.perf_counter()
    scan_path = Path(job.scan)
    if not scan_path.exists():
        raise InputFileError(f"Scan {scan_path} does not exist: check the path.")
    if job.regions is not None and not Path(job.regions).exists():
        raise InputFileError(f"Region map {job.regions} does not exist: check the path.")
    paths = output_paths(out_dir, job.scan_id)
    previous = read_record(out_dir)
    if previous is not None and previous.get("scan_id") != job.scan_id:
        previous = None
    _check_not_foreign(paths, previous, overwrite)
    subject = job.subject or job.scan_id
    skipped: list[str] = []

    # --- keys ------------------------------------------------------------------------------
    input_fp = _fingerprint(scan_path, (previous or {}).get("input"))
    regions_fp = (_fingerprint(Path(job.regions), (previous or {}).get("regions_input"))
                  if job.regions else None)
    calibration = None if settings.calibration is None else settings.calibration.to_dict()
    input_key = _key({"scan": input_fp["sha256"], "units": settings.units,
                      "calibration": calibration})
    model_folder, message = (None, None) if job.regions else _resolve_model(settings)
    if message:
        skipped.append(message)
    if job.regions:
        seg_key = _key({"input": input_key, "provided_regions": regions_fp["sha256"]})
    elif model_folder is not None:
        seg_key = _key({"input": input_key, "model": _model_sha256(model_folder),
                        "postprocess": settings.postprocess,
                        "version": STAGE_VERSIONS["segmentation"]})
    else:
        seg_key = None
    classifier, message = _resolve_classifier(settings)
    if message:
        skipped.append(message)
    rad_settings, request, feature_set = _feature_request(settings, classifier)
    if feature_set == "none":
        skipped.append("radiomics skipped: --features none")
    rad_key = cls_key = None
    if seg_key and feature_set != "none":
        rad_key = _key({"seg": seg_key, "settings": rad_settings.sha256,
                        "request": None if request is None else sorted(request.items()),
                        "step": settings.slice_step, "subject": subject,
                        "version": STAGE_VERSIONS["radiomics"]})
        if classifier is not None:
            cls_key = _key({"rad": rad_key, "classifier": sha256_file(classifier.path),
                            "version": STAGE_VERSIONS["classification"]})
    report_key = (_key({"keys": [seg_key, rad_key, cls_key], "input": input_key,
                        "version": STAGE_VERSIONS["report"]}) if settings.report else None)
    keys = {"segmentation": seg_key, "radiomics": rad_key, "classification": cls_key,
            "report": report_key}

    def up_to_date(stage: str) -> bool:
        if overwrite or previous is None or keys[stage] is None:
            return False
        entry = (previous.get("stages") or {}).get(stage) or {}
        if entry.get("key") != keys[stage]:
            return False
        return all(_file_unchanged(out_dir / f["path"], f)
                   for f in (entry.get("files") or {}).values())

    plan = {stage: ("skipped" if keys[stage] is None else
                    "reused" if up_to_date(stage) else "ran") for stage in STAGES}
    if job.regions:
        plan["segmentation"] = "provided"
    for stage, what in plan.items():
        if what == "ran":
            _check_replaceable(_STAGE_FILES[stage], paths, previous, overwrite)
    stage_files: dict[str, dict[str, dict]] = {
        s: dict(((previous or {}).get("stages") or {}).get(s, {}).get("files") or {})
        if plan[s] == "reused" else {} for s in STAGES}

    for stage in STAGES:
        if plan[stage] not in ("skipped", "provided"):
            continue
        for name in _STAGE_FILES[stage]:
            entry = _recorded_file(previous, name)
            if entry is None or not paths[name].exists():
                continue
            if _file_unchanged(paths[name], entry) or overwrite:
                paths[name].unlink()  # our own output of an earlier run, now out of date
                log.info("removed %s: its step is not run any more", paths[name].name)
            else:
                stage_files[stage][name] = entry  # edited by hand: kept, and known

    def recorded(stage: str, name: str) -> None:
        stage_files[stage][name] = {"path": paths[name].name, **_fingerprint(paths[name])}

    # --- scan and regions ------------------------------------------------------------------
    need_scan = any(plan[s] == "ran" for s in STAGES)
    scan = regions = None
    seg_qc: dict[str, Any] = {}
    if need_scan:
        from HRpQCTCore.io import read_scan

        scan = read_scan(scan_path, units=settings.units, calibration=settings.calibration)
        log.info("read %s: %s voxels of %s mm", scan_path.name, scan.shape, scan.spacing_mm)
    check(cancel)
    if plan["segmentation"] == "ran":
        regions, seg_qc = _segment(scan, model_folder, settings, paths, progress, cancel)
        for name in _STAGE_FILES["segmentation"]:
            recorded("segmentation", name)
    elif need_scan and seg_key is not None:
        from HRpQCTRadiomicsEngine.inputs import read_region_map

        source = job.regions if job.regions else paths["regions_nifti"]
        regions = read_region_map(source, scan.hu.shape)
        if not job.regions and paths["segmentation_qc"].is_file():
            seg_qc = json.loads(paths["segmentation_qc"].read_text(encoding="utf-8"))
    elif paths["segmentation_qc"].is_file() and not job.regions:
        seg_qc = json.loads(paths["segmentation_qc"].read_text(encoding="utf-8"))
    check(cancel)

    # --- radiomics -------------------------------------------------------------------------
    if plan["radiomics"] == "ran":
        from HRpQCTRadiomicsEngine.extraction import extract_features
        from HRpQCTRadiomicsEngine.table import write_feature_csv

        step = int(settings.slice_step)
        slices = None if step == 1 else list(range(0, scan.n_slices, step))
        common = dict(settings=rad_settings, features=request, slices=slices,
                      scan=job.scan_id, subject=subject, progress=progress, cancel=cancel)
        if client is not None:
            table = extract_on_cluster(client, scan.hu, regions, scan.spacing_mm, **common)
        else:
            table = extract_features(scan.hu, regions, scan.spacing_mm, mode="slice",
                                     n_jobs=settings.jobs, **common)
        write_feature_csv(paths["features"], table)
        recorded("radiomics", "features")
        log.info("radiomics (%s set, settings %s): %d region-slice rows, %d ok, %d feature(s)",
                 feature_set, rad_settings.name, len(table.rows), len(table.ok_rows()),
                 len(table.feature_names))
    check(cancel)

    # --- classification --------------------------------------------------------------------
    probability_info = None
    if plan["classification"] == "ran":
        probability_info = _classify(classifier, paths, job.scan_id, subject)
        recorded("classification", "probability")
    elif plan["classification"] == "reused" and paths["probability"].is_file():
        probability_info = json.loads(paths["probability"].read_text(encoding="utf-8"))

    # --- QC and report ---------------------------------------------------------------------
    if plan["report"] == "ran":
        qc = _report(job, scan, regions, seg_qc, probability_info, classifier, skipped,
                     plan, paths, settings, feature_set, progress)
        for name in _STAGE_FILES["report"]:
            if paths[name].exists():
                recorded("report", name)
    elif paths["qc"].is_file():
        qc = json.loads(paths["qc"].read_text(encoding="utf-8"))
    else:
        qc = {}

    outputs = {}
    for stage in STAGES:
        if plan[stage] in ("skipped", "provided"):
            continue
        for name, entry in stage_files[stage].items():
            outputs[name] = str(out_dir / entry["path"])
    if job.regions:
        outputs["regions_input"] = str(job.regions)
    probability = None if probability_info is None else probability_info.get("probability")
    result = ScanResult(
        scan_id=job.scan_id, subject=subject, out_dir=out_dir, stages=plan, skipped=skipped,
        warnings=list(qc.get("warnings") or []), outputs=outputs, probability=probability,
        volumes_mm3={r["key"]: r["volume_mm3"] for r in qc.get("regions") or []},
        seconds=time.perf_counter() - start)
    record = {
        "format": RECORD_FORMAT, "format_version": RECORD_VERSION,
        "scan_id": job.scan_id, "subject": subject, "input": {"path": str(scan_path),
                                                              **input_fp},
        "regions_input": None if regions_fp is None else {"path": str(job.regions),
                                                          **regions_fp},
        "settings": settings.describe(), "feature_set": feature_set,
        "software": {"hrpqct": _version()},
        "stages": {s: {"key": keys[s], "status": plan[s], "files": stage_files[s]}
                   for s in STAGES},
        "skipped": skipped, "summary": result.summary_row(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_text_atomic(out_dir / RECORD_NAME, _dump(record))
    for message in skipped:
        log.info("%s: %s", job.scan_id, message)
    log.info("%s: %s (%.1f s)", job.scan_id, result.action, result.seconds)
    return result


def _segment(scan, model_folder: Path, settings: RunSettings, paths: dict[str, Path],
             progress, cancel) -> tuple[np.ndarray, dict[str, Any]]:
    from HRpQCTCore.io import write_label_map
    from HRpQCTPipeline.commands.segment import write_labels
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.postprocess import postprocess, preset

    runner, config = _segmenter(model_folder, settings)
    seg = run_segmentation(scan.hu, runner, config=config, batch_size=settings.batch_size,
                           progress=progress, cancel=cancel)
    log.info("segmented %d slices in %.1f s (%s, %s)", scan.n_slices, seg.seconds, seg.device,
             seg.engine)
    result = postprocess(seg.labels, scan.hu, scan.spacing_mm, preset(settings.postprocess),
                         progress=progress, cancel=cancel)
    write_labels(result.regions, scan, paths["regions_seg_nrrd"], regions=True)
    write_label_map(result.regions, scan, paths["regions_nifti"])
    qc = {"model": str(model_folder), "model_sha256": _model_sha256(model_folder),
          "device": seg.device, "engine": seg.engine, "seconds": seg.seconds,
          "postprocess_preset": settings.postprocess, "warnings": list(result.warnings),
          "slice_confidence": [float(v) for v in seg.slice_confidence],
          "slice_foreground_confidence": [None if np.isnan(v) else float(v)
                                          for v in seg.slice_foreground_confidence]}
    write_text_atomic(paths["segmentation_qc"], _dump(qc))
    return result.regions, qc


def _classify(classifier, paths: dict[str, Path], scan_id: str, subject: str) -> dict:
    from HRpQCTRadiomicsEngine.classification import CAVEAT
    from HRpQCTRadiomicsEngine.prediction import predict_rows
    from HRpQCTRadiomicsEngine.table import read_feature_csv

    rows = read_feature_csv(paths["features"])
    prediction = predict_rows(classifier, rows)
    p = float(prediction.subject_probabilities[prediction.subjects.index(subject)])
    info = {
        "scan_id": scan_id, "subject": subject, "probability": p,
        "aggregation": prediction.aggregation, "n_slices": prediction.slices_of(subject),
        "threshold": classifier.threshold, "classifier": classifier.path.name,
        "classifier_sha256": sha256_file(classifier.path), "regions": classifier.regions,
        "features": classifier.features,
        "per_slice": {str(s): float(v) for (_, s), v in zip(prediction.sample_ids,
                                                            prediction.probabilities,
                                                            strict=True)},
        "caveat": CAVEAT,
    }
    write_text_atomic(paths["probability"], _dump(info))
    log.info("%s: osteoporosis probability %.3f (%s of %d slices; research use only)",
             subject, p, prediction.aggregation, info["n_slices"])
    return info


def _report(job: ScanJob, scan, regions, seg_qc: dict, probability_info, classifier,
            skipped: list[str], plan: dict[str, str], paths: dict[str, Path],
            settings: RunSettings, feature_set: str, progress) -> dict[str, Any]:
    from HRpQCTPipeline import qc as qc_module
    from HRpQCTPipeline import report as report_module
    from HRpQCTRadiomicsEngine.classification import CAVEAT

    stage = "report"
    report(progress, 0, 3, stage)
    info: dict[str, Any] = {
        "scan_id": job.scan_id, "subject": job.subject or job.scan_id,
        "input": Path(job.scan).name, "created": time.strftime("%Y-%m-%d %H:%M"),
        "skipped": skipped, "caveat": CAVEAT,
    }
    warnings: list[qc_module.QCWarning] = []
    confidence = motion = None
    if regions is not None:
        stats = qc_module.region_stats(regions, scan.spacing_mm, scan.hu)
        if seg_qc.get("slice_foreground_confidence"):
            confidence = qc_module.confidence_summary(seg_qc["slice_confidence"],
                                                      seg_qc["slice_foreground_confidence"])
        motion = qc_module.motion_index(scan.hu, regions, scan.spacing_mm)
        warnings = qc_module.quality_warnings(
            stats, confidence=confidence, motion=motion,
            postprocess_warnings=seg_qc.get("warnings"))
        info["regions"] = [s.to_dict(per_slice=False) for s in stats]
    else:
        stats = []
    info["warnings"] = [w.to_dict() for w in warnings]
    info["confidence"] = confidence
    info["motion"] = motion
    info["probability"] = probability_info
    report(progress, 1, 3, stage)

    if paths["features"].is_file() and plan["radiomics"] != "skipped":
        from HRpQCTRadiomicsEngine.table import read_feature_csv

        rows = read_feature_csv(paths["features"])
        if classifier is not None:
            from HRpQCTRadiomicsEngine.classification import split_qualified_name

            wanted: dict[str, list[str]] = {}
            for name in classifier.features[:24]:
                region, feature = split_qualified_name(name)
                wanted.setdefault(region, []).append(feature)
        else:
            wanted = {d.key: [n for n in REPORT_FEATURES if n in rows.feature_names]
                      for d in REGIONS}
        info["key_features"] = _mean_features(rows, wanted)

    figures = {}
    n = scan.n_slices
    lowest = (confidence or {}).get("lowest_slice")
    low = any(w.code == "low_confidence" for w in warnings)
    slices = report_module.representative_slices(n, extra=[lowest] if low else [])
    captions = {lowest: "lowest confidence"} if low and lowest is not None else None
    shown = regions if regions is not None else np.zeros(scan.hu.shape, dtype=np.uint8)
    figure = report_module.overlay_figure(scan.hu, shown, scan.spacing_mm, slices,
                                          paths["overlay_png"], title=job.scan_id,
                                          labels=captions)
    if figure is not None:
        figures["representative slices"] = figure
    if stats:
        figure = report_module.profiles_figure(stats, confidence, motion, paths["profiles_png"],
                                               title=f"{job.scan_id}: regions per slice")
        if figure is not None:
            figures["regions and confidence per slice"] = figure
    if not figures:
        log.warning("matplotlib is not installed: the report has no figures "
                    "(pip install matplotlib).")
    info["figures"] = {k: str(v) for k, v in figures.items()}
    report(progress, 2, 3, stage)
    outputs = {}
    for name in ("regions_seg_nrrd", "regions_nifti", "features", "probability",
                 "segmentation_qc", "qc"):
        if name == "qc" or (paths[name].is_file() and plan[_stage_of(name)] != "skipped"):
            outputs[name] = paths[name]
    if job.regions:
        outputs["regions (given)"] = Path(job.regions)
    info["outputs"] = {k: str(v) for k, v in outputs.items()}
    info["provenance"] = {
        "hrpqct": _version(), "feature set": feature_set,
        "segmentation": plan["segmentation"], "model": seg_qc.get("model", "–"),
        "model sha256": seg_qc.get("model_sha256", "–"),
        "inference": f"{seg_qc.get('device', '–')} / {seg_qc.get('engine', '–')}",
        "post-processing preset": seg_qc.get("postprocess_preset", "–"),
        "classifier": "–" if classifier is None else classifier.path.name,
        "slice step (radiomics)": settings.slice_step,
    }
    qc_record = {k: info[k] for k in ("scan_id", "subject", "warnings", "confidence", "motion")}
    qc_record["regions"] = [s.to_dict(per_slice=True) for s in stats]
    write_text_atomic(paths["qc"], _dump(qc_record))
    report_module.write_scan_report(paths["report"], info)
    report(progress, 3, 3, stage)
    return qc_record


def _stage_of(name: str) -> str:
    for stage, names in _STAGE_FILES.items():
        if name in names:
            return stage
    raise KeyError(name)


def _clean(value):
    """JSON-ready copy: NaN/inf -> None, numpy scalars -> Python, paths -> str."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _dump(value) -> str:
    return json.dumps(_clean(value), indent=1, default=str) + "\n"
