"""The HRpQCTRadiomics module's Qt-free logic in a real MRML scene (``slicer-core``).

A small phantom crop becomes a volume node and a segmentation node (from its 7-region truth);
segments are mapped to regions by terminology and by name; the run -- a real background
process running ``hrpqct radiomics``, as in Slicer -- fills table nodes whose values equal
the engine's :func:`extract_features` on the same arrays; the CSV is written and read back; a
tiny classifier trained here on synthetic features gives probabilities with the caveat;
cancel stops the process and leaves the tables alone; what the panel checks on every change
imports nothing heavy.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from _fixtures_slicer import tiny_classifier, wrapper_fields

from HRpQCTCore import regions, slicer_bridge
from HRpQCTCore.background.process import BackgroundProcess, JobState
from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.scan import Scan
from HRpQCTRadiomicsEngine.classification import CAVEAT
from HRpQCTRadiomicsEngine.extraction import extract_features
from HRpQCTRadiomicsEngine.settings import load_settings
from HRpQCTRadiomicsEngine.table import ID_COLUMNS, read_feature_csv
from HRpQCTRadiomicsLib import slicer_radiomics as sr

FEATURES = ["original_firstorder_Mean", "original_firstorder_Median",
            "original_shape2D_PixelSurface"]
ADIPOSE = regions.region_by_name("adipose")
FIBULAR_CORTICAL = regions.region_by_name("fibular_cortical")
#: Full export with few features keeps the tests fast: the same layout as the presets.
SMALL_SETTINGS = """
    hrpqct:
      name: small
      sliceGeometry: volume
    setting:
      binWidth: 25
      force2D: true
      force2Ddimension: 0
      minimumROIDimensions: 2
      minimumROISize: 16
      additionalInfo: false
    imageType:
      Original: {}
    featureClass:
      shape2D: [PixelSurface]
      firstorder: [Mean, Median]
    """


@pytest.fixture
def small_settings(tmp_path):
    """A YAML parameter file with three features (full export in a second)."""
    path = tmp_path / "small.yaml"
    path.write_text(textwrap.dedent(SMALL_SETTINGS), encoding="utf-8")
    return path


@pytest.fixture
def nodes(mrml_scene, radiomics_scan):
    """(scene set-up, volume node, segmentation node, scan) of the phantom crop."""
    scan = Scan(hu=radiomics_scan.hu, spacing_mm=radiomics_scan.spacing_mm)
    volume = slicer_bridge.array_to_volume_node(mrml_scene.scene, scan.hu, scan, "crop")
    segmentation = slicer_bridge.labels_to_segmentation_node(
        mrml_scene.scene, mrml_scene.segmentations_logic, radiomics_scan.regions, scan,
        reference_volume_node=volume)
    return mrml_scene, volume, segmentation, radiomics_scan


def _segment(segmentation_node, definition):
    seg = segmentation_node.GetSegmentation()
    return seg.GetSegment(seg.GetSegmentIdBySegmentName(definition.name))


def _run(headless, volume, segmentation, parameters, **kwargs):
    run = sr.RadiomicsRun(headless.scene, headless.segmentations_logic, volume, segmentation,
                          parameters, **kwargs).start()
    assert run.wait(timeout_s=120) == JobState.SUCCEEDED, (run.message, run.log_lines())
    return run


# ------------------------------------------------------------------------------------------
# segments -> regions
# ------------------------------------------------------------------------------------------
def test_terminology_tells_tibia_from_fibula_and_skin_from_fat():
    for definition in regions.REGIONS:
        tag = definition.terminology.to_slicer_tag()
        assert sr.region_of_terminology(tag) == definition
    assert sr.region_of_terminology("") is None
    assert sr.region_of_terminology("ctx~SCT^85756007^Tissue~SCT^1^Unknown~^^~~^^~^^") is None


def test_segments_map_by_terminology_even_when_renamed(nodes):
    _, _, segmentation, _ = nodes
    mapping = sr.map_segments(segmentation)
    assert set(mapping.segment_of_region) == {d.label for d in regions.REGIONS}
    assert set(mapping.how.values()) == {"terminology"}
    _segment(segmentation, ADIPOSE).SetName("my fat after correction")
    mapping = sr.map_segments(segmentation)
    assert mapping.how[ADIPOSE.label] == "terminology"
    assert mapping.message() == ""


def test_segments_map_by_name_or_key_when_terminology_is_absent(nodes):
    _, _, segmentation, _ = nodes
    for definition in regions.REGIONS:
        _segment(segmentation, definition).SetTerminology("")
    _segment(segmentation, ADIPOSE).SetName("ADIPOSE")  # the key, other case
    mapping = sr.map_segments(segmentation)
    assert set(mapping.how.values()) == {"name"}
    assert len(mapping.segment_of_region) == 7


def test_missing_unknown_and_duplicate_segments_are_reported(nodes):
    headless, volume, segmentation, _ = nodes
    fat = _segment(segmentation, ADIPOSE)
    fat.SetTerminology("")
    fat.SetName("Something else")
    seg = segmentation.GetSegmentation()
    seg.AddEmptySegment("extra", "Tibial cortical bone", (1.0, 0.0, 0.0))
    mapping = sr.map_segments(segmentation)
    assert ADIPOSE.label not in mapping.segment_of_region
    message = mapping.message()
    assert "No segment for region(s): Adipose tissue" in message
    assert "'Something else'" in message and "ignored" in message
    assert "another segment already provides" in message
    # prediction needs every classifier region: a clear refusal names the missing one
    with pytest.raises(HRpQCTError, match="Adipose tissue"):
        sr.RadiomicsRun(headless.scene, headless.segmentations_logic, volume, segmentation,
                        sr.RadiomicsParameters(regions=[ADIPOSE.label]))


def test_mapped_segments_rasterise_to_the_truth(nodes):
    headless, volume, segmentation, scan = nodes
    _segment(segmentation, ADIPOSE).SetName("renamed fat")
    mapping = sr.map_segments(segmentation)
    labels = sr.region_labels_from_mapping(headless.segmentations_logic, segmentation, volume,
                                           mapping)
    assert np.array_equal(labels, scan.regions)


def test_parameters_come_from_the_parameter_node(tmp_path):
    from types import SimpleNamespace

    assert sr.RadiomicsParameters.from_parameter_node() == sr.RadiomicsParameters()
    node = SimpleNamespace(mode=sr.MODE_PREDICTION, classifierPath=str(tmp_path / "c.json"))
    parameters = sr.RadiomicsParameters.from_parameter_node(node, slices=[1], n_jobs=1)
    assert parameters.mode == sr.MODE_PREDICTION
    assert parameters.classifier_paths == [str(tmp_path / "c.json")]
    assert (parameters.slices, parameters.n_jobs) == ([1], 1)
    assert "does not exist" in parameters.problems()[0]
    empty = sr.RadiomicsParameters.from_parameter_node(
        SimpleNamespace(mode=sr.MODE_FEATURES, classifierPath=""))
    assert empty.classifier_paths == [] and empty.problems() == []
    with pytest.raises(TypeError, match="no field"):
        sr.RadiomicsParameters.from_parameter_node(node, slice=[1])  # a typo is not ignored


@pytest.fixture
def no_bundled_classifier(monkeypatch):
    """An installation without a bundled classifier (the artefact name points nowhere)."""
    from HRpQCTRadiomicsEngine import model_io

    monkeypatch.setattr(model_io, "BUNDLED_CLASSIFIER", "no-such-classifier")


def test_blocking_run_raises_what_to_do(nodes, no_bundled_classifier):
    headless, volume, segmentation, _ = nodes
    sr.check_pyradiomics()  # installed here: no complaint
    with pytest.raises(HRpQCTError, match="bundled classifier is missing"):
        sr.run_radiomics(headless.scene, headless.segmentations_logic, volume, segmentation,
                         sr.RadiomicsParameters(mode=sr.MODE_PREDICTION))
    with pytest.raises(HRpQCTError, match="Select an input volume"):
        sr.start_radiomics(headless.scene, headless.segmentations_logic, None, segmentation)


def test_prediction_without_a_chosen_file_uses_the_bundled_classifier():
    from HRpQCTRadiomicsEngine.model_io import bundled_classifier_path, load_classifier

    bundled = bundled_classifier_path()
    assert bundled is not None and sr.bundled_classifier_paths() == [bundled]
    parameters = sr.RadiomicsParameters(mode=sr.MODE_PREDICTION)
    assert parameters.problems() == []
    assert parameters.effective_classifier_paths() == [str(bundled)]
    assert sr.RadiomicsParameters(classifier_paths=["mine.json"]).effective_classifier_paths() \
        == ["mine.json"]
    saved = load_classifier(bundled)  # checksum and format verified by the loader
    assert saved.features and all(":" in name for name in saved.features)


def test_prediction_without_a_classifier_says_the_bundled_one_is_missing(no_bundled_classifier):
    assert sr.bundled_classifier_paths() == []
    problems = sr.RadiomicsParameters(mode=sr.MODE_PREDICTION).problems()
    assert problems and "bundled classifier is missing" in problems[0]
    assert "full feature export" in problems[0]
    assert sr.RadiomicsParameters(mode="everything").problems()


# ------------------------------------------------------------------------------------------
# the run: table node, CSV
# ------------------------------------------------------------------------------------------
def test_feature_table_node_equals_the_engine_and_the_csv_reads_back(nodes, tmp_path,
                                                                     small_settings):
    headless, volume, segmentation, scan = nodes
    skin = regions.region_by_name("skin")
    seg = segmentation.GetSegmentation()
    seg.RemoveSegment(seg.GetSegmentIdBySegmentName(skin.name))
    wanted = [FIBULAR_CORTICAL.label, ADIPOSE.label, skin.label]
    parameters = sr.RadiomicsParameters(regions=wanted, slices=[0, 2], n_jobs=1,
                                        settings=str(small_settings))
    run = sr.RadiomicsRun(headless.scene, headless.segmentations_logic, volume, segmentation,
                          parameters)
    assert "No segment for region(s): Skin" in run.warnings  # the others still run
    run.start()
    assert isinstance(run.process, BackgroundProcess)  # not a thread in Slicer's process
    assert run.process.command[1:4] == ["-m", "HRpQCTPipeline", "radiomics"]
    assert run.wait(timeout_s=120) == JobState.SUCCEEDED, (run.message, run.log_lines())
    assert run.fraction == 1.0 and "region result" in run.message
    assert run.process.progress.stage == "radiomics (slices)"  # the JSON progress lines

    expected = extract_features(scan.hu, scan.regions, scan.spacing_mm, slices=[0, 2],
                                settings=load_settings(small_settings),
                                regions=[FIBULAR_CORTICAL.label, ADIPOSE.label], n_jobs=1,
                                scan="crop", subject="crop")
    node = run.table_node
    assert node.IsA("vtkMRMLTableNode")
    assert node.GetAttribute("HRpQCT.RadiomicsSettings") == "small"
    table = node.GetTable()
    columns = [table.GetColumnName(j) for j in range(table.GetNumberOfColumns())]
    assert columns == [*ID_COLUMNS, *expected.feature_names]
    assert table.GetNumberOfRows() == len(expected.rows) == 4
    for i, row in enumerate(expected.rows):
        assert table.GetValueByName(i, "region").ToString() == row.region_key
        assert table.GetValueByName(i, "slice").ToString() == str(row.slice_index)
        for name in expected.feature_names:
            assert table.GetValueByName(i, name).ToDouble() == row.features[name]

    path = sr.write_features_csv(tmp_path / "features.csv", run.table)
    back = read_feature_csv(path)
    assert back.feature_names == expected.feature_names
    assert np.array_equal(back.values, expected.matrix()[0])
    assert [ids["region"] for ids in back.ids] == [r.region_key for r in expected.rows]
    assert not list(tmp_path.glob("*.tmp*"))
    assert not run._work_dir.exists()  # the temporary inputs are gone


def test_cancel_stops_the_process_and_leaves_the_tables_unchanged(nodes):
    headless, volume, segmentation, _ = nodes
    # every region and slice with the paper preset: long enough to be cancelled while running
    run = sr.start_radiomics(headless.scene, headless.segmentations_logic, volume,
                             segmentation, sr.RadiomicsParameters(n_jobs=1))
    deadline = time.monotonic() + 60
    while run.poll() == JobState.RUNNING and run.process.progress is None:
        assert time.monotonic() < deadline, run.log_lines()
        time.sleep(0.05)
    started = time.monotonic()
    run.cancel()
    assert run.state == JobState.CANCELLED and time.monotonic() - started < 10
    assert run.process.exit_code is not None  # the process has ended, not just been asked
    assert run.table_node is None and "Cancelled" in run.message
    assert not run._work_dir.exists()


def test_a_failing_process_says_what_went_wrong(nodes, tmp_path):
    headless, volume, segmentation, _ = nodes
    model = tiny_classifier(tmp_path / "adipose.json", "adipose", FEATURES)
    model.write_text(model.read_text(encoding="utf-8").replace('"mean"', '"median"', 1),
                     encoding="utf-8")  # edited: its checksum fails in the process
    parameters = sr.RadiomicsParameters(mode=sr.MODE_PREDICTION, classifier_paths=[str(model)],
                                        slices=[1], n_jobs=1)
    run = sr.start_radiomics(headless.scene, headless.segmentations_logic, volume,
                             segmentation, parameters)
    assert run.wait(timeout_s=120) == JobState.FAILED
    assert "checksum" in run.message and "train-classifier" in run.message  # exit code 6
    assert run.table_node is None and run.log_lines()


def test_the_command_line_carries_the_choices(tmp_path):
    common = dict(regions=[FIBULAR_CORTICAL.label, ADIPOSE.label], scan_name="scan 1")
    paths = ("py", "v.nrrd", "r.nrrd", "f.csv", "p.json")
    full = sr.build_radiomics_command(*paths, sr.RadiomicsParameters(slices=[0, 2], n_jobs=3),
                                      classifier_paths=[], **common)
    assert full[:8] == ["py", "-m", "HRpQCTPipeline", "radiomics", "v.nrrd", "r.nrrd", "-o",
                        "f.csv"]
    assert full[full.index("--preset") + 1] == "paper"
    assert full[full.index("--regions") + 1] == "fibular_cortical,adipose"
    assert full[full.index("--slices") + 1] == "0,2" and full[full.index("--jobs") + 1] == "3"
    assert full[full.index("--progress") + 1] == "machine"
    assert full[full.index("--scan-id") + 1] == "scan 1"
    assert "--classifier" not in full and "--probabilities" not in full
    own = sr.build_radiomics_command(*paths, sr.RadiomicsParameters(settings="mine.yaml"),
                                     classifier_paths=["c.json"], **common)
    assert own[own.index("--params") + 1] == "mine.yaml"
    assert own[own.index("--classifier") + 1] == "c.json" and "--probabilities" in own
    prediction = sr.build_radiomics_command(
        *paths, sr.RadiomicsParameters(mode=sr.MODE_PREDICTION), classifier_paths=["c.json"],
        **common)
    assert "--classifier-features" in prediction
    assert "--preset" not in prediction and "--regions" not in prediction


def test_the_process_finds_both_module_folders():
    # The child must import the core (Segmenter's folder) and the radiomics engine (the
    # Radiomics module's folder). From a clone these are the two module folders; from an
    # installed package (CI's wheel install) both are site-packages.
    import os

    from HRpQCTCore.background.process import engine_environment, module_folders

    folders = [*module_folders(), sr._MODULE_FOLDER]
    assert any((f / "HRpQCTCore").is_dir() for f in folders)
    assert any((f / "HRpQCTRadiomicsEngine").is_dir() for f in folders)
    assert any((f / "HRpQCTPipeline").is_dir() for f in folders)
    path = engine_environment(folders, base={"PYTHONPATH": "elsewhere"})["PYTHONPATH"]
    parts = path.split(os.pathsep)
    assert parts == [*dict.fromkeys(str(f) for f in folders), "elsewhere"]


def test_what_the_panel_checks_imports_nothing_heavy():
    """The panel calls ``problems()`` on every parameter change, before anything is
    installed: with the classifier code, pyradiomics and YAML unimportable it still works
    (before the fix, prediction mode imported scikit-learn here)."""
    script = textwrap.dedent("""
        import sys
        HEAVY = {"sklearn", "radiomics", "yaml", "joblib", "threadpoolctl", "skops", "pywt",
                 "SimpleITK", "scipy", "skimage", "torch", "onnxruntime", "vtk", "slicer"}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HEAVY:
                    raise ImportError(f"{name} must not be imported by the panel's checks")

        sys.meta_path.insert(0, Block())
        from HRpQCTRadiomicsLib import slicer_radiomics as sr
        from HRpQCTRadiomicsLib.dependencies import RADIOMICS_DEPENDENCIES
        from HRpQCTCore.background.dependencies import missing_dependencies
        for mode in sr.MODE_CHOICES:
            assert sr.RadiomicsParameters(mode=mode).problems() == [], mode
        missing_dependencies(RADIOMICS_DEPENDENCIES)
        print("ok")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# probabilities
