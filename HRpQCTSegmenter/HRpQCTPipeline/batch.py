"""Cohort batches: many scans through :func:`.pipeline.run_scan`, locally or on a Dask cluster.

* Input: a manifest CSV (column ``scan``; optional ``scan_id``, ``subject``, ``regions``;
  relative paths are relative to the manifest; the ``manifest.csv`` of ``hrpqct cohort`` works
  too) or a folder of scans.
* Each scan gets its own folder ``OUT/<scan_id>/`` with its ``run.json`` record, so re-running
  the batch resumes: unchanged scans are skipped, changed ones (input file, settings, model,
  classifier) recomputed from the first stage that changed.
* One failing scan never stops the batch: its error goes into ``OUT/failures.csv`` (scan,
  input, error type, exit code, message) and the cohort page.
* Cohort outputs: ``OUT/cohort_features.csv`` (every scan's feature rows, the schema of
  :mod:`.table`, usable for ``hrpqct train-classifier``), ``OUT/cohort_summary.csv`` (one row per
  scan: probability, warnings, region volumes, status) and ``OUT/index.html``.
* Scale-out: with a Dask ``Client`` every scan is a task on the cluster; without one, scans run
  with joblib (``jobs`` processes; 1: in this process, with progress bars per step).
"""

from __future__ import annotations

import csv
import io
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from HRpQCTCore.atomic import write_text_atomic
from HRpQCTCore.errors import HRpQCTError, InputFileError
from HRpQCTCore.outputs import ensure_folder
from HRpQCTCore.regions import REGIONS
from HRpQCTPipeline.pipeline import RunSettings, ScanJob, run_scan, scan_log

__all__ = [
    "BatchResult",
    "read_manifest",
    "jobs_from_folder",
    "run_batch",
    "connect",
    "COHORT_FILES",
]

log = logging.getLogger("hrpqct")

COHORT_FILES = {
    "features": "cohort_features.csv",
    "summary": "cohort_summary.csv",
    "failures": "failures.csv",
    "report": "index.html",
    "log": "batch.log",
}
FAILURE_COLUMNS = ("scan_id", "input", "error", "exit_code", "message")


