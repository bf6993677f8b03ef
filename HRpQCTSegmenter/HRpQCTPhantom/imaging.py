"""Image formation: partial-volume blur, motion artefacts (the noise lives in :mod:`.fields`).

Motion follows the published simulation: a contiguous block of projections (~11 % of them)
sees the leg moved (here an in-plane rotation about a point near the leg), the rest sees it
still. Filtered back-projection is linear, so the reconstruction is the still image plus the
back-projection of the *error* projections ``P(moved) - P(still)`` over the block's angles:
a faint ghost of every edge (the doubled cortex) and streaks along the block's directions.
The back-projection is done on a 4x coarser grid (streaks are smooth across their width);
the ghost itself is added at full resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from HRpQCTPhantom.params import MOTION_GRADES

__all__ = ["blur", "MotionModel"]


def blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian point-spread function, float32, edges padded by their nearest value."""
    if sigma_px <= 0.05:
        return image
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma_px, mode="nearest", truncate=3.0)


@dataclass
class MotionModel:
    """One scan's motion: rotation angle and centre, and the corrupted block of angles."""

    grade: int
    angle_rad: float
    fraction: float
    center_offset_px: tuple[float, float]
    block_start_rad: float
    n_angles: int = 12
    coarse: int = 4

    @classmethod
    def draw(cls, grade: int, rng: np.random.Generator, voxel_mm: float) -> MotionModel:
        angle_deg, fraction = MOTION_GRADES[int(grade)]
        sign = 1.0 if rng.integers(2) else -1.0
        jitter = float(rng.uniform(0.8, 1.2))
        offset_mm = rng.uniform(-25.0, 25.0, 2)
        return cls(
            grade=int(grade),
            angle_rad=sign * math.radians(angle_deg) * jitter,
            fraction=fraction,
            center_offset_px=(float(offset_mm[0] / voxel_mm), float(offset_mm[1] / voxel_mm)),
            block_start_rad=float(rng.uniform(0, np.pi)),
        )

    @property
    def active(self) -> bool:
        return self.grade > 1 and self.fraction > 0

    def artefact(self, clean: np.ndarray, background_hu: float) -> np.ndarray:
        """Additive artefact (float32, HU) for one noise-free slice ``clean``."""
        from scipy import ndimage

        h, w = clean.shape
        cy = (h - 1) / 2 + self.center_offset_px[0]
        cx = (w - 1) / 2 + self.center_offset_px[1]
        c, s = math.cos(self.angle_rad), math.sin(self.angle_rad)
        matrix = np.array([[c, -s], [s, c]])
        offset = np.array([cy, cx]) - matrix @ np.array([cy, cx])
        moved = ndimage.affine_transform(clean, matrix, offset=offset, order=1,
                                         mode="constant", cval=background_hu)
        diff = moved - clean
        del moved
        # Ghost: the block's share of the moved image, at full resolution.
        out = diff * np.float32(self.fraction)
        # Streaks: directional filtered back-projection of the error on a coarse grid, minus
        # its own isotropic (ghost-like) part, which the full-resolution ghost already holds.
        f = self.coarse
        hc, wc = h // f, w // f
        if hc < 8 or wc < 8:
            return out
        small = diff[: hc * f, : wc * f].reshape(hc, f, wc, f).mean(axis=(1, 3))
        n = max(hc, wc)
        pad = np.zeros((n, n), np.float32)
        pad[:hc, :wc] = small
        ramp = np.abs(np.fft.rfftfreq(2 * n)).astype(np.float32)
        span = np.pi * self.fraction * 2.0  # 360-degree scan: the block covers 2x its share
        angles = self.block_start_rad + np.linspace(0, span, self.n_angles, endpoint=False)
        streaks = np.zeros((n, n), np.float32)
        for a in angles:
            rot = ndimage.rotate(pad, -math.degrees(a), reshape=False, order=1)
            proj = rot.sum(axis=0)
            q = np.fft.irfft(np.fft.rfft(proj, 2 * n) * ramp, 2 * n)[:n].astype(np.float32)
            back = np.broadcast_to(q, (n, n))
            streaks += ndimage.rotate(back, math.degrees(a), reshape=False, order=1)
        # Each direction is measured twice in 360 degrees; the block corrupts one of the two.
        streaks *= np.float32(0.5 * span / self.n_angles)
        streaks -= small_pad_fraction(pad, self.fraction)
        up = np.repeat(np.repeat(streaks[:hc, :wc], f, 0), f, 1)
        up = ndimage.uniform_filter(up, f)
        out[: hc * f, : wc * f] += up
        return out


def small_pad_fraction(pad: np.ndarray, fraction: float) -> np.ndarray:
    """The isotropic part of a block back-projection (the ghost), on the coarse grid."""
    return pad * np.float32(fraction)
