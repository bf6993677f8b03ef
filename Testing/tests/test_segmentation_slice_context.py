"""Inter-slice context (2.5D): neighbours as channels in training, inflation, inference, CLI."""

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from _fixtures_segmentation import randomise_batch_norm

from HRpQCTCore.errors import ArtefactError, HRpQCTError
from HRpQCTPipeline.cli import main
from HRpQCTSegmentationEngine import training
from HRpQCTSegmentationEngine.inference import _NetworkInputs, run_segmentation
from HRpQCTSegmentationEngine.model import (
    METADATA_FILE,
    ModelFolderError,
    build_model,
    inflate_input_channels,
    load_model,
    read_model_metadata,
    save_model,
    slice_context_of_model,
)
from HRpQCTSegmentationEngine.preprocessing import (
    crop_box_for_scan,
    neighbour_indices,
    preprocess_slices,
    preprocess_slices_numpy,
)
from HRpQCTSegmentationEngine.training import (
    SliceDataset,
    TrainingCase,
    TrainingConfig,
    fine_tune_config,
    load_slices,
    parse_slice_list,
    train_segmenter,
)
from HRpQCTSegmentationEngine.unet import UNet

pytest_plugins = ["_fixtures_segmentation"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty ONNX graph cache."""
    from HRpQCTSegmentationEngine import onnx_graph

    monkeypatch.setenv(onnx_graph.CACHE_ENV, str(tmp_path / "cache"))


def _layered_leg(n_slices: int = 6, shape_yx=(70, 90), seed: int = 0):
    """A leg whose bone ring grows along z (so neighbouring slices differ) and its regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape_yx[0], :shape_yx[1]]
    r = np.hypot(yy - 32, xx - 48)
    hu, regions = [], []
    for z in range(n_slices):
        outer = 10.0 + 1.5 * z
        lab = np.where(r < outer, 1, np.where(r < 26, 7, 0)).astype(np.uint8)
        regions.append(lab)
        hu.append(np.select([lab == 1, lab == 7], [1600.0 - 60 * z, -80.0], -1000.0))
    hu = np.stack(hu) + rng.normal(0, 30, (n_slices, *shape_yx))
    return hu.astype(np.float32), np.stack(regions)


def _write_case(folder, name, hu, labels):
    from HRpQCTCore.io import write_label_map, write_scan
    from HRpQCTCore.scan import Scan

    scan = Scan(hu, (0.5, 0.25, 0.25))
    return (write_scan(scan, folder / f"{name}.nii.gz"),
            write_label_map(labels, scan, folder / f"{name}_labels.nii.gz"))


def _kernel(model):
    """The first convolution kernel (the SegFormer's first patch embedding, the U-Net's first
    convolution): the only one that sees the input."""
    return next(p for p in model.parameters() if p.ndim == 4)


def _shifted_to(model_2d, channel: int):
    """A 2.5D model that computes the 2D model's output on one neighbour channel only."""
    model = inflate_input_channels(model_2d, 1)
    with torch.no_grad():
        kernel = _kernel(model)
        centre = kernel[:, 1].clone()
        kernel.zero_()
        kernel[:, channel] = centre
    return model.eval()


