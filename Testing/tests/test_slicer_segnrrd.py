"""``.seg.nrrd`` files round-trip through Slicer's real segmentation storage node (slicer-core)."""

import numpy as np
import pytest

from HRpQCTCore import regions, slicer_bridge
from HRpQCTCore.io.segnrrd import read_seg_nrrd, write_seg_nrrd
from HRpQCTCore.scan import Scan


def _seven_region_labels() -> np.ndarray:
    """A small [z, y, x] map with all seven regions in distinct blocks, asymmetric on purpose."""
    labels = np.zeros((9, 12, 14), dtype=np.uint8)
    for index, region in enumerate(regions.REGIONS):
        z0 = index % 3 * 3
        y0 = index // 3 * 4
        labels[z0:z0 + 2, y0:y0 + 3, index:index + 5] = region.label
    return labels


@pytest.fixture
def reference_scan() -> Scan:
    """An oblique, anisotropic scan geometry so axis mix-ups cannot pass unnoticed."""
    angle = np.deg2rad(20.0)
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    return Scan(hu=np.zeros((9, 12, 14), dtype=np.float32), spacing_mm=(0.5, 0.3, 0.2),
                origin_mm=(-12.5, 30.0, 4.0), direction=direction)


def _read_with_storage_node(headless, path):
    import slicer

    segmentation_node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage_node = slicer.vtkMRMLSegmentationStorageNode()
    headless.scene.AddNode(storage_node)
    storage_node.SetFileName(str(path))
    assert storage_node.ReadData(segmentation_node), "Slicer's storage node could not read the file"
    return segmentation_node


def _segment_rows(segmentation_node):
    segmentation = segmentation_node.GetSegmentation()
    rows = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        rows.append((segment.GetName(), segment.GetLabelValue(), tuple(segment.GetColor()),
                     segment.GetTerminology()))
    return rows


def _expected_rows(defs=regions.REGIONS):
    return [(d.name, d.label, d.color_float, d.terminology.to_slicer_tag()) for d in defs]


def _assert_rows_equal(actual, expected):
    assert [(n, v, t) for n, v, _, t in actual] == [(n, v, t) for n, v, _, t in expected]
    for (name, _, colour, _), (_, _, wanted, _) in zip(actual, expected, strict=True):
        assert colour == pytest.approx(wanted, abs=1e-5), name


def test_written_seg_nrrd_loads_in_slicer_with_regions_intact(mrml_scene, reference_scan,
                                                              tmp_path):
    labels = _seven_region_labels()
    path = write_seg_nrrd(labels, reference_scan, tmp_path / "regions.seg.nrrd")

    segmentation_node = _read_with_storage_node(mrml_scene, path)

    _assert_rows_equal(_segment_rows(segmentation_node), _expected_rows())
    # The reference geometry we declare is the geometry Slicer reads from the NRRD header.
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    declared = segmentation.GetConversionParameter("Reference image geometry").split(";")
    labelmap = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
    loaded = slicer.vtkSegmentationConverter.SerializeImageGeometry(labelmap).split(";")
    assert [float(v) for v in declared[:16]] == pytest.approx([float(v) for v in loaded[:16]])
    reference_node = slicer_bridge.array_to_volume_node(
        mrml_scene.scene, reference_scan.hu, reference_scan, "reference")
    back = slicer_bridge.labels_from_segmentation_node(
        mrml_scene.segmentations_logic, segmentation_node, reference_node)
    np.testing.assert_array_equal(back, labels)


def test_terminology_tags_resolve_in_slicers_terminology_logic(mrml_scene, reference_scan,
                                                               tmp_path):
    import slicer
    import vtk

    assert regions.TERMINOLOGY_CONTEXT_NAME in mrml_scene.loaded_terminology_names()
    segmentation_node = _read_with_storage_node(
        mrml_scene, write_seg_nrrd(_seven_region_labels(), reference_scan, tmp_path / "t.seg.nrrd"))
    logic = mrml_scene.terminologies_logic
    preferred = vtk.vtkStringArray()
    preferred.InsertNextValue(regions.TERMINOLOGY_CONTEXT_NAME)
    for region in regions.REGIONS:
        segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(region.name)
        tag = segmentation_node.GetSegmentation().GetSegment(segment_id).GetTerminology()
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(tag, entry), region.key
        # Found in our loaded context (fails if the .term.json lacks the category or type) ...
        assert logic.UpdateEntryFromLoadedTerminologies(entry, preferred, vtk.vtkStringArray())
        assert entry.GetTerminologyContextName() == regions.TERMINOLOGY_CONTEXT_NAME
        assert entry.GetTypeObject().GetCodeMeaning() == region.terminology.type.meaning
        assert entry.GetRegionObject().GetCodeValue() == region.terminology.region.value
        # ... and Slicer serialises it back to exactly the tag regions.py produces.
        assert logic.SerializeTerminologyEntry(entry) == tag


