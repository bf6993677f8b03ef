"""Every threshold and size used by post-processing, in physical units, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["PostprocessConfig", "PAPER", "DEFAULT"]


@dataclass(frozen=True)
class PostprocessConfig:
    """Settings of the bone clean-up and the soft-tissue subdivision.

    Bone clean-up
    -------------
    connectivity:
        ``"3d"``: connected components in 3D (26-neighbourhood), consistent across slices;
        ``"2d"``: per slice (8-neighbourhood), as the paper works slice by slice.
    keep_cortical_arcs:
        Each bone class keeps its largest connected component (the paper); with this, a
        cortical part it drops that touches the kept marrow in its slice stays too: a ring
        the network broke in two places is two arcs, and dropping the smaller one leaves the
        cortex open (off in ``PAPER``).
    max_cortical_gap_mm:
        Largest gap in a cortical ring that morphological closing may bridge.
    min_bone_area_mm2:
        A bone whose mean cross-section is below this is reported missing (e.g. a fibula
        outside the field of view) instead of being kept as a speck.

    Surfaces (see :mod:`.surfaces`; this project's addition, off in ``PAPER``)
    --------------------------------------------------------------------------
    leg_opening_mm:
        Attachments of the leg thinner than twice this (a holder shell touching the skin, a
        strap) are cut off; 0 = off.
    skin_surface_band_mm:
        Within this distance of the predicted leg surface, the surface moves to where the
        local mean HU crosses ``skin_surface_hu``; 0 = off.
    skin_surface_hu:
        The air | skin level: half-way between air (-1000 HU) and skin (about 0 HU).
    skin_surface_window_mm:
        Side of the square over which HU are averaged for the skin surface.
    periosteal_band_mm:
        Within this distance of each bone's predicted outer surface, cortical and soft-tissue
        pixels follow the half-way level between the slice's cortex and the soft tissue
        around it; 0 = off.
    periosteal_window_mm:
        Side of the square over which HU are averaged for the periosteal surface.
    bone_gap_band_mm:
        Within this distance of the fibula, tibial "marrow" as dark as soft tissue that
        reaches the soft tissue or the fibula is soft tissue: the gap between two close bones
        the network filled; 0 = off.

    Soft tissue
    -----------
    skin_width_mm:
        Soft tissue within this distance of the leg surface (in-plane) is skin (paper: 2 mm).
    tendon_seed_hu, fat_seed_hu:
        Closed HU windows of tendon and fat seeds (paper: 100..600 and -600..-200).
    seed_growth_mm:
        How far seeds grow (competitively, one voxel ring per step) through unassigned soft
        tissue. The paper gives no distance; its preset uses 0.25 mm. With the local HU mean
        the seeds add nothing (growth 0 is best on phantoms, see benchmarks/RESULTS.md), so
        the default reduces to the skin band plus the split of the local mean.
    split_hu:
        Voxels not reached by any seed: myotendinous above, adipose at or below (paper: -50).
        Used as it is with ``split_levels="fixed"``.
    split_levels:
        ``"histogram"`` (this project's default): the split lies between the scan's own fat
        and muscle levels, the peaks of its inner soft tissue's local-mean histogram, at
        ``split_fraction``; the seed windows move with the levels. A scanner's soft-tissue
        HU can be offset by 100 HU or more (its calibration is for bone), which a fixed split
        turns into wholesale fat-muscle swaps. ``"fixed"``: ``split_hu`` and the seed windows
        as given (the paper).
    split_fraction:
        Where the split lies between the fat (0) and muscle (1) levels.
    streak_suppression:
        Scale motion streaks in the soft tissue back to the slice's normal texture before the
        rules (see :mod:`.soft_tissue_levels`); a still scan is left as it is.
    drift_window_mm:
        Side of the in-plane window over which the slow drift of soft-tissue HU against the
        tissue levels (broad motion bands) is estimated and removed; 0 = off.
    myotendinous_opening_mm:
        Side of the square with which the myotendinous region of each slice is opened: parts
        of it too thin to hold the square become adipose; 0 = off. Motion streaks cross the
        fat as bright lines a few voxels wide that survive the local mean and the split;
        muscle bellies and tendons are millimetres across. 0.4 mm (7 voxels at 60.7 um) was
        chosen on development phantoms outside both test sets (benchmarks/RESULTS.md).
    soft_tissue_model:
        Who splits the inner soft tissue into myotendinous and adipose once the rules have:
        ``"bundled"`` (this project's default: gradient-boosted trees over each slice's local
        context, trained on synthetic phantoms, see :mod:`.soft_tissue_model`), a path to a
        model file of that format (one trained on your own data), or ``"none"`` (the rules'
        split stays). Used only where the scan's own fat and muscle levels were found.
    smoothing_window_mm:
        Side of the cube over which HU are averaged (soft-tissue voxels only) before the rules;
        0 = the paper's rules on raw HU. HR-pQCT noise (SD 100-200 HU) is as large as the
        fat-muscle contrast, so the raw rules label single voxels by their noise; a local mean
        trades a little edge sharpness for much less speckle (see benchmarks/RESULTS.md). A box
        mean costs the same whatever its size, unlike a Gaussian.
    ring_radii_mm:
        Radii of the soft-tissue distance rings around the tibia's outer surface.
    """

    connectivity: str = "3d"
    keep_cortical_arcs: bool = True
    max_cortical_gap_mm: float = 1.0
    min_bone_area_mm2: float = 5.0
    leg_opening_mm: float = 0.75
    skin_surface_band_mm: float = 0.75
    skin_surface_hu: float = -500.0
    skin_surface_window_mm: float = 0.3
    periosteal_band_mm: float = 0.13
    periosteal_window_mm: float = 0.18
    bone_gap_band_mm: float = 1.5
    skin_width_mm: float = 2.0
    tendon_seed_hu: tuple[float, float] = (100.0, 600.0)
    fat_seed_hu: tuple[float, float] = (-600.0, -200.0)
    seed_growth_mm: float = 0.0
    split_hu: float = -50.0
    split_levels: str = "histogram"
    split_fraction: float = 0.5
    streak_suppression: bool = True
    drift_window_mm: float = 3.0
    myotendinous_opening_mm: float = 0.4
    soft_tissue_model: str = "bundled"
    smoothing_window_mm: float = 0.3
    ring_radii_mm: tuple[float, ...] = (2.0, 5.0, 10.0, 15.0, 20.0)

    def __post_init__(self) -> None:
        if self.connectivity not in ("2d", "3d"):
            raise ValueError(f"connectivity must be '2d' or '3d', got {self.connectivity!r}")
        if self.split_levels not in ("fixed", "histogram"):
            raise ValueError("split_levels must be 'fixed' or 'histogram', "
                             f"got {self.split_levels!r}")
        if not 0.0 <= self.split_fraction <= 1.0:
            raise ValueError(f"split_fraction must lie in [0, 1], got {self.split_fraction}")
        for name in ("max_cortical_gap_mm", "min_bone_area_mm2", "skin_width_mm",
                     "seed_growth_mm", "smoothing_window_mm", "leg_opening_mm",
                     "skin_surface_band_mm", "skin_surface_window_mm", "periosteal_band_mm",
                     "periosteal_window_mm", "bone_gap_band_mm", "drift_window_mm",
                     "myotendinous_opening_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not isinstance(self.soft_tissue_model, str) or not (
                self.soft_tissue_model in ("bundled", "none")
                or self.soft_tissue_model.endswith(".json")):
            raise ValueError("soft_tissue_model must be 'bundled', 'none' or a model file "
                             f"(.json), got {self.soft_tissue_model!r}")
        for name in ("tendon_seed_hu", "fat_seed_hu"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (low, high), got {(lo, hi)}")

    def without_surface_refinement(self) -> PostprocessConfig:
        """These settings with the network's surfaces kept as predicted (see :mod:`.surfaces`)."""
        return replace(self, leg_opening_mm=0.0, skin_surface_band_mm=0.0,
                       periosteal_band_mm=0.0, bone_gap_band_mm=0.0)

    def with_fixed_split(self) -> PostprocessConfig:
        """These settings with the soft-tissue rules on absolute HU, as the paper has them
        (no streak suppression, drift correction, opening or learned split either)."""
        return replace(self, split_levels="fixed", streak_suppression=False,
                       drift_window_mm=0.0, myotendinous_opening_mm=0.0,
                       soft_tissue_model="none")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PostprocessConfig:
        data = dict(data)
        for key in ("tendon_seed_hu", "fat_seed_hu", "ring_radii_mm"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


#: The paper's rules exactly: raw HU, fixed thresholds, slice-by-slice components of each
#: class, the network's surfaces.
PAPER = PostprocessConfig(
    connectivity="2d", keep_cortical_arcs=False, smoothing_window_mm=0.0,
    seed_growth_mm=0.25).without_surface_refinement().with_fixed_split()
#: This project's default: 3D components, surfaces refined to the HU edges, and soft tissue
#: split on a local HU mean between the scan's own fat and muscle levels, with motion streaks
#: and slow drifts removed first, streak remnants opened away after, and the split then
#: decided by the bundled model from each slice's context.
DEFAULT = PostprocessConfig()


def preset(name: str) -> PostprocessConfig:
    """Return the ``"paper"`` or ``"default"`` settings."""
    presets = {"paper": PAPER, "default": DEFAULT}
    try:
        return replace(presets[name])
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}: {', '.join(presets)}") from None
