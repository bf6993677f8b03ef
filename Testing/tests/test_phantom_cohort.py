"""Synthetic cohort: balance, overlap of groups, manifest, and the CLI (issue 3)."""

import csv
from dataclasses import replace

import numpy as np
import pytest

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


# --- soft-tissue effect on its own (issue 18, known-effect check) ---------------------------

def _group_difference(subjects, name: str) -> float:
    """Standardised mean difference control - osteoporotic of one parameter."""
    a = np.array([getattr(s.params, name) for s in subjects if s.osteoporosis])
    b = np.array([getattr(s.params, name) for s in subjects if not s.osteoporosis])
    return float((b.mean() - a.mean()) / np.sqrt((a.var() + b.var()) / 2))


def test_soft_tissue_effect_zero_gives_both_groups_the_same_soft_tissue():
    from scipy.stats import ks_2samp

    from HRpQCTPhantom.params import SOFT_TISSUE_PARAMETERS

    tied = sample_cohort(2000, seed=11)  # default: soft tissue follows bone health
    free = sample_cohort(2000, seed=11, soft_tissue_effect=0.0)
    for name in SOFT_TISSUE_PARAMETERS:
        assert abs(_group_difference(tied, name)) > 0.3, name  # today's cohorts differ...
        assert abs(_group_difference(free, name)) < 0.15, name  # ...0 removes it
        a = [getattr(s.params, name) for s in free if s.osteoporosis]
        b = [getattr(s.params, name) for s in free if not s.osteoporosis]
        assert ks_2samp(a, b).pvalue > 0.01, name
    # Bone still carries the default bone effect.
    assert _group_difference(free, "tibia_bv_tv") > 0.8


def test_larger_soft_tissue_effect_separates_soft_tissue_and_leaves_the_rest_alone():
    from HRpQCTPhantom.params import SOFT_TISSUE_PARAMETERS

    base = sample_cohort(1000, seed=4, effect_size=0.0)
    mean_separation = []
    for effect in (0.0, 0.5, 1.0, 2.0):
        subjects = sample_cohort(1000, seed=4, effect_size=0.0, soft_tissue_effect=effect)
        diffs = {n: _group_difference(subjects, n) for n in SOFT_TISSUE_PARAMETERS}
        mean_separation.append(np.mean([abs(d) for d in diffs.values()]))
        if effect >= 1.0:  # healthier soft tissue in controls, on the loading's side
            for name, d in diffs.items():
                assert np.sign(d) == np.sign(BONE_HEALTH_LOADINGS[name][2]), name
        # Only the soft tissue is redrawn: everything else is the subjects of the default.
        for s, b in zip(subjects, base, strict=True):
            assert (s.age, s.sex, s.osteoporosis, s.bone_health) == (
                b.age, b.sex, b.osteoporosis, b.bone_health)
            kept = {k: v for k, v in s.params.to_dict().items()
                    if k not in SOFT_TISSUE_PARAMETERS}
            assert kept == {k: v for k, v in b.params.to_dict().items()
                            if k not in SOFT_TISSUE_PARAMETERS}
        assert subjects[0].soft_tissue_effect == effect
    assert np.all(np.diff(mean_separation) > 0.05), mean_separation
    assert mean_separation[0] < 0.1 < 0.3 < mean_separation[-1]


def test_sample_with_a_soft_tissue_effect():
    from HRpQCTPhantom.params import PhantomParams

    def draw(osteoporotic, effect, n=400, seed=0):
        rng = np.random.default_rng(seed)
        return [PhantomParams.sample(rng, osteoporotic, 0.0, soft_tissue_effect=effect,
                                     n_slices=1) for _ in range(n)]

    def gap(name, effect):
        ctrl = np.mean([getattr(p, name) for p in draw(False, effect)])
        return ctrl - np.mean([getattr(p, name) for p in draw(True, effect, seed=1)])

    assert gap("muscle_hu", 3.0) > 3.0  # muscle_hu SD 7 HU, loading 0.5
    assert abs(gap("muscle_hu", 0.0)) < 1.5
    assert abs(gap("tibia_bv_tv", 3.0)) < 0.01  # bone effect 0: bone stays equal
    assert draw(True, 1.0, n=3) == draw(True, 1.0, n=3)
    with pytest.raises(ValueError, match="soft_tissue_effect"):
        draw(True, -1.0, n=1)
    with pytest.raises(ValueError, match="two-group"):
        sample_cohort(6, seed=1, n_classes=3, soft_tissue_effect=1.0)


