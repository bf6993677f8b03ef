"""What the HR-pQCT Radiomics module needs installed: the one declaration of its packages.

The module runs ``hrpqct radiomics`` (features and, with a classifier, probabilities) in
Slicer's Python; this lists what that command and the module's own code import besides what
Slicer ships. pyradiomics is not pip-installed into Slicer (it does not build there easily):
it comes with the SlicerRadiomics extension, which brings PyWavelets with it.

Not listed, because neither the module nor its command imports them: scikit-image (only the
morphometrics of ``hrpqct run`` reports) and tqdm (only the command line's progress bar).
The Slicer-like CI run installs only what this declares, then runs the module's flow: a
package the code imports but this list forgets fails there.
"""

from __future__ import annotations

from HRpQCTCore.background.dependencies import EXTENSION, SLICER_PACKAGES, Dependency

__all__ = ["PYRADIOMICS", "RADIOMICS_DEPENDENCIES"]

#: pyradiomics, from the SlicerRadiomics extension (or the maintained fork from pip outside
#: Slicer); only its presence is checked for SlicerRadiomics' own build.
PYRADIOMICS = Dependency(
    "radiomics", "pyradiomics-bhklab>=3.1.4", installer=EXTENSION, alternatives=("pyradiomics",),
    hint="Install the SlicerRadiomics extension (View > Extensions Manager), restart Slicer "
         "and press Apply again.")

#: Everything the module needs, in the order it is offered.
RADIOMICS_DEPENDENCIES: tuple[Dependency, ...] = (
    *SLICER_PACKAGES,
    PYRADIOMICS,
    Dependency("yaml", "pyyaml>=6"),  # the radiomics settings presets
    Dependency("threadpoolctl", "threadpoolctl>=3"),  # one BLAS thread per worker
    Dependency("joblib", "joblib>=1.3"),  # the extraction's worker processes
    Dependency("sklearn", "scikit-learn>=1.3"),  # the classifiers
    Dependency("skops", "skops>=0.10"),  # safe loading of non-linear classifiers
)
