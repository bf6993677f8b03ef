"""The learned myotendinous/adipose split: its file format, its trees, and what it changes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from HRpQCTCore.errors import ArtefactError
from HRpQCTSegmentationEngine.postprocess import DEFAULT, PAPER, PostprocessConfig
from HRpQCTSegmentationEngine.postprocess import soft_tissue_model as stm
from HRpQCTSegmentationEngine.postprocess.soft_tissue import subdivide_soft_tissue

MYO, FAT, SKIN = 6, 7, 5
RULES = replace(DEFAULT, soft_tissue_model="none")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def fitted():
    """A small scikit-learn model on random features, and its JSON document."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, len(stm.FEATURE_NAMES))).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 3] * x[:, 7] + rng.normal(0, 0.3, 3000)) > 0
    classifier = HistGradientBoostingClassifier(max_iter=12, max_leaf_nodes=7,
                                                random_state=0).fit(x, y)
    document = stm.model_to_dict([classifier], stm.BLOCK_MM, (0.05, 0.09), {"test": True})
    return classifier, json.loads(json.dumps(document)), x


def _constant_model(probability: float, rules_band: float) -> stm.SoftTissueModel:
    """One stage, one leaf: the same probability for every block."""
    leaf = {"feature": [-1], "threshold": [0.0], "left": [0], "right": [0], "value": [0.0]}
    document = {"format": stm.FORMAT, "format_version": stm.FORMAT_VERSION,
                "block_mm": stm.BLOCK_MM, "voxel_mm_range": [0.05, 0.09],
                "rules_band": rules_band,
                "stages": [{"features": list(stm.FEATURE_NAMES),
                            "baseline": float(np.log(probability / (1 - probability))),
                            "trees": [leaf]}]}
    return stm.model_from_dict(document)


@pytest.fixture(scope="module")
def moving_leg():
    """Two full-resolution (60.7 um) slices of a leg with motion grade 3 (held-out seed)."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    return generate_phantom(PhantomParams(n_slices=2, motion_grade=3, noise_sd_hu=150.0), 9801)


def test_the_trees_give_scikit_learns_probabilities(fitted):
    classifier, document, x = fitted
    model = stm.model_from_dict(document)
    probe = np.concatenate([x[:500], np.random.default_rng(1).normal(
        0, 3, (500, x.shape[1])).astype(np.float32)])
    assert np.allclose(model.stages[0].probability(probe),
                       classifier.predict_proba(probe)[:, 1], rtol=0, atol=1e-12)


def test_a_later_stage_reads_the_context_of_the_earlier_ones_probabilities(moving_leg):
    """Two stages: the block map equals scikit-learn's chain, stage 1 fed stage 0's context."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from HRpQCTSegmentationEngine.postprocess import soft_tissue as st

    captured = []
    original = st._label_slice

    def spy(classes2d, hu2d, num2d, den2d, view2d, spacing_yx, config, rules):
        masks = st._slice_masks(classes2d, spacing_yx, config)  # before view2d is written
        original(classes2d, hu2d, num2d, den2d, view2d, spacing_yx, config, rules)
        if masks is not None and not captured:
            box, soft, _, inner = masks
            local = st._local_mean(hu2d, num2d, den2d, box, soft)
            captured.append((local, inner, view2d[box].copy(), rules.levels))

    phantom = moving_leg
    st._label_slice = spy
    try:
        subdivide_soft_tissue(phantom.classes, phantom.scan.hu, phantom.scan.spacing_mm, RULES,
                              workers=1)
    finally:
        st._label_slice = original
    local, inner, view, levels = captured[0]
    pixel_mm = float(phantom.scan.spacing_mm[1])
    features, rows, weights = stm.slice_features(local, inner, view, levels, pixel_mm)
    target = features[:, 0] + 0.1 * features[:, 7] > 0
    first = HistGradientBoostingClassifier(max_iter=8, max_leaf_nodes=7,
                                           random_state=0).fit(features, target)
    blocks = np.zeros(rows.shape, np.float32)
    blocks[rows] = first.predict_proba(features)[:, 1]
    context = stm.context_features(blocks, rows, weights, pixel_mm)
    assert context.shape == (rows.sum(), len(stm.CONTEXT_FEATURE_NAMES))
    second_input = np.concatenate([features, context], axis=1)
    second = HistGradientBoostingClassifier(max_iter=8, max_leaf_nodes=7,
                                            random_state=0).fit(second_input, target)
    model = stm.model_from_dict(json.loads(json.dumps(stm.model_to_dict(
        [first, second], stm.BLOCK_MM, (0.05, 0.09), {}))))
    assert len(model.stages) == 2
    assert np.allclose(model.block_probability(features, rows, weights, pixel_mm)[rows],
                       second.predict_proba(second_input)[:, 1], rtol=0, atol=1e-6)