def test_empty_regions_still_get_segments(mrml_scene, reference_scan, tmp_path):
    labels = np.zeros(reference_scan.shape, dtype=np.uint8)
    labels[2:4, 3:6, 4:9] = regions.region_by_name("tibial_trabecular").label
    path = write_seg_nrrd(labels, reference_scan, tmp_path / "sparse.seg.nrrd")

    segmentation_node = _read_with_storage_node(mrml_scene, path)

    _assert_rows_equal(_segment_rows(segmentation_node), _expected_rows())
    read_back, info = read_seg_nrrd(path)
    np.testing.assert_array_equal(read_back, labels)
    assert info.segment_by_name("Skin").extent == (0, -1, 0, -1, 0, -1)


def test_segmentation_built_in_slicer_reads_back_identically(mrml_scene, reference_scan,
                                                             tmp_path):
    import slicer

    labels = _seven_region_labels()
    labels[labels == regions.region_by_name("skin").label] = 0  # one region left to paint
    segmentation_node = slicer_bridge.labels_to_segmentation_node(
        mrml_scene.scene, mrml_scene.segmentations_logic, labels, reference_scan)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == len(regions.REGIONS)
    storage_node = slicer.vtkMRMLSegmentationStorageNode()
    mrml_scene.scene.AddNode(storage_node)
    storage_node.SetFileName(str(tmp_path / "from-slicer.seg.nrrd"))
    assert storage_node.WriteData(segmentation_node), "Slicer's storage node could not write"

    read_back, info = read_seg_nrrd(tmp_path / "from-slicer.seg.nrrd")

    np.testing.assert_array_equal(read_back, labels)
    assert info.spacing_mm == pytest.approx(reference_scan.spacing_mm)
    assert info.origin_mm == pytest.approx(reference_scan.origin_mm)
    assert info.direction == pytest.approx(reference_scan.direction)
    actual = [(s.name, s.label_value, s.color_float, s.terminology_tag) for s in info.segments]
    _assert_rows_equal(actual, _expected_rows())


def test_seg_nrrd_round_trip_without_slicer(reference_scan, tmp_path):
    labels = _seven_region_labels()
    path = write_seg_nrrd(labels, reference_scan, tmp_path / "plain.seg.nrrd", compress=False)
    read_back, info = read_seg_nrrd(path)
    np.testing.assert_array_equal(read_back, labels)
    assert [s.segment_id for s in info.segments] == [r.key for r in regions.REGIONS]
    assert info.fields["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_write_rejects_labels_that_belong_to_no_region(reference_scan, tmp_path):
    labels = np.zeros(reference_scan.shape, dtype=np.uint8)
    labels[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"values \[9\]"):
        write_seg_nrrd(labels, reference_scan, tmp_path / "bad.seg.nrrd")
    assert not (tmp_path / "bad.seg.nrrd").exists()


def test_volume_node_geometry_round_trips_to_a_scan(mrml_scene, reference_scan):
    hu = np.arange(np.prod(reference_scan.shape), dtype=np.float32).reshape(reference_scan.shape)
    node = slicer_bridge.array_to_volume_node(mrml_scene.scene, hu, reference_scan, "scan")
    scan = slicer_bridge.scan_from_volume_node(node)
    np.testing.assert_array_equal(scan.hu, hu)
    assert scan.spacing_mm == pytest.approx(reference_scan.spacing_mm)
    assert scan.origin_mm == pytest.approx(reference_scan.origin_mm)
    assert scan.direction == pytest.approx(reference_scan.direction)
    origin_ras = node.GetOrigin()
    assert origin_ras == pytest.approx((12.5, -30.0, 4.0))  # LPS (x, y) flip sign in RAS
