"""Shared test configuration: markers that skip with a printed reason."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# Rules call `conveyor` and `snakemake` from PATH: make the running interpreter's scripts first.
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_collection_modifyitems(config, items):
    from conveyor import backend

    if not backend.gpu_available():
        skip = pytest.mark.skip(reason="no GPU: cupy is not installed or sees no CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def snakemake_exe() -> str:
    exe = shutil.which("snakemake")
    if exe is None:
        pytest.skip("snakemake is not installed (run `make test`, which installs it)")
    return exe


@pytest.fixture
def fake_gpu(monkeypatch):
    """The 'gpu' device backed by tests/fakecupy.py: numpy underneath, but arrays that, like
    cupy's, refuse implicit conversion to numpy and mixing with numpy arrays. Checks that a
    device code path keeps its arrays on the device and converts where it must."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import fakecupy
    finally:
        sys.path.pop(0)
    from conveyor import backend

    monkeypatch.setattr(backend, "_cupy", lambda: fakecupy)
    for name, module in fakecupy.cupyx_modules().items():  # cupyx.scipy.ndimage etc. over scipy's
        monkeypatch.setitem(sys.modules, name, module)
    backend.set_device("gpu")
    yield fakecupy
    backend.set_device(None)