def test_a_stage_reads_its_features_by_name(fitted):
    """A file trained on fewer features (an older version's) reads just those columns."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    _, document, x = fitted
    chosen = [1, 4, 0, 9]
    y = x[:, 4] - x[:, 9] > 0
    classifier = HistGradientBoostingClassifier(max_iter=6, max_leaf_nodes=5,
                                                random_state=0).fit(x[:, chosen], y)
    stage = stm._stage_to_dict(classifier, 0, [stm.FEATURE_NAMES[i] for i in chosen])
    model = stm.model_from_dict({**document, "stages": [stage]})
    every = np.ones(len(x), dtype=bool)
    assert np.allclose(model.block_probability(x, every, every.astype(np.float32), 0.0607),
                       classifier.predict_proba(x[:, chosen])[:, 1], rtol=0, atol=1e-6)


def test_a_version_1_file_is_still_read(fitted):
    classifier, document, x = fitted
    stage = document["stages"][0]
    old = {k: v for k, v in document.items() if k not in ("stages", "rules_band")}
    old.update(format_version=1, features=stage["features"], baseline=stage["baseline"],
               trees=stage["trees"])
    model = stm.model_from_dict(old)
    assert model.rules_band == 0.0 and len(model.stages) == 1
    assert np.allclose(model.stages[0].probability(x[:200]),
                       classifier.predict_proba(x[:200])[:, 1], rtol=0, atol=1e-12)


def test_within_the_rules_band_the_rules_call_stands(moving_leg):
    """A model unsure everywhere (P = 0.55) leaves the rules' split as it is when its band is
    0.1, and calls everything myotendinous without a band."""
    phantom = moving_leg
    hu, spacing = phantom.scan.hu, phantom.scan.spacing_mm
    from HRpQCTSegmentationEngine.postprocess import soft_tissue as st

    rules = subdivide_soft_tissue(phantom.classes, hu, spacing, RULES, workers=1)
    outputs = {}
    for band in (0.1, 0.0):
        model = _constant_model(0.55, band)
        original = st._split_model
        st._split_model = lambda config, levels, spacing_mm, m=model: m
        try:
            outputs[band] = subdivide_soft_tissue(phantom.classes, hu, spacing, DEFAULT,
                                                  workers=1)
        finally:
            st._split_model = original
    assert np.array_equal(outputs[0.1], rules)
    soft = (rules == MYO) | (rules == FAT)
    assert (outputs[0.0][soft] == MYO).all()


def _tree(document: dict) -> dict:
    return document["stages"][0]["trees"][0]


@pytest.mark.parametrize("damage", [
    lambda d: d.update(format="something else"),
    lambda d: d.update(format_version=99),
    lambda d: d["stages"][0]["features"].__setitem__(0, "no such feature"),
    lambda d: d["stages"][0]["features"].__setitem__(1, d["stages"][0]["features"][0]),
    lambda d: d["stages"][0]["features"].__setitem__(0, "stage_probability"),  # stage 0: none
    lambda d: d.update(block_mm=-1),
    lambda d: d.update(rules_band=0.5),
    lambda d: d.pop("rules_band"),
    lambda d: d.update(stages=[]),
    lambda d: d["stages"][0].update(baseline=float("nan")),
    lambda d: d.update(voxel_mm_range=[0.09, 0.05]),
    lambda d: d["stages"][0].update(trees=[]),
    lambda d: _tree(d).update(value=_tree(d)["value"][:-1]),
    lambda d: _tree(d).update(left=[0] * len(_tree(d)["left"])),  # a cycle
    lambda d: _tree(d).update(feature=[99] * len(_tree(d)["feature"])),
    lambda d: _tree(d).update(value=[float("inf")] * len(_tree(d)["value"])),
    lambda d: _tree(d).pop("threshold"),
])
def test_a_damaged_model_file_is_refused(fitted, damage):
    document = json.loads(json.dumps(fitted[1]))
    damage(document)
    with pytest.raises(ArtefactError):
        stm.model_from_dict(document)


def test_a_file_failing_its_checksum_is_refused(fitted, tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(fitted[1]), encoding="utf-8")
    assert stm.load_model(path).provenance == {"test": True}
    with pytest.raises(ArtefactError, match="checksum"):
        stm.load_model(path, sha256="0" * 64)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ArtefactError, match="Cannot read"):
        stm.load_model(path)


def test_the_bundled_model_is_checked_and_says_where_it_comes_from():
    model = stm.bundled_model()
    assert model.sha256 and len(model.sha256) == 64
    assert model.applies_to(0.0607) and model.applies_to(0.082)
    assert not model.applies_to(0.2428)
    assert "phantom" in model.provenance["trained_on"]
    path = stm.Path(stm.__file__).parents[1] / "resources" / "soft_tissue"
    document = json.loads((path / f"{stm.BUNDLED_SOFT_TISSUE_MODEL}.json").read_text())
    assert "not validated on real scans" in document["caveat"]


def _walked_score(stage: stm.TreeEnsemble, x: np.ndarray) -> np.ndarray:
    """The reference: each sample walked down each tree node by node, the leaves added in
    tree order to the baseline (float64)."""
    score = np.full(x.shape[0], stage.baseline)
    for tree in stage.trees:
        for i, row in enumerate(x.astype(np.float64)):
            node = 0
            while tree["feature"][node] >= 0:
                goes_left = row[tree["feature"][node]] <= tree["threshold"][node]
                node = tree["left"][node] if goes_left else tree["right"][node]
            score[i] += tree["value"][node]
    return score


def test_the_bundled_trees_score_as_a_sample_by_sample_walk():
    """The trees' scores, bit for bit, as walking each sample down each tree on its own;
    samples spread over each column's thresholds, some exactly on one (NaN and extreme values
    included)."""
    model = stm.bundled_model()
    rng = np.random.default_rng(3)
    for stage in model.stages:
        x = np.empty((300, stage.n_features), dtype=np.float32)
        for column in range(stage.n_features):
            cuts = np.concatenate([t["threshold"][t["feature"] == column] for t in stage.trees])
            cuts = cuts if cuts.size else np.zeros(1)
            spread = rng.uniform(cuts.min() - 1, cuts.max() + 1, x.shape[0])
            x[:, column] = np.where(rng.random(x.shape[0]) < 0.2, rng.choice(cuts, x.shape[0]),
                                    spread)
        x[::7, 0] = np.nan
        x[::11, -1] = np.float32(3e38)
        assert np.array_equal(stage.decision(x), _walked_score(stage, x))


def test_settings_choose_the_split():
    assert DEFAULT.soft_tissue_model == "bundled"
    assert PAPER.soft_tissue_model == "none"
    assert DEFAULT.with_fixed_split().soft_tissue_model == "none"
    assert PostprocessConfig(soft_tissue_model="own.json").soft_tissue_model == "own.json"
    with pytest.raises(ValueError, match="soft_tissue_model"):
        PostprocessConfig(soft_tissue_model="learned")


def test_the_model_moves_only_myotendinous_and_adipose_voxels(moving_leg):
    phantom = moving_leg
    hu, spacing = phantom.scan.hu, phantom.scan.spacing_mm
    rules = subdivide_soft_tissue(phantom.classes, hu, spacing, RULES)
    learned = subdivide_soft_tissue(phantom.classes, hu, spacing, DEFAULT)
    changed = rules != learned
    assert changed.any()
    assert set(np.unique(rules[changed])) <= {MYO, FAT}
    assert set(np.unique(learned[changed])) <= {MYO, FAT}
    assert np.array_equal(rules == SKIN, learned == SKIN)


def test_under_motion_the_model_beats_the_rules(moving_leg):
    """Held-out seed, motion grade 3: the ghost arcs and streak residue the rules keep."""
    phantom = moving_leg
    hu, spacing, truth = phantom.scan.hu, phantom.scan.spacing_mm, phantom.regions
    rules = subdivide_soft_tissue(phantom.classes, hu, spacing, RULES)
    learned = subdivide_soft_tissue(phantom.classes, hu, spacing, DEFAULT)
    for label, gain in ((MYO, 0.02), (FAT, 0.005)):
        assert _dice(learned == label, truth == label) > _dice(rules == label,
                                                              truth == label) + gain


def test_the_model_is_calibration_free(moving_leg):
    """The features are relative to the scan's own levels: +150 HU changes next to nothing."""
    phantom = moving_leg
    hu, spacing, truth = phantom.scan.hu.astype(np.float32), phantom.scan.spacing_mm, \
        phantom.regions
    plain = subdivide_soft_tissue(phantom.classes, hu, spacing, DEFAULT)
    shifted = subdivide_soft_tissue(phantom.classes, hu + np.float32(150), spacing, DEFAULT)
    for label in (MYO, FAT):
        assert abs(_dice(plain == label, truth == label)
                   - _dice(shifted == label, truth == label)) < 0.005


