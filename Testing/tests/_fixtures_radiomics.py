"""Shared fixtures for the radiomics tests: a small crop of a coarse phantom."""

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass
class SmallScan:
    hu: np.ndarray  # float32 [z, y, x]
    regions: np.ndarray  # uint8 7-region labels
    spacing_mm: tuple[float, float, float]


@pytest.fixture(scope="session")
def radiomics_scan() -> SmallScan:
    """3 slices of 70 x 80 pixels (0.24 mm) around the fibula: several regions, fast."""
    from HRpQCTPhantom import PhantomParams, generate_phantom

    phantom = generate_phantom(PhantomParams(n_slices=3, field_px=400, voxel_mm=0.0607 * 4),
                               seed=1)
    window = (slice(None), slice(190, 260), slice(100, 180))
    return SmallScan(np.ascontiguousarray(phantom.scan.hu[window], dtype=np.float32),
                     np.ascontiguousarray(phantom.regions[window]),
                     tuple(phantom.scan.spacing_mm))


def direct_pyradiomics(params: dict, hu2d_or_3d: np.ndarray, labels: np.ndarray,
                       spacing_xyz: tuple[float, ...], label: int) -> dict[str, float]:
    """pyradiomics' own extraction for one region (one BLAS thread, like the engine)."""
    import copy
    import logging

    import SimpleITK as sitk
    from radiomics import featureextractor
    from threadpoolctl import threadpool_limits

    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
    image = sitk.GetImageFromArray(hu2d_or_3d)
    image.SetSpacing(spacing_xyz)
    mask = sitk.GetImageFromArray(labels.astype(np.uint32))
    mask.CopyInformation(image)
    with threadpool_limits(limits=1):
        result = extractor.execute(image, mask, label=label)
    return {k: float(v) for k, v in result.items() if not k.startswith("diagnostics")}
