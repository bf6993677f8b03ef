"""Segmentation -> label map and the "edited?" fingerprint, in a real MRML scene.

Exporting segments to a label map makes Slicer add a colour table named
``<segmentation>_ColorTable[_n]`` to the scene; the bridge must remove exactly what the
export created, or every radiomics run leaves tables behind. The fingerprint must work for
any segmentation the user may pick as output, including one whose source representation is
a closed surface.
"""

from __future__ import annotations

import numpy as np
import pytest

from HRpQCTCore import regions, slicer_bridge
from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.scan import Scan
from HRpQCTCore.slicer_bridge import OutputState


@pytest.fixture
def scan_and_labels():
    labels = np.zeros((3, 12, 14), dtype=np.uint8)
    for index, region in enumerate(regions.REGIONS[:3]):
        labels[:, 2 + 3 * index: 4 + 3 * index, 3:10] = region.label
    return Scan(hu=np.zeros(labels.shape, dtype=np.float32), spacing_mm=(0.5, 0.2, 0.2)), labels


def _color_table_names(scene) -> list[str]:
    return sorted(scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetName()
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")))


def test_exporting_leaves_no_colour_table_or_label_map_behind(mrml_scene, scan_and_labels):
    scan, labels = scan_and_labels
    scene = mrml_scene.scene
    volume = slicer_bridge.array_to_volume_node(scene, scan.hu, scan, "scan")
    segmentation = slicer_bridge.labels_to_segmentation_node(
        scene, mrml_scene.segmentations_logic, labels, scan, reference_volume_node=volume)
    # A table of the same name pattern that the user made stays.
    own = scene.AddNewNodeByClass("vtkMRMLColorTableNode",
                                  f"{segmentation.GetName()}_ColorTable")
    tables_before = _color_table_names(scene)
    label_maps_before = scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")
    for _ in range(2):
        back = slicer_bridge.labels_from_segmentation_node(
            mrml_scene.segmentations_logic, segmentation, volume)
        np.testing.assert_array_equal(back, labels)
    assert _color_table_names(scene) == tables_before
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == label_maps_before
    assert own.GetScene() is scene


def test_a_reference_volume_without_voxels_is_refused_with_what_to_do(mrml_scene,
                                                                      scan_and_labels):
    scan, labels = scan_and_labels
    segmentation = slicer_bridge.labels_to_segmentation_node(
        mrml_scene.scene, mrml_scene.segmentations_logic, labels, scan)
    empty = mrml_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(HRpQCTError, match="select the scan"):
        slicer_bridge.labels_from_segmentation_node(mrml_scene.segmentations_logic,
                                                    segmentation, empty)


def test_a_closed_surface_segmentation_has_a_fingerprint(mrml_scene):
    import slicer
    import vtk

    node = mrml_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    segmentation = node.GetSegmentation()
    segmentation.SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    segment = slicer.vtkSegment()
    segment.SetName("ball")
    segment.AddRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName(), sphere.GetOutput())
    segmentation.AddSegment(segment)

    assert slicer_bridge.output_state(node) == OutputState.FOREIGN
    first = slicer_bridge.mark_as_generated(node)  # as if the segmenter had made it
    assert slicer_bridge.output_state(node) == OutputState.UNEDITED
    sphere.SetRadius(2.0)  # an edited surface changes the fingerprint
    sphere.Update()
    segment.AddRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName(), sphere.GetOutput())
    assert slicer_bridge.segmentation_fingerprint(node) != first
    assert slicer_bridge.output_state(node) == OutputState.EDITED
