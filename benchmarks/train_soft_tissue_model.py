"""Train the learned myotendinous/adipose split (:mod:`...postprocess.soft_tissue_model`).

Usage::

    python benchmarks/train_soft_tissue_model.py --out model.json            # train, score
    python benchmarks/train_soft_tissue_model.py --out model.json --bundle   # + bundle it

Data: full-size phantoms made here with seeds outside both test sets (``--groups`` of 15 for
training, 4 by default: per ten seeds from 9600, the first six at motion grades 2 and 3 and
the next three at grade 1, i.e. 9600-9605 at grades 2-3 and 9606-9608 at grade 1, and so on;
``9700-9711`` held out for the printed scores, grades 2-3 at 9700-9703, grade 1 at
9704-9711), ``--slices`` slices each, noise 100/150/200 HU by seed. On the phantom's true
bone/soft-tissue split, each slice goes through the default rules with the
model off; the model's features (:func:`slice_features`) and the truth's majority
(myotendinous or adipose) of each block's inner soft tissue are collected. Stage 0, a
``HistGradientBoostingClassifier`` (``--trees`` iterations of at most ``--leaves`` leaves),
is fitted on them; each later stage (``--stages``) on them plus the context of the previous
stage's probabilities (:func:`context_features`), those probabilities taken out of fold
(``FOLDS`` groups of phantoms, each predicted by a model fitted without it), so the later
stage learns from calls as wrong as those on unseen scans. The stages are written as the
module's JSON format with ``--rules-band``. The held-out scans are then split by the rules and
by the model and Dice is printed per motion grade. ``--bundle`` copies the file into
the segmentation engine's resources and records its checksum in the artefact manifest.

For one's own data, the same functions apply: collect ``slice_features`` of corrected slices
and their labels, fit, and point ``PostprocessConfig(soft_tissue_model=<file>)`` at the file.
Everything here is synthetic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

from HRpQCTCore.artefacts import register_artefact
from HRpQCTCore.atomic import write_bytes_atomic, write_text_atomic
from HRpQCTPhantom import PhantomParams, generate_phantom
from HRpQCTSegmentationEngine.postprocess import DEFAULT
from HRpQCTSegmentationEngine.postprocess import soft_tissue as st
from HRpQCTSegmentationEngine.postprocess import soft_tissue_model as stm


def training_cases(groups: int) -> list[tuple[int, int]]:
    """(seed, motion grade) of the training phantoms: per group of ten seeds from 9600, the
    first six at grades 2 and 3 and the next three at grade 1 (15 phantoms a group)."""
    if not 1 <= groups <= 10:  # seeds from 9700 are held out
        raise ValueError("groups must be 1-10")
    bases = range(9600, 9600 + 10 * groups, 10)
    return [(b + i, grade) for b in bases for i in range(6) for grade in (2, 3)] + \
        [(b + i, 1) for b in bases for i in range(6, 9)]


HELD_OUT = [(seed, grade) for seed in range(9700, 9704) for grade in (2, 3)] + \
    [(seed, 1) for seed in range(9704, 9712)]
NOISE_SD_HU = (100.0, 150.0, 200.0)
RULES = replace(DEFAULT, soft_tissue_model="none")
#: Groups of training phantoms for the out-of-fold probabilities a later stage learns from.
FOLDS = 3
#: In-plane voxel sizes the model is applied to: around the phantoms' 60.7 um, up to the
#: 82 um of first-generation XtremeCT; other scans keep the rules' split.
VOXEL_MM_RANGE = (0.05, 0.09)


def _phantom(seed: int, grade: int, slices: int):
    return generate_phantom(PhantomParams(n_slices=slices, motion_grade=grade,
                                          noise_sd_hu=NOISE_SD_HU[seed % 3]), seed=seed)


def rules_slices(phantom) -> list[dict]:
    """Per slice of the leg box: what the model reads after the rules, and the truth there."""
    captured = []
    default_step = st._label_slice

    def step(classes2d, hu2d, num2d, den2d, view2d, spacing_yx, config, rules) -> None:
        masks = st._slice_masks(classes2d, spacing_yx, config)  # before view2d is written
        default_step(classes2d, hu2d, num2d, den2d, view2d, spacing_yx, config, rules)
        if masks is None:
            return
        box, soft, _, inner = masks
        local = st._local_mean(hu2d, num2d, den2d, box, soft)
        if rules.drift_window_px is not None:
            local = st.correct_drift(local, inner, rules.levels, rules.drift_window_px)
        captured.append({"box": box, "inner": inner, "local": local,
                         "view": view2d[box].copy(), "levels": rules.levels,
                         "pixel_mm": float(np.mean(spacing_yx))})

    st._label_slice = step
    try:  # one worker: slices arrive in order
        st.subdivide_soft_tissue(phantom.classes, phantom.scan.hu, phantom.scan.spacing_mm,
                                 RULES, workers=1)
    finally:
        st._label_slice = default_step
    leg = st._leg_box(phantom.classes)
    for z, item in enumerate(captured):
        item["truth"] = phantom.regions[leg][z][item["box"]]
    return captured


def block_targets(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per block: truth's myotendinous majority, and whether the block holds either tissue."""
    side = stm.block_side_px(item["pixel_mm"])
    truth, inner = item["truth"], item["inner"]
    myo = stm._block_sums((truth == stm.MYOTENDINOUS) & inner, side)
    fat = stm._block_sums((truth == stm.ADIPOSE) & inner, side)
    return myo > fat, (myo + fat) > 0


