"""``flashsparse info`` and the CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flashsparse.cli import main


def test_info_json_lists_every_backend(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) == {"reference", "triton", "cuda", "cpu"}
    assert report["backends"]["reference"] is None
    assert report["torch"] and report["flashsparse"]
    for name, reason in report["backends"].items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_info_text_says_why_a_backend_is_unavailable(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference  available" in out
    assert "cuda" in out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_module_runs():
    out = subprocess.run(
        [sys.executable, "-m", "flashsparse.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("flashsparse ")
