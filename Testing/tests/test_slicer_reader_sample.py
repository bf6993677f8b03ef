"""Scanco file reader, sample scan and the module file's wiring to its ``.ui`` (no Slicer GUI).

The reader's Qt-free part (``slicer_bridge.load_scan_file``) loads a real AIM into a real
MRML scene; the sample scan is generated and checked against its recorded SHA256 and read
back by Slicer's own volume storage node, and its Sample Data entry is checked; the module
files (the panel and the hidden reader module ``HRpQCTScancoImport``) are checked statically
(AST and the ``.ui`` XML) since they need the Slicer application to import.
"""

from __future__ import annotations

import ast
import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _fixtures_slicer import WrapperField, wrapper_fields

from HRpQCTCore import slicer_bridge
from HRpQCTCore.errors import ArtefactError
from HRpQCTCore.parameter_schema import node_fields
from HRpQCTCore.scan import Scan
from HRpQCTSegmenterLib import sample_data
from HRpQCTSegmenterLib.parameters import (
    CALIBRATION_RANGES,
    DEVICE_CHOICES,
    MODEL_CHOICES,
    UNITS_CHOICES,
    SegmenterParameters,
)

MODULE_FILE = "HRpQCTSegmenter/HRpQCTSegmenter.py"
READER_FILE = "HRpQCTSegmenter/HRpQCTScancoImport.py"
UI_FILE = "HRpQCTSegmenter/Resources/UI/HRpQCTSegmenter.ui"


# ------------------------------------------------------------------------------------------
# Scanco reader (Qt-free part)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_aim(tmp_path_factory) -> tuple[Path, Scan]:
    """A small phantom written as a Scanco AIM (native units + calibration in the header)."""
    from HRpQCTCore import io
    from HRpQCTPhantom import PhantomParams, generate_phantom

    scan = generate_phantom(PhantomParams(rotation_deg=7.0).small(128, 3), 4).scan
    path = tmp_path_factory.mktemp("aim") / "PHANTOM.AIM"
    io.write_scan_aim(scan, path)
    return path, scan


def test_scanco_file_loads_as_a_volume_in_hu_with_the_header_geometry(mrml_scene, small_aim):
    path, scan = small_aim
    assert slicer_bridge.is_scanco_file(path)
    node, warnings = slicer_bridge.load_scan_file(mrml_scene.scene, path)
    assert node.IsA("vtkMRMLScalarVolumeNode")
    assert node.GetName() == "PHANTOM"
    assert node.GetAttribute(slicer_bridge.VOLUME_UNITS_ATTRIBUTE) == "hu"
    loaded = slicer_bridge.array_from_volume_node(node)
    assert loaded.shape == scan.shape
    # HU -> int16 native units -> HU: within one native step of the original.
    assert float(np.abs(loaded - scan.hu).max()) < 2.0
    read = slicer_bridge.scan_from_volume_node(node)
    assert read.spacing_mm == pytest.approx(scan.spacing_mm, abs=1e-4)
    assert read.origin_mm == pytest.approx(scan.origin_mm, abs=scan.spacing_mm[2])
    assert isinstance(warnings, list)
    display = node.GetDisplayNode()
    assert (display.GetWindow(), display.GetLevel()) == (3000.0, 500.0)


def test_reader_accepts_only_scanco_files(tmp_path, small_aim):
    path, scan = small_aim
    versioned = tmp_path / "SCAN.AIM;1"  # Scanco's OpenVMS exports keep a version suffix
    versioned.write_bytes(path.read_bytes())
    assert slicer_bridge.is_scanco_file(versioned)
    other = tmp_path / "scan.nrrd"
    sample_data.write_raw_nrrd(scan, other, dtype="float32")
    assert not slicer_bridge.is_scanco_file(other)
    assert not slicer_bridge.is_scanco_file(tmp_path / "missing.aim")
    empty = tmp_path / "empty.isq"
    empty.write_bytes(b"")
    assert not slicer_bridge.is_scanco_file(empty)