# ------------------------------------------------------------------------------------------
def test_prediction_mode_gives_probabilities_with_the_caveat(nodes, tmp_path):
    headless, volume, segmentation, _ = nodes
    model = tiny_classifier(tmp_path / "adipose.json", "adipose", FEATURES)
    parameters = sr.RadiomicsParameters(mode=sr.MODE_PREDICTION,
                                        classifier_paths=[str(model)], slices=[1], n_jobs=1)
    run = _run(headless, volume, segmentation, parameters)
    features = run.table_node.GetTable()
    assert features.GetNumberOfRows() == 1  # only the classifier's region, one slice
    node = run.probability_table_node
    table = node.GetTable()
    assert table.GetNumberOfRows() == 2  # the classifier, then overall
    assert table.GetValueByName(0, "classifier").ToString() == "adipose.json"
    assert table.GetValueByName(1, "classifier").ToString() == "overall"
    p = table.GetValueByName(0, "osteoporosis_probability").ToDouble()
    assert 0.0 <= p <= 1.0
    assert p == table.GetValueByName(1, "osteoporosis_probability").ToDouble()
    assert node.GetAttribute(sr.CAVEAT_ATTRIBUTE) == CAVEAT
    assert table.GetValueByName(0, "caveat").ToString() == CAVEAT
    assert "synthetic" in CAVEAT
    summary = run.probability_summary()
    assert summary.startswith(sr.RESEARCH_USE) and CAVEAT in summary


