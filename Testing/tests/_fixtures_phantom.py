"""Shared fixtures for the phantom tests: one small whole-leg phantom, one full-res patch."""

import pytest


@pytest.fixture(scope="session")
def small_phantom():
    """Whole leg at 0.2428 mm in a 400 x 400 field, 12 slices, default (normal) parameters."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    params = PhantomParams(fibula_gap_mm=1.5, cast=True, rotation_deg=12.0).small(400, 12)
    return generate_phantom(params, 11)


@pytest.fixture(scope="session")
def tibia_patch():
    """Full-resolution (60.7 um) 36 mm field around the whole tibia, 32 slices, noise-free."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    params = PhantomParams(field_px=600, n_slices=32, field_center="tibia", noise_sd_hu=0.0)
    return generate_phantom(params, 5)
