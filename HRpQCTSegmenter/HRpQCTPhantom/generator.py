"""One synthetic HR-pQCT scan with its ground truth: :func:`generate_phantom`.

Slices are rendered independently (two worker threads; numpy and scipy release the GIL), each
from the slice's outlines (:mod:`.anatomy`), the 3D random fields that carry the
microstructure (:mod:`.fields`) and the image-formation model (:mod:`.imaging`). Nothing
full-size is float64: the scan is stored as int16 HU, labels as uint8.

Microstructure:

* Trabecular bone: the thin shell ``|F| < t`` around the zero level set of a band-pass
  Gaussian field ``F`` is a connected network of plates (the zero set of such a field
  percolates); a second field ``G`` perforates the plates where it is low, turning them into
  rods, and the network is denser near the endocortical surface. ``F`` is stretched along the
  bone axis so plates run longitudinally and change slowly from slice to slice. The threshold
  ``t`` is set per slice as the quantile of ``|F| / (holes * density)`` inside the compartment,
  so each slice's BV/TV is exactly the requested (smoothly varying) value.
* Cortical pores: the highest values of a low-pass field stretched ~8x along z (Haversian and
  resorption canals run along the bone), favouring the endocortical side; the threshold is
  the per-slice quantile that gives the requested porosity.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from HRpQCTCore.progress import CancelToken, ProgressCallback, check, report
from HRpQCTCore.regions import REGIONS, region_by_name, regions_to_classes
from HRpQCTCore.scan import DEFAULT_CALIBRATION, Scan
from HRpQCTPhantom import morphometry
from HRpQCTPhantom.anatomy import Anatomy, PixelMap, SliceGeometry
from HRpQCTPhantom.fields import NoiseBank, ZField, crossfade_texture, gaussian_field
from HRpQCTPhantom.imaging import MotionModel, blur
from HRpQCTPhantom.params import PhantomParams

__all__ = ["Phantom", "generate_phantom", "TISSUES", "trabecular_wavelength_mm"]

#: Internal tissue codes (finer than the regions: used for the image and the HU truth).
TISSUES = ("air", "cast", "fat", "muscle", "intramuscular_fat", "tendon", "dermis",
           "cortical_bone", "cortical_pore", "trabecula", "marrow")
_T = {name: i for i, name in enumerate(TISSUES)}

_R_TIB_CORT = region_by_name("tibial_cortical").label
_R_TIB_TRAB = region_by_name("tibial_trabecular").label
_R_FIB_CORT = region_by_name("fibular_cortical").label
_R_FIB_TRAB = region_by_name("fibular_trabecular").label
_R_SKIN = region_by_name("skin").label
_R_MYO = region_by_name("myotendinous").label
_R_FAT = region_by_name("adipose").label

#: Measured local thickness of the trabecular shell ~ C * wavelength * BV/TV^ALPHA (fitted on
#: full-resolution patches, 3 seeds each at BV/TV 0.22 / rods 0.25 and 0.14 / 0.5; see
#: Testing/tests/test_phantom_morphometry.py for the tolerance this achieves).
_TB_THICKNESS_C = 0.21
_TB_THICKNESS_ALPHA = 0.38
#: Elongation of trabecular plates along the bone axis.
_TB_ANISOTROPY_Z = 1.8
#: Relative spectral width of the trabecular field: a narrow band gives a regular maze, a
#: broad one the irregular strut-and-node look of real trabecular bone.
_TB_BANDWIDTH = 0.65


def trabecular_wavelength_mm(bv_tv: float, tb_th_mm: float) -> float:
    """Wavelength of the trabecular field that gives struts of ``tb_th_mm`` at ``bv_tv``.

    A thin shell ``|F| < t`` around the zero set is ~BV/TV / (crossings per mm) thick, and
    crossings per mm scale as 1 / wavelength (Rice's formula); perforation and the
    local-thickness measure bend the exponent, hence the fitted power law.
    """
    return tb_th_mm / (_TB_THICKNESS_C * bv_tv**_TB_THICKNESS_ALPHA)


@dataclass
class Phantom:
    """A generated scan: HU image, 5-class and 7-region labels, and the truth.

    Attributes
    ----------
    scan:
        :class:`~HRpQCTCore.scan.Scan` with int16 HU.
    classes:
        uint8 network-class label map (``regions.NETWORK_CLASSES``), same shape.
    regions:
        uint8 7-region label map (``regions.REGIONS``), same shape.
    truth:
        JSON-ready dict: ``params``, ``seed``, ``morphometrics``, ``hu_by_tissue``, ...
    """

    scan: Scan
    classes: np.ndarray
    regions: np.ndarray
    truth: dict


class _Fields:
    """Scan-level random fields."""

    def __init__(self, params: PhantomParams, anatomy: Anatomy, pixmap: PixelMap,
                 rng: np.random.Generator) -> None:
        p = params
        n = p.n_slices
        boxes = {"tib": [], "fib": [], "leg": []}
        for z in _sample_slices(n, 12):
            g = anatomy.geometry(z)
            boxes["tib"].append(pixmap.box_of(g.tibia_outer.points(), z, 4))
            boxes["fib"].append(pixmap.box_of(g.fibula_outer.points(), z, 4))
            boxes["leg"].append(pixmap.box_of(g.leg.points(), z, 4))
        self.boxes = {k: _union(v, p.field_px) for k, v in boxes.items()}
        vox = p.voxel_mm
        self.tib_f = self.tib_g = self.tib_p = None
        self.fib_f = self.fib_g = self.fib_p = None
        if _nonempty(self.boxes["tib"]):
            lam = trabecular_wavelength_mm(p.tibia_bv_tv, p.tibia_tb_th_mm)
            self.tib_f = ZField(n, self.boxes["tib"], vox, lam, rng, bandwidth=_TB_BANDWIDTH,
                                anisotropy_z=_TB_ANISOTROPY_Z)
            self.tib_g = ZField(n, self.boxes["tib"], vox, 1.6 * lam, rng,
                                anisotropy_z=_TB_ANISOTROPY_Z)
            self.tib_p = ZField(n, self.boxes["tib"], vox, 0.12, rng, kind="lowpass",
                                anisotropy_z=8.0)
        if _nonempty(self.boxes["fib"]):
            lam = trabecular_wavelength_mm(p.fibula_bv_tv, p.fibula_tb_th_mm)
            self.fib_f = ZField(n, self.boxes["fib"], vox, lam, rng, bandwidth=_TB_BANDWIDTH,
                                anisotropy_z=_TB_ANISOTROPY_Z)
            self.fib_g = ZField(n, self.boxes["fib"], vox, 1.6 * lam, rng,
                                anisotropy_z=_TB_ANISOTROPY_Z)
            self.fib_p = ZField(n, self.boxes["fib"], vox, 0.12, rng, kind="lowpass",
                                anisotropy_z=8.0)
        leg = self.boxes["leg"]
        shape = (max(leg[1] - leg[0], 1), max(leg[3] - leg[2], 1))
        # Intramuscular fat: worm-like streaks; soft-tissue shading: slow HU drift.
        self.marble = [gaussian_field(shape, (vox, vox), 1.6, rng, bandwidth=0.6)
                       for _ in range(2)]
        self.shade = [gaussian_field(shape, (vox, vox), 12.0, rng, kind="lowpass")
                      for _ in range(2)]
        self.noise = NoiseBank(p.field_px, p.noise_corr_mm / vox, rng) \
            if p.noise_sd_hu > 0 else None

    def leg_texture(self, which: str, z: int, box: tuple[int, int, int, int],
                    turns: float) -> np.ndarray:
        tex = self.marble if which == "marble" else self.shade
        lb = self.boxes["leg"]
        sl = (slice(box[0] - lb[0], box[1] - lb[0]), slice(box[2] - lb[2], box[3] - lb[2]))
        phase = 2 * np.pi * turns * z / max(1, self.n_slices_hint)
        return crossfade_texture(tex[0][sl], tex[1][sl], phase)


def _sample_slices(n: int, step: int) -> list[int]:
    zs = list(range(0, n, step))
    if zs[-1] != n - 1:
        zs.append(n - 1)
    return zs


def _union(boxes, n: int, margin: int = 8) -> tuple[int, int, int, int]:
    b = np.array(boxes)
    return (max(0, int(b[:, 0].min()) - margin), min(n, int(b[:, 1].max()) + margin),
            max(0, int(b[:, 2].min()) - margin), min(n, int(b[:, 3].max()) + margin))


def _nonempty(box) -> bool:
    return box[1] > box[0] and box[3] > box[2]


def _intersect(a, b) -> tuple[int, int, int, int]:
    box = (max(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), min(a[3], b[3]))
    return (box[0], max(box[0], box[1]), box[2], max(box[2], box[3]))


def _norm_ppf(p: float) -> float:
    from scipy.special import ndtri

    return float(ndtri(min(max(p, 1e-6), 1 - 1e-6)))


class _Renderer:
    """Renders slices; holds everything scan-level."""

    def __init__(self, params: PhantomParams, seed: int) -> None:
        self.p = params
        ss = np.random.SeedSequence([int(seed), 0x48525051])
        anat_ss, pose_ss, field_ss, motion_ss = ss.spawn(4)
        self.anatomy = Anatomy(params, np.random.default_rng(anat_ss))
        self.pixmap = PixelMap(params, self.anatomy, np.random.default_rng(pose_ss))
        self.fields = _Fields(params, self.anatomy, self.pixmap, np.random.default_rng(field_ss))
        self.fields.n_slices_hint = params.n_slices
        self.motion = MotionModel.draw(params.motion_grade, np.random.default_rng(motion_ss),
                                       params.voxel_mm)
        self.seed = int(seed)
        p = params
        hu = {"air": -1000.0, "cast": 250.0, "fat": p.fat_hu, "muscle": p.muscle_hu,
              "intramuscular_fat": p.fat_hu + 8.0, "tendon": p.tendon_hu, "dermis": p.skin_hu,
              "cortical_bone": p.cortical_tissue_hu, "cortical_pore": p.pore_hu,
              "trabecula": p.trabecular_tissue_hu, "marrow": p.marrow_hu}
        self.tissue_hu = np.array([hu[t] for t in TISSUES], np.float32)
        self.marble_threshold = _norm_ppf(1.0 - p.intramuscular_fat_fraction)
        self.ct_th_every = max(1, p.n_slices // 12)
        self.tb_box = self._trabecular_box()

    def _trabecular_box(self) -> tuple[int, int, int, int]:
        """A pixel box inside the tibia's marrow in every slice, for Tb.Th / Tb.Sp."""
        p = self.p
        zs = _sample_slices(p.n_slices, 8)
        geoms = [self.anatomy.geometry(z) for z in zs]
        r_min = min(float(g.tibia_inner.r.min()) for g in geoms)
        half_mm = min(3.5, 0.55 * r_min)
        c = np.array([[0.0, 0.0]])
        centers = np.array([self.pixmap.uv_to_pixel(c, z)[0] for z in zs])
        drift = np.ptp(centers, axis=0) / 2
        half_px = int(half_mm / p.voxel_mm - drift.max())
        mid = centers.mean(axis=0)
        box = (int(mid[0]) - half_px, int(mid[0]) + half_px,
               int(mid[1]) - half_px, int(mid[1]) + half_px)
        return _intersect(box, (0, p.field_px, 0, p.field_px)) if half_px > 4 else (0, 0, 0, 0)

    # --- one slice ----------------------------------------------------------------------
    def render(self, z: int, out_hu: np.ndarray, out_regions: np.ndarray,
               tb_bone: np.ndarray, tb_comp: np.ndarray) -> dict:
        p = self.p
        g = self.anatomy.geometry(z)
        pm = self.pixmap
        n = p.field_px
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x5A, z]))
        leg_box = pm.box_of(g.leg.points(4), z, 2)
        work = leg_box
        if g.cast is not None:
            cast_outer = g.cast
            pts = cast_outer.points(256) * 1.0
            work = _outer_box(work, pm.box_of(_grow(pts, cast_outer, 2.0), z, 2))
        sigma_px = p.blur_sigma_mm / p.voxel_mm
        pad = math.ceil(3 * sigma_px) + 2
        work = _intersect((work[0] - pad, work[1] + pad, work[2] - pad, work[3] + pad),
                          (0, n, 0, n))
        stats: dict = {"z": z}
        regions = np.zeros((work[1] - work[0], work[3] - work[2]), np.uint8)
        tissue = np.zeros_like(regions)
        if regions.size == 0:
            out_hu[z] = -1000
            out_regions[z] = 0
            return stats
        u, v = pm.uv_grids(z, work)
        # Leg and skin.
        du = u - np.float32(g.leg.center[0])
        dv = v - np.float32(g.leg.center[1])
        d_leg, leg_idx = g.leg.signed_distance(du, dv)
        del du, dv
        inside = d_leg > 0
        regions[inside] = _R_FAT
        tissue[inside] = _T["fat"]
        # Muscle bellies with intramuscular fat.
        for _, m in g.muscles:
            box = _intersect(pm.box_of(m.points(32), z, 2), work)
            if not _nonempty(box):
                continue
            sl = _local(box, work)
            mdu = u[sl] - np.float32(m.center[0])
            mdv = v[sl] - np.float32(m.center[1])
            d_m, _ = m.signed_distance(mdu, mdv)
            msk = (d_m > 0) & inside[sl]
            marble = self.fields.leg_texture("marble", z, box, 0.6)
            fat_in = msk & (marble > self.marble_threshold)
            regions[sl][msk] = _R_MYO
            tissue[sl][msk] = _T["muscle"]
            regions[sl][fat_in] = _R_FAT
            tissue[sl][fat_in] = _T["intramuscular_fat"]
        for _, t in g.tendons:
            box = _intersect(pm.box_of(t.points(32), z, 2), work)
            if not _nonempty(box):
                continue
            sl = _local(box, work)
            msk = t.inside(u[sl] - np.float32(t.center[0]), v[sl] - np.float32(t.center[1]))
            msk &= inside[sl]
            regions[sl][msk] = _R_MYO
            tissue[sl][msk] = _T["tendon"]
        dermis = inside & (d_leg < g.dermis_mm[leg_idx])
        tissue[dermis] = _T["dermis"]
        regions[inside & (d_leg < np.float32(p.skin_width_mm))] = _R_SKIN
        del dermis
        if g.cast is not None:
            c = g.cast
            a, b = c.semi_axes
            du = u - np.float32(c.center[0])
            dv = v - np.float32(c.center[1])
            outer = Ellipse_inside(du, dv, a + 1.2, b + 1.2)
            ring = outer & ~Ellipse_inside(du, dv, a, b) & ~inside
            ang = np.arctan2(dv, du)
            ring &= _wrap_arr(ang - self.anatomy.cast_arc[0]) < self.anatomy.cast_arc[1] - np.pi
            tissue[ring] = _T["cast"]
            del du, dv, ang, outer, ring
        del leg_idx
        # Bones.
        bone_stats = {}
        for key, outer_o, inner_o, labels, fields, bv_tv in (
            ("tibia", g.tibia_outer, g.tibia_inner, (_R_TIB_CORT, _R_TIB_TRAB),
             (self.fields.tib_f, self.fields.tib_g, self.fields.tib_p, self.fields.boxes["tib"]),
             g.tibia_bv_tv),
            ("fibula", g.fibula_outer, g.fibula_inner, (_R_FIB_CORT, _R_FIB_TRAB),
             (self.fields.fib_f, self.fields.fib_g, self.fields.fib_p, self.fields.boxes["fib"]),
             g.fibula_bv_tv),
        ):
            bone_stats[key] = self._bone(z, key, outer_o, inner_o, labels, fields, bv_tv, u, v,
                                         work, regions, tissue, d_leg, tb_bone, tb_comp)
        stats["bones"] = bone_stats
        del u, v, d_leg
        # Noise-free image: tissue HU, a slow shading of soft tissue, partial-volume blur.
        clean = self.tissue_hu[tissue]
        soft = (tissue >= _T["fat"]) & (tissue <= _T["dermis"])
        if soft.any():
            lb = _intersect(work, self.fields.boxes["leg"])
            if _nonempty(lb):
                shade = self.fields.leg_texture("shade", z, lb, 0.3)
                sl = _local(lb, work)
                clean[sl] += np.where(soft[sl], shade * np.float32(6.0), np.float32(0))
        clean = blur(clean, sigma_px)
        # Noise-free statistics for the truth (BMDs from the blurred, noise-free image).
        nreg = len(REGIONS) + 1
        stats["region_count"] = np.bincount(regions.ravel(), minlength=nreg)
        stats["region_hu_sum"] = np.bincount(regions.ravel(), weights=clean.ravel(),
                                             minlength=nreg)
        nt = len(TISSUES)
        stats["tissue_count"] = np.bincount(tissue.ravel(), minlength=nt)
        stats["tissue_clean_sum"] = np.bincount(tissue.ravel(), weights=clean.ravel(),
                                                minlength=nt)
        image = clean
        if self.motion.active:
            image = image + self.motion.artefact(clean, -1000.0)
        full = np.full((n, n), -1000.0, np.float32)
        full[work[0]:work[1], work[2]:work[3]] = image
        if self.fields.noise is not None:
            noise = self.fields.noise.draw(rng, (n, n))
            full += noise * np.float32(p.noise_sd_hu)
        _calibrate(full, p)
        noisy = full[work[0]:work[1], work[2]:work[3]]
        stats["tissue_noisy_sum"] = np.bincount(tissue.ravel(), weights=noisy.ravel(),
                                                minlength=nt)
        stats["tissue_noisy_sq"] = np.bincount(tissue.ravel(),
                                               weights=(noisy.astype(np.float64) ** 2).ravel(),
                                               minlength=nt)
        np.clip(full, -32768, 32767, out=full)
        np.rint(full, out=full)
        out_hu[z] = full.astype(np.int16)
        out_regions[z] = 0
        out_regions[z, work[0]:work[1], work[2]:work[3]] = regions
        return stats

    def _bone(self, z, key, outer_o, inner_o, labels, fields, bv_tv, u, v, work, regions,
              tissue, d_leg, tb_bone, tb_comp) -> dict:
        p = self.p
        pm = self.pixmap
        f_field, g_field, p_field, field_box = fields
        box = _intersect(_intersect(pm.box_of(outer_o.points(8), z, 2), work), field_box)
        out: dict = {"cortex_px": 0, "pore_px": 0, "compartment_px": 0, "bone_px": 0}
        if not _nonempty(box) or f_field is None:
            return out
        sl = _local(box, work)
        du = u[sl] - np.float32(outer_o.center[0])
        dv = v[sl] - np.float32(outer_o.center[1])
        d_out, idx = outer_o.signed_distance(du, dv)
        rho = np.hypot(du, dv)
        del du, dv
        d_in = inner_o.distance_from_index(rho, idx)
        del rho, idx
        in_leg = d_leg[sl] > 0
        bone_all = (d_out >= 0) & in_leg
        comp = (d_in >= 0) & bone_all
        cortex = bone_all & ~comp
        reg = regions[sl]
        tis = tissue[sl]
        reg[cortex] = labels[0]
        reg[comp] = labels[1]
        tis[cortex] = _T["cortical_bone"]
        po = p.tibia_ct_po if key == "tibia" else p.fibula_ct_po
        n_cortex = int(cortex.sum())
        if n_cortex and po > 0:
            pf = p_field.at(z, box)
            depth = -d_in[cortex]  # mm from the endocortical surface into the cortex
            score = pf[cortex] + 1.2 * np.exp(-depth / 0.35)
            k = round((1.0 - po) * n_cortex)
            if k < n_cortex:
                thr = np.partition(score, k)[k]
                pores = np.zeros_like(cortex)
                pores[cortex] = score >= thr
                tis[pores] = _T["cortical_pore"]
                out["pore_px"] = int(pores.sum())
        n_comp = int(comp.sum())
        tis[comp] = _T["marrow"]
        bone = None
        if n_comp:
            f = np.abs(f_field.at(z, box)[comp])
            gv = g_field.at(z, box)[comp]
            rod = p.tibia_rod_fraction if key == "tibia" else 0.2
            q = _norm_ppf(rod)
            holes = np.clip((gv - q) / 0.5 + 0.5, 0.03, 1.0)
            density = 1.0 + 0.8 * np.exp(-d_in[comp] / 1.5)
            score = f / (holes * density)
            k = round(bv_tv * n_comp)
            bone = np.zeros_like(comp)
            if k > 0:
                thr = np.partition(score, k - 1)[k - 1]
                bone[comp] = score <= thr
                tis[bone] = _T["trabecula"]
            out["bone_px"] = int(bone.sum())
        out["cortex_px"] = n_cortex
        out["compartment_px"] = n_comp
        if z % self.ct_th_every == 0 and n_cortex:
            out["ct_th_mm"] = morphometry.thickness_2d_mm(cortex, p.voxel_mm)
        if key == "tibia":
            tb = self.tb_box
            if _nonempty(tb) and bone is not None:
                # Copy the trabecular bone and compartment inside the fixed Tb box.
                ib = _intersect(tb, box)
                if _nonempty(ib):
                    src = _local(ib, box)
                    dst = _local(ib, tb)
                    tb_bone[z][dst] = bone[src]
                    tb_comp[z][dst] = comp[src]
        return out


