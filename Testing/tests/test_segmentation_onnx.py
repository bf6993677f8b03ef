"""The shipped ONNX graph, the graph cache, and segmenting with onnxruntime alone (no torch)."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from HRpQCTCore.artefacts import sha256_file, verified_path
from HRpQCTCore.errors import ArtefactError
from HRpQCTSegmentationEngine import onnx_graph
from HRpQCTSegmentationEngine.bundled import resolve_model_folder
from HRpQCTSegmentationEngine.export_onnx import add_onnx_graph
from HRpQCTSegmentationEngine.inference import prepare_segmenter, run_segmentation
from HRpQCTSegmentationEngine.model import (
    METADATA_FILE,
    load_model,
    read_model_metadata,
    save_model,
)
from HRpQCTSegmentationEngine.preprocessing import (
    CropBox,
    PreprocessingConfig,
    crop_box_for_scan,
    logits_to_labels_batch,
    logits_to_labels_numpy,
    preprocess_slices,
    preprocess_slices_numpy,
)

pytest.importorskip("onnxruntime")

#: Imports blocked in the torch-free subprocesses (a meta-path finder raising ImportError).
BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'torchvision'):
                raise ImportError('blocked in this test: ' + name)
    sys.meta_path.insert(0, Block())
""")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty graph cache."""
    monkeypatch.setenv(onnx_graph.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def bundled_folder():
    return resolve_model_folder(None)


@pytest.fixture(scope="module")
def phantom_hu(small_phantom):
    """Four slices of the small phantom (HU, int16): quick at the bundled 800 x 800 input."""
    return np.ascontiguousarray(small_phantom.scan.hu[:4])


def _tiny_folder(model, config, folder):
    save_model(model, folder, preprocessing=config)
    return folder


# ------------------------------------------------------------------------------------------
# The shipped graph
# ------------------------------------------------------------------------------------------
def test_shipped_graph_equals_the_torch_reference(bundled_folder, phantom_hu):
    metadata = read_model_metadata(bundled_folder)
    graph = onnx_graph.folder_graph(bundled_folder, metadata, metadata.preprocessing.input_yx)
    assert graph is not None and graph.source == onnx_graph.SOURCE_BUNDLED
    config = metadata.preprocessing
    box = crop_box_for_scan(phantom_hu, config)
    pixels = preprocess_slices(phantom_hu[1:2], box, config)
    with torch.inference_mode():
        reference = load_model(bundled_folder)(pixels).logits.numpy()  # the stock network
    logits = onnx_graph.OnnxSession(graph.path).run(pixels.numpy())
    assert logits.shape == reference.shape
    assert np.abs(logits - reference).max() / np.abs(reference).max() < 1e-4
    np.testing.assert_array_equal(logits.argmax(1), reference.argmax(1))


def test_sessions_without_the_memory_pattern_give_the_same_logits(bundled_folder, phantom_hu):
    """Ours plans no memory pattern (less resident memory); the logits are ONNX Runtime's
    default's, bit for bit, on the first call (which plans the pattern) and later ones."""
    metadata = read_model_metadata(bundled_folder)
    config = metadata.preprocessing
    graph = onnx_graph.folder_graph(bundled_folder, metadata, config.input_yx)
    box = crop_box_for_scan(phantom_hu, config)
    inputs = [preprocess_slices(phantom_hu[z:z + 1], box, config).numpy() for z in (0, 2)]
    ours = onnx_graph.OnnxSession(graph.path)
    default = onnx_graph.OnnxSession(graph.path, memory_pattern=True)
    assert not ours.session.get_session_options().enable_mem_pattern
    assert default.session.get_session_options().enable_mem_pattern
    for pixels in inputs:
        np.testing.assert_array_equal(ours.run(pixels), default.run(pixels))


def test_shipped_graph_is_a_checksummed_artefact_tied_to_the_metadata(bundled_folder):
    path = verified_path("segformer-b0-phantoms:onnx")
    assert path == bundled_folder / onnx_graph.ONNX_FILE
    extra = read_model_metadata(bundled_folder).extra
    assert extra["onnx_sha256"] == sha256_file(path)
    assert extra["onnx_weights_sha256"] == read_model_metadata(bundled_folder).weights_sha256
    assert verified_path("segformer-b0-phantoms") == bundled_folder / METADATA_FILE