def training_blocks(cases, slices: int) -> list[dict]:
    """Per training slice: the model's features, block geometry, targets and phantom seed."""
    blocks = []
    for seed, grade in cases:
        for item in rules_slices(_phantom(seed, grade, slices)):
            features, rows, weights = stm.slice_features(item["local"], item["inner"],
                                                         item["view"], item["levels"],
                                                         item["pixel_mm"])
            target, known = block_targets(item)
            blocks.append({"features": features, "rows": rows, "weights": weights,
                           "pixel_mm": item["pixel_mm"], "keep": known[rows],
                           "target": target[rows][known[rows]], "seed": seed})
        print(f"  seed {seed}, motion grade {grade}: collected", flush=True)
    return blocks


def stage_names(stage: int, dropped: list[str]) -> list[str]:
    """The features a stage is fitted on: all it can read but ``dropped`` (ablations)."""
    return [n for n in stm.stage_feature_names(stage) if n not in dropped]


def _stage_input(block: dict, previous: np.ndarray | None, stage: int,
                 dropped: list[str]) -> np.ndarray:
    """A stage's fitted columns of one slice, ``previous`` the earlier stage's probabilities
    of its blocks (None at stage 0)."""
    blocks = None
    if previous is not None:
        blocks = np.zeros(block["rows"].shape, np.float32)
        blocks[block["rows"]] = previous
    x = stm.stage_input(block["features"], blocks, block["rows"], block["weights"],
                        block["pixel_mm"])
    every = stm.stage_feature_names(stage)
    return x[:, [every.index(n) for n in stage_names(stage, dropped)]]


def fit_stages(blocks: list[dict], stages: int, fit, dropped: list[str]) -> list:
    """``stages`` classifiers, each later one fitted on out-of-fold earlier probabilities."""
    classifiers, previous = [], [None] * len(blocks)
    seeds = sorted({b["seed"] for b in blocks})
    for stage in range(stages):
        inputs = [_stage_input(b, p, stage, dropped)
                  for b, p in zip(blocks, previous, strict=True)]
        classifiers.append(fit(inputs, range(len(blocks))))
        if stage == stages - 1:
            break
        held_seeds = [set(seeds[k::FOLDS]) for k in range(FOLDS)]
        for fold in held_seeds:
            inside = [i for i, b in enumerate(blocks) if b["seed"] not in fold]
            model = fit(inputs, inside)
            for i, b in enumerate(blocks):
                if b["seed"] in fold:
                    previous[i] = model.predict_proba(inputs[i])[:, 1]
        print(f"  stage {stage}: fitted, out-of-fold probabilities made", flush=True)
    return classifiers


def held_out_scores(model: stm.SoftTissueModel, slices: int) -> dict:
    """Dice (myotendinous, adipose) of the rules and the model, per motion group."""
    sums: dict[tuple[str, str], np.ndarray] = {}
    for seed, grade in HELD_OUT:
        group = "grade 1" if grade == 1 else "grades 2-3"
        for item in rules_slices(_phantom(seed, grade, slices)):
            inner, truth = item["inner"], item["truth"]
            learned = item["view"].copy()
            model.relabel(learned, inner, item["local"], item["levels"], item["pixel_mm"])
            for name, view in (("rules", item["view"]), ("model", learned)):
                acc = sums.setdefault((group, name), np.zeros(6))
                for k, label in enumerate((stm.MYOTENDINOUS, stm.ADIPOSE)):
                    p, t = inner & (view == label), inner & (truth == label)
                    acc[3 * k:3 * k + 3] += [(p & t).sum(), p.sum(), t.sum()]
    return {f"{group}, {name}": {"myotendinous": round(2 * a[0] / (a[1] + a[2]), 4),
                                 "adipose": round(2 * a[3] / (a[4] + a[5]), 4)}
            for (group, name), a in sums.items()}


