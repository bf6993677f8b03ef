"""Five-class segmentation with SegFormer: preprocessing, model files, inference, metrics.

* :mod:`.preprocessing` -- the paper's crop / clip / scale / resize (all constants in
  :class:`~.preprocessing.PreprocessingConfig`) and the exact inverse for the logits.
* :mod:`.model` -- MiT-B0..B5 variants as data, building, saving (safetensors + SHA256) and
  loading models, and starting from an RGB checkpoint.
* :mod:`.inference` -- :func:`~.inference.segment_volume`: a whole scan, batch by batch.
* :mod:`.fast` -- exact faster CPU inference (folded decoder, ONNX Runtime).
* :mod:`.metrics` -- IoU and F1 per class, mean ± SD over scans, tables.

Submodules import torch and transformers lazily; importing this package is cheap.
"""
