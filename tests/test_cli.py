"""The `conveyor` CLI: help, groups, errors as one line."""

from __future__ import annotations

import subprocess
import sys

from conveyor.cli import build_parser, main


def test_groups_present():
    parser = build_parser()
    text = parser.format_help()
    for g in ("simulate", "io", "spa", "spi", "config"):
        assert g in text


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "conveyor", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "conveyor" in out.stdout


def test_input_error_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["config", "check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conveyor: error: ") and str(missing) in err and err.count("\n") == 1
