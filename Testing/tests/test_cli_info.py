"""`hrpqct info` reports versions, devices and artefacts; the CLI maps errors to exit codes."""

import json

from HRpQCTPipeline.cli import build_parser, main


def test_info_json_lists_versions_devices_and_artefacts(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["hrpqct-segmenter"]
    assert info["versions"]["torch"]
    assert info["devices"]["cpu"]["threads"] >= 1
    for artefact in info["artefacts"]:
        assert artefact["checksum_ok"], artefact


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "info" in sub.choices
    for name, subparser in sub.choices.items():
        assert subparser.description or subparser.format_help(), name