def _calibrate(image: np.ndarray, p: PhantomParams) -> None:
    """Another site's HU calibration, in place (see ``PhantomParams.calibration_scale``)."""
    if p.calibration_scale == 1.0 and p.calibration_offset_hu == 0.0:
        return  # bit-identical images for the default calibration
    # Scale the attenuation (HU + 1000), so air stays air, then shift.
    image += np.float32(1000.0)
    image *= np.float32(p.calibration_scale)
    image += np.float32(p.calibration_offset_hu - 1000.0)


def Ellipse_inside(du, dv, a, b):  # noqa: N802 -- mirrors the Ellipse class's name
    x = du * np.float32(1.0 / a)
    y = dv * np.float32(1.0 / b)
    return x * x + y * y <= 1.0


def _wrap_arr(a: np.ndarray) -> np.ndarray:
    return np.abs((a + np.pi) % (2 * np.pi) - np.pi)


def _grow(pts: np.ndarray, ell, mm: float) -> np.ndarray:
    c = np.asarray(ell.center)
    v = pts - c
    return pts + v / np.linalg.norm(v, axis=1, keepdims=True) * mm


def _outer_box(a, b):
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _local(box, ref) -> tuple[slice, slice]:
    return (slice(box[0] - ref[0], box[1] - ref[0]), slice(box[2] - ref[2], box[3] - ref[2]))


