"""The two modules' flow in a Slicer-like Python: only Slicer's packages, then the modules' own.

Run by ``.ci/slicer-like`` in a Python 3.12 environment holding exactly Slicer 5.10's
bundled packages, ``slicer-core`` for Slicer's data model and pyradiomics as SlicerRadiomics
provides it -- nothing from this repository is pip-installed: the module folders are on
``sys.path`` as Slicer puts them. Each module's dependencies are installed just before its
step, through the functions the modules' Logic calls (``ensure_dependencies`` with the
modules' declarations and ``pip_install`` with Slicer's packages pinned). So a package the
code imports but a declaration forgets fails here, in the step of the module that forgot it:

1. the sample scan (generated, checksum verified), loaded as Sample Data would;
2. Segmenter: its declaration installed (ONNX Runtime; no PyTorch in this environment), the
   real ``hrpqct segment`` in a background process with the bundled model -> seven segments
   with terminology, under the scan's study;
3. an edit (a segment erased on one slice, as the Segment Editor would);
4. Radiomics: its declaration installed, the real ``hrpqct radiomics`` in a background
   process -> feature table (the edit shows) -> CSV -> the bundled classifier's probability
   with its caveat.

Usage: python Testing/slicer_like/run_flows.py WORK_FOLDER
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Where Slicer finds the modules (their folders on sys.path), and the headless scene set-up.
for folder in ("HRpQCTSegmenter", "HRpQCTRadiomics", "Testing/tests"):
    sys.path.insert(0, str(ROOT / folder))

import numpy as np  # noqa: E402  (after the module folders are on the path, as in Slicer)


def step(text: str) -> float:
    """Print the step and return the time it started."""
    print(f"== slicer-like: {text}", flush=True)
    return time.monotonic()


def check(condition: bool, message: str) -> None:
    """Fail the run with ``message`` (plain asserts would vanish under ``python -O``)."""
    if not condition:
        raise SystemExit(f"slicer-like run FAILED: {message}")


def poll(run, timeout_s: float) -> list[float]:
    """Poll ``run`` as the panels' timers do; the progress fractions seen."""
    from HRpQCTCore.background.process import JobState

    fractions, deadline = [], time.monotonic() + timeout_s
    while run.poll() in (JobState.RUNNING, JobState.LOADING):
        check(time.monotonic() < deadline, f"the run did not finish in {timeout_s} s")
        fractions.append(run.fraction)
        time.sleep(0.1)
    return fractions


def install(dependencies, who: str) -> None:
    """What the module's Logic does on the first Apply, with the user saying yes."""
    from HRpQCTCore.background.dependencies import (
        ensure_dependencies,
        missing_dependencies,
        pip_install,
    )

    missing = [d.requirement for d in missing_dependencies(dependencies)]
    print(f"   {who} installs: {', '.join(missing) or 'nothing'}", flush=True)

    def no_torch() -> None:
        raise SystemExit(f"slicer-like run FAILED: {who} asked for PyTorch")

    check(ensure_dependencies(dependencies, confirm=lambda message: True,
                              install_torch=no_torch,
                              pip_install=lambda r: pip_install(r, python=sys.executable),
                              requester=who), f"{who}'s dependencies")


def nothing_of_this_repository_installed() -> None:
    check(importlib.util.find_spec("torch") is None, "torch must not be in this environment")
    check(importlib.util.find_spec("sklearn") is None, "scikit-learn before any install")
    for name in ("hrpqct-segmenter",):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        check(False, f"{name} is pip-installed: the modules must run from their folders")
    import HRpQCTCore

    check(Path(HRpQCTCore.__file__).is_relative_to(ROOT / "HRpQCTSegmenter"),
          f"HRpQCTCore comes from {HRpQCTCore.__file__}, not the module folder")


def load_sample(headless, work: Path):
    """The sample scan, loaded with Slicer's volume storage node (as Sample Data does)."""
    import slicer

    from HRpQCTCore import slicer_bridge
    from HRpQCTSegmenterLib import sample_data

    path = sample_data.write_sample_scan(work)  # raises if the checksum fails
    volume = headless.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                              sample_data.SAMPLE_NODE_NAME)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    headless.scene.AddNode(storage)
    storage.SetFileName(str(path))
    check(bool(storage.ReadData(volume)), f"Slicer's reader could not read {path}")
    headless.scene.RemoveNode(storage)
    volume.SetAttribute(slicer_bridge.VOLUME_UNITS_ATTRIBUTE, "hu")  # as loadSampleScan does
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(
        hierarchy.GetSceneItemID(), "synthetic subject"), "study")
    item = hierarchy.GetItemByDataNode(volume) or hierarchy.CreateItem(study, volume)
    hierarchy.SetItemParent(item, study)
    return volume, hierarchy, study


def segment(headless, volume, hierarchy, study):
    from HRpQCTCore import regions
    from HRpQCTCore.background.process import JobState
    from HRpQCTSegmenterLib.dependencies import segmenter_dependencies
    from HRpQCTSegmenterLib.parameters import SegmenterParameters
    from HRpQCTSegmenterLib.slicer_segmenter import start_segmentation

    parameters = SegmenterParameters()  # the panel's defaults: bundled model, device auto
    install(segmenter_dependencies(parameters), "HR-pQCT Segmenter")
    started = time.monotonic()
    run = start_segmentation(headless.scene, volume, None, parameters, show_3d=False,
                             python=sys.executable)
    fractions = poll(run, timeout_s=900)
    check(run.state == JobState.SUCCEEDED, run.message + "\n" + "\n".join(run.log_lines()))
    check(fractions == sorted(fractions), "the progress went backwards")
    check(any("(onnx)" in line for line in run.log_lines()),
          "the segmentation did not run with ONNX Runtime")
    node = run.segmentation_node
    segmentation = node.GetSegmentation()
    check(segmentation.GetNumberOfSegments() == len(regions.REGIONS), "not seven segments")
    for index, region in enumerate(regions.REGIONS):
        segment_ = segmentation.GetNthSegment(index)
        check((segment_.GetName(), segment_.GetTerminology())
              == (region.name, region.terminology.to_slicer_tag()), f"segment {index}")
    check(hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study,
          "the segmentation is not under the scan's study")
    print(f"   segmented in {time.monotonic() - started:.0f} s", flush=True)
    return node


