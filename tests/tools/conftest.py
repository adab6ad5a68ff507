"""A stand-in `apptainer` for the adapters of tools that cannot be installed here."""

from __future__ import annotations

import os
import sys

import pytest

FAKE_APPTAINER = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
assert args[0] == "exec", args
i = 1
while args[i].startswith("--"):
    i += 2 if args[i] in ("--bind", "--env") else 1
with open(os.environ["FAKE_RECORD"], "a") as fh:
    fh.write(json.dumps(args) + "\\n")
sys.exit(subprocess.call([sys.executable, os.environ["FAKE_HANDLER"], *args[i + 1:]]))
"""


@pytest.fixture
def install_fake_apptainer(tmp_path, monkeypatch):
    """``install(handler_source) -> record path``: put an `apptainer` on PATH that records its
    arguments (one JSON list per call) and runs the image's command through the handler script."""

    def install(handler_source: str):
        bindir = tmp_path / "fakebin"
        bindir.mkdir(exist_ok=True)
        exe = bindir / "apptainer"
        exe.write_text(FAKE_APPTAINER.format(python=sys.executable))
        exe.chmod(0o755)
        handler = tmp_path / "handler.py"
        handler.write_text(handler_source)
        record = tmp_path / "record.jsonl"
        monkeypatch.setenv("FAKE_HANDLER", str(handler))
        monkeypatch.setenv("FAKE_RECORD", str(record))
        monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
        return record

    return install