# ------------------------------------------------------------------------------------------
# sample scan
# ------------------------------------------------------------------------------------------
def test_raw_nrrd_bytes_depend_only_on_voxels_and_geometry(mrml_scene, tmp_path):
    import slicer

    angle = np.deg2rad(15.0)
    c, s = np.cos(angle), np.sin(angle)
    hu = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 7 - 300
    scan = Scan(hu=hu, spacing_mm=(0.5, 0.25, 0.125), origin_mm=(-1.5, 2.0, 3.25),
                direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    first = sample_data.write_raw_nrrd(scan, tmp_path / "a.nrrd")
    second = sample_data.write_raw_nrrd(scan, tmp_path / "b.nrrd")
    assert first == second
    assert (tmp_path / "a.nrrd").read_bytes() == (tmp_path / "b.nrrd").read_bytes()
    # Slicer's own reader gets the voxels and the oblique geometry back.
    node = mrml_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    mrml_scene.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "a.nrrd"))
    assert storage.ReadData(node)
    read = slicer_bridge.scan_from_volume_node(node)
    np.testing.assert_array_equal(read.hu, hu)
    assert read.spacing_mm == pytest.approx(scan.spacing_mm)
    assert read.origin_mm == pytest.approx(scan.origin_mm)
    assert read.direction == pytest.approx(scan.direction)
    with pytest.raises(ValueError, match="integers"):
        sample_data.write_raw_nrrd(scan.with_array(hu + 0.5), tmp_path / "c.nrrd")


@pytest.mark.slow
def test_generated_sample_scan_matches_its_recorded_checksum(tmp_path):
    from HRpQCTCore.artefacts import sha256_file

    path = sample_data.write_sample_scan(tmp_path)
    assert path.name == sample_data.SAMPLE_FILE_NAME
    assert sha256_file(path) == sample_data.SAMPLE_SHA256
    assert sample_data.sample_checksum() == f"SHA256:{sample_data.SAMPLE_SHA256}"
    header = path.read_bytes()[:400].decode("ascii", errors="replace")
    assert "Synthetic HR-pQCT phantom" in header and "not a patient scan" in header
    assert f"sizes: 1600 1600 {sample_data.SAMPLE_SLICES}" in header
    # An intact file is reused, not generated again.
    calls = []
    assert sample_data.write_sample_scan(tmp_path, generate=lambda **kw: calls.append(kw)) == path
    assert calls == []


def test_sample_data_entry_points_at_the_cache_file_with_its_checksum(tmp_path):
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    icon = tmp_path / "icon.png"
    source = sample_data.sample_data_source(tmp_path / "cache", icon)
    # The keyword arguments of SampleDataLogic.registerCustomSampleDataSource.
    assert set(source) == {"category", "sampleName", "thumbnailFileName", "uris", "fileNames",
                           "nodeNames", "checksums", "loadFileTypes"}
    assert source["category"] == "HR-pQCT" and source["sampleName"] == sample_data.SAMPLE_NAME
    address = urlparse(source["uris"])
    assert address.scheme == "file"  # nothing is downloaded
    assert Path(url2pathname(address.path)) == (tmp_path / "cache").absolute() / source[
        "fileNames"]
    assert source["fileNames"] == sample_data.SAMPLE_FILE_NAME
    assert source["checksums"] == f"SHA256:{sample_data.SAMPLE_SHA256}"
    assert source["thumbnailFileName"] == str(icon)
    assert source["loadFileTypes"] == "VolumeFile"


def test_a_sample_that_differs_from_the_reference_is_refused(tmp_path):
    scan = Scan(hu=np.zeros((2, 3, 4), dtype=np.int16), spacing_mm=(0.1, 0.1, 0.1))
    with pytest.raises(ArtefactError, match="differs from the reference"):
        sample_data.write_sample_scan(tmp_path, generate=lambda **kw: scan)
    assert not (tmp_path / sample_data.SAMPLE_FILE_NAME).exists()


# ------------------------------------------------------------------------------------------
# module file <-> .ui
# ------------------------------------------------------------------------------------------
def _ui_widgets(repo_root: Path) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(repo_root / UI_FILE).iter("widget")}


