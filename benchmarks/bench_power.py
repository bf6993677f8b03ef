"""Known-effect check: power to detect a soft-tissue group difference at the paper's n = 122.

Question (issue #18): if the soft tissue of osteoporotic and control subjects differs by a
known amount, how often does the project's soft-tissue classification detect it in a cohort
of the paper's size (122 subjects, 61 + 61)? Only then can a null result on real data be
read. Everything is synthetic phantoms.

Design (each choice costs realism; see "What this is not" at the end):

* **Effect.** The generator's soft-tissue effect ``X`` in SD units
  (``PhantomParams.sample(..., soft_tissue_effect=X)``, ``hrpqct cohort
  --soft-tissue-effect X``): the soft-tissue parameters
  (``HRpQCTPhantom.params.SOFT_TISSUE_PARAMETERS``: marbling, muscle/tendon/fat HU, muscle and
  tendon size) follow a latent score ``s ~ N(+-X/2, 1)`` of their own. The bone effect is
  off (``effect_size=0``) and motion is fixed at grade 1 (in the cohort motion grows with
  age, which differs between the groups), so only soft tissue can carry a signal and
  ``X = 0`` is an exact null: the false-positive check.
* **Images.** One slice per subject, 400 x 400 px at 0.2428 mm (the whole leg, as
  ``hrpqct cohort --small``); pose, size, holder shell and noise (SD 110-190 HU) vary
  as in the cohort.
* **Regions.** The phantom's truth regions skin, myotendinous and adipose: no segmentation
  network, no post-processing (their errors would only lower the power).
* **Features.** A fixed set (:data:`FEATURES`, 10 per region, 30 in all) from the project's
  extraction (``HRpQCTRadiomicsEngine.extraction``, pyradiomics' values, the paper preset's
  settings: bin width 25 HU, 2D).
* **Classifier.** The project's pipeline (the paper's selection -> standardisation ->
  logistic regression), out-of-fold probabilities from 5-fold stratified subject-grouped
  cross-validation (``classification.cross_validate``; one repeat, fold seed = cohort index).
  With one slice per subject, image and patient level coincide.
* **Detected**, two tests of one cohort's cross-validated AUROC:

  - *bootstrap-CI test* (pre-specified): the 95 % subject-bootstrap percentile interval
    (the draws of ``classification.bootstrap_metrics``, 1000) lies above 0.5: two-sided
    alpha 0.05 counted in the expected direction, nominally 0.025 one-sided. The bootstrap
    holds the out-of-fold probabilities fixed, so it misses the variation from refitting the
    models: the effect-0 row measures how far its real false-positive rate is off;
  - *calibrated test* (added after the first run found the bootstrap-CI test too liberal):
    the AUROC exceeds the 95th percentile of the AUROCs of ``--null-cohorts`` null cohorts
    (effect 0, seeds of their own): one-sided alpha 0.05, the critical value a
    permutation test of each cohort would approach (under the null the groups are
    exchangeable, so every cohort's AUROC has the same distribution). The effect-0 row,
    drawn independently of those null cohorts, checks its false-positive rate.
* **Power**: detected cohorts / cohorts per effect, with the exact (Clopper-Pearson) 95 %
  interval; also the mean and SD of the AUROC over cohorts.

**Reuse** (to stay within ~25 CPU minutes; a fresh 122-subject cohort costs ~30 CPU s to
render and extract): a pool of subjects is rendered and extracted once, each with its own
standardised soft-tissue score ``z ~ N(0, 1.2^2)`` (and bone health ``N(0, 1)``). A cohort of
effect ``X`` walks the pool in a random order and accepts subjects by rejection sampling so
that its controls' ``z`` follow ``N(+m, sd^2)`` and its osteoporotic subjects' ``N(-m, sd^2)``
with ``m = (X/2) / c``, ``sd = 1 / c``, ``c = sqrt(1 + X^2/4)``: exactly the distribution of
the generator's standardised soft-tissue score for effect ``X``. A subject appears at most
once per cohort, but cohorts of one effect share pool subjects (the mean share is printed),
so they are not independent and the binomial intervals are somewhat too narrow; all effects
use the same pool (a common pool: the curve is smoother than its intervals suggest).

Usage::

    python benchmarks/bench_power.py [--effects 0,0.25,0.5,0.75,1,1.25,1.5,2]
        [--cohorts 100] [--null-cohorts 400] [--subjects 122] [--pool 2500] [--quick]
        [--cache POOL.npz] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine

from HRpQCTCore.regions import SOFT_TISSUE_REGIONS
from HRpQCTCore.scan import XTREMECT2_VOXEL_MM
from HRpQCTPhantom import generate_phantom, params_from_bone_health
from HRpQCTPhantom.params import BONE_HEALTH_LOADINGS, SOFT_TISSUE_PARAMETERS, PhantomParams
from HRpQCTRadiomicsEngine.classification import (
    Dataset,
    binary_metrics,
    cross_validate,
)
from HRpQCTRadiomicsEngine.extraction import STATUS_OK, extract_slice_features
from HRpQCTRadiomicsEngine.settings import load_settings

FIELD_PX = 400
VOXEL_MM = XTREMECT2_VOXEL_MM * 1600 / FIELD_PX  # 0.2428 mm: the whole 97 mm field
#: SD of the pool's standardised soft-tissue score: wider than every target (SD <= 1), so
#: rejection sampling can reach each target's tails.
PROPOSAL_SD = 1.2
FOLDS = 5
N_BOOT = 1000
#: Level of the calibrated test (one-sided: AUROC above chance).
ALPHA = 0.05
#: Per soft-tissue region: size (muscle and tendon scale), intensity level and spread
#: (HU parameters, marbling) and two textures. Fixed, not selected on these data.
FEATURES: tuple[str, ...] = (
    "original_shape2D_PixelSurface",
    "original_firstorder_Mean",
    "original_firstorder_Median",
    "original_firstorder_10Percentile",
    "original_firstorder_90Percentile",
    "original_firstorder_InterquartileRange",
    "original_firstorder_Skewness",
    "original_firstorder_Kurtosis",
    "original_glcm_Contrast",
    "original_glcm_Correlation",
)
DEFAULT_EFFECTS = "0,0.25,0.5,0.75,1,1.25,1.5,2"


@dataclass
class Pool:
    """Rendered subjects: standardised soft-tissue score and features of each."""

    z: np.ndarray
    X: np.ndarray  # (subjects, features)
    feature_names: list[str]


# --- the pool -------------------------------------------------------------------------------

def pool_subject(index: int, seed: int) -> tuple[float, PhantomParams, int]:
    """Score ``z``, parameters and phantom seed of pool subject ``index`` (deterministic)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9057, index]))
    z = float(rng.normal(0.0, PROPOSAL_SD))
    h = float(rng.normal(0.0, 1.0))  # bone effect off: the same bone in both groups
    sex = "F" if rng.random() < 0.65 else "M"
    # soft_tissue_effect=0 leaves the score unscaled: z is the standardised score itself.
    params = params_from_bone_health(
        rng, h, sex=sex, effect_size=0.0, soft_tissue_health=z, soft_tissue_effect=0.0,
        n_slices=1, field_px=FIELD_PX, voxel_mm=VOXEL_MM, motion_grade=1)
    return z, params, int(rng.integers(0, 2**31 - 1))


