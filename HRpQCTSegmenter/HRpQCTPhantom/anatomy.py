"""The leg's 2D anatomy, slice by slice, in an anatomical frame.

Frame: ``u`` points lateral, ``v`` anterior, in mm, origin at the tibia's centre in the middle
slice. Every structure is a star-shaped outline ``r(theta)`` around its own centre, sampled
at :data:`N_THETA` angles (a lookup table), or an ellipse (tendons). A pixel's signed distance
to an outline is ``(r(theta) - rho) * cos(psi)``, where ``psi`` is the angle between the
outline's normal and the radial direction: exact on circles, first-order elsewhere, and far
cheaper than a distance transform of a 1600 x 1600 slice.

Slow change along the stack: each shape parameter is a smooth function of the slice height
(a trend plus a few long-wavelength cosines), so outlines move and deform gradually, as in a
real 10 mm stack (the distal end is wider with a thinner cortex).

Layout at the standard distal-tibia site (cf. anatomy atlases): tibia rounded-triangular with
the fibular notch facing posterolateral; fibula posterolateral across a 1-5 mm gap; tibialis
anterior, extensor hallucis and digitorum longus in front; tibialis posterior and flexor
digitorum longus tendons behind the medial tibia, the flexor hallucis longus belly behind the
tibia; peroneus brevis (belly) and longus (tendon) behind the fibula; the Achilles tendon far
posterior with Kager's fat pad in front of it; subcutaneous fat all round under the skin.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from HRpQCTPhantom.params import PhantomParams

__all__ = ["N_THETA", "Outline", "Ellipse", "SliceGeometry", "Anatomy", "PixelMap"]

N_THETA = 4096
_THETA = np.linspace(-np.pi, np.pi, N_THETA, endpoint=False)
_DTHETA = 2 * np.pi / N_THETA


def _wrap(angle: np.ndarray | float) -> np.ndarray | float:
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


@dataclass
class Outline:
    """A star-shaped closed curve: centre ``(u, v)`` mm and radius ``r`` (mm) per angle."""

    center: tuple[float, float]
    r: np.ndarray  # float64, N_THETA

    def __post_init__(self) -> None:
        dr = (np.roll(self.r, -1) - np.roll(self.r, 1)) / (2 * _DTHETA)
        self.normal_factor = 1.0 / np.sqrt(1.0 + (dr / self.r) ** 2)
        self.r_lut = self.r.astype(np.float32)
        self.fac_lut = self.normal_factor.astype(np.float32)

    @property
    def area_mm2(self) -> float:
        return float(0.5 * np.sum(self.r**2) * _DTHETA)

    def points(self, step: int = 16) -> np.ndarray:
        """Boundary points ``(n, 2)`` in (u, v) mm."""
        t, r = _THETA[::step], self.r[::step]
        return np.stack([self.center[0] + r * np.cos(t), self.center[1] + r * np.sin(t)], 1)

    def radius_at(self, theta: float) -> float:
        return float(np.interp(_wrap(theta), _THETA, self.r, period=2 * np.pi))

    def signed_distance(self, du: np.ndarray, dv: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance (mm, > 0 inside) of offsets ``du, dv`` from the centre; also the
        lookup index of each pixel's angle (reused by outlines sharing this centre)."""
        rho = np.hypot(du, dv)
        idx = angle_index(du, dv)
        d = self.r_lut[idx]
        d -= rho
        d *= self.fac_lut[idx]
        return d, idx

    def distance_from_index(self, rho: np.ndarray, idx: np.ndarray) -> np.ndarray:
        d = self.r_lut[idx]
        d -= rho
        d *= self.fac_lut[idx]
        return d


