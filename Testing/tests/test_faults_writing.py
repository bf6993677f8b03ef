"""Faults while writing: full disks, bad output places, unsafe ids, interrupted runs, noise.

Each case asserts the exit code, a key phrase of the message, and that nothing partial is
left under the final name (nor a stray temporary file). A full disk is simulated with a
file-size limit in a child process (``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored so that writes
fail with ``EFBIG`` instead of killing the process): the writers must notice, also where
SimpleITK's C++ I/O swallows the error and leaves a short file.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from HRpQCTPipeline.cli import main

resource = pytest.importorskip("resource")  # POSIX only: the file-size limit
signal = pytest.importorskip("signal")

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --- helpers ---------------------------------------------------------------------------------

def _cli(args: list[str], *, fsize: int | None = None, timeout: float = 300.0
         ) -> subprocess.CompletedProcess:
    """``python -m HRpQCTPipeline ARGS`` in a child, optionally with a file-size limit."""

    def limit() -> None:
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "HRpQCTPipeline", *args], preexec_fn=limit,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _stray(folder: Path) -> list[str]:
    """Temporary files of atomic writes left in ``folder`` (recursively)."""
    if not folder.exists():
        return []
    return sorted(str(p) for p in folder.rglob(".*") if ".tmp" in p.name)


def _assert_clean(folder: Path, *finals: Path) -> None:
    """No file under the final names, no temporary file anywhere in ``folder``."""
    for final in finals:
        assert not final.exists(), f"{final} was left behind"
    assert _stray(folder) == []


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stages(folder: Path) -> dict[str, str]:
    record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    return {k: v["status"] for k, v in record["stages"].items()}


@pytest.fixture()
def scan(tmp_path, pipeline_scans):
    """A private copy of a small phantom scan (3 slices, 400 x 400) and its truth map."""
    source = pipeline_scans[1]
    folder = tmp_path / "in"
    folder.mkdir()
    copy = folder / "scan.nii.gz"
    truth = folder / "scan_truth.nii.gz"
    shutil.copy(source.scan, copy)
    shutil.copy(source.truth, truth)
    return copy, truth


# --- A. writing: a full disk (file-size limit) --------------------------------------------

@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.nrrd", "out.mha"])
def test_convert_full_disk_leaves_nothing(tmp_path, scan, name):
    out = tmp_path / "out"
    out.mkdir()
    result = _cli(["convert", str(scan[0]), str(out / name)], fsize=60_000)
    _no_traceback(result.stderr)
    assert result.returncode == 8, result.stderr
    assert "Cannot write" in result.stderr and "Nothing was written" in result.stderr
    assert result.stdout == ""
    _assert_clean(out, out / name)


@pytest.mark.parametrize("name", ["regions.seg.nrrd", "regions.nii.gz"])
def test_segment_full_disk_leaves_nothing(tmp_path, scan, tiny_model_folder, name):
    out = tmp_path / "out"
    out.mkdir()
    result = _cli(["segment", str(scan[0]), str(out / name), "--model", str(tiny_model_folder),
                   "--engine", "torch", "--units", "hu", "--progress", "none"], fsize=1_500)
    _no_traceback(result.stderr)
    assert result.returncode == 8, result.stderr
    assert "Cannot write" in result.stderr
    _assert_clean(out, out / name)


def test_phantom_full_disk_leaves_nothing(tmp_path):
    out = tmp_path / "ph"
    result = _cli(["phantom", str(out), "--small", "--slices", "3", "--progress", "none"],
                  fsize=50_000)
    _no_traceback(result.stderr)
    assert result.returncode == 8, result.stderr
    assert "Cannot write" in result.stderr
    _assert_clean(out, out / "phantom.nii.gz", out / "phantom_truth.json")


@pytest.mark.parametrize(("code", "phrase"), [
    (errno.ENOSPC, "disk is full"),
    (errno.EFBIG, "file-size limit"),
    (errno.EACCES, "permission denied"),
    (errno.EROFS, "read-only"),
    (errno.EDQUOT, "quota"),
])
def test_os_errors_while_writing_become_clear_messages(tmp_path, scan, monkeypatch, capsys,
                                                       code, phrase):
    """The rename of the finished file fails (as on a read-only or full file system)."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "converted.nii.gz"
    real_replace = os.replace

    def failing_replace(src, dst, *args, **kwargs):
        if Path(dst) == target:
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert main(["convert", str(scan[0]), str(target)]) == 8
    err = capsys.readouterr().err
    assert phrase in err and "Nothing was written" in err
    _assert_clean(out, target)