def subject_features(index: int, seed: int) -> tuple[float, list[float]]:
    """Render pool subject ``index`` and extract :data:`FEATURES` of its soft-tissue regions."""
    z, params, phantom_seed = pool_subject(index, seed)
    phantom = generate_phantom(params, phantom_seed, n_threads=1)
    labels = [r.label for r in SOFT_TISSUE_REGIONS]
    results = extract_slice_features(phantom.scan.hu[0], phantom.regions[0],
                                     phantom.scan.spacing_mm, load_settings("paper"),
                                     regions=labels, features=list(FEATURES))
    values = []
    for result in results:
        ok = result.status == STATUS_OK
        values += [float(result.features[n]) if ok else math.nan for n in FEATURES]
    return z, values


def build_pool(indices: range, seed: int, jobs: int) -> Pool:
    """Render and extract the pool subjects ``indices`` (``jobs`` processes)."""
    from joblib import Parallel, delayed

    rows = Parallel(n_jobs=jobs, batch_size=8)(
        delayed(subject_features)(i, seed) for i in indices)
    names = [f"{r.key}:{f}" for r in SOFT_TISSUE_REGIONS for f in FEATURES]
    return Pool(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), names)


def _pool_meta(seed: int) -> dict:
    return {"seed": seed, "field_px": FIELD_PX, "voxel_mm": VOXEL_MM,
            "proposal_sd": PROPOSAL_SD, "features": list(FEATURES)}


