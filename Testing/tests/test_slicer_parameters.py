"""One parameter schema per module: the dataclass fields generate the parameter node wrapper.

``slicer.parameterNodeWrapper`` is absent outside Slicer, so these tests look at what the
module files hand to it: the annotations of the generated base class, read the way the
wrapper reads them (``typing.get_type_hints(..., include_extras=True)``, base classes
included), with recording markers in place of Slicer's ``Choice``, ``WithinRange`` and
``Default``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Annotated

import pytest

from HRpQCTCore.parameter_schema import (
    PLAIN_MARKERS,
    Markers,
    PlainChoice,
    PlainDefault,
    PlainRange,
    node_field,
    node_fields,
    parameter_node_annotations,
    parameter_node_base,
    values_from_node,
)
from HRpQCTRadiomicsLib.slicer_radiomics import (
    MODE_CHOICES,
    MODE_FEATURES,
    MODE_PREDICTION,
    RadiomicsParameters,
)
from HRpQCTSegmenterLib.parameters import (
    CALIBRATION_RANGES,
    DEVICE_CHOICES,
    MODEL_CHOICES,
    UNITS_CHOICES,
    SegmenterParameters,
)

#: Names Slicer's parameterNodeWrapper adds to the class (a field of that name is refused).
WRAPPER_RESERVED = {"allParameters", "default", "isCached", "dataType", "getValue", "setValue",
                    "connectGui", "connectParametersToGui", "disconnectGui", "parameterNode",
                    "StartModify", "EndModify", "AddObserver", "RemoveObserver", "Modified"}


def test_the_segmenter_schema_names_every_node_field_with_its_choices_and_range():
    fields = {node.node_name: node for node in node_fields(SegmenterParameters)}
    assert list(fields) == ["inputUnits", "model", "modelFolder", "device", "muScaling",
                            "muWater", "densitySlope", "densityIntercept", "acceptUnusualScan"]
    assert [f.name for f in dataclasses.fields(SegmenterParameters)] == [
        node.field_name for node in fields.values()]  # every choice lives on the node
    assert fields["inputUnits"].choices == UNITS_CHOICES
    assert fields["model"].choices == MODEL_CHOICES
    assert fields["device"].choices == DEVICE_CHOICES
    assert fields["modelFolder"].node_type is str and fields["muWater"].node_type is float
    for node in fields.values():
        if node.field_name in CALIBRATION_RANGES:
            assert node.value_range == CALIBRATION_RANGES[node.field_name]
        assert node.default == getattr(SegmenterParameters(), node.field_name)
    assert not set(fields) & WRAPPER_RESERVED


def test_the_generated_base_is_what_the_wrapper_reads():
    base = parameter_node_base(SegmenterParameters)

    # As in the module file, before @parameterNodeWrapper: the panel's own fields added.
    ParameterNode = type("ParameterNode", (base,), {
        "__annotations__": {"inputVolume": str, "show3D": bool}, "show3D": True})

    hints = typing.get_type_hints(ParameterNode, include_extras=True)
    assert list(hints)[:9] == [node.node_name for node in node_fields(SegmenterParameters)]
    assert list(hints)[9:] == ["inputVolume", "show3D"]
    assert hints["muWater"] == Annotated[float, PlainDefault(SegmenterParameters().mu_water),
                                         PlainRange(*CALIBRATION_RANGES["mu_water"])]
    assert hints["inputUnits"] == Annotated[str, PlainDefault("auto"),
                                            PlainChoice(UNITS_CHOICES)]
    assert hints["modelFolder"] == Annotated[str, PlainDefault("")]
    # defaults travel as markers, not class attributes (which the wrapper would turn into its
    # own properties): read by every version of the wrapper
    assert not any(hasattr(base, name) for name in hints if name != "show3D")


def test_slicer_s_markers_are_called_with_the_schema_s_values():
    calls = []
    markers = Markers(choice=lambda choices: calls.append(("choice", choices)) or "C",
                      within_range=lambda low, high: calls.append(("range", low, high)) or "R",
                      default=lambda value: calls.append(("default", value)) or "D")
    annotations = parameter_node_annotations(RadiomicsParameters, markers)
    assert annotations == {"mode": Annotated[str, "D", "C"],
                           "classifierPath": Annotated[str, "D"]}
    assert calls == [("default", MODE_FEATURES), ("choice", list(MODE_CHOICES)),
                     ("default", "")]


def test_a_parameter_node_reads_back_into_the_schema():
    node = SimpleNamespace(inputUnits="density", model="folder", modelFolder=None,
                           device="cpu", muScaling=4096.0, muWater=0.2347,
                           densitySlope=1600.0, densityIntercept=-390.5,
                           acceptUnusualScan=False)
    assert SegmenterParameters.from_parameter_node(node) == SegmenterParameters(
        units="density", model="folder", model_folder="", device="cpu", mu_scaling=4096.0,
        mu_water=0.2347, density_slope=1600.0, density_intercept=-390.5)
    radiomics = SimpleNamespace(mode=MODE_PREDICTION, classifierPath="/c.json")
    assert values_from_node(RadiomicsParameters, radiomics) == {
        "mode": MODE_PREDICTION, "classifier_paths": ["/c.json"]}
    assert RadiomicsParameters.from_parameter_node(radiomics, n_jobs=2) == RadiomicsParameters(
        mode=MODE_PREDICTION, classifier_paths=["/c.json"], n_jobs=2)
    with pytest.raises(TypeError, match="no field 'slice'"):
        RadiomicsParameters.from_parameter_node(radiomics, slice=[1])


def test_a_schema_whose_panel_would_start_invalid_is_refused():
    @dataclass
    class BadChoice:
        mode: str = node_field("mode", "fast", choices=("slow", "exact"))

    @dataclass
    class BadRange:
        gain: float = node_field("gain", 5.0, value_range=(0.0, 1.0))

    @dataclass
    class NoNodeDefault:
        paths: list = node_field("paths", default_factory=list)  # noqa: RUF009

    with pytest.raises(TypeError, match="not one of"):
        node_fields(BadChoice)
    with pytest.raises(TypeError, match="outside"):
        node_fields(BadRange)
    with pytest.raises(TypeError, match="node_default"):
        parameter_node_annotations(NoNodeDefault, PLAIN_MARKERS)
