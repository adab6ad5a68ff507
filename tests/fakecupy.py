"""A strict stand-in for cupy on a machine without a GPU, for tests of the device code paths.

Arrays of this module are *not* numpy arrays: like cupy's, they refuse implicit conversion
(``np.asarray(a)`` raises ``TypeError``, so does handing one to scipy, matplotlib or a file
writer), they cannot be mixed with numpy arrays in arithmetic or in this module's
functions (cupy raises ``TypeError`` there as well), and ``a.get()`` / ``asnumpy(a)`` are
the only ways back to the host. numpy functions called on them dispatch here
(``__array_function__``), as they do for cupy arrays. Underneath, numpy and scipy.fft do
the work (scipy.fft keeps float32 as complex64, as cuFFT does). ``cupyx_modules()`` gives
``cupyx.scipy.ndimage``, ``cupyx.scipy.special``, ``cupyx.scipy.sparse`` (device sparse
matrices over scipy's, same rules) and ``cupyx.scatter_add``.

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

#: numpy functions reached through this module that take host data on purpose (asarray,
#: array and asnumpy are defined below)
_HOST_OK = {"ascontiguousarray"}


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


def _strict(x, name):
    return _unwrap(x, True, name)


def _delegate(obj, name, unwrap, wrap):
    """Attribute ``name`` of ``obj`` for a device object: methods take and give device objects."""
    if name.startswith("__"):
        raise AttributeError(name)
    attr = getattr(obj, name)
    if not callable(attr):
        return wrap(attr)

    def method(*args, **kwargs):
        return wrap(attr(*unwrap(args, name), **unwrap(kwargs, name)))

    method.__name__ = name
    return method


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
        # dunders are not delegated: numpy's __array_interface__ / __array_struct__ would be
        # a way around __array__
        return _delegate(self._a, name, _strict, _wrap)

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


class _SparseMatrix:
    """A sparse matrix on the device: scipy's underneath, device arrays in and out."""

    def __init__(self, m):
        self._m = m

    # what cupyx.scipy.sparse matrices have
    shape = property(lambda self: self._m.shape)
    dtype = property(lambda self: self._m.dtype)
    nnz = property(lambda self: self._m.nnz)
    ndim = property(lambda self: 2)
    format = property(lambda self: self._m.format)
    T = property(lambda self: _sparse_wrap(self._m.T))
    data = property(lambda self: ndarray(self._m.data),
                    lambda self, v: setattr(self._m, "data", _unwrap(v, True, "data")))
    indices = property(lambda self: ndarray(self._m.indices))
    indptr = property(lambda self: ndarray(self._m.indptr))
    row = property(lambda self: ndarray(self._m.row))
    col = property(lambda self: ndarray(self._m.col))

    def get(self, stream=None):
        return self._m.copy()

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed.")

    def __getattr__(self, name):
        return _delegate(self._m, name, _sparse_unwrap, _sparse_wrap)

    def __getitem__(self, key):
        return _sparse_wrap(self._m[_sparse_unwrap(key, "__getitem__")])

    def _op(name):  # noqa: N805 -- builds the operators below
        def op(self, other):
            return _sparse_wrap(getattr(self._m, name)(_sparse_unwrap(other, name)))
        return op

    __matmul__, __rmatmul__ = _op("__matmul__"), _op("__rmatmul__")
    __mul__, __rmul__ = _op("__mul__"), _op("__rmul__")
    __add__, __radd__, __sub__ = _op("__add__"), _op("__radd__"), _op("__sub__")
    __truediv__, __neg__ = _op("__truediv__"), (lambda self: _SparseMatrix(-self._m))
    dot = _op("dot")
    del _op

    # a numpy ufunc or function with a device sparse matrix: not allowed, as in cupy
    __array_priority__ = 1000
    __array_ufunc__ = None


#: the class of this module's device sparse matrices
cupyx_sparse_matrix = _SparseMatrix