def _read_cache(cache: Path | None, seed: int) -> Pool | None:
    if cache is None or not cache.is_file():
        return None
    stored = np.load(cache, allow_pickle=False)
    if json.loads(str(stored["meta"])) != _pool_meta(seed):
        return None
    return Pool(stored["z"], stored["X"], [str(n) for n in stored["names"]])


def _write_cache(cache: Path, pool: Pool, seed: int) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".partial.npz")
    np.savez(tmp, z=pool.z, X=pool.X, names=np.array(pool.feature_names),
             meta=json.dumps(_pool_meta(seed)))
    tmp.replace(cache)


def load_or_build_pool(n_pool: int, seed: int, jobs: int, cache: Path | None,
                       chunk: int = 250) -> Pool:
    """The first ``n_pool`` pool subjects, rendering only those ``cache`` lacks.

    Subject ``i`` depends only on ``(seed, i)``, so a cached pool built with the same
    settings serves any smaller pool, and a larger one extends it; the cache is saved after
    every ``chunk`` subjects (an interrupted run keeps its work).
    """
    pool = _read_cache(cache, seed)
    while pool is None or len(pool.z) < n_pool:
        start = 0 if pool is None else len(pool.z)
        part = build_pool(range(start, min(n_pool, start + chunk)), seed, jobs)
        pool = part if pool is None else Pool(np.concatenate([pool.z, part.z]),
                                              np.concatenate([pool.X, part.X]),
                                              pool.feature_names)
        if cache is not None:
            _write_cache(cache, pool, seed)
        print(f"  pool: {len(pool.z)} / {n_pool} subjects rendered", flush=True)
    return Pool(pool.z[:n_pool], pool.X[:n_pool], pool.feature_names)


def finite_features(pool: Pool) -> Pool:
    """The pool without features that are NaN/infinite for any subject (degenerate regions)."""
    keep = np.isfinite(pool.X).all(axis=0)
    return Pool(pool.z, pool.X[:, keep], [n for n, k in zip(pool.feature_names, keep,
                                                             strict=True) if k])


# --- cohorts of a given effect, by rejection sampling ---------------------------------------

def target(effect: float, osteoporotic: bool) -> tuple[float, float]:
    """Mean and SD of the generator's standardised soft-tissue score in one group."""
    c = math.sqrt(1.0 + (effect / 2.0) ** 2)
    return (-1.0 if osteoporotic else 1.0) * effect / 2.0 / c, 1.0 / c


def log_density_ratio(z: np.ndarray, mean: float, sd: float) -> np.ndarray:
    """log N(z; mean, sd^2) - log N(z; 0, PROPOSAL_SD^2)."""
    return (math.log(PROPOSAL_SD / sd) - (z - mean) ** 2 / (2 * sd**2)
            + z**2 / (2 * PROPOSAL_SD**2))


def log_ratio_bound(mean: float, sd: float) -> float:
    """The maximum over z of :func:`log_density_ratio` (needs sd < PROPOSAL_SD)."""
    z_star = mean * PROPOSAL_SD**2 / (PROPOSAL_SD**2 - sd**2)
    return float(log_density_ratio(np.array(z_star), mean, sd))


