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


def test_parser_does_not_import_pandas():
    """Every job builds the whole parser: heavy libraries are imported only when used."""
    import subprocess
    import sys

    code = ("import sys, conveyor.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('pandas', 'starfile', 'matplotlib', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_module_behaves_as_the_module(monkeypatch):
    import json as real

    from conveyor._lazy import lazy_module

    lazy = lazy_module("json")
    assert "not loaded" in repr(lazy)
    assert lazy.dumps([1]) == "[1]" and lazy.JSONDecodeError is real.JSONDecodeError
    monkeypatch.setattr(lazy, "dumps", lambda obj: "patched")
    assert real.dumps(1) == "patched"


def test_a_command_line_imports_only_its_group_where_it_can():
    """``conveyor spa motion`` needs the spa modules only; help and commands registered in
    another group's module (``select``) still find every command."""
    import subprocess
    import sys

    code = ("import sys, conveyor.cli as c; p = c.build_parser(sys.argv[1:]); "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('conveyor.commands.'))))")
    def loaded(*argv):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
        return set(out.stdout.split())

    spa = loaded("--threads", "1", "spa", "motion", "movie.mrc")
    assert "conveyor.commands.spa_motion" in spa
    assert not any(m.startswith(("conveyor.commands.spi", "conveyor.commands.bench")) for m in spa), spa
    everything = loaded("select", "spa")  # the select group lives in spa_classify / spi_classify
    assert {"conveyor.commands.spa_classify", "conveyor.commands.spi_classify", "conveyor.commands.bench"} <= everything
    assert "conveyor.commands.bench" in loaded("spa")  # no command named: help lists all
    assert "conveyor.commands.bench" in loaded("cxi")  # not a group: everything, argparse reports it
