"""A strict stand-in for cupy on a machine without a GPU, for tests of the device code paths.

Arrays of this module are *not* numpy arrays: like cupy's, they refuse implicit conversion
(``np.asarray(a)`` raises ``TypeError``, so does handing one to scipy, matplotlib or a file
writer), they cannot be mixed with numpy arrays in arithmetic or in this module's
functions (cupy raises ``TypeError`` there as well), and ``a.get()`` / ``asnumpy(a)`` are
the only ways back to the host. numpy functions called on them dispatch here
(``__array_function__``), as they do for cupy arrays. Underneath, numpy and scipy.fft do
the work (scipy.fft keeps float32 as complex64, as cuFFT does).

What it checks: that a step meant to run on the device keeps its arrays on the device and
converts at the right places. What it cannot check: CUDA itself, cupy's own numerical
differences, speed or GPU memory.

Use through the ``fake_gpu`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import types

import numpy
import scipy.fft
from numpy.lib.mixins import NDArrayOperatorsMixin

__version__ = "0.0-fake"

#: functions that take host data on purpose
_HOST_OK = {"asarray", "array", "asnumpy", "ascontiguousarray"}


def _is_host_array(x) -> bool:
    return isinstance(x, numpy.ndarray) and x.ndim > 0


def _unwrap(x, strict: bool, name: str):
    if isinstance(x, ndarray):
        return x._a
    if strict and _is_host_array(x):
        raise TypeError(f"Unsupported type {type(x)} in {name}: a numpy array mixed with device arrays "
                        "(convert it with cupy.asarray first)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, strict, name) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, strict, name) for k, v in x.items()}
    if isinstance(x, slice):
        return slice(_unwrap(x.start, strict, name), _unwrap(x.stop, strict, name), _unwrap(x.step, strict, name))
    return x


def _wrap(x):
    if isinstance(x, numpy.ndarray):
        return ndarray(x)
    if isinstance(x, numpy.generic) and not isinstance(x, (numpy.bool_,)):
        # cupy reductions give 0-d device arrays, not host scalars
        return ndarray(numpy.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 -- cupy's name
    """A device array: a numpy array that does not convert itself to one."""

    __slots__ = ("_a",)

    def __init__(self, a):
        object.__setattr__(self, "_a", a)

    # -- no implicit conversion
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None):
        return numpy.array(self._a, order=order)

    # -- dispatch
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        name = f"{ufunc.__name__}.{method}"
        args = _unwrap(inputs, True, name)
        kw = _unwrap(kwargs, True, name)
        return _wrap(getattr(ufunc, method)(*args, **kw))

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_unwrap(args, True, func.__name__), **_unwrap(kwargs, True, func.__name__)))

    # -- attributes and methods of the array
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    real = property(lambda self: ndarray(self._a.real))
    imag = property(lambda self: ndarray(self._a.imag))

    def __getattr__(self, name):
        if name.startswith("__"):
            # not numpy's __array_interface__ / __array_struct__ / __dlpack__: no way around __array__
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                return _wrap(attr(*_unwrap(args, True, name), **_unwrap(kwargs, True, name)))
            return method
        return _wrap(attr)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, True, "__getitem__")])

    def __setitem__(self, key, value):
        self._a[_unwrap(key, True, "__setitem__")] = _unwrap(value, True, "__setitem__")

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    # scalars come back to the host explicitly in cupy too (a synchronising copy)
    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __complex__(self):
        return complex(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def __repr__(self):
        return f"fakecupy.ndarray({self._a!r})"

    def __reduce__(self):
        raise TypeError("device arrays are not pickled here (use .get())")


def _function(name, fn):
    strict = name not in _HOST_OK

    def f(*args, **kwargs):
        return _wrap(fn(*_unwrap(args, strict, name), **_unwrap(kwargs, strict, name)))

    f.__name__ = name
    return f


def asnumpy(a, stream=None, order="C", out=None):
    return a.get() if isinstance(a, ndarray) else numpy.asarray(a)


def asarray(a, dtype=None, order=None):
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else ndarray(a._a.astype(dtype))
    return ndarray(numpy.array(a, dtype=dtype, order=order or "K"))


array = asarray


def get_array_module(*args):
    return _this if any(isinstance(a, ndarray) for a in args) else numpy


class _Fft(types.ModuleType):
    def __getattr__(self, name):
        fn = getattr(scipy.fft, name)
        if name in ("fftfreq", "rfftfreq"):
            return lambda *a, **k: ndarray(numpy.asarray(fn(*a, **k)))
        return _function(f"fft.{name}", fn)


fft = _Fft("fakecupy.fft")


class _Runtime:
    @staticmethod
    def getDeviceCount():  # noqa: N802 -- cupy's name
        return 1

    @staticmethod
    def getDeviceProperties(i):  # noqa: N802
        return {"name": b"fake device (numpy)", "totalGlobalMem": 1 << 34}


class _Device:
    def __init__(self, i=0):
        self.id = i

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _MemoryPool:
    def free_all_blocks(self):
        pass

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0


cuda = types.SimpleNamespace(runtime=_Runtime(), Device=_Device, Stream=types.SimpleNamespace(null=None))
_pool = _MemoryPool()


def get_default_memory_pool():
    return _pool


def get_default_pinned_memory_pool():
    return _pool


class _Wrapped(types.ModuleType):
    """A module whose functions are ``target``'s, taking and giving device arrays only."""

    def __init__(self, name, target=None):
        super().__init__(name)
        self._target = target

    def __getattr__(self, attr):
        if self._target is None or attr.startswith("__"):
            raise AttributeError(attr)
        obj = getattr(self._target, attr)
        return _function(f"{self.__name__}.{attr}", obj) if callable(obj) and not isinstance(obj, type) else obj


def cupyx_modules() -> dict:
    """``cupyx`` (``scatter_add``), ``cupyx.scipy.ndimage`` and ``cupyx.scipy.special`` over numpy's
    and scipy's, for ``sys.modules`` (the ``fake_gpu`` fixture installs them)."""
    import scipy.ndimage  # noqa: PLC0415
    import scipy.special  # noqa: PLC0415

    top, sci = _Wrapped("cupyx"), _Wrapped("cupyx.scipy")
    nd, sp = _Wrapped("cupyx.scipy.ndimage", scipy.ndimage), _Wrapped("cupyx.scipy.special", scipy.special)
    types.ModuleType.__setattr__(top, "scipy", sci)
    types.ModuleType.__setattr__(top, "scatter_add", _function("cupyx.scatter_add", numpy.add.at))
    types.ModuleType.__setattr__(sci, "ndimage", nd)
    types.ModuleType.__setattr__(sci, "special", sp)
    return {"cupyx": top, "cupyx.scipy": sci, "cupyx.scipy.ndimage": nd, "cupyx.scipy.special": sp}


def __getattr__(name):
    obj = getattr(numpy, name)
    if isinstance(obj, type) or not callable(obj):
        return obj  # dtypes (float32, complex64), constants (pi, newaxis)
    return _function(name, obj)


import sys as _sys  # noqa: E402

_this = _sys.modules[__name__]