def test_folder_that_cannot_hold_a_temporary_file(tmp_path, scan, monkeypatch, capsys):
    """Creating the temporary file fails (no permission in the folder)."""
    import tempfile

    out = tmp_path / "out"
    out.mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert main(["convert", str(scan[0]), str(out / "c.nii.gz")]) == 8
    assert "permission denied" in capsys.readouterr().err
    _assert_clean(out, out / "c.nii.gz")


@pytest.mark.skipif(IS_ROOT or not hasattr(os, "geteuid"),
                    reason="permissions do not stop root")
def test_read_only_output_folder(tmp_path, scan, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(["convert", str(scan[0]), str(out / "c.nii.gz")]) == 8
        assert "cannot be written" in capsys.readouterr().err
        _assert_clean(out, out / "c.nii.gz")
    finally:
        out.chmod(0o755)


# --- A. writing: outputs in impossible places ---------------------------------------------

@pytest.mark.parametrize("command", ["run", "batch", "phantom", "cohort", "demo"])
def test_out_folder_that_is_a_file(tmp_path, scan, capsys, command):
    blocker = tmp_path / "taken"
    blocker.write_text("a file\n")
    args = {
        "run": ["run", str(scan[0]), "--out", str(blocker), "--regions", str(scan[1]),
                "--classifier", "none", "--progress", "none"],
        "batch": ["batch", str(scan[0].parent), "--out", str(blocker), "--classifier", "none",
                  "--progress", "none"],
        "phantom": ["phantom", str(blocker), "--small", "--slices", "3", "--progress", "none"],
        "cohort": ["cohort", str(blocker), "--subjects", "2", "--small", "--slices", "3",
                   "--progress", "none"],
        "demo": ["demo", "--out", str(blocker), "--slices", "2", "--progress", "none"],
    }[command]
    assert main(args) == 8
    err = capsys.readouterr().err
    assert "file" in err and ("not a folder" in err or "is a file" in err), err
    assert blocker.read_text() == "a file\n"
    assert _stray(tmp_path) == []


@pytest.mark.parametrize("command", ["convert", "segment", "radiomics", "classify"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_file_that_is_a_folder(tmp_path, scan, tiny_classifiers, capsys, command,
                                      overwrite):
    folder = tmp_path / {"convert": "x.nii.gz", "segment": "x.seg.nrrd", "radiomics": "x.csv",
                         "classify": "p.csv"}[command]
    folder.mkdir()
    args = {
        "convert": ["convert", str(scan[0]), str(folder)],
        "segment": ["segment", str(scan[0]), str(folder), "--progress", "none"],
        "radiomics": ["radiomics", str(scan[0]), str(scan[1]), "-o", str(folder),
                      "--progress", "none"],
        "classify": ["classify", str(tiny_classifiers["adipose"]), "--scan", str(scan[0]),
                     "--regions-map", str(scan[1]), "-o", str(folder), "--progress", "none"],
    }[command] + (["--overwrite"] if overwrite else [])
    assert main(args) == 8
    assert "a folder has that name" in capsys.readouterr().err
    assert folder.is_dir() and not any(folder.iterdir())


# --- A. writing: an output that is an input -----------------------------------------------

@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hard link"])
def test_convert_refuses_to_write_over_its_input(tmp_path, scan, capsys, how):
    source = scan[0]
    before = _sha(source)
    output = {
        "same path": source,
        "other spelling": source.parent / ".." / source.parent.name / source.name,
        "symlink": tmp_path / "link.nii.gz",
        "hard link": tmp_path / "hard.nii.gz",
    }[how]
    if how == "symlink":
        output.symlink_to(source)
    elif how == "hard link":
        os.link(source, output)
    assert main(["convert", str(source), str(output), "--overwrite"]) == 2
    assert "would destroy the input" in capsys.readouterr().err
    assert _sha(source) == before
    assert _stray(tmp_path) == []


def test_postprocess_refuses_to_write_over_its_classes(tmp_path, scan, capsys):
    classes = scan[0].parent / "classes.nii.gz"
    shutil.copy(scan[1], classes)
    before = _sha(classes)
    assert main(["postprocess", str(scan[0]), str(classes), str(classes), "--overwrite",
                 "--progress", "none"]) == 2
    assert "would destroy the input" in capsys.readouterr().err
    assert _sha(classes) == before


def test_run_refuses_regions_that_are_one_of_its_outputs(tmp_path, scan, capsys):
    out = tmp_path / "out"
    out.mkdir()
    regions = out / "scan_regions.nii.gz"  # what `run` itself would write
    shutil.copy(scan[1], regions)
    before = _sha(regions)
    assert main(["run", str(scan[0]), "--out", str(out), "--regions", str(regions),
                 "--classifier", "none", "--overwrite", "--progress", "none"]) == 2
    assert "would destroy the input" in capsys.readouterr().err
    assert _sha(regions) == before
    assert sorted(p.name for p in out.iterdir() if p.name != "run.log") == [regions.name]


# --- A. writing: phantoms and cohorts never replace files silently ------------------------

def test_phantom_refuses_to_replace_files(tmp_path, capsys):
    out = tmp_path / "ph"
    args = ["phantom", str(out), "--small", "--slices", "2", "--progress", "none"]
    assert main(args) == 0
    before = {p.name: _sha(p) for p in out.iterdir()}
    assert main([*args, "--seed", "5"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: _sha(p) for p in out.iterdir()} == before
    assert main([*args, "--seed", "5", "--overwrite"]) == 0
    assert {p.name: _sha(p) for p in out.iterdir()} != before


def test_cohort_refuses_to_replace_files(tmp_path, capsys):
    out = tmp_path / "cohort"
    out.mkdir()
    (out / "manifest.csv").write_text("mine\n")
    assert main(["cohort", str(out), "--subjects", "2", "--small", "--slices", "2",
                 "--progress", "none"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "manifest.csv").read_text() == "mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv"]


# --- B. paths: identifiers that are not plain names ---------------------------------------

BAD_IDS = ["../../escape", "/tmp/abs-escape", "", ".", "..", "a/b", "a\\b", "nul\x00id",
           "new\nline", " padded "]


@pytest.mark.parametrize("scan_id", BAD_IDS, ids=repr)
def test_run_refuses_scan_ids_that_are_not_plain_names(tmp_path, scan, capsys, scan_id):
    work = tmp_path / "w"
    out = work / "a" / "b" / "out"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main(["run", str(scan[0]), "--out", str(out), "--scan-id", scan_id,
                 "--regions", str(scan[1]), "--classifier", "none", "--progress", "none"]) == 2
    assert "plain name" in capsys.readouterr().err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert not Path("/tmp/abs-escape_regions.nii.gz").exists()


@pytest.mark.parametrize("scan_id", ["../escape", "/tmp/abs-batch-escape", "sub/one"])
def test_batch_refuses_manifest_ids_that_are_not_plain_names(tmp_path, scan, capsys, scan_id):
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["scan", "scan_id", "regions"])
        writer.writerow([str(scan[0]), scan_id, str(scan[1])])
    out = tmp_path / "results"
    assert main(["batch", str(manifest), "--out", str(out), "--classifier", "none",
                 "--progress", "none"]) == 2
    assert "plain name" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "escape").exists()
    assert not Path("/tmp/abs-batch-escape").exists()


# --- C. resume: interrupted runs continue by themselves -----------------------------------

def _ctrl_c(*args, **kwargs):
    """Stands in for a step: the user presses Ctrl-C there."""
    raise KeyboardInterrupt


def _run_args(scan, out, classifier, jobs: int = 1):
    return ["run", str(scan[0]), "--out", str(out), "--regions", str(scan[1]), "--classifier",
            str(classifier), "--jobs", str(jobs), "--progress", "none", "--units", "hu"]


def test_run_interrupted_by_ctrl_c_resumes_without_overwrite(tmp_path, scan, tiny_classifiers,
                                                             monkeypatch, capsys):
    from HRpQCTPipeline import report

    out = tmp_path / "out"
    args = _run_args(scan, out, tiny_classifiers["adipose"])

    with monkeypatch.context() as patch:
        patch.setattr(report, "write_scan_report", _ctrl_c)
        assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    assert (out / "scan_features.csv").is_file() and (out / "scan_probability.json").is_file()
    _assert_clean(out, out / "scan_report.html")
    assert main(args) == 0
    assert _stages(out) == {"segmentation": "provided", "radiomics": "reused",
                            "classification": "reused", "report": "ran"}
    assert (out / "scan_report.html").is_file()


def test_run_interrupted_inside_a_stage_resumes(tmp_path, scan, tiny_classifiers, monkeypatch,
                                                capsys):
    """Ctrl-C after the features file is in place but before its stage is recorded."""
    from HRpQCTRadiomicsEngine import table

    out = tmp_path / "out"
    args = _run_args(scan, out, tiny_classifiers["adipose"])
    real = table.write_feature_csv

    def write_then_stop(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(table, "write_feature_csv", write_then_stop)
        assert main(args) == 130
    assert (out / "scan_features.csv").is_file()
    assert main(args) == 0  # the half-run's file is known: replaced without --overwrite
    assert _stages(out)["radiomics"] == "ran"


def test_file_edited_after_an_interruption_is_not_replaced(tmp_path, scan, tiny_classifiers,
                                                           monkeypatch, capsys):
    from HRpQCTPipeline import report

    out = tmp_path / "out"
    args = _run_args(scan, out, tiny_classifiers["adipose"])
    assert main(args) == 0
    with monkeypatch.context() as patch:  # another classifier, stopped before the report
        patch.setattr(report, "write_scan_report", _ctrl_c)
        assert main(_run_args(scan, out, tiny_classifiers["myotendinous"])) == 130
    edited = out / "scan_probability.json"
    edited.write_text("{}")  # the user's edit of a file the interrupted run wrote
    capsys.readouterr()
    assert main(args) == 2
    assert "changed after hrpqct wrote it" in capsys.readouterr().err
    assert edited.read_text() == "{}"


def test_run_after_a_full_disk_resumes(tmp_path, scan, tiny_classifiers):
    out = tmp_path / "out"
    args = _run_args(scan, out, tiny_classifiers["adipose"])
    first = _cli(args, fsize=40_000)
    _no_traceback(first.stderr)
    assert first.returncode == 8, first.stderr
    assert "Cannot write" in first.stderr
    assert _stray(out) == []
    second = _cli(args)
    assert second.returncode == 0, second.stderr
    assert "up to date" not in second.stdout
    assert (out / "scan_report.html").is_file()


# --- D. noise -------------------------------------------------------------------------------

def test_segment_prints_each_warning_once(tmp_path, scan, tiny_model_folder):
    out = tmp_path / "regions.nii.gz"
    result = _cli(["segment", str(scan[0]), str(out), "--model", str(tiny_model_folder),
                   "--engine", "torch", "--units", "hu", "--progress", "none"])
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == len(set(warnings)), warnings
    assert out.is_file() and _stray(tmp_path) == []


def test_run_output_has_no_dependency_chatter(tmp_path, scan, tiny_classifiers):
    out = tmp_path / "out"
    result = _cli(_run_args(scan, out, tiny_classifiers["adipose"], jobs=2))
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    assert "validation.valid" not in text and "worker stopped" not in text
    lines = [line for line in text.splitlines() if "WARNING" in line]
    assert len(lines) == len(set(lines)), lines


def test_ignored_loky_warning_and_pykwalify_info():
    code = ("import logging, warnings; from HRpQCTPipeline.cli import _configure_logging; "
            "_configure_logging(0, False); "
            "warnings.warn('A worker stopped while some jobs were given to the executor. "
            "This can be caused by a too short worker timeout or by a memory leak.', "
            "UserWarning); logging.getLogger('pykwalify.core').info('validation.valid'); "
            "logging.getLogger('hrpqct').info('kept')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "INFO: kept"


def test_scanco_library_text_stays_off_stdout(tmp_path):
    py_aimio = pytest.importorskip("py_aimio")
    import struct

    import numpy as np

    good = tmp_path / "s.aim"
    py_aimio._aimio.write_aim(str(good), np.zeros((2, 8, 8), np.int16),
                              {"element_size": [0.0607, 0.0607, 0.0607]})
    data = bytearray(good.read_bytes())
    at = data.find(struct.pack("<i", 0x20002))  # the storage type: int16
    data[at:at + 4] = struct.pack("<i", 0x30003)  # a type AimIO does not know
    bad = tmp_path / "bad.aim"
    bad.write_bytes(bytes(data))
    result = _cli(["convert", str(bad), str(tmp_path / "c.nii.gz")])
    _no_traceback(result.stderr)
    assert result.returncode in (3, 4), result.stderr
    assert result.stdout == ""
    assert "storage_type" not in result.stderr
    _assert_clean(tmp_path, tmp_path / "c.nii.gz")


def test_classify_with_missing_features_is_invalid_data(tmp_path, tiny_classifiers, capsys):
    from HRpQCTCore.regions import region_by_name
    from HRpQCTRadiomicsEngine.extraction import FeatureTable, RegionFeatures
    from HRpQCTRadiomicsEngine.settings import load_settings
    from HRpQCTRadiomicsEngine.table import write_feature_csv

    rows = [RegionFeatures(z, region_by_name("adipose").label, 500, "ok", "",
                           {"original_firstorder_Energy": 1.0}) for z in range(3)]
    table = FeatureTable(rows, ["original_firstorder_Energy"], "slice",
                         load_settings("paper").provenance(), scan="s", subject="s")
    features = write_feature_csv(tmp_path / "f.csv", [table])
    output = tmp_path / "p.csv"
    assert main(["classify", str(tiny_classifiers["adipose"]), "--features", str(features),
                 "-o", str(output)]) == 4
    assert "lacks" in capsys.readouterr().err
    _assert_clean(tmp_path, output)
