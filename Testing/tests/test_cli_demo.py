"""The README's main command, `hrpqct demo`, runs end to end (on fewer slices here).

The demo's third step is `hrpqct run` (the pipeline of HRpQCTRadiomicsEngine): regions, features
and the QC report land in the demo folder.
"""

import json

from HRpQCTCore.io import read_scan
from HRpQCTPipeline.cli import main


def test_demo_makes_reads_segments_and_reports_the_example(tmp_path, capsys, monkeypatch):
    import HRpQCTPhantom
    from HRpQCTSegmentationEngine.model import build_model, save_model
    from HRpQCTSegmentationEngine.preprocessing import PreprocessingConfig

    model = tmp_path / "model"
    save_model(build_model("b0", seed=1).eval(), model,
               preprocessing=PreprocessingConfig(crop_yx=(1600, 1600), input_yx=(64, 64)))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--slices", "2", "--model", str(model),
                 "--classifier", "none", "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "research use only" in printed and "report:" in printed
    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    assert read_scan(summary["example"]).shape == (2, 1600, 1600)
    # Only the files a user looks at: no NIfTI copy of the example (hrpqct convert makes one).
    assert "converted" not in summary and not list(out.glob("example_scan_hu*"))
    assert "hrpqct convert" in printed
    assert (out / "example_regions.seg.nrrd").is_file()
    assert set(summary["region_volumes_mm3"]) >= {"skin", "adipose", "myotendinous"}
    for name in ("example_regions.nii.gz", "example_features.csv", "example_report.html",
                 "example_overlay.png", "run.json", "run.log"):
        assert (out / name).is_file(), name
    assert summary["outputs"]["report"].endswith("example_report.html")
    # A second run reuses the example it made here (checked by checksum) and the run's
    # unchanged stages: the same outputs, without making the example again.
    made = summary["example_made"]
    assert made["seed"] == 20260311 and made["slices"] == 2 and len(made["example_sha256"]) == 64
    features = (out / "example_features.csv").read_bytes()
    args = ["demo", "--out", str(out), "--slices", "2", "--model", str(model),
            "--classifier", "none", "--progress", "none"]

    def no_phantom(*_, **__):
        raise AssertionError("the example was made again")

    monkeypatch.setattr(HRpQCTPhantom, "generate_phantom", no_phantom)
    assert main(args) == 0
    assert "reusing example_scan.AIM" in capsys.readouterr().out
    assert (out / "example_features.csv").read_bytes() == features
    assert json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))[
        "example_made"] == made
    # An example changed since (or made for other settings) is not reused: without
    # --overwrite the demo refuses to replace it, before making anything.
    example = out / "example_scan.AIM"
    data = bytearray(example.read_bytes())
    data[-1] ^= 1
    example.write_bytes(bytes(data))
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:4], "3", *args[5:]]) == 2  # another number of slices
