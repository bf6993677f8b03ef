"""Whole-scan inference, the folded fast path, ONNX Runtime, and bad inputs."""

import logging

import numpy as np
import pytest
import torch
from _fixtures_segmentation import randomise_batch_norm

from HRpQCTCore.errors import CancelledError, InvalidScanError
from HRpQCTCore.progress import CancelToken
from HRpQCTCore.regions import NETWORK_CLASSES
from HRpQCTSegmentationEngine import inference
from HRpQCTSegmentationEngine.fast import (
    FastSegformer,
    OnnxSegmenter,
    fold_decoder,
    onnx_available,
)
from HRpQCTSegmentationEngine.inference import run_segmentation, segment_volume
from HRpQCTSegmentationEngine.model import (
    WEIGHTS_FILE,
    CorruptModelError,
    ModelChecksumError,
    build_model,
    save_model,
)
from HRpQCTSegmentationEngine.preprocessing import (
    crop_box_for_scan,
    logits_to_labels_batch,
    preprocess_slices,
)


def small_scan(n_slices=5, shape_yx=(70, 90), seed=0):
    """Air with an off-centre leg: soft tissue, a bright cortex ring and a marrow core."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape_yx[0], :shape_yx[1]]
    r = np.hypot(yy - 30, xx - 50)
    slice_ = np.where(r < 25, 40.0, -1000.0)
    slice_ = np.where((r < 12) & (r > 8), 1500.0, slice_)
    slice_ = np.where(r <= 8, 300.0, slice_)
    volume = np.repeat(slice_[None], n_slices, axis=0)
    return (volume + rng.normal(0, 20, volume.shape)).astype(np.int16)


def reference_labels(model, volume, config):
    """Straightforward per-slice reference: stock model, one slice at a time."""
    box = crop_box_for_scan(volume, config)
    out = []
    with torch.inference_mode():
        for hu_slice in volume:
            logits = model(preprocess_slices(hu_slice[None], box, config)).logits
            out.append(logits_to_labels_batch(logits, box, hu_slice.shape, config)[0])
    return np.stack(out)


def test_folded_decoder_equals_reference(random_b0):
    fast = FastSegformer(random_b0)
    torch.manual_seed(3)
    x = torch.rand(2, 1, 96, 80)
    with torch.inference_mode():
        reference = random_b0(x).logits
        folded = fast(x)
    assert folded.shape == reference.shape
    scale = reference.abs().max()
    assert float((folded - reference).abs().max() / scale) < 1e-4
    assert torch.equal(folded.argmax(1), reference.argmax(1))


def test_folding_uses_the_batch_norm_statistics():
    model = build_model("b0", seed=5).eval()
    before = fold_decoder(model)["bias"].clone()
    randomise_batch_norm(model, seed=11)
    assert not torch.allclose(fold_decoder(model)["bias"], before)
    with pytest.raises(ValueError, match="eval"):
        FastSegformer(model.train())
    model.eval()


def test_segment_volume_matches_per_slice_reference(random_b0, tiny_preprocessing):
    volume = small_scan()
    reports = []
    result = run_segmentation(volume, random_b0, config=tiny_preprocessing, batch_size=2,
                              device="cpu", fast=True, engine="torch",
                              progress=lambda d, t, s: reports.append((d, t)))
    expected = reference_labels(random_b0, volume, tiny_preprocessing)
    assert result.labels.dtype == np.uint8 and result.labels.shape == volume.shape
    np.testing.assert_array_equal(result.labels, expected)
    assert result.labels.max() < len(NETWORK_CLASSES)
    assert reports[0] == (0, 5) and reports[-1] == (5, 5) and len(reports) == 4
    assert result.slice_confidence.shape == (5,)
    assert np.all((result.slice_confidence > 1 / len(NETWORK_CLASSES))
                  & (result.slice_confidence <= 1))
    assert result.engine == "torch-fast" and result.device == "cpu"
    stock = segment_volume(volume, random_b0, config=tiny_preprocessing, batch_size=3,
                           device="cpu", fast=False)
    np.testing.assert_array_equal(stock, expected)


def test_model_folder_carries_its_preprocessing(random_b0, tiny_preprocessing, tmp_path):
    save_model(random_b0, tmp_path, preprocessing=tiny_preprocessing)
    volume = small_scan(n_slices=2)
    # Preprocessing settings come from the folder; "auto" picks ONNX Runtime on the CPU
    # when it is installed (the `fast` extra), else the folded torch model.
    result = run_segmentation(volume, tmp_path, device="cpu")
    assert result.engine == ("onnx" if onnx_available() else "torch-fast")
    labels = result.labels
    np.testing.assert_array_equal(labels, reference_labels(random_b0, volume,
                                                           tiny_preprocessing))


def test_onnx_engine_equals_torch(random_b0, tiny_preprocessing):
    volume = small_scan(n_slices=3)
    segmenter = OnnxSegmenter.from_model(random_b0, input_yx=tiny_preprocessing.input_yx)
    x = torch.rand(3, 1, *tiny_preprocessing.input_yx)
    with torch.inference_mode():
        reference = random_b0(x).logits
    onnx_logits = segmenter(x)
    assert float((onnx_logits - reference).abs().max() / reference.abs().max()) < 1e-4
    assert torch.equal(onnx_logits.argmax(1), reference.argmax(1))
    labels = segment_volume(volume, segmenter, config=tiny_preprocessing)
    np.testing.assert_array_equal(labels, reference_labels(random_b0, volume,
                                                           tiny_preprocessing))


def test_cancel_between_batches(random_b0, tiny_preprocessing):
    token = CancelToken()
    seen = []

    def progress(done, total, stage):
        seen.append(done)
        if done >= 2:
            token.cancel()

    with pytest.raises(CancelledError):
        segment_volume(small_scan(n_slices=6), random_b0, config=tiny_preprocessing,
                       batch_size=2, device="cpu", engine="torch", progress=progress,
                       cancel=token)
    assert seen == [0, 2]


class _GpuThatRunsOutOfMemory(torch.nn.Module):
    """Stands in for a model on a GPU whose memory is too small (the tests have no GPU)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.on_gpu = False
        self.calls_on_gpu = 0

    def to(self, device):
        self.on_gpu = torch.device(device).type != "cpu"
        return self

    def forward(self, pixel_values):
        if self.on_gpu:
            self.calls_on_gpu += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return self.model(pixel_values)


