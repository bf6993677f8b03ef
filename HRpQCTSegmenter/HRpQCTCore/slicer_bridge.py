"""Bridge between engine arrays and Slicer's data model (MRML nodes), without Qt.

Used by the Slicer modules' Logic classes and tested headless with the ``slicer-core`` package.
Only Slicer's Qt-free MRML and module-logic classes are used (no ``slicer.app``,
``slicer.modules``, ``qt``); module logics are passed in by the caller, who gets them from
``slicer.modules.<name>.logic()`` inside Slicer or builds them in a headless scene.

``slicer`` and ``vtk`` are imported inside the functions, so importing this module (and the
engine) works where Slicer is absent.

Geometry: a :class:`~.scan.Scan` is LPS with arrays ``[z, y, x]``; Slicer's world is RAS and
its IJK index is (x, y, z) = (column, row, slice), so IJK-to-RAS is the scan's IJK-to-LPS
with the first two rows negated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.regions import REGIONS, LabelDefinition
from HRpQCTCore.scan import Scan

__all__ = [
    "ijk_to_ras_matrix",
    "array_to_volume_node",
    "array_from_volume_node",
    "scan_from_volume_node",
    "labels_to_segmentation_node",
    "apply_region_properties",
    "labels_from_segmentation_node",
    "load_terminology",
    "write_volume_node",
    "read_segmentation_file",
    "place_in_subject_hierarchy",
    "show_in_3d",
    "segmentation_fingerprint",
    "mark_as_generated",
    "OutputState",
    "output_state",
    "scan_to_volume_node",
    "is_scanco_file",
    "load_scan_file",
    "VOLUME_UNITS_ATTRIBUTE",
]

#: Node attribute naming the units of a volume's voxels (set by the Scanco reader: "hu").
VOLUME_UNITS_ATTRIBUTE = "HRpQCT.Units"
#: Segmentation node attribute: fingerprint of the segments as the segmenter made them.
FINGERPRINT_ATTRIBUTE = "HRpQCTSegmenter.Fingerprint"
#: Segmentation node attribute: ID of the volume node the segmentation was made from.
SOURCE_VOLUME_ATTRIBUTE = "HRpQCTSegmenter.SourceVolumeID"


def ijk_to_ras_matrix(reference: Scan) -> np.ndarray:
    """The 4 x 4 IJK-to-RAS matrix of ``reference`` (I, J, K = x, y, z voxel indices)."""
    spacing_xyz = np.asarray(tuple(reversed(reference.spacing_mm)), dtype=float)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(reference.direction, dtype=float).reshape(3, 3) * spacing_xyz
    ijk_to_lps[:3, 3] = reference.origin_mm
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_lps


def _vtk_matrix(matrix: np.ndarray):
    import vtk

    result = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            result.SetElement(row, column, float(matrix[row, column]))
    return result


def array_to_volume_node(scene: Any, array: np.ndarray, reference: Scan, name: str,
                         class_name: str = "vtkMRMLScalarVolumeNode") -> Any:
    """Add a volume node holding a copy of ``array`` (``[z, y, x]``) with the scan's geometry.

    ``class_name`` is ``"vtkMRMLScalarVolumeNode"`` for images and
    ``"vtkMRMLLabelMapVolumeNode"`` for label maps.
    """
    import vtk
    from vtkmodules.util import numpy_support

    if array.shape != reference.shape:
        raise ValueError(f"Array shape {array.shape} differs from the scan's {reference.shape}")
    image = vtk.vtkImageData()
    nz, ny, nx = array.shape
    image.SetDimensions(nx, ny, nz)
    contiguous = np.ascontiguousarray(array)
    # C order [z, y, x] is VTK's point order (x fastest); deep copy so the node owns its data.
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(contiguous.ravel(), deep=True))
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(reference)))
    node.SetAndObserveImageData(image)
    return node


def array_from_volume_node(volume_node: Any) -> np.ndarray:
    """A copy of a volume node's voxels as a ``[z, y, x]`` array."""
    from vtkmodules.util import numpy_support

    image = volume_node.GetImageData()
    nx, ny, nz = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx).copy()


