"""Headless Slicer data model for tests: a real MRML scene with the module logics we use.

Built from the ``slicer-core`` package (Slicer's Qt-free C++ libraries). It has no
``slicer.app``, ``slicer.modules``, ``qt`` or ``ctk``, so the set-up Slicer's application does at
start-up is done here by hand:

* the application logic gets the scene and default colour nodes (the Colors logic needs the
  application logic *before* the scene, otherwise it cannot find its default colour files);
* every module logic gets the application logic and the scene (the Segmentations logic cannot
  create labelmap representations without a scene);
* the Terminologies logic gets a share folder holding our ``.term.json`` (Slicer's own default
  lists are not part of slicer-core; their "failed to load" messages are silenced while the
  logic starts, and our context is loaded as a user context);
* ``slicer.mrmlScene`` is set for the ``slicer.util`` helpers that read it, and restored after.

The scene and its logics are built by :mod:`_headless_slicer` (no pytest there).

Also helpers shared by the Slicer tests: :func:`cli_launcher` (a stand-in for ``hrpqct
segment`` run in the real background process, reading its input with the real command-line
parser and reader), :func:`tiny_classifier` and :func:`wrapper_fields` (the fields of a
module file's parameter node wrapper, generated and declared).
"""

from __future__ import annotations

import ast
import json
import sys
import textwrap
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _headless_slicer import HeadlessSlicer, build_headless_slicer


@pytest.fixture
def mrml_scene(tmp_path_factory) -> Iterator[HeadlessSlicer]:
    """A fresh headless Slicer scene with its logics; ``slicer.mrmlScene`` points at it."""
    import slicer  # slicer-core is a test dependency: a missing install must fail, not skip

    headless = build_headless_slicer(tmp_path_factory.mktemp("slicer-share"))
    previous_scene = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = headless.scene
    try:
        yield headless
    finally:
        headless.scene.Clear(True)
        if previous_scene is None:
            del slicer.mrmlScene
        else:
            slicer.mrmlScene = previous_scene


# ------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------
#: A stand-in for ``hrpqct segment`` that parses its command line with the real parser and
#: reads its input with the real reader (units, calibration), prints what it read as one JSON
#: line, and writes the region map saved in ``regions.npy`` (next to the script) as the
#: ``.seg.nrrd`` the real command writes.
CLI_CHILD = """
    import json, sys
    from pathlib import Path
    import numpy as np
    from HRpQCTPipeline.cli import build_parser
    from HRpQCTCore.cli_options import calibration_from_args
    from HRpQCTCore.io import read_scan
    from HRpQCTCore.io.segnrrd import write_seg_nrrd

    args = build_parser().parse_args(sys.argv[1:])
    scan = read_scan(args.input, units=args.units, calibration=calibration_from_args(args))
    print(json.dumps({"units": args.units, "hu_mean": float(np.mean(scan.hu)),
                      "hu_min": float(np.min(scan.hu)), "hu_max": float(np.max(scan.hu)),
                      "shape": list(scan.shape)}), flush=True)
    regions = np.load(Path(__file__).with_name("regions.npy"))
    write_seg_nrrd(regions, scan, args.output)
    """


def cli_launcher(folder: Path, regions: np.ndarray):
    """A launcher running :data:`CLI_CHILD` on the module's command line (argv from
    ``segment``); the commands it was given are in its ``commands`` attribute."""
    from HRpQCTCore.background.process import popen_launcher

    script = folder / "cli_child.py"
    script.write_text(textwrap.dedent(CLI_CHILD), encoding="utf-8")
    np.save(folder / "regions.npy", regions)
    commands = []

    def launch(command, env):
        commands.append(list(command))
        return popen_launcher([sys.executable, str(script), *command[3:]], env)

    launch.commands = commands
    return launch


def child_report(run) -> dict:
    """The JSON line :data:`CLI_CHILD` printed (from a run's log)."""
    return next(json.loads(line) for line in run.log_lines() if line.startswith("{"))


def tiny_classifier(path: Path, region_key: str, features: Sequence[str]) -> Path:
    """A logistic classifier on synthetic values of three ``features`` of one region.

    Trained on random numbers (no real data): it only exercises the probability path.
    """
    from HRpQCTRadiomicsEngine.classification import Dataset, train_classifier
    from HRpQCTRadiomicsEngine.model_io import save_classifier
    from HRpQCTRadiomicsEngine.settings import load_settings

    rng = np.random.default_rng(0)
    rows, labels, groups = [], [], []
    for subject in range(16):
        label = subject % 2
        for _ in range(4):
            rows.append([rng.normal(-80 + 20 * label, 10), rng.normal(-80, 10),
                         rng.normal(300, 40)])
            labels.append(label)
            groups.append(f"synthetic-{subject:02d}")
    data = Dataset(np.array(rows), np.array(labels), np.array(groups, dtype=object),
                   [f"{region_key}:{name}" for name in features],
                   [(g, str(i)) for i, g in enumerate(groups)])
    result = train_classifier(data, [region_key], cv_folds=2, n_boot=10)
    return save_classifier(path, result, load_settings("paper"))


@dataclass(frozen=True)
class WrapperField:
    """One field of a module's ``@parameterNodeWrapper`` class."""

    name: str
    type_name: str  # "float", "str", "bool", "vtkMRMLScalarVolumeNode", ...
    generated: bool  # from the engine's schema (else declared in the class body)
    choices: tuple | None = None
    value_range: tuple | None = None
    default: Any = None


def wrapper_fields(repo_root: Path, relative: str, class_name: str,
                   schema: type) -> dict[str, WrapperField]:
    """The fields of ``class_name`` in the module file ``relative``.

    The module file needs Slicer to import, so it is read as text: the class must be a
    ``@parameterNodeWrapper`` deriving from ``parameter_node_base(<schema>, SLICER_MARKERS)``;
    the fields that base generates are taken from the real schema (with the plain markers),
    those of the class body from its annotations.
    """
    from HRpQCTCore.parameter_schema import (
        PlainChoice,
        PlainDefault,
        PlainRange,
        parameter_node_annotations,
    )

    tree = ast.parse((repo_root / relative).read_text(encoding="utf-8"))
    wrapper = next(node for node in tree.body
                   if isinstance(node, ast.ClassDef) and node.name == class_name)
    assert "parameterNodeWrapper" in [getattr(d, "id", "") for d in wrapper.decorator_list]
    assert [ast.unparse(b) for b in wrapper.bases] == [
        f"parameter_node_base({schema.__name__}, SLICER_MARKERS)"], "not generated from the schema"
    fields = {}
    for name, annotation in parameter_node_annotations(schema).items():
        node_type, *extras = typing.get_args(annotation)
        by_kind = {type(extra): extra for extra in extras}
        fields[name] = WrapperField(
            name, node_type.__name__, True,
            by_kind[PlainChoice].choices if PlainChoice in by_kind else None,
            ((by_kind[PlainRange].low, by_kind[PlainRange].high) if PlainRange in by_kind
             else None), by_kind[PlainDefault].value)
    for node in wrapper.body:
        if isinstance(node, ast.AnnAssign):
            assert node.target.id not in fields, f"{node.target.id} declared twice"
            fields[node.target.id] = WrapperField(
                node.target.id, ast.unparse(node.annotation), False,
                default=ast.literal_eval(node.value) if node.value is not None else None)
    return fields