def test_other_voxel_sizes_keep_the_rules(small_phantom, caplog):
    """At 0.24 mm (outside the model's range) the split is the rules', and the log says so."""
    phantom = small_phantom
    args = (phantom.classes, phantom.scan.hu, phantom.scan.spacing_mm)
    with caplog.at_level("INFO"):
        learned = subdivide_soft_tissue(*args, DEFAULT)
    assert np.array_equal(learned, subdivide_soft_tissue(*args, RULES))
    assert "made for voxels" in caplog.text


def test_an_own_model_file_is_used(moving_leg, fitted, tmp_path):
    path = tmp_path / "own.json"
    path.write_text(json.dumps(fitted[1]), encoding="utf-8")
    phantom = moving_leg
    args = (phantom.classes, phantom.scan.hu, phantom.scan.spacing_mm)
    own = subdivide_soft_tissue(*args, replace(DEFAULT, soft_tissue_model=str(path)))
    assert not np.array_equal(own, subdivide_soft_tissue(*args, DEFAULT))


def test_in_place_regions_equal_the_copying_call(moving_leg):
    phantom = moving_leg
    copied = subdivide_soft_tissue(phantom.classes, phantom.scan.hu, phantom.scan.spacing_mm,
                                   DEFAULT, slab_slices=1)
    work = phantom.classes.copy()
    in_place = subdivide_soft_tissue(work, phantom.scan.hu, phantom.scan.spacing_mm, DEFAULT,
                                     slab_slices=1, overwrite_input=True)
    assert in_place is work
    assert np.array_equal(in_place, copied)


def test_the_command_line_can_keep_the_rules():
    import argparse

    from HRpQCTPipeline.commands.segment import _add_postprocess_options, _postprocess_config

    parser = argparse.ArgumentParser()
    _add_postprocess_options(parser)
    assert _postprocess_config(parser.parse_args([])).soft_tissue_model == "bundled"
    rules = _postprocess_config(parser.parse_args(["--soft-tissue-rules"]))
    assert rules.soft_tissue_model == "none"
    assert _postprocess_config(parser.parse_args(["--preset", "paper"])).soft_tissue_model \
        == "none"
    own = _postprocess_config(parser.parse_args(["--soft-tissue-model", "own.json"]))
    assert own.soft_tissue_model == "own.json"


def test_the_run_records_which_split_it_used():
    assert stm.split_identity("none") == {"split": "rules"}
    bundled = stm.split_identity("bundled")
    assert bundled["model"] == stm.BUNDLED_SOFT_TISSUE_MODEL
    assert bundled["sha256"] == stm.bundled_model().sha256
