"""Options and helpers shared by the subcommands, so every command spells them the same way."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.progress import ProgressCallback, machine_progress_printer

__all__ = [
    "add_units_options",
    "calibration_from_args",
    "add_progress_option",
    "progress_from_args",
    "add_overwrite_option",
    "check_can_write",
    "EXAMPLES_FORMATTER",
]

EXAMPLES_FORMATTER = argparse.RawDescriptionHelpFormatter


def add_units_options(parser: argparse.ArgumentParser) -> None:
    """``--units`` and the calibration constants, for commands that read a scan."""
    group = parser.add_argument_group("units and calibration")
    group.add_argument("--units", default="auto", choices=("auto", "hu", "native", "density"),
                       help="grey-value units of the input (auto: from the file's header; "
                            "default %(default)s)")
    group.add_argument("--mu-scaling", type=float, help="Scanco mu_scaling (e.g. 8192)")
    group.add_argument("--mu-water", type=float, help="attenuation of water, 1/cm (e.g. 0.2409)")
    group.add_argument("--density-slope", type=float, help="density slope (mg HA/cm3 per mu)")
    group.add_argument("--density-intercept", type=float, help="density intercept (mg HA/cm3)")


def calibration_from_args(args: argparse.Namespace):
    """A :class:`~HRpQCTCore.scan.Calibration` from the options, or None if none given.

    Constants not given take the XtremeCT II defaults, and the calibration is marked as the
    user's.
    """
    from HRpQCTCore.scan import Calibration

    given = {
        "mu_scaling": args.mu_scaling, "mu_water": args.mu_water,
        "density_slope": args.density_slope, "density_intercept": args.density_intercept,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    try:
        return Calibration(**given, source="user")
    except ValueError as exc:
        raise HRpQCTError(f"Invalid calibration option: {exc}") from None


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress", choices=("bar", "machine", "none"), default="bar",
        help="progress display: a bar on stderr, JSON lines on stdout for a parent process "
             "(used by the Slicer module), or nothing (default %(default)s)")


def progress_from_args(args: argparse.Namespace) -> ProgressCallback | None:
    """A progress callback for the ``--progress`` choice."""
    if args.progress == "none":
        return None
    if args.progress == "machine":
        return machine_progress_printer(sys.stdout)
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def _bar(done: int, total: int, stage: str) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False,
                                     dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return _bar


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (by default the command refuses, "
                             "so edited results are never lost silently)")


def check_can_write(paths, overwrite: bool, inputs=()) -> None:
    """Refuse outputs that cannot or must not be written, before any long computation.

    Parameters
    ----------
    paths:
        The output files.
    overwrite:
        Whether existing outputs may be replaced.
    inputs:
        The command's input files: an output that is one of them (also through a link) is
        refused even with ``overwrite``, since writing it would destroy the input.

    Raises
    ------
    OutputError
        If an output is a folder, or lies below a file.
    HRpQCTError
        If an output is an input, or exists and ``overwrite`` is false.
    """
    from HRpQCTCore.outputs import check_output_file, refuse_inputs_as_outputs

    paths = [Path(p) for p in paths]
    for path in paths:
        check_output_file(path)
    refuse_inputs_as_outputs(paths, inputs)
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise HRpQCTError(
            f"Output already exists: {', '.join(existing)}. Choose another output, or pass "
            "--overwrite to replace it.")
