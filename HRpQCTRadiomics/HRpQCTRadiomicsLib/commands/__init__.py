"""Subcommands of ``hrpqct`` from the radiomics engine (discovered by ``HRpQCTSegmenterLib.cli``).

* :mod:`.radiomics` -- ``hrpqct radiomics``: per-region features to CSV.
* :mod:`.classifier` -- ``hrpqct train-classifier`` and ``hrpqct classify``.
"""
