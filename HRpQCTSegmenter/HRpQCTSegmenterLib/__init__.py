"""HR-pQCT segmentation engine (Qt-free; importable without Slicer).

Where things live:

* :mod:`.regions` -- label values, names, colours and terminology of the network classes
  and the seven output regions (the single source of truth).
* :mod:`.scan` -- the in-memory scan (HU array, geometry, calibration) and unit conversions.
* :mod:`.io` -- reading scans (Scanco AIM/ISQ, NIfTI, NRRD, MetaImage, DICOM) and writing
  scans and label maps (NIfTI, NRRD, Slicer ``.seg.nrrd``).
* :mod:`.phantom` -- synthetic HR-pQCT scans and cohorts with ground truth.
* :mod:`.errors`, :mod:`.progress` -- user-facing errors, progress reporting and cancellation.
* :mod:`.cli` -- the ``hrpqct`` command; each subcommand lives in :mod:`.commands`.

Heavy dependencies (torch, transformers, SimpleITK, pyradiomics) are imported lazily inside the
functions that need them, so importing this package is cheap and works in Slicer before the
user has agreed to install them.
"""

__version__ = "0.1.0"
