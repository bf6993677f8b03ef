"""Bundled artefacts: every listed file is present and matches its checksum; registering one."""

import json

import pytest

from HRpQCTCore.artefacts import list_artefacts, register_artefact
from HRpQCTCore.errors import ArtefactError


def test_every_bundled_artefact_is_present_and_intact():
    artefacts = list_artefacts()
    assert any(a.kind == "terminology" for a in artefacts)
    for artefact in artefacts:
        assert artefact.present, artefact.path
        assert artefact.verify(), f"{artefact.name}: checksum mismatch ({artefact.path})"


def test_register_adds_then_replaces_an_entry(tmp_path):
    (tmp_path / "models").mkdir()
    weights = tmp_path / "models" / "w.bin"
    weights.write_bytes(b"first")
    first = register_artefact(tmp_path, "my-model", "models/w.bin", "model", "test")
    weights.write_bytes(b"second")
    second = register_artefact(tmp_path, "my-model", "models/w.bin", "model", "test")
    entries = json.loads((tmp_path / "artefacts.json").read_text(encoding="utf-8"))["artefacts"]
    assert [e["name"] for e in entries] == ["my-model"]
    assert entries[0]["sha256"] == second.sha256 != first.sha256
    assert second.verify()


def test_register_refuses_a_missing_file(tmp_path):
    with pytest.raises(ArtefactError, match="does not exist"):
        register_artefact(tmp_path, "x", "nope.bin", "model", "")