def _sparse_unwrap(x, name):
    if isinstance(x, _SparseMatrix):
        return x._m
    if _scipy_sparse().issparse(x):
        raise TypeError(f"{name}: a host scipy.sparse matrix mixed with device arrays")
    if isinstance(x, (list, tuple)):
        return type(x)(_sparse_unwrap(v, name) for v in x)
    if isinstance(x, dict):
        return {k: _sparse_unwrap(v, name) for k, v in x.items()}
    return _unwrap(x, True, name)


def _sparse_wrap(x):
    sps = _scipy_sparse()
    if sps.issparse(x):
        return _SparseMatrix(x)
    if isinstance(x, numpy.matrix):  # scipy's sums over an axis; cupyx gives a 2-d array
        return ndarray(numpy.asarray(x))
    return _wrap(x)


def _scipy_sparse():
    import scipy.sparse  # noqa: PLC0415

    return scipy.sparse


def _sparse_constructor(kind):
    def make(arg, shape=None, dtype=None, copy=False):
        sps = _scipy_sparse()
        if isinstance(arg, _SparseMatrix):
            arg = arg._m
        elif sps.issparse(arg):
            arg = arg.copy()  # a host matrix copied to the device, as cupyx allows
        elif isinstance(arg, ndarray):
            arg = arg._a
        else:
            arg = _unwrap(arg, True, f"{kind}_matrix")
        return _SparseMatrix(getattr(sps, f"{kind}_matrix")(arg, shape=shape, dtype=dtype, copy=copy))

    make.__name__ = f"{kind}_matrix"
    return make


class _SparseFunctions(types.ModuleType):
    """scipy.sparse's other functions (diags, eye, hstack, ...) on device arrays and matrices."""

    def __getattr__(self, attr):
        if isinstance(getattr(_scipy_sparse(), attr, None), type):
            return getattr(_scipy_sparse(), attr)
        return _delegate(_scipy_sparse(), attr, _sparse_unwrap, _sparse_wrap)


def _sparse_module():
    mod = _SparseFunctions("cupyx.scipy.sparse")
    for kind in ("csr", "csc", "coo"):
        types.ModuleType.__setattr__(mod, f"{kind}_matrix", _sparse_constructor(kind))
    types.ModuleType.__setattr__(mod, "issparse", lambda x: isinstance(x, _SparseMatrix))
    types.ModuleType.__setattr__(mod, "spmatrix", _SparseMatrix)
    return mod


def cupyx_modules() -> dict:
    """``cupyx`` (``scatter_add``), ``cupyx.scipy.ndimage``, ``cupyx.scipy.special`` and
    ``cupyx.scipy.sparse`` over numpy's and scipy's, for ``sys.modules`` (the ``fake_gpu``
    fixture installs them)."""
    import scipy.ndimage  # noqa: PLC0415
    import scipy.special  # noqa: PLC0415

    top, sci = _Wrapped("cupyx"), _Wrapped("cupyx.scipy")
    nd, sp = _Wrapped("cupyx.scipy.ndimage", scipy.ndimage), _Wrapped("cupyx.scipy.special", scipy.special)
    types.ModuleType.__setattr__(top, "scipy", sci)
    types.ModuleType.__setattr__(top, "scatter_add", _function("cupyx.scatter_add", numpy.add.at))
    types.ModuleType.__setattr__(sci, "ndimage", nd)
    types.ModuleType.__setattr__(sci, "special", sp)
    sparse = _sparse_module()
    types.ModuleType.__setattr__(sci, "sparse", sparse)
    return {"cupyx": top, "cupyx.scipy": sci, "cupyx.scipy.ndimage": nd, "cupyx.scipy.special": sp,
            "cupyx.scipy.sparse": sparse}


def __getattr__(name):
    obj = getattr(numpy, name)
    if isinstance(obj, type) or not callable(obj):
        return obj  # dtypes (float32, complex64), constants (pi, newaxis)
    return _function(name, obj)


import sys as _sys  # noqa: E402

_this = _sys.modules[__name__]
