"""A synthetic cohort: osteoporotic and control subjects with scans and a manifest.

Each subject has an age, a sex and a latent bone-health score ``h``; osteoporosis status
shifts ``h`` by ``effect_size`` (in SD units) and ``h`` drives bone *and* soft-tissue
parameters through :data:`~.params.BONE_HEALTH_LOADINGS`, each with its own independent
variation, so groups differ on average but overlap on every single parameter. Balanced by
default (the paper's 61 + 61).

Three classes (``n_classes=3``, ``hrpqct cohort --classes 3``): subjects come in equal thirds
of normal, osteopenia and osteoporosis on a T-score-like scale with the usual cut-offs
(T >= -1 normal, -2.5 < T < -1 osteopenia, T <= -2.5 osteoporosis). Each group's T is drawn
uniformly over a 1.5-wide band (normal [-1, 0.5], osteopenia [-2.5, -1], osteoporosis
[-4, -2.5]), so the cohort's T is uniform on [-4, 0.5]. Bone health is T rescaled to the
variance the binary cohort has (``1 + (effect_size / 2)^2``, which the loadings assume) plus
independent noise of SD :data:`T_SCORE_NOISE_SD` (a T-score measured elsewhere, e.g. by
DXA, is an imperfect proxy of the tibia's state), and drives every parameter exactly as in the
binary cohort. The manifest then gains ``diagnosis`` and ``t_score`` columns; ``osteoporosis``
stays 0/1 (1 = the osteoporosis group) so binary training works unchanged. The default
(two groups) draws exactly the same subjects and writes exactly the same manifest as before.

Soft tissue on its own (``soft_tissue_effect``, ``hrpqct cohort --soft-tissue-effect X``, two
groups only): the soft-tissue parameters (:data:`~.params.SOFT_TISSUE_PARAMETERS`: marbling,
muscle/tendon/fat HU, muscle and tendon size) follow a latent soft-tissue score
``s ~ N(+-X/2, 1)`` (controls +) of their own, independent of bone health, instead of ``h``:
``X = 0`` gives both groups the same soft-tissue distribution, ``X = effect_size`` the
soft-tissue group difference of the default cohort. ``s`` comes from a separate seed stream,
so the subjects are otherwise exactly those of the cohort without it (same ages, sexes, bone,
noise, pose). The manifest then gains ``soft_tissue_effect`` and ``soft_tissue_health``
columns after ``bone_health``; without it, nothing changes.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.atomic import atomic_path
from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTPhantom.params import (
    BONE_HEALTH_LOADINGS,
    PhantomParams,
    check_soft_tissue_effect,
    params_from_bone_health,
)

__all__ = ["Subject", "sample_cohort", "generate_cohort", "MANIFEST_NAME", "MANIFEST_COLUMNS",
           "DIAGNOSIS_GROUPS", "diagnosis_from_t_score"]

MANIFEST_NAME = "manifest.csv"
#: Fixed leading columns; the bone-health-driven parameters follow, then image settings.
MANIFEST_COLUMNS = ("subject_id", "age", "sex", "osteoporosis", "bone_health", "scan_path",
                    "classes_path", "regions_path", "truth_path")
_EXTRA_COLUMNS = (
    *BONE_HEALTH_LOADINGS, "tibia_area_mm2", "fibula_gap_mm", "subcutaneous_fat_mm", "side",
    "motion_grade", "noise_sd_hu", "n_slices", "field_px", "voxel_mm")
#: Added after ``osteoporosis`` in three-class manifests only (binary ones are unchanged).
_DIAGNOSIS_COLUMNS = ("diagnosis", "t_score")
#: Added after ``bone_health`` when the cohort has its own soft-tissue effect.
_SOFT_TISSUE_COLUMNS = ("soft_tissue_effect", "soft_tissue_health")

#: Three-class groups: name -> (T band low, high, mean age), in order of severity.
DIAGNOSIS_GROUPS: dict[str, tuple[float, float, float]] = {
    "normal": (-1.0, 0.5, 66.0),
    "osteopenia": (-2.5, -1.0, 68.0),
    "osteoporosis": (-4.0, -2.5, 70.0),
}
#: SD of bone health around the rescaled T-score (see the module docstring).
T_SCORE_NOISE_SD = 0.5
_T_LOW, _T_HIGH = -4.0, 0.5  # the cohort's T is uniform on this range


def diagnosis_from_t_score(t_score: float) -> str:
    """WHO-style category: T >= -1 normal, T <= -2.5 osteoporosis, osteopenia between."""
    if t_score >= -1.0:
        return "normal"
    return "osteoporosis" if t_score <= -2.5 else "osteopenia"


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
    diagnosis: str | None = None  # three-class cohorts only
    t_score: float | None = None
    soft_tissue_effect: float | None = None  # cohorts with their own soft-tissue effect only
    soft_tissue_health: float | None = None


def sample_cohort(n_subjects: int, seed: int, *, effect_size: float = 2.0,
                  fraction_osteoporotic: float = 0.5, loadings: dict | None = None,
                  n_classes: int = 2, soft_tissue_effect: float | None = None,
                  **image_overrides: Any) -> list[Subject]:
    """Draw subjects (no images): balanced groups, ages 50-85, both sexes.

    ``image_overrides`` fix image-geometry parameters (``n_slices``, ``field_px``,
    ``voxel_mm``...) for every subject. ``n_classes=3``: normal / osteopenia / osteoporosis
    thirds (module docstring; ``fraction_osteoporotic`` is then not used).
    ``soft_tissue_effect``: soft tissue on its own latent score (module docstring).
    """
    if n_subjects < 1:
        raise ValueError("n_subjects must be >= 1")
    if soft_tissue_effect is not None:
        check_soft_tissue_effect(soft_tissue_effect)
        if n_classes != 2:
            raise ValueError("soft_tissue_effect applies to two-group cohorts only")
    if n_classes == 3:
        return _sample_three_classes(n_subjects, seed, effect_size, loadings, image_overrides)
    if n_classes != 2:
        raise ValueError(f"n_classes must be 2 or 3, not {n_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407]))
    n_op = round(n_subjects * fraction_osteoporotic)
    status = np.array([1] * n_op + [0] * (n_subjects - n_op))
    rng.shuffle(status)
    child_seeds = rng.integers(0, 2**31 - 1, n_subjects)
    # Its own stream, so the other draws (and subjects) stay those of the default cohort.
    soft_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407, 5]))
    subjects = []
    width = max(3, len(str(n_subjects)))
    for i, op in enumerate(status):
        sex = "F" if rng.random() < 0.65 else "M"  # osteoporosis cohorts are mostly women
        age = float(np.clip(rng.normal(70.0 if op else 66.0, 7.0), 50.0, 85.0))
        # Bone health: group shift, a little loss with age and in women, own variation.
        h = float(rng.normal((-1 if op else 1) * effect_size / 2.0, 1.0))
        soft = _soft_tissue_draw(soft_rng, bool(op), soft_tissue_effect)
        params = params_from_bone_health(rng, h, age_years=age, sex=sex,
                                         effect_size=effect_size, loadings=loadings,
                                         **soft, **image_overrides)
        subject = Subject(f"sub-{i + 1:0{width}d}", round(age, 1), sex, int(op),
                          round(h, 4), params, int(child_seeds[i]))
        if soft:
            subject.soft_tissue_effect = float(soft_tissue_effect)
            subject.soft_tissue_health = round(soft["soft_tissue_health"], 4)
        subjects.append(subject)
    return subjects


def _soft_tissue_draw(rng: np.random.Generator, osteoporotic: bool,
                      soft_tissue_effect: float | None) -> dict[str, float]:
    """Keyword arguments of :func:`params_from_bone_health` for the soft-tissue score."""
    if soft_tissue_effect is None:
        return {}
    sign = -1.0 if osteoporotic else 1.0
    return {"soft_tissue_health": float(rng.normal(sign * soft_tissue_effect / 2.0, 1.0)),
            "soft_tissue_effect": float(soft_tissue_effect)}


def _sample_three_classes(n_subjects: int, seed: int, effect_size: float,
                          loadings: dict | None, image_overrides: dict) -> list[Subject]:
    # Its own seed stream: the binary cohort's draws stay exactly as they were.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407, 3]))
    names = list(DIAGNOSIS_GROUPS)
    groups = np.array([names[i % 3] for i in range(n_subjects)], dtype=object)
    rng.shuffle(groups)
    child_seeds = rng.integers(0, 2**31 - 1, n_subjects)
    # Rescale T (uniform: variance width^2 / 12) to the bone-health variance of a binary
    # cohort, minus the noise's share, so the loadings keep their meaning.
    t_mid, t_sd = (_T_LOW + _T_HIGH) / 2.0, (_T_HIGH - _T_LOW) / math.sqrt(12.0)
    target_var = 1.0 + (effect_size / 2.0) ** 2
    scale = math.sqrt(max(target_var - T_SCORE_NOISE_SD**2, 0.0)) / t_sd
    width = max(3, len(str(n_subjects)))
    subjects = []
    for i, group in enumerate(groups):
        low, high, mean_age = DIAGNOSIS_GROUPS[group]
        sex = "F" if rng.random() < 0.65 else "M"
        age = float(np.clip(rng.normal(mean_age, 7.0), 50.0, 85.0))
        t_score = float(rng.uniform(low, high))
        h = float(scale * (t_score - t_mid) + rng.normal(0.0, T_SCORE_NOISE_SD))
        params = params_from_bone_health(rng, h, age_years=age, sex=sex,
                                         effect_size=effect_size, loadings=loadings,
                                         **image_overrides)
        diagnosis = diagnosis_from_t_score(round(t_score, 3))
        subjects.append(Subject(f"sub-{i + 1:0{width}d}", round(age, 1), sex,
                                int(diagnosis == "osteoporosis"), round(h, 4), params,
                                int(child_seeds[i]), diagnosis, round(t_score, 3)))
    return subjects


def _render_subject(subject: Subject, out_dir: Path, formats: tuple[str, ...]) -> dict:
    from HRpQCTPhantom.generator import generate_phantom
    from HRpQCTPhantom.writer import write_phantom

    phantom = generate_phantom(subject.params, subject.seed, n_threads=1)
    phantom.truth["subject"] = {"subject_id": subject.subject_id, "age": subject.age,
                                "sex": subject.sex, "osteoporosis": subject.osteoporosis,
                                "bone_health": subject.bone_health}
    if subject.diagnosis is not None:
        phantom.truth["subject"].update(diagnosis=subject.diagnosis, t_score=subject.t_score)
    if subject.soft_tissue_effect is not None:
        phantom.truth["subject"].update(soft_tissue_effect=subject.soft_tissue_effect,
                                        soft_tissue_health=subject.soft_tissue_health)
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
           "osteoporosis": subject.osteoporosis,
           **({} if subject.diagnosis is None
              else {"diagnosis": subject.diagnosis, "t_score": subject.t_score}),
           "bone_health": subject.bone_health,
           **({} if subject.soft_tissue_effect is None
              else {"soft_tissue_effect": subject.soft_tissue_effect,
                    "soft_tissue_health": subject.soft_tissue_health}),
           "scan_path": paths.get("scan", paths.get("scan_aim", "")),
           "classes_path": paths.get("classes", ""), "regions_path": paths.get("regions", ""),
           "truth_path": paths.get("truth", "")}
    for k in _EXTRA_COLUMNS:
        v = d[k]
        row[k] = round(v, 5) if isinstance(v, float) else v
    return row


def generate_cohort(n_subjects: int, out_dir: str | Path, seed: int, *,
                    effect_size: float = 2.0, fraction_osteoporotic: float = 0.5,
                    loadings: dict | None = None, n_classes: int = 2,
                    soft_tissue_effect: float | None = None, n_jobs: int = 1,
                    formats: tuple[str, ...] = ("nifti",),
                    progress: ProgressCallback | None = None,
                    cancel: CancelToken | None = None, overwrite: bool = True,
                    **image_overrides: Any) -> Path:
    """Generate and write a cohort; return the path of its ``manifest.csv``.

    Scans go to ``out_dir/<subject_id>/``; manifest paths are relative to ``out_dir``.
    ``n_jobs > 1`` renders subjects in parallel processes (joblib); the output is identical.
    ``n_classes=3`` draws normal / osteopenia / osteoporosis thirds (module docstring).
    ``soft_tissue_effect`` gives soft tissue its own group effect (module docstring).
    ``overwrite=False`` refuses, before rendering anything, when the manifest or a subject's
    file exists (the command line passes it unless ``--overwrite`` is given).
    """
    from HRpQCTCore.outputs import ensure_folder

    out = Path(out_dir)
    subjects = sample_cohort(n_subjects, seed, effect_size=effect_size,
                             fraction_osteoporotic=fraction_osteoporotic, loadings=loadings,
                             n_classes=n_classes, soft_tissue_effect=soft_tissue_effect,
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
        writer = csv.DictWriter(fh, fieldnames=_manifest_columns(
            n_classes, soft_tissue=soft_tissue_effect is not None))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _manifest_columns(n_classes: int, soft_tissue: bool = False) -> list[str]:
    columns = list(MANIFEST_COLUMNS)
    if soft_tissue:
        at = columns.index("bone_health") + 1
        columns[at:at] = _SOFT_TISSUE_COLUMNS
    if n_classes == 3:
        at = columns.index("osteoporosis") + 1
        columns[at:at] = _DIAGNOSIS_COLUMNS
    return columns + list(_EXTRA_COLUMNS)
