"""The two modules' whole flow, headless, through the engine functions their Logic calls.

What a user does in Slicer, in a real MRML scene (``slicer-core``), each step through the
function the panel's Logic calls (``test_slicer_modules`` checks that the Logic calls them):

1. HR-pQCT Segmenter: the panel's choices (parameter node) -> ``SegmenterParameters`` ->
   ``start_segmentation`` on a volume node, polled like the panel's timer, in a real
   background process. The child reads the module's command line with the real ``hrpqct``
   parser and the input with the real reader, and writes the phantom's true regions: the
   bundled network does not exist yet (the real command on a tiny model is run in
   ``test_slicer_segmenter``).
2. The result: seven segments with names, colours and coded terminology, on the scan's grid,
   under the scan's study.
3. An edit in the Segment Editor's way (a segment's binary labelmap replaced).
4. HR-pQCT Radiomics: its parameter node -> ``RadiomicsParameters`` -> ``start_radiomics``
   (the real ``hrpqct radiomics`` in a real background process, as in Slicer) -> the feature
   table node (the edit shows) -> CSV -> a probability from a classifier file (a tiny one of
   the edited region, trained here on synthetic numbers).

``Testing/slicer_like/run_flows.py`` runs the same flow with the real segmenter (bundled ONNX
model) in a Slicer-like Python holding only what Slicer and the modules' declarations
install (``.ci/slicer-like``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _fixtures_slicer import child_report, cli_launcher, tiny_classifier

from HRpQCTCore import regions, slicer_bridge
from HRpQCTCore.background.process import JobState, engine_environment
from HRpQCTCore.parameter_schema import node_fields
from HRpQCTCore.scan import Scan
from HRpQCTCore.slicer_bridge import OutputState
from HRpQCTRadiomicsEngine.classification import CAVEAT
from HRpQCTRadiomicsEngine.table import ID_COLUMNS, read_feature_csv
from HRpQCTRadiomicsLib import slicer_radiomics as sr
from HRpQCTSegmenterLib.parameters import SegmenterParameters
from HRpQCTSegmenterLib.slicer_segmenter import start_segmentation

ENGINE_PARENT = Path(regions.__file__).resolve().parents[1]
ADIPOSE = regions.region_by_name("adipose")
FIBULAR_CORTICAL = regions.region_by_name("fibular_cortical")
FEATURES = ("original_firstorder_Mean", "original_firstorder_Median",
            "original_shape2D_PixelSurface")


def _poll(run, timeout_s: float = 120.0) -> list[float]:
    """Poll ``run`` as the panels' timers do; returns the progress fractions seen."""
    fractions = []
    deadline = time.monotonic() + timeout_s
    while run.poll() == JobState.RUNNING:
        assert time.monotonic() < deadline, "the run did not finish"
        fractions.append(run.fraction)
        time.sleep(0.05)
    return fractions


def _replace_segment(headless, segmentation, segment_id, volume, mask) -> None:
    """Set a segment's voxels to ``mask`` (``[z, y, x]`` on the volume's grid) the way
    ``slicer.util.updateSegmentBinaryLabelmapFromArray`` does, with the headless logics."""
    import vtk

    labelmap = slicer_bridge.array_to_volume_node(
        headless.scene, mask.astype(np.uint8), slicer_bridge.scan_from_volume_node(volume),
        "__edit__", "vtkMRMLLabelMapVolumeNode")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        assert headless.segmentations_logic.ImportLabelmapToSegmentationNode(
            labelmap, segmentation, ids)
    finally:
        headless.scene.RemoveNode(labelmap)


def _table_rows(table_node) -> list[dict[str, str]]:
    table = table_node.GetTable()
    names = [table.GetColumnName(j) for j in range(table.GetNumberOfColumns())]
    return [{name: table.GetValueByName(i, name).ToString() for name in names}
            for i in range(table.GetNumberOfRows())]


