"""The ONNX graph cache of the segmentation engine goes to a temporary folder in tests.

Segmenting with a model folder that has no ONNX graph exports one and caches it (see
``HRpQCTSegmentationEngine.onnx_graph``); tests must not write into the user's cache.
"""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_onnx_cache(tmp_path_factory):
    """``HRPQCT_CACHE_DIR`` set to a session temporary folder for every test."""
    import os

    from HRpQCTSegmentationEngine.onnx_graph import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("hrpqct-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous
