"""3D Slicer module: HR-pQCT distal tibia/fibula segmentation into seven regions.

Thin by design: the panel, its parameter node and calls into the engine. Everything that can
run without Qt lives in Qt-free packages tested in CI against Slicer's real data model
(``slicer-core``):

* ``HRpQCTSegmenterLib.parameters``: the choices (units and calibration, model, device), the
  one schema the parameter node below is generated from, their checks and the
  ``hrpqct segment`` command line;
* ``HRpQCTSegmenterLib.slicer_segmenter``: one run, volume node in -> segmentation node out
  (seven segments with terminology, reference geometry, under the input's study, 3D), never
  replacing an edited segmentation without asking; the text of that question;
* ``HRpQCTSegmenterLib.improve``: the "Improve the model" section (the original result kept
  per segmentation node, corrected slices -> training set -> fine-tuning in the background
  -> the new model folder selected);
* ``HRpQCTCore.background``: the background process (cancel stops its whole tree), the
  dependency offer, and the run panel both modules share (Apply/Cancel, polling, status);
* ``HRpQCTCore.slicer_bridge``: MRML helpers; ``HRpQCTSegmenterLib.sample_data``: the
  generated, checksummed sample scan and its Sample Data entry.

Here: the ``QTimer`` and the Qt widgets the shared run panel drives, dialogs, installers that
need Slicer (PyTorch extension, pip), the start-up hooks and the self-test.
Scanco ``.AIM``/``.ISQ`` drag and drop is the hidden module ``HRpQCTScancoImport``.
"""

import logging
import os

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Light engine modules only (no torch, onnxruntime or SimpleITK at import time).
from HRpQCTCore.background.dependencies import ensure_dependencies, missing_dependencies
from HRpQCTCore.background.panel import PanelView, RunPanel, status_style
from HRpQCTCore.parameter_schema import Markers, parameter_node_base
from HRpQCTSegmenterLib.dependencies import FINE_TUNING_DEPENDENCIES, segmenter_dependencies
from HRpQCTSegmenterLib.parameters import CALIBRATED_UNITS, SegmenterParameters

MODULE_NAME = "HRpQCTSegmenter"
#: Slicer's markers for the parameter node fields generated from the engine's schema.
SLICER_MARKERS = Markers(choice=Choice, within_range=WithinRange, default=Default)


class HRpQCTSegmenter(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HR-pQCT Segmenter"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations", "Terminologies", "SubjectHierarchy"]
        self.parent.contributors = ["HRpQCTSegmenter contributors"]
        self.parent.helpText = (
            "Segments a distal tibia/fibula HR-pQCT scan into seven regions (tibial and fibular "
            "cortical and trabecular bone, skin, myotendinous and adipose tissue) with a "
            "SegFormer network followed by rule-based post-processing. The work runs in a "
            "background process: Apply turns into Cancel while it runs. The result is an "
            "editable segmentation with coded terminology. Scanco .AIM/.ISQ files can be "
            "dropped on Slicer and load in HU; volumes in native or density units need the "
            "scanner's calibration constants. The HR-pQCT Radiomics module then computes "
            "regional features and, with the bundled classifier (osteoporosis-classifier, "
            "trained on synthetic phantoms) or your own, an osteoporosis probability for "
            "research use. Needs Slicer 5.10 or newer. "
            "See <a href='https://github.com/hrpqct/SlicerHRpQCT'>the project page</a>.")
        self.parent.acknowledgementText = (
            "For research use only; not for clinical use. The bundled models were trained on "
            "synthetic phantoms, not on patient scans, and have no clinical validation. "
            "Method after the paper's SegFormer multi-region segmentation of HR-pQCT scans.")
        slicer.app.connect("startupCompleted()", _loadTerminology)
        slicer.app.connect("startupCompleted()", registerSampleData)


def _loadTerminology():
    """Register the project's terminology so segments show readable coded meanings."""
    try:
        from HRpQCTCore import slicer_bridge

        slicer_bridge.load_terminology(slicer.modules.terminologies.logic())
    except Exception as exc:  # a broken terminology must not stop Slicer from starting
        logging.warning(f"HRpQCTSegmenter: custom terminology not loaded: {exc}")


def _sampleCacheFolder():
    return slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()