def test_scan_to_segmentation_to_edit_to_features_csv_and_probability(
        mrml_scene, radiomics_scan, tmp_path):
    import slicer

    scene = mrml_scene.scene
    scan = Scan(hu=radiomics_scan.hu, spacing_mm=radiomics_scan.spacing_mm)

    # The scan as the Scanco reader leaves it: a volume in HU, under a patient's study.
    volume = slicer_bridge.scan_to_volume_node(scene, scan, "phantom")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(
        hierarchy.GetSceneItemID(), "synthetic subject"), "study")
    hierarchy.SetItemParent(hierarchy.CreateItem(study, volume), study)

    # 1. Segmenter panel: defaults (input units auto), Apply.
    segmenter_node = SimpleNamespace(**{node.node_name: node.default
                                        for node in node_fields(SegmenterParameters)})
    launcher = cli_launcher(tmp_path, radiomics_scan.regions)
    run = start_segmentation(scene, volume, None,
                             SegmenterParameters.from_parameter_node(segmenter_node),
                             launcher=launcher, python=sys.executable,
                             env=engine_environment(ENGINE_PARENT), show_3d=False)
    fractions = _poll(run)
    assert run.state == JobState.SUCCEEDED, run.message + "\n".join(run.log_lines())
    assert fractions == sorted(fractions) and run.fraction == 1.0
    read = child_report(run)
    assert read["units"] == "hu"  # "auto" became the volume's recorded units
    assert read["shape"] == list(scan.shape)
    assert read["hu_mean"] == pytest.approx(float(np.mean(np.rint(scan.hu))), abs=1e-3)

    # 2. Seven segments with terminology, on the scan's grid, beside the scan.
    segmentation = run.segmentation_node
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == len(regions.REGIONS)
    for index, region in enumerate(regions.REGIONS):
        segment = seg.GetNthSegment(index)
        assert (segment.GetName(), segment.GetTerminology()) == (
            region.name, region.terminology.to_slicer_tag())
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    labels = slicer_bridge.labels_from_segmentation_node(mrml_scene.segmentations_logic,
                                                         segmentation, volume)
    assert np.array_equal(labels, radiomics_scan.regions)
    assert slicer_bridge.output_state(segmentation) == OutputState.UNEDITED

    # 3. The user erases the adipose tissue on slice 1 (as a Segment Editor eraser does).
    mask = labels == ADIPOSE.label
    assert mask[1].any()
    mask[1] = False
    _replace_segment(mrml_scene, segmentation, seg.GetSegmentIdBySegmentName(ADIPOSE.name),
                     volume, mask)
    assert slicer_bridge.output_state(segmentation) == OutputState.EDITED
    edited = slicer_bridge.labels_from_segmentation_node(mrml_scene.segmentations_logic,
                                                         segmentation, volume)
    assert not (edited[1] == ADIPOSE.label).any() and (edited[0] == ADIPOSE.label).any()

    # 4. Radiomics panel, full feature export of two regions on two slices.
    radiomics_node = SimpleNamespace(mode=sr.MODE_FEATURES, classifierPath="")
    parameters = sr.RadiomicsParameters.from_parameter_node(
        radiomics_node, regions=[FIBULAR_CORTICAL.label, ADIPOSE.label], slices=[0, 1],
        n_jobs=1)
    radiomics = sr.start_radiomics(scene, mrml_scene.segmentations_logic, volume, segmentation,
                                   parameters)
    assert radiomics.process.command[2:4] == ["HRpQCTPipeline", "radiomics"]
    fractions = _poll(radiomics)
    assert radiomics.state == JobState.SUCCEEDED, radiomics.message
    assert fractions == sorted(fractions)
    rows = _table_rows(radiomics.table_node)
    assert [(r["region"], r["slice"], r["status"]) for r in rows] == [
        ("fibular_cortical", "0", "ok"), ("adipose", "0", "ok"),
        ("fibular_cortical", "1", "ok"), ("adipose", "1", "skipped")]  # the edit shows
    assert "empty" in rows[3]["reason"]
    feature_count = len(radiomics.table.feature_names)
    assert radiomics.table_node.GetTable().GetNumberOfColumns() == len(ID_COLUMNS) + (
        feature_count)

    # Export CSV: the same rows and values.
    csv_path = sr.write_features_csv(tmp_path / "features.csv", radiomics.table)
    back = read_feature_csv(csv_path)
    assert back.feature_names == radiomics.table.feature_names
    assert [(ids["region"], ids["slice"], ids["status"]) for ids in back.ids] == [
        (r["region"], r["slice"], r["status"]) for r in rows]
    table = radiomics.table_node.GetTable()
    for i, name in enumerate(back.feature_names[:50]):
        assert back.values[0, i] == table.GetValueByName(0, name).ToDouble()
    assert np.isnan(back.values[3]).all()  # the erased region has no values

    # 5. Prediction with a classifier file: probability table with the caveat.
    model = tiny_classifier(tmp_path / "fibula.json", FIBULAR_CORTICAL.key, FEATURES)
    radiomics_node = SimpleNamespace(mode=sr.MODE_PREDICTION, classifierPath=str(model))
    prediction = sr.run_radiomics(
        scene, mrml_scene.segmentations_logic, volume, segmentation,
        sr.RadiomicsParameters.from_parameter_node(radiomics_node, slices=[0, 1], n_jobs=1),
        timeout_s=120)
    assert prediction.table_node is not radiomics.table_node  # the first table is kept
    assert [r["region"] for r in _table_rows(prediction.table_node)] == ["fibular_cortical"] * 2
    probabilities = _table_rows(prediction.probability_table_node)
    assert [r["classifier"] for r in probabilities] == ["fibula.json", "overall"]
    for row in probabilities:
        assert 0.0 <= float(row["osteoporosis_probability"]) <= 1.0
        assert row["caveat"] == CAVEAT
    assert prediction.probability_summary().startswith(sr.RESEARCH_USE)
