"""The one error type a user meets: it names the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path


class MindvisError(Exception):
    """An error caused by user input (a config, a data file, a checkpoint).

    Parameters
    ----------
    message : str
        What is wrong, in one sentence.
    path : str or Path, optional
        The file the problem is in.
    key : str, optional
        The config key, HDF5 dataset or column at fault.
    fix : str, optional
        What the user should do about it.
    """

    def __init__(self, message, *, path=None, key=None, fix=None):
        self.message = message
        self.path = None if path is None else Path(path)
        self.key = key
        self.fix = fix
        super().__init__(self._format())

    def _format(self):
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if self.key is not None:
            where.append(f"key '{self.key}'")
        text = (": ".join([", ".join(where), self.message]) if where else self.message)
        if self.fix:
            text += f" Fix: {self.fix}"
        return text
