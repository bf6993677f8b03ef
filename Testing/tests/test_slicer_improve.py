"""The Segmenter's "Improve the model" flow: corrected slices -> training set -> fine-tuning
in the real child process -> the new folder loads and segments.

Also the panel's flow headless: the original result kept per segmentation node by a real
``SegmentationRun`` (a script stands in for ``hrpqct segment``) in a real MRML scene
(``slicer-core``), and the fine-tuning driven by the shared run panel with a fake Qt view
(a script stands in for ``train-segmenter``)."""

import csv
from pathlib import Path

import numpy as np
import pytest

from HRpQCTCore.background.process import JobState
from HRpQCTCore.errors import HRpQCTError
from HRpQCTCore.scan import Scan
from HRpQCTSegmenterLib import improve

pytest_plugins = ["_fixtures_segmentation"]
ENGINE_PARENT = Path(improve.__file__).resolve().parents[1]


def _scan_and_regions(n_slices=6, size=64):
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    regions = np.where(r < size * 0.15, 1, np.where(r < size * 0.35, 7, 0)).astype(np.uint8)
    regions = np.repeat(regions[None], n_slices, axis=0)
    hu = np.select([regions == 1, regions == 7], [1800.0, -100.0], -1000.0).astype(np.float32)
    return Scan(hu, (0.5, 0.25, 0.25)), regions


def test_corrected_slices_are_the_ones_that_differ():
    original = np.zeros((5, 4, 4), np.uint8)
    edited = original.copy()
    edited[1, 0, 0] = 2
    edited[3] = 7
    assert improve.corrected_slices(edited, original) == [1, 3]


def test_adding_a_segmentation_writes_scan_labels_and_a_manifest_row(tmp_path):
    scan, regions = _scan_and_regions()
    original = regions.copy()
    corrected = regions.copy()
    corrected[[2, 3, 4], 30:34, 30:34] = 7
    with pytest.raises(HRpQCTError, match="No slice differs"):
        improve.add_to_training_set(tmp_path, scan, original, "s1", original)
    row = improve.add_to_training_set(tmp_path, scan, corrected, "s1", original)
    assert row["slices"] == "2-4"
    improve.add_to_training_set(tmp_path, scan, corrected, "s1", original)  # replaces the row
    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and (tmp_path / rows[0]["labels"]).is_file()
    command = improve.fine_tune_command(tmp_path, None, tmp_path / "out", python="py")
    assert command[:4] == ["py", "-m", "HRpQCTPipeline", "train-segmenter"]
    assert "bundled" in command and "machine" in command


@pytest.mark.slow
def test_fine_tune_in_the_child_process_then_segment(tmp_path, tiny_preprocessing):
    from HRpQCTSegmentationEngine.inference import run_segmentation
    from HRpQCTSegmentationEngine.model import build_model, save_model
    from HRpQCTSegmentationEngine.model_card import model_identity
    from HRpQCTSegmenterLib.parameters import SegmenterParameters

    parent = save_model(build_model("b0", seed=5), tmp_path / "parent",
                        preprocessing=tiny_preprocessing)
    scan, regions = _scan_and_regions()
    corrected = regions.copy()
    corrected[[1, 2, 3], 4:10, 4:10] = 7
    improve.add_to_training_set(tmp_path / "set", scan, corrected, "s1", regions)
    out = tmp_path / "child"
    process = improve.start_fine_tuning(
        tmp_path / "set", parent, out, device="cpu",
        extra=["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
               "--crop-px", "32", "--warmup-steps", "1"])
    state = process.wait(300)
    assert state == JobState.SUCCEEDED, process.failure_message()
    assert model_identity(out)["parent"]["name"] == "parent"
    seg = run_segmentation(scan.hu, out, device="cpu")
    assert seg.labels.shape == scan.hu.shape
    params = improve.parameters_for_model(SegmenterParameters(), out)
    assert params.model == "folder" and params.model_folder == str(out)


# ------------------------------------------------------------------------------------------
# the panel's flow with Slicer nodes (slicer-core) and the run panel (fake Qt view)
# ------------------------------------------------------------------------------------------
def _segmenter_run(mrml_scene, volume, result, cache, tmp_path, target=None, confirm=None):
    """A SegmentationRun whose child copies ``result`` (a stand-in for hrpqct segment)."""
    import sys
    import textwrap

    from HRpQCTCore.background.process import engine_environment, popen_launcher
    from HRpQCTSegmenterLib.parameters import SegmenterParameters
    from HRpQCTSegmenterLib.slicer_segmenter import SegmentationRun

    script = tmp_path / "copy_result.py"
    script.write_text(textwrap.dedent(f"""
        import shutil, sys
        shutil.copy({str(result)!r}, sys.argv[1])
        """), encoding="utf-8")

    def launch(command, env):
        return popen_launcher([sys.executable, str(script), command[5]], env)

    run = SegmentationRun(mrml_scene.scene, volume, target, SegmenterParameters(),
                          launcher=launch, python=sys.executable, show_3d=False,
                          env=engine_environment(ENGINE_PARENT), confirm_replace=confirm,
                          keep_original_in=cache).start()
    assert run.wait(60) == JobState.SUCCEEDED, run.message
    return run.segmentation_node


