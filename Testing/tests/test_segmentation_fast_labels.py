"""The fast logits -> labels step returns the reference's labels exactly."""

import numpy as np
import pytest
import torch

from HRpQCTSegmentationEngine import fast_labels
from HRpQCTSegmentationEngine.fast_labels import logits_to_labels_fast, uncertain_background
from HRpQCTSegmentationEngine.preprocessing import (
    CropBox,
    logits_to_labels_batch,
    logits_to_labels_numpy,
)


def leg_like_logits(n_low: int, n_slices: int = 2, channels: int = 6, seed: int = 0):
    """Logits with an air margin (background wins clearly), a leg of smooth class fields,
    exact ties and near-ties at the margin's threshold."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n_low, :n_low] / n_low
    logits = rng.normal(0, 2, (n_slices, channels, n_low, n_low)).astype(np.float32)
    for i in range(n_slices):
        leg = np.hypot(yy - 0.45 - 0.05 * i, xx - 0.55) < 0.3
        logits[i, 0] = np.where(leg, logits[i, 0] - 6, logits[i, 1:].max(axis=0) + 4)
    logits[:, 2, :3] = logits[:, 1, :3]  # exact ties: the first class wins
    scale = np.abs(logits).max()
    near = logits[:, 1:].max(axis=1) + fast_labels.MARGIN_RELATIVE * scale * 1.0001
    logits[:, 0, -2:] = near[:, -2:]  # just past the margin: skipped, yet background
    logits[:, 0, :, :2] = logits[:, 1:, :, :2].max(axis=1)  # ties with background
    return logits


@pytest.mark.parametrize(("n_low", "crop", "box_yx", "shape"), [
    (200, 1600, (-22, 21), (1600, 1600)),  # the bundled model on the demo scan
    (200, 1600, (-300, -250), (1200, 1100)),  # crop reaches past the scan on two sides
    (50, 400, (10, -7), (380, 420)),
    (100, 400, (0, 0), (400, 400)),  # ratio 4
    (64, 128, (3, 5), (120, 140)),  # ratio 2
    (200, 200, (0, 0), (190, 210)),  # ratio 1: no upsampling
    (60, 400, (5, 5), (400, 400)),  # not a power of two: the reference itself
    (8, 64, (0, 0), (64, 64)),  # a tiny output: the reference itself
])
def test_torch_labels_equal_the_reference(n_low, crop, box_yx, shape):
    logits = torch.from_numpy(leg_like_logits(n_low))
    box = CropBox(y0=box_yx[0], x0=box_yx[1], height=crop, width=crop)
    expected = logits_to_labels_batch(logits, box, shape)
    got = logits_to_labels_fast(logits, box, shape)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("n_low", "crop"), [(200, 1600), (50, 400), (60, 400)])
def test_numpy_labels_equal_the_numpy_reference(n_low, crop):
    logits = leg_like_logits(n_low, seed=3)
    box = CropBox(y0=-crop // 16, x0=crop // 10, height=crop, width=crop)
    shape = (crop - crop // 8, crop + crop // 5)
    np.testing.assert_array_equal(logits_to_labels_fast(logits, box, shape),
                                  logits_to_labels_numpy(logits, box, shape))


def test_narrow_bands_use_the_same_kernel(monkeypatch):
    """One low-resolution row per band and a single uncertain pixel: windows far below
    torch's 128-pixel kernel switch are widened, and still equal the reference."""
    monkeypatch.setattr(fast_labels, "BAND_LOWRES_ROWS", 1)
    logits = leg_like_logits(200, n_slices=1)
    logits[0, 0] = logits[0, 1:].max(axis=0) + 5
    logits[0, 0, 100, 37] = logits[0, 3, 100, 37] - 1  # one uncertain pixel
    box = CropBox(y0=0, x0=0, height=1600, width=1600)
    expected = logits_to_labels_batch(torch.from_numpy(logits), box, (1600, 1600))
    assert (expected != 0).any()
    np.testing.assert_array_equal(
        logits_to_labels_fast(torch.from_numpy(logits), box, (1600, 1600)), expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_give_the_reference_labels(bad):
    logits = leg_like_logits(50, n_slices=1)
    logits[0, 2, 20:23, 30] = bad
    box = CropBox(y0=0, x0=0, height=400, width=400)
    assert uncertain_background(logits[0]).all()  # nothing is skipped
    np.testing.assert_array_equal(
        logits_to_labels_fast(torch.from_numpy(logits), box, (400, 400)),
        logits_to_labels_batch(torch.from_numpy(logits), box, (400, 400)))


def test_clear_background_is_never_upsampled(monkeypatch):
    calls = []
    monkeypatch.setattr(fast_labels, "_torch_window",
                        lambda *a, **k: calls.append(a) or None)
    logits = np.zeros((1, 6, 50, 50), dtype=np.float32)
    logits[:, 0] = 3.0
    box = CropBox(y0=0, x0=0, height=400, width=400)
    labels = logits_to_labels_fast(torch.from_numpy(logits), box, (400, 400))
    assert not calls and not labels.any()


def test_the_torch_mask_equals_the_numpy_mask():
    logits = leg_like_logits(50, n_slices=1)[0]
    np.testing.assert_array_equal(uncertain_background(torch.from_numpy(logits)),
                                  uncertain_background(logits))


def test_the_device_path_runs_on_the_cpu_device():
    """The code a GPU runs (torch tensors on ``device``) exercised with device "cpu"."""
    logits = torch.from_numpy(leg_like_logits(200, n_slices=1)).to(torch.device("cpu"))
    box = CropBox(y0=-22, x0=21, height=1600, width=1600)
    np.testing.assert_array_equal(logits_to_labels_fast(logits, box, (1600, 1600)),
                                  logits_to_labels_batch(logits, box, (1600, 1600)))


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    logits = torch.from_numpy(leg_like_logits(50, n_slices=1))
    logits_to_labels_fast(logits, CropBox(y0=0, x0=0, height=400, width=400), (400, 400))
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------
# The whole loop, on the code path a GPU takes (torch engine, tensors on the device)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_segmenting_gives_the_reference_labels(random_b0, engine):
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.preprocessing import (
        PreprocessingConfig,
        network_window,
        preprocess_slices,
    )

    config = PreprocessingConfig(crop_yx=(400, 400), input_yx=(200, 200))  # logits x 8
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:300, :380]
    leg = np.hypot(yy - 140, xx - 200) < 110
    volume = np.where(leg, 40.0, -1000.0) + rng.normal(0, 150, (3, 300, 380))
    volume = volume.astype(np.float32)
    result = run_segmentation(volume, random_b0, config=config, device="cpu", engine=engine)
    box, fitted = network_window(volume, config)  # the leg's part of the window
    assert result.crop_box == box and box.shape < config.crop_yx
    with torch.inference_mode():
        expected = np.stack([
            logits_to_labels_batch(random_b0(preprocess_slices(s[None], box, fitted)).logits,
                                   box, s.shape)[0] for s in volume])
    np.testing.assert_array_equal(result.labels, expected)


def test_cuda_runs_in_full_float32_and_restores_the_setting():
    from types import SimpleNamespace

    from HRpQCTSegmentationEngine.inference import _full_float32_on_cuda

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        with _full_float32_on_cuda(SimpleNamespace(type="cuda")):
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        with _full_float32_on_cuda(torch.device("cpu")):
            assert torch.backends.cudnn.allow_tf32  # the CPU is left alone
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