def scan_from_volume_node(volume_node: Any) -> Scan:
    """A :class:`~.scan.Scan` with a copy of the node's voxels and its geometry (RAS -> LPS).

    The voxel values are taken as they are: the caller states their units (a volume loaded
    from a Scanco file may be in native units, not HU). A parent transform is not applied.
    """
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = np.array([[ijk_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
    spacing_xyz = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing_xyz
    return Scan(hu=array_from_volume_node(volume_node),
                spacing_mm=tuple(reversed(spacing_xyz.tolist())),  # type: ignore[arg-type]
                origin_mm=tuple(ijk_to_lps[:3, 3].tolist()),  # type: ignore[arg-type]
                direction=tuple(direction.ravel().tolist()))


def apply_region_properties(segmentation_node: Any,
                            regions: Sequence[LabelDefinition] = REGIONS) -> dict[int, str]:
    """Give each segment the name, colour and terminology of its region, matched by label value.

    Regions without a segment get an empty one (so the user can paint them), then segments are
    put in region order.

    Returns
    -------
    dict
        Region label value -> segment ID.
    """
    segmentation = segmentation_node.GetSegmentation()
    by_label: dict[int, str] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        by_label.setdefault(segmentation.GetNthSegment(index).GetLabelValue(),
                            segmentation.GetNthSegmentID(index))
    for definition in regions:
        segment_id = by_label.get(definition.label)
        if segment_id is None:
            segment_id = segmentation.AddEmptySegment(
                segmentation.GenerateUniqueSegmentID(definition.key), definition.name,
                definition.color_float)
            by_label[definition.label] = segment_id
        segment = segmentation.GetSegment(segment_id)
        segment.SetLabelValue(definition.label)
        segment.SetName(definition.name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*definition.color_float)
        segment.SetColorAutoGenerated(False)
        if definition.terminology is not None:
            segment.SetTerminology(definition.terminology.to_slicer_tag())
    for index, definition in enumerate(regions):
        segmentation.SetSegmentIndex(by_label[definition.label], index)
    return {d.label: by_label[d.label] for d in regions}


def labels_to_segmentation_node(scene: Any, segmentations_logic: Any, region_labels: np.ndarray,
                                reference: Scan, regions: Sequence[LabelDefinition] = REGIONS,
                                name: str = "HR-pQCT regions",
                                reference_volume_node: Any = None) -> Any:
    """Create a segmentation node from a region label map, one segment per region.

    Parameters
    ----------
    scene:
        The MRML scene (``slicer.mrmlScene`` in Slicer).
    segmentations_logic:
        The Segmentations module logic (``slicer.modules.segmentations.logic()``); it must have
        its scene set.
    region_labels:
        ``[z, y, x]`` integer label map with the reference scan's shape.
    reference:
        The scan the labels belong to (geometry).
    regions:
        Label definitions giving names, colours and terminology.
    name:
        Name of the new segmentation node.
    reference_volume_node:
        Volume node of the scan, if it is in the scene: it becomes the segmentation's
        reference geometry so editing happens on the scan's voxel grid.

    Returns
    -------
    vtkMRMLSegmentationNode
        The new node, with segments in region order (empty ones for absent labels).
    """
    labels = np.asarray(region_labels)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("Region label values must be within 0..255")
    labelmap_node = array_to_volume_node(scene, labels.astype(np.uint8, copy=False), reference,
                                         f"{name} (import)", "vtkMRMLLabelMapVolumeNode")
    try:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
        geometry_source = reference_volume_node or labelmap_node
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(geometry_source)
        if not segmentations_logic.ImportLabelmapToSegmentationNode(
                labelmap_node, segmentation_node, ""):
            scene.RemoveNode(segmentation_node)
            raise RuntimeError("Slicer could not import the label map into a segmentation")
    finally:
        scene.RemoveNode(labelmap_node)
    apply_region_properties(segmentation_node, regions)
    return segmentation_node


def labels_from_segmentation_node(segmentations_logic: Any, segmentation_node: Any,
                                  reference_volume_node: Any,
                                  regions: Sequence[LabelDefinition] = REGIONS) -> np.ndarray:
    """Rasterise the segments named like ``regions`` on the reference volume's grid.

    Segments are found by region name (users may reorder or add segments); a missing region is
    left empty. Where segments overlap, the later region wins.

    Returns
    -------
    numpy.ndarray
        ``[z, y, x]`` uint8 region label map with the reference volume's shape.
    """
    image = reference_volume_node.GetImageData() if reference_volume_node is not None else None
    if image is None:
        raise HRpQCTError("The reference volume has no voxels: select the scan the "
                          "segmentation was made on.")
    labels = np.zeros(tuple(reversed(image.GetDimensions())), dtype=np.uint8)
    segmentation = segmentation_node.GetSegmentation()
    for definition in regions:
        segment_id = segmentation.GetSegmentIdBySegmentName(definition.name)
        if segment_id:
            mask = _export_segment_mask(segmentations_logic, segmentation_node, segment_id,
                                        reference_volume_node)
            labels[mask > 0] = definition.label
    return labels


def _color_table_ids(scene: Any) -> set[str]:
    return {scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetID()
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))}


def _export_segment_mask(segmentations_logic: Any, segmentation_node: Any, segment_id: str,
                         reference_volume_node: Any) -> np.ndarray:
    """One segment as a ``[z, y, x]`` mask on the reference grid; the scene is left as it was.

    Slicer's export adds a label map node and a colour table named
    ``<segmentation>_ColorTable[_n]`` to the scene: both are removed, the colour table(s) by
    comparing the scene's colour tables before and after (never a table that was there).
    """
    import vtk

    scene = segmentation_node.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    tables_before = _color_table_ids(scene)
    export_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
    try:
        if not segmentations_logic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, export_node, reference_volume_node):
            name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
            raise RuntimeError(f"Slicer could not export segment {name!r}")
        return array_from_volume_node(export_node)
    finally:
        scene.RemoveNode(export_node)
        for table_id in _color_table_ids(scene) - tables_before:
            scene.RemoveNode(scene.GetNodeByID(table_id))


