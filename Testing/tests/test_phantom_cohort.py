"""Synthetic cohort: balance, overlap of groups, manifest, and the CLI (issue 3)."""

import csv

import numpy as np

from HRpQCTPhantom.cohort import MANIFEST_COLUMNS, sample_cohort
from HRpQCTPhantom.params import BONE_HEALTH_LOADINGS


def test_groups_balanced_overlapping_and_different_on_average():
    subjects = sample_cohort(200, seed=1)
    op = [s for s in subjects if s.osteoporosis]
    assert len(op) == 100
    for name, (_, _, loading, _, _) in BONE_HEALTH_LOADINGS.items():
        a = np.array([getattr(s.params, name) for s in subjects if s.osteoporosis])
        b = np.array([getattr(s.params, name) for s in subjects if not s.osteoporosis])
        # Healthy bone is on the loading's side on average...
        assert np.sign(b.mean() - a.mean()) == np.sign(loading), name
        # ...but no single parameter separates the groups.
        assert max(a.min(), b.min()) < min(a.max(), b.max()), name


def test_cohort_is_deterministic():
    a = sample_cohort(10, seed=5)
    b = sample_cohort(10, seed=5)
    assert [s.params for s in a] == [s.params for s in b]
    assert [s.params for s in a] != [s.params for s in sample_cohort(10, seed=6)]


def test_cli_cohort_writes_manifest_and_scans(tmp_path):
    from HRpQCTPipeline.cli import main

    out = tmp_path / "cohort"
    code = main(["cohort", str(out), "--subjects", "2", "--small", "--field-px", "200",
                 "--voxel-mm", "0.4856", "--slices", "2", "--seed", "3", "--progress", "none"])
    assert code == 0
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    assert list(rows[0])[: len(MANIFEST_COLUMNS)] == list(MANIFEST_COLUMNS)
    assert sorted(r["osteoporosis"] for r in rows) == ["0", "1"]
    for r in rows:
        for col in ("scan_path", "classes_path", "regions_path", "truth_path"):
            assert (out / r[col]).is_file()


def test_cli_phantom_end_to_end(tmp_path, capsys):
    import json

    from HRpQCTPipeline.cli import main

    code = main(["phantom", str(tmp_path), "--small", "--slices", "2", "--seed", "2",
                 "--set", "tibia_bv_tv=0.15", "--motion-grade", "2", "--progress", "none"])
    assert code == 0
    truth = json.loads((tmp_path / "phantom_truth.json").read_text(encoding="utf-8"))
    assert truth["params"]["tibia_bv_tv"] == 0.15
    assert truth["params"]["motion_grade"] == 2
    assert (tmp_path / "phantom_regions.nii.gz").is_file()
    code = main(["phantom", str(tmp_path), "--set", "no_such=1", "--progress", "none"])
    assert code == 2
    assert "Unknown phantom parameter" in capsys.readouterr().err
