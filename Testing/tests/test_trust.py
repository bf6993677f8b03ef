"""The tool knows when not to be trusted: the scan plausibility check and model uncertainty."""

import json

import numpy as np
import pytest
from scipy import ndimage

from HRpQCTCore.errors import InvalidScanError
from HRpQCTPipeline import qc
from HRpQCTPipeline.cli import main
from HRpQCTSegmentationEngine.plausibility import (
    UnusualScanError,
    check_scan_plausibility,
    require_plausible_scan,
)
from HRpQCTSegmentationEngine.uncertainty import (
    UncertaintyTracker,
    flip_input,
    flip_signals,
    logit_signals,
    unflip_logits,
)

SCANNER_MM = (0.0607,) * 3


def _phantom(**changes):
    from HRpQCTPhantom import PhantomParams, generate_phantom

    return generate_phantom(PhantomParams(n_slices=2, **changes), seed=4).scan


@pytest.mark.parametrize("changes", [
    {}, {"noise_sd_hu": 0.0}, {"noise_sd_hu": 300.0}, {"motion_grade": 5}, {"side": "left"},
    {"translation_mm": (15.0, -12.0)}, {"cast": True}])
def test_phantoms_are_plausible(changes):
    scan = _phantom(**changes)
    report = check_scan_plausibility(scan.hu, scan.spacing_mm)
    assert report.plausible, report.message()


def test_coarse_test_phantoms_of_the_whole_leg_are_plausible():
    from HRpQCTPhantom import PhantomParams, generate_phantom

    scan = generate_phantom(PhantomParams().small(400, 2), 4).scan  # 0.24 mm voxels
    assert check_scan_plausibility(scan.hu, scan.spacing_mm).plausible


def _foam(solid_hu: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.standard_normal((2, 1600, 1600)).astype(np.float32),
                                    (0, 6, 6))
    y, x = np.mgrid[:1600, :1600]
    inside = (y - 800) ** 2 + (x - 800) ** 2 < 700 ** 2
    foam = np.where(inside & (field > np.percentile(field, 80)), solid_hu, -1000.0)
    return (ndimage.gaussian_filter(foam.astype(np.float32), (0, 1.2, 1.2))
            + rng.normal(0, 150, foam.shape).astype(np.float32))


def _cylinder(n: int, inside: float, outside: float) -> np.ndarray:
    y, x = np.mgrid[:n, :n]
    disc = (y - n / 2) ** 2 + (x - n / 2) ** 2 < (0.4 * n) ** 2
    return np.repeat(np.where(disc, inside, outside)[None], 3, axis=0).astype(np.float32)


def _refused():
    rng = np.random.default_rng(1)
    water = _cylinder(512, 0.0, -1000.0) + rng.normal(0, 20, (3, 512, 512)).astype(np.float32)
    return {
        "metal foam": (_foam(6000.0), SCANNER_MM, {"too_much_bone", "metal_like", "air_inside"}),
        "bone-like foam": (_foam(2500.0), SCANNER_MM, {"too_much_bone", "air_inside"}),
        "mask 0/1": (_cylinder(1600, 1.0, 0.0), SCANNER_MM, {"mask_like"}),
        "mask 0/127": (_cylinder(1600, 127.0, 0.0), SCANNER_MM, {"mask_like"}),
        "CT water cylinder": (water, (0.5, 0.5, 0.5), {"voxel_size", "field_of_view", "no_bone"}),
        "noise": (rng.normal(0, 500, (2, 1600, 1600)).astype(np.float32), SCANNER_MM,
                  {"no_structure"}),
    }


@pytest.mark.parametrize("name", list(_refused()))
def test_what_is_no_distal_leg_scan_is_refused_with_the_reason(name):
    volume, spacing, codes = _refused()[name]
    report = check_scan_plausibility(volume, spacing)
    assert codes <= {p.code for p in report.problems}
    with pytest.raises(UnusualScanError) as info:
        require_plausible_scan(volume, spacing)
    assert info.value.exit_code == 4 and isinstance(info.value, InvalidScanError)
    assert "--accept-unusual-scan" in str(info.value)


def test_a_single_slice_is_refused():
    scan = _phantom()
    report = check_scan_plausibility(scan.hu[:1], scan.spacing_mm)
    assert [p.code for p in report.problems] == ["too_few_slices"]


def test_the_override_accepts_and_marks_the_scan():
    volume = _cylinder(1600, 1.0, 0.0)
    report = require_plausible_scan(volume, SCANNER_MM, accept_unusual=True)
    assert report.accepted_anyway and not report.plausible
    warning = qc.plausibility_warning(report.to_dict())
    assert warning.code == "unusual_scan"
    assert qc.classification_blockers([warning], ["tibial_trabecular"]) == [warning]


def test_segment_refuses_a_mask_with_exit_code_4_and_accepts_it_on_request(
        tiny_model_folder, tmp_path, capsys):
    from HRpQCTCore.io import write_scan
    from HRpQCTCore.scan import Scan

    mask = Scan(hu=_cylinder(400, 1.0, 0.0).astype(np.int16), spacing_mm=(0.2428,) * 3)
    path = write_scan(mask, tmp_path / "mask.nii.gz", dtype="int16")
    out = tmp_path / "r.nii.gz"
    args = ["segment", str(path), str(out), "--model", str(tiny_model_folder), "--units",
            "hu", "--progress", "none", "--classes-only", "--qc-json", str(tmp_path / "q.json")]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "mask or label map" in err and "--accept-unusual-scan" in err
    assert not out.exists()
    assert main([*args, "--accept-unusual-scan", "--uncertainty", "margin"]) == 0
    record = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))
    assert record["plausibility"]["accepted_anyway"] is True
    assert record["uncertainty_method"] == "margin"
    assert len(record["slice_uncertainty"]) == 3


