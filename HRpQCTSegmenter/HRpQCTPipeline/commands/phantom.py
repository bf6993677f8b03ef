"""``hrpqct phantom`` and ``hrpqct cohort``: synthetic scans with ground truth."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from HRpQCTCore.errors import HRpQCTError

ORDER = 80

log = logging.getLogger("hrpqct")

_EPILOG_PHANTOM = """examples:
  hrpqct phantom out/ --seed 1                       # full size: 168 x 1600 x 1600, 60.7 um
  hrpqct phantom out/ --small --slices 16            # whole leg at 0.24 mm in 400 x 400
  hrpqct phantom out/ --osteoporotic --motion-grade 3 --set tibia_ct_po=0.1
"""

_EPILOG_COHORT = """examples:
  hrpqct cohort cohort/ --subjects 122 --seed 7 --jobs 2      # the paper's 61 + 61
  hrpqct cohort cohort/ --subjects 20 --small --slices 8       # quick, coarse voxels
  hrpqct cohort c3/ --subjects 36 --classes 3 --small --slices 2  # normal/osteopenia/osteoporosis
  hrpqct cohort st/ --subjects 122 --effect-size 0 --soft-tissue-effect 1 --small --slices 2
                                         # soft tissue differs between the groups, bone not
"""


def _progress(args):
    try:
        from HRpQCTCore.cli_options import progress_from_args

        return progress_from_args(args)
    except ImportError:  # pragma: no cover - shared helpers not installed
        return None


def _add_image_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image")
    g.add_argument("--slices", type=int, help="number of slices (default 168)")
    g.add_argument("--field-px", type=int, help="field size in pixels (default 1600)")
    g.add_argument("--voxel-mm", type=float, help="isotropic voxel size (default 0.0607)")
    g.add_argument("--small", action="store_true",
                   help="400 x 400 field with 0.2428 mm voxels (whole leg; fast, less "
                        "microstructure realism)")
    g.add_argument("--formats", default="nifti",
                   help="comma-separated output formats: nifti, aim (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--progress", choices=("bar", "machine", "none"), default="bar",
                   help="progress display (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files (by default the command refuses, so no "
                        "file is replaced silently)")


def _image_overrides(args) -> dict:
    over: dict = {}
    if args.small:
        over.update(field_px=400, voxel_mm=0.0607 * 4)
    if args.field_px is not None:
        over["field_px"] = args.field_px
    if args.voxel_mm is not None:
        over["voxel_mm"] = args.voxel_mm
    if args.slices is not None:
        over["n_slices"] = args.slices
    if getattr(args, "fibula_gap_mm", None) is not None:
        over["fibula_gap_range_mm"] = tuple(args.fibula_gap_mm)
    return over


def _formats(args) -> tuple[str, ...]:
    return tuple(f.strip() for f in args.formats.split(",") if f.strip())


def _parse_set(items: list[str]) -> dict:
    from HRpQCTPhantom import PhantomParams

    defaults = PhantomParams().to_dict()
    out = {}
    for item in items or []:
        if "=" not in item:
            raise HRpQCTError(f"--set expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        name = name.strip()
        if name not in defaults:
            raise HRpQCTError(f"Unknown phantom parameter {name!r}; known: "
                              f"{', '.join(sorted(defaults))}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
        if isinstance(defaults[name], float) and isinstance(out[name], int):
            out[name] = float(out[name])
    return out


def run_phantom(args: argparse.Namespace) -> int:
    import numpy as np

    from HRpQCTCore.outputs import check_output_file
    from HRpQCTPhantom import PhantomParams, generate_phantom, write_phantom
    from HRpQCTPhantom.writer import phantom_paths, refuse_existing

    values = _image_overrides(args)
    values.update(_parse_set(args.set))
    if args.motion_grade is not None:
        values["motion_grade"] = args.motion_grade
    try:
        if args.osteoporotic is not None:
            rng = np.random.default_rng(args.seed)
            params = PhantomParams.sample(rng, osteoporotic=args.osteoporotic,
                                          effect_size=args.effect_size, **values)
        else:
            params = PhantomParams(**values)
    except (TypeError, ValueError) as exc:
        raise HRpQCTError(f"{exc}. Check the --set values.") from None
    out = Path(args.out_dir)
    planned = phantom_paths(out, args.stem, _formats(args)).values()
    for path in planned:  # refuse before the (long) generation, not after it
        check_output_file(path)
    if not args.overwrite:
        refuse_existing(planned)
    phantom = generate_phantom(params, args.seed, progress=_progress(args))
    paths = write_phantom(phantom, out, args.stem, _formats(args), overwrite=args.overwrite)
    for kind, path in paths.items():
        log.info("%s: %s", kind, path)
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _check_soft_tissue_effect(args: argparse.Namespace) -> None:
    from HRpQCTPhantom.params import check_soft_tissue_effect

    if args.soft_tissue_effect is None:
        return
    try:
        check_soft_tissue_effect(args.soft_tissue_effect)
    except ValueError as exc:
        raise HRpQCTError(f"--soft-tissue-effect: {exc}") from None
    if args.classes != 2:
        raise HRpQCTError("--soft-tissue-effect applies to two-group cohorts (--classes 2).")


def _check_fibula_gap(args: argparse.Namespace) -> None:
    from HRpQCTPhantom.params import check_fibula_gap_range

    if args.fibula_gap_mm is None:
        return
    try:
        check_fibula_gap_range(tuple(args.fibula_gap_mm))
    except ValueError as exc:
        raise HRpQCTError(f"--fibula-gap-mm: {exc}") from None


def run_cohort(args: argparse.Namespace) -> int:
    from HRpQCTPhantom import generate_cohort

    _check_soft_tissue_effect(args)  # before anything is written
    _check_fibula_gap(args)
    manifest = generate_cohort(
        args.subjects, Path(args.out_dir), args.seed, effect_size=args.effect_size,
        fraction_osteoporotic=args.fraction_osteoporotic, n_classes=args.classes,
        soft_tissue_effect=args.soft_tissue_effect, n_jobs=args.jobs,
        formats=_formats(args), progress=_progress(args), overwrite=args.overwrite,
        **_image_overrides(args))
    print(str(manifest))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom", help="generate one synthetic HR-pQCT scan with ground truth",
        description="Generate a synthetic distal tibia + fibula scan (HU), its 5-class and "
                    "7-region label maps and a JSON of true morphometrics and parameters. "
                    "Synthetic data: for testing and training, not a model of patients.",
        epilog=_EPILOG_PHANTOM, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--stem", default="phantom", help="file name stem (default %(default)s)")
    grp = p.add_mutually_exclusive_group()
    grp.add_argument("--osteoporotic", dest="osteoporotic", action="store_true", default=None,
                     help="draw the subject from the osteoporotic group")
    grp.add_argument("--control", dest="osteoporotic", action="store_false",
                     help="draw the subject from the control group")
    p.add_argument("--effect-size", type=float, default=2.0,
                   help="group separation of latent bone health, SD units (default 2.0)")
    p.add_argument("--motion-grade", type=int, choices=range(1, 6), help="1 (none) to 5")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="set any PhantomParams field, e.g. --set tibia_bv_tv=0.15")
    _add_image_options(p)
    p.set_defaults(func=run_phantom)

    c = subparsers.add_parser(
        "cohort", help="generate a synthetic osteoporosis/control cohort with a manifest",
        description="Generate N synthetic subjects (balanced osteoporotic/control by default) "
                    "whose latent bone health drives bone and soft-tissue parameters with "
                    "overlapping groups; writes scans, labels, truth and manifest.csv.",
        epilog=_EPILOG_COHORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("out_dir", help="output folder")
    c.add_argument("--subjects", type=int, required=True, help="number of subjects")
    c.add_argument("--effect-size", type=float, default=2.0,
                   help="group separation of latent bone health, SD units (default 2.0)")
    c.add_argument("--soft-tissue-effect", type=float, metavar="X",
                   help="give soft tissue (marbling, muscle/tendon/fat HU, muscle and tendon "
                        "size) its own group separation X in SD units, independent of bone "
                        "health: 0 = no soft-tissue difference between the groups; recorded "
                        "in the manifest (default: soft tissue follows bone health)")
    c.add_argument("--fraction-osteoporotic", type=float, default=0.5,
                   help="share of osteoporotic subjects (default 0.5; two classes only)")
    c.add_argument("--classes", type=int, choices=(2, 3), default=2,
                   help="2: osteoporotic/control (default); 3: normal/osteopenia/osteoporosis "
                        "thirds by T-score cut-offs -1 and -2.5 (manifest gains 'diagnosis')")
    c.add_argument("--fibula-gap-mm", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="range of the narrowest tibia-fibula distance drawn per subject "
                        "(default 1.2 4.5, the bundled model's cohort; >= 0.5)")
    c.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    _add_image_options(c)
    c.set_defaults(func=run_cohort)
