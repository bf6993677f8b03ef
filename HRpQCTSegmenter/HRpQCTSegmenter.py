"""3D Slicer module: HR-pQCT distal tibia/fibula segmentation into seven regions.

Thin by design: all science lives in the Qt-free engine package ``HRpQCTSegmenterLib`` (also
usable as the ``hrpqct`` command). This file only connects Slicer's GUI and scene to it.

Status (foundation issue): the module loads, shows its panel, and its Logic calls the engine
(segmentation, post-processing, label map -> segmentation node). NOT YET WIRED (later issue):
running in a background process with a Cancel button, the parameter node, installing the
engine's dependencies (torch via the PyTorch extension, the rest via pip) on first Apply,
choosing units/calibration of the input volume, and model selection. Until then Apply runs in
the GUI thread and reports missing dependencies or models as errors; it never fakes a result.
"""

import logging
import os

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

MODULE_NAME = "HRpQCTSegmenter"


class HRpQCTSegmenter(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HR-pQCT Segmenter"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Terminologies"]
        self.parent.contributors = ["HRpQCTSegmenter contributors"]
        self.parent.helpText = (
            "Segments a distal tibia/fibula HR-pQCT scan into seven regions (tibial and fibular "
            "cortical and trabecular bone, skin, myotendinous and adipose tissue) with a "
            "SegFormer network followed by rule-based post-processing. The result is an "
            "editable segmentation with coded terminology. "
            "See <a href='https://github.com/hrpqct/SlicerHRpQCT'>the project page</a>.")
        self.parent.acknowledgementText = (
            "For research use only; not for clinical use. The bundled models were trained on "
            "synthetic phantoms, not on patient scans, and have no clinical validation. "
            "Method after the paper's SegFormer multi-region segmentation of HR-pQCT scans.")
        slicer.app.connect("startupCompleted()", _loadTerminology)


def _loadTerminology():
    """Register the project's terminology so segments show readable coded meanings."""
    try:
        from HRpQCTSegmenterLib import slicer_bridge

        slicer_bridge.load_terminology(slicer.modules.terminologies.logic())
    except Exception as exc:  # a broken terminology must not stop Slicer from starting
        logging.warning(f"HRpQCTSegmenter: custom terminology not loaded: {exc}")


class HRpQCTSegmenterWidget(ScriptedLoadableModuleWidget):
    """The module panel: input volume, output segmentation, Apply, progress and status."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.ui = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{MODULE_NAME}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HRpQCTSegmenterLogic()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.statusLabel.text = (
            "Not yet wired: runs in the GUI thread without Cancel; dependencies must already "
            "be installed.")
        self.updateGUI()

    def updateGUI(self, _node=None):
        self.ui.applyButton.enabled = self.ui.inputVolumeSelector.currentNode() is not None

    def onApplyButton(self):
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Running..."
        slicer.app.processEvents()

        def progress(fraction, message=""):
            self.ui.progressBar.value = round(100 * fraction)
            if message:
                self.ui.statusLabel.text = message
            slicer.app.processEvents()

        with slicer.util.tryWithErrorDisplay("HR-pQCT segmentation failed.", waitCursor=True):
            segmentationNode = self.logic.process(
                self.ui.inputVolumeSelector.currentNode(),
                self.ui.outputSegmentationSelector.currentNode(),
                progress=progress)
            self.ui.outputSegmentationSelector.setCurrentNode(segmentationNode)
            self.ui.statusLabel.text = "Done."


class HRpQCTSegmenterLogic(ScriptedLoadableModuleLogic):
    """Calls the engine; no GUI code, so it can run from the Python console or tests."""

    def process(self, inputVolumeNode, outputSegmentationNode=None, modelFolder=None,
                progress=None):
        """Segment ``inputVolumeNode`` (voxel values in HU) into the seven regions.

        ``progress(fraction, message)`` is called with a fraction in [0, 1].

        Returns the segmentation node (``outputSegmentationNode`` is replaced by a new node
        with the same name when given). Raises the engine's errors (missing model,
        missing dependency) unchanged so the GUI can show their advice.
        """
        if inputVolumeNode is None:
            raise ValueError("Select an input volume.")
        from HRpQCTSegmenterLib import slicer_bridge
        from HRpQCTSegmenterLib.commands.segment import resolve_model_folder
        from HRpQCTSegmenterLib.postprocess import postprocess
        from HRpQCTSegmenterLib.segmentation.inference import segment_volume

        def step(start, end):
            """Map the engine's (done, total, stage) callback onto [start, end] of the bar."""
            if progress is None:
                return None
            return lambda done, total, stage: progress(
                start + (end - start) * (done / total if total else 0.0), stage)

        # NOT YET WIRED: units/calibration choice; the volume is taken to be in HU.
        scan = slicer_bridge.scan_from_volume_node(inputVolumeNode)
        folder = resolve_model_folder(modelFolder)
        classes = segment_volume(scan.hu, folder, progress=step(0.0, 0.7))
        result = postprocess(classes, scan.hu, scan.spacing_mm, progress=step(0.7, 0.95))
        for warning in result.warnings:
            logging.warning(f"HRpQCTSegmenter: {warning}")
        name = (outputSegmentationNode.GetName() if outputSegmentationNode
                else f"{inputVolumeNode.GetName()} regions")
        segmentationNode = slicer_bridge.labels_to_segmentation_node(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), result.regions, scan,
            name=name, reference_volume_node=inputVolumeNode)
        if outputSegmentationNode is not None:
            slicer.mrmlScene.RemoveNode(outputSegmentationNode)
        if progress is not None:
            progress(1.0, "Done.")
        return segmentationNode


class HRpQCTSegmenterTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Developer mode: Reload and Test; CTest on the Factory)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_module_loads_and_terminology_is_registered()
        self.test_label_map_becomes_seven_named_segments()

    def test_module_loads_and_terminology_is_registered(self):
        from HRpQCTSegmenterLib import regions

        self.assertTrue(os.path.isfile(
            os.path.join(os.path.dirname(__file__), "Resources", "UI", f"{MODULE_NAME}.ui")))
        _loadTerminology()
        import vtk

        names = vtk.vtkStringArray()
        slicer.modules.terminologies.logic().GetLoadedTerminologyNames(names)
        loaded = [names.GetValue(i) for i in range(names.GetNumberOfValues())]
        self.assertIn(regions.TERMINOLOGY_CONTEXT_NAME, loaded)

    def test_label_map_becomes_seven_named_segments(self):
        import numpy as np

        from HRpQCTSegmenterLib import regions, slicer_bridge
        from HRpQCTSegmenterLib.scan import Scan

        labels = np.zeros((4, 10, 12), dtype=np.uint8)
        for region in regions.REGIONS:
            labels[1:3, region.label:region.label + 2, 2:9] = region.label
        scan = Scan(hu=np.zeros(labels.shape, dtype=np.float32), spacing_mm=(0.5, 0.2, 0.2))
        node = slicer_bridge.labels_to_segmentation_node(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), labels, scan)
        segmentation = node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(regions.REGIONS))
        for index, region in enumerate(regions.REGIONS):
            segment = segmentation.GetNthSegment(index)
            self.assertEqual(segment.GetName(), region.name)
            self.assertEqual(segment.GetTerminology(), region.terminology.to_slicer_tag())
        self.delayDisplay("HRpQCTSegmenter self-test passed")
