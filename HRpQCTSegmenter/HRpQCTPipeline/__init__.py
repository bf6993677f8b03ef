"""Whole-scan orchestration on top of the engines: ``hrpqct run`` / ``batch``, QC checks and
reports, the demo, and the ``hrpqct`` command line (one module per subcommand in
:mod:`.commands`). Layer 2 of ``docs/architecture.md``: it may use the core and the engines,
and nothing imports it but the Slicer modules' background processes (by command line).
"""
