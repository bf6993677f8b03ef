"""`hrpqct batch`: failures do not stop a cohort, re-runs resume, Dask gives the local results."""

import csv
import json
import shutil

import pytest

from HRpQCTPipeline.cli import main


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _manifest(tmp_path, scans, extra=()):
    folder = tmp_path / "inputs"
    folder.mkdir(exist_ok=True)
    lines = ["scan,subject,regions"]
    for i, s in enumerate(scans):
        local = folder / f"scan{i}.nii.gz"
        shutil.copy(s.scan, local)
        lines.append(f"inputs/{local.name},subj{i},{s.truth}")
    lines += list(extra)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_batch_reports_a_corrupt_scan_and_finishes_the_others_then_resumes(
        tmp_path, pipeline_scans, tiny_classifiers, capsys):
    good = pipeline_scans[:2]
    (tmp_path / "inputs").mkdir()
    bad = tmp_path / "inputs" / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not a scan" * 50)
    manifest = _manifest(tmp_path, good, extra=[f"inputs/{bad.name},subjX,"])
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--out", str(out), "--classifier",
            str(tiny_classifiers["adipose"]), "--jobs", "1", "--progress", "none"]
    assert main(args) == 7
    captured = capsys.readouterr()
    assert "broken: FAILED" in captured.err and "1 of 3 scan(s) failed" in captured.err

    failures = _rows(out / "failures.csv")
    assert [f["scan_id"] for f in failures] == ["broken"]
    assert failures[0]["exit_code"] == "3" and failures[0]["message"]
    summary = {r["scan_id"]: r for r in _rows(out / "cohort_summary.csv")}
    assert summary["broken"]["status"] == "failed"
    for i in range(2):
        row = summary[f"scan{i}"]
        assert row["status"] == "ok" and 0 <= float(row["osteoporosis_probability"]) <= 1
        assert float(row["adipose_volume_mm3"]) > 0
        assert (out / f"scan{i}" / f"scan{i}_report.html").is_file()
    features = _rows(out / "cohort_features.csv")
    assert {r["scan"] for r in features} == {"scan0", "scan1"}
    assert {r["subject"] for r in features} == {"subj0", "subj1"}
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'id="scans"' in page and 'id="failures"' in page
    assert 'href="scan0/scan0_report.html"' in page and "broken" in page
    assert (out / "batch.log").is_file()

    # re-run: finished scans are skipped, the failing one is tried again
    assert main(args) == 7
    assert "scan0: up to date" in capsys.readouterr().out
    # the corrupt file is replaced by a good scan: only that one runs now
    shutil.copy(pipeline_scans[2].scan, bad)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "scan0: up to date" in printed and "scan1: up to date" in printed
    assert "broken: ran" in printed
    assert _rows(out / "failures.csv") == []
    # a changed setting (another classifier) redoes the dependent steps of every scan
    assert main([*args[:4], "--classifier", str(tiny_classifiers["myotendinous"]),
                 *args[6:]]) == 0
    record = json.loads((out / "scan0" / "run.json").read_text(encoding="utf-8"))
    assert record["stages"]["classification"]["status"] == "ran"


