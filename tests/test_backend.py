"""The numpy/cupy switch."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor import backend
from conveyor.errors import InputError


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.delenv("CONVEYOR_DEVICE", raising=False)
    backend.set_device(None)
    yield
    backend.set_device(None)


def test_cpu_is_numpy():
    backend.set_device("cpu")
    assert backend.get_device() == "cpu"
    assert backend.xp() is np
    a = backend.asarray([1.0, 2.0])
    assert isinstance(a, np.ndarray)
    assert backend.array_module(a) is np
    assert isinstance(backend.to_host(a), np.ndarray)


def test_env_var(monkeypatch):
    monkeypatch.setenv("CONVEYOR_DEVICE", "cpu")
    assert backend.requested_device() == "cpu"
    monkeypatch.setenv("CONVEYOR_DEVICE", "fpga")
    with pytest.raises(InputError, match="CONVEYOR_DEVICE"):
        backend.get_device()


def test_set_device_overrides_env(monkeypatch):
    monkeypatch.setenv("CONVEYOR_DEVICE", "gpu")
    backend.set_device("cpu")
    assert backend.get_device() == "cpu"


def test_unknown_device():
    with pytest.raises(InputError, match="auto, cpu, gpu"):
        backend.set_device("tpu")


def test_auto_resolves():
    backend.set_device("auto")
    assert backend.get_device() == ("gpu" if backend.gpu_available() else "cpu")
    assert backend.describe()


def test_gpu_without_gpu_is_a_clear_error():
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    backend.set_device("gpu")
    with pytest.raises(InputError, match="pip install -e .\\[gpu\\]"):
        backend.xp()


@pytest.mark.gpu
def test_gpu_round_trip():
    backend.set_device("gpu")
    import cupy

    a = backend.asarray(np.arange(4.0))
    assert isinstance(a, cupy.ndarray)
    assert backend.array_module(a) is cupy
    np.testing.assert_array_equal(backend.to_host(a * 2), np.arange(4.0) * 2)


def test_threads_limit_blas_and_fft_workers(monkeypatch):
    """`conveyor --threads N` keeps a job within the cores it was given."""
    import scipy.fft
    from threadpoolctl import threadpool_info

    import conveyor.commands.config as config_cmd
    from conveyor.cli import main

    seen = {}

    def probe(args):
        seen["fft"] = scipy.fft.get_workers()
        seen["blas"] = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
        return 0

    monkeypatch.setattr(config_cmd, "_keys", probe)
    try:
        assert main(["--threads", "1", "config", "keys"]) == 0
    finally:
        backend.set_threads(None)
    assert seen["fft"] == 1 and seen["blas"] <= {1}
    assert backend.threads() >= 1
    with pytest.raises(Exception, match="at least 1"):
        backend.set_threads(0)
