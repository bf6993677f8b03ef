"""The Python packages a module needs in Slicer: checked by version, installed with consent.

Slicer bundles numpy, scipy, SimpleITK and a few more, but nothing else the engine imports.
Each module declares what its code -- including the background process it starts -- imports
(a tuple of :class:`Dependency`; ``HRpQCTSegmenterLib.dependencies`` and
``HRpQCTRadiomicsLib.dependencies``), and offers to install what is missing or too old when
Apply is first pressed: never at import time, never without the user's consent
(:func:`ensure_dependencies`, with the dialog and the installers passed in, so the order is
tested without Slicer).

Checking imports nothing: a package is found with ``importlib.util.find_spec`` and its
version read with ``importlib.metadata`` and compared with the declared range
(``packaging``, which Slicer bundles).

Installing must not break Slicer: unconstrained, pip may upgrade a package Slicer ships (one
of scikit-image's dependencies pulls a newer numpy than Slicer's). :func:`pip_install` therefore
runs pip with a constraints file pinning every package of :data:`SLICER_BUNDLED` at the
version installed now (:func:`slicer_constraints`), so pip picks releases compatible with
them or fails with a message instead.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from HRpQCTCore.errors import HRpQCTError

__all__ = [
    "PIP",
    "PYTORCH",
    "SLICER",
    "EXTENSION",
    "Dependency",
    "SLICER_PACKAGES",
    "SCANCO_DEPENDENCIES",
    "SLICER_BUNDLED",
    "installed_version",
    "dependency_problem",
    "missing_dependencies",
    "pip_requirements",
    "consent_message",
    "slicer_constraints",
    "pip_install_command",
    "pip_install",
    "ensure_dependencies",
]

#: ``find_spec(module_name) -> spec or None`` (``importlib.util.find_spec``).
FindSpec = Callable[[str], Any]
#: ``version_of(distribution) -> version text or None`` (:func:`installed_version`).
VersionOf = Callable[[str], "str | None"]

#: Installed with pip (with Slicer's packages pinned).
PIP = "pip"
#: Installed through Slicer's PyTorch extension (it picks the build for the computer's GPU).
PYTORCH = "pytorch"
#: Shipped with Slicer: never installed by a module (missing or too old: Slicer is too old).
SLICER = "slicer"
#: Comes with another Slicer extension (pyradiomics with SlicerRadiomics): never pip-installed.
EXTENSION = "extension"
_INSTALLERS = (PIP, PYTORCH, SLICER, EXTENSION)


@dataclass(frozen=True)
class Dependency:
    """A Python package a module's code imports.

    Attributes
    ----------
    module:
        Import name (found with ``importlib.util.find_spec``, without importing).
    requirement:
        pip requirement string with the version range the engine needs; the same range as in
        ``pyproject.toml`` (a test checks it).
    installer:
        :data:`PIP`, :data:`PYTORCH`, :data:`SLICER` or :data:`EXTENSION`.
    optional:
        Only speeds things up; never installed without being asked for.
    alternatives:
        Other distributions that provide ``module`` (``onnxruntime-gpu``; SlicerRadiomics'
        ``pyradiomics``), for the messages: the range is checked only on the requirement's
        own distribution (an alternative numbers its releases its own way).
    hint:
        What to do when an :data:`EXTENSION` or :data:`SLICER` package is missing.
    """

    module: str
    requirement: str
    installer: str = PIP
    optional: bool = False
    alternatives: tuple[str, ...] = ()
    hint: str = ""

    def __post_init__(self) -> None:
        if self.installer not in _INSTALLERS:
            raise ValueError(f"installer must be one of {_INSTALLERS}, not {self.installer!r}")

    @property
    def distribution(self) -> str:
        """The pip distribution name of :attr:`requirement` (``scikit-learn`` for sklearn)."""
        from packaging.requirements import Requirement

        return Requirement(self.requirement).name

    def accepts(self, version: str) -> bool:
        """Whether ``version`` is in the declared range (pre-releases included)."""
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion, Version

        try:
            return Requirement(self.requirement).specifier.contains(Version(version),
                                                                    prereleases=True)
        except InvalidVersion:
            return False


#: What the engine imports of Slicer 5.10's own packages: never installed by a module, only
#: checked (both modules' declarations start with these).
SLICER_PACKAGES: tuple[Dependency, ...] = (
    Dependency("numpy", "numpy>=1.24", installer=SLICER),
    Dependency("scipy", "scipy>=1.10", installer=SLICER),
    Dependency("SimpleITK", "SimpleITK>=2.2", installer=SLICER),
)
#: What reading Scanco ``.AIM``/``.ISQ`` files needs (the hidden Scanco reader module).
SCANCO_DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("py_aimio", "aimio-py>=0.4.1"),
)

#: Distributions Slicer 5.10 ships (SuperBuild requirement files), plus what other extensions
#: install for it (torch from the PyTorch extension, SlicerRadiomics' pyradiomics and its
#: dependencies). Those installed when pip runs are pinned at their installed versions.
SLICER_BUNDLED: tuple[str, ...] = (
    "numpy", "scipy", "SimpleITK", "pydicom", "pillow", "six", "retrying", "dicomweb-client",
    "requests", "urllib3", "certifi", "idna", "charset-normalizer", "packaging", "pyparsing",
    "chardet", "CouchDB", "GitPython", "gitdb", "smmap", "pip", "setuptools", "wheel",
    "vtk", "slicer-core", "torch", "pyradiomics", "pyradiomics-bhklab", "PyWavelets",
    "pykwalify",
)


# ------------------------------------------------------------------------------------------
# checking
# ------------------------------------------------------------------------------------------
def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (``importlib.metadata``), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _found(module: str, find_spec: FindSpec) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dependency_problem(dependency: Dependency, *,
                       find_spec: FindSpec = importlib.util.find_spec,
                       version_of: VersionOf = installed_version) -> str | None:
    """Why ``dependency`` is not usable (``"missing"``, ``"version 1.2 found"``), or None.

    A module found without any distribution metadata (built into the application) counts as
    present: there is no version to compare.
    """
    if not _found(dependency.module, find_spec):
        return "missing"
    version = version_of(dependency.distribution)
    if version is not None:
        return None if dependency.accepts(version) else f"version {version} found"
    # An alternative (SlicerRadiomics' pyradiomics) numbers its releases its own way, and a
    # module without metadata is built into the application: neither has a comparable version.
    return None


def missing_dependencies(dependencies: Iterable[Dependency], *,
                         include_optional: bool = False,
                         find_spec: FindSpec = importlib.util.find_spec,
                         version_of: VersionOf = installed_version) -> list[Dependency]:
    """The dependencies that are missing or outside their version range (nothing imported)."""
    return [d for d in dependencies
            if (include_optional or not d.optional)
            and dependency_problem(d, find_spec=find_spec, version_of=version_of) is not None]


def pip_requirements(dependencies: Iterable[Dependency]) -> list[str]:
    """pip requirement strings of the dependencies pip installs (not torch, not Slicer's)."""
    return [d.requirement for d in dependencies if d.installer == PIP]


def _describe(dependency: Dependency, find_spec: FindSpec, version_of: VersionOf) -> str:
    problem = dependency_problem(dependency, find_spec=find_spec, version_of=version_of)
    return (dependency.requirement if problem in (None, "missing")
            else f"{dependency.requirement} ({problem})")


def consent_message(missing: Sequence[Dependency], requester: str = "The HR-pQCT Segmenter",
                    *, find_spec: FindSpec = importlib.util.find_spec,
                    version_of: VersionOf = installed_version) -> str:
    """The question asked before installing ``missing`` (what, from where, how long)."""
    names = ", ".join(_describe(d, find_spec, version_of) for d in missing)
    slow = (" PyTorch comes through Slicer's PyTorch extension and can take several minutes."
            if any(d.installer == PYTORCH for d in missing) else "")
    return (f"{requester} needs these Python packages, which are missing or too old: {names}."
            "\n\nInstall them now? They are downloaded from the Python Package Index; "
            "Slicer's own packages (numpy, scipy, ...) are kept at their versions." + slow
            + " Slicer may ask to be restarted afterwards.")


def _not_installable(missing: Sequence[Dependency], find_spec: FindSpec,
                     version_of: VersionOf) -> str | None:
    """The message for dependencies no module may install (Slicer's own, other extensions')."""
    lines = []
    for dependency in missing:
        if dependency.installer in (SLICER, EXTENSION):
            problem = dependency_problem(dependency, find_spec=find_spec,
                                         version_of=version_of)
            hint = dependency.hint or ("It comes with Slicer: use Slicer 5.10 or newer."
                                       if dependency.installer == SLICER else "")
            lines.append(f"{dependency.requirement} is needed ({problem}). {hint}".strip())
    return "\n".join(lines) or None


# ------------------------------------------------------------------------------------------
# installing
# ------------------------------------------------------------------------------------------
def slicer_constraints(distributions: Iterable[str] = SLICER_BUNDLED, *,
                       exclude: Iterable[str] = (),
                       version_of: VersionOf = installed_version) -> list[str]:
    """``name==version`` of each of ``distributions`` installed now (pip constraints lines).

    ``exclude`` (names being installed on purpose) is left out: pinning a package that is
    being installed would only make pip fail.
    """
    from packaging.utils import canonicalize_name

    skipped = {canonicalize_name(name) for name in exclude}
    lines = []
    for name in distributions:
        version = version_of(name)
        if version is not None and canonicalize_name(name) not in skipped:
            lines.append(f"{name}=={version}")
    return lines


def pip_install_command(python: str, requirements: Sequence[str],
                        constraints_file: str | Path) -> list[str]:
    """``python -m pip install -c CONSTRAINTS REQUIREMENTS...``."""
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check",
            "-c", str(constraints_file), *requirements]


