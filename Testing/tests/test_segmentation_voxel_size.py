"""The model's own voxel size: recorded in its metadata, scans of another one resampled to it."""

import json
import logging

import numpy as np
import pytest

from HRpQCTPipeline import qc
from HRpQCTSegmentationEngine.inference import VOXEL_TOLERANCE, model_grid, run_segmentation
from HRpQCTSegmentationEngine.model import ModelFolderError, read_model_metadata
from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

VOXEL = 0.2428  # the small test phantoms' voxel (97 mm over 400 px)
TINY = PreprocessingConfig(crop_yx=(400, 400), input_yx=(64, 64))


@pytest.fixture(scope="module")
def model_with_voxel(tmp_path_factory):
    from HRpQCTSegmentationEngine.model import build_model, save_model

    folder = tmp_path_factory.mktemp("voxel_model") / "model"
    save_model(build_model("b0", seed=2).eval(), folder, preprocessing=TINY,
               training_voxel_mm=VOXEL)
    return folder


@pytest.fixture(scope="module")
def small_scan():
    from HRpQCTPhantom import PhantomParams, generate_phantom

    return generate_phantom(PhantomParams().small(400, 2), 5).scan


def test_the_field_is_written_read_and_checked(model_with_voxel, tmp_path):
    assert read_model_metadata(model_with_voxel).training_voxel_mm == VOXEL
    raw = json.loads((model_with_voxel / "hrpqct_model.json").read_text())
    assert raw["training_voxel_mm"] == VOXEL
    old = tmp_path / "old"
    old.mkdir()
    del raw["training_voxel_mm"]
    (old / "hrpqct_model.json").write_text(json.dumps(raw))
    assert read_model_metadata(old).training_voxel_mm is None  # older folders: unknown
    raw["training_voxel_mm"] = -1
    (old / "hrpqct_model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match="training_voxel_mm"):
        read_model_metadata(old)


def test_the_bundled_model_records_its_training_voxel_and_keeps_its_checksums():
    from HRpQCTCore.artefacts import verified_path
    from HRpQCTSegmentationEngine.bundled import BUNDLED_MODEL, resolve_model_folder
    from HRpQCTSegmentationEngine.model_card import model_card_text

    folder = resolve_model_folder(None)
    meta = read_model_metadata(folder)
    assert meta.training_voxel_mm == pytest.approx(0.0607)
    raw = json.loads((folder / "hrpqct_model.json").read_text())
    # the graph of any input size (re-exported from the same weights, same logits at 800)
    assert raw["onnx_sha256"].startswith("cc6d6c75")
    assert raw["weights_sha256"].startswith("84b85825")
    for suffix in ("", ":weights", ":onnx"):
        verified_path(BUNDLED_MODEL + suffix)  # raises on a checksum mismatch
    assert "0.0607 mm in-plane" in model_card_text(raw)
    assert "not recorded" in model_card_text({})


def test_model_grid_resamples_only_beyond_the_tolerance(caplog):
    config = PreprocessingConfig()
    same, info = model_grid(config, (0.0607, 0.0607, 0.0607), 0.0607)
    assert same is config and not info["resampled"]
    near, _ = model_grid(config, (0.0607, 0.0607 * (1 + VOXEL_TOLERANCE / 2),) * 1 + (0.0607,),
                         0.0607)
    assert near is config
    with caplog.at_level(logging.INFO, "HRpQCTSegmentationEngine.inference"):
        coarse, info = model_grid(config, (0.082, 0.082, 0.082), 0.0607)
        unknown, why = model_grid(config, (0.082, 0.082, 0.082), None)
    assert coarse.crop_yx == (1184, 1184) and info["resampled"]
    assert coarse.input_yx == config.input_yx
    assert unknown is config and "no training voxel size" in why["reason"]
    assert "resampled to the model's voxel size" in caplog.text
    assert "records no training voxel size" in caplog.text


def test_at_the_training_voxel_labels_are_unchanged(model_with_voxel, small_scan):
    plain = run_segmentation(small_scan.hu, model_with_voxel, device="cpu", engine="torch")
    same = run_segmentation(small_scan, model_with_voxel, device="cpu", engine="torch")
    assert small_scan.spacing_mm[1] == pytest.approx(VOXEL, rel=1e-3)
    assert not same.voxel_resampling["resampled"]
    assert np.array_equal(plain.labels, same.labels)


def test_another_voxel_size_is_resampled_onto_the_input_grid(model_with_voxel, small_scan,
                                                             caplog):
    coarse = (VOXEL, VOXEL * 0.082 / 0.0607, VOXEL * 0.082 / 0.0607)
    with caplog.at_level(logging.INFO, "HRpQCTSegmentationEngine.inference"):
        seg = run_segmentation(small_scan.hu, model_with_voxel, device="cpu", engine="torch",
                               spacing_mm=coarse)
    assert seg.labels.shape == small_scan.hu.shape and seg.labels.dtype == np.uint8
    assert seg.voxel_resampling["resampled"]
    assert seg.crop_box.shape == (296, 296)  # 400 model voxels in scan voxels
    assert "resampled to the model's voxel size" in caplog.text


def _bone_map(tibia_px):
    """A 7-region map with one square tibia per slice (``tibia_px`` wide) and a fibula."""
    regions = np.zeros((len(tibia_px), 40, 40), np.uint8)
    for z, n in enumerate(tibia_px):
        regions[z, 2:2 + n, 2:2 + n] = 2  # tibial trabecular
        regions[z, 30:36, 30:36] = 4  # fibular trabecular
        regions[z, 0, :] = 5  # some soft tissue
    return regions


def test_a_slice_that_lost_half_the_tibia_is_caught():
    whole = qc.quality_warnings(qc.region_stats(_bone_map([20] * 10), (1.0, 1.0, 1.0)))
    assert not [w for w in whole if w.code == "bone_slice_small"]
    sizes = [20] * 10
    sizes[3] = sizes[7] = 14  # half the area, in two of ten slices
    found = [w for w in qc.quality_warnings(qc.region_stats(_bone_map(sizes), (1, 1, 1)))
             if w.code == "bone_slice_small"]
    assert len(found) == 1 and "tibia" in found[0].message and "3, 7" in found[0].message
    assert found[0].regions == ("tibial_cortical", "tibial_trabecular")  # > 10 % of slices
    sizes = [20] * 30
    sizes[3] = 14
    one = [w for w in qc.quality_warnings(qc.region_stats(_bone_map(sizes), (1, 1, 1)))
           if w.code == "bone_slice_small"]
    assert len(one) == 1 and not one[0].regions  # one slice in 30: listed only


def test_training_records_the_data_voxel_size():
    from HRpQCTSegmentationEngine.training import SliceDataset, training_voxel_mm

    data = SliceDataset(np.zeros((3, 4, 4), np.float16), np.zeros((3, 4, 4), np.uint8),
                        ["a", "a", "b"], [0.0607, 0.0607, 0.0607])
    assert training_voxel_mm(data) == pytest.approx(0.0607)
    assert training_voxel_mm(SliceDataset(data.images, data.labels, data.subjects)) is None
