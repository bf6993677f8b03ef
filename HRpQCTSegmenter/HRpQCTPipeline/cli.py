"""The ``hrpqct`` command line.

Subcommands are discovered, not listed here: every module in
:mod:`HRpQCTPipeline.commands` (and in ``HRpQCTPipeline.commands`` when that package is
installed) that defines ``register(subparsers)`` adds one or more subcommands. A module sets its
parser's ``func`` default to the function that runs it; ``ORDER`` (an int) sorts ``--help``.

Exit codes: 0 success; 1 unexpected internal error (a bug: please report it with the log);
2 bad usage or configuration; 3 unreadable/unsupported/corrupt input file; 4 invalid scan data;
5 calibration/units problem; 6 bundled or user artefact missing or failing its checksum;
7 a batch finished but some scans failed (see its failures.csv); 8 an output cannot be written
(disk full, file-size limit, read-only or missing folder, no permission; nothing partial is
left under its name); 130 cancelled.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
import warnings
from collections.abc import Sequence

from HRpQCTCore import __version__
from HRpQCTCore.errors import HRpQCTError

__all__ = ["main", "build_parser"]

log = logging.getLogger("hrpqct")

_COMMAND_PACKAGE = "HRpQCTPipeline.commands"


def _command_modules():
    package = importlib.import_module(_COMMAND_PACKAGE)
    modules = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_COMMAND_PACKAGE}.{info.name}")
        if hasattr(module, "register"):
            modules.append(module)
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every discovered subcommand."""
    parser = argparse.ArgumentParser(
        prog="hrpqct",
        description=(
            "HR-pQCT distal tibia/fibula: multi-region segmentation, radiomics and an "
            "osteoporosis classifier. Research software; bundled models are trained on "
            "synthetic phantoms and are not for clinical use."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _command_modules():
        module.register(sub)
    return parser


#: Loggers of dependencies whose INFO lines are noise in a command's output: pyradiomics
#: validates its settings with pykwalify, which logs "validation.valid" every time.
_QUIET_DEPENDENCIES = ("pykwalify",)
#: Warnings of dependencies that say nothing to the user: loky (joblib's process pool)
#: reports a worker it stopped and replaced itself; the results are complete.
_IGNORED_WARNINGS = (r"A worker stopped while some jobs were given to the executor",)


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr)
    if verbose < 2:  # -vv shows everything
        for name in _QUIET_DEPENDENCIES:
            logging.getLogger(name).setLevel(logging.WARNING)
        for message in _IGNORED_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        result = args.func(args)
    except HRpQCTError as exc:
        print(f"hrpqct {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"hrpqct {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
