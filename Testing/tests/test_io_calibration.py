"""Calibration in scan.py against the formulas in hrpqct-facts.md, and unit round trips."""

import numpy as np
import pytest
from _fixtures_io import TEST_CALIBRATION, make_hu_volume

from HRpQCTCore.scan import Calibration, Units, from_hu, to_hu

MU_SCALING, MU_WATER = 8192.0, 0.2409
SLOPE, INTERCEPT = 1603.51904, -391.209015


def test_native_to_hu_matches_published_formula():
    cal = Calibration(MU_SCALING, MU_WATER, SLOPE, INTERCEPT)
    native = np.array([0, 1973, 4000, 9000], dtype=np.int16)
    expected = native.astype(np.float64) * 1000.0 / (MU_WATER * MU_SCALING) - 1000.0
    np.testing.assert_allclose(cal.native_to_hu(native), expected, rtol=1e-6, atol=1e-3)
    assert cal.native_to_hu(native)[0] == pytest.approx(-1000.0)  # air: native 0
    # water: mu = mu_water, native = mu_water * mu_scaling -> 0 HU
    water = cal.native_to_hu(np.array([MU_WATER * MU_SCALING]))
    assert float(water[0]) == pytest.approx(0, abs=1e-3)


def test_native_to_density_matches_published_formula():
    cal = Calibration(MU_SCALING, MU_WATER, SLOPE, INTERCEPT)
    native = np.array([0.0, 2000.0, 6000.0])
    expected = native * SLOPE / MU_SCALING + INTERCEPT
    np.testing.assert_allclose(cal.native_to_density(native), expected, rtol=1e-6, atol=1e-3)


def test_density_thresholds_map_near_the_quoted_hu():
    """Facts: trabecular 320 / cortical 450 mg HA/cm3 ~ 840 / 1170 HU; BMD ~ 0.39 HU - 4."""
    cal = Calibration(MU_SCALING, MU_WATER, SLOPE, INTERCEPT)
    hu = cal.density_to_hu(np.array([320.0, 450.0]))
    np.testing.assert_allclose(hu, [840, 1170], atol=25)
    bmd = cal.hu_to_density(np.array([0.0, 1000.0, 2000.0]))
    np.testing.assert_allclose(bmd, 0.39 * np.array([0.0, 1000.0, 2000.0]) - 4, atol=10)


def test_round_trip_native_hu_density_and_back():
    cal = TEST_CALIBRATION
    hu = make_hu_volume(shape=(2, 32, 32))
    native = cal.hu_to_native(hu)
    density = cal.native_to_density(native)
    np.testing.assert_allclose(cal.native_to_hu(native), hu, atol=0.02)
    np.testing.assert_allclose(cal.density_to_hu(density), hu, atol=0.05)
    np.testing.assert_allclose(cal.hu_to_density(hu), density, atol=0.02)
    np.testing.assert_allclose(cal.density_to_native(density), native, rtol=1e-5, atol=0.05)
    for units in Units:
        values = from_hu(hu, units, cal)
        assert values.dtype == np.float32
        np.testing.assert_allclose(to_hu(values, units, cal), hu, atol=0.05)


def test_to_hu_without_calibration_says_what_to_do():
    with pytest.raises(ValueError, match="calibration"):
        to_hu(np.zeros(3), "native", None)


@pytest.mark.parametrize("field", ["mu_scaling", "mu_water", "density_slope"])
def test_calibration_rejects_non_positive_constants(field):
    with pytest.raises(ValueError, match=field):
        Calibration(**{field: 0.0})


def test_calibration_dict_round_trip():
    cal = Calibration(8000.0, 0.25, 1600.0, -390.0, source="user")
    assert Calibration.from_dict(cal.to_dict()) == cal
