"""Preprocessing (crop, clip, scale, resize) and its exact inverse for the logits."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from HRpQCTCore.errors import InvalidScanError
from HRpQCTCore.regions import NETWORK_CLASSES
from HRpQCTSegmentationEngine.preprocessing import (
    MIN_FITTED_INPUT_PX,
    CropBox,
    PreprocessingConfig,
    crop_box_for_scan,
    crop_slice,
    labels_to_model_grid,
    logits_to_labels,
    logits_to_labels_batch,
    network_window,
    preprocess_slice,
    preprocess_slices,
    validate_volume,
)

N_CLASSES = len(NETWORK_CLASSES)


def test_defaults_are_the_papers():
    config = PreprocessingConfig()
    assert config.crop_yx == (1600, 1600)
    assert config.input_yx == (800, 800)
    assert (config.clip_min_hu, config.clip_max_hu) == (-4000.0, 6000.0)
    assert config.pad_hu == -1000.0
    assert config.logits_yx == (200, 200)  # SegFormer predicts at 1/4 of its input
    assert PreprocessingConfig.from_dict(config.to_dict()) == config


def test_clip_and_scale_values():
    config = PreprocessingConfig(crop_yx=(1, 5), input_yx=(1, 5))
    hu = np.array([[-5000, -4000, 1000, 6000, 9000]], dtype=np.int16)
    box = CropBox(0, 0, 1, 5)
    out = preprocess_slice(hu, box, config)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def leg_volume(shape, centre_yx, radius, n_slices=3):
    """Air with a disk of soft tissue (40 HU) around ``centre_yx``."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    disk = (yy - centre_yx[0]) ** 2 + (xx - centre_yx[1]) ** 2 <= radius**2
    slice_ = np.where(disk, 40, -1000).astype(np.int16)
    return np.repeat(slice_[None], n_slices, axis=0)


def test_crop_is_centred_on_an_off_centre_leg(tiny_preprocessing):
    volume = leg_volume((150, 170), centre_yx=(100, 40), radius=20)
    volume[1, 5:8, 150:160] = 2000  # a bright speck in one slice must not move the crop
    box = crop_box_for_scan(volume, tiny_preprocessing)
    assert box.shape == (64, 64)
    assert (box.y0 + 31.5, box.x0 + 31.5) == pytest.approx((100, 40), abs=0.5)
    crop = crop_slice(volume[0], box, -1000.0)
    assert (crop > -400).sum() == (volume[0] > -400).sum()  # the whole leg is inside


def test_crop_of_a_scan_smaller_than_the_window_pads_with_air(tiny_preprocessing):
    volume = leg_volume((41, 37), centre_yx=(20, 18), radius=10)
    box = crop_box_for_scan(volume, tiny_preprocessing)
    crop = crop_slice(volume[0], box, tiny_preprocessing.pad_hu)
    assert crop.shape == (64, 64)
    assert (crop == -1000).sum() == 64 * 64 - (volume[0] == 40).sum()
    net_input = preprocess_slice(volume[0], box, tiny_preprocessing)
    assert net_input.shape == (32, 32)
    air = (-1000 + 4000) / 10000
    assert net_input[0, 0] == pytest.approx(air, abs=1e-6)


def test_no_leg_gives_centred_crop(tiny_preprocessing):
    volume = np.full((2, 100, 80), -1000, dtype=np.int16)
    box = crop_box_for_scan(volume, tiny_preprocessing)
    assert (box.y0, box.x0) == (18, 8)


def test_batched_equals_single(tiny_preprocessing):
    rng = np.random.default_rng(0)
    volume = rng.integers(-1200, 3000, size=(3, 70, 90)).astype(np.int16)
    box = crop_box_for_scan(volume, tiny_preprocessing)
    batch = preprocess_slices(volume, box, tiny_preprocessing)
    assert tuple(batch.shape) == (3, 1, 32, 32)
    assert batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    for i in range(3):
        np.testing.assert_array_equal(batch[i, 0].numpy(),
                                      preprocess_slice(volume[i], box, tiny_preprocessing))


def one_hot_logits(labels: np.ndarray) -> torch.Tensor:
    """An "identity model": logits that are one-hot encodings of ``labels`` ``[h, w]``."""
    tensor = torch.from_numpy(labels.astype(np.int64))
    return torch.nn.functional.one_hot(tensor, N_CLASSES).permute(2, 0, 1).float() * 10.0


@pytest.mark.parametrize("shape_yx, centre_yx", [
    ((97, 131), (80, 115)),    # odd sizes, leg off-centre: window reaches past two borders
    ((41, 37), (20, 18)),      # scan smaller than the crop window
    ((64, 64), (31.5, 31.5)),  # exactly the window
])
def test_inverse_is_exact_at_crop_resolution(shape_yx, centre_yx, tiny_preprocessing):
    rng = np.random.default_rng(1)
    truth = rng.integers(0, N_CLASSES, size=shape_yx).astype(np.uint8)
    volume = leg_volume(shape_yx, centre_yx, radius=12)
    box = crop_box_for_scan(volume, tiny_preprocessing)
    cropped = crop_slice(truth, box, 0, np.uint8)
    # Logits at the crop's own resolution: geometry alone decides whether labels return.
    labels = logits_to_labels(one_hot_logits(cropped), box, shape_yx, tiny_preprocessing)
    assert labels.dtype == np.uint8 and labels.shape == shape_yx
    src_y, src_x, _, _ = box.overlap(shape_yx)
    inside = np.zeros(shape_yx, bool)
    inside[src_y, src_x] = True
    np.testing.assert_array_equal(labels[inside], truth[inside])
    assert not labels[~inside].any()  # outside the crop: background


