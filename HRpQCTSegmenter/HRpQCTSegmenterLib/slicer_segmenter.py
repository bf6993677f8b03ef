"""One segmentation run of the Slicer module: volume node in, segmentation node out, no Qt.

:class:`SegmentationRun` is the Qt-free core of the HRpQCTSegmenter module's Apply button:

1. decide where the result goes; a segmentation the user edited (or drew) is never replaced
   without asking (``confirm_replace`` callback; without one, a new node is made instead);
2. write the input volume to a temporary NRRD with Slicer's volume writer;
3. start ``hrpqct segment ... --progress machine`` in a background process
   (:class:`~HRpQCTCore.background.process.BackgroundProcess`: its own process group, so
   cancel stops the whole tree; the launcher is injectable);
4. on :meth:`SegmentationRun.poll` (the module calls it from a ``QTimer``) collect progress;
   when the process succeeds, load the ``.seg.nrrd`` into the segmentation node (seven
   segments with names, colours and terminology), set the input as reference geometry, put
   the node under the input's study in the subject hierarchy, show it in 3D and record its
   fingerprint, so the next run can tell whether the user edited it; with ``keep_original_in``
   a copy of the ``.seg.nrrd`` goes there, recorded on the node, so the slices the user
   corrects can be found later (:func:`.improve.keep_original_result`);
5. always remove the temporary files.

The scene is passed in, so the same code runs in Slicer and in tests with ``slicer-core``.
MRML access goes through :mod:`.slicer_bridge`. The module's Logic calls
:func:`start_segmentation` (Apply) and :func:`run_segmentation` (scripts, self-tests);
:func:`replace_question` is the text of its "replace an edited segmentation?" dialog.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from HRpQCTCore import slicer_bridge
from HRpQCTCore.background.process import (
    BackgroundProcess,
    JobState,
    Launcher,
    ProcessRun,
    engine_environment,
    module_folders,
    popen_launcher,
    python_executable,
)
from HRpQCTCore.background.protocol import LOADING_SPAN
from HRpQCTCore.errors import CancelledError, HRpQCTError
from HRpQCTCore.slicer_bridge import OutputState
from HRpQCTSegmenterLib.parameters import SegmenterParameters, build_segment_command

__all__ = ["REPLACE", "NEW_NODE", "CANCEL", "ConfirmReplace", "SegmentationRun",
           "effective_units", "start_segmentation", "run_segmentation", "ReplaceQuestion",
           "replace_question"]

#: Answers of the ``confirm_replace`` callback.
REPLACE, NEW_NODE, CANCEL = "replace", "new", "cancel"
#: ``confirm_replace(segmentation_node, state) -> REPLACE | NEW_NODE | CANCEL``; ``state`` is
#: :attr:`OutputState.EDITED` or :attr:`OutputState.FOREIGN`.
ConfirmReplace = Callable[[Any, str], str]

_ENGINE_PARENT_DIR = Path(__file__).resolve().parent.parent


def effective_units(parameters: SegmenterParameters, volume_node: Any) -> str:
    """The units to pass on: ``auto`` becomes the volume's recorded units when it has them."""
    if parameters.units == "auto" and volume_node is not None:
        recorded = volume_node.GetAttribute(slicer_bridge.VOLUME_UNITS_ATTRIBUTE)
        if recorded:
            return recorded
    return parameters.units