def test_a_withheld_probability_stays_withheld_in_the_table_and_the_summary(nodes):
    headless, *_ = nodes
    reason = "withheld: quality control failed for the regions the classifier uses"
    result = {"caveat": CAVEAT, "overall": {"probability": None, "slices_used": 3,
                                            "note": "mean", "withheld": True,
                                            "withheld_reason": reason},
              "classifiers": [{"classifier": "c.json", "regions": ["adipose"],
                               "slices_used": 3, "probability": None, "aggregation": "mean",
                               "withheld": True, "withheld_reason": reason}]}
    rows = sr.probability_rows(result)
    assert [r.probability for r in rows] == [None, None]
    assert all(r.note == reason for r in rows)
    node = headless.scene.AddNewNodeByClass("vtkMRMLTableNode")
    table = sr.fill_probability_table_node(node, rows).GetTable()
    assert math.isnan(table.GetValueByName(0, "osteoporosis_probability").ToDouble())
    assert table.GetValueByName(0, "note").ToString() == reason


def test_a_three_class_classifier_gives_one_row_per_class(nodes):
    headless, *_ = nodes
    classes = {"normal": 0.2, "osteopenia": 0.3, "osteoporosis": 0.5}
    entry = {"classifier": "three.json", "regions": ["adipose"], "slices_used": 2,
             "probability": 0.5, "aggregation": "mean", "class_probabilities": classes}
    result = {"caveat": CAVEAT, "classifiers": [entry],
              "overall": {"probability": 0.5, "slices_used": 2, "note": "mean"}}
    rows = sr.probability_rows(result)
    assert [(r.class_name, r.probability) for r in rows] == [
        ("normal", 0.2), ("osteopenia", 0.3), ("osteoporosis", 0.5), ("osteoporosis", 0.5)]
    node = headless.scene.AddNewNodeByClass("vtkMRMLTableNode")
    table = sr.fill_probability_table_node(node, rows).GetTable()
    assert table.GetNumberOfRows() == 4
    assert table.GetValueByName(1, "class").ToString() == "osteopenia"
    assert table.GetValueByName(1, "probability").ToDouble() == 0.3
    assert table.GetValueByName(3, "classifier").ToString() == "overall"
    assert table.GetValueByName(0, "caveat").ToString() == CAVEAT
    # withheld: every class withheld, with the reason
    reason = "withheld: quality control failed for the regions the classifier uses"
    entry.update(probability=None, withheld=True, withheld_reason=reason,
                 class_probabilities=dict.fromkeys(classes))
    result["overall"].update(probability=None, withheld=True, withheld_reason=reason)
    rows = sr.probability_rows(result)
    assert [r.probability for r in rows] == [None] * 4 and all(r.note == reason for r in rows)
    table = sr.fill_probability_table_node(node, rows).GetTable()
    assert all(math.isnan(table.GetValueByName(i, "probability").ToDouble()) for i in range(4))


