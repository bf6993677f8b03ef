"""Generate the custom Slicer terminology file from the region model.

Slicer resolves a segment's ``TerminologyEntry`` tag (see
:meth:`.regions.Terminology.to_slicer_tag`) against *terminology contexts*: JSON files in the
``segment-context-schema`` of dcmqi, holding categories, each with a list of types. Cortical vs.
trabecular bone and myotendinous tissue are not in Slicer's bundled contexts, so the project ships
its own context, :data:`.regions.TERMINOLOGY_FILE`.

That file is *generated* from :mod:`.regions` by :func:`build_terminology_json` (a test checks
that the file on disk equals the generated text), so the region model stays the single source of
truth. Regenerate it after changing a region with::

    python -m HRpQCTCore.terminology

and update its SHA256 in ``resources/artefacts.json`` (the same command prints it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from HRpQCTCore import regions
from HRpQCTCore.regions import Code, LabelDefinition

__all__ = [
    "TERMINOLOGY_SCHEMA_URL",
    "build_terminology_json",
    "terminology_json_text",
    "write_terminology_file",
]

#: Schema identifier Slicer's Terminologies logic accepts for category/type contexts.
TERMINOLOGY_SCHEMA_URL = (
    "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#")


def _code_fields(code: Code) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "CodeMeaning": code.meaning,
        "CodingSchemeDesignator": code.scheme,
        "CodeValue": code.value,
    }
    if code.scheme == regions.SCT:
        fields["SNOMEDCTConceptID"] = code.value
    return fields


def _labels_with_terminology() -> list[LabelDefinition]:
    """Every label of the region model that carries a terminology (regions, then classes)."""
    seen: set[int] = set()
    result: list[LabelDefinition] = []
    for definition in (*regions.REGIONS, *regions.NETWORK_CLASSES):
        if definition.terminology is not None and id(definition) not in seen:
            seen.add(id(definition))
            result.append(definition)
    return result


def build_terminology_json() -> dict[str, Any]:
    """Build the terminology context (as a JSON-ready dict) from :mod:`.regions`.

    Every category and type used by :data:`.regions.REGIONS` and
    :data:`.regions.NETWORK_CLASSES` appears once, in the order the region model first uses it.
    A type used with several anatomic regions (cortical bone of tibia and fibula) appears once
    with the colour of its first use; the segments themselves carry their own colours.

    Returns
    -------
    dict
        The document, ready for :func:`json.dumps`; its ``SegmentationCategoryTypeContextName``
        is :data:`.regions.TERMINOLOGY_CONTEXT_NAME`.
    """
    categories: dict[tuple[str, str], dict[str, Any]] = {}
    types_seen: set[tuple[str, str, str, str]] = set()
    for definition in _labels_with_terminology():
        term = definition.terminology
        assert term is not None  # filtered above
        category_key = (term.category.scheme, term.category.value)
        if category_key not in categories:
            categories[category_key] = {
                **_code_fields(term.category),
                # Every region model entry names an anatomic region (tibia, fibula, lower leg),
                # so Slicer's terminology selector must offer the anatomy part.
                "showAnatomy": True,
                "Type": [],
            }
        type_key = (*category_key, term.type.scheme, term.type.value)
        if type_key in types_seen:
            continue
        types_seen.add(type_key)
        type_entry = {
            **_code_fields(term.type),
            "recommendedDisplayRGBValue": list(definition.color_rgb),
            "3dSlicerLabel": term.type.meaning.lower(),
        }
        if term.type_modifier.value:
            raise NotImplementedError(
                "Type modifiers are not written to the terminology file yet; "
                f"{definition.key} uses {term.type_modifier}")
        categories[category_key]["Type"].append(type_entry)
    return {
        "SegmentationCategoryTypeContextName": regions.TERMINOLOGY_CONTEXT_NAME,
        "@schema": TERMINOLOGY_SCHEMA_URL,
        "SegmentationCodes": {"Category": list(categories.values())},
    }


def terminology_json_text() -> str:
    """The terminology file's exact text (stable formatting, so the checksum is stable)."""
    return json.dumps(build_terminology_json(), indent=2, ensure_ascii=False) + "\n"


def write_terminology_file(path: str | Path | None = None) -> Path:
    """Write the generated terminology to ``path`` (default: the bundled resource) atomically.

    Returns
    -------
    Path
        Where the file was written.
    """
    from HRpQCTCore.atomic import write_text_atomic

    target = Path(path) if path is not None else regions.terminology_file_path()
    write_text_atomic(target, terminology_json_text())
    return target


if __name__ == "__main__":  # regenerate the bundled file: python -m HRpQCTCore.terminology
    from HRpQCTCore.artefacts import sha256_file

    written = write_terminology_file()
    print(f"wrote {written}\nsha256 {sha256_file(written)}")
