"""What the two modules install in Slicer, and how: consent, versions, Slicer's packages kept.

* each module declares what its code (and its background command) imports; the Slicer-like
  CI run (``.ci/slicer-like``) proves the declarations complete by installing only them;
* installed versions are checked against the ranges, which equal ``pyproject.toml``'s;
* nothing is installed without consent, Slicer's own packages and pyradiomics never;
* pip runs with a constraints file pinning Slicer's installed packages;
* the Segmenter installs ONNX Runtime, not PyTorch, for the bundled model on the CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from HRpQCTCore.background import dependencies as deps
from HRpQCTCore.background.dependencies import (
    PIP,
    SCANCO_DEPENDENCIES,
    Dependency,
    consent_message,
    ensure_dependencies,
    missing_dependencies,
    pip_install,
    pip_requirements,
    slicer_constraints,
)
from HRpQCTCore.errors import HRpQCTError
from HRpQCTRadiomicsLib.dependencies import RADIOMICS_DEPENDENCIES
from HRpQCTSegmenterLib import dependencies as segmenter
from HRpQCTSegmenterLib.parameters import SegmenterParameters


class FakePython:
    """Installed modules and versions of a pretend Slicer, changed by the fake installers."""

    def __init__(self, versions: dict[str, str], modules: dict[str, str]) -> None:
        self.versions = dict(versions)  # distribution -> version
        self.modules = dict(modules)  # import name -> distribution
        self.calls: list = []

    def find_spec(self, name):
        return object() if name in self.modules else None

    def version_of(self, distribution):
        return self.versions.get(distribution)

    def checks(self) -> dict:
        return {"find_spec": self.find_spec, "version_of": self.version_of}

    def pip_install(self, requirements):
        self.calls.append(list(requirements))
        for requirement in requirements:
            name = re.split(r"[<>=!~,\s]", requirement)[0]
            module = {"scikit-learn": "sklearn", "pyyaml": "yaml"}.get(name, name)
            self.modules[module] = name
            self.versions[name] = "99.0"

    def install_torch(self):
        self.calls.append("torch")
        self.modules["torch"] = "torch"
        self.versions["torch"] = "2.5.0"


SLICER_5_10 = {"numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.4.1",
               "pyradiomics": "3.1.1.dev0", "packaging": "25.0", "requests": "2.32.3"}
SLICER_MODULES = {"numpy": "numpy", "scipy": "scipy", "SimpleITK": "SimpleITK",
                  "radiomics": "pyradiomics", "packaging": "packaging"}


def _slicer() -> FakePython:
    return FakePython(SLICER_5_10, SLICER_MODULES)


# ------------------------------------------------------------------------------------------
# checking and consent
# ------------------------------------------------------------------------------------------
def test_nothing_is_installed_without_consent_then_exactly_what_is_missing():
    python = _slicer()
    questions = []
    assert ensure_dependencies(RADIOMICS_DEPENDENCIES, confirm=lambda m: questions.append(m)
                               or False, install_torch=python.install_torch,
                               pip_install=python.pip_install, **python.checks()) is False
    assert python.calls == []
    assert "scikit-learn>=1.3" in questions[0] and "kept at their versions" in questions[0]
    assert ensure_dependencies(RADIOMICS_DEPENDENCIES, confirm=lambda m: True,
                               install_torch=python.install_torch,
                               pip_install=python.pip_install, **python.checks())
    assert python.calls == [["pyyaml>=6", "threadpoolctl>=3", "joblib>=1.3",
                             "scikit-learn>=1.3", "skops>=0.10"]]
    # all present now: no question at all
    assert ensure_dependencies(RADIOMICS_DEPENDENCIES, confirm=lambda m: pytest.fail("asked"),
                               install_torch=python.install_torch,
                               pip_install=python.pip_install, **python.checks())


def test_an_outdated_package_is_offered_for_upgrade():
    """Presence is not enough: an old scikit-learn (from another extension) fails the range."""
    python = _slicer()
    for name, version in {"pyyaml": "6.0.2", "threadpoolctl": "3.5.0", "joblib": "1.4.2",
                          "scikit-learn": "1.0.2", "skops": "0.10.0"}.items():
        python.versions[name] = version
        python.modules[{"scikit-learn": "sklearn", "pyyaml": "yaml"}.get(name, name)] = name
    missing = missing_dependencies(RADIOMICS_DEPENDENCIES, **python.checks())
    assert [d.distribution for d in missing] == ["scikit-learn"]
    message = consent_message(missing, "HR-pQCT Radiomics", **python.checks())
    assert "scikit-learn>=1.3 (version 1.0.2 found)" in message
    assert ensure_dependencies(RADIOMICS_DEPENDENCIES, confirm=lambda m: True,
                               install_torch=python.install_torch,
                               pip_install=python.pip_install, **python.checks())
    assert python.calls == [["scikit-learn>=1.3"]]


def test_slicers_packages_and_pyradiomics_are_never_installed():
    python = _slicer()
    del python.modules["radiomics"]
    with pytest.raises(HRpQCTError, match="SlicerRadiomics extension"):
        ensure_dependencies(RADIOMICS_DEPENDENCIES, confirm=lambda m: pytest.fail("asked"),
                            install_torch=python.install_torch,
                            pip_install=python.pip_install, **python.checks())
    python = _slicer()
    python.versions["numpy"] = "1.19.5"  # an old Slicer
    with pytest.raises(HRpQCTError, match=r"numpy>=1.24 is needed \(version 1.19.5 found\)"
                                          r".*Slicer 5.10 or newer"):
        ensure_dependencies(RADIOMICS_DEPENDENCIES, confirm=lambda m: True,
                            install_torch=python.install_torch,
                            pip_install=python.pip_install, **python.checks())
    assert python.calls == []
    # SlicerRadiomics' own pyradiomics numbers its releases its own way: presence counts
    assert missing_dependencies([RADIOMICS_DEPENDENCIES[3]], **_slicer().checks()) == []


def test_an_install_that_does_not_take_says_so():
    python = _slicer()
    with pytest.raises(HRpQCTError, match="did not succeed"):
        ensure_dependencies([Dependency("surely_not_installed_pkg_x", "x>=1")],
                            confirm=lambda m: True, install_torch=python.install_torch,
                            pip_install=lambda r: None, **python.checks())


def test_the_real_checks_import_nothing():
    present = missing_dependencies([Dependency("numpy", "numpy>=1.24"),
                                    Dependency("surely_not_installed_pkg_x", "x")])
    assert [d.module for d in present] == ["surely_not_installed_pkg_x"]
    assert pip_requirements(SCANCO_DEPENDENCIES) == ["aimio-py>=0.4.1"]
    with pytest.raises(ValueError, match="installer"):
        Dependency("x", "x", installer="conda")


# ------------------------------------------------------------------------------------------
# the declarations equal pyproject.toml's ranges
# ------------------------------------------------------------------------------------------
def _pyproject_requirements(repo_root: Path) -> dict[str, str]:
    """Canonical name -> specifier of every dependency and extra in pyproject.toml."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (repo_root / "pyproject.toml").read_text(encoding="utf-8")
    # [project] dependencies through [project.optional-dependencies] (no tomllib on 3.10)
    text = text[text.index("\ndependencies = ["):text.index("[project.scripts]")]
    found = {}
    for quoted in re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?\s*[<>=!~][^"]*)"', text):
        requirement = Requirement(quoted)
        found[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return found


def test_every_declared_range_is_pyprojects(repo_root):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pyproject = _pyproject_requirements(repo_root)
    assert pyproject["numpy"] == ">=1.24" and pyproject["onnxruntime"] == ">=1.17"
    declared = (*segmenter.SEGMENTER_DEPENDENCIES, *RADIOMICS_DEPENDENCIES,
                *SCANCO_DEPENDENCIES)
    for dependency in declared:
        requirement = Requirement(dependency.requirement)
        name = canonicalize_name(requirement.name)
        assert name in pyproject, f"{dependency.requirement} is not in pyproject.toml"
        assert str(requirement.specifier) == pyproject[name], dependency.requirement


# ------------------------------------------------------------------------------------------
# installing with Slicer's packages pinned
# ------------------------------------------------------------------------------------------
def test_constraints_pin_every_installed_slicer_package():
    versions = {**SLICER_5_10, "pillow": "11.2.1", "urllib3": "2.4.0"}
    lines = slicer_constraints(version_of=versions.get)
    assert {"numpy==2.0.2", "scipy==1.13.1", "SimpleITK==2.4.1", "pillow==11.2.1",
            "urllib3==2.4.0", "requests==2.32.3", "packaging==25.0"} <= set(lines)
    assert not any(line.startswith("pydicom") for line in lines)  # not installed: no pin
    assert "numpy==2.0.2" not in slicer_constraints(exclude=["NumPy"],
                                                    version_of=versions.get)


def test_pip_runs_with_the_constraints_file():
    """Unconstrained, scikit-image's tifffile pulls a newer numpy over Slicer's: the command
    carries ``-c`` with Slicer's installed versions (the Slicer-like run shows pip obeying)."""
    seen = {}

    def run(command):
        seen["command"] = list(command)
        seen["constraints"] = Path(command[command.index("-c") + 1]).read_text().split()
        return 0

    versions = {"numpy": "2.0.2", "scipy": "1.13.1", "scikit-learn": "1.0"}
    used = pip_install(["scikit-learn>=1.3", "skops>=0.10"], python="PythonSlicer", run=run,
                       version_of=versions.get)
    command = seen["command"]
    assert command[:4] == ["PythonSlicer", "-m", "pip", "install"]
    assert command[-2:] == ["scikit-learn>=1.3", "skops>=0.10"]
    assert seen["constraints"] == used == ["numpy==2.0.2", "scipy==1.13.1"]
    assert not Path(command[command.index("-c") + 1]).exists()  # removed afterwards


def test_a_failing_pip_shows_its_last_lines(monkeypatch):
    class Completed:
        returncode, stdout, stderr = 1, "", "ERROR: ResolutionImpossible: numpy==2.0.2\n"

    monkeypatch.setattr(deps.subprocess, "run", lambda *a, **k: Completed())
    with pytest.raises(HRpQCTError, match="ResolutionImpossible"):
        pip_install(["scikit-image>=0.21"], python="python")


# ------------------------------------------------------------------------------------------
# the Segmenter: ONNX Runtime for the bundled model on the CPU
# ------------------------------------------------------------------------------------------
def _names(dependencies) -> list[str]:
    return [d.distribution for d in dependencies if d.installer in (PIP, deps.PYTORCH)]


def test_the_bundled_model_on_the_cpu_needs_onnxruntime_not_torch():
    no_torch = {"torch_installed": lambda: False}
    for device in ("auto", "cpu"):
        wanted = segmenter.segmenter_dependencies(SegmenterParameters(device=device), **no_torch)
        assert _names(wanted) == ["onnxruntime"], device
    assert segmenter.folder_has_onnx_graph(segmenter._bundled_folder())


def test_the_gpu_and_folders_without_a_graph_need_torch(tmp_path):
    torch = ["torch", "transformers", "safetensors"]
    no_torch = {"torch_installed": lambda: False}
    assert _names(segmenter.segmenter_dependencies(SegmenterParameters(device="gpu"),
                                                   **no_torch)) == torch
    # torch from another extension: "auto" runs on its GPU, which needs transformers
    assert _names(segmenter.segmenter_dependencies(
        SegmenterParameters(), torch_installed=lambda: True)) == torch
    folder = tmp_path / "model"
    folder.mkdir()
    metadata = {"weights_file": "model.safetensors", "weights_sha256": "abc"}
    (folder / "hrpqct_model.json").write_text(json.dumps(metadata))
    mine = SegmenterParameters(model="folder", model_folder=str(folder), device="cpu")
    assert _names(segmenter.segmenter_dependencies(mine, **no_torch)) == torch
    (folder / "model.onnx").write_bytes(b"graph")
    metadata.update(onnx_file="model.onnx", onnx_sha256="def", onnx_weights_sha256="abc")
    (folder / "hrpqct_model.json").write_text(json.dumps(metadata))
    assert _names(segmenter.segmenter_dependencies(mine, **no_torch)) == ["onnxruntime"]
    metadata["onnx_weights_sha256"] = "other weights"  # a graph of other weights: not used
    (folder / "hrpqct_model.json").write_text(json.dumps(metadata))
    assert _names(segmenter.segmenter_dependencies(mine, **no_torch)) == torch
