"""3D Slicer module (hidden): reads Scanco HR-pQCT ``.AIM``/``.ISQ`` files dropped on Slicer.

Slicer finds a scripted file reader by its name: in a scripted module file ``<Module>.py``
(listed in the CMake ``MODULE_PYTHON_SCRIPTS``), a class ``<Module>FileReader`` is registered
with Slicer's IO manager when the module is set up. This module exists only for that (it is
hidden, like the readers of other extensions); its test loads a written AIM file.

The reading itself is the engine's (``HRpQCTCore.io.read_scan`` through
``slicer_bridge.load_scan_file``: HU, header geometry, no patient fields), tested in CI
against Slicer's real data model.
"""

import logging
import os

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

#: ``fileType`` of the reader, e.g. ``slicer.util.loadNodeFromFile(path, SCANCO_FILE_TYPE)``.
SCANCO_FILE_TYPE = "HRpQCTScancoFile"


class HRpQCTScancoImport(ScriptedLoadableModule):
    """Hidden module registering the Scanco file reader."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "HR-pQCT Scanco import"
        self.parent.categories = ["Informatics"]
        # The reader asks HRpQCTSegmenter's logic to install aimio-py on first use.
        self.parent.dependencies = ["HRpQCTSegmenter"]
        self.parent.contributors = ["HRpQCTSegmenter contributors"]
        self.parent.helpText = (
            "Loads Scanco HR-pQCT .AIM and .ISQ files (also with a ';1' version suffix) as "
            "volumes in Hounsfield units, with the voxel size and position of the header. "
            "Patient fields of the header are not copied. Needs Slicer 5.10 or newer.")
        self.parent.acknowledgementText = (
            "For research use only; not for clinical use. The extension's bundled models were "
            "trained on synthetic phantoms. Reading uses the aimio-py package.")
        self.parent.hidden = True


class HRpQCTScancoImportFileReader:
    """Loads Scanco AIM/ISQ files as scalar volumes in HU (Slicer finds it by its name)."""

    def __init__(self, parent):
        self.parent = parent

    def description(self):
        return "Scanco HR-pQCT image (HU)"

    def fileType(self):
        return SCANCO_FILE_TYPE

    def extensions(self):
        from HRpQCTCore.slicer_bridge import SCANCO_NAME_FILTERS

        return list(SCANCO_NAME_FILTERS)

    def canLoadFile(self, filePath):
        from HRpQCTCore.slicer_bridge import is_scanco_file

        return is_scanco_file(filePath)

    def canLoadFileConfidence(self, filePath):
        # Above the default (0.5 + 0.01 per extension character) of generic readers.
        return 0.8 if self.canLoadFile(filePath) else 0.0

    def load(self, properties):
        filePath = properties["fileName"]
        try:
            from HRpQCTCore import slicer_bridge
            from HRpQCTCore.background.dependencies import SCANCO_DEPENDENCIES
            from HRpQCTSegmenter import HRpQCTSegmenterLogic

            if not HRpQCTSegmenterLogic().ensureDependencies(SCANCO_DEPENDENCIES):
                raise RuntimeError("Reading Scanco files needs the 'aimio-py' Python package, "
                                   "whose installation was declined.")
            volumeNode, warnings = slicer_bridge.load_scan_file(
                slicer.mrmlScene, filePath, name=properties.get("name"))
        except Exception as exc:
            logging.error(f"HRpQCTScancoImport: {filePath}: {exc}")
            self.parent.userMessages().AddMessage(vtk.vtkCommand.ErrorEvent,
                                                  f"Cannot load {filePath}: {exc}")
            return False
        for warning in warnings:
            self.parent.userMessages().AddMessage(vtk.vtkCommand.WarningEvent, warning)
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        self.parent.loadedNodes = [volumeNode.GetID()]
        return True


class HRpQCTScancoImportTest(ScriptedLoadableModuleTest):
    """Self-test: an AIM written by the engine loads through Slicer's IO manager in HU."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_scanco_file_loads_in_hu()

    def test_scanco_file_loads_in_hu(self):
        import tempfile

        import numpy as np

        from HRpQCTCore import io, slicer_bridge
        from HRpQCTCore.background.dependencies import SCANCO_DEPENDENCIES, missing_dependencies
        from HRpQCTPhantom import PhantomParams, generate_phantom

        missing = missing_dependencies(SCANCO_DEPENDENCIES)
        if missing:  # a self-test never installs packages on the machine it runs on
            message = ("Scanco reader test skipped: it needs "
                       + ", ".join(d.requirement for d in missing) + ", which is not "
                       "installed. Drop an .AIM file on Slicer once to install it, then run the "
                       "test again.")
            logging.warning(f"HRpQCTScancoImport self-test: {message}")
            self.delayDisplay(message)
            return
        scan = generate_phantom(PhantomParams().small(200, 4), 3).scan
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "PHANTOM.AIM")
            io.write_scan_aim(scan, path)
            node = slicer.util.loadNodeFromFile(path, SCANCO_FILE_TYPE)
        self.assertIsNotNone(node)
        loaded = slicer.util.arrayFromVolume(node)
        self.assertEqual(loaded.shape, scan.shape)
        self.assertLess(float(np.abs(loaded - scan.hu).max()), 2.0)  # native int16 rounding
        self.assertAlmostEqual(node.GetSpacing()[0], scan.spacing_mm[2], places=4)
        self.assertEqual(node.GetAttribute(slicer_bridge.VOLUME_UNITS_ATTRIBUTE), "hu")
        self.delayDisplay("HRpQCTScancoImport self-test passed")
