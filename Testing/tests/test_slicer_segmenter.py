"""The HRpQCTSegmenter module's Qt-free logic: command, progress, background process, results.

The background process is real (``subprocess``): small Python scripts stand in for the
segmenter where a test is about the process handling (progress, errors, cancel, replacing
results), and one test runs the real ``hrpqct segment`` command on a tiny phantom with a tiny
randomly initialised model. Results land in a real MRML scene (``slicer-core``).
"""

from __future__ import annotations

import itertools
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _fixtures_slicer import child_report, cli_launcher

from HRpQCTCore import regions, slicer_bridge
from HRpQCTCore.background.panel import apply_button_state
from HRpQCTCore.background.process import (
    BackgroundProcess,
    JobState,
    engine_environment,
    popen_launcher,
)
from HRpQCTCore.background.protocol import (
    ProgressUpdate,
    describe_failure,
    overall_fraction,
    parse_error_line,
    parse_progress_line,
)
from HRpQCTCore.errors import ArtefactError, CancelledError, HRpQCTError
from HRpQCTCore.io.segnrrd import write_seg_nrrd
from HRpQCTCore.parameter_schema import node_fields
from HRpQCTCore.progress import PROGRESS_PREFIX
from HRpQCTCore.scan import Scan
from HRpQCTCore.slicer_bridge import OutputState
from HRpQCTSegmenterLib.parameters import (
    CALIBRATION_RANGES,
    SegmenterParameters,
    build_segment_command,
)
from HRpQCTSegmenterLib.slicer_segmenter import (
    CANCEL,
    NEW_NODE,
    REPLACE,
    SegmentationRun,
    effective_units,
    replace_question,
    run_segmentation,
    start_segmentation,
)

ENGINE_PARENT = Path(regions.__file__).resolve().parents[1]
OUTPUT_INDEX = 5  # [python, -m, HRpQCTSegmenterLib, segment, input, OUTPUT, ...]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _script_launcher(tmp_path: Path, body: str):
    """A launcher running ``body`` (Python) instead of the segmenter; argv[1] = output path."""
    script = tmp_path / "fake_segmenter.py"
    script.write_text(textwrap.dedent(body), encoding="utf-8")
    commands = []

    def launch(command, env):
        commands.append(list(command))
        return popen_launcher([sys.executable, str(script), command[OUTPUT_INDEX]], env)

    launch.commands = commands
    return launch


def _copying_launcher(tmp_path: Path, source: Path, delay_s: float = 0.0):
    """A fake segmenter printing progress and copying ``source`` to the output path."""
    return _script_launcher(tmp_path, f"""
        import json, shutil, sys, time
        for done in range(3):
            print({PROGRESS_PREFIX!r} + json.dumps(
                {{"stage": "segmenting slices", "done": done + 1, "total": 3}}), flush=True)
        time.sleep({delay_s})
        shutil.copy({str(source)!r}, sys.argv[1])
        """)


@pytest.fixture
def small_scan() -> Scan:
    """A small oblique scan geometry with some structure in the voxels."""
    angle = np.deg2rad(10.0)
    c, s = np.cos(angle), np.sin(angle)
    hu = np.random.default_rng(0).normal(0.0, 100.0, (6, 20, 24)).astype(np.float32)
    return Scan(hu=hu, spacing_mm=(0.5, 0.3, 0.2), origin_mm=(-3.0, 5.0, 2.0),
                direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


def _region_blocks(shape) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    for index, region in enumerate(regions.REGIONS):
        labels[1:5, 2 * index + 1: 2 * index + 3, 3:20] = region.label
    return labels


@pytest.fixture
def volume_in_study(mrml_scene, small_scan):
    """The scan as a volume node placed under patient/study in the subject hierarchy."""
    import slicer

    node = slicer_bridge.array_to_volume_node(mrml_scene.scene, small_scan.hu, small_scan,
                                              "scan")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    hierarchy.SetItemParent(hierarchy.CreateItem(study, node), study)
    return node, study


@pytest.fixture
def result_file(tmp_path, small_scan) -> Path:
    return write_seg_nrrd(_region_blocks(small_scan.shape), small_scan,
                          tmp_path / "result.seg.nrrd")


def _run(mrml_scene, volume, output=None, *, launcher, confirm=None, show_3d=False):
    return SegmentationRun(mrml_scene.scene, volume, output, SegmenterParameters(),
                           confirm_replace=confirm, launcher=launcher,
                           python=sys.executable, env=engine_environment(ENGINE_PARENT),
                           show_3d=show_3d).start()


def _segmentation_nodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


# ------------------------------------------------------------------------------------------
# parameters and command line
# ------------------------------------------------------------------------------------------
def test_command_line_carries_every_choice(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "hrpqct_model.json").write_text("{}")
    parameters = SegmenterParameters(units="native", model="folder", model_folder=str(model),
                                     device="gpu")
    command = build_segment_command("/opt/Slicer/bin/PythonSlicer", "in.nrrd", "out.seg.nrrd",
                                    parameters)
    assert command[:6] == ["/opt/Slicer/bin/PythonSlicer", "-m", "HRpQCTPipeline",
                           "segment", "in.nrrd", "out.seg.nrrd"]
    pairs = dict(itertools.pairwise(command))
    assert pairs["--progress"] == "machine"
    assert pairs["--units"] == "native"
    assert pairs["--model"] == str(model)
    assert pairs["--device"] in ("cuda", "mps")
    assert SegmenterParameters(device="gpu").device_argument("darwin") == "mps"
    assert SegmenterParameters(device="gpu").device_argument("linux") == "cuda"
    assert "--model" not in build_segment_command("py", "a", "b", SegmenterParameters())
    assert "--accept-unusual-scan" not in command  # refusing unusual scans is the default
    assert "--accept-unusual-scan" in build_segment_command(
        "py", "a", "b", SegmenterParameters(accept_unusual_scan=True))


def test_parameter_problems_say_what_to_do(tmp_path):
    assert SegmenterParameters().problems() == []
    with pytest.raises(ArtefactError, match="Choose the folder"):
        SegmenterParameters(model="folder").validate()
    with pytest.raises(ArtefactError, match="not a model folder"):
        SegmenterParameters(model="folder", model_folder=str(tmp_path)).validate()
    with pytest.raises(HRpQCTError, match="Unknown input units"):
        SegmenterParameters(units="kelvin").validate()
    with pytest.raises(HRpQCTError, match="Unknown device"):
        SegmenterParameters(device="tpu").validate()


def _parameter_node(**values):
    """A stand-in for the module's parameter node: its attributes, their node defaults."""
    fields = {node.node_name: node.default for node in node_fields(SegmenterParameters)}
    return SimpleNamespace(**{**fields, **values})


def test_parameters_come_from_the_parameter_node():
    assert SegmenterParameters.from_parameter_node(_parameter_node()) == SegmenterParameters()
    node = _parameter_node(inputUnits="density", model="folder", modelFolder="/m", device="cpu",
                           muScaling=4096.0, muWater=0.2347, densitySlope=1600.0,
                           densityIntercept=-390.5)
    assert SegmenterParameters.from_parameter_node(node) == SegmenterParameters(
        units="density", model="folder", model_folder="/m", device="cpu", mu_scaling=4096.0,
        mu_water=0.2347, density_slope=1600.0, density_intercept=-390.5)
    # an empty path widget gives None or "": both mean "no folder"
    assert SegmenterParameters.from_parameter_node(
        _parameter_node(modelFolder=None)).model_folder == ""


@pytest.mark.parametrize("units", ["native", "density"])
def test_command_line_carries_the_calibration_and_the_command_reads_it_back(units):
    from HRpQCTCore.cli_options import calibration_from_args
    from HRpQCTPipeline.cli import build_parser

    node = _parameter_node(inputUnits=units, muScaling=4096.0, muWater=0.23470000000000002,
                           densitySlope=1603.51904, densityIntercept=-391.209015)
    parameters = SegmenterParameters.from_parameter_node(node)
    command = build_segment_command("py", "in.nrrd", "out.seg.nrrd", parameters)
    # one "--option=value" word each, so a negative intercept is never taken for an option
    assert "--density-intercept=-391.209015" in command
    args = build_parser().parse_args(command[3:])  # what `python -m HRpQCTSegmenterLib` sees
    assert args.units == units
    calibration = calibration_from_args(args)
    assert calibration == parameters.calibration()  # exact: the values survive the text
    assert calibration.to_dict() == {"mu_scaling": 4096.0, "mu_water": 0.23470000000000002,
                                     "density_slope": 1603.51904,
                                     "density_intercept": -391.209015, "source": "user"}


@pytest.mark.parametrize("units", ["auto", "hu"])
def test_no_calibration_is_passed_for_hu_or_auto(units):
    parameters = SegmenterParameters(units=units, mu_water=-1.0)  # ignored, so no complaint
    assert parameters.problems() == [] and parameters.calibration() is None
    command = build_segment_command("py", "in.nrrd", "out.seg.nrrd", parameters)
    assert not any(part.startswith(("--mu-", "--density-")) for part in command)


def test_calibration_problems_say_what_to_do():
    low, high = CALIBRATION_RANGES["mu_water"]
    for bad in (0.0, -0.2409, high * 2, float("nan"), float("inf")):
        problems = SegmenterParameters(units="native", mu_water=bad).problems()
        assert len(problems) == 1 and "mu_water" in problems[0]
        assert "header" in problems[0] and "calibration report" in problems[0]
        with pytest.raises(HRpQCTError, match="mu_water"):
            build_segment_command("py", "a", "b", SegmenterParameters(units="native",
                                                                     mu_water=bad))
    assert SegmenterParameters(units="density", density_intercept=-391.2).problems() == []
    # every range holds the engine's defaults
    defaults = SegmenterParameters()
    for name, (low, high) in CALIBRATION_RANGES.items():
        assert low <= getattr(defaults, name) <= high


def test_apply_button_reads_cancel_while_running_and_explains_why_it_is_disabled():
    ready = apply_button_state([], running=False, ready_tooltip="go", cancel_tooltip="stop")
    assert (ready.text, ready.enabled, ready.tooltip) == ("Apply", True, "go")
    blocked = apply_button_state(["Select an input volume.", "Choose the folder."],
                                 running=False, ready_tooltip="go", cancel_tooltip="stop")
    assert not blocked.enabled and blocked.tooltip == "Select an input volume. Choose the folder."
    running = apply_button_state(["anything"], running=True, ready_tooltip="go",
                                 cancel_tooltip="stop")
    assert (running.text, running.enabled, running.tooltip) == ("Cancel", True, "stop")


def test_replace_question_names_the_segmentation_and_defaults_to_keeping_it():
    question = replace_question("scan regions", OutputState.EDITED)
    assert "'scan regions'" in question.text and "edited" in question.text
    assert [answer for _, answer in question.buttons] == [REPLACE, NEW_NODE, CANCEL]
    assert question.default == NEW_NODE
    assert "did not make" in replace_question("mine", OutputState.FOREIGN).text


def test_auto_units_follow_the_volume_attribute(mrml_scene, small_scan):
    node = slicer_bridge.array_to_volume_node(mrml_scene.scene, small_scan.hu, small_scan, "v")
    assert effective_units(SegmenterParameters(), node) == "auto"
    node.SetAttribute(slicer_bridge.VOLUME_UNITS_ATTRIBUTE, "hu")
    assert effective_units(SegmenterParameters(), node) == "hu"
    assert effective_units(SegmenterParameters(units="density"), node) == "density"


# ------------------------------------------------------------------------------------------
# parsing output and exit codes
# ------------------------------------------------------------------------------------------
def test_progress_and_error_lines_are_parsed():
    line = PROGRESS_PREFIX + '{"stage": "segmenting slices", "done": 42, "total": 168}'
    assert parse_progress_line(line) == ProgressUpdate("segmenting slices", 42, 168)
    assert parse_progress_line(PROGRESS_PREFIX + "{not json") is None
    assert parse_progress_line("INFO: segmenting") is None
    assert parse_error_line("hrpqct segment: error: Input not found: x.aim. Check the path.") \
        == "Input not found: x.aim. Check the path."
    assert parse_error_line("WARNING: error: something") is None


def test_overall_fraction_follows_the_stages_and_never_goes_back():
    first = overall_fraction(ProgressUpdate("segmenting slices", 0, 10))
    middle = overall_fraction(ProgressUpdate("segmenting slices", 5, 10), first)
    done = overall_fraction(ProgressUpdate("segmenting slices", 10, 10), middle)
    post = overall_fraction(ProgressUpdate("post-processing", 1, 3), done)
    assert 0.0 < first < middle < done < post < 1.0
    assert overall_fraction(ProgressUpdate("read", 0, 2), post) == post
    assert overall_fraction(ProgressUpdate("some new stage", 1, 2), post) == post


def test_exit_codes_become_advice():
    units = describe_failure(5, "The scan is in native units and carries no calibration.")
    assert units.startswith("The scan is in native units") and "input units" in units
    assert "model" in describe_failure(6, None)
    assert "out of memory" in describe_failure(-9, None)
    crash = describe_failure(1, None, ["Traceback ...", "ModuleNotFoundError: No module "
                                       "named 'transformers'"])
    assert "install" in crash and "transformers" in crash
    assert "bug" in describe_failure(1, None, ["Traceback", "ZeroDivisionError"])


def test_every_documented_exit_code_has_advice():
    # A code without an entry falls back to "this is a bug", which is wrong for a full disk.
    from HRpQCTCore import errors
    from HRpQCTCore.background.protocol import EXIT_CODE_ADVICE, RADIOMICS_EXIT_CODE_ADVICE

    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.HRpQCTError)}
    codes -= {7, 130}  # batches only; a cancel is reported as such, not as a failure
    assert codes <= set(EXIT_CODE_ADVICE), sorted(codes - set(EXIT_CODE_ADVICE))
    assert codes - {5} <= set(RADIOMICS_EXIT_CODE_ADVICE)
    assert "disk" in describe_failure(8, None)


# ------------------------------------------------------------------------------------------
# the background process
# ------------------------------------------------------------------------------------------
def test_background_process_reports_progress_and_success(tmp_path):
    logged = []
    script = tmp_path / "ok.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        for done in range(1, 5):
            print({PROGRESS_PREFIX!r} + json.dumps(
                {{"stage": "segmenting slices", "done": done, "total": 4}}), flush=True)
        print("WARNING: the fibula was not found", file=sys.stderr)
        """))
    job = BackgroundProcess([sys.executable, str(script)], on_log=logged.append)
    assert job.wait(timeout_s=60) == JobState.SUCCEEDED
    assert job.exit_code == 0
    assert job.progress == ProgressUpdate("segmenting slices", 4, 4)
    assert job.fraction == pytest.approx(0.80)
    assert logged == ["WARNING: the fibula was not found"]


def test_background_process_error_exit_gives_the_message_and_advice(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys\nprint('hrpqct segment: error: The scan is in native units and carries "
        "no calibration.', file=sys.stderr)\nsys.exit(5)\n")
    job = BackgroundProcess([sys.executable, str(script)])
    assert job.wait(timeout_s=60) == JobState.FAILED
    assert job.exit_code == 5
    message = job.failure_message()
    assert "native units" in message and "Choose the input units" in message


def test_cancel_terminates_a_running_process(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    job = BackgroundProcess([sys.executable, str(script)])
    assert job.poll() == JobState.RUNNING  # poll does not block
    deadline = time.monotonic() + 30
    while "started" not in job.log and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    start = time.monotonic()
    job.cancel()
    assert job.state == JobState.CANCELLED
    assert time.monotonic() - start < 10
    assert job.exit_code != 0
    assert job.failure_message().startswith("Cancelled")


# ------------------------------------------------------------------------------------------
# runs in the scene
# ------------------------------------------------------------------------------------------
def _assert_regions(node):
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(regions.REGIONS)
    for index, region in enumerate(regions.REGIONS):
        segment = segmentation.GetNthSegment(index)
        assert segment.GetName() == region.name
        assert segment.GetLabelValue() == region.label
        assert segment.GetTerminology() == region.terminology.to_slicer_tag()
        assert segment.GetColor() == pytest.approx(region.color_float, abs=1e-5)
    import slicer

    declared = segmentation.GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    assert declared, "no reference geometry"


def test_run_loads_the_result_with_regions_geometry_and_study(mrml_scene, volume_in_study,
                                                              result_file, tmp_path):
    import slicer

    volume, study = volume_in_study
    launcher = _copying_launcher(tmp_path, result_file)
    run = _run(mrml_scene, volume, launcher=launcher, show_3d=True)
    assert run.wait(timeout_s=60) == JobState.SUCCEEDED, run.message
    node = run.segmentation_node
    _assert_regions(node)
    assert node.GetName() == "scan regions"
    # Reference geometry is the input volume's grid.
    reference = slicer.vtkMRMLSegmentationNode()
    reference.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert (node.GetSegmentation().GetConversionParameter(name)
            == reference.GetSegmentation().GetConversionParameter(name))
    labels = slicer_bridge.labels_from_segmentation_node(mrml_scene.segmentations_logic, node,
                                                         volume)
    np.testing.assert_array_equal(labels, _region_blocks(volume_in_study[0].GetImageData()
                                                         .GetDimensions()[::-1]))
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene.scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    assert node.GetDisplayNode().GetVisibility3D()
    assert slicer_bridge.output_state(node) == OutputState.UNEDITED
    assert node.GetStorageNode() is None  # not tied to the deleted temporary file
    assert run.fraction == 1.0 and run.message.startswith("Done")
    # The command the module built: machine progress, the written input, units.
    command = launcher.commands[0]
    assert command[1:4] == ["-m", "HRpQCTPipeline", "segment"]
    assert "--progress" in command and command[command.index("--progress") + 1] == "machine"
    assert not Path(command[4]).exists(), "temporary input not removed"


def test_rerun_replaces_an_unedited_result_in_place(mrml_scene, volume_in_study, result_file,
                                                    tmp_path):
    volume, _ = volume_in_study
    asked = []
    first = _run(mrml_scene, volume, launcher=_copying_launcher(tmp_path, result_file))
    first.wait(60)
    node = first.segmentation_node
    second = _run(mrml_scene, volume, node, launcher=_copying_launcher(tmp_path, result_file),
                  confirm=lambda n, s: asked.append(s) or CANCEL)
    assert second.wait(60) == JobState.SUCCEEDED
    assert second.segmentation_node is node and asked == []
    assert len(_segmentation_nodes(mrml_scene.scene)) == 1


def _edit(node, volume):
    """Paint voxels of the first segment into its labelmap, as a Segment Editor stroke does."""
    from vtkmodules.util import numpy_support

    segmentation = node.GetSegmentation()
    segment_id = segmentation.GetNthSegmentID(0)
    image = segmentation.GetLayerDataObject(segmentation.GetLayerIndex(segment_id))
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    voxels[:10] = np.where(voxels[:10] == label, 0, label)  # flip: always a real change
    image.Modified()


@pytest.mark.parametrize("answer", [NEW_NODE, CANCEL, REPLACE, None])
def test_an_edited_result_is_never_replaced_without_asking(mrml_scene, volume_in_study,
                                                           result_file, tmp_path, answer):
    volume, _ = volume_in_study
    first = _run(mrml_scene, volume, launcher=_copying_launcher(tmp_path, result_file))
    first.wait(60)
    node = first.segmentation_node
    _edit(node, volume)
    assert slicer_bridge.output_state(node) == OutputState.EDITED
    edited = slicer_bridge.segmentation_fingerprint(node)
    asked = []
    confirm = None if answer is None else (lambda n, s: asked.append((n, s)) or answer)
    launcher = _copying_launcher(tmp_path, result_file)
    if answer == CANCEL:
        with pytest.raises(CancelledError, match="left unchanged"):
            _run(mrml_scene, volume, node, launcher=launcher, confirm=confirm)
        assert launcher.commands == []  # nothing was started
    else:
        run = _run(mrml_scene, volume, node, launcher=launcher, confirm=confirm)
        assert run.wait(60) == JobState.SUCCEEDED
        if answer == REPLACE:
            assert run.segmentation_node is node
            assert slicer_bridge.output_state(node) == OutputState.UNEDITED
        else:  # a new node; without a callback too (never replace silently)
            assert run.segmentation_node is not node
            assert slicer_bridge.segmentation_fingerprint(node) == edited
    if answer is not None:
        assert asked == [(node, OutputState.EDITED)]


def test_user_drawn_segmentation_counts_as_foreign(mrml_scene, volume_in_study, result_file,
                                                   tmp_path):
    volume, _ = volume_in_study
    drawn = mrml_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my drawing")
    assert slicer_bridge.output_state(drawn) == OutputState.EMPTY
    drawn.GetSegmentation().AddEmptySegment("lesion", "lesion")
    assert slicer_bridge.output_state(drawn) == OutputState.FOREIGN
    asked = []
    run = _run(mrml_scene, volume, drawn, launcher=_copying_launcher(tmp_path, result_file),
               confirm=lambda n, s: asked.append(s) or NEW_NODE)
    assert run.wait(60) == JobState.SUCCEEDED
    assert asked == [OutputState.FOREIGN]
    assert drawn.GetSegmentation().GetSegmentIdBySegmentName("lesion")


def test_edits_made_while_the_process_runs_are_protected(mrml_scene, volume_in_study,
                                                         result_file, tmp_path):
    volume, _ = volume_in_study
    first = _run(mrml_scene, volume, launcher=_copying_launcher(tmp_path, result_file))
    first.wait(60)
    node = first.segmentation_node
    asked = []
    run = _run(mrml_scene, volume, node,
               launcher=_copying_launcher(tmp_path, result_file, delay_s=1.0),
               confirm=lambda n, s: asked.append(s) or NEW_NODE)
    assert asked == []  # unedited at the start: no question
    _edit(node, volume)  # the user keeps working during the run
    assert run.wait(60) == JobState.SUCCEEDED
    assert asked == [OutputState.EDITED]
    assert run.segmentation_node is not node


@pytest.mark.parametrize("units", ["native", "density"])
def test_a_volume_in_native_or_density_units_is_converted_with_the_panel_calibration(
        mrml_scene, small_scan, tmp_path, units):
    from HRpQCTCore.scan import Calibration

    # The scanner's own constants, unlike the defaults: a wrong calibration shows.
    scanner = Calibration(mu_scaling=4096.0, mu_water=0.2347, density_slope=1600.0,
                          density_intercept=-390.5)
    hu = small_scan.hu * 3.0
    values = (np.rint(scanner.hu_to_native(hu)) if units == "native"
              else scanner.hu_to_density(hu))
    expected_hu = (scanner.native_to_hu(values) if units == "native"
                   else scanner.density_to_hu(values))
    volume = slicer_bridge.array_to_volume_node(mrml_scene.scene, values.astype(np.float32),
                                                small_scan, "scan in " + units)
    node = _parameter_node(inputUnits=units, muScaling=4096.0, muWater=0.2347,
                           densitySlope=1600.0, densityIntercept=-390.5)
    launcher = cli_launcher(tmp_path, _region_blocks(small_scan.shape))
    run = start_segmentation(mrml_scene.scene, volume, None,
                             SegmenterParameters.from_parameter_node(node), launcher=launcher,
                             python=sys.executable, env=engine_environment(ENGINE_PARENT),
                             show_3d=False)
    assert run.wait(120) == JobState.SUCCEEDED, run.message + "\n".join(run.log_lines())
    read = child_report(run)
    assert read["units"] == units and read["shape"] == list(small_scan.shape)
    assert read["hu_mean"] == pytest.approx(float(np.mean(expected_hu)), abs=0.05)
    assert read["hu_min"] == pytest.approx(float(np.min(expected_hu)), abs=0.05)
    assert read["hu_max"] == pytest.approx(float(np.max(expected_hu)), abs=0.05)
    _assert_regions(run.segmentation_node)
    # An impossible constant is refused, with what to do, before anything starts.
    with pytest.raises(HRpQCTError, match="outside"):
        run_segmentation(mrml_scene.scene, volume, None, SegmenterParameters.from_parameter_node(
            _parameter_node(inputUnits=units, muWater=0.0)), launcher=launcher)
    assert len(launcher.commands) == 1  # refused before any process started


def test_failed_run_shows_the_error_and_leaves_the_scene_alone(mrml_scene, volume_in_study,
                                                               tmp_path):
    volume, _ = volume_in_study
    launcher = _script_launcher(tmp_path, """
        import sys
        print("hrpqct segment: error: Model folder m does not exist.", file=sys.stderr)
        sys.exit(6)
        """)
    run = _run(mrml_scene, volume, launcher=launcher)
    assert run.wait(60) == JobState.FAILED
    assert "Model folder m does not exist." in run.message
    assert "hrpqct train-segmenter" in run.message
    assert _segmentation_nodes(mrml_scene.scene) == []
    assert not Path(launcher.commands[0][4]).parent.exists(), "temporary folder left"
    # The blocking call used by scripts and self-tests raises the same advice.
    with pytest.raises(HRpQCTError, match="Model folder m does not exist") as raised:
        run_segmentation(mrml_scene.scene, volume, None, launcher=launcher,
                         python=sys.executable, env=engine_environment(ENGINE_PARENT))
    assert "hrpqct train-segmenter" in str(raised.value)
    assert _segmentation_nodes(mrml_scene.scene) == []


def test_cancelled_run_leaves_the_scene_alone(mrml_scene, volume_in_study, tmp_path):
    volume, _ = volume_in_study
    launcher = _script_launcher(tmp_path, """
        import time
        print("working", flush=True)
        time.sleep(60)
        """)
    run = _run(mrml_scene, volume, launcher=launcher)
    deadline = time.monotonic() + 30
    while "working" not in run.log_lines() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    run.cancel()
    assert run.state == JobState.CANCELLED
    assert run.message.startswith("Cancelled")
    assert _segmentation_nodes(mrml_scene.scene) == []


# ------------------------------------------------------------------------------------------
# the real command
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A randomly initialised B0 with a small preprocessing (fast; its output is noise)."""
    from HRpQCTSegmentationEngine.model import build_model, save_model
    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    folder = tmp_path_factory.mktemp("tiny-model")
    save_model(build_model("b0", seed=7).eval(), folder,
               preprocessing=PreprocessingConfig(crop_yx=(128, 128), input_yx=(64, 64)))
    return folder


