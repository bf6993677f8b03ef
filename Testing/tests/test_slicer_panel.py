"""The run panel both module widgets share, driven headless with real runs.

Only the Qt side is a fake (:class:`FakeView` records what the widget would show: status
label, progress bar, error dialog, timer). The runs are real: the Segmenter's
``SegmentationRun`` in a real background process (a small script stands in for ``hrpqct
segment``) and the Radiomics module's ``RadiomicsRun`` in a real background process running
``hrpqct radiomics``, both in a real MRML scene (``slicer-core``).
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from HRpQCTCore import regions, slicer_bridge
from HRpQCTCore.background.panel import ERROR_STYLE, PanelView, RunPanel, status_style
from HRpQCTCore.background.process import JobState, engine_environment, popen_launcher
from HRpQCTCore.errors import CancelledError, HRpQCTError
from HRpQCTCore.io.segnrrd import write_seg_nrrd
from HRpQCTCore.progress import PROGRESS_PREFIX
from HRpQCTCore.scan import Scan
from HRpQCTRadiomicsLib import slicer_radiomics as sr
from HRpQCTSegmenterLib.parameters import SegmenterParameters
from HRpQCTSegmenterLib.slicer_segmenter import SegmentationRun

ENGINE_PARENT = Path(regions.__file__).resolve().parents[1]
OUTPUT_INDEX = 5  # [python, -m, HRpQCTPipeline, segment, input, OUTPUT, ...]


class FakeView:
    """What the widget's Qt calls would show, recorded."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, bool]] = []
        self.progress: list[int] = []
        self.errors: list[tuple[str, str]] = []
        self.timer_running = False
        self.refreshes = 0

    def view(self) -> PanelView:
        return PanelView(set_status=lambda text, error: self.statuses.append((text, error)),
                         set_progress=self.progress.append,
                         show_error=lambda message, details: self.errors.append(
                             (message, details)),
                         start_timer=lambda: setattr(self, "timer_running", True),
                         stop_timer=lambda: setattr(self, "timer_running", False),
                         refresh=self._refresh)

    def _refresh(self) -> None:
        self.refreshes += 1

    @property
    def status(self) -> tuple[str, bool]:
        return self.statuses[-1]


def _tick_until_stopped(panel: RunPanel, view: FakeView, timeout_s: float = 60.0) -> None:
    """Call the panel's poll as its QTimer would, until the panel stops the timer."""
    deadline = time.monotonic() + timeout_s
    while view.timer_running:
        assert time.monotonic() < deadline, "the run did not end"
        panel.poll()
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------
# segmenter runs (background process)
# ------------------------------------------------------------------------------------------
@pytest.fixture
def scan() -> Scan:
    hu = np.random.default_rng(0).normal(0.0, 100.0, (4, 16, 18)).astype(np.float32)
    return Scan(hu=hu, spacing_mm=(0.5, 0.3, 0.2))


@pytest.fixture
def volume(mrml_scene, scan):
    return slicer_bridge.array_to_volume_node(mrml_scene.scene, scan.hu, scan, "scan")


def _segmenter(tmp_path: Path, body: str):
    """A stand-in for ``hrpqct segment`` running ``body``; argv[1] is the output path."""
    script = tmp_path / "segmenter.py"
    script.write_text(textwrap.dedent(body), encoding="utf-8")

    def launch(command, env):
        return popen_launcher([sys.executable, str(script), command[OUTPUT_INDEX]], env)

    return launch


def _starter(mrml_scene, volume, launcher):
    """What the Segmenter widget's ``startRun`` does, with the launcher injected."""
    def start():
        return SegmentationRun(mrml_scene.scene, volume, None, SegmenterParameters(),
                               launcher=launcher, python=sys.executable,
                               env=engine_environment(ENGINE_PARENT), show_3d=False).start()
    return start


