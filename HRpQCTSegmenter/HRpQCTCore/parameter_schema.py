"""One schema for a module's choices: dataclass fields that say how the parameter node keeps them.

A module's choices are a dataclass (``SegmenterParameters``, ``RadiomicsParameters``) whose
fields are made with :func:`node_field`: besides the default, each field names the parameter
node attribute holding it, its choices or its accepted range. From that one description come

* the values read from a parameter node (:func:`values_from_node`), and
* the annotations of the module's ``@parameterNodeWrapper`` class
  (:func:`parameter_node_annotations`, :func:`parameter_node_base`): the module file passes
  Slicer's ``Choice``, ``WithinRange`` and ``Default`` as :class:`Markers` and derives its
  wrapper class from the generated base, adding only the node selections of its panel.

Slicer's ``slicer.parameterNodeWrapper`` is not needed here: tests pass
:data:`PLAIN_MARKERS` and look at what would be handed to it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from typing import Annotated, Any

__all__ = [
    "node_field",
    "NodeField",
    "node_fields",
    "values_from_node",
    "Markers",
    "PLAIN_MARKERS",
    "parameter_node_annotations",
    "parameter_node_base",
]

#: Key of a field's metadata holding its :class:`_NodeSpec`.
_METADATA_KEY = "hrpqct.parameter_node"


@dataclass(frozen=True)
class _NodeSpec:
    node_name: str
    choices: tuple[Any, ...] | None
    value_range: tuple[float, float] | None
    node_type: Any
    node_default: Any
    from_node: Callable[[Any], Any] | None


def node_field(node_name: str, default: Any = MISSING, *,
               default_factory: Callable[[], Any] | Any = MISSING,
               choices: Sequence[Any] | None = None,
               value_range: tuple[float, float] | None = None,
               node_type: Any = None, node_default: Any = MISSING,
               from_node: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field kept on the module's parameter node as ``node_name``.

    Parameters
    ----------
    node_name:
        The parameter node attribute (camelCase, as Slicer modules name them).
    default, default_factory:
        As for :func:`dataclasses.field`.
    choices:
        The values the panel offers (a combo box); the default must be one of them.
    value_range:
        ``(low, high)`` accepted by the panel (a spin box's limits).
    node_type:
        Type on the node when it differs from the field's (e.g. one path on the node, a
        list of paths in the field).
    node_default:
        Default on the node when it differs from the field's (needed with
        ``default_factory``).
    from_node:
        Turns the node's value into the field's (e.g. an empty path widget's None into "").
    """
    spec = _NodeSpec(node_name, None if choices is None else tuple(choices),
                     None if value_range is None else tuple(value_range), node_type,
                     node_default, from_node)
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={_METADATA_KEY: spec})


@dataclass(frozen=True)
class NodeField:
    """How one field of a parameter dataclass is kept on the parameter node."""

    field_name: str
    node_name: str
    node_type: Any
    default: Any
    choices: tuple[Any, ...] | None = None
    value_range: tuple[float, float] | None = None
    from_node: Callable[[Any], Any] | None = None

    def value_from_node(self, parameter_node: Any) -> Any:
        """The field's value from ``parameter_node``'s attribute."""
        value = getattr(parameter_node, self.node_name)
        return self.from_node(value) if self.from_node is not None else value


def node_fields(schema: type) -> list[NodeField]:
    """The fields of the dataclass ``schema`` kept on the parameter node, in field order.

    Raises
    ------
    TypeError
        When a field's node default is unknown or outside its choices or range (the panel
        would start with a value the engine refuses).
    """
    hints = typing.get_type_hints(schema)
    found = []
    for item in dataclasses.fields(schema):
        spec = item.metadata.get(_METADATA_KEY)
        if spec is None:
            continue
        default = spec.node_default if spec.node_default is not MISSING else item.default
        if default is MISSING:
            raise TypeError(f"{schema.__name__}.{item.name}: give node_default= for the node")
        node = NodeField(item.name, spec.node_name, spec.node_type or hints[item.name], default,
                         spec.choices, spec.value_range, spec.from_node)
        _check_default(schema, node)
        found.append(node)
    return found


def _check_default(schema: type, node: NodeField) -> None:
    where = f"{schema.__name__}.{node.field_name}"
    if node.choices is not None and node.default not in node.choices:
        raise TypeError(f"{where}: default {node.default!r} is not one of {node.choices}")
    if node.value_range is not None and not (
            node.value_range[0] <= node.default <= node.value_range[1]):
        raise TypeError(f"{where}: default {node.default!r} is outside {node.value_range}")


def values_from_node(schema: type, parameter_node: Any) -> dict[str, Any]:
    """Field name -> value of every node-kept field of ``schema``, read from the node.

    Works with any object having the node attributes (the module's wrapper, a stand-in).
    """
    return {node.field_name: node.value_from_node(parameter_node)
            for node in node_fields(schema)}


@dataclass(frozen=True)
class Markers:
    """The ``Annotated`` markers of a parameter node wrapper.

    In Slicer: ``Markers(choice=Choice, within_range=WithinRange, default=Default)`` from
    ``slicer.parameterNodeWrapper``; ``choice(list)``, ``within_range(low, high)`` and
    ``default(value)`` are called with the schema's values.
    """

    choice: Callable[[list[Any]], Any]
    within_range: Callable[[float, float], Any]
    default: Callable[[Any], Any]


@dataclass(frozen=True)
class PlainChoice:
    """Stand-in for Slicer's ``Choice`` (tests, introspection)."""

    choices: tuple[Any, ...]


@dataclass(frozen=True)
class PlainRange:
    """Stand-in for Slicer's ``WithinRange``."""

    low: float
    high: float


@dataclass(frozen=True)
class PlainDefault:
    """Stand-in for Slicer's ``Default``."""

    value: Any


#: Markers that only record the schema's values (no Slicer needed).
PLAIN_MARKERS = Markers(choice=lambda choices: PlainChoice(tuple(choices)),
                        within_range=PlainRange, default=PlainDefault)


def parameter_node_annotations(schema: type, markers: Markers = PLAIN_MARKERS
                               ) -> dict[str, Any]:
    """Node attribute -> ``Annotated[type, default(...), choice(...) | within_range(...)]``.

    The defaults are markers rather than class attributes, which every version of Slicer's
    ``parameterNodeWrapper`` reads.
    """
    annotations = {}
    for node in node_fields(schema):
        extras = [markers.default(node.default)]
        if node.choices is not None:
            extras.append(markers.choice(list(node.choices)))
        if node.value_range is not None:
            extras.append(markers.within_range(*node.value_range))
        annotations[node.node_name] = Annotated[(node.node_type, *extras)]
    return annotations


def parameter_node_base(schema: type, markers: Markers = PLAIN_MARKERS) -> type:
    """A class whose annotations are :func:`parameter_node_annotations` of ``schema``.

    The module file derives its ``@parameterNodeWrapper`` class from it (Slicer reads the
    annotations of base classes too, with ``typing.get_type_hints``) and adds its node
    selections in the class body.
    """
    return type(f"{schema.__name__}NodeFields", (), {
        "__annotations__": parameter_node_annotations(schema, markers),
        "__doc__": f"Parameter node fields generated from {schema.__name__}.",
        "__module__": schema.__module__,
    })
