"""A synthetic cohort: osteoporotic and control subjects with scans and a manifest.

Each subject has an age, a sex and a latent bone-health score ``h``; osteoporosis status
shifts ``h`` by ``effect_size`` (in SD units) and ``h`` drives bone *and* soft-tissue
parameters through :data:`~.params.BONE_HEALTH_LOADINGS`, each with its own independent
variation, so groups differ on average but overlap on every single parameter. Balanced by
default (the paper's 61 + 61).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.atomic import atomic_path
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTPhantom.params import BONE_HEALTH_LOADINGS, PhantomParams, params_from_bone_health

__all__ = ["Subject", "sample_cohort", "generate_cohort", "MANIFEST_NAME", "MANIFEST_COLUMNS"]

MANIFEST_NAME = "manifest.csv"
#: Fixed leading columns; the bone-health-driven parameters follow, then image settings.
MANIFEST_COLUMNS = ("subject_id", "age", "sex", "osteoporosis", "bone_health", "scan_path",
                    "classes_path", "regions_path", "truth_path")
_EXTRA_COLUMNS = (
    *BONE_HEALTH_LOADINGS, "tibia_area_mm2", "fibula_gap_mm", "subcutaneous_fat_mm", "side",
    "motion_grade", "noise_sd_hu", "n_slices", "field_px", "voxel_mm")


@dataclass
class Subject:
    """One cohort member: identity, group, latent bone health and scan parameters."""

    subject_id: str
    age: float
    sex: str
    osteoporosis: int
    bone_health: float
    params: PhantomParams
    seed: int


def sample_cohort(n_subjects: int, seed: int, *, effect_size: float = 2.0,
                  fraction_osteoporotic: float = 0.5, loadings: dict | None = None,
                  **image_overrides: Any) -> list[Subject]:
    """Draw subjects (no images): balanced groups, ages 50-85, both sexes.

    ``image_overrides`` fix image-geometry parameters (``n_slices``, ``field_px``,
    ``voxel_mm``...) for every subject.
    """
    if n_subjects < 1:
        raise ValueError("n_subjects must be >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407]))
    n_op = round(n_subjects * fraction_osteoporotic)
    status = np.array([1] * n_op + [0] * (n_subjects - n_op))
    rng.shuffle(status)
    child_seeds = rng.integers(0, 2**31 - 1, n_subjects)
    subjects = []
    width = max(3, len(str(n_subjects)))
    for i, op in enumerate(status):
        sex = "F" if rng.random() < 0.65 else "M"  # osteoporosis cohorts are mostly women
        age = float(np.clip(rng.normal(70.0 if op else 66.0, 7.0), 50.0, 85.0))
        # Bone health: group shift, a little loss with age and in women, own variation.
        h = float(rng.normal((-1 if op else 1) * effect_size / 2.0, 1.0))
        params = params_from_bone_health(rng, h, age_years=age, sex=sex,
                                         effect_size=effect_size, loadings=loadings,
                                         **image_overrides)
        subjects.append(Subject(f"sub-{i + 1:0{width}d}", round(age, 1), sex, int(op),
                                round(h, 4), params, int(child_seeds[i])))
    return subjects


def _render_subject(subject: Subject, out_dir: Path, formats: tuple[str, ...]) -> dict:
    from HRpQCTPhantom.generator import generate_phantom
    from HRpQCTPhantom.writer import write_phantom

    phantom = generate_phantom(subject.params, subject.seed, n_threads=1)
    phantom.truth["subject"] = {"subject_id": subject.subject_id, "age": subject.age,
                                "sex": subject.sex, "osteoporosis": subject.osteoporosis,
                                "bone_health": subject.bone_health}
    paths = write_phantom(phantom, out_dir / subject.subject_id, subject.subject_id, formats)
    return {k: str(p.relative_to(out_dir)) for k, p in paths.items()}


def _refuse_existing_files(subjects: list[Subject], out: Path,
                           formats: tuple[str, ...]) -> None:
    from HRpQCTPhantom.writer import phantom_paths, refuse_existing

    planned = [out / MANIFEST_NAME]
    for s in subjects:
        planned += phantom_paths(out / s.subject_id, s.subject_id, formats).values()
    refuse_existing(planned)


def _row(subject: Subject, paths: dict) -> dict:
    d = subject.params.to_dict()
    row = {"subject_id": subject.subject_id, "age": subject.age, "sex": subject.sex,
           "osteoporosis": subject.osteoporosis, "bone_health": subject.bone_health,
           "scan_path": paths.get("scan", paths.get("scan_aim", "")),
           "classes_path": paths.get("classes", ""), "regions_path": paths.get("regions", ""),
           "truth_path": paths.get("truth", "")}
    for k in _EXTRA_COLUMNS:
        v = d[k]
        row[k] = round(v, 5) if isinstance(v, float) else v
    return row


def generate_cohort(n_subjects: int, out_dir: str | Path, seed: int, *,
                    effect_size: float = 2.0, fraction_osteoporotic: float = 0.5,
                    loadings: dict | None = None, n_jobs: int = 1,
                    formats: tuple[str, ...] = ("nifti",),
                    progress: ProgressCallback | None = None,
                    cancel: CancelToken | None = None, overwrite: bool = True,
                    **image_overrides: Any) -> Path:
    """Generate and write a cohort; return the path of its ``manifest.csv``.

    Scans go to ``out_dir/<subject_id>/``; manifest paths are relative to ``out_dir``.
    ``n_jobs > 1`` renders subjects in parallel processes (joblib); the output is identical.
    ``overwrite=False`` refuses, before rendering anything, when the manifest or a subject's
    file exists (the command line passes it unless ``--overwrite`` is given).
    """
    from HRpQCTCore.outputs import ensure_folder

    out = Path(out_dir)
    subjects = sample_cohort(n_subjects, seed, effect_size=effect_size,
                             fraction_osteoporotic=fraction_osteoporotic, loadings=loadings,
                             **image_overrides)
    if not overwrite:
        _refuse_existing_files(subjects, out, formats)
    ensure_folder(out)
    report(progress, 0, len(subjects), "cohort")
    rows: list[dict] = []
    if n_jobs > 1:
        from joblib import Parallel, delayed

        done = 0
        batch = max(1, n_jobs)
        for start in range(0, len(subjects), batch):
            check(cancel)
            chunk = subjects[start:start + batch]
            results = Parallel(n_jobs=n_jobs)(
                delayed(_render_subject)(s, out, formats) for s in chunk)
            rows += [_row(s, r) for s, r in zip(chunk, results, strict=True)]
            done += len(chunk)
            report(progress, done, len(subjects), "cohort")
    else:
        for i, s in enumerate(subjects):
            check(cancel)
            rows.append(_row(s, _render_subject(s, out, formats)))
            report(progress, i + 1, len(subjects), "cohort")
    manifest = out / MANIFEST_NAME
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(MANIFEST_COLUMNS) + list(_EXTRA_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return manifest
