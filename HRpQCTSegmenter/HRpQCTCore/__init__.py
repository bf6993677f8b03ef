"""The core every other HR-pQCT package builds on (Qt-free; importable without Slicer).

Errors and exit codes, progress and cancellation, atomic writes, checksummed artefacts, the
region model and its terminology, the scan object, all file I/O, the shared command-line
options, the bridge to Slicer's data model and the background-run machinery. It imports no
other package of this project: see ``docs/architecture.md`` for the layers.

Heavy dependencies (SimpleITK, aimio-py, slicer-core) are imported inside the functions that
need them, so importing the core is cheap and works in Slicer before the user has agreed to
install anything.
"""

__version__ = "0.1.0"
