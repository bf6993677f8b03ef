"""The whole job for one scan: 7 regions, features, probability and a QC report, resumable.

:func:`run_scan` is what ``hrpqct run``, ``hrpqct batch`` and ``hrpqct demo`` call. It only
orchestrates: every stage is the engines' work (segmentation and post-processing, radiomics, a
saved classifier, the checks of :mod:`.qc` and the pages of :mod:`.report`), and
:mod:`.record` decides from ``run.json`` which stages must run again. A job may bring its own
7-region map (e.g. one corrected in Slicer): then it replaces the segmentation.

**Missing artefacts.** Without a bundled segmentation model (and no ``--model``) or without a
bundled classifier (and no ``--classifier``) the stage is skipped with a message saying so; the
other stages still run where they can.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.artefacts import sha256_file
from HRpQCTCore.atomic import replace_hook, write_text_atomic
from HRpQCTCore.errors import ArtefactError, HRpQCTError, InputFileError
from HRpQCTCore.outputs import ensure_folder, plain_name, refuse_inputs_as_outputs
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import REGIONS, region_by_name
from HRpQCTPipeline.features import (
    BASIC_FEATURES,
    FEATURE_SETS,
    extract_on_cluster,
    feature_request,
)
from HRpQCTPipeline.record import (
    RECORD_FORMAT,
    RECORD_NAME,
    RECORD_VERSION,
    STAGE_FILES,
    STAGE_VERSIONS,
    STAGES,
    RunJournal,
    dump_json,
    fingerprint,
    model_sha256,
    plan_stages,
    previous_record,
    read_record,
    stage_files,
    stage_key,
    write_record,
)
from HRpQCTPipeline.runlog import scan_log
from HRpQCTRadiomicsEngine.model_io import BUNDLED_CLASSIFIER
from HRpQCTSegmentationEngine.uncertainty import DEFAULT_UNCERTAINTY

__all__ = [
    "BUNDLED_CLASSIFIER",
    "FEATURE_SETS",
    "BASIC_FEATURES",
    "RECORD_NAME",
    "RunSettings",
    "ScanJob",
    "ScanResult",
    "RunContext",
    "output_paths",
    "run_scan",
    "read_record",
    "extract_on_cluster",
    "scan_log",
]

log = logging.getLogger("hrpqct")

#: Features shown per region in the report when no classifier chooses them.
REPORT_FEATURES = ("original_shape2D_PixelSurface", "original_firstorder_Mean",
                   "original_firstorder_10Percentile", "original_firstorder_90Percentile",
                   "original_firstorder_Entropy")
LOG_NAME = "run.log"
#: Part of the classification's resume key: probabilities written before the QC gate
#: (withholding a probability whose regions failed QC) are computed again.
QC_GATE_VERSION = 1


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
        One of :data:`FEATURE_SETS` (see :mod:`.features`).
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
    accept_unusual_scan:
        Segment a scan the plausibility check refuses (not a distal tibia/fibula HR-pQCT scan,
        see :mod:`HRpQCTSegmentationEngine.plausibility`); its results carry an
        ``unusual_scan`` warning and no probability. Part of the segmentation's resume key.
    uncertainty:
        The segmentation's per-slice uncertainty for the QC (``none``, ``margin`` or ``flip``,
        see :mod:`HRpQCTSegmentationEngine.uncertainty`); QC only, labels are unchanged. Part
        of the segmentation's resume key (the QC it records changes).
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
    accept_unusual_scan: bool = False
    uncertainty: str = DEFAULT_UNCERTAINTY

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
        # An id given (even empty) is checked as given; only None takes the file name.
        return cls(scan=scan, scan_id=scan_id_from_path(scan) if scan_id is None else scan_id,
                   subject=subject or "", regions=Path(regions) if regions else None)

    def __post_init__(self) -> None:
        # The id names the output files (and a batch's sub-folder): `../x` or an absolute
        # path would write outside the output folder.
        self.scan_id = plain_name(self.scan_id, "scan id")


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
    probability:
        The osteoporosis probability; None when not computed or withheld.
    probability_withheld:
        Why the probability is withheld (quality control failed for the regions the
        classifier uses); None when it is not.
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
    probability_withheld: str | None = None

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
            "probability_withheld": self.probability_withheld,
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


# --- the context the steps share -------------------------------------------------------------

@dataclass
class RunContext:
    """What the steps of one :func:`run_scan` share; each step fills in its part.

    Attributes
    ----------
    job, out_dir, settings, overwrite, client, progress, cancel:
        The arguments of :func:`run_scan`.
    start_s:
        ``time.perf_counter()`` when the run began.
    paths:
        Output name -> path (:func:`output_paths`).
    previous:
        The record of an earlier run of this scan here (None: none).
    skipped:
        Why stages are skipped, in the order found.
    input_fp, regions_fp:
        Fingerprints of the scan and of a provided region map (see :mod:`.record`).
    model_folder, classifier:
        The resolved artefacts (None: stage skipped or not needed).
    rad_settings, request, feature_set:
        What radiomics extracts (:func:`.features.feature_request`).
    keys:
        Stage -> resume key (None: the stage cannot run).
    plan:
        Stage -> ``"ran"``, ``"reused"``, ``"skipped"`` or ``"provided"``.
    files:
        Stage -> output name -> recorded fingerprint, for the new record.
    scan, regions, seg_qc, probability_info, qc:
        The data the stages pass on.
    quality:
        Region statistics, QC warnings, confidence and motion, computed once (for the
        classification's QC gate and the report).
    """

    job: ScanJob
    out_dir: Path
    settings: RunSettings
    overwrite: bool = False
    client: Any = None
    progress: ProgressCallback | None = None
    cancel: CancelToken | None = None
    start_s: float = field(default_factory=time.perf_counter)
    paths: dict[str, Path] = field(default_factory=dict)
    previous: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)
    input_fp: dict[str, Any] = field(default_factory=dict)
    regions_fp: dict[str, Any] | None = None
    model_folder: Path | None = None
    classifier: Any = None
    rad_settings: Any = None
    request: dict[int, list[str]] | None = None
    feature_set: str = "none"
    keys: dict[str, str | None] = field(default_factory=dict)
    plan: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, dict]] = field(default_factory=dict)
    scan: Any = None
    regions: np.ndarray | None = None
    seg_qc: dict[str, Any] = field(default_factory=dict)
    probability_info: dict[str, Any] | None = None
    qc: dict[str, Any] = field(default_factory=dict)
    quality: tuple[list, list, Any, Any] | None = None
    journal: RunJournal | None = None
    uncertainty: dict[str, Any] | None = None

    @property
    def subject(self) -> str:
        """The subject identifier (the scan id when the job names none)."""
        return self.job.subject or self.job.scan_id

    def runs(self, stage: str) -> bool:
        """Whether ``stage`` is computed in this run."""
        return self.plan[stage] == "ran"

    def record_output(self, stage: str, name: str) -> None:
        """Note the file ``name`` just written by ``stage`` for the new record."""
        known = self.journal.pending(name) if self.journal is not None else None
        self.files[stage][name] = {"path": self.paths[name].name,
                                   **fingerprint(self.paths[name], known)}


# --- the pipeline ------------------------------------------------------------------------------

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
    out_dir = ensure_folder(out_dir)
    with scan_log(out_dir / LOG_NAME):
        log.info("=== hrpqct %s: scan %s (%s) -> %s", _version(), job.scan_id, job.scan, out_dir)
        context = RunContext(job=job, out_dir=out_dir, settings=settings, overwrite=overwrite,
                             client=client, progress=progress, cancel=cancel)
        try:
            return _run_scan(context)
        except Exception as exc:
            log.error("failed: %s: %s", type(exc).__name__, exc)
            raise


def _version() -> str:
    from HRpQCTCore import __version__

    return __version__


def _run_scan(ctx: RunContext) -> ScanResult:
    # the record: what exists, what it was made from, what must run again
    _check_inputs(ctx)
    ctx.previous = previous_record(ctx.out_dir, ctx.job.scan_id, ctx.paths, ctx.overwrite)
    _fingerprint_inputs(ctx)
    _resolve_artefacts(ctx)
    ctx.keys = _stage_keys(ctx)
    ctx.plan = plan_stages(ctx.keys, ctx.previous, ctx.out_dir, ctx.paths,
                           overwrite=ctx.overwrite, provided_regions=bool(ctx.job.regions))
    ctx.files = stage_files(ctx.plan, ctx.previous, ctx.paths, ctx.overwrite)
    # the stages, with run.json kept up to date so that an interrupted run resumes
    ctx.journal = RunJournal(ctx.out_dir, _record_header(ctx), ctx.previous, ctx.paths)
    for stage in STAGES:
        if not ctx.runs(stage):
            ctx.journal.set_stage(stage, _stage_entry(ctx, stage), save=False)
    with replace_hook(ctx.journal.note_replace):
        _load_scan(ctx)
        for stage, step in _STAGE_STEPS:
            step(ctx)
            if ctx.runs(stage):
                ctx.journal.set_stage(stage, _stage_entry(ctx, stage))
    # the outcome
    result = _result(ctx)
    write_record(ctx.out_dir, _record(ctx, result))
    for message in ctx.skipped:
        log.info("%s: %s", ctx.job.scan_id, message)
    log.info("%s: %s (%.1f s)", ctx.job.scan_id, result.action, result.seconds)
    return result


# --- record and plan steps ---------------------------------------------------------------------

def _stage_entry(ctx: RunContext, stage: str) -> dict[str, Any]:
    """A stage's part of the record: its key, what it did, the files it holds."""
    return {"key": ctx.keys[stage], "status": ctx.plan[stage], "files": ctx.files[stage]}


def _check_inputs(ctx: RunContext) -> None:
    scan_path = Path(ctx.job.scan)
    if not scan_path.exists():
        raise InputFileError(f"Scan {scan_path} does not exist: check the path.")
    if ctx.job.regions is not None and not Path(ctx.job.regions).exists():
        raise InputFileError(f"Region map {ctx.job.regions} does not exist: check the path.")
    ctx.paths = output_paths(ctx.out_dir, ctx.job.scan_id)
    # e.g. --regions OUT/<id>_regions.nii.gz: replacing that output would destroy the input
    refuse_inputs_as_outputs([*ctx.paths.values(), ctx.out_dir / RECORD_NAME],
                             [ctx.job.scan, ctx.job.regions])


def _fingerprint_inputs(ctx: RunContext) -> None:
    previous = ctx.previous or {}
    ctx.input_fp = fingerprint(Path(ctx.job.scan), previous.get("input"))
    if ctx.job.regions:
        ctx.regions_fp = fingerprint(Path(ctx.job.regions), previous.get("regions_input"))


def _resolve_artefacts(ctx: RunContext) -> None:
    """The model (unless the job brings its regions), the classifier, the feature request."""
    if not ctx.job.regions:
        ctx.model_folder, message = _resolve_model(ctx.settings)
        if message:
            ctx.skipped.append(message)
        if ctx.model_folder is not None:
            from HRpQCTSegmentationEngine.limits import check_device

            check_device(ctx.settings.device)  # before anything is read or written
    ctx.classifier, message = _resolve_classifier(ctx.settings)
    if message:
        ctx.skipped.append(message)
    ctx.rad_settings, ctx.request, ctx.feature_set = feature_request(ctx.settings,
                                                                     ctx.classifier)
    if ctx.feature_set == "none":
        ctx.skipped.append("radiomics skipped: --features none")


def _is_bundled(name: str) -> bool:
    """Whether this installation lists the artefact ``name`` (present and intact or not)."""
    from HRpQCTCore.artefacts import list_artefacts

    return any(a.name == name for a in list_artefacts())


def _resolve_model(settings: RunSettings) -> tuple[Path | None, str | None]:
    from HRpQCTSegmentationEngine import bundled

    try:
        return bundled.resolve_model_folder(settings.model), None
    except ArtefactError as exc:
        # The user's model, or a bundled one that is listed but missing or tampered with: an
        # error (exit 6). Only an installation that ships no model skips the stage.
        if settings.model or _is_bundled(bundled.BUNDLED_MODEL):
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
        if _is_bundled(BUNDLED_CLASSIFIER):
            raise  # listed but missing or tampered with: a broken installation, not "none"
        return None, (f"classification skipped: {exc}. No bundled classifier is available in "
                      "this installation; train one with 'hrpqct train-classifier' and pass it "
                      "with --classifier.")
    return load_classifier(path), None


def _stage_keys(ctx: RunContext) -> dict[str, str | None]:
    """Stage -> resume key; each key includes the keys of the stages it depends on."""
    from HRpQCTSegmentationEngine.postprocess import preset
    from HRpQCTSegmentationEngine.postprocess.soft_tissue_model import split_identity

    settings = ctx.settings
    calibration = None if settings.calibration is None else settings.calibration.to_dict()
    input_key = stage_key({"scan": ctx.input_fp["sha256"], "units": settings.units,
                           "calibration": calibration})
    if ctx.job.regions:
        seg_key = stage_key({"input": input_key, "provided_regions": ctx.regions_fp["sha256"]})
    elif ctx.model_folder is not None:
        # the plausibility override and the uncertainty method change what the stage
        # records (a refused scan, the QC's per-slice uncertainty), so they are in its key
        seg_key = stage_key({"input": input_key, "model": model_sha256(ctx.model_folder),
                             "postprocess": settings.postprocess,
                             "soft_tissue_split": split_identity(
                                 preset(settings.postprocess).soft_tissue_model),
                             "accept_unusual_scan": bool(settings.accept_unusual_scan),
                             "uncertainty": settings.uncertainty,
                             "version": STAGE_VERSIONS["segmentation"]})
    else:
        seg_key = None
    rad_key = cls_key = None
    if seg_key and ctx.feature_set != "none":
        rad_key = stage_key({"seg": seg_key, "settings": ctx.rad_settings.sha256,
                             "request": None if ctx.request is None
                             else sorted(ctx.request.items()),
                             "step": settings.slice_step, "subject": ctx.subject,
                             "version": STAGE_VERSIONS["radiomics"]})
        if ctx.classifier is not None:
            cls_key = stage_key({"rad": rad_key, "classifier": sha256_file(ctx.classifier.path),
                                 "version": STAGE_VERSIONS["classification"],
                                 "qc_gate": QC_GATE_VERSION})
    report_key = (stage_key({"keys": [seg_key, rad_key, cls_key], "input": input_key,
                             "version": STAGE_VERSIONS["report"]}) if settings.report else None)
    return {"segmentation": seg_key, "radiomics": rad_key, "classification": cls_key,
            "report": report_key}


# --- stages ------------------------------------------------------------------------------------

def _load_scan(ctx: RunContext) -> None:
    """Read the scan when any stage runs (reused stages need no voxels)."""
    if any(ctx.runs(s) for s in STAGES):
        from HRpQCTCore.io import read_scan

        scan_path = Path(ctx.job.scan)
        ctx.scan = read_scan(scan_path, units=ctx.settings.units,
                             calibration=ctx.settings.calibration)
        log.info("read %s: %s voxels of %s mm", scan_path.name, ctx.scan.shape,
                 ctx.scan.spacing_mm)
    check(ctx.cancel)


def _segmentation_stage(ctx: RunContext) -> None:
    """Segment, or read the regions (provided or from an earlier run) for later stages."""
    if ctx.runs("segmentation"):
        _segment(ctx)
        for name in STAGE_FILES["segmentation"]:
            ctx.record_output("segmentation", name)
    elif ctx.scan is not None and ctx.keys["segmentation"] is not None:
        from HRpQCTRadiomicsEngine.inputs import read_region_map

        source = ctx.job.regions if ctx.job.regions else ctx.paths["regions_nifti"]
        ctx.regions = read_region_map(source, ctx.scan)
        if not ctx.job.regions:
            ctx.seg_qc = _read_json_if_present(ctx.paths["segmentation_qc"])
    elif not ctx.job.regions:
        ctx.seg_qc = _read_json_if_present(ctx.paths["segmentation_qc"])
    check(ctx.cancel)


def _segment(ctx: RunContext) -> None:
    from HRpQCTCore.io import write_label_map
    from HRpQCTSegmentationEngine.limits import require_segmentation_memory
    from HRpQCTSegmentationEngine.model_card import identity_for_qc
    from HRpQCTSegmentationEngine.plausibility import require_plausible_scan
    from HRpQCTSegmentationEngine.postprocess import postprocess, preset
    from HRpQCTSegmentationEngine.postprocess.soft_tissue_model import split_identity
    from HRpQCTSegmentationEngine.uncertainty import SIGNAL_OF_METHOD

    scan, settings, paths = ctx.scan, ctx.settings, ctx.paths
    # refuse a scan whose post-processing cannot fit before the network runs, not after
    require_segmentation_memory(scan.shape, scan.spacing_mm, preset(settings.postprocess))
    # a metal foam or a mask would be segmented confidently and wrongly: refuse it too
    plausibility = require_plausible_scan(scan.hu, scan.spacing_mm,
                                          accept_unusual=settings.accept_unusual_scan)
    seg = _run_network(ctx)
    _return_freed_memory()  # the runner's buffers, before post-processing's peak
    log.info("segmented %d slices in %.1f s (%s, %s)", scan.n_slices, seg.seconds, seg.device,
             seg.engine)
    # Memory: the network's classes are the post-processing's work array (cleaned in place,
    # then overwritten by the regions), and no one else holds them: no second and third
    # label volume beside the HU (0.86 GB for a full scan).
    classes, seg.labels = seg.labels, None
    result = postprocess(classes, scan.hu, scan.spacing_mm, preset(settings.postprocess),
                         overwrite_input=True, progress=ctx.progress, cancel=ctx.cancel)
    del classes
    _return_freed_memory()  # post-processing's temporaries, before writing
    write_label_map(result.regions, scan, paths["regions_seg_nrrd"])
    write_label_map(result.regions, scan, paths["regions_nifti"])
    ctx.seg_qc = {
        "model": str(ctx.model_folder), "model_sha256": model_sha256(ctx.model_folder),
        "model_identity": identity_for_qc(ctx.model_folder), "device": seg.device,
        "engine": seg.engine, "seconds": seg.seconds,
        "postprocess_preset": settings.postprocess, "warnings": list(result.warnings),
        "soft_tissue_levels": result.soft_tissue_levels.to_dict(),
        "soft_tissue_split": split_identity(preset(settings.postprocess).soft_tissue_model),
        "slice_confidence": [float(v) for v in seg.slice_confidence],
        "slice_foreground_confidence": [None if np.isnan(v) else float(v)
                                        for v in seg.slice_foreground_confidence],
        "plausibility": plausibility.to_dict(), "uncertainty_method": seg.uncertainty_method,
        "uncertainty_signal": SIGNAL_OF_METHOD.get(seg.uncertainty_method),
        "slice_uncertainty": None if seg.slice_uncertainty is None else [
            None if np.isnan(v) else float(v) for v in seg.slice_uncertainty],
        "voxel_resampling": seg.voxel_resampling}
    write_text_atomic(paths["segmentation_qc"], dump_json(ctx.seg_qc))
    ctx.regions = result.regions


def _run_network(ctx: RunContext):
    """The network's classes for every slice (a ``SegmentationResult``).

    The model runner lives only while this runs: once the network is done, nothing holds it,
    so its memory (ONNX Runtime keeps ~0.4 GB of working buffers) is free for
    post-processing.
    """
    from HRpQCTSegmentationEngine.inference import run_segmentation

    scan, settings = ctx.scan, ctx.settings
    segmenter = _segmenter(ctx.model_folder, settings)
    return run_segmentation(scan.hu, segmenter.runner, config=segmenter.config,
                            batch_size=settings.batch_size, progress=ctx.progress,
                            cancel=ctx.cancel, uncertainty=settings.uncertainty,
                            spacing_mm=scan.spacing_mm)


def _return_freed_memory() -> None:
    """Give the memory freed since the last call back to the system (Linux, glibc).

    glibc keeps freed heap pages (and those of every thread's arena) for reuse, and they count
    in the process's resident memory: after the network and after post-processing that is
    ~0.1 GB which later steps would add their own memory to. Elsewhere nothing happens.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl): no trim
        ctypes.CDLL(None).malloc_trim(0)


@dataclass(eq=False)
class _Segmenter:
    """A prepared model runner and its preprocessing settings."""

    runner: Any
    config: Any


_runner_lock = threading.Lock()
#: Runners in use, shared by the scans that segment at the same time (threads of one process);
#: weak, so a runner is freed when no scan uses it (preparing one again takes ~0.3 s: graphs
#: exported from torch are cached on disk).
_runners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _segmenter(folder: Path, settings: RunSettings) -> _Segmenter:
    """A prepared model runner: the one in use for this model and these settings, or a new one."""
    from HRpQCTSegmentationEngine.inference import prepare_segmenter

    key = (str(folder.resolve()), model_sha256(folder), settings.device, settings.engine,
           settings.fast)
    with _runner_lock:
        segmenter = _runners.get(key)
        if segmenter is None:
            segmenter = _Segmenter(*prepare_segmenter(folder, device=settings.device,
                                                      fast=settings.fast,
                                                      engine=settings.engine))
            _runners[key] = segmenter
        return segmenter


def _radiomics_stage(ctx: RunContext) -> None:
    if ctx.runs("radiomics"):
        from HRpQCTRadiomicsEngine.extraction import extract_features
        from HRpQCTRadiomicsEngine.table import write_feature_csv

        scan, step = ctx.scan, int(ctx.settings.slice_step)
        slices = None if step == 1 else list(range(0, scan.n_slices, step))
        common = dict(settings=ctx.rad_settings, features=ctx.request, slices=slices,
                      scan=ctx.job.scan_id, subject=ctx.subject, progress=ctx.progress,
                      cancel=ctx.cancel)
        if ctx.client is not None:
            table = extract_on_cluster(ctx.client, scan.hu, ctx.regions, scan.spacing_mm,
                                       **common)
        else:
            table = extract_features(scan.hu, ctx.regions, scan.spacing_mm, mode="slice",
                                     n_jobs=ctx.settings.jobs, **common)
        write_feature_csv(ctx.paths["features"], table)
        ctx.record_output("radiomics", "features")
        log.info("radiomics (%s set, settings %s): %d region-slice rows, %d ok, %d feature(s)",
                 ctx.feature_set, ctx.rad_settings.name, len(table.rows), len(table.ok_rows()),
                 len(table.feature_names))
    check(ctx.cancel)


def _classification_stage(ctx: RunContext) -> None:
    if ctx.runs("classification"):
        from HRpQCTPipeline.qc import classification_blockers

        blockers = classification_blockers(_quality_checks(ctx)[1], ctx.classifier.regions)
        if blockers:
            ctx.probability_info = _withhold(ctx.classifier, ctx.paths, ctx.job.scan_id,
                                             ctx.subject, blockers)
        else:
            ctx.probability_info = _classify(ctx.classifier, ctx.paths, ctx.job.scan_id,
                                             ctx.subject)
        ctx.record_output("classification", "probability")
    elif ctx.plan["classification"] == "reused" and ctx.paths["probability"].is_file():
        ctx.probability_info = json.loads(ctx.paths["probability"].read_text(encoding="utf-8"))


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
    classes = prediction.subject_class_dict(subject)
    if classes is not None:  # multiclass: every class; "probability" is its osteoporosis class
        info["class_probabilities"] = classes
    write_text_atomic(paths["probability"], dump_json(info))
    log.info("%s: osteoporosis probability %.3f (%s of %d slices; research use only)",
             subject, p, prediction.aggregation, info["n_slices"])
    return info


def _withhold(classifier, paths: dict[str, Path], scan_id: str, subject: str,
              blockers: list) -> dict:
    """Write a probability record without a probability, saying why (QC failed).

    No number is computed at all, so none can be shown by mistake; readers of the JSON (the
    batch table, the Slicer panel) find ``"probability": null`` and ``"withheld": true``
    with ``"withheld_reason"``.
    """
    from HRpQCTPipeline.qc import withheld_reason
    from HRpQCTRadiomicsEngine.classification import CAVEAT

    reason = withheld_reason(blockers)
    info = {
        "scan_id": scan_id, "subject": subject, "probability": None, "withheld": True,
        "withheld_reason": reason, "qc_codes": list(dict.fromkeys(w.code for w in blockers)),
        "qc_messages": [w.message for w in blockers],
        "classifier": classifier.path.name, "classifier_sha256": sha256_file(classifier.path),
        "regions": classifier.regions, "features": classifier.features, "caveat": CAVEAT,
    }
    if getattr(classifier, "class_names", None):  # withheld for every class alike
        info["class_probabilities"] = dict.fromkeys(classifier.class_names)
    write_text_atomic(paths["probability"], dump_json(info))
    log.warning("%s: osteoporosis probability %s", subject, reason)
    return info


def _report_stage(ctx: RunContext) -> None:
    if ctx.runs("report"):
        ctx.qc = _report(ctx)
        for name in STAGE_FILES["report"]:
            if ctx.paths[name].exists():
                ctx.record_output("report", name)
    else:
        ctx.qc = _read_json_if_present(ctx.paths["qc"])


#: The stages in order, with the step that runs (or reuses) each.
_STAGE_STEPS = (("segmentation", _segmentation_stage), ("radiomics", _radiomics_stage),
                ("classification", _classification_stage), ("report", _report_stage))


def _read_json_if_present(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# --- the QC report -----------------------------------------------------------------------------

def _report(ctx: RunContext) -> dict[str, Any]:
    """Write the QC record and the HTML report; returns the QC record."""
    from HRpQCTPipeline import qc as qc_module
    from HRpQCTPipeline import report as report_module
    from HRpQCTRadiomicsEngine.classification import CAVEAT

    job, stage = ctx.job, "report"
    report(ctx.progress, 0, 3, stage)
    info: dict[str, Any] = {
        "scan_id": job.scan_id, "subject": ctx.subject,
        "input": Path(job.scan).name, "created": time.strftime("%Y-%m-%d %H:%M"),
        "skipped": ctx.skipped, "caveat": CAVEAT,
    }
    stats, warnings, confidence, motion = _quality(ctx, info, qc_module)
    report(ctx.progress, 1, 3, stage)
    if ctx.paths["features"].is_file() and ctx.plan["radiomics"] != "skipped":
        info["key_features"] = _key_features(ctx)
    figures = _figures(ctx, stats, warnings, confidence, motion, report_module)
    info["figures"] = {k: str(v) for k, v in figures.items()}
    report(ctx.progress, 2, 3, stage)
    info["outputs"] = {k: str(v) for k, v in _report_outputs(ctx).items()}
    info["provenance"] = _provenance(ctx)
    qc_record = {k: info[k] for k in ("scan_id", "subject", "warnings", "confidence", "motion",
                                      "uncertainty")}
    qc_record["regions"] = [s.to_dict(per_slice=True) for s in stats]
    write_text_atomic(ctx.paths["qc"], dump_json(qc_record))
    report_module.write_scan_report(ctx.paths["report"], info)
    report(ctx.progress, 3, 3, stage)
    return qc_record


def _quality_checks(ctx: RunContext) -> tuple[list, list, Any, Any]:
    """Region statistics, QC warnings, confidence and motion of the regions (computed once)."""
    if ctx.quality is None:
        from HRpQCTPipeline import qc as qc_module

        warnings: list = []
        confidence = motion = None
        stats: list = []
        if ctx.regions is not None:
            scan, seg_qc = ctx.scan, ctx.seg_qc
            stats = qc_module.region_stats(ctx.regions, scan.spacing_mm, scan.hu)
            if seg_qc.get("slice_foreground_confidence"):
                confidence = qc_module.confidence_summary(
                    seg_qc["slice_confidence"], seg_qc["slice_foreground_confidence"])
            motion = qc_module.motion_index(scan.hu, ctx.regions, scan.spacing_mm)
            ctx.uncertainty = qc_module.uncertainty_summary(
                seg_qc.get("uncertainty_method"), seg_qc.get("slice_uncertainty"),
                seg_qc.get("uncertainty_signal"))
            warnings = qc_module.quality_warnings(
                stats, confidence=confidence, motion=motion,
                postprocess_warnings=seg_qc.get("warnings"), uncertainty=ctx.uncertainty,
                plausibility=seg_qc.get("plausibility"))
        ctx.quality = (stats, warnings, confidence, motion)
    return ctx.quality


def _quality(ctx: RunContext, info: dict[str, Any], qc_module) -> tuple[list, list, Any, Any]:
    """Region statistics, confidence, motion and warnings; added to ``info``."""
    stats, warnings, confidence, motion = _quality_checks(ctx)
    if ctx.regions is not None:
        info["regions"] = [s.to_dict(per_slice=False) for s in stats]
    info["warnings"] = [w.to_dict() for w in warnings]
    info["confidence"] = confidence
    info["motion"] = motion
    info["uncertainty"] = ctx.uncertainty
    info["probability"] = ctx.probability_info
    return stats, warnings, confidence, motion


def _key_features(ctx: RunContext) -> dict[str, dict[str, float]]:
    """The classifier's first features (or :data:`REPORT_FEATURES`), averaged per region."""
    from HRpQCTRadiomicsEngine.table import read_feature_csv

    rows = read_feature_csv(ctx.paths["features"])
    if ctx.classifier is not None:
        from HRpQCTRadiomicsEngine.classification import split_qualified_name

        wanted: dict[str, list[str]] = {}
        for name in ctx.classifier.features[:24]:
            region, feature = split_qualified_name(name)
            wanted.setdefault(region, []).append(feature)
    else:
        wanted = {d.key: [n for n in REPORT_FEATURES if n in rows.feature_names]
                  for d in REGIONS}
    return _mean_features(rows, wanted)


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


def _figures(ctx: RunContext, stats, warnings, confidence, motion,
             report_module) -> dict[str, Path]:
    """The report's PNG figures (none without matplotlib)."""
    scan, job, paths = ctx.scan, ctx.job, ctx.paths
    figures = {}
    lowest = (confidence or {}).get("lowest_slice")
    low = any(w.code == "low_confidence" for w in warnings)
    slices = report_module.representative_slices(scan.n_slices, extra=[lowest] if low else [])
    captions = {lowest: "lowest confidence"} if low and lowest is not None else None
    shown = (ctx.regions if ctx.regions is not None
             else np.zeros(scan.hu.shape, dtype=np.uint8))
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
    return figures


def _report_outputs(ctx: RunContext) -> dict[str, Path]:
    """The files the report links to: this run's outputs and a provided region map."""
    outputs = {}
    for name in ("regions_seg_nrrd", "regions_nifti", "features", "probability",
                 "segmentation_qc", "qc"):
        path = ctx.paths[name]
        if name == "qc" or (path.is_file() and ctx.plan[_stage_of(name)] != "skipped"):
            outputs[name] = path
    if ctx.job.regions:
        outputs["regions (given)"] = Path(ctx.job.regions)
    return outputs


def _model_lineage(identity: dict | None) -> str:
    """``name (fine-tuned from parent)`` for the report: which model made the result."""
    if not identity:
        return "–"
    parent = identity.get("parent")
    return f"{identity['name']} (fine-tuned from {parent})" if parent else identity["name"]


def _provenance(ctx: RunContext) -> dict[str, Any]:
    seg_qc, classifier = ctx.seg_qc, ctx.classifier
    return {
        "hrpqct": _version(), "feature set": ctx.feature_set,
        "segmentation": ctx.plan["segmentation"], "model": seg_qc.get("model", "–"),
        "model sha256": seg_qc.get("model_sha256", "–"),
        "model name (parent)": _model_lineage(seg_qc.get("model_identity")),
        "inference": f"{seg_qc.get('device', '–')} / {seg_qc.get('engine', '–')}",
        "post-processing preset": seg_qc.get("postprocess_preset", "–"),
        "classifier": "–" if classifier is None else classifier.path.name,
        "slice step (radiomics)": ctx.settings.slice_step,
    }


def _stage_of(name: str) -> str:
    for stage, names in STAGE_FILES.items():
        if name in names:
            return stage
    raise KeyError(name)


# --- the outcome -------------------------------------------------------------------------------

def _result(ctx: RunContext) -> ScanResult:
    outputs = {}
    for stage in STAGES:
        if ctx.plan[stage] in ("skipped", "provided"):
            continue
        for name, entry in ctx.files[stage].items():
            outputs[name] = str(ctx.out_dir / entry["path"])
    if ctx.job.regions:
        outputs["regions_input"] = str(ctx.job.regions)
    info = ctx.probability_info
    return ScanResult(
        scan_id=ctx.job.scan_id, subject=ctx.subject, out_dir=ctx.out_dir, stages=ctx.plan,
        skipped=ctx.skipped, warnings=list(ctx.qc.get("warnings") or []), outputs=outputs,
        probability=None if info is None else info.get("probability"),
        volumes_mm3={r["key"]: r["volume_mm3"] for r in ctx.qc.get("regions") or []},
        seconds=time.perf_counter() - ctx.start_s,
        probability_withheld=(info.get("withheld_reason") or "withheld")
        if info and info.get("withheld") else None)


def _record(ctx: RunContext, result: ScanResult) -> dict[str, Any]:
    """The new ``run.json``: inputs, settings, per-stage keys and files, the summary."""
    return {
        **_record_header(ctx),
        "stages": {s: _stage_entry(ctx, s) for s in STAGES},
        "skipped": ctx.skipped, "summary": result.summary_row(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _record_header(ctx: RunContext) -> dict[str, Any]:
    """What the record is about: scan, inputs, settings (the same while running and after)."""
    job = ctx.job
    return {
        "format": RECORD_FORMAT, "format_version": RECORD_VERSION,
        "scan_id": job.scan_id, "subject": ctx.subject,
        "input": {"path": str(Path(job.scan)), **ctx.input_fp},
        "regions_input": None if ctx.regions_fp is None else {"path": str(job.regions),
                                                              **ctx.regions_fp},
        "settings": ctx.settings.describe(), "feature_set": ctx.feature_set,
        "software": {"hrpqct": _version()},
    }