def test_bundled_model_runs_the_shipped_graph(bundled_folder, caplog):
    with caplog.at_level(logging.INFO, logger="HRpQCTSegmentationEngine"):
        runner, _ = prepare_segmenter(bundled_folder, device="cpu")
    assert runner.engine == "onnx" and runner.source == onnx_graph.SOURCE_BUNDLED
    assert "ONNX Runtime, bundled graph" in caplog.text
    assert not onnx_graph.cache_dir().exists()  # nothing exported, nothing cached


# ------------------------------------------------------------------------------------------
# A user's folder: its own graph, the cache
# ------------------------------------------------------------------------------------------
def test_export_script_adds_a_verified_graph_to_a_folder(random_b0, tiny_preprocessing,
                                                         tmp_path):
    folder = _tiny_folder(random_b0, tiny_preprocessing, tmp_path / "model")
    graph = add_onnx_graph(folder)
    meta = json.loads((folder / METADATA_FILE).read_text())
    assert meta["onnx_file"] == graph.name and meta["onnx_sha256"] == sha256_file(graph)
    read_model_metadata(folder)  # still a valid model folder
    runner, _ = prepare_segmenter(folder, device="cpu")
    assert runner.source == onnx_graph.SOURCE_FOLDER
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")  # damaged or swapped
    with pytest.raises(ArtefactError, match="checksum"):
        prepare_segmenter(folder, device="cpu")


def test_a_folder_without_graph_is_exported_once_then_cached(random_b0, tiny_preprocessing,
                                                             tmp_path, caplog):
    folder = _tiny_folder(random_b0, tiny_preprocessing, tmp_path / "model")
    volume = np.random.default_rng(0).normal(0, 400, (3, 70, 90)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="HRpQCTSegmentationEngine"):
        first, _ = prepare_segmenter(folder, device="cpu")
        second, _ = prepare_segmenter(folder, device="cpu")
    assert first.source == onnx_graph.SOURCE_EXPORTED
    assert second.source == onnx_graph.SOURCE_CACHED
    assert "ONNX Runtime, exported now" in caplog.text
    assert "ONNX Runtime, cached graph" in caplog.text
    (cached,) = onnx_graph.cache_dir().glob("*.onnx")
    assert cached.name == onnx_graph.cache_key(folder, read_model_metadata(folder)) + ".onnx"
    expected = run_segmentation(volume, folder, device="cpu", engine="torch").labels
    np.testing.assert_array_equal(
        run_segmentation(volume, second, config=tiny_preprocessing).labels, expected)
    # A cache file that no longer matches its record is never used: it is exported again.
    cached.write_bytes(b"not a graph")
    third, _ = prepare_segmenter(folder, device="cpu")
    assert third.source == onnx_graph.SOURCE_EXPORTED
    assert onnx_graph.cached_graph(cached.stem) is not None


def test_an_unwritable_cache_exports_to_a_temporary_file(random_b0, tiny_preprocessing,
                                                         tmp_path, monkeypatch):
    folder = _tiny_folder(random_b0, tiny_preprocessing, tmp_path / "model")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv(onnx_graph.CACHE_ENV, str(blocker))
    runner, config = prepare_segmenter(folder, device="cpu")
    assert runner.source == onnx_graph.SOURCE_EXPORTED
    assert not runner.segmenter.path.exists()  # removed once the session held it
    volume = np.random.default_rng(1).normal(0, 400, (2, 70, 90)).astype(np.float32)
    np.testing.assert_array_equal(
        run_segmentation(volume, runner, config=config).labels,
        run_segmentation(volume, folder, device="cpu", engine="torch").labels)


def test_other_weights_get_another_cache_entry(random_b0, tiny_preprocessing, tmp_path):
    folder = _tiny_folder(random_b0, tiny_preprocessing, tmp_path / "model")
    key = onnx_graph.cache_key(folder, read_model_metadata(folder))
    with torch.no_grad():
        next(random_b0.parameters()).add_(1.0)
    save_model(random_b0, folder, preprocessing=tiny_preprocessing)
    assert onnx_graph.cache_key(folder, read_model_metadata(folder)) != key


