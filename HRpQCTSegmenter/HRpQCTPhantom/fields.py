"""Gaussian random fields: the raw material of trabeculae, pores, fat marbling and noise.

All fields are float32, zero mean and unit standard deviation, made by filtering white noise
in Fourier space (so they are periodic over their box, which nothing downstream notices).

3D fields that are elongated along z (trabecular plates, Haversian canals) are sampled on a
coarse z grid and interpolated linearly per slice (:class:`ZField`): a field whose
correlation along z spans tens of slices loses almost nothing, and the FFT shrinks by the
same factor.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "gaussian_field",
    "ZField",
    "NoiseBank",
    "crossfade_texture",
]


def _filter_amplitude(freqs: list[np.ndarray], wavelength_mm: float, kind: str,
                      bandwidth: float, anisotropy_z: float) -> np.ndarray:
    """Amplitude filter |H(k)| on an FFT grid (frequencies in cycles/mm, z first if 3D)."""
    if len(freqs) == 3:
        fz, fy, fx = freqs
        k2 = (fz * anisotropy_z) ** 2 + fy**2 + fx**2
    else:
        fy, fx = freqs
        k2 = fy**2 + fx**2
    k = np.sqrt(k2, dtype=np.float32)
    k0 = np.float32(1.0 / wavelength_mm)
    if kind == "bandpass":
        amp = np.exp(-0.5 * ((k - k0) / np.float32(bandwidth * k0)) ** 2)
    elif kind == "lowpass":
        amp = np.exp(-0.5 * (k / k0) ** 2)
    else:
        raise ValueError(f"Unknown field kind {kind!r}: use 'bandpass' or 'lowpass'")
    return amp.astype(np.float32, copy=False)


def gaussian_field(shape: tuple[int, ...], spacing_mm: tuple[float, ...], wavelength_mm: float,
                   rng: np.random.Generator, *, kind: str = "bandpass", bandwidth: float = 0.35,
                   anisotropy_z: float = 1.0, workers: int = 2) -> np.ndarray:
    """A stationary Gaussian random field, float32, zero mean, unit SD.

    Parameters
    ----------
    shape, spacing_mm:
        Box size in samples and sample spacing per axis (2D ``(y, x)`` or 3D ``(z, y, x)``).
    wavelength_mm:
        ``bandpass``: the dominant wavelength (spectral peak at 1 / wavelength);
        ``lowpass``: the Gaussian spectrum's width (1/e^0.5 point at 1 / wavelength).
    bandwidth:
        Relative width of the band-pass shell.
    anisotropy_z:
        > 1 stretches structures along z by that factor (3D only).
    """
    import scipy.fft

    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = scipy.fft.rfftn(white, workers=workers)
    del white
    freqs = []
    for axis, (n, d) in enumerate(zip(shape, spacing_mm, strict=True)):
        f = (np.fft.rfftfreq(n, d) if axis == len(shape) - 1 else np.fft.fftfreq(n, d))
        view = [1] * len(shape)
        view[axis] = f.size
        freqs.append(f.astype(np.float32).reshape(view))
    spectrum *= _filter_amplitude(freqs, wavelength_mm, kind, bandwidth, anisotropy_z)
    spectrum.flat[0] = 0.0  # zero mean
    field = scipy.fft.irfftn(spectrum, s=shape, workers=workers).astype(np.float32, copy=False)
    del spectrum
    sd = float(field.std(dtype=np.float64))
    field *= np.float32(1.0 / sd if sd > 0 else 1.0)
    return field


class ZField:
    """A 3D field over a pixel box, stored on a coarse z grid and interpolated per slice.

    Parameters
    ----------
    n_slices:
        Slices of the scan the field must cover.
    box:
        ``(row0, row1, col0, col1)`` pixel box of the scan the field covers.
    voxel_mm:
        In-plane and slice spacing.
    wavelength_mm, kind, bandwidth, anisotropy_z:
        As :func:`gaussian_field` (in-plane wavelength; z structures are ``anisotropy_z``
        times longer).
    """

    def __init__(self, n_slices: int, box: tuple[int, int, int, int], voxel_mm: float,
                 wavelength_mm: float, rng: np.random.Generator, *, kind: str = "bandpass",
                 bandwidth: float = 0.35, anisotropy_z: float = 1.0) -> None:
        self.box = box
        z_corr_mm = wavelength_mm * anisotropy_z
        # ~10 samples per z wavelength keep linear interpolation within a few per cent.
        self.step = max(1, int(z_corr_mm / (10.0 * voxel_mm)))
        n_knots = (n_slices - 1) // self.step + 2
        ny, nx = box[1] - box[0], box[3] - box[2]
        self.data = gaussian_field(
            (n_knots, max(ny, 1), max(nx, 1)), (self.step * voxel_mm, voxel_mm, voxel_mm),
            wavelength_mm, rng, kind=kind, bandwidth=bandwidth, anisotropy_z=anisotropy_z)
        # Correlation of neighbouring knots, to keep interpolated slices at unit variance.
        a, b = self.data[:-1], self.data[1:]
        self.rho = float(np.einsum("ijk,ijk->", a, b, dtype=np.float64) / a.size)

    def at(self, z: int, box: tuple[int, int, int, int]) -> np.ndarray:
        """Field values at slice ``z`` over ``box`` (which must lie inside the field's box)."""
        r0, r1, c0, c1 = (box[0] - self.box[0], box[1] - self.box[0],
                          box[2] - self.box[2], box[3] - self.box[2])
        k, rem = divmod(z, self.step)
        w = np.float32(rem / self.step)
        a = self.data[k, r0:r1, c0:c1]
        if w == 0:
            return a.copy()
        b = self.data[k + 1, r0:r1, c0:c1]
        out = a * (np.float32(1) - w)
        out += b * w
        # Linear blending of two independent-ish samples lowers the variance mid-way;
        # restore unit variance so thresholds mean the same in every slice.
        out *= np.float32(1.0 / np.sqrt((1 - w) ** 2 + w**2 + 2 * w * (1 - w) * self.rho))
        return out


def crossfade_texture(tex_a: np.ndarray, tex_b: np.ndarray, phase: float) -> np.ndarray:
    """``cos(phase) * a + sin(phase) * b``: a field that changes smoothly with ``phase``.

    Two independent unit fields combined this way stay a unit-variance Gaussian field for every
    phase, so a slowly increasing phase gives a pattern that evolves smoothly along z.
    """
    out = tex_a * np.float32(np.cos(phase))
    out += tex_b * np.float32(np.sin(phase))
    return out


class NoiseBank:
    """Correlated unit noise for whole slices: a few periodic textures, randomly shifted.

    Drawing fresh filtered white noise for every 1600 x 1600 slice costs more than the rest of
    the slice; a shifted, flipped or transposed copy of one of ``n_textures`` periodic
    textures has the same statistics and is for practical purposes independent between slices.
    """

    def __init__(self, size_px: int, corr_sigma_px: float, rng: np.random.Generator,
                 n_textures: int = 3) -> None:
        self.size = int(size_px)
        self.textures = []
        for _ in range(n_textures):
            # A Gaussian low-pass with sigma s (pixels) in space is exp(-2 pi^2 s^2 f^2).
            wavelength = 1.0 / (2 * np.pi * max(corr_sigma_px, 1e-3))
            tex = gaussian_field((self.size, self.size), (1.0, 1.0), wavelength, rng,
                                 kind="lowpass")
            self.textures.append(tex)

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """A unit-SD noise image of ``shape`` (at most the bank's size per axis)."""
        tex = self.textures[int(rng.integers(len(self.textures)))]
        if rng.integers(2):
            tex = tex.T
        dy, dx = (int(v) for v in rng.integers(0, self.size, 2))
        rolled = np.roll(tex, (dy, dx), axis=(0, 1))
        if rng.integers(2):
            rolled = rolled[::-1]
        if rng.integers(2):
            rolled = rolled[:, ::-1]
        return rolled[: shape[0], : shape[1]]
