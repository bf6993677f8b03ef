"""Which radiomic features a run extracts, and extracting them on a Dask cluster.

The feature set (``RunSettings.features``) decides the cost of a run: ``classifier`` (only what
the classifier uses: prediction mode), ``basic`` (shape and first-order features of the original
image, every region; cheap), ``full`` (the whole preset: slow), ``none``; ``auto`` is
``classifier`` when a classifier is used, else ``basic``. The classifier's features are always
added, so a probability can be computed from whatever table was written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import REGIONS

if TYPE_CHECKING:
    from HRpQCTRadiomicsEngine.extraction import FeatureTable

__all__ = ["FEATURE_SETS", "BASIC_FEATURES", "feature_request", "extract_on_cluster"]

#: The names ``RunSettings.features`` accepts.
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


#: pyradiomics' parameter validation (pykwalify) is not thread-safe: scans running in threads
#: of one Dask worker parse their settings one at a time.
_settings_lock = threading.Lock()


def feature_request(settings: Any, classifier: Any) -> tuple[Any, Any, str]:
    """(radiomics settings, request for extract_features' ``features=``, set name).

    Parameters
    ----------
    settings:
        The run's :class:`~.pipeline.RunSettings` (``features``, ``preset``, ``params``).
    classifier:
        The loaded classifier, or None.

    Returns
    -------
    tuple
        The request is None for the full preset, else a mapping region label -> names; all
        three are None/``"none"`` for the ``none`` set.

    Raises
    ------
    HRpQCTError
        If the set needs a classifier there is none of, or the settings differ from the
        classifier's.
    """
    with _settings_lock:
        return _feature_request_unlocked(settings, classifier)


def _feature_request_unlocked(settings: Any, classifier: Any) -> tuple[Any, Any, str]:
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


def extract_on_cluster(client: Any, hu: np.ndarray, regions_map: np.ndarray,
                       spacing_mm: tuple[float, float, float], *, settings: Any,
                       features: Any = None, slices: Sequence[int] | None = None,
                       scan: str = "", subject: str = "",
                       progress: ProgressCallback | None = None,
                       cancel: CancelToken | None = None) -> FeatureTable:
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
