"""The resume record ``run.json``: what a run wrote, from which inputs, so a rerun redoes little.

Per stage the record holds a key (SHA256 of the input file's content, the settings, the model
and classifier files, and the keys of the stages it depends on) and the SHA256 of every file the
stage wrote. A later run reuses a stage whose key is unchanged and whose files are unchanged;
anything else is recomputed, and only what depends on it. A file the record does not know (not
written by a previous run) is never replaced without ``overwrite``, and neither is a recorded
output that was changed since (e.g. edited by hand): the user's work is never lost silently.

**While a run is under way** (:class:`RunJournal`) the record is kept up to date on disk: just
before an output is renamed into place, its fingerprint is recorded under ``pending``, and
each stage's entry is recorded when the stage is complete. A run stopped half-way (Ctrl-C, a
full disk, a crash) therefore leaves a record that knows every file it wrote, and running the
same command again resumes: completed stages are reused, the files of the others are
replaced, and only a file that matches none of the recorded fingerprints (edited by hand, or
not written by hrpqct) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.artefacts import sha256_file
from HRpQCTCore.atomic import write_text_atomic
from HRpQCTCore.errors import HRpQCTError

__all__ = [
    "RECORD_NAME",
    "RECORD_FORMAT",
    "RECORD_VERSION",
    "STAGES",
    "STAGE_FILES",
    "STAGE_VERSIONS",
    "stage_key",
    "fingerprint",
    "model_sha256",
    "read_record",
    "write_record",
    "previous_record",
    "plan_stages",
    "stage_files",
    "dump_json",
    "RunJournal",
]

log = logging.getLogger("hrpqct")

RECORD_NAME = "run.json"
RECORD_FORMAT = "hrpqct-run"
RECORD_VERSION = 1
STAGES = ("segmentation", "radiomics", "classification", "report")
#: Bumped when a stage's output would change for the same inputs (invalidates old records).
#: segmentation 2: the learned myotendinous/adipose split (post-processing default).
STAGE_VERSIONS = {"segmentation": 2, "radiomics": 1, "classification": 1, "report": 1}
#: The outputs (names of :func:`.pipeline.output_paths`) each stage writes.
STAGE_FILES = {
    "segmentation": ("regions_seg_nrrd", "regions_nifti", "segmentation_qc"),
    "radiomics": ("features",),
    "classification": ("probability",),
    "report": ("qc", "report", "overlay_png", "profiles_png"),
}


# --- hashing -------------------------------------------------------------------------------

def stage_key(payload: Any) -> str:
    """SHA256 of ``payload`` in canonical JSON (sorted keys): equal inputs, equal key."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def fingerprint(path: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Size, mtime and SHA256 of a file or folder.

    The content hash of ``previous`` (an earlier fingerprint) is reused when size and mtime
    match, so an unchanged multi-GB scan is not hashed again on every rerun.
    """
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


def model_sha256(folder: Path) -> str:
    """One SHA256 over a model folder's weights, config and metadata files."""
    from HRpQCTSegmentationEngine.model import CONFIG_FILE, METADATA_FILE, WEIGHTS_FILE

    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE, METADATA_FILE):
        if (folder / name).is_file():
            h.update(name.encode())
            h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


# --- reading and writing the record --------------------------------------------------------

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


def previous_record(out_dir: Path, scan_id: str, paths: dict[str, Path],
                    overwrite: bool) -> dict[str, Any] | None:
    """The record of an earlier run of this scan in ``out_dir``, after checking the folder.

    Raises
    ------
    HRpQCTError
        If an output exists that no earlier run here wrote (unless ``overwrite``).
    """
    previous = read_record(out_dir)
    if previous is not None and previous.get("scan_id") != scan_id:
        previous = None  # another scan's record: none of its files are ours
    _check_not_foreign(paths, previous, overwrite)
    return previous


def write_record(out_dir: Path, record: dict[str, Any]) -> None:
    """Write ``run.json`` (atomically: a crash leaves the previous record, not half a one)."""
    write_text_atomic(out_dir / RECORD_NAME, dump_json(record))


def _known_entries(record: dict | None, name: str) -> list[dict]:
    """Every fingerprint the record holds for output ``name``: its stage's, and the one of
    a later, interrupted run that wrote it (``pending``)."""
    if not record:
        return []
    entries = [entry for stage in (record.get("stages") or {}).values()
               if (entry := (stage.get("files") or {}).get(name))]
    pending = (record.get("pending") or {}).get(name)
    return entries + ([pending] if pending else [])


def _file_unchanged(path: Path, entry: dict | None) -> bool:
    if entry is None or not path.is_file():
        return False
    return fingerprint(path, entry)["sha256"] == entry.get("sha256")


def _written_by_us(path: Path, record: dict | None, name: str) -> bool:
    """Whether ``path`` is, unchanged, a file a run here wrote under ``name``."""
    return any(_file_unchanged(path, entry) for entry in _known_entries(record, name))


