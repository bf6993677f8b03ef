"""The segmentation engine: five network classes per voxel from a scan, then seven regions.

Preprocessing with its exact inverse, SegFormer (and a U-Net baseline) as configs-as-data,
inference in ONNX Runtime (the bundled model ships its graph, so no torch is needed) or
torch, training and fine-tuning, metrics, post-processing (:mod:`.postprocess`), and the
checks that say when not to trust a result (plausibility, uncertainty). It uses only
:mod:`HRpQCTCore`; torch and transformers are imported inside the functions that need them.
"""
