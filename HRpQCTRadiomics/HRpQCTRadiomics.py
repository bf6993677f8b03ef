"""3D Slicer module: per-region radiomic features of HR-pQCT scans and osteoporosis classification.

Thin by design: the science lives in the Qt-free engine packages ``HRpQCTRadiomicsLib`` (features,
feature selection, classifiers) and ``HRpQCTSegmenterLib`` (region model, Slicer bridge).

Status (foundation issue): the module loads, shows its panel, and its Logic turns the selected
segmentation into the engine's region label map. NOT YET WIRED (later issues): the radiomic
feature extraction itself (the engine function does not exist yet: Apply reports that instead of
producing a table), the classifier, the background process with Cancel, the parameter node,
installing pyradiomics, and the CSV export button.
"""

import os

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

MODULE_NAME = "HRpQCTRadiomics"


class HRpQCTRadiomics(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HR-pQCT Radiomics"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = ["Segmentations", "Tables"]
        self.parent.contributors = ["HRpQCTSegmenter contributors"]
        self.parent.helpText = (
            "Computes radiomic features (pyradiomics) in each of the seven HR-pQCT regions made "
            "by the HR-pQCT Segmenter module and, later, an osteoporosis classification from "
            "them. Results go to a table that can be saved as CSV. "
            "See <a href='https://github.com/hrpqct/SlicerHRpQCT'>the project page</a>.")
        self.parent.acknowledgementText = (
            "For research use only; not for clinical use. The bundled models were trained on "
            "synthetic phantoms, not on patient scans, and have no clinical validation. "
            "Features computed with pyradiomics (van Griethuysen et al., Cancer Research 2017).")


class HRpQCTRadiomicsWidget(ScriptedLoadableModuleWidget):
    """The module panel: input volume and segmentation, output table, Apply, progress, status."""

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
        self.logic = HRpQCTRadiomicsLogic()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        for selector in (self.ui.inputVolumeSelector, self.ui.inputSegmentationSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.statusLabel.text = "Not yet wired: feature extraction arrives in a later version."
        self.updateGUI()

    def updateGUI(self, _node=None):
        self.ui.applyButton.enabled = (
            self.ui.inputVolumeSelector.currentNode() is not None
            and self.ui.inputSegmentationSelector.currentNode() is not None)

    def onApplyButton(self):
        self.ui.progressBar.value = 0
        with slicer.util.tryWithErrorDisplay("HR-pQCT radiomics failed.", waitCursor=True):
            tableNode = self.logic.process(
                self.ui.inputVolumeSelector.currentNode(),
                self.ui.inputSegmentationSelector.currentNode(),
                self.ui.outputTableSelector.currentNode())
            self.ui.outputTableSelector.setCurrentNode(tableNode)
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = "Done."


class HRpQCTRadiomicsLogic(ScriptedLoadableModuleLogic):
    """Calls the engine; no GUI code."""

    def regionLabels(self, volumeNode, segmentationNode):
        """The segmentation as the engine's region label map on the volume's voxel grid."""
        from HRpQCTSegmenterLib import slicer_bridge

        return slicer_bridge.labels_from_segmentation_node(
            slicer.modules.segmentations.logic(), segmentationNode, volumeNode)

    def process(self, volumeNode, segmentationNode, outputTableNode=None):
        """Compute per-region features into a table node.

        NOT YET WIRED: the engine has no feature extraction yet, so this raises
        NotImplementedError after checking the inputs (it never returns an empty table as if
        it had worked).
        """
        if volumeNode is None or segmentationNode is None:
            raise ValueError("Select an input volume and its HR-pQCT region segmentation.")
        labels = self.regionLabels(volumeNode, segmentationNode)
        if not labels.any():
            raise ValueError(
                "The segmentation has no segment named like an HR-pQCT region; create it with "
                "the HR-pQCT Segmenter module.")
        raise NotImplementedError(
            "Radiomic feature extraction is not available in this version of the extension yet.")


class HRpQCTRadiomicsTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Developer mode: Reload and Test; CTest on the Factory)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_module_resources_present()
        self.test_segmentation_becomes_region_labels()

    def test_module_resources_present(self):
        here = os.path.dirname(__file__)
        for relative in (("UI", f"{MODULE_NAME}.ui"), ("Icons", f"{MODULE_NAME}.png")):
            self.assertTrue(os.path.isfile(os.path.join(here, "Resources", *relative)))

    def test_segmentation_becomes_region_labels(self):
        import numpy as np

        from HRpQCTSegmenterLib import regions, slicer_bridge
        from HRpQCTSegmenterLib.scan import Scan

        labels = np.zeros((4, 10, 12), dtype=np.uint8)
        for region in regions.REGIONS:
            labels[1:3, region.label:region.label + 2, 2:9] = region.label
        scan = Scan(hu=np.zeros(labels.shape, dtype=np.float32), spacing_mm=(0.5, 0.2, 0.2))
        volumeNode = slicer_bridge.array_to_volume_node(slicer.mrmlScene, scan.hu, scan, "scan")
        segmentationNode = slicer_bridge.labels_to_segmentation_node(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), labels, scan)
        back = HRpQCTRadiomicsLogic().regionLabels(volumeNode, segmentationNode)
        self.assertTrue(np.array_equal(back, labels))
        with self.assertRaises(NotImplementedError):
            HRpQCTRadiomicsLogic().process(volumeNode, segmentationNode)
        self.delayDisplay("HRpQCTRadiomics self-test passed")