def draw_cohort(z: np.ndarray, effect: float, n_subjects: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pool indices and labels (1 = osteoporotic) of one cohort of effect ``effect``.

    Each candidate (pool in random order) is tried for the group that still needs more
    members, a choice independent of its ``z``, and accepted with probability target /
    (bound * proposal), so accepted scores follow that group's target exactly.
    """
    need = {1: n_subjects // 2, 0: n_subjects - n_subjects // 2}  # the paper's 61 + 61
    targets = {g: target(effect, bool(g)) for g in need}
    bounds = {g: log_ratio_bound(*targets[g]) for g in need}
    chosen, labels = [], []
    for i in rng.permutation(len(z)):
        if not need[0] and not need[1]:
            break
        group = 1 if need[1] >= need[0] else 0
        mean, sd = targets[group]
        if math.log(rng.random()) < float(log_density_ratio(z[i], mean, sd)) - bounds[group]:
            chosen.append(i)
            labels.append(group)
            need[group] -= 1
    if need[0] or need[1]:
        raise SystemExit(f"The pool ({len(z)} subjects) ran out at effect {effect}: use a "
                         "larger --pool.")
    return np.array(chosen), np.array(labels)


# --- one cohort's test ----------------------------------------------------------------------

def evaluate_cohort(pool: Pool, index: np.ndarray, y: np.ndarray, fold_seed: int,
                    n_boot: int) -> dict:
    """Cross-validated AUROC of one cohort with its subject-bootstrap 95 % interval."""
    groups = np.array([f"pool-{i}" for i in index], dtype=object)
    data = Dataset(pool.X[index], y, groups, pool.feature_names,
                   [(g, "0") for g in groups])
    oof, _ = cross_validate(data, "logistic", FOLDS, fold_seed)
    auroc = binary_metrics(y, oof)["auroc"]
    low, high = bootstrap_auroc_interval(y, oof, n_boot, seed=fold_seed)
    return {"auroc": auroc, "ci95": [low, high], "detected": bool(low > 0.5)}


def bootstrap_auroc_interval(y: np.ndarray, probabilities: np.ndarray, n_boot: int,
                             seed: int) -> tuple[float, float]:
    """95 % percentile interval of the AUROC over subjects drawn with replacement.

    The draws and the interval of ``classification.bootstrap_metrics`` at patient level
    (one row per subject; same seed, same result), for the AUROC alone and vectorised: the
    project's function computes every metric per draw (~1.8 s per cohort, ~50x this).
    """
    from scipy.stats import rankdata

    rng = np.random.default_rng(seed)
    positions = np.arange(len(y))
    draws = np.array([rng.choice(positions, size=len(y), replace=True) for _ in range(n_boot)])
    labels, scores = y[draws], probabilities[draws]
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    ranks = rankdata(scores, axis=1)  # ties share their mean rank, as in the U statistic
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auroc = auroc[(n_pos > 0) & (n_neg > 0)]  # a draw with one class has no AUROC
    return float(np.quantile(auroc, 0.025)), float(np.quantile(auroc, 0.975))


def exact_interval(k: int, n: int) -> tuple[float, float]:
    """Clopper-Pearson 95 % interval of a binomial proportion."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return float(ci.low), float(ci.high)


def mean_shared_fraction(cohorts: list[np.ndarray]) -> float:
    """Mean share of subjects two cohorts of one effect have in common."""
    sets = [set(c.tolist()) for c in cohorts]
    pairs = [len(a & b) / len(a) for i, a in enumerate(sets) for b in sets[i + 1:]]
    return float(np.mean(pairs)) if pairs else float("nan")


#: Seed tag of the null cohorts that set the calibrated test's critical value (independent
#: of the effect-0 cohorts of the table, which check that test's false-positive rate).
CALIBRATION_TAG = 0xCA11B


def draw_and_test(pool: Pool, effect: float, n_cohorts: int, n_subjects: int, seed: int,
                 n_boot: int, tag: int | None = None) -> tuple[list[dict], list[np.ndarray]]:
    """Draw ``n_cohorts`` cohorts of ``effect`` from the pool and test each."""
    tag = round(effect * 1000) if tag is None else tag
    cohorts, tests = [], []
    for k in range(n_cohorts):
        # Seeds per (effect, cohort): adding an effect or cohorts leaves the others alone.
        rng = np.random.default_rng(np.random.SeedSequence([seed, tag, k]))
        index, y = draw_cohort(pool.z, effect, n_subjects, rng)
        cohorts.append(index)
        tests.append(evaluate_cohort(pool, index, y, k, n_boot))
    return tests, cohorts


def null_calibration(pool: Pool, n_cohorts: int, n_subjects: int, seed: int, n_boot: int,
                     alpha: float = ALPHA) -> dict:
    """Critical AUROC of the calibrated test: the 1 - alpha quantile over null cohorts.

    Under the null every cohort's cross-validated AUROC has the same distribution (the
    groups are exchangeable), so its quantile over independent null cohorts is the critical
    value a permutation test of each cohort would approach. Also: how wide the null spread
    is against the subject bootstrap's own SD (why the bootstrap-interval test is too
    liberal when it is).
    """
    tests, _ = draw_and_test(pool, 0.0, n_cohorts, n_subjects, seed, n_boot, CALIBRATION_TAG)
    aurocs = np.array([t["auroc"] for t in tests])
    boot_sd = np.mean([(t["ci95"][1] - t["ci95"][0]) / (2 * 1.959964) for t in tests])
    return {"cohorts": n_cohorts, "critical_auroc": float(np.quantile(aurocs, 1 - alpha)),
            "alpha": alpha, "auroc_mean": float(aurocs.mean()),
            "auroc_sd": float(aurocs.std(ddof=1)), "bootstrap_sd_mean": float(boot_sd),
            "bootstrap_detected": int(sum(t["detected"] for t in tests))}


def _power(detected: int, n: int) -> dict:
    return {"detected": detected, "power": detected / n, "power_ci95": exact_interval(detected, n)}


def run_effect(pool: Pool, effect: float, n_cohorts: int, n_subjects: int, seed: int,
               n_boot: int, critical_auroc: float) -> dict:
    """Power of both tests at one effect, from ``n_cohorts`` cohorts drawn from the pool."""
    tests, cohorts = draw_and_test(pool, effect, n_cohorts, n_subjects, seed, n_boot)
    aurocs = np.array([t["auroc"] for t in tests])
    for t in tests:
        t["detected_calibrated"] = bool(t["auroc"] > critical_auroc)
    return {"effect": effect, "cohorts": n_cohorts,
            "bootstrap_test": _power(sum(t["detected"] for t in tests), n_cohorts),
            "calibrated_test": _power(sum(t["detected_calibrated"] for t in tests), n_cohorts),
            "auroc_mean": float(aurocs.mean()),
            "auroc_sd": float(aurocs.std(ddof=1)) if n_cohorts > 1 else 0.0,
            "ci_low_mean": float(np.mean([t["ci95"][0] for t in tests])),
            "shared_fraction": mean_shared_fraction(cohorts), "tests": tests}


# --- what an effect means in the generator's units ------------------------------------------

def parameter_difference(name: str, effect: float) -> tuple[float, float]:
    """Osteoporotic - control mean of a soft-tissue parameter (its units) and Cohen's d.

    From the loadings (parameter = mean + sd * (loading * score + sqrt(1 - loading^2) *
    own)), before clipping to the parameter's range.
    """
    _, sd, loading, _, _ = BONE_HEALTH_LOADINGS[name]
    c = math.sqrt(1.0 + (effect / 2.0) ** 2)
    difference = -sd * loading * effect / c + 0.0  # + 0.0: no "-0.0" at effect 0
    within_sd = sd * math.sqrt(loading**2 / c**2 + 1.0 - loading**2)
    return difference, difference / within_sd


def effect_at_power(results: list[dict], test: str, goal: float = 0.8) -> float | None:
    """Effect where ``test``'s power first reaches ``goal`` (linear between tested effects)."""
    curve = sorted((r["effect"], r[test]["power"]) for r in results)
    for (x0, p0), (x1, p1) in itertools.pairwise(curve):
        if p0 < goal <= p1:
            return x0 + (goal - p0) / (p1 - p0) * (x1 - x0)
    if curve and curve[0][1] >= goal:
        return curve[0][0]
    return None


def _print_table(results: list[dict]) -> None:
    print("| soft-tissue effect X (SD) | muscle HU, osteop. - control | marbling (pp), osteop. "
          "- control | Cohen's d per parameter | power, bootstrap-CI test (95 % CI) | "
          "power, calibrated test (95 % CI) | AUROC mean ± SD | pool subjects shared by 2 "
          "cohorts |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        x = r["effect"]
        muscle = parameter_difference("muscle_hu", x)[0]
        marbling = parameter_difference("intramuscular_fat_fraction", x)[0] * 100
        ds = [abs(parameter_difference(n, x)[1]) for n in SOFT_TISSUE_PARAMETERS]
        cells = []
        for test in ("bootstrap_test", "calibrated_test"):
            t = r[test]
            cells.append(f"{t['power']:.2f} ({t['power_ci95'][0]:.2f}–{t['power_ci95'][1]:.2f};"
                         f" {t['detected']}/{r['cohorts']})")
        print(f"| {x:g} | {muscle:+.1f} | {marbling:+.1f} | {min(ds):.2f}–{max(ds):.2f} | "
              f"{cells[0]} | {cells[1]} | {r['auroc_mean']:.3f} ± {r['auroc_sd']:.3f} | "
              f"{r['shared_fraction']:.0%} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--effects", default=DEFAULT_EFFECTS,
                        help="comma-separated soft-tissue effects, SD units (default "
                             "%(default)s; 0 is the false-positive check)")
    parser.add_argument("--cohorts", type=int, default=100, help="cohorts per effect")
    parser.add_argument("--null-cohorts", type=int, default=400,
                        help="null cohorts setting the calibrated test's critical AUROC")
    parser.add_argument("--subjects", type=int, default=122, help="subjects per cohort")
    parser.add_argument("--pool", type=int, default=2500, help="rendered subjects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=N_BOOT)
    parser.add_argument("--jobs", type=int, default=1, help="processes rendering the pool")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: pool 300, 4 cohorts (20 null), effects 0 and 1.5, "
                             "200 draws")
    parser.add_argument("--cache", type=Path, help="pool features (.npz), reused if it matches")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.pool, args.cohorts, args.effects, args.bootstrap = 300, 4, "0,1.5", 200
        args.null_cohorts = 20
    effects = [float(e) for e in args.effects.split(",")]
    if args.subjects < 2 * FOLDS:
        parser.error(f"--subjects must be >= {2 * FOLDS}")

    load_start = os.getloadavg()
    print(f"machine: {machine()}; load average {load_start[0]:.2f} at the start", flush=True)
    t0, c0 = time.time(), time.process_time()
    pool = finite_features(load_or_build_pool(args.pool, args.seed, args.jobs, args.cache))
    pool_s = time.process_time() - c0
    print(f"pool: {len(pool.z)} subjects, {len(pool.feature_names)} finite features "
          f"({pool_s:.0f} CPU s in this process; joblib workers not counted)", flush=True)
    null = null_calibration(pool, args.null_cohorts, args.subjects, args.seed, args.bootstrap)
    print(f"null calibration: {null['cohorts']} cohorts at effect 0: CV AUROC "
          f"{null['auroc_mean']:.3f} ± {null['auroc_sd']:.3f} (mean ± SD over cohorts; one "
          f"cohort's bootstrap SD {null['bootstrap_sd_mean']:.3f}); critical AUROC (one-sided "
          f"alpha {null['alpha']}) {null['critical_auroc']:.3f}; bootstrap-CI test detected "
          f"{null['bootstrap_detected']}/{null['cohorts']}", flush=True)
    results = []
    for effect in effects:
        r = run_effect(pool, effect, args.cohorts, args.subjects, args.seed, args.bootstrap,
                       null["critical_auroc"])
        results.append(r)
        print(f"effect {effect:g}: power {r['bootstrap_test']['power']:.2f} (bootstrap-CI "
              f"test), {r['calibrated_test']['power']:.2f} (calibrated), mean AUROC "
              f"{r['auroc_mean']:.3f}", flush=True)
    cpu_s, wall_s = time.process_time() - c0, time.time() - t0
    print(f"\n{args.subjects} subjects per cohort ({args.subjects // 2} osteoporotic), "
          f"{args.cohorts} cohorts per effect, pool {args.pool}, {args.bootstrap} bootstrap "
          f"draws, critical AUROC {null['critical_auroc']:.3f} from {null['cohorts']} null "
          f"cohorts\n")
    _print_table(results)
    x80 = {test: effect_at_power(results, test) for test in ("bootstrap_test",
                                                               "calibrated_test")}
    for test, x in x80.items():
        name = {"bootstrap_test": "bootstrap-CI test", "calibrated_test": "calibrated test"}
        print(f"\neffect with 80 % power, {name[test]} (linear between tested effects): "
              f"{'not reached' if x is None else f'{x:.2f} SD'}", end="")
    load_end = os.getloadavg()
    print(f"\n{cpu_s:.0f} CPU s, {wall_s:.0f} s wall; load average {load_start[0]:.2f} -> "
          f"{load_end[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
             "load_average": [load_start[0], load_end[0]], "cpu_s": cpu_s, "wall_s": wall_s,
             "features": pool.feature_names, "null_calibration": null,
             "effect_at_80_power": x80, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