def test_gpu_out_of_memory_falls_back_to_cpu(random_b0, tiny_preprocessing, monkeypatch,
                                             caplog):
    # Only the device transfer is simulated; everything else runs for real on the CPU.
    monkeypatch.setattr(inference, "_move",
                        lambda obj, device: obj.to(device) if isinstance(obj, torch.nn.Module)
                        else obj)
    gpu_model = _GpuThatRunsOutOfMemory(random_b0)
    volume = small_scan(n_slices=3)
    with caplog.at_level(logging.WARNING):
        result = run_segmentation(volume, gpu_model, config=tiny_preprocessing,
                                  device="cuda", fast=False)
    assert gpu_model.calls_on_gpu == 1 and not gpu_model.on_gpu
    assert result.device == "cpu"
    assert "continuing on the CPU" in caplog.text
    np.testing.assert_array_equal(result.labels,
                                  reference_labels(random_b0, volume, tiny_preprocessing))


@pytest.mark.parametrize("shape", [(70, 90), (1, 2, 70, 90)])
def test_wrong_dimensionality_is_refused(shape, random_b0, tiny_preprocessing):
    with pytest.raises(InvalidScanError, match="3D scan"):
        segment_volume(np.zeros(shape, np.int16), random_b0, config=tiny_preprocessing)


def test_nan_voxels_are_refused(random_b0, tiny_preprocessing):
    volume = small_scan(n_slices=3).astype(np.float32)
    volume[2, 5, 5] = np.nan
    with pytest.raises(InvalidScanError, match="NaN"):
        segment_volume(volume, random_b0, config=tiny_preprocessing, device="cpu",
                       engine="torch")


def test_damaged_model_folders_are_refused(random_b0, tmp_path):
    save_model(random_b0, tmp_path / "truncated")
    weights = tmp_path / "truncated" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptModelError, match="copy or download"):
        segment_volume(small_scan(n_slices=1), tmp_path / "truncated")
    save_model(random_b0, tmp_path / "swapped")
    save_model(build_model("b0", seed=2), tmp_path / "other")
    (tmp_path / "other" / WEIGHTS_FILE).replace(tmp_path / "swapped" / WEIGHTS_FILE)
    with pytest.raises(ModelChecksumError, match="re-copy"):
        segment_volume(small_scan(n_slices=1), tmp_path / "swapped")