# --- uncertainty --------------------------------------------------------------------------------

def test_flip_and_unflip_map_the_output_grid_onto_itself():
    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 16, 32)).astype(np.float32)
    assert np.array_equal(flip_input(flip_input(image)), image)
    # a stride-4 "network" (sampling columns 0, 4, 8, ...) is exactly flip-equivariant
    net = lambda x: np.repeat(x[:, :, ::4, ::4], 2, axis=1)  # noqa: E731
    assert np.array_equal(unflip_logits(net(flip_input(image))), net(image))


def test_flip_input_is_the_same_for_torch_and_numpy():
    torch = pytest.importorskip("torch")
    image = np.random.default_rng(1).random((2, 1, 8, 12)).astype(np.float32)
    assert np.array_equal(flip_input(torch.from_numpy(image)).numpy(), flip_input(image))


def test_signals_grow_when_the_model_is_unsure():
    sure = np.zeros((1, 6, 8, 8), np.float32)
    sure[:, 2] = 8.0  # tibial trabecular everywhere, certain
    unsure = sure.copy()
    unsure[:, 1] = 7.5  # almost a tie with cortical
    inside = np.ones((8, 8), bool)
    low, high = logit_signals(sure, inside), logit_signals(unsure, inside)
    for name in ("msp", "entropy", "margin"):
        assert high[name][0] > low[name][0]
    flipped = flip_input(sure)  # "predictions" of a mirrored slice that disagree in one column
    flipped[:, 2, :, 3] = 0.0
    flipped[:, 5, :, 3] = 9.0
    change = flip_signals(sure, flipped, inside)["flip_change"][0]
    assert change == pytest.approx(8 / 64)
    assert flip_signals(sure, flip_input(sure), inside)["flip_change"][0] == 0.0


def test_uncertainty_never_changes_the_labels(tiny_model_folder):
    from HRpQCTPhantom import PhantomParams, generate_phantom
    from HRpQCTSegmentationEngine.inference import run_segmentation

    hu = generate_phantom(PhantomParams().small(400, 2), 3).scan.hu
    plain = run_segmentation(hu, tiny_model_folder, device="cpu")
    flip = run_segmentation(hu, tiny_model_folder, device="cpu", uncertainty="flip")
    assert np.array_equal(plain.labels, flip.labels)
    assert plain.slice_uncertainty is None
    assert flip.slice_uncertainty.shape == (2,)
    assert set(flip.uncertainty_signals) >= {"margin", "flip_change", "flip_l1"}


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="flip"):
        UncertaintyTracker("mc-dropout", 2, np.ones((2, 2), bool))


def test_uncertain_slices_are_listed_and_many_concern_the_bones():
    summary = qc.uncertainty_summary("flip", [0.01, 0.5, None, 0.02], "flip_change")
    assert summary["uncertain_slices"] == [1]
    stats = qc.region_stats(np.ones((4, 4, 4), np.uint8), (1.0, 1.0, 1.0))
    warnings = qc.quality_warnings(stats, uncertainty=summary)
    found = [w for w in warnings if w.code == "uncertain_slices"]
    assert len(found) == 1 and "1 slice(s): 1" in found[0].message and not found[0].regions
    many = qc.uncertainty_summary("flip", [0.5, 0.5, 0.01, 0.5], "flip_change")
    found = [w for w in qc.quality_warnings(stats, uncertainty=many)
             if w.code == "uncertain_slices"]
    assert "tibial_cortical" in found[0].regions
    assert qc.uncertainty_summary("none", None, None) is None


def test_run_records_the_uncertainty_and_refuses_a_mask(pipeline_scans, tiny_model_folder,
                                                        tmp_path):
    from pathlib import Path

    from HRpQCTCore.io import write_scan
    from HRpQCTCore.scan import Scan
    from HRpQCTPipeline.pipeline import RunSettings, ScanJob, run_scan

    settings = RunSettings(model=str(tiny_model_folder), classifier="none", features="none",
                           device="cpu")
    result = run_scan(ScanJob.from_path(pipeline_scans[0].scan), tmp_path / "ok", settings)
    record = json.loads(Path(result.outputs["qc"]).read_text(encoding="utf-8"))
    assert record["uncertainty"]["method"] == "margin"  # the default
    assert len(record["uncertainty"]["per_slice"]) == 3
    mask = Scan(hu=_cylinder(400, 1.0, 0.0).astype(np.int16), spacing_mm=(0.2428,) * 3)
    path = write_scan(mask, tmp_path / "mask.nii.gz", dtype="int16")
    as_hu = RunSettings(model=str(tiny_model_folder), classifier="none", features="none",
                        device="cpu", units="hu")  # else the reader refuses it (units)
    with pytest.raises(UnusualScanError):
        run_scan(ScanJob.from_path(path), tmp_path / "mask", as_hu)