#: ``run(command) -> exit code`` (:func:`_run_pip`: output to the log, then the exit code).
RunCommand = Callable[[Sequence[str]], int]


def _run_pip(command: Sequence[str]) -> int:
    completed = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
        raise HRpQCTError("pip could not install the packages:\n" + "\n".join(detail))
    return completed.returncode


def pip_install(requirements: Sequence[str], *, python: str | None = None,
                run: RunCommand = _run_pip,
                version_of: VersionOf = installed_version) -> list[str]:
    """Install ``requirements`` with pip, Slicer's installed packages pinned.

    The function both modules call (through their Logic) and the Slicer-like CI run calls.

    Parameters
    ----------
    requirements:
        pip requirement strings.
    python:
        The interpreter whose packages are installed (default: Slicer's ``PythonSlicer``,
        else this interpreter; see :func:`~HRpQCTCore.background.process.python_executable`).
    run:
        Runs the pip command (tests pass a recorder).

    Returns
    -------
    list of str
        The constraints used (``name==version``).

    Raises
    ------
    HRpQCTError
        When pip fails (its last lines are in the message).
    """
    from packaging.requirements import Requirement

    from HRpQCTCore.background.process import python_executable

    requested = [Requirement(r).name for r in requirements]
    constraints = slicer_constraints(exclude=requested, version_of=version_of)
    with tempfile.TemporaryDirectory(prefix="hrpqct-pip-") as folder:
        constraints_file = Path(folder) / "slicer-constraints.txt"
        constraints_file.write_text("\n".join(constraints) + "\n", encoding="utf-8")
        run(pip_install_command(python or python_executable(), list(requirements),
                                constraints_file))
    return constraints