def generate_phantom(params: PhantomParams, seed: int, *, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None, n_threads: int = 2) -> Phantom:
    """Generate one synthetic scan with its labels and truth, deterministically from ``seed``.

    Parameters
    ----------
    params:
        Everything about the subject and the image (:class:`PhantomParams`).
    seed:
        Same seed and parameters give bit-identical outputs, whatever ``n_threads``.
    progress, cancel:
        Progress callback (stage ``"phantom"``, one unit per slice) and cancel token.
    n_threads:
        Worker threads rendering slices.
    """
    check(cancel)
    p = params
    renderer = _Renderer(p, seed)
    shape = (p.n_slices, p.field_px, p.field_px)
    hu = np.empty(shape, np.int16)
    regions = np.empty(shape, np.uint8)
    tb = renderer.tb_box
    tb_shape = (p.n_slices, tb[1] - tb[0], tb[3] - tb[2])
    tb_bone = np.zeros(tb_shape, bool)
    tb_comp = np.zeros(tb_shape, bool)
    results: list[dict | None] = [None] * p.n_slices
    done = 0
    report(progress, 0, p.n_slices, "phantom")

    def work(z: int) -> dict:
        check(cancel)
        return renderer.render(z, hu, regions, tb_bone, tb_comp)

    if n_threads > 1 and p.n_slices > 1:
        with ThreadPoolExecutor(max_workers=n_threads) as pool:
            futures = [pool.submit(work, z) for z in range(p.n_slices)]
            try:
                for z, fut in enumerate(futures):
                    results[z] = fut.result()
                    done += 1
                    report(progress, done, p.n_slices, "phantom")
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    else:
        for z in range(p.n_slices):
            results[z] = work(z)
            done += 1
            report(progress, done, p.n_slices, "phantom")
    classes = np.empty_like(regions)
    for z in range(p.n_slices):  # slice-wise: no full-size temporaries
        classes[z] = regions_to_classes(regions[z])
    scan = Scan(hu=hu, spacing_mm=(p.voxel_mm,) * 3,
                origin_mm=(-(p.field_px - 1) / 2 * p.voxel_mm,
                           -(p.field_px - 1) / 2 * p.voxel_mm, 0.0),
                calibration=None,
                metadata={"source": "synthetic phantom (HRpQCTPhantom)",
                          "units_on_disk": "hu", "seed": int(seed)})
    truth = morphometry.assemble_truth(p, int(seed), results, tb_bone, tb_comp,
                                       renderer, DEFAULT_CALIBRATION)
    return Phantom(scan=scan, classes=classes, regions=regions, truth=truth)


__all__ += ["SliceGeometry"]
