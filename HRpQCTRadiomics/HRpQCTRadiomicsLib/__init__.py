"""HR-pQCT radiomics and osteoporosis classification engine (Qt-free).

Per-region radiomic features (pyradiomics), the paper's three-stage feature selection and the
classifiers. The region model comes from :mod:`HRpQCTSegmenterLib.regions`.
"""

__version__ = "0.1.0"