def ensure_dependencies(dependencies: Iterable[Dependency], *,
                        confirm: Callable[[str], bool],
                        install_torch: Callable[[], None],
                        pip_install: Callable[[list[str]], Any] = pip_install,
                        requester: str = "The HR-pQCT Segmenter",
                        find_spec: FindSpec = importlib.util.find_spec,
                        version_of: VersionOf = installed_version) -> bool:
    """Offer to install the missing or outdated dependencies; True when all are usable after.

    Nothing is installed without ``confirm(message)`` returning True (the module shows a
    dialog; scripts pass ``lambda message: True``). torch goes through ``install_torch``
    (Slicer's PyTorch extension picks the build for the GPU), the rest through
    ``pip_install(requirements)`` (default :func:`pip_install`, Slicer's packages pinned).

    Returns
    -------
    bool
        False when the user declined (nothing was installed).

    Raises
    ------
    HRpQCTError
        When a package no module may install is missing (what to do is in the message), or
        packages are still missing after installing.
    """
    dependencies = list(dependencies)
    checks = {"find_spec": find_spec, "version_of": version_of}
    missing = missing_dependencies(dependencies, **checks)
    if not missing:
        return True
    blocked = _not_installable(missing, find_spec, version_of)
    if blocked:
        raise HRpQCTError(blocked)
    if not confirm(consent_message(missing, requester, **checks)):
        return False
    if any(d.installer == PYTORCH for d in missing):
        install_torch()
    requirements = pip_requirements(missing)
    if requirements:
        pip_install(requirements)
    importlib.invalidate_caches()
    still = missing_dependencies(dependencies, **checks)
    if still:
        raise HRpQCTError(
            "Installing " + ", ".join(_describe(d, find_spec, version_of) for d in still)
            + " did not succeed. Restart Slicer and press Apply again; if it keeps failing, "
            "see the Python console for pip's message.")
    return True
