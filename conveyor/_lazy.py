"""Modules imported on first use.

Every ``conveyor`` command starts by building the parser of all commands, which imports
every command module; a heavy library (pandas, starfile, h5py) imported at the top of those
modules would cost every job its import time, even jobs that never touch it.
``pd = lazy_module("pandas")`` gives a stand-in that imports pandas at the first attribute
access (``pd.DataFrame``) and behaves as the module from then on.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        self._name = name
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr):
        return getattr(self._load(), attr)

    def __setattr__(self, attr, value):
        if attr in _LazyModule.__slots__:
            object.__setattr__(self, attr, value)
        else:  # e.g. a test replacing a function of the module
            setattr(self._load(), attr, value)

    def __delattr__(self, attr):
        delattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


def lazy_module(name: str):
    """A stand-in for ``import name`` that imports it at the first attribute access."""
    return _LazyModule(name)
