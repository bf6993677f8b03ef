"""Every parameter of a synthetic HR-pQCT scan, in physical units, and how subjects vary.

Numbers and ranges come from the project's facts sheet (``hrpqct-facts.md``): XtremeCT II
geometry, distal-tibia anatomy (normal vs. osteoporotic), tissue HU and noise. Synthetic data
are synthetic: the parameters are plausible, not fitted to any population.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from HRpQCTCore.scan import XTREMECT2_VOXEL_MM

__all__ = [
    "PhantomParams",
    "BONE_HEALTH_LOADINGS",
    "SOFT_TISSUE_PARAMETERS",
    "MOTION_GRADES",
    "FIBULA_GAP_RANGE_MM",
    "check_fibula_gap_range",
    "check_soft_tissue_effect",
    "params_from_bone_health",
]

#: Motion grade -> (rotation in degrees of the corrupted projection block, fraction of
#: projections corrupted). Grade 1 is a still subject; the published simulation replaces
#: ~11 % of projections with those of an object rotated by 1.5-18 degrees.
MOTION_GRADES: dict[int, tuple[float, float]] = {
    1: (0.0, 0.0),
    2: (1.5, 0.11),
    3: (4.0, 0.11),
    4: (8.0, 0.13),
    5: (14.0, 0.16),
}


#: The default range of the narrowest tibia-fibula distance drawn per subject (mm): the range
#: the bundled model's training cohort and the held-out test sets were drawn from. Real distal
#: tibiae come closer (the fibula sits in the fibular notch); cohorts that must cover that pass
#: ``fibula_gap_range_mm`` (``hrpqct cohort --fibula-gap-mm``). The generator's floor is 0.5.
FIBULA_GAP_RANGE_MM: tuple[float, float] = (1.2, 4.5)
MIN_FIBULA_GAP_MM = 0.5


@dataclass(frozen=True)
class PhantomParams:
    """Parameters of one synthetic distal tibia + fibula scan.

    Geometry of the image
    ---------------------
    n_slices, field_px, voxel_mm:
        Stack of ``n_slices`` square slices of ``field_px`` pixels, isotropic ``voxel_mm``.
        The scanner's 0.0607 mm with a 1600 field (97 mm, the paper's crop) is the default.
        Coarser voxels (e.g. 0.1214 mm with 800 px, or 0.2428 mm with 400 px) fit the whole
        leg in a small array for tests and fast training data; what is lost: trabeculae and
        pores are drawn on the coarse grid (a 0.26 mm strut is 1-2 voxels at 0.12 mm, so
        trabecular morphometrics there are only indicative) and the image blur and noise
        texture are those of the coarse grid, not of a real 60.7 um scan.
    field_center:
        ``"leg"`` centres the field on the leg (whole-leg scans); ``"tibia"`` on the tibia
        (small full-resolution fields for microarchitecture tests).
    side, rotation_deg, translation_mm, tilt_deg:
        Pose: left or right leg (mirror image), in-plane rotation, shift of the field centre
        (x, y), and tilt of the leg axis against the scanner axis (structures drift in-plane
        along the stack).

    Bone
    ----
    tibia_area_mm2, tibia_ct_th_mm, tibia_ct_po, tibia_bv_tv, tibia_tb_th_mm:
        Total cross-sectional area, cortical thickness, cortical porosity (pore volume
        fraction of the cortical compartment), trabecular bone volume fraction and trabecular
        thickness. Tb.N and Tb.Sp follow from BV/TV and Tb.Th (and are measured in the truth).
    tibia_rod_fraction:
        Share of plate area perforated into rods (osteoporosis turns plates into rods).
    fibula_*:
        The same for the fibula; ``fibula_gap_mm`` is the narrowest tibia-fibula distance.
    cortical_tissue_hu, trabecular_tissue_hu, marrow_hu, pore_hu:
        Noise-free HU of mineralised cortical tissue, of a trabecula as one voxel sees it at
        this resolution, of (fatty) marrow and of pore content.

    Soft tissue
    -----------
    subcutaneous_fat_mm:
        Fat between skin and the deep structures.
    leg_scale, tendon_scale, muscle_scale:
        Relative size of the soft-tissue layout, of the tendons and of the muscle bellies.
    skin_width_mm:
        Width of the skin band of the 7-region truth (the paper's 2 mm, from the surface).
    dermis_mm:
        Thickness of the dermis as drawn in the image (its intensity band).
    intramuscular_fat_fraction:
        Share of muscle-belly area replaced by fat streaks (marbling).
    fat_hu, muscle_hu, tendon_hu, skin_hu:
        Noise-free HU of the soft tissues (clinical CT values).
    cast:
        Draw the carbon-fibre holder shell around the leg (background in the labels).

    Image formation
    ---------------
    blur_sigma_mm:
        Gaussian point-spread function (partial-volume blur).
    noise_sd_hu, noise_corr_mm:
        SD of the additive noise and its Gaussian correlation length.
    motion_grade:
        1 (none) to 5 (severe): ghosted cortex and streaks from a block of projections of a
        moved leg (see :data:`MOTION_GRADES`).
    calibration_scale, calibration_offset_hu:
        Another site's or scanner's HU calibration, applied to the final image (noise and
        artefacts included): ``HU' = -1000 + calibration_scale * (HU + 1000) +
        calibration_offset_hu``. The scale acts on attenuation (air stays at -1000 HU before
        the offset, as a wrong water reference or beam-hardening correction would leave it);
        the offset shifts every voxel. 1 and 0 (the defaults) leave the image unchanged; the
        truth's noise-free HU and densities stay those of the true tissue.
    """

    # image geometry
    n_slices: int = 168
    field_px: int = 1600
    voxel_mm: float = XTREMECT2_VOXEL_MM
    field_center: str = "leg"
    # pose
    side: str = "right"
    rotation_deg: float = 0.0
    translation_mm: tuple[float, float] = (0.0, 0.0)
    tilt_deg: float = 0.0
    # tibia
    tibia_area_mm2: float = 750.0
    tibia_ct_th_mm: float = 1.5
    tibia_ct_po: float = 0.03
    tibia_bv_tv: float = 0.22
    tibia_tb_th_mm: float = 0.26
    tibia_rod_fraction: float = 0.25
    # fibula
    fibula_area_mm2: float = 120.0
    fibula_ct_th_mm: float = 1.3
    fibula_ct_po: float = 0.03
    fibula_bv_tv: float = 0.20
    fibula_tb_th_mm: float = 0.24
    fibula_gap_mm: float = 2.5
    # bone intensities
    cortical_tissue_hu: float = 2450.0
    trabecular_tissue_hu: float = 1900.0
    marrow_hu: float = -30.0
    pore_hu: float = 30.0
    # soft tissue
    subcutaneous_fat_mm: float = 4.5
    leg_scale: float = 1.0
    tendon_scale: float = 1.0
    muscle_scale: float = 1.0
    skin_width_mm: float = 2.0
    dermis_mm: float = 1.8
    intramuscular_fat_fraction: float = 0.12
    fat_hu: float = -110.0
    muscle_hu: float = 50.0
    tendon_hu: float = 115.0
    skin_hu: float = 55.0
    cast: bool = False
    # image formation
    blur_sigma_mm: float = 0.07
    noise_sd_hu: float = 150.0
    noise_corr_mm: float = 0.045
    motion_grade: int = 1
    calibration_scale: float = 1.0
    calibration_offset_hu: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.n_slices < 1 or self.field_px < 16:
            problems.append("n_slices must be >= 1 and field_px >= 16")
        if not 0.01 <= self.voxel_mm <= 1.0:
            problems.append(f"voxel_mm {self.voxel_mm} outside 0.01..1.0 mm")
        if self.field_center not in ("leg", "tibia"):
            problems.append("field_center must be 'leg' or 'tibia'")
        if self.side not in ("left", "right"):
            problems.append("side must be 'left' or 'right'")
        for name in ("tibia_ct_po", "fibula_ct_po", "intramuscular_fat_fraction"):
            if not 0.0 <= getattr(self, name) < 0.6:
                problems.append(f"{name} must lie in [0, 0.6)")
        for name in ("tibia_bv_tv", "fibula_bv_tv"):
            if not 0.02 <= getattr(self, name) <= 0.6:
                problems.append(f"{name} must lie in [0.02, 0.6]")
        for name in ("tibia_rod_fraction",):
            if not 0.0 <= getattr(self, name) <= 0.9:
                problems.append(f"{name} must lie in [0, 0.9]")
        if not 0.3 <= self.tibia_ct_th_mm <= 4.0 or not 0.3 <= self.fibula_ct_th_mm <= 3.0:
            problems.append("cortical thickness must lie in 0.3..4 mm (tibia), 0.3..3 (fibula)")
        if self.fibula_gap_mm < MIN_FIBULA_GAP_MM:
            problems.append(f"fibula_gap_mm must be >= {MIN_FIBULA_GAP_MM}")
        if self.motion_grade not in MOTION_GRADES:
            problems.append("motion_grade must be 1..5")
        if not 0.5 <= self.calibration_scale <= 2.0:
            problems.append("calibration_scale must lie in 0.5..2")
        if abs(self.calibration_offset_hu) > 500.0:
            problems.append("calibration_offset_hu must lie in -500..500 HU")
        if self.noise_sd_hu < 0 or self.blur_sigma_mm < 0:
            problems.append("noise_sd_hu and blur_sigma_mm must be >= 0")
        if self.skin_width_mm <= 0 or self.dermis_mm <= 0:
            problems.append("skin_width_mm and dermis_mm must be > 0")
        if problems:
            raise ValueError("Invalid phantom parameters: " + "; ".join(problems))

    # --- conveniences -------------------------------------------------------------------
    @property
    def field_mm(self) -> float:
        """Side of the field of view in mm."""
        return self.field_px * self.voxel_mm

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every parameter."""
        d = asdict(self)
        d["translation_mm"] = list(self.translation_mm)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhantomParams:
        """Inverse of :meth:`to_dict` (unknown keys raise, so typos do not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown phantom parameter(s): {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(known))}")
        d = dict(data)
        if "translation_mm" in d:
            d["translation_mm"] = tuple(float(v) for v in d["translation_mm"])
        return cls(**d)

    def replace(self, **changes: Any) -> PhantomParams:
        """A copy with some parameters changed."""
        return replace(self, **changes)

    def small(self, field_px: int = 400, n_slices: int = 16) -> PhantomParams:
        """A fast variant keeping the whole leg in view: coarser voxels, smaller field.

        The voxel grows so the field still spans the default 97 mm (``field_px=400`` gives
        0.2428 mm voxels); see the class docstring for the realism this loses.
        """
        voxel = self.voxel_mm * self.field_px / field_px
        return replace(self, field_px=field_px, voxel_mm=voxel, n_slices=n_slices)

    @classmethod
    def sample(cls, rng: np.random.Generator, osteoporotic: bool, effect_size: float = 2.0,
               *, age_years: float | None = None, sex: str | None = None,
               soft_tissue_effect: float | None = None,
               **overrides: Any) -> PhantomParams:
        """Draw one subject's parameters for a group.

        A latent bone-health score ``h ~ N(+-effect_size/2, 1)`` (controls +, osteoporotic -)
        drives the bone and soft-tissue parameters through :data:`BONE_HEALTH_LOADINGS`; each
        parameter also has its own independent variation, so groups overlap on every single
        parameter. ``overrides`` fix image-geometry fields (``n_slices``, ``field_px``...).

        ``soft_tissue_effect`` (SD units, >= 0): the :data:`SOFT_TISSUE_PARAMETERS` follow
        their own latent score ``s ~ N(+-soft_tissue_effect/2, 1)``, drawn after ``h`` and
        independent of it, instead of ``h``: 0 gives both groups the same soft tissue, and
        ``soft_tissue_effect == effect_size`` the soft-tissue group difference of the default,
        without its tie to bone. None (the default) keeps soft tissue on ``h`` as before.
        """
        sign = -1.0 if osteoporotic else 1.0
        h = float(rng.normal(sign * effect_size / 2.0, 1.0))
        soft = {}
        if soft_tissue_effect is not None:
            check_soft_tissue_effect(soft_tissue_effect)
            soft = {"soft_tissue_health": float(rng.normal(sign * soft_tissue_effect / 2.0, 1.0)),
                    "soft_tissue_effect": soft_tissue_effect}
        return params_from_bone_health(rng, h, age_years=age_years, sex=sex,
                                      effect_size=effect_size, **soft, **overrides)


#: How each parameter follows the latent bone health ``h`` (SD units): parameter =
#: mean + sd * (loading * h_std + sqrt(1 - loading^2) * own noise), where h_std is h scaled to
#: unit variance over a balanced cohort. Sign: positive = higher in healthy bone.
#: (mean, sd, loading, low, high). Means sit midway between the facts sheet's normal and
#: osteoporotic columns, SDs so that +-1 SD of h spans the two columns.
BONE_HEALTH_LOADINGS: dict[str, tuple[float, float, float, float, float]] = {
    "tibia_ct_th_mm": (1.25, 0.30, 0.70, 0.55, 2.2),
    "tibia_ct_po": (0.060, 0.030, -0.65, 0.01, 0.20),
    "tibia_bv_tv": (0.185, 0.040, 0.70, 0.07, 0.32),
    "tibia_tb_th_mm": (0.255, 0.020, 0.25, 0.20, 0.32),
    "tibia_rod_fraction": (0.35, 0.12, -0.55, 0.05, 0.8),
    "cortical_tissue_hu": (2400.0, 80.0, 0.45, 2150.0, 2700.0),
    "fibula_ct_th_mm": (1.15, 0.25, 0.60, 0.5, 2.0),
    "fibula_ct_po": (0.05, 0.025, -0.50, 0.01, 0.18),
    "fibula_bv_tv": (0.17, 0.04, 0.55, 0.06, 0.30),
    "intramuscular_fat_fraction": (0.16, 0.06, -0.55, 0.02, 0.40),
    "muscle_hu": (45.0, 7.0, 0.50, 20.0, 70.0),
    "tendon_hu": (110.0, 12.0, 0.55, 70.0, 150.0),
    "fat_hu": (-108.0, 7.0, 0.40, -135.0, -80.0),
    "tendon_scale": (1.0, 0.10, 0.35, 0.7, 1.3),
    "muscle_scale": (1.0, 0.10, 0.40, 0.7, 1.3),
}

#: The soft-tissue entries of :data:`BONE_HEALTH_LOADINGS`: muscle marbling, muscle, tendon
#: and fat HU, tendon and muscle size. A soft-tissue effect (``soft_tissue_effect``) moves
#: these, and only these, on a latent score of their own instead of bone health.
SOFT_TISSUE_PARAMETERS: tuple[str, ...] = (
    "intramuscular_fat_fraction", "muscle_hu", "tendon_hu", "fat_hu", "tendon_scale",
    "muscle_scale")


def check_fibula_gap_range(gap_range_mm: tuple[float, float]) -> tuple[float, float]:
    """Return (low, high) in mm; raise ValueError unless 0.5 <= low <= high, both finite."""
    low, high = (float(v) for v in gap_range_mm)
    if not (math.isfinite(low) and math.isfinite(high) and MIN_FIBULA_GAP_MM <= low <= high):
        raise ValueError(f"fibula gap range must be finite with {MIN_FIBULA_GAP_MM} <= low <= "
                         f"high (mm), not {gap_range_mm}")
    return low, high


def check_soft_tissue_effect(soft_tissue_effect: float) -> None:
    """Raise ValueError unless the soft-tissue effect is a finite number >= 0 (SD units)."""
    if not (math.isfinite(soft_tissue_effect) and soft_tissue_effect >= 0.0):
        raise ValueError(f"soft_tissue_effect must be a finite number >= 0 (SD units), "
                         f"not {soft_tissue_effect}")


def params_from_bone_health(rng: np.random.Generator, bone_health: float, *,
                            age_years: float | None = None, sex: str | None = None,
                            effect_size: float = 2.0, loadings: dict | None = None,
                            soft_tissue_health: float | None = None,
                            soft_tissue_effect: float = 0.0,
                            fibula_gap_range_mm: tuple[float, float] = FIBULA_GAP_RANGE_MM,
                            **overrides: Any) -> PhantomParams:
    """Parameters of a subject with latent bone health ``bone_health``.

    Anatomy unrelated to bone health (bone and leg size, pose, side, subcutaneous fat, noise,
    motion) varies independently; motion is worse with age (grades average ~2.7, as in large
    cohorts). ``loadings`` overrides entries of :data:`BONE_HEALTH_LOADINGS`.

    ``soft_tissue_health``: a latent soft-tissue score that drives the
    :data:`SOFT_TISSUE_PARAMETERS` in place of ``bone_health`` (standardised like it, with
    ``soft_tissue_effect`` as the group separation); None keeps them on ``bone_health``.
    Every other draw is the same either way, so only the soft tissue changes.

    ``fibula_gap_range_mm``: (low, high) of the uniform draw of the narrowest tibia-fibula
    distance; another range changes only that parameter (the same random numbers are used).
    """
    gap_low_mm, gap_high_mm = check_fibula_gap_range(fibula_gap_range_mm)
    table = dict(BONE_HEALTH_LOADINGS)
    table.update(loadings or {})
    # h over a balanced cohort has variance 1 + (effect/2)^2: standardise it.
    h_std = bone_health / math.sqrt(1.0 + (effect_size / 2.0) ** 2)
    s_std = h_std
    if soft_tissue_health is not None:
        s_std = soft_tissue_health / math.sqrt(1.0 + (soft_tissue_effect / 2.0) ** 2)
    values: dict[str, Any] = {}
    for name, (mean, sd, loading, lo, hi) in table.items():
        own = float(rng.standard_normal())
        latent = s_std if name in SOFT_TISSUE_PARAMETERS else h_std
        v = mean + sd * (loading * latent + math.sqrt(max(0.0, 1.0 - loading**2)) * own)
        values[name] = float(np.clip(v, lo, hi))
    female = (sex == "F") if sex is not None else bool(rng.integers(2))
    size = float(np.clip(rng.normal(0.92 if female else 1.05, 0.06), 0.8, 1.2))
    age = 70.0 if age_years is None else float(age_years)
    motion_mean = 2.4 + 0.03 * (age - 65.0)
    motion = int(np.clip(round(rng.normal(motion_mean, 0.9)), 1, 5))
    values.update(
        tibia_area_mm2=float(np.clip(rng.normal(750.0, 90.0) * size**2, 500, 1050)),
        fibula_area_mm2=float(np.clip(rng.normal(120.0, 18.0) * size**2, 80, 170)),
        fibula_gap_mm=float(rng.uniform(gap_low_mm, gap_high_mm)),
        leg_scale=size,
        subcutaneous_fat_mm=float(np.clip(rng.normal(6.0 if female else 4.5, 1.5), 2.0, 11)),
        fibula_tb_th_mm=float(np.clip(values["tibia_tb_th_mm"] - 0.02, 0.18, 0.3)),
        side=("left", "right")[int(rng.integers(2))],
        rotation_deg=float(rng.uniform(-15.0, 15.0)),
        translation_mm=(float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3))),
        tilt_deg=float(rng.uniform(-3.0, 3.0)),
        noise_sd_hu=float(rng.uniform(110.0, 190.0)),
        motion_grade=motion,
        cast=bool(rng.random() < 0.5),
    )
    values.update(overrides)
    return PhantomParams(**values)