class RunJournal:
    """``run.json`` kept up to date while a run is under way, so an interrupted run resumes.

    Parameters
    ----------
    out_dir:
        The run's folder.
    header:
        The record's identity (format, scan id, input and settings fingerprints).
    previous:
        The record of an earlier run here (its stages and pending files stay known until
        replaced).
    outputs:
        Output name -> path: the files whose writing is recorded.

    Notes
    -----
    Use :meth:`note_replace` as the :func:`HRpQCTCore.atomic.replace_hook` of the run: it
    records a file's fingerprint after it is complete and before it appears under its name.
    """

    def __init__(self, out_dir: Path, header: dict[str, Any], previous: dict | None,
                 outputs: dict[str, Path]) -> None:
        previous = previous or {}
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {
            **header, "status": "running",
            "stages": dict(previous.get("stages") or {}),
            "pending": dict(previous.get("pending") or {})}
        self._names = {os.path.abspath(p): n for n, p in outputs.items()}

    def pending(self, name: str) -> dict | None:
        """The fingerprint recorded for ``name`` before its rename (None: not written)."""
        return self.record["pending"].get(name)

    def note_replace(self, final: Path, tmp: Path) -> None:
        """Record ``tmp``'s fingerprint for the output ``final`` (other files: ignored)."""
        name = self._names.get(os.path.abspath(final))
        if name is not None:
            # The rename keeps size and mtime, so this fingerprint is the final file's.
            self.record["pending"][name] = {"path": Path(final).name, **fingerprint(tmp)}
            self.save()

    def set_stage(self, stage: str, entry: dict[str, Any], *, save: bool = True) -> None:
        """Record a stage's entry (key, status, files); its files are no longer pending."""
        self.record["stages"][stage] = entry
        for name in entry.get("files") or {}:
            self.record["pending"].pop(name, None)
        if save:
            self.save()

    def save(self) -> None:
        """Write the record as it stands (atomically)."""
        write_record(self.out_dir, self.record)


# --- deciding what to run ------------------------------------------------------------------

def _check_not_foreign(paths: dict[str, Path], record: dict | None, overwrite: bool) -> None:
    if overwrite:
        return
    foreign = [str(p) for name, p in paths.items()
               if p.exists() and not _known_entries(record, name)]
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
              and not _written_by_us(paths[n], record, n)]
    if edited:
        raise HRpQCTError(
            f"{', '.join(edited)} changed after hrpqct wrote it (edited by hand?) and would be "
            "recomputed. Move it away to keep it, or pass --overwrite to replace it.")


def _up_to_date(stage: str, key: str | None, previous: dict | None, out_dir: Path,
                overwrite: bool) -> bool:
    if overwrite or previous is None or key is None:
        return False
    entry = (previous.get("stages") or {}).get(stage) or {}
    if entry.get("key") != key:
        return False
    return all(_file_unchanged(out_dir / f["path"], f)
               for f in (entry.get("files") or {}).values())


def plan_stages(keys: dict[str, str | None], previous: dict | None, out_dir: Path,
                paths: dict[str, Path], *, overwrite: bool,
                provided_regions: bool) -> dict[str, str]:
    """Stage -> ``"ran"``, ``"reused"``, ``"skipped"`` (no key) or ``"provided"``.

    A stage without a key cannot run (missing artefact, option); one whose key and files
    match the record is reused. ``provided_regions``: the job brings its own region map.

    Raises
    ------
    HRpQCTError
        If a stage to run would replace an output edited since it was written.
    """
    plan = {stage: ("skipped" if keys[stage] is None else
                    "reused" if _up_to_date(stage, keys[stage], previous, out_dir, overwrite)
                    else "ran") for stage in STAGES}
    if provided_regions:
        plan["segmentation"] = "provided"
    for stage, what in plan.items():
        if what == "ran":
            _check_replaceable(STAGE_FILES[stage], paths, previous, overwrite)
    return plan


def stage_files(plan: dict[str, str], previous: dict | None, paths: dict[str, Path],
                overwrite: bool) -> dict[str, dict[str, dict]]:
    """Stage -> the files the new record starts with; stale outputs are removed.

    Reused stages keep their recorded files. Outputs of stages that no longer run
    (skipped, or segmentation now provided) are deleted when they are our unchanged files,
    and kept (and still recorded) when edited by hand.
    """
    files: dict[str, dict[str, dict]] = {
        s: dict(((previous or {}).get("stages") or {}).get(s, {}).get("files") or {})
        if plan[s] == "reused" else {} for s in STAGES}
    for stage in STAGES:
        if plan[stage] not in ("skipped", "provided"):
            continue
        for name in STAGE_FILES[stage]:
            entries = _known_entries(previous, name)
            if not entries or not paths[name].exists():
                continue
            if _written_by_us(paths[name], previous, name) or overwrite:
                paths[name].unlink()  # our own output of an earlier run, now out of date
                log.info("removed %s: its step is not run any more", paths[name].name)
            else:
                files[stage][name] = entries[0]  # edited by hand: kept, and known
    return files


# --- JSON ----------------------------------------------------------------------------------

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


def dump_json(value: Any) -> str:
    """``value`` as the indented JSON text of every file the pipeline writes."""
    return json.dumps(_clean(value), indent=1, default=str) + "\n"