# ------------------------------------------------------------------------------------------
# module file <-> .ui
# ------------------------------------------------------------------------------------------
def test_every_parameter_widget_matches_the_radiomics_parameter_node(repo_root):
    """The parameter node is generated from ``RadiomicsParameters`` (plus the panel's node
    selections), the .ui's parameter widgets name its fields, and it reads back."""
    import xml.etree.ElementTree as ET
    from types import SimpleNamespace

    fields = wrapper_fields(repo_root, "HRpQCTRadiomics/HRpQCTRadiomics.py",
                            "HRpQCTRadiomicsParameterNode", sr.RadiomicsParameters)
    assert {name for name, f in fields.items() if f.generated} == {"mode", "classifierPath"}
    assert {name for name, f in fields.items() if not f.generated} == {
        "inputVolume", "inputSegmentation", "outputTable"}
    assert fields["mode"].choices == sr.MODE_CHOICES
    assert (fields["mode"].default, fields["classifierPath"].default) == (sr.MODE_FEATURES, "")
    assert fields["classifierPath"].type_name == "str"
    node = SimpleNamespace(**{name: f.default for name, f in fields.items()})
    assert sr.RadiomicsParameters.from_parameter_node(node) == sr.RadiomicsParameters()
    source = (repo_root / "HRpQCTRadiomics/HRpQCTRadiomics.py").read_text(encoding="utf-8")
    ui = ET.parse(repo_root / "HRpQCTRadiomics/Resources/UI/HRpQCTRadiomics.ui")
    connected = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                connected[prop.findtext("string")] = widget.get("class")
    assert set(connected) <= set(fields)
    assert connected["mode"] == "QComboBox"
    for parameter in set(fields) - set(connected):  # wired by hand
        assert f"parameters.{parameter}" in source or f"Node.{parameter}" in source
    widgets = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    assert widgets["exportCsvButton"] == "QPushButton"
    assert widgets["classifierPathLineEdit"] == "ctkPathLineEdit"
    assert widgets["probabilityLabel"] == "QLabel"
