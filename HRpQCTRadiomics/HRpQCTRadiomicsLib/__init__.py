"""Qt-free logic of the HR-pQCT Radiomics Slicer module, tested headless with ``slicer-core``."""
