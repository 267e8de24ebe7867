"""Named arrays from ``.npz``, MATLAB ``.mat`` (v5 and v7.3) and plain HDF5 files, read one way.

MATLAB v7.3 files are HDF5 files; MATLAB stores arrays column-major, so h5py
sees every array with its axes reversed (a [trials x voxels] matrix appears as
[voxels, trials]). ``column_major=True`` reverses the axes back on reading.
v5 files are read with :func:`scipy.io.loadmat`; ``.npz`` with NumPy (never
with pickles allowed). Datasets of HDF5 files are read lazily, so a large
[trials, voxels] matrix is only read a block of rows at a time.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from mindvis.errors import MindvisError


class ArrayFile:
    """Read named arrays from one file, whatever its container.

    Parameters
    ----------
    path : str or Path
    column_major : bool
        Reverse the axes of every array (MATLAB's storage order).
    config_key : str
        The config key that named this file, quoted in errors.
    """

    def __init__(self, path, column_major=False, config_key=None):
        import h5py

        self.path = Path(path)
        self.column_major = bool(column_major)
        self.config_key = config_key
        if not self.path.exists():
            raise MindvisError("file not found", path=self.path, key=config_key,
                               fix=f"set {config_key or 'the path'} to an existing file.")
        self._h5 = None
        self._arrays = None
        try:
            if h5py.is_hdf5(self.path):
                self._h5 = h5py.File(self.path, "r")
                self.kind = "hdf5"
            elif self.path.suffix == ".npz":
                self._arrays = np.load(self.path, allow_pickle=False)
                self.kind = "npz"
            elif self.path.suffix == ".npy":
                self._arrays = {self.path.stem: np.load(self.path, allow_pickle=False, mmap_mode="r")}
                self.kind = "npy"
            else:
                from scipy.io import loadmat

                mat = loadmat(self.path, squeeze_me=False)
                self._arrays = {k: v for k, v in mat.items() if not k.startswith("__")}
                self.kind = "mat-v5"
        except (OSError, ValueError, NotImplementedError, IndexError, zipfile.BadZipFile, _mat_read_error()) as err:
            # scipy.io.loadmat raises IndexError (and MatReadError) on bytes that are no MATLAB file at all.
            reason = " ".join(str(err).split()) or type(err).__name__
            raise MindvisError(f"cannot read this file as .npz, .npy, .mat or HDF5 ({reason})", path=self.path,
                               key=config_key, fix="save it with numpy.savez, MATLAB save, or h5py.") from None

    def close(self):
        if self._h5 is not None:
            self._h5.close()
        if hasattr(self._arrays, "close"):
            self._arrays.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def keys(self):
        """Names of the arrays (HDF5: every dataset path, groups walked)."""
        if self._h5 is not None:
            names = []
            self._h5.visititems(lambda name, obj: names.append(name) if hasattr(obj, "shape") else None)
            return names
        return list(self._arrays.keys())

    def __contains__(self, key):
        return bool(key) and key in self.keys()

    def _raw(self, key, what):
        if not key or key not in self:
            available = ", ".join(sorted(self.keys())[:20])
            raise MindvisError(f"{what} not found (the file holds: {available})", path=self.path, key=key,
                               fix=f"name the right array in the config's key for {what}.")
        if self._h5 is not None:
            return self._h5[key]
        try:
            # An .npz member is only decompressed here: a damaged or pickled member fails now, not at open.
            return self._arrays[key]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise MindvisError(f"{what} cannot be read ({' '.join(str(err).split())})", path=self.path, key=key,
                               fix="save it as a plain numeric array (numpy.savez, no object arrays).") from None

    def dtype(self, key, what="array"):
        """The array's dtype, without reading its values from an HDF5 file."""
        return np.dtype(self._raw(key, what).dtype)

    def shape(self, key, what="array"):
        """The array's shape as the caller sees it (after ``column_major``)."""
        shape = tuple(self._raw(key, what).shape)
        return shape[::-1] if self.column_major else shape

    def read(self, key, what="array"):
        """The whole array, axes reversed when ``column_major``."""
        raw = self._raw(key, what)
        array = raw[()] if self._h5 is not None else np.asarray(raw)
        if self.column_major:
            array = np.transpose(array)
        return np.asarray(array)

    def read_rows(self, key, rows, what="array"):
        """Rows ``rows`` (sorted ints) along the first axis, read lazily from HDF5 files.

        Returns
        -------
        array [len(rows), ...]
        """
        raw = self._raw(key, what)
        rows = np.asarray(rows)
        if self._h5 is None:
            array = np.asarray(raw)
            return np.transpose(array)[rows] if self.column_major else array[rows]
        if len(rows) == 0:
            return np.zeros((0,) + self.shape(key)[1:], dtype=raw.dtype)
        # h5py reads a contiguous slab far faster than a fancy selection; take the span, then pick.
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if self.column_major:
            block = np.transpose(raw[..., lo:hi])
        else:
            block = raw[lo:hi]
        return block[rows - lo]

    def vector(self, key, what="array", dtype=None):
        """A 1-D array (any [N], [1, N] or [N, 1] storage), optionally cast."""
        array = self.read(key, what)
        if array.ndim > 1 and sorted(array.shape)[:-1] == [1] * (array.ndim - 1):
            array = array.reshape(-1)
        if array.ndim != 1:
            raise MindvisError(f"{what} must be a vector, found shape {array.shape}", path=self.path, key=key,
                               fix="store one value per row, as [N], [1, N] or [N, 1].")
        if dtype is not None and np.dtype(dtype).kind in "iu":
            whole = array.dtype.kind in "biu" or (array.dtype.kind == "f" and np.all(np.isfinite(array))
                                                   and np.all(array == np.rint(array)))
            if not whole:
                raise MindvisError(f"{what} must hold whole numbers, found dtype {array.dtype}", path=self.path,
                                   key=key, fix="store integer indices (int arrays, or floats without fractions).")
        return array if dtype is None else array.astype(dtype)

    def strings(self, key, what="array"):
        """A list of strings from a str array, a MATLAB cell or char array, or an HDF5 string dataset."""
        raw = self._raw(key, what)
        if self._h5 is not None:
            import h5py

            if h5py.check_string_dtype(raw.dtype) is not None:
                return [str(s) for s in np.asarray(raw.asstr()[()]).reshape(-1)]
            if raw.dtype == h5py.ref_dtype:
                # A MATLAB v7.3 cell array: each cell is a reference to a uint16 char array.
                return [_matlab_chars(self._h5[ref][()]) for ref in np.asarray(raw[()]).reshape(-1)]
            if raw.dtype.kind in "u" and raw.ndim == 2:
                # A MATLAB char matrix: one name per row once the axes are MATLAB's again.
                chars = np.transpose(raw[()]) if self.column_major else raw[()]
                return ["".join(chr(c) for c in row).rstrip("\x00 ") for row in chars]
            return [str(s.decode() if isinstance(s, bytes) else s) for s in np.asarray(raw[()]).reshape(-1)]
        array = np.asarray(raw)
        if array.dtype == object:
            return [_cell_string(item) for item in array.reshape(-1, order="F")]
        if array.dtype.kind in "US":
            flat = array.reshape(-1)
            return [str(s.decode() if isinstance(s, bytes) else s).rstrip() for s in flat]
        return [str(s) for s in array.reshape(-1)]


def _mat_read_error():
    """scipy's ``MatReadError`` (a plain Exception subclass), imported only when it can be raised."""
    from scipy.io.matlab import MatReadError

    return MatReadError


def _matlab_chars(codes):
    return "".join(chr(int(c)) for c in np.asarray(codes).reshape(-1, order="F")).rstrip("\x00")


def _cell_string(item):
    item = np.asarray(item)
    if item.dtype.kind in "US":
        return str(item.reshape(-1)[0]) if item.size else ""
    if item.dtype == object and item.size:
        return _cell_string(item.reshape(-1)[0])
    return str(item)