@pytest.mark.slow
def test_real_segment_command_in_a_background_process(mrml_scene, tiny_model_folder):
    from HRpQCTPhantom import PhantomParams, generate_phantom

    phantom = generate_phantom(PhantomParams().small(128, 4), 5)
    volume = slicer_bridge.array_to_volume_node(mrml_scene.scene, phantom.scan.hu,
                                                phantom.scan, "phantom")
    progress = []
    run = SegmentationRun(
        mrml_scene.scene, volume, None,
        # a 128 px toy phantom at 0.76 mm is no HR-pQCT scan: the plausibility check would
        # refuse it, which is what the panel's override is for
        SegmenterParameters(units="hu", model="folder", model_folder=str(tiny_model_folder),
                            device="cpu", accept_unusual_scan=True),
        python=sys.executable, env=engine_environment(ENGINE_PARENT), show_3d=False).start()
    deadline = time.monotonic() + 240
    while run.poll() == JobState.RUNNING and time.monotonic() < deadline:
        progress.append(run.fraction)
        time.sleep(0.1)
    assert run.state == JobState.SUCCEEDED, run.message + "\n".join(run.log_lines())
    assert progress == sorted(progress)
    assert run.process.progress is not None and run.process.progress.stage == "post-processing"
    node = run.segmentation_node
    _assert_regions(node)
    labels = slicer_bridge.labels_from_segmentation_node(mrml_scene.segmentations_logic, node,
                                                         volume)
    assert labels.shape == phantom.scan.shape
    assert set(np.unique(labels)) <= {0, *(r.label for r in regions.REGIONS)}
    # the process's quality report came back with the result (the status line uses it)
    assert len(run.quality["slice_uncertainty"]) == phantom.scan.shape[0]
    assert run.quality["uncertainty_signal"] == "margin"


def test_the_status_line_names_the_uncertain_slices_and_the_warnings():
    from HRpQCTSegmenterLib.slicer_segmenter import quality_notes

    quality = {"warnings": ["The fibula was not found."], "uncertainty_method": "margin",
               "uncertainty_signal": "margin", "slice_uncertainty": [0.01, 0.3, None, 0.2]}
    notes = quality_notes(quality)
    assert notes[0] == "Warning: The fibula was not found."
    assert "unsure on 2 slice(s) (1, 3;" in notes[1]
    assert quality_notes({"slice_uncertainty": [0.0, 0.01], "uncertainty_signal": "margin",
                          "uncertainty_method": "margin"}) == []
    assert quality_notes({}) == []  # an older engine that wrote no report