# ------------------------------------------------------------------------------------------
# Neighbours and their repeated ends
# ------------------------------------------------------------------------------------------
def test_neighbours_repeat_the_edge_slices():
    assert [neighbour_indices(z, 4, 1).tolist() for z in range(4)] == [
        [0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert neighbour_indices(1, 4, 2).tolist() == [0, 0, 1, 2, 3]
    assert neighbour_indices(0, 1, 1).tolist() == [0, 0, 0]  # a one-slice scan
    assert neighbour_indices(2, 4, 0).tolist() == [2]
    with pytest.raises(ValueError, match="neighbour slices on each side"):
        neighbour_indices(0, 4, -1)
    with pytest.raises(IndexError):
        neighbour_indices(4, 4, 1)


@pytest.mark.parametrize("preprocess", [preprocess_slices, preprocess_slices_numpy])
def test_inference_inputs_stream_neighbours_with_bounded_memory(preprocess, tiny_preprocessing):
    hu, _ = _layered_leg(n_slices=7)
    box = crop_box_for_scan(hu, tiny_preprocessing)
    single = np.asarray(preprocess(hu, box, tiny_preprocessing))[:, 0]
    inputs = _NetworkInputs(hu, box, tiny_preprocessing, preprocess, 1)
    for z0 in range(0, 7, 3):
        z1 = min(z0 + 3, 7)
        batch = np.asarray(inputs.batch(z0, z1))
        assert batch.shape == (z1 - z0, 3, 32, 32)
        for i, z in enumerate(range(z0, z1)):
            np.testing.assert_array_equal(batch[i], single[neighbour_indices(z, 7, 1)])
        assert len(inputs._ready) <= 2  # only the next batch's neighbours are kept


def test_training_slices_carry_their_neighbours_and_only_centre_labels(tmp_path,
                                                                        tiny_preprocessing):
    hu, regions = _layered_leg(n_slices=6)
    partial = regions.copy()
    partial[[1, 4]] = 255  # not annotated: only slices 0, 2, 3 and 5 are, and only they train
    image, labels = _write_case(tmp_path, "a", hu, partial)
    case = TrainingCase("s1", image, labels, parse_slice_list("0,2-3,5"))
    flat = load_slices([TrainingCase("s1", image, labels)], tiny_preprocessing, 0)
    assert flat.images.shape == (6, 32, 32) and flat.slice_context == 0
    deep = load_slices([case], tiny_preprocessing, 0, slice_context=1)
    assert deep.images.shape == (4, 3, 32, 32) and deep.slice_context == 1
    for i, z in enumerate((0, 2, 3, 5)):
        np.testing.assert_array_equal(deep.images[i], flat.images[neighbour_indices(z, 6, 1)])
        np.testing.assert_array_equal(deep.labels[i], flat.labels[z])
    np.testing.assert_array_equal(deep.images[0, 0], deep.images[0, 1])  # z = 0 repeated


def test_one_augmentation_for_all_channels_of_a_patch():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    lab = (np.hypot(yy - 30, xx - 34) < 12).astype(np.uint8)
    image = np.where(lab == 1, 0.6, 0.3) + rng.normal(0, 0.01, lab.shape)
    images = np.repeat(image[None, None], 3, axis=1).repeat(4, axis=0).astype(np.float16)
    data = SliceDataset(images, np.repeat(lab[None], 4, axis=0), ["s"] * 4)
    quiet = TrainingConfig(crop_px=32, batch_size=5, augmentation=training.AugmentationConfig(
        extra_noise_sd_hu=0.0))
    x, y = training._sample_batch(data, quiet, np.random.default_rng(3))
    assert x.shape == (5, 3, 32, 32) and y.shape == (5, 32, 32)
    # identical channels stay identical: one rotation, flip, crop and intensity change
    torch.testing.assert_close(x[:, 0], x[:, 1], rtol=0, atol=0)
    torch.testing.assert_close(x[:, 2], x[:, 1], rtol=0, atol=0)
    noisy, _ = training._sample_batch(data, TrainingConfig(crop_px=32, batch_size=5),
                                      np.random.default_rng(3))
    assert not torch.equal(noisy[:, 0], noisy[:, 2])  # each slice gets its own noise


def test_slices_of_another_context_are_refused(tmp_path):
    flat = SliceDataset(np.zeros((2, 32, 32), np.float16), np.zeros((2, 32, 32), np.uint8),
                        ["a", "b"])
    config = TrainingConfig(architecture="unet", slice_context=1, epochs=1, steps_per_epoch=1)
    with pytest.raises(HRpQCTError, match="slice_context=1"):
        training.fit(flat, flat, tmp_path / "m", config=config, device="cpu")


# ------------------------------------------------------------------------------------------
# Inflation: a 2D model into a 2.5D one with the same output
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: build_model("b0", seed=5), UNet])
def test_inflated_model_computes_exactly_the_2d_output(make):
    flat = make().eval()
    deep = inflate_input_channels(flat, 1)
    assert slice_context_of_model(flat) == 0 and slice_context_of_model(deep) == 1
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        a, b = flat(x[:, 1:2]), deep(x)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    assert torch.equal(a, b)
    assert float(_kernel(deep).detach()[:, [0, 2]].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="cannot be turned into one with 0"):
        inflate_input_channels(deep, 0)


# ------------------------------------------------------------------------------------------
# Metadata: the one source of truth
# ------------------------------------------------------------------------------------------
def _edit_metadata(folder, **changes):
    path = folder / METADATA_FILE
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta), encoding="utf-8")