def registerSampleData():
    """Add the sample scan to Sample Data: generated here from a fixed seed, checksum-verified
    (``HRpQCTSegmenterLib.sample_data``); nothing is downloaded."""
    try:
        import SampleData

        from HRpQCTSegmenterLib import sample_data

        icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", f"{MODULE_NAME}.png")
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            **sample_data.sample_data_source(_sampleCacheFolder(), icon),
            customDownloader=lambda source: HRpQCTSegmenterLogic().loadSampleScan(source))
    except Exception as exc:  # Sample Data is optional; never block start-up
        logging.warning(f"HRpQCTSegmenter: sample data not registered: {exc}")


@parameterNodeWrapper
class HRpQCTSegmenterParameterNode(parameter_node_base(SegmenterParameters, SLICER_MARKERS)):
    """The panel's choices, saved with the scene.

    The engine's choices (units, calibration, model, device: names, defaults, choices and
    ranges) are generated from ``SegmenterParameters``, which also reads them back and checks
    them; only the panel's node selections and view option are declared here.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    show3D: bool = True
    #: "Improve the model": the training-set folder (a panel choice, not a segmentation one).
    trainingSetFolder: str = ""


class HRpQCTSegmenterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel; the work runs in a background process driven by ``RunPanel``."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._panel = None
        self._timer = None
        self._fineTunePanel = None
        self._fineTuneTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{MODULE_NAME}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HRpQCTSegmenterLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._panel = RunPanel(
            PanelView(set_status=self.setStatus, set_progress=self.setProgress,
                      show_error=self.showError, start_timer=self._timer.start,
                      stop_timer=self._timer.stop, refresh=self.updateGUI),
            on_success=self.onSegmentationDone)
        self._timer.connect("timeout()", self._panel.poll)
        # "Improve the model": the fine-tuning runs through a second run panel of its own.
        self._fineTuneTimer = qt.QTimer()
        self._fineTuneTimer.setInterval(self.POLL_INTERVAL_MS)
        self._fineTunePanel = RunPanel(
            PanelView(set_status=self.setFineTuneStatus, set_progress=self.setFineTuneProgress,
                      show_error=self.showError, start_timer=self._fineTuneTimer.start,
                      stop_timer=self._fineTuneTimer.stop, refresh=self.updateGUI),
            on_success=self.onFineTuneDone)
        self._fineTuneTimer.connect("timeout()", self._fineTunePanel.poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.modelFolderPathLineEdit.connect("currentPathChanged(QString)",
                                                self.onModelFolderChanged)
        self.ui.trainingSetFolderPathLineEdit.connect("currentPathChanged(QString)",
                                                      self.onTrainingSetFolderChanged)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSetButton)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTuneButton)
        self.initializeParameterNode()

    def cleanup(self):
        for panel in (self._panel, self._fineTunePanel):
            if panel is not None:
                panel.cancel()
        for timer in (self._timer, self._fineTuneTimer):
            if timer is not None:
                timer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event):
        for panel in (self._panel, self._fineTunePanel):
            if panel is not None:
                panel.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def onModelFolderChanged(self, path):
        if self._parameterNode and self._parameterNode.modelFolder != path:
            self._parameterNode.modelFolder = path

    def onTrainingSetFolderChanged(self, path):
        if self._parameterNode and self._parameterNode.trainingSetFolder != path:
            self._parameterNode.trainingSetFolder = path

    def updateGUI(self, caller=None, event=None):
        parameters = self._parameterNode
        running = self._panel is not None and self._panel.running
        fineTuning = self._fineTunePanel is not None and self._fineTunePanel.running
        self.updateImproveSection(parameters, running, fineTuning)
        running = running or fineTuning  # the fine-tuning selects a model when it ends
        useFolder = bool(parameters) and parameters.model == "folder"
        self.ui.modelFolderPathLineEdit.enabled = useFolder and not running
        self.ui.modelFolderLabel.enabled = useFolder
        if parameters and self.ui.modelFolderPathLineEdit.currentPath != parameters.modelFolder:
            self.ui.modelFolderPathLineEdit.currentPath = parameters.modelFolder
        self.ui.calibrationCollapsibleButton.visible = (
            bool(parameters) and parameters.inputUnits in CALIBRATED_UNITS)
        for widget in (self.ui.parametersCollapsibleButton, self.ui.calibrationCollapsibleButton,
                       self.ui.modelCollapsibleButton, self.ui.loadSampleButton):
            widget.enabled = not running
        problems = (self.logic.parameters(parameters).problems() if parameters
                    else ["No parameter node."])
        if parameters and not parameters.inputVolume:
            problems.insert(0, "Select an input volume.")
        if fineTuning:
            problems.append("Wait for the fine-tuning to end (it selects its new model).")
        if self._panel is None:
            return
        state = self._panel.button_state(
            problems,
            ready_tooltip="Segment the input volume into seven regions in a background process.",
            cancel_tooltip="Stop the segmentation; nothing is changed.")
        self.ui.applyButton.text = state.text
        self.ui.applyButton.enabled = state.enabled
        self.ui.applyButton.toolTip = state.tooltip

    def updateImproveSection(self, parameters, segmenting, fineTuning):
        folder = parameters.trainingSetFolder if parameters else ""
        if parameters and self.ui.trainingSetFolderPathLineEdit.currentPath != folder:
            self.ui.trainingSetFolderPathLineEdit.currentPath = folder
        self.ui.trainingSetFolderPathLineEdit.enabled = not fineTuning
        try:
            summary = self.logic.trainingSetSummary(folder).text() if folder else ""
        except Exception as exc:  # a manifest edited by hand: say so, keep the panel usable
            summary = f"The training set's manifest could not be read: {exc}"
        self.ui.trainingSetSummaryLabel.text = summary
        canAdd = bool(parameters and folder and parameters.inputVolume
                      and parameters.outputSegmentation)
        self.ui.addToTrainingSetButton.enabled = canAdd and not (segmenting or fineTuning)
        if self._fineTunePanel is None:
            return
        problems = [] if folder else ["Choose a training-set folder."]
        if segmenting:
            problems.append("Wait for the segmentation to end.")
        state = self._fineTunePanel.button_state(
            problems,
            ready_tooltip="Fine-tune the selected model on the training set in a background "
                          "process, then select the new model.",
            cancel_tooltip="Stop the fine-tuning; the selected model stays as it is.")
        self.ui.fineTuneButton.text = "Cancel" if fineTuning else "Fine-tune"
        self.ui.fineTuneButton.enabled = state.enabled
        self.ui.fineTuneButton.toolTip = state.tooltip

    # -- running ---------------------------------------------------------------------------
    def onApplyButton(self):
        self._panel.apply(self.startRun)

    def startRun(self):
        """Offer the dependencies, then start the background run (None: not started)."""
        parameters = self._parameterNode
        self.ui.logTextEdit.clear()
        # What this run imports: ONNX Runtime for the bundled model on the CPU, PyTorch for a
        # GPU or a model folder without an ONNX graph.
        if not self.logic.ensureDependencies(
                segmenter_dependencies(self.logic.parameters(parameters))):
            self.setStatus("Not started: the segmenter needs the listed Python packages. "
                           "Press Apply again to install them.", error=True)
            return None
        return self.logic.startSegmentation(
            parameters.inputVolume, parameters.outputSegmentation,
            self.logic.parameters(parameters), confirmReplace=self.confirmReplace,
            onLog=self.appendLog, show3D=parameters.show3D)

    def onSegmentationDone(self, run):
        if self._parameterNode:
            self._parameterNode.outputSegmentation = run.segmentation_node
        slicer.util.setSliceViewerLayers(background=run.input_volume_node)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    # -- improve the model -----------------------------------------------------------------
    def onAddToTrainingSetButton(self):
        parameters = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                row = self.logic.addToTrainingSet(parameters.trainingSetFolder,
                                                  parameters.inputVolume,
                                                  parameters.outputSegmentation)
        except Exception as exc:  # what to do is in the message
            self.setFineTuneStatus(str(exc), error=True)
        else:
            which = f"slices {row['slices']}" if row["slices"] else "every slice"
            self.setFineTuneStatus(f"Added {row['subject']} ({which}, counted from 0) to the "
                                   "training set.")
        self.updateGUI()

    def onFineTuneButton(self):
        self._fineTunePanel.apply(self.startFineTune)

    def startFineTune(self):
        """Offer PyTorch (fine-tuning needs it), then start the background fine-tuning."""
        if not self.logic.ensureDependencies(FINE_TUNING_DEPENDENCIES):
            self.setFineTuneStatus("Not started: fine-tuning needs the listed Python packages. "
                                   "Press Fine-tune again to install them.", error=True)
            return None
        return self.logic.startFineTuning(self._parameterNode.trainingSetFolder,
                                          self.logic.parameters(self._parameterNode))

    def onFineTuneDone(self, run):
        self.logic.selectModel(self._parameterNode, run.output_dir)
        self.setFineTuneStatus(f"{run.message} It is now the selected model (Model and "
                               "device: folder); Apply segments with it.")

    def setFineTuneStatus(self, text, error=False):
        self.ui.fineTuneStatusLabel.text = text
        self.ui.fineTuneStatusLabel.styleSheet = status_style(error)

    def setFineTuneProgress(self, percent):
        self.ui.fineTuneProgressBar.value = percent

    # -- dialogs and messages --------------------------------------------------------------
    def confirmReplace(self, segmentationNode, state):
        """Ask before replacing a segmentation the user edited (or made)."""
        from HRpQCTSegmenterLib.slicer_segmenter import CANCEL, REPLACE, replace_question

        question = replace_question(segmentationNode.GetName(), state)
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Warning)
        box.setWindowTitle(question.title)
        box.setText(question.text)
        roles = {REPLACE: qt.QMessageBox.DestructiveRole, CANCEL: qt.QMessageBox.RejectRole}
        buttons = []
        for text, answer in question.buttons:
            button = box.addButton(text, roles.get(answer, qt.QMessageBox.AcceptRole))
            buttons.append((button, answer))
            if answer == question.default:
                box.setDefaultButton(button)
        box.exec_()
        clicked = box.clickedButton()
        return next((answer for button, answer in buttons if button == clicked), CANCEL)

    def appendLog(self, line):
        self.ui.logTextEdit.appendPlainText(line)

    def setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = status_style(error)

    def setProgress(self, percent):
        self.ui.progressBar.value = percent

    def showError(self, message, details=""):
        self.ui.logCollapsibleButton.collapsed = not details
        slicer.util.errorDisplay(message, windowTitle="HR-pQCT Segmenter",
                                 detailedText=details or None)

    def onLoadSampleButton(self):
        with slicer.util.tryWithErrorDisplay("Could not make the sample scan.", waitCursor=True):
            self.setStatus("Making the sample scan (synthetic phantom; a few seconds)...")
            slicer.app.processEvents()
            volumeNode = self.logic.loadSampleScan()
            self._parameterNode.inputVolume = volumeNode
            self._parameterNode.inputUnits = "auto"
            self.setStatus(f"Loaded {volumeNode.GetName()} (synthetic phantom, HU).")


class HRpQCTSegmenterLogic(ScriptedLoadableModuleLogic):
    """Slicer-side calls into the engine, for the widget, scripts and tests (no widgets)."""

    def getParameterNode(self):
        return HRpQCTSegmenterParameterNode(super().getParameterNode())

    @staticmethod
    def parameters(parameterNode):
        """The engine's :class:`SegmenterParameters` from the parameter node."""
        return SegmenterParameters.from_parameter_node(parameterNode)

    # -- dependencies ----------------------------------------------------------------------
    def ensureDependencies(self, dependencies=None, askConsent=True):
        """Install missing or outdated Python packages after the user agrees; True when all
        are usable (default: what the default choices need, ``segmenter_dependencies()``).

        Called when Apply is pressed (never at import): torch through the PyTorch extension
        (it picks the build for this computer's GPU), the rest with pip, Slicer's own
        packages pinned at their installed versions.
        """
        def confirm(message):
            return not askConsent or slicer.util.confirmOkCancelDisplay(
                message, windowTitle="Install dependencies")

        if dependencies is None:
            dependencies = segmenter_dependencies()
        return ensure_dependencies(dependencies, confirm=confirm,
                                   install_torch=self._installTorch,
                                   pip_install=self._pipInstall)

    @staticmethod
    def _installTorch():
        from HRpQCTCore.errors import HRpQCTError

        try:
            import PyTorchUtils  # the optional PyTorch extension
        except ModuleNotFoundError:
            raise HRpQCTError(
                "PyTorch is needed for the GPU and for model folders without an ONNX graph: "
                "install the 'PyTorch' extension from the Extensions Manager, restart Slicer "
                "and press Apply again -- or choose the CPU with the bundled model, which "
                "needs no PyTorch.") from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            with slicer.util.WaitCursor():
                if torchLogic.installTorch(askConfirmation=False,
                                           torchVersionRequirement=">=2.1") is None:
                    raise HRpQCTError(
                        "PyTorch could not be installed. Install it from the PyTorch module "
                        "(Utilities > PyTorch), then press Apply again.")

    @staticmethod
    def _pipInstall(requirements):
        # Our own pip call on every Slicer version: it pins Slicer's packages (constraints
        # file), and it is the function the Slicer-like CI run tests.
        from HRpQCTCore.background.dependencies import pip_install

        with slicer.util.WaitCursor():
            pip_install(requirements)

    # -- segmentation ----------------------------------------------------------------------
    def startSegmentation(self, inputVolume, outputSegmentation=None, parameters=None,
                          confirmReplace=None, onLog=None, show3D=True):
        """Start a background run; poll the returned ``SegmentationRun`` (or ``wait()``)."""
        from HRpQCTSegmenterLib.slicer_segmenter import start_segmentation

        return start_segmentation(slicer.mrmlScene, inputVolume, outputSegmentation, parameters,
                                  confirm_replace=confirmReplace, on_log=onLog, show_3d=show3D,
                                  keep_original_in=self.originalResultsFolder())

    def process(self, inputVolume, outputSegmentation=None, parameters=None,
                confirmReplace=None, show3D=True, waitForCompletion=True, timeoutSeconds=None):
        """Segment ``inputVolume``; with ``waitForCompletion`` block and return the node.

        Raises the engine's error (with its advice) when the run fails. Without
        ``waitForCompletion`` returns the running ``SegmentationRun``.
        """
        from HRpQCTSegmenterLib.slicer_segmenter import run_segmentation

        if not waitForCompletion:
            return self.startSegmentation(inputVolume, outputSegmentation, parameters,
                                          confirmReplace=confirmReplace, show3D=show3D)
        return run_segmentation(slicer.mrmlScene, inputVolume, outputSegmentation, parameters,
                                confirm_replace=confirmReplace, show_3d=show3D,
                                timeout_s=timeoutSeconds,
                                keep_original_in=self.originalResultsFolder())

    # -- improve the model -----------------------------------------------------------------
    @staticmethod
    def originalResultsFolder():
        """Where each result's original ``.seg.nrrd`` is kept (Slicer's cache folder; the
        path is recorded on the segmentation node, see ``HRpQCTSegmenterLib.improve``)."""
        return os.path.join(slicer.app.cachePath, MODULE_NAME, "original-results")

    def addToTrainingSet(self, trainingFolder, inputVolume, segmentation):
        """Add the volume and its corrected segmentation; returns the manifest row."""
        from HRpQCTSegmenterLib.improve import add_corrected_node

        return add_corrected_node(trainingFolder, slicer.modules.segmentations.logic(),
                                  inputVolume, segmentation)

    @staticmethod
    def trainingSetSummary(trainingFolder):
        """What the training set holds (``.text()`` for the panel)."""
        from HRpQCTSegmenterLib.improve import training_set_summary

        return training_set_summary(trainingFolder)

    def startFineTuning(self, trainingFolder, parameters, extra=()):
        """Fine-tune the model ``parameters`` select on the training set, in the background;
        poll the returned ``FineTuneRun`` (or ``wait()``). ``extra``: more
        ``train-segmenter`` options."""
        from HRpQCTSegmenterLib.improve import start_fine_tune_run

        return start_fine_tune_run(trainingFolder, parameters, extra=list(extra))

    def selectModel(self, parameterNode, modelFolder):
        """Select a model folder (model = folder) in the parameter node."""
        from HRpQCTCore.parameter_schema import node_fields
        from HRpQCTSegmenterLib.improve import parameters_for_model

        selected = parameters_for_model(self.parameters(parameterNode), modelFolder)
        for field in node_fields(SegmenterParameters):
            value = getattr(selected, field.field_name)
            if getattr(parameterNode, field.node_name) != value:
                setattr(parameterNode, field.node_name, value)

    # -- sample data -----------------------------------------------------------------------
    def loadSampleScan(self, source=None):
        """Generate (or reuse) the sample phantom in the cache and load it via Sample Data."""
        import SampleData

        from HRpQCTCore import slicer_bridge
        from HRpQCTSegmenterLib import sample_data

        if source is None:
            source = SampleData.SampleDataLogic().sourceForSampleName(sample_data.SAMPLE_NAME)
        with slicer.util.WaitCursor():
            sample_data.write_sample_scan(_sampleCacheFolder())  # raises if the checksum fails
        if source is not None:
            volumeNode = SampleData.SampleDataLogic().downloadFromSource(source)[0]
        else:  # Sample Data registration failed: load the verified file directly
            volumeNode = slicer.util.loadVolume(
                os.path.join(_sampleCacheFolder(), sample_data.SAMPLE_FILE_NAME),
                {"name": sample_data.SAMPLE_NODE_NAME})
        volumeNode.SetAttribute(slicer_bridge.VOLUME_UNITS_ATTRIBUTE, "hu")
        return volumeNode


