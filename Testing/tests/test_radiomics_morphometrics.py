"""Standard morphometrics of a slice: areas, densities and cortical thickness on known shapes."""

import math

import numpy as np
import pytest

from HRpQCTCore.regions import region_by_name
from HRpQCTCore.scan import DEFAULT_CALIBRATION
from HRpQCTRadiomicsEngine.morphometrics import (
    MORPHOMETRIC_NAMES,
    scan_morphometrics,
    slice_morphometrics,
)


def _ring_slice(pixel_mm: float, outer_mm: float = 6.0, inner_mm: float = 4.5, n: int = 400):
    """A tibia: cortical ring (1000 HU) around trabecular bone (200 HU); no fibula."""
    yy, xx = np.mgrid[:n, :n]
    r_mm = np.hypot(yy - n / 2 + 0.5, xx - n / 2 + 0.5) * pixel_mm
    regions = np.zeros((n, n), dtype=np.uint8)
    regions[r_mm < outer_mm] = region_by_name("tibial_cortical").label
    regions[r_mm < inner_mm] = region_by_name("tibial_trabecular").label
    hu = np.where(r_mm < inner_mm, 200.0, np.where(r_mm < outer_mm, 1000.0, -100.0))
    return hu.astype(np.float32), regions


@pytest.mark.parametrize("pixel_mm", [0.0607, 0.082])
def test_ring_areas_density_and_thickness_at_two_spacings(pixel_mm):
    hu, regions = _ring_slice(pixel_mm)
    m = slice_morphometrics(hu, regions, (pixel_mm, pixel_mm))
    assert set(m) == set(MORPHOMETRIC_NAMES)
    assert m["tibia:Tt.Ar"] == pytest.approx(math.pi * 6.0**2, rel=0.01)
    assert m["tibia:Tb.Ar"] == pytest.approx(math.pi * 4.5**2, rel=0.01)
    assert m["tibia:Ct.Ar"] == pytest.approx(m["tibia:Tt.Ar"] - m["tibia:Tb.Ar"], rel=1e-9)
    assert m["tibia:Ct.Th"] == pytest.approx(1.5, rel=0.05)  # the ring is 1.5 mm thick
    assert m["tibia:Ct.Pm"] == pytest.approx(2 * math.pi * 6.0, rel=0.05)
    expected = DEFAULT_CALIBRATION.hu_to_density(np.array([1000.0, 200.0]))
    assert m["tibia:Ct.vBMD"] == pytest.approx(float(expected[0]), rel=1e-6)
    assert m["tibia:Tb.vBMD"] == pytest.approx(float(expected[1]), rel=1e-6)
    assert expected[1] < m["tibia:Tt.vBMD"] < expected[0]


def test_missing_fibula_gives_nan_not_an_error():
    hu, regions = _ring_slice(0.0607)
    m = slice_morphometrics(hu, regions, (0.0607, 0.0607))
    assert all(math.isnan(m[n]) for n in MORPHOMETRIC_NAMES if n.startswith("fibula:"))


def test_scan_rows_follow_the_requested_slices():
    hu, regions = _ring_slice(0.0607, n=200, outer_mm=4.0, inner_mm=3.0)
    hu3, reg3 = np.stack([hu, hu, hu]), np.stack([regions, regions * 0, regions])
    rows = scan_morphometrics(hu3, reg3, (0.0607, 0.0607, 0.0607), slices=[2, 1])
    assert [r["slice"] for r in rows] == [2.0, 1.0]
    assert rows[0]["tibia:Tt.Ar"] > 0 and math.isnan(rows[1]["tibia:Tt.Ar"])


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="same grid"):
        scan_morphometrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)), (1, 1, 1))