@pytest.fixture
def segmented(mrml_scene, tmp_path):
    """A volume node, the segmenter's result loaded into a node, its kept original."""
    from HRpQCTCore import slicer_bridge
    from HRpQCTCore.io.segnrrd import write_seg_nrrd

    scan, regions = _scan_and_regions(n_slices=5, size=24)
    volume = slicer_bridge.array_to_volume_node(mrml_scene.scene, scan.hu, scan, "knee 1")
    result = write_seg_nrrd(regions, scan, tmp_path / "result.seg.nrrd")
    node = _segmenter_run(mrml_scene, volume, result, tmp_path / "cache", tmp_path)
    return scan, regions, volume, node


def _correct(mrml_scene, node, scan, labels, tmp_path):
    """Replace the node's voxels with ``labels`` (what Segment Editor strokes amount to)."""
    from HRpQCTCore import slicer_bridge
    from HRpQCTCore.io.segnrrd import write_seg_nrrd

    path = write_seg_nrrd(labels, scan, tmp_path / "corrected.seg.nrrd")
    slicer_bridge.read_segmentation_file(mrml_scene.scene, path, node)


def test_the_original_is_kept_per_node_and_finds_the_corrected_slices(mrml_scene, segmented,
                                                                      tmp_path):
    from HRpQCTCore import slicer_bridge
    from HRpQCTCore.slicer_bridge import OutputState

    scan, regions, volume, node = segmented
    original = improve.original_result_path(node)
    assert original is not None and original.parent == tmp_path / "cache"
    assert node.GetAttribute(improve.ORIGINAL_RESULT_ATTRIBUTE) == str(original)
    # unedited: the node's labels equal the kept original voxel for voxel
    with pytest.raises(HRpQCTError, match="No slice differs"):
        improve.add_corrected_node(tmp_path / "set", mrml_scene.segmentations_logic, volume,
                                   node)
    corrected = regions.copy()
    corrected[[1, 3], 2:6, 2:6] = 7
    _correct(mrml_scene, node, scan, corrected, tmp_path)
    assert slicer_bridge.output_state(node) == OutputState.EDITED
    row = improve.add_corrected_node(tmp_path / "set", mrml_scene.segmentations_logic, volume,
                                     node)
    assert row == {"subject": "knee 1", "image": "knee_1.nii.gz",
                   "labels": "knee_1_regions.seg.nrrd", "slices": "1,3"}
    summary = improve.training_set_summary(tmp_path / "set")
    assert (summary.scans, summary.corrected_slices, summary.full_scans) == (1, 2, 0)
    assert summary.text() == "1 scan: 2 corrected slices."


def test_a_rerun_into_the_node_replaces_its_original(mrml_scene, segmented, tmp_path):
    from HRpQCTCore.io.segnrrd import write_seg_nrrd
    from HRpQCTSegmenterLib.slicer_segmenter import REPLACE

    scan, regions, volume, node = segmented
    first = improve.original_result_path(node)
    changed = regions.copy()
    changed[0] = 0
    _correct(mrml_scene, node, scan, changed, tmp_path)
    second_result = write_seg_nrrd(changed, scan, tmp_path / "second.seg.nrrd")
    again = _segmenter_run(mrml_scene, volume, second_result, tmp_path / "cache", tmp_path,
                           target=node, confirm=lambda n, s: REPLACE)
    assert again is node
    second = improve.original_result_path(node)
    assert second != first and not first.exists()
    with pytest.raises(HRpQCTError, match="No slice differs"):  # compared with the new one
        improve.add_corrected_node(tmp_path / "set", mrml_scene.segmentations_logic, volume,
                                   node)


def test_without_its_original_a_segmenter_result_is_refused(mrml_scene, segmented, tmp_path):
    from HRpQCTCore import slicer_bridge

    scan, _regions, volume, node = segmented
    improve.original_result_path(node).unlink()
    with pytest.raises(HRpQCTError, match="no longer kept"):
        improve.add_corrected_node(tmp_path / "set", mrml_scene.segmentations_logic, volume,
                                   node)
    other = slicer_bridge.array_to_volume_node(mrml_scene.scene, scan.hu, scan, "other")
    with pytest.raises(HRpQCTError, match="another volume"):
        improve.add_corrected_node(tmp_path / "set", mrml_scene.segmentations_logic, other,
                                   node)
    with pytest.raises(HRpQCTError, match="training-set folder"):
        improve.add_corrected_node("", mrml_scene.segmentations_logic, volume, node)
    assert not (tmp_path / "set").exists()


