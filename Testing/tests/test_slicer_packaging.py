"""The Slicer extension's CMake files install every file the modules need, and nothing clashes.

Slicer installs a scripted module only from the files its CMakeLists.txt lists
(``slicerMacroBuildScriptedModule(SCRIPTS ... RESOURCES ...)``). A new engine file that is not
listed works in a source checkout and is missing for every user of the built extension, so
these tests compare the lists with the files on disk.
"""

import re
from pathlib import Path

import pytest

#: module folder -> the Python packages it installs next to its module file (see
#: docs/architecture.md for what each is).
MODULES = {
    "HRpQCTSegmenter": ("HRpQCTCore", "HRpQCTPhantom", "HRpQCTSegmentationEngine",
                        "HRpQCTPipeline", "HRpQCTSegmenterLib"),
    "HRpQCTRadiomics": ("HRpQCTRadiomicsEngine", "HRpQCTRadiomicsLib"),
}


def _cmake_list(text: str, variable: str, module: str) -> list[str]:
    """Entries of ``set(<variable> ...)`` with ``${MODULE_NAME}`` expanded, comments removed."""
    match = re.search(rf"set\(\s*{variable}\b(.*?)\)", text, flags=re.S)
    if match is None:
        return []
    body = re.sub(r"#[^\n]*", "", match.group(1))
    return [entry.replace("${MODULE_NAME}", module) for entry in body.split()]


def _listed(repo_root: Path, module: str) -> tuple[list[str], list[str]]:
    text = (repo_root / module / "CMakeLists.txt").read_text(encoding="utf-8")
    return (_cmake_list(text, "MODULE_PYTHON_SCRIPTS", module),
            _cmake_list(text, "MODULE_PYTHON_RESOURCES", module))


def _expected(repo_root: Path, module: str, packages: tuple[str, ...]
              ) -> tuple[set[str], set[str]]:
    module_dir = repo_root / module

    def visible(path: Path) -> bool:
        return path.is_file() and "__pycache__" not in path.parts and not any(
            part.startswith(".") for part in path.relative_to(module_dir).parts)

    # Every top-level .py file is a scripted module of its own (e.g. a hidden file-reader module).
    scripts = {f"{module}.py"} | {p.name for p in module_dir.glob("*.py") if visible(p)} | {
        p.relative_to(module_dir).as_posix() for package in packages
        for p in (module_dir / package).rglob("*.py")
        if visible(p) and "resources" not in p.relative_to(module_dir).parts}
    bases = [module_dir / package / "resources" for package in packages]
    resources = {
        p.relative_to(module_dir).as_posix()
        for base in [*bases, module_dir / "Resources"]
        if base.is_dir() for p in base.rglob("*") if visible(p)}
    return scripts, resources


@pytest.mark.parametrize(("module", "packages"), MODULES.items())
def test_module_cmake_lists_every_file(repo_root, module, packages):
    scripts, resources = _listed(repo_root, module)
    wanted_scripts, wanted_resources = _expected(repo_root, module, packages)
    cmake_file = f"{module}/CMakeLists.txt"
    problems = []
    for missing in sorted(wanted_scripts - set(scripts)):
        problems.append(f"add to MODULE_PYTHON_SCRIPTS in {cmake_file}: {missing}")
    for missing in sorted(wanted_resources - set(resources)):
        problems.append(f"add to MODULE_PYTHON_RESOURCES in {cmake_file}: {missing}")
    for entry in [*scripts, *resources]:
        if not (repo_root / module / entry).is_file():
            problems.append(f"{cmake_file} lists {entry}, which does not exist")
    for entry in scripts:
        if not entry.endswith(".py"):
            problems.append(f"{cmake_file}: {entry} is in SCRIPTS but is not a Python file")
    for entry in resources:
        if entry.endswith(".py"):
            problems.append(f"{cmake_file}: {entry} is a Python file listed as a RESOURCE")
    for entries, name in ((scripts, "SCRIPTS"), (resources, "RESOURCES")):
        duplicates = sorted({e for e in entries if entries.count(e) > 1})
        if duplicates:
            problems.append(f"{cmake_file}: listed twice in {name}: {duplicates}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", MODULES)
def test_module_cmake_builds_a_scripted_module_with_tests(repo_root, module):
    text = (repo_root / module / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(rf"set\(\s*MODULE_NAME\s+{module}\s*\)", text)
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, flags=re.S)
    assert call, f"{module}/CMakeLists.txt does not call slicerMacroBuildScriptedModule"
    arguments = call.group(1).split()
    for expected in ("NAME", "${MODULE_NAME}", "SCRIPTS", "${MODULE_PYTHON_SCRIPTS}",
                     "RESOURCES", "${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"):
        assert expected in arguments, f"{module}/CMakeLists.txt: {expected} missing"
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_installed_paths_do_not_collide_between_modules(repo_root):
    # Both modules install into one scripted-modules folder: equal relative paths overwrite
    # each other, and Slicer finds module resources by file name.
    owner: dict[str, str] = {}
    resource_names: dict[str, str] = {}
    problems = []
    for module in MODULES:
        scripts, resources = _listed(repo_root, module)
        for entry in [*scripts, *resources]:
            if entry in owner and owner[entry] != module:
                problems.append(f"{entry} is installed by both {owner[entry]} and {module}")
            owner[entry] = module
        for entry in resources:
            name = Path(entry).name
            if name in resource_names and resource_names[name] != module:
                problems.append(f"resource name {name} is used by {resource_names[name]} "
                                f"and {module}")
            resource_names[name] = module
    packages = [package for owned in MODULES.values() for package in owned]
    assert len(set(packages)) == len(packages), "a package name is used by both modules"
    on_disk = {p.parent.name for module in MODULES
               for p in (repo_root / module).glob("*/__init__.py")}
    assert on_disk == set(packages), "MODULES must list every package of the module folders"
    assert not problems, "\n".join(problems)


def test_extension_cmake_has_the_index_metadata(repo_root):
    text = (repo_root / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^cmake_minimum_required\(", text, flags=re.M)
    assert re.search(r"^project\(HRpQCT\)", text, flags=re.M)
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                     "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                     "EXTENSION_DEPENDS"):
        match = re.search(rf'set\({variable} "([^"]+)"\)', text)
        assert match, f"{variable} is not set to a non-empty string"
    values = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', text))
    # What the Extensions Index expects: a category from its list, contributors as
    # "Name (Affiliation)", the Slicer version users need and the research-use caveat.
    assert values["EXTENSION_CATEGORY"] in {"Segmentation", "Quantification"}
    assert re.fullmatch(r"[^,()]+ \([^()]+\)(, [^,()]+ \([^()]+\))*",
                        values["EXTENSION_CONTRIBUTORS"])
    assert "5.10 or newer" in values["EXTENSION_DESCRIPTION"]
    assert "not for clinical use" in values["EXTENSION_DESCRIPTION"]
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text).group(1).split()
    # the bundled model runs with ONNX Runtime: PyTorch (GPU) is optional, so not required
    assert depends == ["SlicerRadiomics"]
    order = [line.strip() for line in text.splitlines() if line.strip() and
             not line.strip().startswith("#")]
    expected_sequence = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                         *(f"add_subdirectory({m})" for m in MODULES),
                         "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                         "include(${Slicer_EXTENSION_CPACK})"]
    positions = [order.index(line) for line in expected_sequence]
    assert positions == sorted(positions), "extension CMake commands out of order"
    assert (repo_root / "LICENSE").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_module_icon_is_a_128_pixel_png(repo_root, module):
    icon = repo_root / module / "Resources" / "Icons" / f"{module}.png"
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)