def test_one_graph_takes_any_input_size_and_equals_torch(bundled_folder):
    """The shipped graph has open rows and columns: the leg-fitted inputs run on it."""
    metadata = read_model_metadata(bundled_folder)
    session = onnx_graph.OnnxSession(verified_path("segformer-b0-phantoms:onnx"))
    assert session.input_yx is None and metadata.extra["onnx_input_yx"] is None
    model = load_model(bundled_folder)
    rng = np.random.default_rng(5)
    for shape in [(256, 192), (160, 224)]:
        pixels = rng.random((1, 1, *shape), dtype=np.float32)
        with torch.inference_mode():
            reference = model(torch.from_numpy(pixels)).logits.numpy()
        logits = session.run(pixels)
        assert logits.shape == (1, 6, shape[0] // 4, shape[1] // 4)
        assert np.abs(logits - reference).max() / np.abs(reference).max() < 1e-4


def test_a_graph_fixed_to_one_input_size_gets_the_whole_window(random_b0, tmp_path, caplog):
    """A folder graph of the older kind (rows and columns fixed at export) still runs: the
    network sees the whole crop window, and the log says how to re-create the graph."""
    from dataclasses import replace

    from HRpQCTSegmentationEngine.fast import FastSegformer, _LogitsOnly

    config = PreprocessingConfig(crop_yx=(128, 128), input_yx=(64, 64), leg_margin_px=4,
                                 input_multiple_px=8)
    folder = _tiny_folder(random_b0, config, tmp_path / "model")
    graph = folder / "model.onnx"
    with torch.inference_mode():
        torch.onnx.export(_LogitsOnly(FastSegformer(random_b0)).eval(),
                          (torch.zeros(1, 1, 64, 64),), str(graph), dynamo=False,
                          opset_version=onnx_graph.ONNX_OPSET, input_names=["pixel_values"],
                          output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    meta = json.loads((folder / METADATA_FILE).read_text())
    meta.update(onnx_graph.onnx_metadata(graph, read_model_metadata(folder).weights_sha256,
                                         (64, 64)))
    (folder / METADATA_FILE).write_text(json.dumps(meta))
    yy, xx = np.mgrid[:140, :150]
    leg = (yy - 70) ** 2 + (xx - 75) ** 2 <= 12**2  # a small leg: "leg" would narrow
    noise = np.random.default_rng(2).normal(0, 300, (3, 140, 150))
    volume = np.where(leg, 40 + noise, -1000).astype(np.float32)

    runner, _ = prepare_segmenter(folder, device="cpu")
    assert runner.source == onnx_graph.SOURCE_FOLDER and runner.fixed_input_yx == (64, 64)
    with caplog.at_level(logging.INFO, logger="HRpQCTSegmentationEngine"):
        labels = run_segmentation(volume, runner, config=config).labels
    assert "takes only 64 x 64 inputs" in caplog.text and "export_onnx" in caplog.text
    assert "sees the leg's" not in caplog.text
    whole = replace(config, input_fit="field")
    np.testing.assert_array_equal(
        labels, run_segmentation(volume, folder, device="cpu", engine="torch",
                                 config=whole).labels)
    caplog.clear()  # the torch engine takes any size: there the network sees only the leg
    with caplog.at_level(logging.INFO, logger="HRpQCTSegmentationEngine"):
        run_segmentation(volume, folder, device="cpu", engine="torch", config=config)
    assert "sees the leg's 64 x 64 voxels of the 128 x 128 crop window (input 32 x 32)" \
        in caplog.text


# ------------------------------------------------------------------------------------------
# numpy pre- and post-processing (used without torch)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("low", "crop"), [(200, 1600), (50, 400)])
def test_numpy_logits_to_labels_is_bit_identical_to_torch(low, crop):
    rng = np.random.default_rng(low)
    logits = (rng.normal(0, 3, (2, 6, low, low))).astype(np.float32)
    logits[:, 2] = logits[:, 1]  # exact ties: the first class wins in both
    box = CropBox(y0=-crop // 16, x0=crop // 10, height=crop, width=crop)
    shape = (crop - crop // 8, crop + crop // 5)
    expected = logits_to_labels_batch(torch.from_numpy(logits), box, shape)
    np.testing.assert_array_equal(logits_to_labels_numpy(logits, box, shape), expected)
    from HRpQCTSegmentationEngine._numpy_resize import bilinear_upsample_rows_cols

    full = torch.nn.functional.interpolate(torch.from_numpy(logits[:1]), size=(crop, crop),
                                           mode="bilinear", align_corners=False)[0, 3].numpy()
    window = bilinear_upsample_rows_cols(logits[0, 3], (crop, crop), slice(5, crop - 7),
                                         slice(0, crop))
    np.testing.assert_array_equal(window, full[5:crop - 7])


def test_numpy_preprocessing_is_within_float_rounding_of_torch(phantom_hu):
    config = PreprocessingConfig()
    box = crop_box_for_scan(phantom_hu, config)
    expected = preprocess_slices(phantom_hu[:2], box, config).numpy()
    got = preprocess_slices_numpy(phantom_hu[:2], box, config)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() <= 4e-7
    same_size = PreprocessingConfig(crop_yx=(64, 64), input_yx=(64, 64))
    small_box = CropBox(-5, 3, 64, 64)
    np.testing.assert_array_equal(preprocess_slices_numpy(phantom_hu[:1], small_box, same_size),
                                  preprocess_slices(phantom_hu[:1], small_box, same_size).numpy())
    # A crop smaller than the input (a scan coarser than the model's voxel size, resampled
    # to it) is enlarged by plain bicubic interpolation, as torch does without antialiasing.
    enlarging = PreprocessingConfig(crop_yx=(37, 51), input_yx=(100, 90))
    box = CropBox(10, 20, 37, 51)
    expected = preprocess_slices(phantom_hu[:2], box, enlarging).numpy()
    got = preprocess_slices_numpy(phantom_hu[:2], box, enlarging)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 2e-6


# ------------------------------------------------------------------------------------------
# Without torch
# ------------------------------------------------------------------------------------------
def _run_blocked(code: str, tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, HRPQCT_CACHE_DIR=str(tmp_path / "blocked-cache"))
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow  # over 20 s on 2 loaded cores
def test_segmenting_needs_no_torch(bundled_folder, phantom_hu, tmp_path):
    np.save(tmp_path / "hu.npy", phantom_hu)
    expected = run_segmentation(phantom_hu, bundled_folder, device="cpu", engine="torch",
                                fast=False).labels  # the stock torch model, torch throughout
    code = f"""
        import importlib, sys
        import numpy as np
        for name in ("HRpQCTSegmentationEngine.inference", "HRpQCTSegmentationEngine.onnx_graph",
                     "HRpQCTSegmentationEngine.preprocessing", "HRpQCTSegmentationEngine.model",
                     "HRpQCTSegmentationEngine.bundled", "HRpQCTSegmentationEngine.postprocess",
                     "HRpQCTSegmentationEngine.export_onnx", "HRpQCTPipeline.cli"):
            importlib.import_module(name)
        from HRpQCTSegmentationEngine.bundled import resolve_model_folder
        from HRpQCTSegmentationEngine.inference import run_segmentation
        result = run_segmentation(np.load({str(tmp_path / "hu.npy")!r}),
                                  resolve_model_folder(None))
        np.save({str(tmp_path / "labels.npy")!r}, result.labels)
        assert result.engine == "onnx", result.engine
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
    """
    result = _run_blocked(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), expected)


@pytest.mark.slow  # over 20 s on 2 loaded cores
def test_the_segment_command_needs_no_torch(small_phantom, tmp_path):
    from HRpQCTCore.io import read_label_map, write_scan

    scan_path = write_scan(small_phantom.scan, tmp_path / "scan.nii.gz")
    code = f"""
        import runpy, sys
        sys.argv = ["hrpqct", "segment", {str(scan_path)!r}, {str(tmp_path / "regions.nii.gz")!r},
                    "--progress", "none"]
        try:
            runpy.run_module("HRpQCTPipeline", run_name="__main__")
        except SystemExit as exc:
            assert not exc.code, exc.code
        assert "torch" not in sys.modules
    """
    result = _run_blocked(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "regions.nii.gz").is_file()
    assert read_label_map(tmp_path / "regions.nii.gz").max() > 0


def test_a_folder_without_graph_says_what_to_install_without_torch(random_b0,
                                                                   tiny_preprocessing,
                                                                   tmp_path):
    folder = _tiny_folder(random_b0, tiny_preprocessing, tmp_path / "model")
    code = f"""
        from HRpQCTSegmentationEngine.inference import prepare_segmenter
        try:
            prepare_segmenter({str(folder)!r})
        except Exception as exc:
            print(exc)
    """
    result = _run_blocked(code, tmp_path)
    assert "export_onnx" in result.stdout and "torch" in result.stdout, result.stderr[-2000:]
    shutil.rmtree(folder)
