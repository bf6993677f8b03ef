"""Shared fixtures for the pipeline, batch and report tests: small scans, a tiny model, classifiers.

Everything is small so the whole-job tests stay fast: 3-slice phantoms of 400 x 400 pixels
(0.24 mm, the whole leg), a randomly initialised SegFormer-B0 seeing 64 x 64 inputs, and
logistic classifiers trained on synthetic feature rows that use features of the ``basic`` set.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class PipelineScan:
    scan: Path  # int16 HU NIfTI
    truth: Path  # 7-region truth map
    seed: int


def write_small_scan(folder: Path, name: str, seed: int, motion_grade: int = 1,
                     n_slices: int = 3) -> PipelineScan:
    """A small phantom written as ``<name>.nii.gz`` with ``<name>_truth.nii.gz``."""
    from HRpQCTCore import io
    from HRpQCTPhantom import PhantomParams, generate_phantom

    phantom = generate_phantom(
        PhantomParams(motion_grade=motion_grade).small(n_slices=n_slices), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    scan = folder / f"{name}.nii.gz"
    truth = folder / f"{name}_truth.nii.gz"
    io.write_scan(phantom.scan, scan, dtype="int16")
    io.write_label_map(phantom.regions, phantom.scan, truth)
    return PipelineScan(scan, truth, seed)


@pytest.fixture(scope="session")
def pipeline_scans(tmp_path_factory) -> list[PipelineScan]:
    """Three small phantoms (seeds 11, 12, 13) with their truth maps."""
    folder = tmp_path_factory.mktemp("pipeline_scans")
    return [write_small_scan(folder, f"scan{i}", seed) for i, seed in enumerate((11, 12, 13))]


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A random SegFormer-B0 saved as a model folder (crop 400 x 400, network input 64 x 64)."""
    from HRpQCTSegmentationEngine.model import build_model, save_model
    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    folder = tmp_path_factory.mktemp("tiny_model") / "model"
    save_model(build_model("b0", seed=1).eval(), folder,
               preprocessing=PreprocessingConfig(crop_yx=(400, 400), input_yx=(64, 64)))
    return folder


def _train_classifier(folder: Path, name: str, region: str, features: list[str],
                      seed: int) -> Path:
    from HRpQCTCore.regions import region_by_name
    from HRpQCTPipeline.cli import main
    from HRpQCTRadiomicsEngine.extraction import FeatureTable, RegionFeatures
    from HRpQCTRadiomicsEngine.settings import load_settings
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    rng = np.random.default_rng(seed)
    provenance = load_settings("paper").provenance()
    label_value = region_by_name(region).label
    tables, labels = [], {}
    for s in range(12):
        subject = f"sub-{s:02d}"
        labels[subject] = s % 2
        rows = []
        for z in range(5):
            values = {n: float(rng.normal(0, 50)) for n in features}
            values[features[0]] = -100.0 + 80.0 * labels[subject] + float(rng.normal(0, 20))
            rows.append(RegionFeatures(z, label_value, 500, "ok", "", values))
        tables.append(FeatureTable(rows, list(features), "slice", provenance,
                                   scan=f"scan-{s:02d}", subject=subject))
    train_csv = write_feature_csv(folder / f"{name}_train.csv", tables)
    labels_csv = folder / f"{name}_labels.csv"
    labels_csv.write_text("subject_id,osteoporosis\n"
                          + "".join(f"{k},{v}\n" for k, v in labels.items()))
    out = folder / f"{name}.json"
    assert main(["--quiet", "train-classifier", str(train_csv), "--labels", str(labels_csv),
                 "--regions", region, "-o", str(out), "--cv", "3", "--bootstrap", "20",
                 "--test-fraction", "0.25", "--seed", str(seed)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_classifiers(tmp_path_factory) -> dict[str, Path]:
    """Two logistic classifiers on ``basic`` features: ``adipose`` and ``myotendinous``."""
    folder = tmp_path_factory.mktemp("classifiers")
    return {
        "adipose": _train_classifier(folder, "adipose", "adipose", [
            "original_firstorder_Mean", "original_firstorder_Median",
            "original_firstorder_Variance"], seed=1),
        "myotendinous": _train_classifier(folder, "myotendinous", "myotendinous", [
            "original_firstorder_Mean", "original_firstorder_90Percentile"], seed=2),
    }