def _parameter_names(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def _module_tree(repo_root: Path, relative: str = MODULE_FILE) -> ast.Module:
    return ast.parse((repo_root / relative).read_text(encoding="utf-8"))


def _parameter_node_fields(repo_root: Path) -> dict[str, WrapperField]:
    return wrapper_fields(repo_root, MODULE_FILE, "HRpQCTSegmenterParameterNode",
                          SegmenterParameters)


def test_every_parameter_widget_matches_the_parameter_node(repo_root):
    fields = _parameter_node_fields(repo_root)
    connected = {}
    for name, widget in _ui_widgets(repo_root).items():
        parameter = _parameter_names(widget)
        if parameter:
            connected[parameter] = (name, widget.get("class"))
    assert set(connected) <= set(fields), "a widget names a parameter the node lacks"
    expected_class = {"vtkMRMLScalarVolumeNode": "qMRMLNodeComboBox",
                      "vtkMRMLSegmentationNode": "qMRMLNodeComboBox", "bool": "QCheckBox",
                      "float": "QDoubleSpinBox"}
    for parameter, (widget_name, widget_class) in connected.items():
        field = fields[parameter]
        wanted = "QComboBox" if field.choices else expected_class.get(field.type_name)
        assert widget_class == wanted, f"{widget_name} cannot show {parameter}: {field}"
    # Everything the user chooses is either connected or wired by hand in the module.
    source = (repo_root / MODULE_FILE).read_text(encoding="utf-8")
    for parameter in set(fields) - set(connected):
        assert f"self._parameterNode.{parameter}" in source, f"{parameter} is never set"


def test_parameter_node_is_generated_from_the_engine_schema(repo_root):
    fields = _parameter_node_fields(repo_root)
    generated = {name: field for name, field in fields.items() if field.generated}
    by_name = {node.field_name: node for node in node_fields(SegmenterParameters)}
    assert set(by_name) == {f.name for f in dataclasses.fields(SegmenterParameters)}
    defaults = SegmenterParameters()
    for name, node in by_name.items():
        field = generated[node.node_name]
        assert field.default == getattr(defaults, name)  # the panel starts at the engine's
    assert generated["inputUnits"].choices == UNITS_CHOICES
    assert generated["model"].choices == MODEL_CHOICES
    assert generated["device"].choices == DEVICE_CHOICES
    for name, value_range in CALIBRATION_RANGES.items():  # the panel's limits are the engine's
        assert generated[by_name[name].node_name].value_range == value_range
    declared = {name for name, field in fields.items() if not field.generated}
    assert declared == {"inputVolume", "outputSegmentation", "show3D", "trainingSetFolder"}
    # the parameter node reads back into the engine's choices, names and all
    node = SimpleNamespace(**{name: field.default for name, field in fields.items()})
    assert SegmenterParameters.from_parameter_node(node) == defaults


def test_calibration_spin_boxes_accept_the_engine_range(repo_root):
    widgets = _ui_widgets(repo_root)
    by_parameter = {_parameter_names(w): w for w in widgets.values() if _parameter_names(w)}
    defaults = SegmenterParameters()
    for node in node_fields(SegmenterParameters):
        if node.field_name not in CALIBRATION_RANGES:
            continue
        widget = by_parameter[node.node_name]
        props = {prop.get("name"): prop for prop in widget.findall("property")}
        low, high = CALIBRATION_RANGES[node.field_name]
        assert float(props["minimum"].findtext("double")) == low
        assert float(props["maximum"].findtext("double")) == high
        # enough decimals to show the default exactly (e.g. -391.209015)
        decimals = int(props["decimals"].findtext("number"))
        value = getattr(defaults, node.field_name)
        assert round(value, decimals) == value, (
            f"{node.node_name}: {decimals} decimals hide {value}")
    group = widgets["calibrationCollapsibleButton"]
    inside = {w.get("name") for w in group.iter("widget")}
    assert {by_parameter[a].get("name") for a in ("muScaling", "muWater", "densitySlope",
                                                   "densityIntercept")} <= inside


def test_choice_lists_are_the_engine_s():
    assert UNITS_CHOICES == ("auto", "hu", "native", "density")
    assert MODEL_CHOICES == ("bundled", "folder")
    assert DEVICE_CHOICES == ("auto", "cpu", "gpu")


def test_the_reader_module_defines_the_scanco_file_reader(repo_root):
    tree = _module_tree(repo_root, READER_FILE)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    reader = classes["HRpQCTScancoImportFileReader"]  # Slicer finds it by this name
    methods = {node.name: node for node in reader.body if isinstance(node, ast.FunctionDef)}
    assert {"description", "fileType", "extensions", "canLoadFile", "load"} <= set(methods)
    load = ast.unparse(methods["load"])
    # The reading is the engine's, after the optional aimio-py dependency is offered.
    assert "slicer_bridge.load_scan_file(" in load and "SCANCO_DEPENDENCIES" in load
    assert "loadedNodes" in load
    cmake = (repo_root / "HRpQCTSegmenter/CMakeLists.txt").read_text(encoding="utf-8")
    assert "HRpQCTScancoImport.py" in cmake  # installed, so Slicer finds the module


@pytest.mark.parametrize("relative", [MODULE_FILE, READER_FILE])
def test_module_file_imports_no_heavy_dependency_at_import_time(repo_root, relative):
    heavy = {"torch", "transformers", "onnxruntime", "SimpleITK", "radiomics", "safetensors"}
    tree = _module_tree(repo_root, relative)
    for node in tree.body:  # module level only: functions may import lazily
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in heavy, f"{name} imported at module level"
    # The engine modules the module file imports at load time stay light too.
    import subprocess
    import sys

    script = ("import sys, HRpQCTCore.background.dependencies, HRpQCTCore.background.panel, "
              "HRpQCTCore.parameter_schema, HRpQCTSegmenterLib.parameters\n"
              f"bad = sorted(m for m in {sorted(heavy)!r} if m in sys.modules)\n"
              "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
