"""Qt-free logic of the HR-pQCT Segmenter Slicer module: its parameters, the background
segmentation run and loading its result into the scene, and the sample scan. Tested headless
with ``slicer-core``; the module file ``HRpQCTSegmenter.py`` adds only the Qt widgets.
"""