def main() -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4,
                        help="groups of 15 training phantoms (seeds 9600 + 10 k)")
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--leaves", type=int, default=15)
    parser.add_argument("--rules-band", type=float, default=0.05)
    parser.add_argument("--drop-features", nargs="*", default=[], metavar="NAME",
                        help="features left out (ablations; the file records what it reads)")
    parser.add_argument("--bundle", action="store_true",
                        help="copy into the engine's resources and register the checksum")
    args = parser.parse_args()
    start = time.perf_counter()
    print("collecting training blocks", flush=True)
    if not 1 <= args.groups <= 10:
        parser.error("--groups must be 1-10 (seeds from 9700 are held out)")
    cases = training_cases(args.groups)
    blocks = training_blocks(cases, args.slices)

    def fit(inputs, chosen):
        x = np.concatenate([inputs[i][blocks[i]["keep"]] for i in chosen])
        y = np.concatenate([blocks[i]["target"] for i in chosen])
        return HistGradientBoostingClassifier(max_iter=args.trees, max_leaf_nodes=args.leaves,
                                              random_state=0).fit(x, y)

    unknown = set(args.drop_features) - set(stm.stage_feature_names(1))
    if unknown:
        parser.error(f"unknown features: {sorted(unknown)}")
    classifiers = fit_stages(blocks, args.stages, fit, args.drop_features)
    y = np.concatenate([b["target"] for b in blocks])
    provenance = {"trained_on": "synthetic phantoms (HRpQCTPhantom), true bone/soft-tissue "
                                "split, default rules before the model",
                  "seeds_and_motion_grades": cases, "slices_per_phantom": args.slices,
                  "blocks": len(y), "myotendinous_share": round(float(y.mean()), 4),
                  "stages": args.stages, "trees": args.trees, "max_leaves": args.leaves,
                  "out_of_fold_groups": FOLDS, "dropped_features": args.drop_features,
                  "script": "benchmarks/train_soft_tissue_model.py"}
    # trained at 60.7 um; first-generation scanners' 82 um is the widest it is offered for
    document = stm.model_to_dict(classifiers, stm.BLOCK_MM, VOXEL_MM_RANGE, provenance,
                                 rules_band=args.rules_band,
                                 stage_features=[stage_names(k, args.drop_features)
                                                 for k in range(args.stages)])
    write_text_atomic(args.out, json.dumps(document) + "\n")
    model = stm.load_model(args.out)
    previous = None
    for k, (stage, classifier) in enumerate(zip(model.stages, classifiers, strict=True)):
        check = _stage_input(blocks[0], previous, k, args.drop_features)
        previous = stage.probability(check)
        assert np.allclose(previous, classifier.predict_proba(check)[:, 1],
                           rtol=0, atol=1e-12), "the JSON trees disagree with scikit-learn"
    print("scoring the held-out phantoms", flush=True)
    scores = held_out_scores(model, args.slices)
    print(json.dumps({"machine": machine(), "seconds": round(time.perf_counter() - start),
                      "blocks": len(y), "held_out": scores}, indent=1))
    if args.bundle:
        resources = Path(stm.__file__).parents[1] / "resources"
        target = resources / "soft_tissue" / f"{stm.BUNDLED_SOFT_TISSUE_MODEL}.json"
        target.parent.mkdir(exist_ok=True)
        write_bytes_atomic(target, args.out.read_bytes())
        register_artefact(resources, stm.BUNDLED_SOFT_TISSUE_MODEL,
                          target.relative_to(resources).as_posix(), "soft-tissue-model",
                          "Bundled learned myotendinous/adipose split (gradient-boosted trees, "
                          "JSON). Trained on this project's synthetic phantoms "
                          "(benchmarks/train_soft_tissue_model.py); research use only, not "
                          "for clinical use",
                          manifest_name="segmentation-artefacts.json")
        print(f"bundled: {target}")


if __name__ == "__main__":
    main()