def load_terminology(terminologies_logic: Any) -> str:
    """Load the project's terminology context into Slicer; return its context name.

    Safe to call repeatedly (Slicer replaces a context with the same name).
    """
    from HRpQCTCore.artefacts import verified_path
    from HRpQCTCore.regions import TERMINOLOGY_CONTEXT_NAME

    path = verified_path("terminology")
    loaded = terminologies_logic.LoadTerminologyFromFile(str(path))
    if loaded != TERMINOLOGY_CONTEXT_NAME:
        raise RuntimeError(
            f"Slicer loaded {path} as {loaded!r}, expected {TERMINOLOGY_CONTEXT_NAME!r}")
    return loaded


# ------------------------------------------------------------------------------------------
# Files in and out of the scene (storage nodes: no slicer.util, no application)
# ------------------------------------------------------------------------------------------
def write_volume_node(volume_node: Any, path: str | Any, compress: bool = False) -> None:
    """Write a volume node to ``path`` (NRRD) with Slicer's own volume writer.

    A temporary storage node is used, so the node's own storage node (where the user saved it)
    is left unchanged.
    """
    import slicer

    scene = volume_node.GetScene()
    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage_node)
    try:
        storage_node.SetFileName(str(path))
        storage_node.SetUseCompression(1 if compress else 0)
        if not storage_node.WriteData(volume_node):
            raise RuntimeError(f"Slicer could not write volume {volume_node.GetName()!r} to {path}")
    finally:
        scene.RemoveNode(storage_node)


