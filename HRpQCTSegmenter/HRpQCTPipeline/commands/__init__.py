"""Subcommands of ``hrpqct``: one module per command group, each with ``register(subparsers)``.

See :mod:`HRpQCTPipeline.cli` for how they are discovered.
"""