class SegmentationRun(ProcessRun):
    """Segment one volume node in a background process (see module docstring).

    Parameters
    ----------
    scene:
        The MRML scene.
    input_volume_node:
        The scan (scalar volume node).
    output_segmentation_node:
        Segmentation node to fill, or None for a new one.
    parameters:
        Units, model and device.
    confirm_replace:
        Asked before replacing a segmentation the user edited or made; None means "never
        replace: make a new node".
    launcher, python, env:
        How the process starts (defaults: ``subprocess.Popen`` of ``PythonSlicer``, with the
        engine on ``PYTHONPATH``).
    show_3d:
        Build the closed-surface representation so the result shows in 3D views.
    on_log:
        Called with each line the process prints (besides progress lines).
    keep_original_in:
        Folder that receives a copy of the result as the segmenter made it (the "Improve the
        model" section compares the corrected segmentation with it); None: no copy.
    """

    def __init__(self, scene: Any, input_volume_node: Any, output_segmentation_node: Any = None,
                 parameters: SegmenterParameters | None = None, *,
                 confirm_replace: ConfirmReplace | None = None,
                 launcher: Launcher = popen_launcher, python: str | None = None,
                 env: Mapping[str, str] | None = None, show_3d: bool = True,
                 on_log: Callable[[str], None] | None = None,
                 keep_original_in: str | Path | None = None) -> None:
        if input_volume_node is None:
            raise HRpQCTError("Select an input volume (an HR-pQCT scan).")
        self.scene = scene
        self.input_volume_node = input_volume_node
        self.parameters = parameters or SegmenterParameters()
        self.parameters.validate()
        self._confirm_replace = confirm_replace
        self._launcher = launcher
        self._python = python or python_executable()
        self._env = env
        self._show_3d = show_3d
        self._on_log = on_log
        self._keep_original_in = keep_original_in
        self.target_node = self._choose_target(output_segmentation_node)
        self._target_fingerprint = (slicer_bridge.segmentation_fingerprint(self.target_node)
                                    if self.target_node is not None else None)
        self.segmentation_node: Any = None
        self.process: BackgroundProcess | None = None
        self.state = JobState.NOT_STARTED
        self.message = ""
        #: The process's quality report (``hrpqct segment --qc-json``), once loaded.
        self.quality: dict[str, Any] = {}
        self._work_dir: Path | None = None

    # -- choosing the output ---------------------------------------------------------------
    def _ask(self, node: Any, state: str) -> str:
        if self._confirm_replace is None:
            return NEW_NODE
        answer = self._confirm_replace(node, state)
        if answer not in (REPLACE, NEW_NODE, CANCEL):
            raise ValueError(f"confirm_replace returned {answer!r}")
        return answer

    def _choose_target(self, node: Any) -> Any:
        state = slicer_bridge.output_state(node)
        if state not in OutputState.NEEDS_CONSENT:
            return node
        answer = self._ask(node, state)
        if answer == CANCEL:
            raise CancelledError(
                f"Cancelled: segmentation {node.GetName()!r} was left unchanged.")
        return node if answer == REPLACE else None

    # -- running ---------------------------------------------------------------------------
    @property
    def output_path(self) -> Path:
        """The ``.seg.nrrd`` the process writes."""
        assert self._work_dir is not None, "start() first"
        return self._work_dir / "regions.seg.nrrd"

    def command(self, input_path: Path) -> list[str]:
        """The command line for ``input_path`` (units resolved from the volume node)."""
        parameters = replace(self.parameters,
                             units=effective_units(self.parameters, self.input_volume_node))
        return build_segment_command(self._python, input_path, self.output_path, parameters,
                                     qc_json=self.qc_path)

    @property
    def qc_path(self) -> Path:
        """The quality report the process writes beside the result (confidence, uncertainty
        and warnings per slice)."""
        assert self._work_dir is not None, "start() first"
        return self._work_dir / "qc.json"

    def start(self) -> SegmentationRun:
        """Write the input and start the background process; returns self."""
        self._work_dir = Path(tempfile.mkdtemp(prefix="hrpqct-segment-"))
        try:
            input_path = self._work_dir / "input.nrrd"
            slicer_bridge.write_volume_node(self.input_volume_node, input_path)
            # Both module folders: building the command line imports the radiomics engine too.
            env = self._env if self._env is not None else engine_environment(
                module_folders(_ENGINE_PARENT_DIR))
            self.process = BackgroundProcess(self.command(input_path), env,
                                             launcher=self._launcher, on_log=self._on_log)
        except BaseException:
            self._cleanup()
            raise
        self.state = JobState.RUNNING
        self.message = "Starting the segmenter..."
        return self

    @property
    def fraction(self) -> float:
        """Fraction of the run done, for the progress bar."""
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return self.process.fraction if self.process is not None else 0.0

    def status_text(self) -> str:
        """A short line for the status label."""
        if self.state != JobState.RUNNING or self.process is None:
            return self.message
        update = self.process.progress
        if update is None:
            return self.message
        return f"{update.stage[:1].upper()}{update.stage[1:]}: {update.done} of {update.total}"

    def poll(self) -> JobState:
        """Collect progress; load the result when the process has succeeded. Never blocks
        on the process (loading the result takes a moment in the caller's thread)."""
        if self.process is None or self.state.finished:
            return self.state
        state = self.process.poll()
        if state == JobState.RUNNING:
            return self.state
        try:
            if state == JobState.SUCCEEDED:
                self._load_result()
            else:
                self.state = state
                self.message = self.process.failure_message()
        except BaseException as exc:  # e.g. the replace question raised: end, do not retry
            self.state = JobState.FAILED
            self.message = f"The segmentation finished but its result was not loaded: {exc}"
            raise
        finally:
            self._cleanup()
        return self.state

    # -- the result ------------------------------------------------------------------------
    def _load_result(self) -> None:
        self.state = JobState.LOADING
        self.message = "Loading the result..."
        target = self.target_node
        if target is not None and target.GetScene() is None:
            target = None  # the user deleted the node while the process ran
        if target is not None and (
                slicer_bridge.segmentation_fingerprint(target) != self._target_fingerprint):
            # Edited while the process ran: ask again rather than losing the new edits.
            answer = self._ask(target, OutputState.EDITED)
            if answer == CANCEL:
                self.state = JobState.CANCELLED
                self.message = (f"Cancelled: segmentation {target.GetName()!r} was left "
                                "unchanged.")
                return
            target = target if answer == REPLACE else None
        name = f"{self.input_volume_node.GetName()} regions"
        try:
            node = slicer_bridge.read_segmentation_file(self.scene, self.output_path, target,
                                                        name=name)
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.input_volume_node)
            slicer_bridge.place_in_subject_hierarchy(node, self.input_volume_node)
            if self._show_3d:
                slicer_bridge.show_in_3d(node)
            slicer_bridge.mark_as_generated(node, self.input_volume_node)
        except Exception as exc:  # a broken output must show as an error, not a traceback
            self.state = JobState.FAILED
            self.message = (f"The segmentation finished but its result could not be loaded: "
                            f"{exc}. Please report this with the log.")
            return
        self.segmentation_node = node
        self.state = JobState.SUCCEEDED
        seconds = self.process.seconds if self.process is not None else 0.0
        self.quality = read_quality(self.qc_path)
        self.message = " ".join([f"Done in {seconds:.0f} s: {node.GetName()}.",
                                 *quality_notes(self.quality), *self._keep_original(node)])
        self.process.fraction = LOADING_SPAN[1] if self.process is not None else 1.0

    def _keep_original(self, node: Any) -> list[str]:
        """Keep the result's copy for "Improve the model"; a note when that failed."""
        from HRpQCTSegmenterLib.improve import ORIGINAL_RESULT_ATTRIBUTE, keep_original_result

        if self._keep_original_in is None:  # a copy of an earlier result would now mislead
            node.RemoveAttribute(ORIGINAL_RESULT_ATTRIBUTE)
            return []
        try:
            keep_original_result(node, self.output_path, self._keep_original_in)
        except OSError as exc:  # the segmentation itself is fine
            node.RemoveAttribute(ORIGINAL_RESULT_ATTRIBUTE)
            return [f"(Its original was not kept, so it cannot be added to a training set: "
                    f"{exc}.)"]
        return []

    def _cleanup(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# what the module's Logic calls
# ------------------------------------------------------------------------------------------
def read_quality(path: Path) -> dict[str, Any]:
    """The quality report the segment command wrote, or ``{}`` when it wrote none."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def quality_notes(quality: Mapping[str, Any]) -> list[str]:
    """What the status line must say about a result: its warnings and the slices whose
    uncertainty is above the quality-control threshold (to review first), in words."""
    from HRpQCTPipeline.qc import uncertainty_summary

    notes = [f"Warning: {message}" for message in quality.get("warnings", [])]
    per_slice = quality.get("slice_uncertainty")
    if per_slice:
        summary = uncertainty_summary(quality.get("uncertainty_method", ""),
                                      [float("nan") if v is None else v for v in per_slice],
                                      quality.get("uncertainty_signal") or "")
        uncertain = (summary or {}).get("uncertain_slices", [])
        if uncertain:
            shown = ", ".join(str(i) for i in uncertain[:12]) + (" ..." if len(uncertain) > 12
                                                                  else "")
            notes.append(f"The model is unsure on {len(uncertain)} slice(s) ({shown}; "
                         "counted from 0): review them first.")
    return notes


def start_segmentation(scene: Any, input_volume_node: Any, output_segmentation_node: Any = None,
                       parameters: SegmenterParameters | None = None, *,
                       confirm_replace: ConfirmReplace | None = None,
                       on_log: Callable[[str], None] | None = None, show_3d: bool = True,
                       launcher: Launcher = popen_launcher, python: str | None = None,
                       env: Mapping[str, str] | None = None,
                       keep_original_in: str | Path | None = None) -> SegmentationRun:
    """Start a background run (the Apply button); poll the returned run from a timer.

    Raises
    ------
    CancelledError
        When the user answered *Cancel* to replacing an edited segmentation.
    HRpQCTError
        For invalid choices (what to change is in the message).
    """
    return SegmentationRun(scene, input_volume_node, output_segmentation_node, parameters,
                           confirm_replace=confirm_replace, launcher=launcher, python=python,
                           env=env, show_3d=show_3d, on_log=on_log,
                           keep_original_in=keep_original_in).start()


def run_segmentation(scene: Any, input_volume_node: Any, output_segmentation_node: Any = None,
                     parameters: SegmenterParameters | None = None, *,
                     timeout_s: float | None = None, **options: Any) -> Any:
    """Segment to the end and return the segmentation node (scripts, batch use, self-tests).

    ``options`` are those of :func:`start_segmentation`.

    Raises
    ------
    HRpQCTError
        When the run fails or is cancelled; the message says what to do and ends with the
        last lines the process printed.
    """
    run = start_segmentation(scene, input_volume_node, output_segmentation_node, parameters,
                             **options)
    state = run.wait(timeout_s)
    if state == JobState.CANCELLED:
        raise CancelledError(run.message)
    if state != JobState.SUCCEEDED:
        raise HRpQCTError(run.message + "\n" + "\n".join(list(run.log_lines())[-20:]))
    return run.segmentation_node


@dataclass(frozen=True)
class ReplaceQuestion:
    """The dialog asking before a segmentation the user changed is replaced.

    ``buttons`` pairs each button's text with the answer it gives (:data:`REPLACE`,
    :data:`NEW_NODE`, :data:`CANCEL`); ``default`` is the answer of the default button.
    """

    title: str
    text: str
    buttons: tuple[tuple[str, str], ...]
    default: str


def replace_question(segmentation_name: str, state: str) -> ReplaceQuestion:
    """The question for a segmentation in ``state`` (:attr:`OutputState.EDITED` or
    :attr:`OutputState.FOREIGN`); keeping the user's work is the default."""
    what = ("was edited since the segmenter made it" if state == OutputState.EDITED
            else "holds segments the segmenter did not make")
    return ReplaceQuestion(
        title="Replace segmentation?",
        text=(f"Segmentation '{segmentation_name}' {what}.\n\nReplacing it loses those "
              "changes."),
        buttons=(("Replace it", REPLACE), ("Keep it, create a new segmentation", NEW_NODE),
                 ("Cancel", CANCEL)),
        default=NEW_NODE)
