"""The pictures the Extensions Index and the README show exist in the repository.

The Extensions Index reads the icon and screenshots from the URLs in the top-level
``CMakeLists.txt`` (``EXTENSION_ICONURL``, ``EXTENSION_SCREENSHOTURLS``); URLs into this
repository's main branch must name files that are committed. The README's images must exist
too. The screenshots are made by ``docs/make_pictures.py`` and kept small.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Raw files of this repository's main branch, as the Extensions Index fetches them.
RAW_PREFIX = "https://raw.githubusercontent.com/hrpqct/SlicerHRpQCT/main/"
PICTURE_VARIABLES = ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS")
SCREENSHOTS = REPO / "Resources" / "Screenshots"
MAX_PICTURE_BYTES = 1_000_000


def _cmake_variable(text: str, name: str) -> str:
    """The value of ``set(NAME "value")`` (or unquoted values) in a CMakeLists.txt."""
    match = re.search(rf'^\s*set\(\s*{name}\s+(?:"([^"]*)"|([^)]*))\s*\)', text,
                      re.MULTILINE | re.IGNORECASE)
    if match is None:
        raise AssertionError(f"{name} is not set in CMakeLists.txt")
    return (match.group(1) if match.group(1) is not None else match.group(2)).strip()


def _cmake_picture_urls() -> list[tuple[str, str]]:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = []
    for name in PICTURE_VARIABLES:
        value = _cmake_variable(text, name)
        found = value.split()
        assert found, f"{name} in CMakeLists.txt is empty"
        urls.extend((name, url) for url in found)
    return urls


def _readme_images() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"<img\s[^>]*src=[\"']([^\"']+)[\"']", text, re.IGNORECASE)
    return targets


def test_cmake_picture_urls_name_files_in_the_repository():
    missing = []
    for name, url in _cmake_picture_urls():
        if not url.startswith(RAW_PREFIX):
            continue  # a picture hosted elsewhere cannot be checked here
        path = url[len(RAW_PREFIX):].split("?")[0].split("#")[0]
        if not (REPO / path).is_file():
            missing.append(f"{name}: {url} -> {path}")
    assert not missing, "CMakeLists.txt points at files that are not in the repository:\n" + \
        "\n".join(missing)


def test_cmake_picture_urls_point_into_this_repository():
    """The index shows what is committed on main, so the URLs must be raw files of main."""
    others = [f"{name}: {url}" for name, url in _cmake_picture_urls()
              if not url.startswith(RAW_PREFIX)]
    assert not others, f"URLs not under {RAW_PREFIX}:\n" + "\n".join(others)


def test_readme_images_exist():
    missing = []
    for target in _readme_images():
        if target.startswith(RAW_PREFIX):
            target = target[len(RAW_PREFIX):]
        elif re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # badges and other pictures hosted elsewhere
        path = target.split("?")[0].split("#")[0]
        if not (REPO / path).is_file():
            missing.append(target)
    assert not missing, "README.md shows images that are not in the repository: " + \
        ", ".join(missing)


@pytest.mark.parametrize("picture", sorted(SCREENSHOTS.glob("*.png")) or [None],
                         ids=lambda p: p.name if p else "none")
def test_screenshots_are_small(picture):
    if picture is None:
        pytest.fail(f"no screenshots in {SCREENSHOTS}: run python docs/make_pictures.py")
    assert picture.stat().st_size < MAX_PICTURE_BYTES, (
        f"{picture.name} is {picture.stat().st_size} bytes; keep pictures under 1 MB")
