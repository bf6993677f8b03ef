"""The region model: the single source of truth for labels, names, colours and terminology.

Two label sets exist:

* :data:`NETWORK_CLASSES` -- the six outputs of the segmentation network (background plus
  the paper's five annotation classes). Label maps with these values are what the model is
  trained on and what it predicts.
* :data:`REGIONS` -- the seven anatomical regions produced by post-processing: the four bone
  compartments unchanged, and soft tissue split into skin, myotendinous tissue (muscle and
  tendon) and adipose tissue. Label maps with these values are what users see, edit in
  Slicer's Segment Editor, and quantify with radiomics.

Every other part of the project (I/O, phantoms, post-processing, radiomics, the Slicer
modules) imports these definitions; nothing else hard-codes a label value, a name or a colour.

Terminology follows Slicer's convention (a DICOM-style triplet ``scheme^code^meaning`` for
category, type and anatomic region). SNOMED CT codes are used where Slicer's bundled lists
carry the concept (bone, skin, tendon, fat, tibia, fibula). Cortical vs. trabecular bone and
"myotendinous tissue" (muscle plus tendon, the paper's grouping) are not in those lists; they
are coded in the project's private scheme ``HRPQCT`` and described in the custom terminology
file :data:`TERMINOLOGY_FILE`, which Slicer loads so the segments resolve to readable entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "Code",
    "Terminology",
    "LabelDefinition",
    "NETWORK_CLASSES",
    "REGIONS",
    "BACKGROUND",
    "TERMINOLOGY_CONTEXT_NAME",
    "TERMINOLOGY_FILE",
    "CLASS_TO_REGION",
    "SOFT_TISSUE_CLASS",
    "SOFT_TISSUE_REGIONS",
    "BONE_REGIONS",
    "region_by_name",
    "region_by_label",
    "class_by_name",
    "class_by_label",
    "classes_to_regions",
    "regions_to_classes",
    "terminology_file_path",
]


@dataclass(frozen=True)
class Code:
    """A coded concept: ``scheme^value^meaning`` as in DICOM and Slicer terminologies."""

    scheme: str
    value: str
    meaning: str

    def to_slicer(self) -> str:
        """Return the ``scheme^value^meaning`` string Slicer uses inside terminology tags."""
        return f"{self.scheme}^{self.value}^{self.meaning}"


#: An empty code, written as ``^^`` in Slicer terminology tags.
NO_CODE = Code("", "", "")

SCT = "SCT"  # SNOMED CT, as Slicer and DICOM designate it
PRIVATE = "HRPQCT"  # this project's private coding scheme (see module docstring)

CATEGORY_TISSUE = Code(SCT, "85756007", "Tissue")
CATEGORY_ANATOMICAL_STRUCTURE = Code(SCT, "123037004", "Anatomical Structure")

TIBIA = Code(SCT, "12611008", "Tibia")
FIBULA = Code(SCT, "87342007", "Fibula")
LOWER_LEG = Code(SCT, "30021000", "Lower leg")

#: Name of the terminology context (the list) in the custom ``.term.json``.
TERMINOLOGY_CONTEXT_NAME = "Segmentation category and type - HR-pQCT distal tibia"
#: Name of the anatomic context used for the anatomic-region part of a tag.
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Terminology:
    """A Slicer terminology entry: category, type and (optional) anatomic region."""

    category: Code
    type: Code
    region: Code = NO_CODE
    type_modifier: Code = NO_CODE
    region_modifier: Code = NO_CODE

    def to_slicer_tag(self) -> str:
        """Serialise as Slicer's terminology tag.

        The format is
        ``context~category~type~typeModifier~anatomicContext~region~regionModifier``,
        the value of the ``TerminologyEntry`` segment tag in ``.seg.nrrd`` files.
        """
        region_context = ANATOMIC_CONTEXT_NAME if self.region.value else ""
        parts = [
            TERMINOLOGY_CONTEXT_NAME,
            self.category.to_slicer(),
            self.type.to_slicer(),
            self.type_modifier.to_slicer(),
            region_context,
            self.region.to_slicer(),
            self.region_modifier.to_slicer(),
        ]
        return "~".join(parts)


@dataclass(frozen=True)
class LabelDefinition:
    """One label of a label map.

    Attributes
    ----------
    label:
        Integer value in the label map (0 is background).
    key:
        Stable machine name (``snake_case``); used in CSV columns, CLI options and JSON.
    name:
        Human-readable name, used as the Slicer segment name.
    color_rgb:
        Display colour, 0-255 per channel.
    terminology:
        Coded meaning, written into ``.seg.nrrd`` so Slicer shows the right entry.
    """

    label: int
    key: str
    name: str
    color_rgb: tuple[int, int, int]
    terminology: Terminology | None

    @property
    def color_float(self) -> tuple[float, float, float]:
        """Colour as three floats in [0, 1] (the form Slicer's segment API takes)."""
        return tuple(c / 255.0 for c in self.color_rgb)  # type: ignore[return-value]


def _bone(category_type: Code, region: Code) -> Terminology:
    return Terminology(category=CATEGORY_TISSUE, type=category_type, region=region)


CORTICAL_BONE = Code(PRIVATE, "cortical-bone", "Cortical bone")
TRABECULAR_BONE = Code(PRIVATE, "trabecular-bone", "Trabecular bone")
SOFT_TISSUE = Code(PRIVATE, "soft-tissue", "Soft tissue")
SKIN = Code(SCT, "39937001", "Skin")
MYOTENDINOUS = Code(PRIVATE, "myotendinous-tissue", "Myotendinous tissue")
ADIPOSE = Code(SCT, "248300009", "Fat")

# Colours: ivory/ochre for the tibia, pale/deep blue for the fibula so the two bones never
# look alike while editing; skin, muscle-red and fat-yellow close to Slicer's anatomy colours.
_TIBIAL_CORTICAL = LabelDefinition(
    1, "tibial_cortical", "Tibial cortical bone", (241, 214, 145),
    _bone(CORTICAL_BONE, TIBIA))
_TIBIAL_TRABECULAR = LabelDefinition(
    2, "tibial_trabecular", "Tibial trabecular bone", (204, 142, 70),
    _bone(TRABECULAR_BONE, TIBIA))
_FIBULAR_CORTICAL = LabelDefinition(
    3, "fibular_cortical", "Fibular cortical bone", (140, 190, 240),
    _bone(CORTICAL_BONE, FIBULA))
_FIBULAR_TRABECULAR = LabelDefinition(
    4, "fibular_trabecular", "Fibular trabecular bone", (50, 100, 190),
    _bone(TRABECULAR_BONE, FIBULA))

BACKGROUND = LabelDefinition(0, "background", "Background", (0, 0, 0), None)

#: The network's classes, in label order (index == label value).
NETWORK_CLASSES: tuple[LabelDefinition, ...] = (
    BACKGROUND,
    _TIBIAL_CORTICAL,
    _TIBIAL_TRABECULAR,
    _FIBULAR_CORTICAL,
    _FIBULAR_TRABECULAR,
    LabelDefinition(5, "soft_tissue", "Soft tissue", (200, 120, 100),
                    Terminology(CATEGORY_TISSUE, SOFT_TISSUE, LOWER_LEG)),
)

#: The seven output regions, in label order (label values 1..7; background 0 is not a region).
REGIONS: tuple[LabelDefinition, ...] = (
    _TIBIAL_CORTICAL,
    _TIBIAL_TRABECULAR,
    _FIBULAR_CORTICAL,
    _FIBULAR_TRABECULAR,
    LabelDefinition(5, "skin", "Skin", (177, 122, 101),
                    Terminology(CATEGORY_ANATOMICAL_STRUCTURE, SKIN, LOWER_LEG)),
    LabelDefinition(6, "myotendinous", "Myotendinous tissue", (192, 80, 77),
                    Terminology(CATEGORY_TISSUE, MYOTENDINOUS, LOWER_LEG)),
    LabelDefinition(7, "adipose", "Adipose tissue", (230, 220, 70),
                    Terminology(CATEGORY_TISSUE, ADIPOSE, LOWER_LEG)),
)

SOFT_TISSUE_CLASS: LabelDefinition = NETWORK_CLASSES[5]
BONE_REGIONS: tuple[LabelDefinition, ...] = REGIONS[:4]
SOFT_TISSUE_REGIONS: tuple[LabelDefinition, ...] = REGIONS[4:]

#: Network class label -> region labels it becomes after post-processing.
CLASS_TO_REGION: dict[int, tuple[int, ...]] = {
    0: (0,),
    1: (1,),
    2: (2,),
    3: (3,),
    4: (4,),
    5: tuple(r.label for r in SOFT_TISSUE_REGIONS),
}

TERMINOLOGY_FILE = "HRpQCTRegions.term.json"


def _lookup(defs: tuple[LabelDefinition, ...], attr: str, value: object, what: str):
    for d in defs:
        if getattr(d, attr) == value:
            return d
    known = ", ".join(repr(getattr(d, attr)) for d in defs)
    raise KeyError(f"No {what} with {attr}={value!r}; known: {known}")


def region_by_label(label: int) -> LabelDefinition:
    """Return the region with label value ``label`` (1..7)."""
    return _lookup(REGIONS, "label", int(label), "region")


def region_by_name(name: str) -> LabelDefinition:
    """Return the region whose ``key`` or display ``name`` is ``name`` (case-insensitive)."""
    wanted = name.strip().lower()
    for d in REGIONS:
        if wanted in (d.key, d.name.lower()):
            return d
    raise KeyError(f"No region named {name!r}; known: {', '.join(d.key for d in REGIONS)}")


def class_by_label(label: int) -> LabelDefinition:
    """Return the network class with label value ``label`` (0..5)."""
    return _lookup(NETWORK_CLASSES, "label", int(label), "network class")


def class_by_name(name: str) -> LabelDefinition:
    """Return the network class whose ``key`` or display ``name`` is ``name``."""
    wanted = name.strip().lower()
    for d in NETWORK_CLASSES:
        if wanted in (d.key, d.name.lower()):
            return d
    raise KeyError(
        f"No network class named {name!r}; known: {', '.join(d.key for d in NETWORK_CLASSES)}")


def regions_to_classes(region_labels: np.ndarray) -> np.ndarray:
    """Collapse a 7-region label map to the network's 5-class label map.

    Skin, myotendinous and adipose tissue all become soft tissue; bone labels are unchanged.
    The output has dtype ``uint8`` and the input's shape.
    """
    lut = np.zeros(256, dtype=np.uint8)
    for cls, regs in CLASS_TO_REGION.items():
        for r in regs:
            lut[r] = cls
    arr = np.asarray(region_labels)
    if arr.size and (arr.min() < 0 or arr.max() > max(d.label for d in REGIONS)):
        raise ValueError(
            f"Region label map has values outside 0..{len(REGIONS)} "
            f"(min {arr.min()}, max {arr.max()}): is this a 7-region map?")
    return lut[arr.astype(np.uint8, copy=False)]


def classes_to_regions(class_labels: np.ndarray) -> np.ndarray:
    """Map the four bone classes of a 5-class label map to region labels.

    Soft tissue (class 5) cannot be split without image intensities; it is returned as 0
    and must be filled by the soft-tissue subdivision of post-processing.
    """
    lut = np.zeros(256, dtype=np.uint8)
    for d in BONE_REGIONS:
        lut[d.label] = d.label
    return lut[np.asarray(class_labels).astype(np.uint8, copy=False)]


def terminology_file_path() -> Path:
    """Path of the custom Slicer terminology file shipped with the engine."""
    return Path(str(resources.files("HRpQCTCore") / "resources" / TERMINOLOGY_FILE))
