"""The bundled terminology file is generated from regions.py; bundled files match checksums."""

import json

import pytest

from HRpQCTCore import artefacts, regions, terminology


def test_terminology_file_on_disk_equals_the_generated_one():
    on_disk = regions.terminology_file_path().read_text(encoding="utf-8")
    assert on_disk == terminology.terminology_json_text(), (
        f"{regions.terminology_file_path()} is stale: regenerate it with "
        "`python -m HRpQCTCore.terminology` and update its sha256 in artefacts.json")


def test_terminology_context_holds_every_category_and_type_of_the_region_model():
    document = json.loads(regions.terminology_file_path().read_text(encoding="utf-8"))
    assert document["SegmentationCategoryTypeContextName"] == regions.TERMINOLOGY_CONTEXT_NAME
    assert document["@schema"] == terminology.TERMINOLOGY_SCHEMA_URL
    listed = {
        (c["CodingSchemeDesignator"], c["CodeValue"], c["CodeMeaning"],
         t["CodingSchemeDesignator"], t["CodeValue"], t["CodeMeaning"])
        for c in document["SegmentationCodes"]["Category"] for t in c["Type"]
    }
    for definition in (*regions.REGIONS, *regions.NETWORK_CLASSES):
        term = definition.terminology
        if term is None:
            continue
        wanted = (term.category.scheme, term.category.value, term.category.meaning,
                  term.type.scheme, term.type.value, term.type.meaning)
        assert wanted in listed, definition.key


def test_every_bundled_artefact_matches_its_checksum():
    bundled = artefacts.list_artefacts()
    assert "terminology" in [a.name for a in bundled]
    for artefact in bundled:
        assert artefact.present, f"{artefact.name}: {artefact.path} is missing"
        assert artefact.verify(), (
            f"{artefact.name}: {artefact.path} has sha256 {artefacts.sha256_file(artefact.path)}, "
            f"manifest says {artefact.sha256}")


def test_terminology_is_loaded_through_the_checksum_check():
    assert artefacts.verified_path("terminology") == regions.terminology_file_path()


@pytest.mark.parametrize("definition", regions.REGIONS, ids=lambda d: d.key)
def test_tags_have_the_seven_fields_slicer_deserialises(definition):
    fields = definition.terminology.to_slicer_tag().split("~")
    assert len(fields) == 7
    assert fields[0] == regions.TERMINOLOGY_CONTEXT_NAME
    for coded in (fields[1], fields[2], fields[3], fields[5], fields[6]):
        assert coded.count("^") == 2
