"""HR-pQCT radiomics and osteoporosis classification engine (Qt-free).

Per-region radiomic features with pyradiomics' values, the paper's three-stage feature
selection, classifiers and their safe (no-pickle) files. It uses only :mod:`HRpQCTCore`;
pyradiomics and scikit-learn are imported on first use, so importing the package is cheap.
The names below are loaded lazily from their modules.
"""

__version__ = "0.1.0"

_LAZY = {
    "extract_features": "extraction",
    "extract_slice_features": "extraction",
    "FeatureTable": "extraction",
    "load_settings": "settings",
    "PRESETS": "settings",
    "write_feature_csv": "table",
    "read_feature_csv": "table",
    "PaperFeatureSelector": "selection",
    "train_classifier": "classification",
    "assemble_dataset": "classification",
    "save_classifier": "model_io",
    "load_classifier": "model_io",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(name)
