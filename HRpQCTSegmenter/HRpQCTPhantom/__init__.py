"""Synthetic HR-pQCT distal tibia + fibula scans with exact ground truth: the data engine.

The paper's data are private; training, tests, the demo and benchmarks use these phantoms.
They are synthetic: plausible anatomy, intensities and artefacts from public figures (see
``PhantomParams``), not a model of any population.
"""

from HRpQCTPhantom.generator import TISSUES, Phantom, generate_phantom
from HRpQCTPhantom.params import (
    BONE_HEALTH_LOADINGS,
    FIBULA_GAP_RANGE_MM,
    MOTION_GRADES,
    PhantomParams,
    params_from_bone_health,
)

__all__ = [
    "PhantomParams",
    "Phantom",
    "generate_phantom",
    "write_phantom",
    "generate_cohort",
    "params_from_bone_health",
    "BONE_HEALTH_LOADINGS",
    "MOTION_GRADES",
    "FIBULA_GAP_RANGE_MM",
    "TISSUES",
]


def __getattr__(name):  # lazy: writing pulls in SimpleITK, cohorts joblib
    if name == "write_phantom":
        from HRpQCTPhantom.writer import write_phantom

        return write_phantom
    if name == "generate_cohort":
        from HRpQCTPhantom.cohort import generate_cohort

        return generate_cohort
    raise AttributeError(name)
