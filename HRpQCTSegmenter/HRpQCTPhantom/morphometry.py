"""Morphometrics of the generated ground truth (what the phantom *is*, not what was asked).

Methods, all on the binary truth at generation resolution:

* Thickness (Ct.Th, Tb.Th) and separation (Tb.Sp): mean local thickness (largest inscribed
  sphere containing each voxel, Hildebrand-style), spheres centred on the distance-transform
  ridge with radii binned in half-voxel steps (whole voxels above 4), diameter ``2 r - 0.5``
  voxel (the half voxel removes the bias of measuring to background voxel *centres*);
  exact for flat slabs.
  Ct.Th is measured in 2D on every ~14th slice (distance-ridge mean), Tb.Th/Tb.Sp in 3D in a
  box inside the tibia's marrow space (central 64 slices at most).
* Tb.N = 1 / (Tb.Th + Tb.Sp); BV/TV = trabecular bone voxels / compartment voxels over the
  whole stack; Ct.Po = pore voxels / cortical-compartment voxels.
* Densities: mean noise-free, blurred HU of each compartment, converted to mg HA/cm3 with the
  default XtremeCT II calibration (so BMD ~ 0.39 HU - 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from HRpQCTCore.regions import region_by_name

if TYPE_CHECKING:  # pragma: no cover
    from HRpQCTCore.scan import Calibration
    from HRpQCTPhantom.params import PhantomParams

__all__ = ["thickness_2d_mm", "ridge_thickness_mm", "trabecular_morphometrics",
           "assemble_truth"]


def ridge_thickness_mm(mask: np.ndarray, voxel_mm: float,
                       interior: np.ndarray | None = None, step_vox: float = 0.5) -> float:
    """Mean local thickness of the structures in ``mask`` (2D or 3D).

    Local thickness (Hildebrand & Ruegsegger): each voxel gets the diameter of the largest
    inscribed sphere that contains it. Spheres are centred on the distance ridge (voxels
    whose distance to background is a local maximum); radii are binned in ``step_vox``
    steps and each bin is spread with one distance transform. Diameters are ``2 r - 0.5``
    voxel (the half voxel removes the bias of measuring to background voxel centres).
    ``interior`` restricts which voxels are averaged (e.g. away from a cropped border).
    Returns NaN for an empty mask.
    """
    from scipy.ndimage import distance_transform_edt, maximum_filter

    if not mask.any():
        return float("nan")
    dt = distance_transform_edt(mask).astype(np.float32)
    ridge = mask & (dt >= maximum_filter(dt, size=3))
    local = np.zeros(mask.shape, np.float32)
    r_max = float(dt[ridge].max())
    radii = np.concatenate([np.arange(1.0, 4.0, step_vox), np.arange(4.0, r_max + 1.0, 1.0)])
    for r in radii:
        centres = ridge & (dt >= r)
        if not centres.any():
            break
        # Voxels within r of a centre of radius >= r lie in a sphere of diameter >= 2r.
        reach = distance_transform_edt(~centres) < r
        local[reach & mask] = 2.0 * r - 0.5
    sel = mask if interior is None else (mask & interior)
    values = local[sel]
    values = values[values > 0]
    if values.size == 0:
        return float("nan")
    return float(values.mean(dtype=np.float64) * voxel_mm)


def thickness_2d_mm(mask: np.ndarray, voxel_mm: float) -> float:
    """In-plane thickness of a 2D ring (the cortex): ``2 * mean ridge distance - 0.5`` voxel.

    For a ring whose thickness varies slowly this equals the mean local thickness, at the
    cost of one distance transform.
    """
    from scipy.ndimage import distance_transform_edt, maximum_filter

    if not mask.any():
        return float("nan")
    dt = distance_transform_edt(mask).astype(np.float32)
    ridge = mask & (dt >= maximum_filter(dt, size=3))
    return float((2.0 * dt[ridge].mean(dtype=np.float64) - 0.5) * voxel_mm)


def trabecular_morphometrics(bone: np.ndarray, compartment: np.ndarray, voxel_mm: float,
                             border_mm: float = 0.6) -> dict:
    """Tb.Th, Tb.Sp, Tb.N and local BV/TV of a 3D box of trabecular bone.

    Ridge voxels closer than ``border_mm`` to the box's sides are ignored (the distance
    transform cannot see structures outside the box).
    """
    out = {"tb_th_mm": float("nan"), "tb_sp_mm": float("nan"), "tb_n_per_mm": float("nan"),
           "box_bv_tv": float("nan")}
    if bone.size == 0 or not compartment.any():
        return out
    b = round(border_mm / voxel_mm)
    interior = np.zeros(bone.shape, bool)
    core = tuple(slice(min(b, s // 4), max(s - b, s - s // 4)) if s > 8 else slice(None)
                 for s in bone.shape)
    interior[core] = True
    interior &= compartment
    marrow = compartment & ~bone
    out["tb_th_mm"] = ridge_thickness_mm(bone, voxel_mm, interior)
    out["tb_sp_mm"] = ridge_thickness_mm(marrow, voxel_mm, interior)
    if np.isfinite(out["tb_th_mm"]) and np.isfinite(out["tb_sp_mm"]):
        out["tb_n_per_mm"] = 1.0 / (out["tb_th_mm"] + out["tb_sp_mm"])
    out["box_bv_tv"] = float(bone[compartment].mean())
    return out


def _nanmean(values) -> float:
    arr = np.array([v for v in values if v is not None], float)
    return float(np.nanmean(arr)) if arr.size and np.isfinite(arr).any() else float("nan")


def assemble_truth(params: PhantomParams, seed: int, results: list[dict], tb_bone: np.ndarray,
                   tb_comp: np.ndarray, renderer, calibration: Calibration) -> dict:
    """Collect per-slice statistics into the JSON-ready truth record."""
    from HRpQCTPhantom.generator import TISSUES

    vox = params.voxel_mm
    px_mm2 = vox * vox
    n = max(1, len(results))
    region_count = sum(r["region_count"] for r in results if "region_count" in r)
    region_sum = sum(r["region_hu_sum"] for r in results if "region_hu_sum" in r)
    t_count = sum(r["tissue_count"] for r in results if "tissue_count" in r)
    t_clean = sum(r["tissue_clean_sum"] for r in results if "tissue_clean_sum" in r)
    t_noisy = sum(r["tissue_noisy_sum"] for r in results if "tissue_noisy_sum" in r)
    t_sq = sum(r["tissue_noisy_sq"] for r in results if "tissue_noisy_sq" in r)

    def region_hu(key: str) -> float:
        lab = region_by_name(key).label
        c = region_count[lab] if np.ndim(region_count) else 0
        return float(region_sum[lab] / c) if c else float("nan")

    def bmd(hu_values: list[tuple[float, int]]) -> float:
        tot = sum(c for _, c in hu_values)
        if not tot:
            return float("nan")
        mean_hu = sum(h * c for h, c in hu_values if c) / tot
        return float(calibration.hu_to_density(np.float32(mean_hu)))

    def count(key: str) -> int:
        lab = region_by_name(key).label
        return int(region_count[lab]) if np.ndim(region_count) else 0

    morph: dict = {}
    for bone, cort_key, trab_key in (("tibia", "tibial_cortical", "tibial_trabecular"),
                                     ("fibula", "fibular_cortical", "fibular_trabecular")):
        st = [r["bones"][bone] for r in results if "bones" in r]
        cortex = sum(s["cortex_px"] for s in st)
        pores = sum(s["pore_px"] for s in st)
        comp = sum(s["compartment_px"] for s in st)
        bone_px = sum(s["bone_px"] for s in st)
        c_hu, t_hu = region_hu(cort_key), region_hu(trab_key)
        c_n, t_n = count(cort_key), count(trab_key)
        m = {
            "tt_ar_mm2": (cortex + comp) * px_mm2 / n,
            "ct_ar_mm2": cortex * px_mm2 / n,
            "tb_ar_mm2": comp * px_mm2 / n,
            "ct_th_mm": _nanmean([s.get("ct_th_mm") for s in st]),
            "ct_po": pores / cortex if cortex else float("nan"),
            "bv_tv": bone_px / comp if comp else float("nan"),
            "ct_bmd_mg_cm3": bmd([(c_hu, c_n)]) if c_n else float("nan"),
            "tb_bmd_mg_cm3": bmd([(t_hu, t_n)]) if t_n else float("nan"),
            "tt_bmd_mg_cm3": bmd([(c_hu, c_n), (t_hu, t_n)]) if c_n + t_n else float("nan"),
            "ct_mean_hu": c_hu,
            "tb_mean_hu": t_hu,
        }
        if bone == "tibia":
            nz = tb_bone.shape[0]
            zs = slice(max(0, nz // 2 - 32), max(0, nz // 2 - 32) + 64)
            m.update(trabecular_morphometrics(tb_bone[zs], tb_comp[zs], vox))
        morph[bone] = m
    idx = {t: i for i, t in enumerate(TISSUES)}
    fat = t_count[idx["fat"]] + t_count[idx["intramuscular_fat"]]
    lean = t_count[idx["muscle"]] + t_count[idx["tendon"]]
    belly = t_count[idx["muscle"]] + t_count[idx["intramuscular_fat"]]
    morph["soft_tissue"] = {
        "fat_fraction": float(fat / (fat + lean)) if fat + lean else float("nan"),
        "intramuscular_fat_fraction": (float(t_count[idx["intramuscular_fat"]] / belly)
                                       if belly else float("nan")),
        "tendon_area_mm2": float(t_count[idx["tendon"]] * px_mm2 / n),
        "muscle_area_mm2": float(t_count[idx["muscle"]] * px_mm2 / n),
        "adipose_area_mm2": float(fat * px_mm2 / n),
        "skin_region_area_mm2": float(count("skin") * px_mm2 / n),
        "leg_area_mm2": float(sum(int(region_count[r.label]) for r in _regions())
                              * px_mm2 / n) if np.ndim(region_count) else float("nan"),
        "myotendinous_mean_hu": region_hu("myotendinous"),
        "adipose_mean_hu": region_hu("adipose"),
        "skin_mean_hu": region_hu("skin"),
    }
    hu_by_tissue = {}
    for t, i in idx.items():
        c = int(t_count[i]) if np.ndim(t_count) else 0
        if not c:
            continue
        mean_noisy = t_noisy[i] / c
        hu_by_tissue[t] = {
            "voxels": c,
            "mean_hu_noise_free": float(t_clean[i] / c),
            "mean_hu": float(mean_noisy),
            "sd_hu": float(np.sqrt(max(0.0, t_sq[i] / c - mean_noisy**2))),
        }
    mid = renderer.anatomy.geometry(params.n_slices // 2)
    leg_pts = mid.leg.points(4)
    extent = leg_pts.max(0) - leg_pts.min(0)
    achilles = [e for name, e in mid.tendons if name == "achilles"]
    return {
        "generator": "HRpQCTPhantom",
        "synthetic": True,
        "seed": seed,
        "params": params.to_dict(),
        "morphometrics": _clean(morph),
        "hu_by_tissue": _clean(hu_by_tissue),
        "anatomy_mid_slice": _clean({
            "leg_width_ml_mm": float(extent[0]), "leg_depth_ap_mm": float(extent[1]),
            "achilles_area_mm2": achilles[0].area_mm2 if achilles else float("nan"),
            "fibula_center_uv_mm": list(mid.fibula_outer.center),
        }),
        "motion": {"grade": renderer.motion.grade,
                   "rotation_deg": float(np.degrees(renderer.motion.angle_rad)),
                   "corrupted_fraction": renderer.motion.fraction},
        "definitions": {
            "frame": "labels from HRpQCTCore.regions; trabecular label = whole marrow "
                     "space inside the endocortical boundary; cortical label includes pores",
            "skin": f"soft tissue within {params.skin_width_mm} mm of the leg surface",
            "thickness": "mean local thickness (inscribed spheres on the EDT ridge, "
                         "2r - 0.5 voxel)",
            "tb_n": "1 / (Tb.Th + Tb.Sp)",
            "bmd": "noise-free blurred HU -> mg HA/cm3 with the default XtremeCT II "
                   "calibration",
            "areas": "mean per slice",
        },
    }


def _regions():
    from HRpQCTCore.regions import REGIONS

    return REGIONS


def _clean(obj):
    """Make a structure JSON-safe (numpy scalars -> Python, NaN -> None)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