# ------------------------------------------------------------------------------------------
# Self-test
# ------------------------------------------------------------------------------------------
class HRpQCTSegmenterTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Developer mode: Reload and Test; CTest on the Factory).

    The whole flow: sample scan -> segmentation in the background process -> an edit that
    the next run must not overwrite -> radiomics -> table -> CSV -> probability, through the
    same Logic calls as the panels (which call the engine functions the CI tests run
    headless). The Scanco reader's test is in ``HRpQCTScancoImport``.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def skipWithMessage(self, message):
        """Say why a test does not run (log and Slicer's test display); the caller returns.

        ``runTest`` calls the tests one after another, so ``skipTest`` (an exception) would
        also stop the tests after this one.
        """
        logging.warning(f"{MODULE_NAME} self-test: {message}")
        self.delayDisplay(message)

    def runTest(self):
        self.setUp()
        self.test_module_loads_and_terminology_is_registered()
        self.setUp()
        self.test_label_map_becomes_seven_named_segments()
        self.setUp()
        self.test_parameter_node_gives_the_command_line()
        self.setUp()
        self.test_whole_flow()
        self.setUp()
        self.test_improve_the_model()

    def test_module_loads_and_terminology_is_registered(self):
        from HRpQCTCore import regions

        self.assertTrue(os.path.isfile(
            os.path.join(os.path.dirname(__file__), "Resources", "UI", f"{MODULE_NAME}.ui")))
        _loadTerminology()
        names = vtk.vtkStringArray()
        slicer.modules.terminologies.logic().GetLoadedTerminologyNames(names)
        loaded = [names.GetValue(i) for i in range(names.GetNumberOfValues())]
        self.assertIn(regions.TERMINOLOGY_CONTEXT_NAME, loaded)

    def test_label_map_becomes_seven_named_segments(self):
        import numpy as np

        from HRpQCTCore import regions, slicer_bridge
        from HRpQCTCore.scan import Scan

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

    def test_parameter_node_gives_the_command_line(self):
        """Panel choices (real parameter node) -> engine parameters -> calibration options."""
        from HRpQCTSegmenterLib.parameters import build_segment_command

        parameterNode = HRpQCTSegmenterLogic().getParameterNode()
        previous = {name: getattr(parameterNode, name) for name in (
            "inputUnits", "muScaling", "muWater", "densitySlope", "densityIntercept")}
        parameterNode.inputUnits = "native"
        parameterNode.muScaling = 4096.0
        parameterNode.muWater = 0.2347
        parameterNode.densitySlope = 1600.0
        parameterNode.densityIntercept = -390.5
        parameters = HRpQCTSegmenterLogic.parameters(parameterNode)
        calibration = parameters.calibration()
        self.assertEqual((calibration.mu_scaling, calibration.mu_water,
                          calibration.density_slope, calibration.density_intercept),
                         (4096.0, 0.2347, 1600.0, -390.5))
        command = build_segment_command("python", "in.nrrd", "out.seg.nrrd", parameters)
        self.assertIn("--mu-scaling=4096.0", command)
        self.assertIn("--density-intercept=-390.5", command)
        self.assertEqual(command[command.index("--units") + 1], "native")
        with self.assertRaises(ValueError):  # the panel cannot hold a value the engine refuses
            parameterNode.muWater = 0.0
        for name, value in previous.items():
            setattr(parameterNode, name, value)

    def _modelParameters(self):
        """The bundled model, or -- when this build has none -- an untrained tiny model.

        The tiny model only exercises the flow (its regions are noise); the test says so.
        """
        from HRpQCTCore.errors import ArtefactError
        from HRpQCTSegmentationEngine.bundled import resolve_model_folder

        try:
            resolve_model_folder(None)
            return SegmenterParameters()
        except ArtefactError:
            import tempfile

            from HRpQCTSegmentationEngine.model import build_model, save_model
            from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

            self.delayDisplay("No bundled model in this build: testing the flow with an "
                              "untrained tiny model (its result is meaningless).")
            folder = tempfile.mkdtemp(prefix="hrpqct-selftest-model-")
            save_model(build_model("b0", seed=1).eval(), folder,
                       preprocessing=PreprocessingConfig(crop_yx=(256, 256), input_yx=(64, 64)))
            return SegmenterParameters(model="folder", model_folder=folder, device="cpu")

    def test_whole_flow(self):
        from HRpQCTCore import regions, slicer_bridge
        from HRpQCTCore.errors import CancelledError
        from HRpQCTCore.slicer_bridge import OutputState
        from HRpQCTSegmenterLib.slicer_segmenter import CANCEL, NEW_NODE

        missing = missing_dependencies(segmenter_dependencies())
        if missing:  # a self-test never installs packages on the machine it runs on
            self.skipWithMessage(
                "Whole-flow test skipped: it needs "
                + ", ".join(d.requirement for d in missing) + ", which are not installed. "
                "Press Apply in the module once to install them, then run the test again.")
            return
        logic = HRpQCTSegmenterLogic()
        self.delayDisplay("Sample scan (generated phantom, checksum verified)")
        volume = logic.loadSampleScan()
        parameters = self._modelParameters()

        self.delayDisplay("Segmenting in the background process")
        segmentation = logic.process(volume, None, parameters, timeoutSeconds=1800)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(),
                         len(regions.REGIONS))
        for index, region in enumerate(regions.REGIONS):
            segment = segmentation.GetSegmentation().GetNthSegment(index)
            self.assertEqual(segment.GetName(), region.name)
            self.assertEqual(segment.GetTerminology(), region.terminology.to_slicer_tag())
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(segmentation)),
                         shNode.GetItemParent(shNode.GetItemByDataNode(volume)))

        self.delayDisplay("An edit, then a re-run that must not overwrite it")
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        mask[:, :20, :20] = 1 - mask[:, :20, :20]
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segmentId, volume)
        self.assertEqual(slicer_bridge.output_state(segmentation), OutputState.EDITED)
        edited = slicer_bridge.segmentation_fingerprint(segmentation)
        with self.assertRaises(CancelledError):
            logic.process(volume, segmentation, parameters, confirmReplace=lambda n, s: CANCEL)
        second = logic.process(volume, segmentation, parameters, show3D=False,
                               confirmReplace=lambda n, s: NEW_NODE, timeoutSeconds=1800)
        self.assertIsNot(second, segmentation)
        self.assertEqual(slicer_bridge.segmentation_fingerprint(segmentation), edited)

        self._radiomicsHook(volume, segmentation)
        self.delayDisplay("HRpQCTSegmenter self-test passed")

    def test_improve_the_model(self):
        """Segment -> correct two slices -> training set -> fine-tune -> select the folder."""
        import shutil
        import tempfile

        from HRpQCTCore.background.process import JobState
        from HRpQCTSegmenterLib.improve import original_result_path

        missing = missing_dependencies(FINE_TUNING_DEPENDENCIES)
        if missing:  # a self-test never installs packages on the machine it runs on
            self.skipWithMessage(
                "Improve-the-model test skipped: it needs " + ", ".join(
                    d.requirement for d in missing) + ", which are not installed. Press "
                "Fine-tune in the module once to install them, then run the test again.")
            return
        logic = HRpQCTSegmenterLogic()
        volume = logic.loadSampleScan()
        parameters = self._modelParameters()
        segmentation = logic.process(volume, None, parameters, show3D=False,
                                     timeoutSeconds=1800)
        self.assertIsNotNone(original_result_path(segmentation))

        self.delayDisplay("Correcting slices 1 and 2, then adding them to a training set")
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        mask[1:3, :20, :20] = 1 - mask[1:3, :20, :20]
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segmentId, volume)
        folder = tempfile.mkdtemp(prefix="hrpqct-selftest-training-")
        try:
            row = logic.addToTrainingSet(folder, volume, segmentation)
            self.assertEqual(row["slices"], "1-2")
            summary = logic.trainingSetSummary(folder)
            self.assertEqual((summary.scans, summary.corrected_slices), (1, 2))

            self.delayDisplay("Fine-tuning in the background process (a few steps)")
            run = logic.startFineTuning(folder, parameters, extra=[
                "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
                "--crop-px", "32", "--warmup-steps", "1"])
            self.assertEqual(run.wait(1800), JobState.SUCCEEDED, run.message)
            parameterNode = logic.getParameterNode()
            previous = (parameterNode.model, parameterNode.modelFolder)
            logic.selectModel(parameterNode, run.output_dir)
            self.assertEqual((parameterNode.model, parameterNode.modelFolder),
                             ("folder", str(run.output_dir)))
            parameterNode.model, parameterNode.modelFolder = previous
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Improve-the-model test passed")

    def _radiomicsHook(self, volume, segmentation):
        """Edited segmentation -> HRpQCTRadiomics -> table -> CSV -> probability.

        The region with the most voxels on two slices keeps it quick (an untrained test model
        may leave some regions empty). The probability comes from the radiomics self-test's
        tiny classifier of that region, trained on synthetic numbers: the bundled classifier
        needs its own regions, which an untrained test model may leave empty.
        """
        import tempfile

        import numpy as np

        import HRpQCTRadiomics
        from HRpQCTCore import regions, slicer_bridge
        from HRpQCTRadiomicsLib.dependencies import RADIOMICS_DEPENDENCIES

        missing = missing_dependencies(RADIOMICS_DEPENDENCIES)
        if missing:
            self.skipWithMessage("Radiomics step skipped: it needs " + ", ".join(
                d.requirement for d in missing) + ", which are not installed. Press Apply in "
                "the HR-pQCT Radiomics module once to install them.")
            return
        from HRpQCTRadiomicsEngine.table import read_feature_csv
        from HRpQCTRadiomicsLib.slicer_radiomics import MODE_PREDICTION

        self.delayDisplay("Radiomics of the edited segmentation")
        labels = slicer_bridge.labels_from_segmentation_node(
            slicer.modules.segmentations.logic(), segmentation, volume)[:2]
        counts = {r: int(np.count_nonzero(labels == r.label)) for r in regions.REGIONS}
        region = max(counts, key=counts.get)
        if counts[region] == 0:
            self.delayDisplay("Radiomics step skipped: the test model found no region on the "
                              "first slices (expected of an untrained model).")
            return
        radiomicsLogic = HRpQCTRadiomics.HRpQCTRadiomicsLogic()
        parameters = radiomicsLogic.parameters(regions=[region.label], slices=[0, 1], n_jobs=1)
        table = radiomicsLogic.process(volume, segmentation, parameters)
        self.assertTrue(table is not None and table.IsA("vtkMRMLTableNode"))
        self.assertEqual(table.GetNumberOfRows(), 2)
        with tempfile.TemporaryDirectory() as folder:
            csvPath = radiomicsLogic.exportCsv(radiomicsLogic.lastRun.table,
                                               os.path.join(folder, "features.csv"))
            self.assertEqual(len(read_feature_csv(csvPath).ids), 2)
            classifier = HRpQCTRadiomics.HRpQCTRadiomicsTest.tinyClassifier(
                os.path.join(folder, "tiny.json"), region.key)
            radiomicsLogic.process(volume, segmentation, radiomicsLogic.parameters(
                mode=MODE_PREDICTION, classifier_paths=[str(classifier)], slices=[0, 1],
                n_jobs=1))
        self.assertTrue(radiomicsLogic.lastRun.probabilities)
        for row in radiomicsLogic.lastRun.probabilities:
            self.assertTrue(0.0 <= row.probability <= 1.0)