def test_a_segmentation_drawn_by_the_user_counts_whole(mrml_scene, tmp_path):
    from HRpQCTCore import slicer_bridge

    scan, regions = _scan_and_regions(n_slices=3, size=24)
    volume = slicer_bridge.array_to_volume_node(mrml_scene.scene, scan.hu, scan, "drawn")
    node = slicer_bridge.labels_to_segmentation_node(
        mrml_scene.scene, mrml_scene.segmentations_logic, regions, scan)
    row = improve.add_corrected_node(tmp_path, mrml_scene.segmentations_logic, volume, node)
    assert row["slices"] == ""
    summary = improve.training_set_summary(tmp_path)
    assert summary.text() == "1 scan: 1 fully annotated."
    assert improve.training_set_summary(tmp_path / "none").text() == "The training set is empty."


def test_new_model_folders_never_collide(tmp_path):
    first = improve.next_model_folder(tmp_path, now=0.0)
    assert first.parent == tmp_path / improve.MODELS_FOLDER
    first.mkdir(parents=True)
    second = improve.next_model_folder(tmp_path, now=0.0)
    assert second != first and second.name.startswith(first.name)


def _fake_trainer(tmp_path, body):
    """A launcher running ``body`` instead of train-segmenter; argv[1] is the --out folder."""
    import sys
    import textwrap

    from HRpQCTCore.background.process import popen_launcher

    script = tmp_path / "fake_trainer.py"
    script.write_text(textwrap.dedent(body), encoding="utf-8")
    commands = []

    def launch(command, env):
        commands.append(list(command))
        return popen_launcher([sys.executable, str(script),
                               command[command.index("--out") + 1]], env)

    launch.commands = commands
    return launch


def _training_set(tmp_path):
    scan, regions = _scan_and_regions(n_slices=3, size=16)
    corrected = regions.copy()
    corrected[1, 0:3, 0:3] = 7
    improve.add_to_training_set(tmp_path / "set", scan, corrected, "s1", regions)
    return tmp_path / "set"


def test_fine_tuning_runs_through_the_run_panel_and_the_new_folder_is_selected(tmp_path):
    from test_slicer_panel import FakeView, _tick_until_stopped

    from HRpQCTCore.background.panel import RunPanel
    from HRpQCTCore.progress import PROGRESS_PREFIX
    from HRpQCTSegmenterLib.parameters import SegmenterParameters

    folder = _training_set(tmp_path)
    launcher = _fake_trainer(tmp_path, f"""
        import json, pathlib, sys, time
        for done in range(1, 4):
            print({PROGRESS_PREFIX!r} + json.dumps(
                {{"stage": "training", "done": done, "total": 3}}), flush=True)
            time.sleep(0.05)
        out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True)
        (out / "hrpqct_model.json").write_text("{{}}")
        """)
    fake, done = FakeView(), []
    panel = RunPanel(fake.view(), on_success=done.append)
    parameters = SegmenterParameters(device="cpu")
    assert panel.start(lambda: improve.start_fine_tune_run(folder, parameters,
                                                           launcher=launcher))
    _tick_until_stopped(panel, fake)
    assert not fake.errors and len(done) == 1
    run = done[0]
    assert run.output_dir.parent == folder / improve.MODELS_FOLDER
    assert fake.progress[-1] == 100 and "new model folder" in fake.status[0]
    command = launcher.commands[0]
    assert command[command.index("--init-from") + 1] == "bundled"
    assert command[command.index("--device") + 1] == "cpu"
    selected = improve.parameters_for_model(parameters, run.output_dir)
    assert (selected.model, selected.model_folder) == ("folder", str(run.output_dir))
    # the next fine-tuning starts from the selected folder
    improve.start_fine_tune_run(folder, selected, launcher=launcher).wait(60)
    assert launcher.commands[1][launcher.commands[1].index("--init-from") + 1] == str(
        run.output_dir)


def test_fine_tuning_failures_and_cancel_are_shown(tmp_path):
    from test_slicer_panel import FakeView, _tick_until_stopped

    from HRpQCTCore.background.panel import RunPanel
    from HRpQCTSegmenterLib.parameters import SegmenterParameters

    with pytest.raises(HRpQCTError, match="empty"):
        improve.start_fine_tune_run(tmp_path / "nothing", SegmenterParameters())
    with pytest.raises(HRpQCTError, match="training-set folder"):
        improve.start_fine_tune_run("", SegmenterParameters())
    folder = _training_set(tmp_path)
    with pytest.raises(HRpQCTError, match=r"model folder|trained model"):
        improve.start_fine_tune_run(folder, SegmenterParameters(model="folder"))
    silent = _fake_trainer(tmp_path, "print('done, but nothing written')")
    fake = FakeView()
    panel = RunPanel(fake.view(), on_success=lambda run: None)
    panel.start(lambda: improve.start_fine_tune_run(folder, SegmenterParameters(),
                                                    launcher=silent))
    _tick_until_stopped(panel, fake)
    assert fake.status[1] and "without writing a model" in fake.errors[0][0]
    slow = _fake_trainer(tmp_path, "import time; time.sleep(60)")
    fake = FakeView()
    panel = RunPanel(fake.view(), on_success=lambda run: None)
    panel.start(lambda: improve.start_fine_tune_run(folder, SegmenterParameters(),
                                                    launcher=slow))
    assert panel.running
    panel.cancel()
    assert not panel.running and not fake.errors
    assert fake.status[0].startswith("Cancelled")
