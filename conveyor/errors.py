"""Errors that reach the user as one clear line.

Every check on user input raises :class:`InputError` naming the offending file (or
config key) and what to do about it. The CLI prints ``conveyor: error: <message>`` and
exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations

import os


class InputError(Exception):
    """Bad user input: a file that cannot be used, a wrong parameter, an empty glob.

    Parameters
    ----------
    path : str or os.PathLike or None
        The file (or config key) at fault; printed first.
    problem : str
        What is wrong, in the user's terms.
    fix : str, optional
        What the user should do about it.
    """

    def __init__(self, path, problem: str, fix: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.fix = fix
        msg = problem if self.path is None else f"{self.path}: {problem}"
        if fix:
            msg = f"{msg} -- {fix}"
        super().__init__(msg)
