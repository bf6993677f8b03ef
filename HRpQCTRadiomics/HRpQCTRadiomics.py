"""3D Slicer module: per-region radiomic features of HR-pQCT scans and osteoporosis probability.

Thin by design: the science lives in the Qt-free packages ``HRpQCTRadiomicsEngine``
(features, classifiers) and ``HRpQCTRadiomicsLib.slicer_radiomics`` (the choices, the one
schema the parameter node below is generated from, segment-to-region mapping, the
background-process run started by ``start_radiomics``/``run_radiomics``, table nodes, CSV),
``HRpQCTRadiomicsLib.dependencies`` (the packages it installs, with consent, on the first
Apply) and ``HRpQCTCore`` (region model, Slicer bridge, the background process and the run
panel both modules share), all tested in CI against Slicer's real data model. This file holds
the panel wiring, the parameter node, a Logic delegating to the engine, and the self-test.
The core comes from the HR-pQCT Segmenter module's folder: hence the dependency on it.
"""

import logging
import os

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Light modules only: nothing here imports scikit-learn, pyradiomics or YAML.
from HRpQCTCore.background.dependencies import ensure_dependencies, missing_dependencies
from HRpQCTCore.background.panel import PanelView, RunPanel, status_style
from HRpQCTCore.parameter_schema import Markers, parameter_node_base
from HRpQCTRadiomicsLib.dependencies import RADIOMICS_DEPENDENCIES
from HRpQCTRadiomicsLib.slicer_radiomics import MODE_PREDICTION, RadiomicsParameters

MODULE_NAME = "HRpQCTRadiomics"
#: Slicer's markers for the parameter node fields generated from the engine's schema.
SLICER_MARKERS = Markers(choice=Choice, within_range=WithinRange, default=Default)