@dataclass
class BatchResult:
    """Outcome of :func:`run_batch`.

    Attributes
    ----------
    scans:
        Summary rows of the scans that completed (see :meth:`.pipeline.ScanResult.summary_row`).
    failures:
        One dict per failed scan (:data:`FAILURE_COLUMNS`).
    files:
        Cohort file name -> path.
    """

    scans: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no scan failed."""
        return not self.failures


# --- inputs ------------------------------------------------------------------------------------

def read_manifest(path: str | Path) -> list[ScanJob]:
    """Jobs from a manifest CSV (see the module docstring).

    Raises
    ------
    InputFileError
        If the file is missing, is not UTF-8 text CSV, has no ``scan`` column, lists nothing,
        or repeats a scan id.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"Manifest {path} does not exist.")
    try:
        jobs = _read_jobs(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(
            f"Manifest {path} is not a UTF-8 CSV text file ({exc}); give the CSV that lists "
            "the scans (a 'scan' column), not a scan or another binary file.") from exc
    if not jobs:
        raise InputFileError(f"Manifest {path} lists no scans.")
    _check_unique(jobs, str(path))
    return jobs


def _read_jobs(path: Path) -> list[ScanJob]:
    """The manifest's rows as jobs (paths relative to the manifest's folder)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        # A cohort manifest of `hrpqct cohort` names its columns scan_path / subject_id (its
        # regions_path is the phantom's truth, deliberately not used as regions here).
        cohort = "scan" not in header and "scan_path" in header
        if "scan" not in header and not cohort:
            raise InputFileError(
                f"Manifest {path} needs a 'scan' column (optional: scan_id, subject, regions); "
                f"it has {header}.")
        jobs = []
        for record in reader:
            record = {(k or "").strip(): (v or "").strip() for k, v in record.items()}
            if cohort:
                record = {"scan": record.get("scan_path", ""),
                          "scan_id": record.get("subject_id", ""),
                          "subject": record.get("subject_id", "")}
            if not record.get("scan"):
                continue
            scan = Path(record["scan"])
            scan = scan if scan.is_absolute() else path.parent / scan
            regions = record.get("regions") or None
            if regions and not Path(regions).is_absolute():
                regions = path.parent / regions
            jobs.append(ScanJob.from_path(scan, record.get("scan_id") or None,
                                          record.get("subject", ""), regions))
    return jobs


def jobs_from_folder(folder: str | Path) -> list[ScanJob]:
    """A job for every scan file in ``folder`` (not recursive; DICOM series folders too)."""
    from HRpQCTCore.io import SCAN_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"Scan folder {folder} does not exist.")
    jobs = []
    for entry in sorted(folder.iterdir()):
        name = entry.name.lower()
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            bare = name.split(";")[0]  # Scanco exports: SCAN.AIM;1
            volume_exts = [e for e, fmt in SCAN_EXTENSIONS.items() if fmt != "dicom"]
            if any(bare.endswith(ext) for ext in volume_exts) and ".seg." not in bare:
                jobs.append(ScanJob.from_path(entry))
        elif entry.is_dir() and any(SCAN_EXTENSIONS.get(p.suffix.lower()) == "dicom"
                                    for p in entry.iterdir()):
            jobs.append(ScanJob.from_path(entry, entry.name))
    if not jobs:
        raise InputFileError(
            f"No scan files in {folder} (looked for {', '.join(sorted(SCAN_EXTENSIONS))} and "
            "DICOM folders). Pass a manifest CSV to list scans explicitly.")
    _check_unique(jobs, str(folder))
    return jobs


def _check_unique(jobs: Sequence[ScanJob], where: str) -> None:
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.scan_id in seen:
            raise InputFileError(
                f"{where}: scan id {job.scan_id!r} is used for both {seen[job.scan_id]} and "
                f"{job.scan}. Give unique ids in a 'scan_id' column.")
        seen[job.scan_id] = job.scan


# --- one scan as a task ------------------------------------------------------------------------

def _scan_task(job: ScanJob, out: Path, settings: RunSettings, overwrite: bool,
               progress=None) -> dict[str, Any]:
    """Run one scan; never raises: returns its summary row or its failure row."""
    try:
        result = run_scan(job, out / job.scan_id, settings, overwrite=overwrite,
                          progress=progress)
        return {"ok": True, "row": result.summary_row()}
    except Exception as exc:  # one scan's failure must not stop the batch
        return {"ok": False, "row": _failure(job, exc)}


def _failure(job: ScanJob, exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, HRpQCTError):
        code, message = exc.exit_code, str(exc)
    else:  # a bug or a crashed worker: keep the traceback's last line for the report
        code = 1
        message = f"{exc} (internal error; details in the scan's run.log)"
        log.debug("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return {"scan_id": job.scan_id, "input": str(job.scan), "error": type(exc).__name__,
            "exit_code": code, "message": message}


def connect(scheduler: str):
    """A ``dask.distributed.Client`` for a scheduler address (``tcp://host:8786``).

    Raises
    ------
    HRpQCTError
        If dask.distributed is not installed or the scheduler cannot be reached.
    """
    try:
        from dask.distributed import Client
    except ImportError:
        raise HRpQCTError("--scheduler needs dask.distributed: pip install "
                          "'hrpqct-segmenter[cluster]'.") from None
    try:
        return Client(scheduler, timeout="20s")
    except OSError as exc:
        raise HRpQCTError(f"Cannot reach the Dask scheduler at {scheduler}: {exc}. Check the "
                          "address (dask scheduler prints it) and that workers are running "
                          "with this package installed.") from None


def run_batch(jobs: Sequence[ScanJob], out: str | Path, settings: RunSettings | None = None, *,
              client: Any = None, n_jobs: int = 1, overwrite: bool = False,
              progress: Callable[[int, int, str], None] | None = None,
              scan_progress: Callable[[int, int, str], None] | None = None) -> BatchResult:
    """Run every job into ``out/<scan_id>/`` and write the cohort files.

    Parameters
    ----------
    client:
        A ``dask.distributed.Client``: each scan is a task on its cluster (radiomics inside a
        task runs with ``settings.jobs`` processes, default 1 there).
    n_jobs:
        Without a client: scans in parallel with joblib (1: one after the other, here).
    progress:
        Called with (scans done, scans, "scans").
    scan_progress:
        Progress of the steps inside a scan (only when scans run one by one in this process).
    """
    settings = settings or RunSettings()
    out = ensure_folder(out)  # a file or a read-only place: one clear error, before any scan
    jobs = list(jobs)
    _check_unique(jobs, "batch")
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    total = len(jobs)
    with scan_log(out / COHORT_FILES["log"]):
        log.info("=== batch of %d scan(s) -> %s (%s)", total, out,
                 "Dask " + str(getattr(client, "scheduler", "")) if client is not None
                 else f"local, {n_jobs} job(s)")
        if progress:
            progress(0, total, "scans")

        def collect(job: ScanJob, outcome: dict[str, Any]) -> None:
            results[job.scan_id] = outcome
            if outcome["ok"]:
                row = outcome["row"]
                log.info("%s: %s", job.scan_id, row["action"])
            else:
                row = outcome["row"]
                log.error("%s failed (%s): %s", job.scan_id, row["error"], row["message"])
            if progress:
                progress(len(results), total, "scans")

        if client is not None:
            _run_on_cluster(client, jobs, out, settings, overwrite, collect)
        elif n_jobs == 1 or total == 1:
            for job in jobs:
                collect(job, _scan_task(job, out, settings, overwrite, scan_progress))
        else:
            from joblib import Parallel, delayed

            parallel = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator")
            outcomes = parallel(delayed(_scan_task)(job, out, settings, overwrite)
                                for job in jobs)
            for job, outcome in zip(jobs, outcomes, strict=True):
                collect(job, outcome)

        scans = [results[j.scan_id]["row"] for j in jobs if results[j.scan_id]["ok"]]
        failures = [results[j.scan_id]["row"] for j in jobs if not results[j.scan_id]["ok"]]
        files = _write_cohort(out, scans, failures)
        log.info("batch done: %d ok, %d failed (%.1f s)", len(scans), len(failures),
                 time.perf_counter() - start)
    return BatchResult(scans=scans, failures=failures, files=files,
                       seconds=time.perf_counter() - start)


def _run_on_cluster(client, jobs, out, settings, overwrite, collect) -> None:
    from dask.distributed import as_completed

    if settings.jobs is None:
        settings = replace(settings, jobs=1)  # the cluster parallelises over scans
    futures = {}
    for job in jobs:
        future = client.submit(_scan_task, job, out, settings, overwrite, pure=False,
                               key=f"hrpqct-scan-{job.scan_id}-{time.time_ns()}")
        futures[future] = job
    for future in as_completed(list(futures)):
        job = futures[future]
        try:
            outcome = future.result()
        except Exception as exc:  # the worker died or the task could not run
            outcome = {"ok": False, "row": _failure(job, exc)}
        collect(job, outcome)


# --- cohort files ------------------------------------------------------------------------------

def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _cohort_features(paths: list[Path]) -> str | None:
    """Concatenate per-scan feature CSVs (union of feature columns, schema kept)."""
    from HRpQCTRadiomicsEngine.table import ID_COLUMNS

    tables = []
    names: dict[str, None] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            for n in reader.fieldnames or []:
                if n not in ID_COLUMNS:
                    names.setdefault(n, None)
        tables.append(rows)
    if not tables:
        return None
    header = [*ID_COLUMNS, *names]
    return _csv_text(header, [[row.get(c, "") for c in header]
                              for rows in tables for row in rows])


def _write_cohort(out: Path, scans: list[dict[str, Any]], failures: list[dict[str, Any]]
                  ) -> dict[str, Path]:
    from HRpQCTPipeline.report import write_cohort_report
    from HRpQCTRadiomicsEngine.classification import CAVEAT

    files: dict[str, Path] = {}
    feature_paths = [Path(s["features"]) for s in scans if s.get("features")
                     and Path(s["features"]).is_file()]
    text = _cohort_features(feature_paths)
    path = out / COHORT_FILES["features"]
    if text is not None:
        write_text_atomic(path, text)
        files["features"] = path
    elif path.exists():
        path.unlink()

    keys = [d.key for d in REGIONS]
    header = ["scan_id", "subject", "status", "osteoporosis_probability",
              "probability_withheld", "warnings", "warning_messages",
              *[f"{k}_volume_mm3" for k in keys], "report", "action"]
    rows = []
    for s in scans:
        volumes = s.get("volumes_mm3") or {}
        rows.append([s["scan_id"], s["subject"], "ok",
                     "" if s.get("probability") is None else repr(float(s["probability"])),
                     s.get("probability_withheld") or "",  # why QC withheld it, if it did
                     ";".join(s.get("warning_codes") or []), " | ".join(s.get("warnings") or []),
                     *["" if volumes.get(k) is None else f"{volumes[k]:.3f}" for k in keys],
                     _relative(s.get("report"), out), s.get("action", "")])
    for f in failures:
        rows.append([f["scan_id"], "", "failed", "", "", "", f["message"],
                     *[""] * len(keys), "", ""])
    files["summary"] = out / COHORT_FILES["summary"]
    write_text_atomic(files["summary"], _csv_text(header, rows))
    files["failures"] = out / COHORT_FILES["failures"]
    write_text_atomic(files["failures"], _csv_text(
        FAILURE_COLUMNS, [[f[c] for c in FAILURE_COLUMNS] for f in failures]))
    files["report"] = out / COHORT_FILES["report"]
    write_cohort_report(files["report"], scans, failures, title=f"HR-pQCT cohort: {out.name}",
                        caveat=CAVEAT, files={n: p for n, p in files.items() if n != "report"})
    return files


def _relative(path: str | None, base: Path) -> str:
    if not path:
        return ""
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)
