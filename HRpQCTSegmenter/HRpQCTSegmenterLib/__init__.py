"""Qt-free logic of the HR-pQCT Segmenter Slicer module, tested headless with ``slicer-core``."""
