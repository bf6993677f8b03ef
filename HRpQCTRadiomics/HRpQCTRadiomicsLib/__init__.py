"""Qt-free logic of the HR-pQCT Radiomics Slicer module: segments to region maps, the feature
run, table nodes and the probability. Tested headless with ``slicer-core``; the module file
``HRpQCTRadiomics.py`` adds only the Qt widgets.
"""