def test_metadata_records_and_checks_the_slice_context(random_b0, tiny_preprocessing, tmp_path):
    from HRpQCTSegmentationEngine.bundled import resolve_model_folder

    bundled = read_model_metadata(resolve_model_folder(None))
    assert bundled.slice_context == 0 and bundled.num_channels == 1
    flat = save_model(random_b0, tmp_path / "flat", preprocessing=tiny_preprocessing)
    deep = save_model(inflate_input_channels(random_b0, 1), tmp_path / "deep",
                      preprocessing=tiny_preprocessing)
    raw = json.loads((deep / METADATA_FILE).read_text(encoding="utf-8"))
    assert raw["slice_context"] == 1 and raw["num_channels"] == 3
    assert read_model_metadata(flat).slice_context == 0
    _edit_metadata(flat, slice_context=None)  # a folder from before the field: 2D
    assert read_model_metadata(flat).slice_context == 0
    load_model(flat)
    for bad in (-1, 5, 1.5, "1", True, [1]):
        _edit_metadata(deep, slice_context=bad)
        with pytest.raises(ModelFolderError, match="slice_context must be"):
            read_model_metadata(deep)
    _edit_metadata(deep, slice_context=1, num_channels=1)
    with pytest.raises(ModelFolderError, match="records num_channels 1 but slice_context 1"):
        read_model_metadata(deep)
    _edit_metadata(flat, slice_context=1, num_channels=3)  # a 1-channel network in config.json
    with pytest.raises(ModelFolderError, match="1-channel network"):
        load_model(flat)


def test_a_graph_of_other_channels_is_refused(random_b0, tiny_preprocessing, tmp_path):
    pytest.importorskip("onnxruntime")
    from HRpQCTSegmentationEngine.export_onnx import add_onnx_graph
    from HRpQCTSegmentationEngine.inference import prepare_segmenter

    folder = save_model(random_b0, tmp_path / "m", preprocessing=tiny_preprocessing)
    add_onnx_graph(folder)  # a 1-channel graph, listed with its checksum
    _edit_metadata(folder, slice_context=1, num_channels=3)
    with pytest.raises(ArtefactError, match="takes 1 input channel"):
        prepare_segmenter(folder, device="cpu", engine="onnx")


# ------------------------------------------------------------------------------------------
# Segmenting with a 2.5D model
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layered_scan():
    return _layered_leg(n_slices=7, seed=4)[0]


@pytest.fixture(scope="module")
def flat_labels(random_b0, tiny_preprocessing, layered_scan):
    return run_segmentation(layered_scan, random_b0, config=tiny_preprocessing, device="cpu",
                            engine="torch", fast=False).labels


@pytest.mark.parametrize(("channel", "source"), [(0, [0, 0, 1, 2, 3, 4, 5]),
                                                 (2, [1, 2, 3, 4, 5, 6, 6])])
@pytest.mark.parametrize(("engine", "fast", "batch_size"), [
    ("torch", False, 1), ("torch", True, 3), ("onnx", True, 2)])
def test_each_slice_gets_its_neighbours_in_every_engine(
        random_b0, tiny_preprocessing, layered_scan, flat_labels, channel, source, engine, fast,
        batch_size):
    if engine == "onnx":
        pytest.importorskip("onnxruntime")
    # A 2.5D model looking only at z-1 (or z+1) labels slice z as the 2D model labels z-1
    # (z+1): the neighbours arrive in order, with the edge slices repeated.
    model = _shifted_to(random_b0, channel)
    result = run_segmentation(layered_scan, model, config=tiny_preprocessing, device="cpu",
                              engine=engine, fast=fast, batch_size=batch_size)
    assert result.engine == {"torch": "torch-fast" if fast else "torch"}.get(engine, engine)
    np.testing.assert_array_equal(result.labels, flat_labels[source])


def test_resampling_and_uncertainty_work_with_neighbours(random_b0, tiny_preprocessing,
                                                         layered_scan):
    deep = inflate_input_channels(random_b0, 1).eval()
    randomise_batch_norm(deep, seed=2)
    with torch.no_grad():
        _kernel(deep)[:, [0, 2]] = 0.3 * _kernel(deep)[:, 1:2]  # the neighbours count
    common = dict(config=tiny_preprocessing, device="cpu", spacing_mm=(0.5, 0.3, 0.3),
                  training_voxel_mm=0.25, uncertainty="flip")
    torch_run = run_segmentation(layered_scan, deep, engine="torch", fast=False, **common)
    assert torch_run.voxel_resampling["resampled"]
    assert torch_run.voxel_resampling["crop_yx"] == [53, 53]
    assert np.isfinite(torch_run.slice_uncertainty).any()
    pytest.importorskip("onnxruntime")
    onnx_run = run_segmentation(layered_scan, deep, engine="onnx", **common)
    np.testing.assert_array_equal(onnx_run.labels, torch_run.labels)
    np.testing.assert_allclose(onnx_run.slice_uncertainty, torch_run.slice_uncertainty,
                               atol=1e-4)


