"""Fine-tuning: partial labels, 7-region labels, fine-tuning a model folder, provenance."""

import csv
import json

import numpy as np
import pytest
import torch

from HRpQCTCore.errors import InputFileError
from HRpQCTSegmentationEngine import training
from HRpQCTSegmentationEngine.losses import IGNORE_INDEX, ce_dice_loss
from HRpQCTSegmentationEngine.training import (
    TrainingCase,
    fine_tune_config,
    format_slice_list,
    load_slices,
    parse_slice_list,
    read_training_manifest,
    train_segmenter,
)

pytest_plugins = ["_fixtures_segmentation"]


def _leg(n_slices: int = 4, size: int = 64, seed: int = 0):
    """A tiny 'leg': a bright disk (tibial cortical, region 1) in adipose (region 7) on air."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    regions = np.where(r < size * 0.15, 1, np.where(r < size * 0.35, 7, 0)).astype(np.uint8)
    regions = np.repeat(regions[None], n_slices, axis=0)
    hu = np.select([regions == 1, regions == 7], [1800.0, -100.0], -1000.0)
    return (hu + rng.normal(0, 50, hu.shape)).astype(np.float32), regions


def _write_case(folder, name, hu, labels, seg_nrrd=False):
    from HRpQCTCore.io import write_label_map, write_scan
    from HRpQCTCore.scan import Scan

    scan = Scan(hu, (0.5, 0.25, 0.25))
    image = write_scan(scan, folder / f"{name}.nii.gz")
    label_path = folder / (f"{name}_labels.seg.nrrd" if seg_nrrd else f"{name}_labels.nii.gz")
    write_label_map(labels, scan, label_path)
    return image, label_path


def test_slice_lists_round_trip_and_bad_ones_are_refused():
    assert parse_slice_list("3,7,10-12") == (3, 7, 10, 11, 12)
    assert parse_slice_list(" ") is None and parse_slice_list(None) is None
    assert format_slice_list([12, 3, 10, 11, 7]) == "3,7,10-12"
    with pytest.raises(InputFileError, match="not a slice number"):
        parse_slice_list("3,x")
    with pytest.raises(InputFileError, match="not a valid range"):
        parse_slice_list("5-2")


def test_loss_ignores_unannotated_pixels():
    logits = torch.randn(1, 6, 16, 16, requires_grad=True)
    target = torch.randint(0, 6, (1, 16, 16))
    blank, garbage = target.clone(), target.clone()
    blank[:, 8:] = IGNORE_INDEX
    garbage[:, 8:] = IGNORE_INDEX
    loss_a = ce_dice_loss(logits, blank)
    (grad_a,) = torch.autograd.grad(loss_a, logits)
    # the same annotated half with the other half annotated differently is a different loss,
    # but marking it unannotated always gives the loss of the annotated half alone
    other = torch.randint(0, 6, (1, 16, 16))
    other[:, :8] = target[:, :8]
    other[:, 8:] = IGNORE_INDEX
    loss_b = ce_dice_loss(logits, other)
    (grad_b,) = torch.autograd.grad(loss_b, logits)
    assert float(loss_a) == pytest.approx(float(loss_b))
    torch.testing.assert_close(grad_a, grad_b)
    assert float(grad_a[..., 8:, :].abs().sum()) == 0.0  # no signal from unannotated pixels
    # a target without ignored pixels gives exactly the old loss
    assert float(ce_dice_loss(logits, target)) == pytest.approx(
        float(ce_dice_loss(logits, target, ignore_index=None)))
    assert float(ce_dice_loss(logits, torch.full((1, 16, 16), IGNORE_INDEX))) == 0.0


def test_garbage_on_unannotated_slices_changes_nothing(tmp_path, tiny_preprocessing):
    hu, regions = _leg(n_slices=6)
    garbage = regions.copy()
    garbage[[0, 1, 4, 5]] = np.random.default_rng(1).integers(0, 8, garbage[:4].shape)
    blank = regions.copy()
    blank[[0, 1, 4, 5]] = 0
    data = {}
    for name, labels in (("garbage", garbage), ("blank", blank)):
        image, lab = _write_case(tmp_path, name, hu, labels)
        case = TrainingCase("s1", image, lab, parse_slice_list("2-3"))
        data[name] = load_slices([case], tiny_preprocessing, 0)
    assert len(data["blank"]) == 2  # only the corrected slices are read
    np.testing.assert_array_equal(data["garbage"].labels, data["blank"].labels)
    np.testing.assert_array_equal(data["garbage"].images, data["blank"].images)


def test_seven_region_seg_nrrd_is_collapsed_to_classes(tmp_path, tiny_preprocessing):
    hu, regions = _leg(n_slices=2)
    image, lab = _write_case(tmp_path, "a", hu, regions, seg_nrrd=True)
    data = load_slices([TrainingCase("s1", image, lab)], tiny_preprocessing, 0)
    assert set(np.unique(data.labels)) == {0, 1, 5}  # adipose (7) became soft tissue (5)


def _write_scan_at(folder, name, hu, labels, voxel_mm):
    from HRpQCTCore.io import write_label_map, write_scan
    from HRpQCTCore.scan import Scan

    scan = Scan(hu, (0.5, voxel_mm, voxel_mm))
    image = write_scan(scan, folder / f"{name}.nii.gz")
    label_path = folder / f"{name}_labels.nii.gz"
    write_label_map(labels, scan, label_path)
    return image, label_path


def test_scans_off_the_target_voxel_size_are_resampled_like_at_inference(tmp_path,
                                                                         tiny_preprocessing):
    # The same leg at the model's 0.25 mm and at 0.5 mm (every second pixel): brought to
    # 0.25 mm, the coarse scan's labels land where the fine scan's do; left alone, the leg
    # fills half the field.
    hu, regions = _leg(n_slices=2, size=96)
    fine = _write_scan_at(tmp_path, "fine", hu, regions, 0.25)
    coarse = _write_scan_at(tmp_path, "coarse", hu[:, ::2, ::2], regions[:, ::2, ::2], 0.5)
    reference = load_slices([TrainingCase("f", *fine)], tiny_preprocessing, 0, voxel_mm=0.25)
    resampled = load_slices([TrainingCase("c", *coarse)], tiny_preprocessing, 0,
                            voxel_mm=0.25)
    as_is = load_slices([TrainingCase("c", *coarse)], tiny_preprocessing, 0)
    assert resampled.voxel_mm == [0.25, 0.25] and as_is.voxel_mm == [0.5, 0.5]
    assert training.training_voxel_mm(resampled) == 0.25
    assert resampled.images.shape == reference.images.shape == as_is.images.shape
    agree = np.mean(resampled.labels == reference.labels)
    assert agree > 0.97, agree
    assert np.mean(as_is.labels == reference.labels) < 0.9
    # bone pixels: the disk keeps its size in the model's millimetres
    assert np.sum(resampled.labels == 1) == pytest.approx(np.sum(reference.labels == 1),
                                                          rel=0.1)


def test_fine_tuning_keeps_the_parent_voxel_size(tmp_path, tiny_preprocessing):
    from HRpQCTSegmentationEngine.model import build_model, read_model_metadata, save_model

    parent = save_model(build_model("b0", seed=3), tmp_path / "parent-025",
                        preprocessing=tiny_preprocessing, training_voxel_mm=0.25,
                        extra_metadata={"name": "tiny-parent"})
    hu, regions = _leg(n_slices=6, size=32)
    cases = [TrainingCase("s1", *_write_scan_at(tmp_path, "c", hu, regions, 0.5))]
    config = fine_tune_config(epochs=1, steps_per_epoch=1, batch_size=2, crop_px=32,
                              warmup_steps=1, validation_slices=2)
    train_segmenter(cases, tmp_path / "child", config=config, init_from=parent, device="cpu")
    assert read_model_metadata(tmp_path / "child").training_voxel_mm == 0.25


def test_manifest_reads_the_slices_column(tmp_path):
    path = tmp_path / "m.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "image", "labels", "slices"])
        w.writerow(["s1", "a.nii.gz", "a.seg.nrrd", "3,7,10-12"])
        w.writerow(["s2", "b.nii.gz", "b.nii.gz", ""])
    cases = read_training_manifest(path)
    assert cases[0].slices == (3, 7, 10, 11, 12) and cases[1].slices is None


def test_fine_tune_defaults_are_gentle():
    config = fine_tune_config()
    assert config.learning_rate == 1e-4 and config.head_lr_multiplier == 1.0
    assert config.epochs * config.steps_per_epoch == 300
    assert config.freeze_stages == 1 and config.early_stop_patience == 2


def test_freezing_the_first_stage(random_b0):
    import copy

    model = copy.deepcopy(random_b0)
    parts = training.freeze_encoder_stages(model, 1)
    assert "encoder stage 1" not in parts and "encoder stage 2" in parts
    assert "decode head" in parts
    for p in model.parameters():
        p.requires_grad_(True)


def _tiny_parent(folder, tiny_preprocessing):
    from HRpQCTSegmentationEngine.model import build_model, save_model

    return save_model(build_model("b0", seed=3), folder, preprocessing=tiny_preprocessing,
                      extra_metadata={"name": "tiny-parent"})


def test_fine_tune_a_model_folder_records_its_provenance(tmp_path, tiny_preprocessing):
    from HRpQCTSegmentationEngine.model import load_model, read_model_metadata
    from HRpQCTSegmentationEngine.model_card import model_identity

    parent = _tiny_parent(tmp_path / "parent", tiny_preprocessing)
    hu, regions = _leg(n_slices=6)
    image, lab = _write_case(tmp_path, "a", hu, regions, seg_nrrd=True)
    cases = [TrainingCase("s1", image, lab, parse_slice_list("1-4"))]
    config = fine_tune_config(epochs=2, steps_per_epoch=2, batch_size=2, crop_px=32,
                              warmup_steps=1, validation_slices=2)
    out = tmp_path / "child"
    result = train_segmenter(cases, out, config=config, init_from=parent, device="cpu",
                             extra_provenance={"manifest": "m.csv", "manifest_sha256": "ab"})
    assert result["step"] == 4 and result["validation_before"] is not None
    load_model(out)  # the loader verifies the checksum it recorded
    meta = read_model_metadata(out)
    assert meta.preprocessing == tiny_preprocessing  # the parent's, not the paper's
    training_meta = meta.extra["training"]
    assert "held-out slices" in training_meta["validation"]
    assert training_meta["steps_run"] == 4 and training_meta["manifest_sha256"] == "ab"
    assert "encoder stage 1" not in training_meta["trained_parts"]
    identity = model_identity(out)
    assert identity["name"] == "child" and identity["parent"]["name"] == "tiny-parent"
    assert not identity["synthetic_caveat"]  # a random parent is not the bundled model
    card = (out / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "tiny-parent" in card and "before fine-tuning" in card and "m.csv" in card
    json.loads((out / "hrpqct_model.json").read_text(encoding="utf-8"))


def test_descendants_of_the_bundled_model_keep_the_synthetic_caveat(tmp_path):
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder
    from HRpQCTSegmentationEngine.model_card import lineage_metadata, model_card_text
    from HRpQCTSegmentationEngine.training import parent_description

    parent = parent_description(resolve_model_folder(None))
    assert parent["name"] == "segformer-b0-phantoms" and parent["synthetic_caveat"]
    lineage = lineage_metadata(tmp_path / "mine", {"parent": parent})
    assert lineage["synthetic_caveat"] and lineage["parent"]["weights_sha256"]
    card = model_card_text({**lineage, "training": {"n_scans": 2, "manifest": "x.csv"}})
    assert "synthetic phantoms" in card and "trained on 2 scans" in card


# ------------------------------------------------------------------------------------------
# Validation scores what segmenting feeds the network (the leg's window)
# ------------------------------------------------------------------------------------------
def _leg_fit_preprocessing():
    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    return PreprocessingConfig(crop_yx=(256, 256), input_yx=(128, 128), leg_margin_px=8,
                               input_multiple_px=16)


def test_training_slices_record_the_leg_window_the_network_sees(tmp_path):
    from HRpQCTSegmentationEngine.preprocessing import (
        crop_box_for_scan,
        network_window,
        preprocess_slice,
    )

    config = _leg_fit_preprocessing()
    hu, regions = _leg(n_slices=2, size=256)  # a leg 180 voxels across in a 256 field
    image, lab = _write_case(tmp_path, "a", hu, regions)
    data = load_slices([TrainingCase("s1", image, lab)], config, 0)
    box = crop_box_for_scan(hu, config)
    window, fitted = network_window(hu, config)
    assert fitted.input_yx == (112, 112)  # narrower than the 128 x 128 field
    r0, c0 = (window.y0 - box.y0) // 2, (window.x0 - box.x0) // 2
    assert data.windows == [(r0, r0 + 112, c0, c0 + 112)] * 2
    rows, cols = data.seen(0)
    # the same input pixels as segmenting's (but for the edge pixels, in the air margin,
    # where the resize sees the window's edge instead of more air)
    np.testing.assert_allclose(data.images[0][rows, cols][4:-4, 4:-4],
                               preprocess_slice(hu[0], window, fitted)[4:-4, 4:-4], atol=1e-3)
    # every labelled pixel of the leg is inside the window
    assert np.count_nonzero(data.labels[0][rows, cols]) == np.count_nonzero(data.labels[0])
    # whole images are kept for training's patches
    assert data.images.shape[1:] == (128, 128)


def test_validation_scores_only_the_window_segmenting_feeds_the_network():
    from HRpQCTSegmentationEngine.training import SliceDataset, TrainingConfig, _validate
    from HRpQCTSegmentationEngine.unet import UNet, UNetConfig

    rng = np.random.default_rng(0)
    images = rng.random((3, 64, 64)).astype(np.float16)
    labels = rng.integers(0, 6, (3, 64, 64)).astype(np.uint8)
    windows = [(16, 48, 0, 64), (0, 32, 32, 64), (0, 64, 0, 64)]
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=4, depth=2)).eval()
    config = TrainingConfig(validation_slices=3)
    scored = _validate(model, SliceDataset(images, labels, ["a", "b", "c"], [], windows),
                       config, "cpu")
    # garbage outside the windows changes nothing
    garbage = labels.copy()
    for i, (r0, r1, c0, c1) in enumerate(windows):
        outside = np.ones((64, 64), bool)
        outside[r0:r1, c0:c1] = False
        garbage[i][outside] = (garbage[i][outside] + 1) % 6
    again = _validate(model, SliceDataset(images, garbage, ["a", "b", "c"], [], windows),
                      config, "cpu")
    assert again == scored
    # and without windows the whole images are scored (a different result here)
    whole = _validate(model, SliceDataset(images, labels, ["a", "b", "c"]), config, "cpu")
    assert whole["val_iou"] != scored["val_iou"]
