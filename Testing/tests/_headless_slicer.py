"""Headless Slicer data model: a real MRML scene with the module logics the modules use.

Built from the ``slicer-core`` package (Slicer's Qt-free C++ libraries). It has no
``slicer.app``, ``slicer.modules``, ``qt`` or ``ctk``, so the set-up Slicer's application does at
start-up is done here by hand:

* the application logic gets the scene and default colour nodes (the Colors logic needs the
  application logic *before* the scene, otherwise it cannot find its default colour files);
* every module logic gets the application logic and the scene (the Segmentations logic cannot
  create labelmap representations without a scene);
* the Terminologies logic gets a share folder holding our ``.term.json`` (Slicer's own default
  lists are not part of slicer-core; their "failed to load" messages are silenced while the
  logic starts, and our context is loaded as a user context).

No pytest here: the Slicer-like CI run (``Testing/slicer_like/run_flows.py``) uses it in an
environment holding only what Slicer and the modules' declarations install.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["HeadlessSlicer", "build_headless_slicer"]


@dataclass
class HeadlessSlicer:
    """A scene and the module logics of a headless Slicer (see module docstring)."""

    scene: Any
    application_logic: Any
    colors_logic: Any
    terminologies_logic: Any
    segmentations_logic: Any
    volumes_logic: Any
    tables_logic: Any
    subject_hierarchy_logic: Any
    terminology_share_dir: Path

    def loaded_terminology_names(self) -> list[str]:
        """Names of the terminology contexts the Terminologies logic has loaded."""
        import vtk

        names = vtk.vtkStringArray()
        self.terminologies_logic.GetLoadedTerminologyNames(names)
        return [names.GetValue(i) for i in range(names.GetNumberOfValues())]


def _quiet_vtk_errors():
    """Context manager silencing VTK's logger (used while logics look for absent defaults)."""
    from contextlib import contextmanager

    import vtk

    @contextmanager
    def quiet():
        previous = vtk.vtkLogger.GetCurrentVerbosityCutoff()
        vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
        try:
            yield
        finally:
            vtk.vtkLogger.SetStderrVerbosity(previous)

    return quiet()


def build_headless_slicer(share_dir: Path) -> HeadlessSlicer:
    """Create a scene, the application logic and the module logics (see module docstring)."""
    import slicer

    from HRpQCTCore import regions

    share_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(regions.terminology_file_path(), share_dir / regions.TERMINOLOGY_FILE)

    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkSlicerApplicationLogic()
    application_logic.SetMRMLScene(scene)

    def start(logic: Any) -> Any:
        logic.SetMRMLApplicationLogic(application_logic)
        logic.SetMRMLScene(scene)
        return logic

    with _quiet_vtk_errors():
        # In slicer-core, slicer.vtkSlicerColorsModuleLogic etc. are the *modules*; the logic
        # classes are named vtkSlicerColorLogic, vtkSlicerVolumesLogic, vtkSlicerTablesLogic.
        colors_logic = start(slicer.vtkSlicerColorLogic())
        terminologies_logic = slicer.vtkSlicerTerminologiesModuleLogic()
        terminologies_logic.SetModuleShareDirectory(str(share_dir))
        terminologies_logic.SetUserContextsPath(str(share_dir))
        start(terminologies_logic)
    application_logic.SetColorLogic(colors_logic)
    headless = HeadlessSlicer(
        scene=scene,
        application_logic=application_logic,
        colors_logic=colors_logic,
        terminologies_logic=terminologies_logic,
        segmentations_logic=start(slicer.vtkSlicerSegmentationsModuleLogic()),
        volumes_logic=start(slicer.vtkSlicerVolumesLogic()),
        tables_logic=start(slicer.vtkSlicerTablesLogic()),
        subject_hierarchy_logic=start(slicer.vtkSlicerSubjectHierarchyModuleLogic()),
        terminology_share_dir=share_dir,
    )
    for name, logic in (("Colors", colors_logic), ("Terminologies", terminologies_logic),
                        ("Segmentations", headless.segmentations_logic),
                        ("Volumes", headless.volumes_logic), ("Tables", headless.tables_logic),
                        ("SubjectHierarchy", headless.subject_hierarchy_logic)):
        application_logic.SetModuleLogic(name, logic)
    return headless