# ------------------------------------------------------------------------------------------
# Training a 2.5D model: from a 2D parent, saved, loaded, segmenting
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_set(tmp_path_factory, tiny_preprocessing):
    folder = tmp_path_factory.mktemp("slice-context")
    hu, regions = _layered_leg(n_slices=6, seed=1)
    image, labels = _write_case(folder, "a", hu, regions)
    parent = save_model(build_model("b0", seed=3), folder / "parent",
                        preprocessing=tiny_preprocessing, extra_metadata={"name": "flat-parent"})
    manifest = folder / "train.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["subject", "image", "labels", "slices"])
        writer.writerow(["s1", image.name, labels.name, "1-4"])
    return {"folder": folder, "parent": parent, "manifest": manifest,
            "cases": [TrainingCase("s1", image, labels, parse_slice_list("1-4"))]}


TINY = fine_tune_config(epochs=1, steps_per_epoch=3, batch_size=2, crop_px=32, warmup_steps=1,
                        validation_slices=2)


def test_a_2d_model_fine_tuned_into_25d_starts_from_its_exact_output(training_set, tmp_path,
                                                                      layered_scan):
    cases, parent = training_set["cases"], training_set["parent"]
    flat = train_segmenter(cases, tmp_path / "flat", config=TINY, init_from=parent,
                           device="cpu")
    deep = train_segmenter(cases, tmp_path / "deep", config=replace(TINY, slice_context=1),
                           init_from=parent, device="cpu")
    # step 0: the inflated model scores the held-out slices exactly as its 2D parent does
    # (compared as JSON: absent classes score NaN, which is never == itself)
    assert json.dumps(deep["validation_before"], sort_keys=True) == json.dumps(
        flat["validation_before"], sort_keys=True)
    meta = read_model_metadata(tmp_path / "deep")
    assert meta.slice_context == 1 and meta.num_channels == 3
    assert meta.extra["training"]["training_config"]["slice_context"] == 1
    assert "inflated from 1 to 3" in meta.extra["training"]["slice_context_init"]
    assert "encoder stage 1 input kernel" in meta.extra["training"]["trained_parts"]
    assert read_model_metadata(tmp_path / "flat").slice_context == 0
    model = load_model(tmp_path / "deep")
    assert model.config.num_channels == 3
    assert float(_kernel(model).detach()[:, [0, 2]].abs().sum()) > 0  # the neighbours were learnt
    card = (tmp_path / "deep" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "z-1, z, z+1" in card and "flat-parent" in card
    with pytest.raises(HRpQCTError, match="cannot be fine-tuned into a model with slice "
                                          "context 0"):
        train_segmenter(cases, tmp_path / "back", config=replace(TINY, slice_context=0),
                        init_from=tmp_path / "deep", device="cpu")
    labels = {engine: run_segmentation(layered_scan, tmp_path / "deep", device="cpu",
                                       engine=engine).labels
              for engine in ("torch", "onnx")}
    np.testing.assert_array_equal(labels["onnx"], labels["torch"])
    # the folder's own graph takes three channels too
    from HRpQCTSegmentationEngine import onnx_graph
    from HRpQCTSegmentationEngine.export_onnx import add_onnx_graph
    from HRpQCTSegmentationEngine.inference import prepare_segmenter

    add_onnx_graph(tmp_path / "deep")
    runner, config = prepare_segmenter(tmp_path / "deep", device="cpu", engine="onnx")
    assert runner.source == onnx_graph.SOURCE_FOLDER and runner.slice_context == 1
    np.testing.assert_array_equal(
        run_segmentation(layered_scan, runner, config=config).labels, labels["torch"])


def test_train_segmenter_command_takes_the_slice_context(training_set, tmp_path, capsys):
    common = ["--manifest", str(training_set["manifest"]), "--epochs", "1",
              "--steps-per-epoch", "2", "--batch-size", "2", "--crop-px", "32",
              "--warmup-steps", "1", "--device", "cpu", "--progress", "none"]
    deep = tmp_path / "deep"
    assert main(["train-segmenter", *common, "--out", str(deep), "--init-from",
                 str(training_set["parent"]), "--slice-context", "1"]) == 0
    assert read_model_metadata(deep).slice_context == 1
    child = tmp_path / "child"  # fine-tuning a 2.5D model keeps its context by default
    assert main(["train-segmenter", *common, "--out", str(child), "--init-from",
                 str(deep)]) == 0
    assert read_model_metadata(child).slice_context == 1
    capsys.readouterr()
    assert main(["info", "--model", str(child)]) == 0
    assert "input: each slice with 1 neighbour slice(s) on each side (z-1, z, z+1" in \
        capsys.readouterr().out
    assert main(["info", "--json", "--model", str(child)]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["slice_context"] == 1
    assert main(["train-segmenter", *common, "--out", str(tmp_path / "bad"),
                 "--slice-context", "9"]) == 2
    assert "slice_context must be" in capsys.readouterr().err
