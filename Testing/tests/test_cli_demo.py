"""The README's main command, `hrpqct demo`, runs end to end (on fewer slices here)."""

import json

from HRpQCTSegmenterLib.cli import main
from HRpQCTSegmenterLib.io import read_scan


def test_demo_makes_reads_converts_and_segments_the_example(tmp_path, capsys):
    from HRpQCTSegmenterLib.segmentation.model import build_model, save_model
    from HRpQCTSegmenterLib.segmentation.preprocessing import PreprocessingConfig

    model = tmp_path / "model"
    save_model(build_model("b0", seed=1).eval(), model,
               preprocessing=PreprocessingConfig(crop_yx=(1600, 1600), input_yx=(64, 64)))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--slices", "2", "--model", str(model)]) == 0
    printed = capsys.readouterr().out
    assert "research use only" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    converted = read_scan(summary["converted"])
    assert converted.shape == (2, 1600, 1600)
    assert (out / "example_regions.seg.nrrd").is_file()
    assert set(summary["region_volumes_mm3"]) >= {"skin", "adipose", "myotendinous"}
    # A second run refuses to overwrite the first run's outputs.
    assert main(["demo", "--out", str(out), "--slices", "2", "--model", str(model)]) == 2