class HRpQCTRadiomics(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HR-pQCT Radiomics"
        self.parent.categories = ["Quantification"]
        # HRpQCTSegmenter's folder holds HRpQCTCore, which this module imports when it loads.
        self.parent.dependencies = ["Segmentations", "Tables", "HRpQCTSegmenter"]
        self.parent.contributors = ["HRpQCTSegmenter contributors"]
        self.parent.helpText = (
            "Computes radiomic features (pyradiomics) in each of the seven HR-pQCT regions of a "
            "segmentation made by the HR-pQCT Segmenter module (corrections allowed: segments "
            "are recognised by terminology, then by name) and an osteoporosis probability for "
            "research use: prediction mode uses the bundled classifier (osteoporosis-classifier, "
            "trained on synthetic phantoms, so its probabilities mean nothing for patients) "
            "unless you choose your own classifier file. Results go to table nodes; Export CSV "
            "writes the features. Needs Slicer 5.10 or newer. "
            "See <a href='https://github.com/hrpqct/SlicerHRpQCT'>the project page</a>.")
        self.parent.acknowledgementText = (
            "For research use only; not for clinical use. The bundled models were trained on "
            "synthetic phantoms, not on patient scans, and have no clinical validation. "
            "Features computed with pyradiomics (van Griethuysen et al., Cancer Research 2017).")


@parameterNodeWrapper
class HRpQCTRadiomicsParameterNode(parameter_node_base(RadiomicsParameters, SLICER_MARKERS)):
    """The panel's choices, saved with the scene.

    The engine's choices (mode, classifier file) are generated from ``RadiomicsParameters``,
    which also reads them back and checks them; only the panel's node selections are
    declared here.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode


class HRpQCTRadiomicsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel; extraction runs in a background process driven by ``RunPanel``."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._panel = None
        self._lastTable = None
        self._timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{MODULE_NAME}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HRpQCTRadiomicsLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._panel = RunPanel(
            PanelView(set_status=self.setStatus, set_progress=self.setProgress,
                      show_error=self.showError, start_timer=self._timer.start,
                      stop_timer=self._timer.stop, refresh=self.updateGUI),
            on_success=self.onRunDone, cancelling_text="Cancelling...")
        self._timer.connect("timeout()", self._panel.poll)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsvButton)
        self.ui.classifierPathLineEdit.connect("currentPathChanged(QString)",
                                               self.onClassifierPathChanged)
        self.initializeParameterNode()

    def cleanup(self):
        if self._panel is not None:
            self._panel.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event):
        if self._panel is not None:
            self._panel.cancel()
        self._lastTable = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        if not parameters.inputVolume:
            parameters.inputVolume = slicer.mrmlScene.GetFirstNodeByClass(
                "vtkMRMLScalarVolumeNode")
        if not parameters.inputSegmentation:
            parameters.inputSegmentation = slicer.mrmlScene.GetFirstNodeByClass(
                "vtkMRMLSegmentationNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def onClassifierPathChanged(self, path):
        if self._parameterNode and self._parameterNode.classifierPath != path:
            self._parameterNode.classifierPath = path

    def updateGUI(self, caller=None, event=None):
        parameters = self._parameterNode
        running = self._panel is not None and self._panel.running
        self.ui.parametersCollapsibleButton.enabled = not running
        self.ui.exportCsvButton.enabled = not running and self._lastTable is not None
        if parameters and self.ui.classifierPathLineEdit.currentPath != parameters.classifierPath:
            self.ui.classifierPathLineEdit.currentPath = parameters.classifierPath
        problems = (self.logic.parameters(parameters).problems() if parameters
                    else ["No parameter node."])
        if parameters and not (parameters.inputVolume and parameters.inputSegmentation):
            problems.insert(0, "Select an input volume and its region segmentation.")
        if self._panel is None:
            return
        state = self._panel.button_state(
            problems,
            ready_tooltip=("Compute the per-region radiomic features (and probabilities with "
                           "a classifier)."),
            cancel_tooltip="Stop the extraction; no table is changed.")
        self.ui.applyButton.text = state.text
        self.ui.applyButton.enabled = state.enabled
        self.ui.applyButton.toolTip = state.tooltip
        if (not running and parameters and parameters.mode == MODE_PREDICTION
                and not parameters.classifierPath):
            self.setStatus(problems[-1] if problems else "")

    # -- running ---------------------------------------------------------------------------
    def onApplyButton(self):
        # The first status names the segments that matched no region, if any.
        self._panel.apply(self.startRun,
                          first_status=lambda run: run.warnings or run.status_text())

    def startRun(self):
        """Offer the dependencies, then start the extraction (the parameter node's choices)
        in a background process (None: not started)."""
        parameters = self._parameterNode
        self.ui.probabilityLabel.text = ""
        if not self.logic.ensureDependencies():
            self.setStatus("Not started: the feature extraction needs the listed Python "
                           "packages. Press Apply again to install them.", error=True)
            return None
        return self.logic.startRun(parameters.inputVolume, parameters.inputSegmentation,
                                   self.logic.parameters(parameters),
                                   tableNode=parameters.outputTable)

    def onRunDone(self, run):
        self._lastTable = run.table
        if self._parameterNode:
            self._parameterNode.outputTable = run.table_node
        slicer.util.getModuleLogic("Tables")  # make sure the Tables module is loaded
        self.ui.probabilityLabel.text = run.probability_summary()
        self.setStatus("\n".join(t for t in (run.message, run.warnings) if t))

    def onExportCsvButton(self):
        if self._lastTable is None:
            return
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), "Export features as CSV", "features.csv", "CSV (*.csv)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Could not write the CSV file.", waitCursor=True):
            self.logic.exportCsv(self._lastTable, path)
            self.setStatus(f"Features written to {path}.")

    # -- messages --------------------------------------------------------------------------
    def setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = status_style(error)

    def setProgress(self, percent):
        self.ui.progressBar.value = percent

    def showError(self, message, details=""):
        slicer.util.errorDisplay(message, windowTitle="HR-pQCT Radiomics",
                                 detailedText=details or None)


def _noTorch():
    raise RuntimeError("The Radiomics module does not use PyTorch.")


class HRpQCTRadiomicsLogic(ScriptedLoadableModuleLogic):
    """Delegates to :mod:`HRpQCTRadiomicsLib.slicer_radiomics`; no GUI code."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastRun = None

    def getParameterNode(self):
        return HRpQCTRadiomicsParameterNode(super().getParameterNode())

    @staticmethod
    def parameters(parameterNode=None, **overrides):
        """RadiomicsParameters from the parameter node (or defaults), with overrides."""
        from HRpQCTRadiomicsLib.slicer_radiomics import RadiomicsParameters

        return RadiomicsParameters.from_parameter_node(parameterNode, **overrides)

    def ensureDependencies(self, dependencies=RADIOMICS_DEPENDENCIES, askConsent=True):
        """Install missing or outdated Python packages after the user agrees; True when all
        are usable. Called when Apply is pressed (never at import); pip runs with Slicer's
        own packages pinned at their installed versions."""
        def confirm(message):
            return not askConsent or slicer.util.confirmOkCancelDisplay(
                message, windowTitle="Install dependencies")

        def pipInstall(requirements):
            from HRpQCTCore.background.dependencies import pip_install

            with slicer.util.WaitCursor():
                pip_install(requirements)

        return ensure_dependencies(dependencies, confirm=confirm, install_torch=_noTorch,
                                   pip_install=pipInstall, requester="HR-pQCT Radiomics")

    def startRun(self, volumeNode, segmentationNode, parameters=None, tableNode=None):
        """Start the extraction in a background process; returns the RadiomicsRun to poll."""
        from HRpQCTRadiomicsLib.slicer_radiomics import start_radiomics

        return start_radiomics(slicer.mrmlScene, slicer.modules.segmentations.logic(),
                               volumeNode, segmentationNode, parameters or self.parameters(),
                               table_node=tableNode)

    def process(self, volumeNode, segmentationNode, parameters=None, tableNode=None,
                timeoutSeconds=None):
        """Run to the end (batch use, self-tests); returns the feature table node.

        The finished run (tables, probabilities) is kept in ``lastRun``.
        """
        from HRpQCTRadiomicsLib.slicer_radiomics import run_radiomics

        self.lastRun = run_radiomics(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), volumeNode,
            segmentationNode, parameters or self.parameters(), table_node=tableNode,
            timeout_s=timeoutSeconds)
        return self.lastRun.table_node

    @staticmethod
    def exportCsv(featureTable, path):
        """Write the features with the engine's CSV writer (atomic)."""
        from HRpQCTRadiomicsLib.slicer_radiomics import write_features_csv

        return write_features_csv(path, featureTable)


class HRpQCTRadiomicsTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Developer mode: Reload and Test; CTest on the Factory).

    A small synthetic segmentation -> features table -> CSV -> probability (from a tiny
    classifier of the one region present, trained here on synthetic numbers: the bundled
    classifier needs regions this small test has not), through the Logic the panel uses.
    HRpQCTSegmenter's self-test runs the same steps on its own segmentation.
    """

    #: Features of the self-test classifier (few, so prediction mode extracts quickly).
    FEATURES = ("original_firstorder_Mean", "original_firstorder_Median",
                "original_shape2D_PixelSurface")

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_module_resources_present()
        self.setUp()
        self.test_features_csv_and_probability_from_a_segmentation()

    def test_module_resources_present(self):
        here = os.path.dirname(__file__)
        for relative in (("UI", f"{MODULE_NAME}.ui"), ("Icons", f"{MODULE_NAME}.png")):
            self.assertTrue(os.path.isfile(os.path.join(here, "Resources", *relative)))

    @classmethod
    def tinyClassifier(cls, path, regionKey):
        """A logistic classifier on synthetic values of :attr:`FEATURES` of one region.

        For self-tests only: trained on random numbers, it predicts nothing real.
        """
        import numpy as np

        from HRpQCTRadiomicsEngine.classification import Dataset, train_classifier
        from HRpQCTRadiomicsEngine.model_io import save_classifier
        from HRpQCTRadiomicsEngine.settings import load_settings

        rng = np.random.default_rng(0)
        rows, labels, groups = [], [], []
        for subject in range(16):
            for _ in range(4):
                rows.append([rng.normal(-80 + 20 * (subject % 2), 10), rng.normal(-80, 10),
                             rng.normal(300, 40)])
                labels.append(subject % 2)
                groups.append(f"synthetic-{subject:02d}")
        data = Dataset(np.array(rows), np.array(labels), np.array(groups, dtype=object),
                       [f"{regionKey}:{name}" for name in cls.FEATURES],
                       [(g, str(i)) for i, g in enumerate(groups)])
        result = train_classifier(data, [regionKey], cv_folds=2, n_boot=10)
        return save_classifier(path, result, load_settings("paper"))

    def test_features_csv_and_probability_from_a_segmentation(self):
        import tempfile

        missing = missing_dependencies(RADIOMICS_DEPENDENCIES)
        if missing:  # a self-test never installs packages on the machine it runs on
            message = ("Radiomics test skipped: it needs "
                       + ", ".join(d.requirement for d in missing) + ", which are not "
                       "installed. Press Apply in the module once to install them.")
            logging.warning(f"{MODULE_NAME} self-test: {message}")
            self.delayDisplay(message)
            return

        import numpy as np

        from HRpQCTCore import regions, slicer_bridge
        from HRpQCTCore.scan import Scan
        from HRpQCTRadiomicsEngine.table import read_feature_csv
        from HRpQCTRadiomicsLib.slicer_radiomics import MODE_PREDICTION

        adipose = regions.region_by_name("adipose")
        rng = np.random.default_rng(0)
        labels = np.zeros((2, 24, 24), dtype=np.uint8)
        labels[:, 4:20, 4:20] = adipose.label
        hu = rng.normal(-100, 30, labels.shape).astype(np.float32)
        scan = Scan(hu=hu, spacing_mm=(0.25, 0.25, 0.25))
        volumeNode = slicer_bridge.array_to_volume_node(slicer.mrmlScene, hu, scan, "scan")
        segmentationNode = slicer_bridge.labels_to_segmentation_node(
            slicer.mrmlScene, slicer.modules.segmentations.logic(), labels, scan)
        logic = HRpQCTRadiomicsLogic()
        parameters = logic.parameters(regions=[adipose.label], n_jobs=1)
        tableNode = logic.process(volumeNode, segmentationNode, parameters)
        self.assertEqual(tableNode.GetNumberOfRows(), 2)
        with tempfile.TemporaryDirectory() as folder:
            path = logic.exportCsv(logic.lastRun.table, os.path.join(folder, "f.csv"))
            self.assertEqual(len(read_feature_csv(path).ids), 2)
            classifier = self.tinyClassifier(os.path.join(folder, "tiny.json"), adipose.key)
            logic.process(volumeNode, segmentationNode, logic.parameters(
                mode=MODE_PREDICTION, classifier_paths=[str(classifier)], n_jobs=1))
        probabilities = logic.lastRun.probabilities
        self.assertTrue(probabilities)
        for row in probabilities:
            self.assertTrue(0.0 <= row.probability <= 1.0)
        self.assertIn("Research use only", logic.lastRun.probability_summary())
        self.delayDisplay("HRpQCTRadiomics self-test passed")