def erase_on_slice(headless, segmentation, volume, region, z: int) -> np.ndarray:
    """Erase ``region`` on slice ``z`` as a Segment Editor eraser would; the new labels."""
    import vtk

    from HRpQCTCore import slicer_bridge
    from HRpQCTCore.slicer_bridge import OutputState

    labels = slicer_bridge.labels_from_segmentation_node(headless.segmentations_logic,
                                                         segmentation, volume)
    mask = labels == region.label
    check(bool(mask[z].any()), f"no {region.name} on slice {z} to erase")
    mask[z] = False
    labelmap = slicer_bridge.array_to_volume_node(
        headless.scene, mask.astype(np.uint8), slicer_bridge.scan_from_volume_node(volume),
        "__edit__", "vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentation.GetSegmentation().GetSegmentIdBySegmentName(region.name))
    check(bool(headless.segmentations_logic.ImportLabelmapToSegmentationNode(
        labelmap, segmentation, ids)), "the edit failed")
    headless.scene.RemoveNode(labelmap)
    check(slicer_bridge.output_state(segmentation) == OutputState.EDITED, "edit not seen")
    return slicer_bridge.labels_from_segmentation_node(headless.segmentations_logic,
                                                       segmentation, volume)


def radiomics(headless, volume, segmentation, work: Path, erased, z: int) -> None:
    from HRpQCTCore import regions
    from HRpQCTCore.background.process import JobState
    from HRpQCTRadiomicsLib import slicer_radiomics as sr
    from HRpQCTRadiomicsLib.dependencies import RADIOMICS_DEPENDENCIES

    install(RADIOMICS_DEPENDENCIES, "HR-pQCT Radiomics")
    started = time.monotonic()
    tibia = regions.region_by_name("tibial_trabecular")
    parameters = sr.RadiomicsParameters(regions=[tibia.label, erased.label], slices=[0, z],
                                        n_jobs=2)
    run = sr.start_radiomics(headless.scene, headless.segmentations_logic, volume,
                             segmentation, parameters, python=sys.executable)
    poll(run, timeout_s=600)
    check(run.state == JobState.SUCCEEDED, run.message + "\n" + "\n".join(run.log_lines()))
    table = run.table_node.GetTable()
    rows = [(table.GetValueByName(i, "region").ToString(),
             table.GetValueByName(i, "slice").ToString(),
             table.GetValueByName(i, "status").ToString())
            for i in range(table.GetNumberOfRows())]
    check(rows == [(tibia.key, "0", "ok"), (erased.key, "0", "ok"), (tibia.key, str(z), "ok"),
                   (erased.key, str(z), "skipped")], f"feature rows {rows}")  # the edit shows
    check(len(run.table.feature_names) == 939, "not the paper's 939 features")
    csv_path = sr.write_features_csv(work / "features.csv", run.table)
    check(csv_path.read_text(encoding="utf-8") == run.table.text, "CSV export")
    print(f"   features in {time.monotonic() - started:.0f} s", flush=True)

    started = time.monotonic()
    prediction = sr.run_radiomics(
        headless.scene, headless.segmentations_logic, volume, segmentation,
        sr.RadiomicsParameters(mode=sr.MODE_PREDICTION, slices=[0, 2], n_jobs=2),
        timeout_s=600, python=sys.executable)
    probabilities = prediction.probability_table_node.GetTable()
    classifiers = [probabilities.GetValueByName(i, "classifier").ToString()
                   for i in range(probabilities.GetNumberOfRows())]
    check(classifiers == ["osteoporosis-soft-tissue.classifier.json", "overall"],
          f"probability rows {classifiers}")
    p = probabilities.GetValueByName(0, "osteoporosis_probability").ToDouble()
    check(0.0 <= p <= 1.0, f"probability {p}")
    check(prediction.probability_table_node.GetAttribute(sr.CAVEAT_ATTRIBUTE)
          == sr.probability_caveat(), "the caveat")
    check(prediction.probability_summary().startswith(sr.RESEARCH_USE), "research use")
    print(f"   bundled classifier: probability {p:.3f} in {time.monotonic() - started:.0f} s",
          flush=True)


def main(argv: list[str]) -> int:
    work = Path(argv[1] if len(argv) > 1 else "slicer-like-work")
    work.mkdir(parents=True, exist_ok=True)
    started = step("nothing of this repository is installed; the module folders are on the path")
    nothing_of_this_repository_installed()
    import slicer
    from _headless_slicer import build_headless_slicer

    from HRpQCTCore import regions

    headless = build_headless_slicer(work / "slicer-share")
    slicer.mrmlScene = headless.scene
    step("sample scan")
    volume, hierarchy, study = load_sample(headless, work)
    step("HR-pQCT Segmenter: first Apply installs its packages, then segments")
    segmentation = segment(headless, volume, hierarchy, study)
    step("an edit in the Segment Editor's way")
    adipose = regions.region_by_name("adipose")
    erase_on_slice(headless, segmentation, volume, adipose, z=1)
    step("HR-pQCT Radiomics: first Apply installs its packages, then features and probability")
    radiomics(headless, volume, segmentation, work, adipose, z=1)
    print(f"== slicer-like: flows passed in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
