"""The Python packages the engine needs in Slicer, and the order of offering to install them.

Slicer bundles numpy, scipy and SimpleITK but not what the engine's network needs. The
module offers to install the rest when Apply is first pressed -- never at import time -- and
installs nothing without the user's consent (:func:`ensure_dependencies`, with the dialog and
the installers passed in, so the order is tested without Slicer).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from HRpQCTCore.errors import HRpQCTError

__all__ = [
    "Dependency",
    "ENGINE_DEPENDENCIES",
    "SCANCO_DEPENDENCIES",
    "missing_dependencies",
    "pip_requirements",
    "consent_message",
    "ensure_dependencies",
]

#: ``find_spec(module_name) -> spec or None`` (``importlib.util.find_spec``).
FindSpec = Callable[[str], Any]


@dataclass(frozen=True)
class Dependency:
    """A Python package the engine imports.

    Attributes
    ----------
    module:
        Import name (checked with ``importlib.util.find_spec``, without importing).
    requirement:
        pip requirement string.
    installer:
        ``"pytorch"`` (Slicer's PyTorch extension picks the build for the GPU) or ``"pip"``.
    optional:
        Only speeds things up; never installed without being asked for.
    """

    module: str
    requirement: str
    installer: str = "pip"
    optional: bool = False


#: What ``hrpqct segment`` imports besides Slicer's own packages (numpy, scipy, SimpleITK,
#: which Slicer bundles, are listed so plain-Python installs are checked too).
ENGINE_DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("torch", "torch>=2.1", installer="pytorch"),
    Dependency("transformers", "transformers>=4.40,<6"),
    Dependency("safetensors", "safetensors>=0.4"),
    Dependency("numpy", "numpy>=1.24"),
    Dependency("scipy", "scipy>=1.10"),
    Dependency("SimpleITK", "SimpleITK>=2.2"),
    Dependency("onnxruntime", "onnxruntime>=1.17", optional=True),
)
#: What reading Scanco ``.AIM``/``.ISQ`` files needs.
SCANCO_DEPENDENCIES: tuple[Dependency, ...] = (
    Dependency("py_aimio", "aimio-py"),
)


def missing_dependencies(dependencies: Iterable[Dependency] = ENGINE_DEPENDENCIES, *,
                         include_optional: bool = False,
                         find_spec: FindSpec = importlib.util.find_spec) -> list[Dependency]:
    """The dependencies that cannot be imported (found without importing them)."""
    missing = []
    for dependency in dependencies:
        if dependency.optional and not include_optional:
            continue
        try:
            found = find_spec(dependency.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dependency)
    return missing


def pip_requirements(dependencies: Iterable[Dependency]) -> list[str]:
    """pip requirement strings of the dependencies pip installs (not torch)."""
    return [d.requirement for d in dependencies if d.installer == "pip"]


def consent_message(missing: Sequence[Dependency], requester: str = "The HR-pQCT Segmenter"
                    ) -> str:
    """The question asked before installing ``missing`` (what, from where, how long)."""
    names = ", ".join(d.requirement for d in missing)
    slow = (" PyTorch comes through Slicer's PyTorch extension and can take several minutes."
            if any(d.installer == "pytorch" for d in missing) else "")
    return (f"{requester} needs these Python packages, which are not installed: {names}.\n\n"
            "Install them now? They are downloaded from the Python Package Index." + slow
            + " Slicer may ask to be restarted afterwards.")


def ensure_dependencies(dependencies: Iterable[Dependency], *,
                        confirm: Callable[[str], bool],
                        install_torch: Callable[[], None],
                        pip_install: Callable[[list[str]], None],
                        requester: str = "The HR-pQCT Segmenter",
                        find_spec: FindSpec = importlib.util.find_spec) -> bool:
    """Offer to install the missing dependencies; True when all are present afterwards.

    Nothing is installed without ``confirm(message)`` returning True (the module shows a
    dialog; scripts pass ``lambda message: True``). torch goes through ``install_torch``
    (Slicer's PyTorch extension picks the build for the GPU), the rest through
    ``pip_install(requirements)``.

    Returns
    -------
    bool
        False when the user declined (nothing was installed).

    Raises
    ------
    HRpQCTError
        When packages are still missing after installing.
    """
    dependencies = list(dependencies)
    missing = missing_dependencies(dependencies, find_spec=find_spec)
    if not missing:
        return True
    if not confirm(consent_message(missing, requester)):
        return False
    if any(d.installer == "pytorch" for d in missing):
        install_torch()
    requirements = pip_requirements(missing)
    if requirements:
        pip_install(requirements)
    importlib.invalidate_caches()
    still = missing_dependencies(dependencies, find_spec=find_spec)
    if still:
        raise HRpQCTError(
            "Installing " + ", ".join(d.requirement for d in still) + " did not succeed. "
            "Restart Slicer and press Apply again; if it keeps failing, see the Python "
            "console for pip's message.")
    return True