def test_a_successful_run_shows_progress_then_the_result(mrml_scene, volume, scan, tmp_path):
    labels = np.zeros(scan.shape, dtype=np.uint8)
    labels[1:3, 4:9, 4:9] = regions.REGIONS[0].label
    result = write_seg_nrrd(labels, scan, tmp_path / "result.seg.nrrd")
    launcher = _segmenter(tmp_path, f"""
        import json, shutil, sys, time
        for done in range(1, 4):
            print({PROGRESS_PREFIX!r} + json.dumps(
                {{"stage": "segmenting slices", "done": done, "total": 3}}), flush=True)
            time.sleep(0.1)
        shutil.copy({str(result)!r}, sys.argv[1])
        """)
    fake, shown = FakeView(), []
    panel = RunPanel(fake.view(), on_success=shown.append)
    assert not panel.running
    assert panel.button_state([], ready_tooltip="go", cancel_tooltip="stop").text == "Apply"

    panel.apply(_starter(mrml_scene, volume, launcher))
    assert panel.running and fake.timer_running and fake.refreshes == 1
    assert fake.status == ("Starting the segmenter...", False)
    assert panel.button_state([], ready_tooltip="go", cancel_tooltip="stop").text == "Cancel"
    run = panel.run
    _tick_until_stopped(panel, fake)

    assert not panel.running and fake.refreshes == 2 and fake.errors == []
    assert shown == [run] and run.state == JobState.SUCCEEDED
    assert run.segmentation_node is not None
    assert fake.status == (run.message, False) and run.message.startswith("Done in")
    assert any(text.startswith("Segmenting slices: ") for text, _ in fake.statuses)
    assert fake.progress[0] == 0 and fake.progress[-1] == 100
    assert fake.progress == sorted(fake.progress)


def test_a_failed_run_shows_the_message_and_the_log(mrml_scene, volume, tmp_path):
    launcher = _segmenter(tmp_path, """
        import sys
        print("reading the model", flush=True)
        print("hrpqct segment: error: The model folder is damaged.", file=sys.stderr)
        sys.exit(6)
        """)
    fake = FakeView()
    panel = RunPanel(fake.view(), on_success=lambda run: pytest.fail("not a success"))
    panel.apply(_starter(mrml_scene, volume, launcher))
    _tick_until_stopped(panel, fake)
    [(message, details)] = fake.errors
    assert "The model folder is damaged." in message and "hrpqct train-segmenter" in message
    assert "reading the model" in details
    assert fake.status == (message, True)


def test_cancel_stops_the_run_and_says_so(mrml_scene, volume, tmp_path):
    launcher = _segmenter(tmp_path, """
        import time
        print("working", flush=True)
        time.sleep(60)
        """)
    fake = FakeView()
    panel = RunPanel(fake.view(), on_success=lambda run: pytest.fail("not a success"))
    panel.apply(_starter(mrml_scene, volume, launcher))
    run = panel.run
    deadline = time.monotonic() + 30
    while "working" not in run.log_lines():
        assert time.monotonic() < deadline
        panel.poll()
        time.sleep(0.02)
    started = time.monotonic()
    panel.apply(_starter(mrml_scene, volume, launcher))  # Apply reads Cancel: it cancels
    assert time.monotonic() - started < 5
    assert ("Cancelling...", False) in fake.statuses
    assert not panel.running and not fake.timer_running
    assert run.state == JobState.CANCELLED and fake.errors == []
    assert fake.status == (run.message, False) and run.message.startswith("Cancelled")
    assert fake.progress[-1] == 0


def test_a_run_that_does_not_start_says_why(mrml_scene, volume):
    fake = FakeView()
    panel = RunPanel(fake.view(), on_success=lambda run: None)

    def declined():
        raise CancelledError("Cancelled: segmentation 'mine' was left unchanged.")

    assert not panel.start(declined)
    assert fake.status == ("Cancelled: segmentation 'mine' was left unchanged.", False)

    def invalid():
        SegmenterParameters(model="folder").validate()

    assert not panel.start(invalid)
    [(message, details)] = fake.errors
    assert "Choose the folder" in message and details == ""
    assert fake.status == (message, True)

    assert not panel.start(lambda: None)  # the starter set its own status and declined
    assert not panel.running and not fake.timer_running and fake.refreshes == 0
    with pytest.raises(HRpQCTError, match="Select an input volume"):
        SegmentationRun(mrml_scene.scene, None)


