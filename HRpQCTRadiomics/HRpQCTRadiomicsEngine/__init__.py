"""HR-pQCT radiomics and osteoporosis classification engine (Qt-free).

Per-region radiomic features (pyradiomics), the paper's three-stage feature selection and the
classifiers. The region model comes from :mod:`HRpQCTCore.regions`.

Public API (modules are imported lazily; pyradiomics and scikit-learn load on first use):

* :func:`.extraction.extract_features` -- arrays (HU, 7-region labels, spacing) -> FeatureTable,
  per slice or per scan, with a prediction mode (``features=``) and parallel workers.
* :func:`.settings.load_settings` -- the YAML presets ``paper`` (939) and ``complete`` (1311).
* :func:`.table.write_feature_csv` / :func:`.table.read_feature_csv` -- the CSV schema.
* :class:`.selection.PaperFeatureSelector` -- variance -> correlation -> LASSO.
* :mod:`.classification` -- datasets, subject-grouped CV, metrics, :func:`train_classifier`.
* :func:`.model_io.save_classifier` / :func:`.model_io.load_classifier` -- no-pickle format.
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