def test_inverse_from_low_resolution_logits(tiny_preprocessing):
    """Logits at 1/8 of the crop (as for the paper's 1600 -> 800 -> 200) map back exactly.

    Labels vary along rows only, in bands of whole low-resolution pixels, so bilinear
    upsampling keeps each band's class the largest everywhere (weight >= 9/16).
    """
    config = tiny_preprocessing
    shape_yx = (80, 70)
    volume = leg_volume(shape_yx, (45, 30), radius=15)
    box = crop_box_for_scan(volume, config)
    h, w = config.logits_yx
    factor = box.height // h
    band_classes = np.array([0, 1, 1, 2, 3, 4, 5, 5])
    low = np.repeat(band_classes[:, None], w, axis=1).astype(np.uint8)
    truth_crop = np.repeat(np.repeat(low, factor, axis=0), factor, axis=1)
    truth = np.zeros(shape_yx, np.uint8)
    src_y, src_x, dst_y, dst_x = box.overlap(shape_yx)
    truth[src_y, src_x] = truth_crop[dst_y, dst_x]
    labels = logits_to_labels_batch(one_hot_logits(low)[None], box, shape_yx, config)[0]
    np.testing.assert_array_equal(labels, truth)


def test_label_grid_matches_image_grid(tiny_preprocessing):
    label_slice = np.zeros((64, 64), np.uint8)
    label_slice[10:20, 30:50] = 3
    box = CropBox(0, 0, 64, 64)
    grid = labels_to_model_grid(label_slice, box, tiny_preprocessing)
    assert grid.shape == (32, 32) and grid.dtype == np.uint8
    expected = np.zeros((32, 32), np.uint8)
    expected[5:10, 15:25] = 3
    np.testing.assert_array_equal(grid, expected)


@pytest.mark.parametrize("bad", [np.zeros((8, 8)), np.zeros((2, 3, 8, 8)),
                                 np.zeros((0, 8, 8)), np.zeros((2, 8, 8), bool)])
def test_bad_volumes_are_rejected(bad):
    with pytest.raises(InvalidScanError, match=r"scan|Segmentation"):
        validate_volume(bad)


# ------------------------------------------------------------------------------------------
# The network input fitted to the leg (input_fit="leg")
# ------------------------------------------------------------------------------------------
def test_network_window_holds_the_leg_with_its_margin_on_the_windows_pixel_grid():
    config = PreprocessingConfig(crop_yx=(256, 256), input_yx=(128, 128), leg_margin_px=8,
                                 input_multiple_px=16)
    volume = leg_volume((300, 280), centre_yx=(150, 120), radius=40)
    field, field_config = network_window(volume, replace(config, input_fit="field"))
    assert field == crop_box_for_scan(volume, config) and field_config.input_fit == "field"
    box, fitted = network_window(volume, config)
    assert fitted.input_yx == (64, 64)  # 81 voxels of leg / 2 + 2 x 8 margin, up to 16 x k
    assert fitted.crop_yx == box.shape == (128, 128)
    assert (box.y0 - field.y0) % 2 == 0 and (box.x0 - field.x0) % 2 == 0
    leg = volume[0] > -400
    inside = crop_slice(volume[0], box, -1000.0) > -400
    assert inside.sum() == leg.sum()  # the whole leg is in the network's input
    rows = np.flatnonzero(leg.any(axis=1))
    assert rows[0] - box.y0 >= 2 * 8 and box.y0 + box.height - 1 - rows[-1] >= 2 * 8
    # The input's inner pixels are the whole window's, pixel for pixel.
    full = preprocess_slice(volume[0], field, config)
    part = preprocess_slice(volume[0], box, fitted)
    oy, ox = (box.y0 - field.y0) // 2, (box.x0 - field.x0) // 2
    np.testing.assert_array_equal(part[4:-4, 4:-4], full[oy + 4:oy + 60, ox + 4:ox + 60])


def test_network_window_keeps_the_field_where_it_cannot_fit():
    config = PreprocessingConfig(crop_yx=(64, 64), input_yx=(32, 32), leg_margin_px=4,
                                 input_multiple_px=8)
    big = leg_volume((64, 64), centre_yx=(32, 32), radius=31)
    assert network_window(big, config)[1] is config  # the leg needs the whole window
    empty = np.full((2, 64, 64), -1000, dtype=np.int16)
    assert network_window(empty, config)[1] is config  # no leg
    odd = PreprocessingConfig(crop_yx=(60, 60), input_yx=(32, 32))  # not a whole ratio
    small = leg_volume((64, 64), centre_yx=(32, 32), radius=5)
    assert network_window(small, odd)[1] is odd
    # a SegFormer cannot take less than MIN_FITTED_INPUT_PX: a tiny leg gets that much
    assert MIN_FITTED_INPUT_PX == 32
    assert network_window(small, config)[1].input_yx == (32, 32)
    wider = replace(config, crop_yx=(128, 128), input_yx=(64, 64))
    box, fitted = network_window(leg_volume((128, 128), centre_yx=(64, 64), radius=5), wider)
    assert fitted.input_yx == (32, 32) and box.shape == (64, 64)
    with pytest.raises(ValueError, match="input_fit"):
        PreprocessingConfig(input_fit="leg only")


def test_noise_in_single_slices_does_not_widen_the_window():
    config = PreprocessingConfig(crop_yx=(256, 256), input_yx=(128, 128), leg_margin_px=8,
                                 input_multiple_px=16)
    volume = leg_volume((256, 256), centre_yx=(128, 128), radius=30, n_slices=40)
    clean, _ = network_window(volume, config)
    rng = np.random.default_rng(0)
    for z in range(40):  # scattered bright noise pixels, a few per slice
        volume[z, rng.integers(0, 256, 30), rng.integers(0, 256, 30)] = 500
    assert network_window(volume, config)[0] == clean