def read_segmentation_file(scene: Any, path: str | Any, segmentation_node: Any = None,
                           name: str = "HR-pQCT regions",
                           regions: Sequence[LabelDefinition] = REGIONS) -> Any:
    """Read a ``.seg.nrrd`` into ``segmentation_node`` (replacing its segments) or a new node.

    The file's segments get the regions' names, colours and terminology. The temporary
    storage node is detached afterwards, so the node is not tied to the (temporary) file.
    """
    import slicer

    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage_node = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage_node)
    try:
        storage_node.SetFileName(str(path))
        if not storage_node.ReadData(segmentation_node):
            raise RuntimeError(f"Slicer could not read the segmentation file {path}")
    finally:
        if segmentation_node.GetStorageNode() is storage_node:
            segmentation_node.SetAndObserveStorageNodeID(None)
        scene.RemoveNode(storage_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    apply_region_properties(segmentation_node, regions)
    return segmentation_node


# ------------------------------------------------------------------------------------------
# Placement and display
# ------------------------------------------------------------------------------------------
def place_in_subject_hierarchy(node: Any, beside_node: Any) -> int:
    """Put ``node`` under the same subject-hierarchy parent (the study) as ``beside_node``.

    Returns the node's subject-hierarchy item ID. Items missing from the hierarchy (outside
    Slicer's application nothing creates them automatically) are created under the scene.
    """
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())

    def item_of(data_node: Any) -> int:
        item = hierarchy.GetItemByDataNode(data_node)
        if not item:
            item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), data_node)
        return item

    parent = hierarchy.GetItemParent(item_of(beside_node))
    item = item_of(node)
    hierarchy.SetItemParent(item, parent or hierarchy.GetSceneItemID())
    return item


def show_in_3d(segmentation_node: Any) -> bool:
    """Make the segmentation visible in 3D views (builds its closed-surface representation)."""
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.GetDisplayNode().SetVisibility3D(True)
    return bool(segmentation_node.CreateClosedSurfaceRepresentation())


# ------------------------------------------------------------------------------------------
# "Has the user edited it since we made it?"
# ------------------------------------------------------------------------------------------
def segmentation_fingerprint(segmentation_node: Any) -> str:
    """A hash of the segments as they are now: names, label values, layers, voxels.

    Each labelmap layer is hashed once (segments of one layer share its image). Any change
    made in the Segment Editor changes the fingerprint; so may operations that only re-arrange
    the labelmaps (e.g. saving and reloading, which crops them): those then count as edits, so
    the module errs on the side of asking before it replaces anything.
    """
    import hashlib

    segmentation = segmentation_node.GetSegmentation()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(segmentation.GetSourceRepresentationName().encode()
                  if hasattr(segmentation, "GetSourceRepresentationName")
                  else segmentation.GetMasterRepresentationName().encode())
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        layer = segmentation.GetLayerIndex(segment_id)
        digest.update(f"|{segment_id}|{segment.GetName()}|{segment.GetLabelValue()}|{layer}"
                      .encode())
    for layer in range(segmentation.GetNumberOfLayers()):
        _digest_layer(digest, layer, segmentation.GetLayerDataObject(layer))
    return digest.hexdigest()


def _digest_layer(digest: Any, layer: int, data: Any) -> None:
    """Add one layer to the fingerprint: a labelmap's extent and voxels, or (closed-surface
    source representation) a surface's points and cells; a missing layer counts as empty."""
    from vtkmodules.util import numpy_support

    if data is None:
        digest.update(f"|layer{layer}|none".encode())
        return
    if hasattr(data, "GetExtent"):  # image data: labelmap layers
        digest.update(f"|layer{layer}|{tuple(data.GetExtent())}".encode())
        arrays = [data.GetPointData().GetScalars()]
    else:  # poly data: a segmentation whose source representation is a closed surface
        digest.update(f"|layer{layer}|{data.GetNumberOfPoints()}|{data.GetNumberOfCells()}"
                      .encode())
        points = data.GetPoints() if hasattr(data, "GetPoints") else None
        polys = data.GetPolys() if hasattr(data, "GetPolys") else None
        arrays = [points.GetData() if points is not None else None,
                  polys.GetConnectivityArray() if polys is not None else None]
    for array in arrays:
        if array is not None and array.GetNumberOfTuples():
            digest.update(numpy_support.vtk_to_numpy(array).tobytes())


def mark_as_generated(segmentation_node: Any, source_volume_node: Any = None) -> str:
    """Record on the node that the segmenter made its current content; returns the fingerprint."""
    fingerprint = segmentation_fingerprint(segmentation_node)
    segmentation_node.SetAttribute(FINGERPRINT_ATTRIBUTE, fingerprint)
    if source_volume_node is not None:
        segmentation_node.SetAttribute(SOURCE_VOLUME_ATTRIBUTE, source_volume_node.GetID())
    return fingerprint


