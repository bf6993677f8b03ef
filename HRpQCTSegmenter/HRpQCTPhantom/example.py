"""The bundled example scan: a phantom defined by fixed parameters and a seed.

The generator is bundled, so the example is made on the user's machine instead of shipping
hundreds of MB of voxels. ``hrpqct demo`` makes it whole; Slicer's sample data makes a shorter
stack of it and checks its checksum, so both must take the definition from here.
"""

from __future__ import annotations

from HRpQCTPhantom.params import PhantomParams

__all__ = ["EXAMPLE_SEED", "EXAMPLE_SLICES", "example_params"]

#: Seed of the bundled example scan.
EXAMPLE_SEED = 20260311
#: Number of slices of the example (a full HR-pQCT stack).
EXAMPLE_SLICES = 168


def example_params(n_slices: int = EXAMPLE_SLICES) -> PhantomParams:
    """Parameters of the bundled example: a right leg with normal bone, moderate noise."""
    return PhantomParams(n_slices=n_slices, side="right", noise_sd_hu=150.0, motion_grade=2,
                         rotation_deg=8.0, translation_mm=(1.5, -1.0))