def angle_index(du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Index into the :data:`N_THETA` angle table of each pixel's polar angle."""
    theta = np.arctan2(dv, du)
    theta += np.float32(np.pi)
    theta *= np.float32(N_THETA / (2 * np.pi))
    idx = theta.astype(np.int32)
    idx &= N_THETA - 1
    return idx


@dataclass
class Ellipse:
    """An ellipse: centre (u, v) mm, semi-axes (mm), orientation of the first axis (rad)."""

    center: tuple[float, float]
    semi_axes: tuple[float, float]
    angle: float

    def points(self, n: int = 64) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        a, b = self.semi_axes
        c, s = math.cos(self.angle), math.sin(self.angle)
        x, y = a * np.cos(t), b * np.sin(t)
        return np.stack([self.center[0] + c * x - s * y, self.center[1] + s * x + c * y], 1)

    def inside(self, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
        c, s = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
        a, b = self.semi_axes
        x = (c * du + s * dv) * np.float32(1.0 / a)
        y = (c * dv - s * du) * np.float32(1.0 / b)
        x *= x
        y *= y
        x += y
        return x <= 1.0

    @property
    def area_mm2(self) -> float:
        return math.pi * self.semi_axes[0] * self.semi_axes[1]


@dataclass
class SliceGeometry:
    """All outlines of one slice, in the anatomical frame (mm)."""

    z: int
    leg: Outline
    dermis_mm: np.ndarray  # per angle of the leg outline, float32
    tibia_outer: Outline
    tibia_inner: Outline
    fibula_outer: Outline
    fibula_inner: Outline
    muscles: list[tuple[str, Outline]]
    tendons: list[tuple[str, Ellipse]]
    cast: Ellipse | None
    tibia_bv_tv: float
    fibula_bv_tv: float
    extra: dict = field(default_factory=dict)


def _smooth_series(rng: np.random.Generator, sd: float, wavelengths_mm=(6.0, 25.0),
                   n_terms: int = 3):
    """A random smooth function of height (mm) with standard deviation ~``sd``."""
    lam = rng.uniform(*wavelengths_mm, n_terms)
    phase = rng.uniform(0, 2 * np.pi, n_terms)
    amp = sd * math.sqrt(2.0 / n_terms)

    def f(z_mm: float) -> float:
        return float(amp * np.sum(np.cos(2 * np.pi * z_mm / lam + phase)))

    return f


def _harmonic_radius(terms: list[tuple[int, float, float]],
                     notches: tuple[tuple[float, float, float], ...] = ()) -> np.ndarray:
    r = np.ones(N_THETA)
    for k, amp, phase in terms:
        r += amp * np.cos(k * (_THETA - phase))
    for theta0, depth, width in notches:
        r -= depth * np.exp(-0.5 * (_wrap(_THETA - theta0) / width) ** 2)
    return r


def _scale_to_area(r_unit: np.ndarray, area_mm2: float) -> np.ndarray:
    return r_unit * math.sqrt(area_mm2 / (0.5 * np.sum(r_unit**2) * _DTHETA))


class _Bone:
    """Scan-level random shape of one bone; :meth:`outlines` gives a slice's two contours."""

    def __init__(self, rng: np.random.Generator, area_mm2: float, ct_th_mm: float,
                 terms: list[tuple[int, float, float]], notch, thick_side: float) -> None:
        self.area = area_mm2
        self.ct_th = ct_th_mm
        self.terms = terms
        self.notch = notch
        self.thick_side = thick_side
        self.area_wobble = _smooth_series(rng, 0.015)
        self.shape_wobble = [_smooth_series(rng, 0.12) for _ in terms]
        self.th_wobble = _smooth_series(rng, 0.04)
        # Endocortical irregularity: the transition zone where cortex dissolves into trabeculae.
        ks = np.arange(4, 40)
        self.irr_k = ks
        self.irr_amp = rng.normal(0, 1, ks.size) / np.sqrt(ks.size) * 0.4 / np.sqrt(ks / 4)
        self.irr_phase = rng.uniform(0, 2 * np.pi, ks.size)
        self.irr_drift = rng.normal(0, 0.25, ks.size)  # rad per mm of height

    def outlines(self, center: tuple[float, float], z_mm: float, zc_mm: float
                 ) -> tuple[Outline, Outline]:
        # Distal end wider (~1 %/mm) with a thinner cortex (~2 %/mm), as up the metaphysis.
        area = self.area * (1.0 - 0.01 * zc_mm) * (1.0 + self.area_wobble(z_mm))
        terms = [(k, a * (1.0 + w(z_mm)), p) for (k, a, p), w in
                 zip(self.terms, self.shape_wobble, strict=True)]
        outer = Outline(center, _scale_to_area(_harmonic_radius(terms, self.notch), area))
        th = self.ct_th * (1.0 + 0.02 * zc_mm) * (1.0 + self.th_wobble(z_mm))
        profile = 1.0 + 0.22 * np.cos(_THETA - self.thick_side)
        irr = np.zeros(N_THETA)
        for k, a, p, d in zip(self.irr_k, self.irr_amp, self.irr_phase, self.irr_drift,
                              strict=True):
            irr += a * np.cos(k * _THETA + p + d * z_mm)
        thickness = th * np.clip(profile + irr, 0.3, None)
        radial = thickness / outer.normal_factor
        inner_r = np.maximum(outer.r - radial, 0.25 * outer.r)
        return outer, Outline(center, inner_r)


class Anatomy:
    """A subject's leg: scan-level random draws; :meth:`geometry` gives one slice's outlines."""

    def __init__(self, params: PhantomParams, rng: np.random.Generator) -> None:
        p = self.params = params
        self.length_mm = params.n_slices * params.voxel_mm
        deg = math.radians
        self.tibia = _Bone(
            rng, p.tibia_area_mm2, p.tibia_ct_th_mm,
            terms=[(2, rng.normal(0.06, 0.015), rng.normal(0.0, 0.15)),
                   (3, rng.normal(0.055, 0.012), deg(rng.normal(60, 8))),
                   (4, abs(rng.normal(0.0, 0.012)), rng.uniform(0, np.pi / 2))],
            notch=((deg(rng.normal(-30, 6)), rng.uniform(0.05, 0.09), rng.uniform(0.3, 0.45)),),
            thick_side=deg(rng.normal(-120, 25)))
        self.fibula_direction = deg(rng.normal(-32, 6))
        self.fibula = _Bone(
            rng, p.fibula_area_mm2, p.fibula_ct_th_mm,
            terms=[(2, rng.normal(0.09, 0.02), rng.uniform(0, np.pi)),
                   (3, rng.normal(0.05, 0.015), rng.uniform(0, 2 * np.pi / 3))],
            notch=(), thick_side=rng.uniform(-np.pi, np.pi))
        self.bv_tv_wobble = _smooth_series(rng, 0.05)
        self.fib_bv_tv_wobble = _smooth_series(rng, 0.05)
        # Soft-tissue layout: jitter each structure once per subject.
        self.jitter = {name: rng.normal(0, 1, 4) for name in (
            "tib_ant", "ehl", "edl", "edl_m", "tib_post", "fdl", "fhl_m", "fhl", "per_brev_m",
            "per_long", "per_brev", "achilles", "soleus_m")}
        self.soft_wobble = _smooth_series(rng, 0.04)
        self.dermis_phase = rng.uniform(0, 2 * np.pi)
        self.cast_gap_mm = rng.uniform(1.5, 4.0)
        self.cast_arc = (rng.uniform(-np.pi, np.pi), rng.uniform(0.75, 1.0) * 2 * np.pi)

    # --- one slice ----------------------------------------------------------------------
    def geometry(self, z: int) -> SliceGeometry:
        p = self.params
        z_mm = z * p.voxel_mm
        zc = z_mm - self.length_mm / 2
        tib_out, tib_in = self.tibia.outlines((0.0, 0.0), z_mm, zc)
        fib_center = self._fibula_center(tib_out, z_mm, zc)
        fib_out, fib_in = self.fibula.outlines(fib_center, z_mm, zc)
        muscles, tendons = self._soft_tissue(tib_out, fib_out, z_mm)
        leg = self._leg_outline(tib_out, fib_out, muscles, tendons)
        dermis = (p.dermis_mm * (1.0 + 0.1 * np.cos(2 * _THETA + self.dermis_phase))
                  ).astype(np.float32)
        cast = None
        if p.cast:
            pts = leg.points(8)
            half = (pts.max(0) - pts.min(0)) / 2 + self.cast_gap_mm
            mid = (pts.max(0) + pts.min(0)) / 2
            cast = Ellipse((float(mid[0]), float(mid[1])), (float(half[0]), float(half[1])), 0.0)
        bv_tv = float(np.clip(p.tibia_bv_tv * (1.0 + 0.01 * zc + self.bv_tv_wobble(z_mm)),
                              0.02, 0.7))
        fib_bv_tv = float(np.clip(p.fibula_bv_tv * (1.0 + self.fib_bv_tv_wobble(z_mm)),
                                  0.02, 0.7))
        return SliceGeometry(z, leg, dermis, tib_out, tib_in, fib_out, fib_in, muscles, tendons,
                             cast, bv_tv, fib_bv_tv)

    def _fibula_center(self, tib_out: Outline, z_mm: float, zc: float) -> tuple[float, float]:
        p = self.params
        th = self.fibula_direction + 0.01 * zc
        r_fib = math.sqrt(p.fibula_area_mm2 / math.pi)
        dist = tib_out.radius_at(th) + p.fibula_gap_mm + r_fib
        # Push outward until the narrowest gap is the requested one (outlines are not circles).
        fib_unit = _scale_to_area(_harmonic_radius(self.fibula.terms), p.fibula_area_mm2)
        tib_pts = tib_out.points(8)
        for _ in range(3):
            c = (dist * math.cos(th), dist * math.sin(th))
            t = _THETA[::8]
            fib_pts = np.stack([c[0] + fib_unit[::8] * np.cos(t),
                                c[1] + fib_unit[::8] * np.sin(t)], 1)
            near = tib_pts[np.hypot(tib_pts[:, 0] - c[0], tib_pts[:, 1] - c[1]) < 3 * r_fib + 8]
            gap = np.min(np.hypot(near[:, None, 0] - fib_pts[None, :, 0],
                                  near[:, None, 1] - fib_pts[None, :, 1]))
            dist += (p.fibula_gap_mm - gap) * 1.05
        return (dist * math.cos(th), dist * math.sin(th))

    def _near_surface(self, bone: Outline, angle_deg: float, offset_mm: float,
                      size_mm: float, jitter: np.ndarray) -> tuple[float, float]:
        th = math.radians(angle_deg + 6 * jitter[0])
        d = bone.radius_at(th) + offset_mm + size_mm
        return (bone.center[0] + d * math.cos(th), bone.center[1] + d * math.sin(th))

    def _soft_tissue(self, tib: Outline, fib: Outline, z_mm: float):
        p = self.params
        ts, ms, ls = p.tendon_scale, p.muscle_scale, p.leg_scale
        w = 1.0 + self.soft_wobble(z_mm)
        j = self.jitter

        def size(base: tuple[float, float], scale: float, key: str) -> tuple[float, float]:
            jj = j[key]
            return (base[0] * scale * w * (1 + 0.1 * jj[1]), base[1] * scale * (1 + 0.1 * jj[2]))

        tendons: list[tuple[str, Ellipse]] = []
        muscles: list[tuple[str, Outline]] = []

        def tendon(name, bone, ang, off, base, rot_deg):
            ax = size(base, ts, name)
            c = self._near_surface(bone, ang, off, ax[1], j[name])
            tendons.append((name, Ellipse(c, ax, math.radians(rot_deg + 8 * j[name][3]))))

        def muscle(name, bone, ang, off, base, rot_deg):
            ax = size(base, ms, name)
            c = self._near_surface(bone, ang, off, ax[1], j[name])
            rot = math.radians(rot_deg + 8 * j[name][3])
            t = _THETA - rot
            r_ell = ax[0] * ax[1] / np.sqrt((ax[1] * np.cos(t)) ** 2 + (ax[0] * np.sin(t)) ** 2)
            lobes = 1 + 0.06 * np.cos(3 * _THETA + j[name][0]) + 0.04 * np.cos(5 * _THETA)
            muscles.append((name, Outline(c, r_ell * lobes)))

        # Anterior compartment.
        muscle("edl_m", tib, 48, 2.5, (6.0, 4.0), 35)
        tendon("tib_ant", tib, 100, 1.2, (3.2, 2.3), 10)
        tendon("ehl", tib, 76, 2.0, (2.0, 1.5), 0)
        tendon("edl", tib, 55, 3.0, (2.3, 1.5), 40)
        # Deep posterior compartment.
        tendon("tib_post", tib, -135, 0.8, (3.0, 2.2), -40)
        tendon("fdl", tib, -115, 3.0, (2.4, 1.8), -20)
        muscle("fhl_m", tib, -80, 3.0, (8.0, 5.5), 5)
        tendon("fhl", tib, -82, 7.0, (2.2, 1.6), 0)
        # Lateral compartment, behind the fibula.
        muscle("per_brev_m", fib, -95, 1.0, (5.5, 3.5), -10)
        tendon("per_brev", fib, -60, 1.0, (2.4, 1.6), -40)
        tendon("per_long", fib, -105, 7.0, (2.8, 2.0), 0)
        # Achilles tendon with Kager's fat pad in front of it, soleus remnant on it.
        post = tib.radius_at(-np.pi / 2)
        ax = size((7.5, 3.0), ts, "achilles")
        c = (2.0 + 2 * j["achilles"][0], -(post + 19.0 * ls + ax[1]))
        tendons.append(("achilles", Ellipse(c, ax, math.radians(4 * j["achilles"][3]))))
        sax = size((8.0, 2.2), ms, "soleus_m")
        sc = (c[0] - 1.0, c[1] + ax[1] + sax[1] - 0.8)
        t = _THETA
        r_ell = sax[0] * sax[1] / np.sqrt((sax[1] * np.cos(t)) ** 2 + (sax[0] * np.sin(t)) ** 2)
        muscles.append(("soleus_m", Outline(sc, r_ell)))
        return muscles, tendons

    def _leg_outline(self, tib: Outline, fib: Outline, muscles, tendons) -> Outline:
        from scipy.ndimage import gaussian_filter1d
        from scipy.spatial import ConvexHull

        p = self.params
        cover = p.subcutaneous_fat_mm + p.skin_width_mm
        groups = [_offset_points(tib, 0.7 * cover + 0.8), _offset_points(fib, cover)]
        for _, m in muscles:
            groups.append(_offset_points(m, cover))
        for _, t in tendons:
            pts = t.points(48)
            c = np.asarray(t.center)
            v = pts - c
            n = v / np.linalg.norm(v, axis=1, keepdims=True)
            groups.append(pts + n * cover)
        pts = np.concatenate(groups)
        hull = pts[ConvexHull(pts).vertices]
        lo, hi = hull.min(0), hull.max(0)
        center = (float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2))
        # Densify the hull edges, then read its radius per angle.
        closed = np.concatenate([hull, hull[:1]])
        dense = np.concatenate([np.linspace(a, b, 40, endpoint=False)
                                for a, b in itertools.pairwise(closed)])
        ang = np.arctan2(dense[:, 1] - center[1], dense[:, 0] - center[0])
        rad = np.hypot(dense[:, 0] - center[0], dense[:, 1] - center[1])
        order = np.argsort(ang)
        r = np.interp(_THETA, ang[order], rad[order], period=2 * np.pi)
        # Skin is taut but not polygonal: round the hull's corners broadly, then make sure
        # the rounded outline still covers every structure, and soften that once more.
        hull_r = r
        r = np.maximum(gaussian_filter1d(hull_r, sigma=N_THETA / 30, mode="wrap"), hull_r)
        r = np.maximum(gaussian_filter1d(r, sigma=N_THETA / 60, mode="wrap"), hull_r)
        r = gaussian_filter1d(r, sigma=N_THETA / 120, mode="wrap") + 0.3
        return Outline(center, r)


def _offset_points(outline: Outline, dist_mm: float) -> np.ndarray:
    t = _THETA[::16]
    r = outline.r[::16] + dist_mm / outline.normal_factor[::16]
    return np.stack([outline.center[0] + r * np.cos(t), outline.center[1] + r * np.sin(t)], 1)


class PixelMap:
    """The pose: maps pixel indices of slice ``z`` to anatomical (u, v) mm and back.

    Image axes: column index -> patient left (x), row index -> posterior (y), as LPS with an
    identity direction. A right leg has its lateral side towards image left.
    """

    def __init__(self, params: PhantomParams, anatomy: Anatomy, rng: np.random.Generator
                 ) -> None:
        p = params
        self.vox = p.voxel_mm
        self.n = p.field_px
        self.mirror = -1.0 if p.side == "right" else 1.0
        phi = math.radians(p.rotation_deg)
        self.c, self.s = math.cos(phi), math.sin(phi)
        self.tilt = math.tan(math.radians(p.tilt_deg))
        self.tilt_dir = rng.uniform(0, 2 * np.pi)
        self.length_mm = anatomy.length_mm
        if p.field_center == "leg":
            mid = anatomy.geometry(p.n_slices // 2).leg.center
        else:
            mid = (0.0, 0.0)
        x, y = self._rotate_mirror(*mid)
        self.t = (-x + p.translation_mm[0], -y + p.translation_mm[1])

    def _rotate_mirror(self, u: float, v: float) -> tuple[float, float]:
        xm, ym = self.mirror * u, -v
        return (self.c * xm - self.s * ym, self.s * xm + self.c * ym)

    def _shift(self, z: int) -> tuple[float, float]:
        dz = z * self.vox - self.length_mm / 2
        return (self.t[0] + self.tilt * dz * math.cos(self.tilt_dir),
                self.t[1] + self.tilt * dz * math.sin(self.tilt_dir))

    def uv_to_pixel(self, uv: np.ndarray, z: int) -> np.ndarray:
        """(n, 2) anatomical points -> (n, 2) (row, col) float pixel coordinates."""
        xm, ym = self.mirror * uv[:, 0], -uv[:, 1]
        sx, sy = self._shift(z)
        x = self.c * xm - self.s * ym + sx
        y = self.s * xm + self.c * ym + sy
        half = (self.n - 1) / 2
        return np.stack([y / self.vox + half, x / self.vox + half], 1)

    def box_of(self, uv: np.ndarray, z: int, margin_px: int = 3) -> tuple[int, int, int, int]:
        """Pixel box ``(row0, row1, col0, col1)`` containing points ``uv``, clipped."""
        rc = self.uv_to_pixel(uv, z)
        r0 = int(max(0, math.floor(rc[:, 0].min()) - margin_px))
        r1 = int(min(self.n, math.ceil(rc[:, 0].max()) + margin_px + 1))
        c0 = int(max(0, math.floor(rc[:, 1].min()) - margin_px))
        c1 = int(min(self.n, math.ceil(rc[:, 1].max()) + margin_px + 1))
        return (r0, max(r0, r1), c0, max(c0, c1))

    def uv_grids(self, z: int, box: tuple[int, int, int, int]
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Anatomical u and v (float32 mm) of every pixel in ``box``."""
        r0, r1, c0, c1 = box
        half = (self.n - 1) / 2
        sx, sy = self._shift(z)
        rows = ((np.arange(r0, r1) - half) * self.vox - sy)
        cols = ((np.arange(c0, c1) - half) * self.vox - sx)
        # Inverse rotation, then undo the mirror (u = mirror * xm, v = -ym).
        u = (self.mirror * (self.c * cols)).astype(np.float32)[None, :] + \
            (self.mirror * (self.s * rows)).astype(np.float32)[:, None]
        v = (self.s * cols).astype(np.float32)[None, :] - \
            (self.c * rows).astype(np.float32)[:, None]
        return u, v