def test_batch_folder_input_and_bad_manifest(tmp_path, pipeline_scans):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(pipeline_scans[0].scan, folder / "a.nii.gz")
    (folder / "notes.txt").write_text("not a scan")
    from HRpQCTPipeline.batch import jobs_from_folder

    assert [j.scan_id for j in jobs_from_folder(folder)] == ["a"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("scan,scan_id\na.nii.gz,x\nb.nii.gz,x\n")
    assert main(["batch", str(manifest), "--out", str(tmp_path / "o"), "--progress",
                 "none"]) == 3  # duplicate ids
    manifest.write_text("path\na.nii.gz\n")
    assert main(["batch", str(manifest), "--out", str(tmp_path / "o"), "--progress",
                 "none"]) == 3  # no scan column


@pytest.fixture(scope="module")
def local_cluster():
    distributed = pytest.importorskip("dask.distributed")
    # threads in this process, talking TCP on the loopback address only
    cluster = distributed.LocalCluster(processes=False, n_workers=1, threads_per_worker=2,
                                       protocol="tcp", host="127.0.0.1", scheduler_port=0,
                                       dashboard_address=None)
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
    yield cluster
    cluster.close()


def test_dask_cluster_gives_the_local_results(tmp_path, pipeline_scans, tiny_classifiers,
                                              local_cluster):
    manifest = _manifest(tmp_path, pipeline_scans[:2])
    common = ["--classifier", str(tiny_classifiers["adipose"]), "--features", "basic",
              "--progress", "none", "--no-report"]
    # locally: two scans at a time in joblib worker processes
    assert main(["batch", str(manifest), "--out", str(tmp_path / "local"), "--jobs", "1",
                 "--scan-jobs", "2", *common]) == 0
    assert main(["batch", str(manifest), "--out", str(tmp_path / "dask"), "--scheduler",
                 local_cluster.scheduler_address, *common]) == 0
    for name in ("cohort_features.csv", "cohort_summary.csv"):
        local = (tmp_path / "local" / name).read_text(encoding="utf-8")
        assert local == (tmp_path / "dask" / name).read_text(encoding="utf-8")

    # one scan, radiomics slice by slice as cluster tasks
    scan = pipeline_scans[2]
    run = ["run", str(scan.scan), "--regions", str(scan.truth), *common]
    assert main([*run, "--out", str(tmp_path / "one_local"), "--jobs", "1"]) == 0
    assert main([*run, "--out", str(tmp_path / "one_dask"), "--scheduler",
                 local_cluster.scheduler_address]) == 0
    assert (tmp_path / "one_local" / "scan2_features.csv").read_text(encoding="utf-8") == (
        tmp_path / "one_dask" / "scan2_features.csv").read_text(encoding="utf-8")
    local = tmp_path / "one_local" / "scan2_probability.json"
    dask = tmp_path / "one_dask" / "scan2_probability.json"
    assert (json.loads(local.read_text(encoding="utf-8"))["probability"]
            == json.loads(dask.read_text(encoding="utf-8"))["probability"])


def test_extract_on_cluster_equals_extract_features(radiomics_scan, local_cluster):
    from dask.distributed import Client

    from HRpQCTPipeline.pipeline import BASIC_FEATURES, extract_on_cluster
    from HRpQCTRadiomicsEngine.extraction import extract_features
    from HRpQCTRadiomicsEngine.table import table_to_csv_text

    with Client(local_cluster) as client:
        remote = extract_on_cluster(client, radiomics_scan.hu, radiomics_scan.regions,
                                    radiomics_scan.spacing_mm, settings="paper",
                                    features=list(BASIC_FEATURES), scan="s", subject="p")
    local = extract_features(radiomics_scan.hu, radiomics_scan.regions,
                             radiomics_scan.spacing_mm, settings="paper",
                             features=list(BASIC_FEATURES), n_jobs=1, scan="s", subject="p")
    assert table_to_csv_text(remote) == table_to_csv_text(local)


def test_a_cohort_manifest_is_read_by_its_own_column_names(tmp_path):
    """`hrpqct cohort` writes scan_path/subject_id; its truth regions are not taken as input."""
    from HRpQCTPipeline.batch import read_manifest

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject_id,osteoporosis,scan_path,regions_path\n"
                        "sub-001,1,sub-001/sub-001.nii.gz,sub-001/sub-001_regions.nii.gz\n"
                        "sub-002,0,sub-002/sub-002.nii.gz,sub-002/sub-002_regions.nii.gz\n")
    jobs = read_manifest(manifest)
    assert [(j.scan_id, j.subject) for j in jobs] == [("sub-001", "sub-001"),
                                                      ("sub-002", "sub-002")]
    assert jobs[0].scan == tmp_path / "sub-001" / "sub-001.nii.gz"
    assert all(j.regions is None for j in jobs)


@pytest.mark.parametrize("content", [b"\x1f\x8b\x08\x00\xff\xfe binary",  # a gzip header
                                     "scan\na.nii\n".encode("utf-16")])  # UTF-16 text
def test_a_binary_file_as_manifest_is_refused_with_a_message(tmp_path, content):
    """A scan or other binary file given as the manifest: InputFileError, not a traceback."""
    from HRpQCTCore.errors import InputFileError
    from HRpQCTPipeline.batch import read_manifest

    manifest = tmp_path / "scan.nii.gz"
    manifest.write_bytes(content)
    with pytest.raises(InputFileError, match="not a UTF-8 CSV text file"):
        read_manifest(manifest)
