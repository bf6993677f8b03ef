"""The region model is complete, consistent and the single source of truth."""

import numpy as np
import pytest

from HRpQCTCore import regions


def test_network_classes_are_background_plus_the_papers_five():
    keys = [c.key for c in regions.NETWORK_CLASSES]
    assert keys == ["background", "tibial_cortical", "tibial_trabecular", "fibular_cortical",
                    "fibular_trabecular", "soft_tissue"]
    assert [c.label for c in regions.NETWORK_CLASSES] == list(range(6))


def test_seven_regions_with_unique_labels_names_colours():
    assert [r.label for r in regions.REGIONS] == list(range(1, 8))
    assert [r.key for r in regions.SOFT_TISSUE_REGIONS] == ["skin", "myotendinous", "adipose"]
    for attr in ("key", "name", "color_rgb"):
        values = [getattr(r, attr) for r in regions.REGIONS]
        assert len(set(values)) == len(values), f"duplicate {attr}"
    for r in regions.REGIONS:
        assert all(0 <= c <= 255 for c in r.color_rgb)
        assert r.terminology is not None


def test_class_to_region_mapping_covers_every_region_once():
    mapped = [r for regs in regions.CLASS_TO_REGION.values() for r in regs if r]
    assert sorted(mapped) == [r.label for r in regions.REGIONS]


def test_regions_to_classes_collapses_soft_tissue():
    region_map = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    classes = regions.regions_to_classes(region_map)
    assert classes.dtype == np.uint8
    assert classes.ravel().tolist() == [0, 1, 2, 3, 4, 5, 5, 5]


def test_regions_to_classes_rejects_values_out_of_range():
    with pytest.raises(ValueError, match=r"outside 0\.\.7"):
        regions.regions_to_classes(np.array([[[9]]], dtype=np.uint8))


def test_classes_to_regions_keeps_bone_and_leaves_soft_tissue_unassigned():
    classes = np.arange(6, dtype=np.uint8)
    assert regions.classes_to_regions(classes).tolist() == [0, 1, 2, 3, 4, 0]


def test_lookup_by_name_and_label():
    assert regions.region_by_name("Adipose tissue").label == 7
    assert regions.region_by_name("skin").label == 5
    assert regions.region_by_label(3).key == "fibular_cortical"
    assert regions.class_by_name("soft_tissue").label == 5
    with pytest.raises(KeyError, match="known"):
        regions.region_by_name("liver")


def test_terminology_tags_use_sct_codes_from_slicer_lists():
    skin = regions.region_by_name("skin").terminology
    tag = skin.to_slicer_tag()
    fields = tag.split("~")
    assert len(fields) == 7
    assert fields[0] == regions.TERMINOLOGY_CONTEXT_NAME
    assert fields[2] == "SCT^39937001^Skin"
    tibia = regions.region_by_name("tibial_cortical").terminology
    assert tibia.region.value == "12611008"
    fibula = regions.region_by_name("fibular_trabecular").terminology
    assert fibula.region.value == "87342007"
    assert regions.region_by_name("adipose").terminology.type.value == "248300009"
