"""Shared pytest configuration.

Fixtures shared between test modules live in ``_fixtures_<area>.py`` files beside this one
(e.g. ``_fixtures_slicer.py`` holds the headless MRML scene); they are loaded here as plugins.
"""

from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parents[1]

pytest_plugins = sorted(p.stem for p in TESTS_DIR.glob("_fixtures_*.py"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (where CMakeLists.txt and pyproject.toml are)."""
    return REPO_ROOT
