"""The GPU code paths of SPI hit finding and centring, run on a machine without a GPU.

``fake_gpu`` (tests/conftest.py, tests/fakecupy.py): numpy underneath, arrays that refuse
implicit conversion to numpy and mixing with numpy arrays, as cupy's do. The device paths
of sizing, 2D classification, EMC and phasing are tested in their own test files
(the tests named ``*fake_device*``).
"""

from __future__ import annotations

import numpy as np

from conveyor import backend
from conveyor.spi import center as cf
from conveyor.spi import hits as hf

from .test_center import NOMINAL_CENTER
from .test_center import run as _run
from .test_hits import mixture as _mixture


def test_hit_finding_on_the_device_matches_the_cpu(fake_gpu):
    data, mask, _ = _mixture.__wrapped__()
    backend.set_device("cpu")
    cpu = hf.find_hits(data, mask)
    backend.set_device("gpu")
    dev = hf.find_hits(fake_gpu.asarray(data), mask)
    np.testing.assert_array_equal(dev.is_hit, cpu.is_hit)
    assert dev.threshold == cpu.threshold


def test_centring_on_the_device_matches_the_cpu(fake_gpu):
    data, mask, _ = _run.__wrapped__()
    backend.set_device("cpu")
    cpu = cf.friedel_center(data, mask, guess=NOMINAL_CENTER)
    backend.set_device("gpu")
    dev = cf.friedel_center(fake_gpu.asarray(data), mask, guess=NOMINAL_CENTER)
    np.testing.assert_allclose(backend.to_host(dev.center), cpu.center, atol=1e-6)