def test_a_run_that_raises_while_polled_ends_with_an_error(mrml_scene, volume, scan, tmp_path):
    # The result is loaded in the timer's tick; a question that raises there (here: the
    # "replace your edits?" dialog) must end the run with an error, not raise every tick.
    labels = np.zeros(scan.shape, dtype=np.uint8)
    labels[1:3, 4:9, 4:9] = regions.REGIONS[0].label
    result = write_seg_nrrd(labels, scan, tmp_path / "result.seg.nrrd")
    target = slicer_bridge.labels_to_segmentation_node(
        mrml_scene.scene, mrml_scene.segmentations_logic, labels, scan, name="earlier")
    slicer_bridge.mark_as_generated(target, volume)
    launcher = _segmenter(tmp_path, f"""
        import shutil, sys, time
        time.sleep(0.3)
        shutil.copy({str(result)!r}, sys.argv[1])
        """)

    def broken_dialog(node, state):
        raise RuntimeError("the dialog could not be shown")

    fake = FakeView()
    panel = RunPanel(fake.view(), on_success=lambda run: pytest.fail("not a success"))
    panel.start(lambda: SegmentationRun(
        mrml_scene.scene, volume, target, SegmenterParameters(), confirm_replace=broken_dialog,
        launcher=launcher, python=sys.executable, env=engine_environment(ENGINE_PARENT),
        show_3d=False).start())
    run = panel.run
    seg = target.GetSegmentation()
    seg.GetSegment(seg.GetNthSegmentID(0)).SetName("edited while it ran")
    _tick_until_stopped(panel, fake)
    [(message, _)] = fake.errors
    assert "the dialog could not be shown" in message and fake.status == (message, True)
    assert run.state == JobState.FAILED and not panel.running
    assert panel.poll() is None  # nothing left to poll


def test_runs_start_not_started(mrml_scene, volume):
    run = SegmentationRun(mrml_scene.scene, volume, None, SegmenterParameters())
    assert run.state == JobState.NOT_STARTED and not run.state.active


# ------------------------------------------------------------------------------------------
# radiomics runs (background process): the same panel
# ------------------------------------------------------------------------------------------
def test_the_radiomics_run_goes_through_the_same_panel(mrml_scene, radiomics_scan):
    scan = Scan(hu=radiomics_scan.hu, spacing_mm=radiomics_scan.spacing_mm)
    volume = slicer_bridge.array_to_volume_node(mrml_scene.scene, scan.hu, scan, "crop")
    segmentation = slicer_bridge.labels_to_segmentation_node(
        mrml_scene.scene, mrml_scene.segmentations_logic, radiomics_scan.regions, scan,
        reference_volume_node=volume)
    adipose = regions.region_by_name("adipose")
    parameters = sr.RadiomicsParameters(regions=[adipose.label], slices=[0], n_jobs=1)
    fake, shown = FakeView(), []
    panel = RunPanel(fake.view(), on_success=shown.append,
                     cancelling_text="Cancelling...")
    assert panel.start(lambda: sr.start_radiomics(
        mrml_scene.scene, mrml_scene.segmentations_logic, volume, segmentation, parameters))
    _tick_until_stopped(panel, fake, timeout_s=120)
    [run] = shown
    assert run.state == JobState.SUCCEEDED and fake.errors == []
    assert run.table_node.GetNumberOfRows() == 1
    assert fake.status == (run.message, False) and fake.progress[-1] == 100
    assert run.process.command[2:4] == ["HRpQCTPipeline", "radiomics"]  # a real child


def test_status_style_marks_errors():
    assert status_style(True) == ERROR_STYLE and "color" in ERROR_STYLE
    assert status_style(False) == ""