class OutputState:
    """What replacing an output segmentation would destroy (see :func:`output_state`)."""

    NEW = "new"  # no node: a new one will be created
    EMPTY = "empty"  # a node without segments: nothing to lose
    UNEDITED = "unedited"  # made by the segmenter and unchanged since
    EDITED = "edited"  # made by the segmenter, then changed by the user
    FOREIGN = "foreign"  # segments the segmenter did not make (drawn or loaded by the user)
    NEEDS_CONSENT = (EDITED, FOREIGN)


def output_state(segmentation_node: Any) -> str:
    """Whether ``segmentation_node`` can be replaced without asking (an :class:`OutputState`)."""
    if segmentation_node is None:
        return OutputState.NEW
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        return OutputState.EMPTY
    recorded = segmentation_node.GetAttribute(FINGERPRINT_ATTRIBUTE)
    if not recorded:
        return OutputState.FOREIGN
    if recorded == segmentation_fingerprint(segmentation_node):
        return OutputState.UNEDITED
    return OutputState.EDITED


# ------------------------------------------------------------------------------------------
# Scans read by the engine (the Scanco file reader)
# ------------------------------------------------------------------------------------------
def _compact_hu(hu: np.ndarray) -> np.ndarray:
    """HU as int16 (rounded) when they fit, else float32.

    A full scan is 168 x 1600 x 1600 voxels: int16 halves Slicer's memory and the temporary
    file handed to the segmenter, and rounding to whole HU is far below the scan's noise.
    Converted slice by slice, so no second full-size float copy is made.
    """
    info = np.iinfo(np.int16)
    if hu.size == 0 or (np.issubdtype(hu.dtype, np.integer) and hu.dtype.itemsize <= 2):
        return np.asarray(hu)
    if float(hu.min()) < info.min or float(hu.max()) > info.max:
        return np.asarray(hu, dtype=np.float32)
    compact = np.empty(hu.shape, dtype=np.int16)
    for z in range(hu.shape[0]):
        compact[z] = np.rint(hu[z])
    return compact


def scan_to_volume_node(scene: Any, scan: Scan, name: str) -> Any:
    """A scalar volume node in HU (int16 when it fits) with the scan's geometry and a window.

    Only non-identifying facts travel with the node: the units attribute, and the
    calibration's constants (needed to convert back to native units).
    """
    import json

    node = array_to_volume_node(scene, _compact_hu(scan.hu), scan, name)
    node.SetAttribute(VOLUME_UNITS_ATTRIBUTE, "hu")
    calibration = scan.metadata.get("calibration") if scan.metadata else None
    if calibration:
        node.SetAttribute("HRpQCT.Calibration", json.dumps(calibration, sort_keys=True))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(3000.0, 500.0)  # soft tissue to cortical bone in one window
    return node


#: Name filters of the Scanco file reader (Slicer's "description (*.ext ...)" form).
SCANCO_NAME_FILTERS = ("Scanco HR-pQCT image (*.aim *.AIM *.isq *.ISQ *.aim;* *.AIM;* "
                       "*.isq;* *.ISQ;*)",)


def is_scanco_file(path: str | Any) -> bool:
    """Whether ``path`` is a Scanco AIM or ISQ file (by name, VMS ``;1`` suffix allowed)."""
    from HRpQCTCore.io import detect_format

    try:
        return detect_format(path) in ("aim", "isq")
    except Exception:  # missing, empty or unknown files are simply not ours
        return False


def load_scan_file(scene: Any, path: str | Any, name: str | None = None,
                   units: str = "auto", calibration: Any = None) -> tuple[Any, list[str]]:
    """Read a scan with the engine (Scanco AIM/ISQ and others) into a volume node in HU.

    Returns
    -------
    tuple
        The volume node (geometry from the file's header, voxels in HU) and the reader's
        warnings for the user.
    """
    from pathlib import Path

    from HRpQCTCore.io import read_scan

    scan = read_scan(path, units=units, calibration=calibration)
    stem = Path(str(path)).name.split(";")[0]
    stem = stem[: -len(Path(stem).suffix)] if Path(stem).suffix else stem
    node_name = name or scene.GenerateUniqueName(stem)
    node = scan_to_volume_node(scene, scan, node_name)
    warnings = [str(w) for w in (scan.metadata or {}).get("warnings", [])]
    return node, warnings