def test_cli_cohort_records_the_soft_tissue_effect(tmp_path, capsys):
    import json

    from HRpQCTPipeline.cli import main

    common = ["--subjects", "2", "--field-px", "200", "--voxel-mm", "0.4856", "--slices", "1",
              "--seed", "3", "--progress", "none"]
    out = tmp_path / "cohort"
    assert main(["cohort", str(out), "--soft-tissue-effect", "0.75", *common]) == 0
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = list(rows[0])
    at = columns.index("bone_health") + 1
    assert columns[at:at + 2] == ["soft_tissue_effect", "soft_tissue_health"]
    assert [r["soft_tissue_effect"] for r in rows] == ["0.75", "0.75"]
    truth = json.loads((out / rows[0]["truth_path"]).read_text(encoding="utf-8"))
    assert truth["subject"]["soft_tissue_effect"] == 0.75
    assert truth["subject"]["soft_tissue_health"] == float(rows[0]["soft_tissue_health"])

    plain = tmp_path / "plain"
    assert main(["cohort", str(plain), *common]) == 0
    with open(plain / "manifest.csv", newline="") as fh:
        assert "soft_tissue_effect" not in next(csv.DictReader(fh))

    for bad in (["--soft-tissue-effect", "-1"], ["--soft-tissue-effect", "1", "--classes", "3"]):
        refused = tmp_path / "refused"
        assert main(["cohort", str(refused), *bad, *common]) == 2
        assert "--soft-tissue-effect" in capsys.readouterr().err
        assert not refused.exists()


def test_a_fibula_gap_range_changes_only_the_gap():
    from HRpQCTPhantom import FIBULA_GAP_RANGE_MM

    default = sample_cohort(40, seed=8)
    narrow = sample_cohort(40, seed=8, fibula_gap_range_mm=(0.5, 1.2))
    gaps = np.array([s.params.fibula_gap_mm for s in narrow])
    assert gaps.min() >= 0.5 and gaps.max() <= 1.2 and gaps.std() > 0.1
    assert all(FIBULA_GAP_RANGE_MM[0] <= s.params.fibula_gap_mm <= FIBULA_GAP_RANGE_MM[1]
               for s in default)
    for a, b in zip(default, narrow, strict=True):
        assert replace(a.params, fibula_gap_mm=1.0) == replace(b.params, fibula_gap_mm=1.0)
        assert a.seed == b.seed
    for bad in ((0.2, 1.0), (2.0, 1.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="fibula gap range"):
            sample_cohort(2, seed=8, fibula_gap_range_mm=bad)


def test_cli_cohort_draws_the_fibula_gap_from_the_given_range(tmp_path, capsys):
    from HRpQCTPipeline.cli import main

    common = ["--subjects", "3", "--field-px", "200", "--voxel-mm", "0.4856", "--slices", "1",
              "--seed", "3", "--progress", "none"]
    out = tmp_path / "cohort"
    assert main(["cohort", str(out), "--fibula-gap-mm", "0.5", "0.9", *common]) == 0
    with open(out / "manifest.csv", newline="") as fh:
        gaps = [float(r["fibula_gap_mm"]) for r in csv.DictReader(fh)]
    assert len(gaps) == 3 and all(0.5 <= g <= 0.9 for g in gaps)
    refused = tmp_path / "refused"
    assert main(["cohort", str(refused), "--fibula-gap-mm", "0.3", "0.9", *common]) == 2
    assert "--fibula-gap-mm" in capsys.readouterr().err
    assert not refused.exists()
