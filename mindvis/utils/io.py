"""Atomic writes, file hashes, software versions, seeding and thread control."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from mindvis.errors import MindvisError

_VERSIONED_PACKAGES = (
    "mindvis", "numpy", "scipy", "torch", "diffusers", "accelerate",
    "safetensors", "nibabel", "nilearn", "scikit-learn", "h5py", "pandas",
)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    Nothing is left at ``path`` (and an older file there is kept) when the body
    raises, so a failed stage never leaves a half-written output.

    Examples
    --------
    >>> with atomic_path("out.h5") as tmp:          # doctest: +SKIP
    ...     write_hdf5(tmp)
    """
    path = Path(path)
    # Keep the real suffix(es) so libraries that dispatch on it (nibabel: .nii.gz) still work.
    suffix = "".join(path.suffixes)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path, suffix)
        # The writer's process id in the name: another live writer of the same output keeps its temporary.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with storage_errors(path):
            yield tmp
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        # On disk before the rename, and the rename on disk after: a power cut leaves the old file or the new one.
        with storage_errors(path):
            fsync_path(tmp)
            os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(path, suffix=None):
    """Delete the temporary files an earlier, killed write of ``path`` left beside it (never read by anyone).

    Only this one output's: ``.{name}.{pid}-XXXXXXXX.tmp{suffix}`` (mkstemp's 8 random characters) whose writer
    process ``pid`` is no longer alive on this machine, and the older ``.{name}.XXXXXXXX.tmp{suffix}`` that
    records no writer. A temporary of a live writer (two ``mindvis summary`` runs of one CSV) is left alone:
    each writer renames its own, the last one wins, and neither fails.
    """
    path = Path(path)
    suffix = "".join(path.suffixes) if suffix is None else suffix
    prefix, tail = f".{path.name}.", f".tmp{suffix}"
    for stale in path.parent.glob(f"{glob_escape(prefix)}*{glob_escape(tail)}"):
        middle = stale.name[len(prefix):len(stale.name) - len(tail)]
        writer, _, random_part = middle.rpartition("-")
        if len(random_part) != 8 or not stale.is_file():
            continue
        if writer and not (writer.isdigit() and not _process_alive(int(writer))):
            continue
        stale.unlink(missing_ok=True)


def _process_alive(pid):
    """Whether a process ``pid`` runs on this machine (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def glob_escape(text):
    """``text`` with glob's special characters bracketed."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


#: errno values that mean the storage cannot take the write (full, over quota or size limit; read-only, denied).
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
DENIED_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


def storage_problem(error):
    """'full' or 'read-only' when ``error`` (an OSError, or HDF5's RuntimeError quoting an errno) says the storage
    could not take a write; else None."""
    number = getattr(error, "errno", None)
    text = str(error)
    if number in FULL_ERRNOS or any(f"errno = {n}," in text for n in FULL_ERRNOS) or "No space left" in text:
        return "full"
    if number in DENIED_ERRNOS or any(f"errno = {n}," in text for n in DENIED_ERRNOS):
        return "read-only"
    return None


def storage_error(error, path):
    """The one-line :class:`MindvisError` for a full or read-only disk met while writing ``path`` (None when
    ``error`` is something else)."""
    problem = storage_problem(error)
    if problem is None:
        return None
    reason = getattr(error, "strerror", None) or str(error)
    # HDF5 quotes the system's message inside a multi-line report: keep that message, on one line.
    quoted = re.search(r"error message = '([^']*)'", reason)
    reason = quoted.group(1) if quoted else " ".join(reason.split())[:200]
    if problem == "full":
        return MindvisError(f"cannot be written: the disk is full, or a quota or file-size limit was reached "
                            f"({reason})", path=path,
                            fix="free space (or raise the limit) and rerun; the file that was there, if any, "
                                "is unchanged.")
    return MindvisError(f"cannot be written: its folder is read-only or not writable by this user ({reason})",
                        path=path, fix=f"make {Path(path).parent} writable, or write the results elsewhere "
                                       "(snakemake --directory DIR), and rerun; nothing there was changed.")


@contextlib.contextmanager
def storage_errors(path):
    """Turn a full or read-only disk met while writing ``path`` into :func:`storage_error`'s one line."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        converted = storage_error(error, path)
        if converted is None:
            raise
        raise converted from None


def fsync_path(path):
    """Flush a file, or a folder's entries, to disk (where the file system allows a folder to be opened)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened read-only on some systems
        return
    try:
        os.fsync(handle)
    except OSError as error:  # EINVAL: this file system cannot sync it; a full disk is an error all the same
        if storage_problem(error):
            raise
    finally:
        os.close(handle)


def fsync_tree(folder):
    """:func:`fsync_path` every file under ``folder``, then the folder itself."""
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file():
            fsync_path(file)
    fsync_path(folder)


@contextlib.contextmanager
def atomic_folder(path):
    """Yield an empty temporary folder beside ``path``; swap it in for ``path`` on success.

    The folder counterpart of :func:`atomic_path`: when the body raises, the
    temporary folder is removed and an older ``path`` is kept; on success the
    older one is moved aside, the new one renamed into place (the older one
    restored if that fails), then the older one deleted. An error the body
    meets inside the temporary folder names the file at its final place. The
    temporary folders carry the writer's process id; those of a writer that is
    gone (killed) are removed by the next write of ``path``, except a moved-aside
    older folder that was never replaced, which is put back.

    Two writers of one folder at once: the one whose swap another writer's
    overtook fails with :func:`folder_conflict_error` and discards its own
    folder; the other's folder is left in place, whole.
    """
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _recover_stale_folders(path)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-new-{os.getpid()}-"))
    try:
        try:
            with storage_errors(path):
                yield staging
            with storage_errors(path):
                fsync_tree(staging)
        except MindvisError as error:
            raise _relabelled(error, staging, path) from None
        _swap_in(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: errno of a rename whose target another writer created, or whose source another writer moved, meanwhile.
_RACE_ERRNOS = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT}


def _swap_in(staging, path):
    """Rename ``staging`` onto ``path``: directly where there is none, else with the older one moved aside first.

    A rename that fails because another writer's swap of ``path`` came in between (``path`` appeared, or
    vanished, under this one) raises :func:`folder_conflict_error`; only this writer's own folders are deleted.
    """
    if not path.exists():
        try:
            os.replace(staging, path)
        except OSError as error:
            raise _swap_error(error, path) from None
        with storage_errors(path):
            fsync_path(path.parent)
        return
    with storage_errors(path):
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-{os.getpid()}-"))
    keep_aside = False
    try:
        try:
            os.replace(path, aside / "previous")
        except OSError as error:  # ENOENT: another writer moved it aside first; its own folder is on its way in
            raise _swap_error(error, path) from None
        try:
            os.replace(staging, path)
        except OSError as error:
            try:
                os.replace(aside / "previous", path)
            except OSError as restore_error:
                if not path.is_dir():
                    # Nothing in place: keep the older folder aside, where the next write of path puts it back.
                    keep_aside = True
                    raise storage_error(error, path) or error from None
                # Another writer's folder took the place meanwhile: it is newer than the older one held here.
                raise _swap_error(restore_error, path) from None
            raise _swap_error(error, path) from None
    finally:
        if not keep_aside:
            shutil.rmtree(aside, ignore_errors=True)
    fsync_path(path.parent)


def _swap_error(error, path):
    """:func:`folder_conflict_error` for a rename another writer's swap of ``path`` broke, else the storage error
    (or ``error`` itself)."""
    if error.errno in _RACE_ERRNOS:
        return folder_conflict_error(path)
    return storage_error(error, path) or error


def folder_conflict_error(path):
    """The one-line :class:`MindvisError` of a folder write that another writer of ``path`` overtook."""
    return MindvisError("another writer replaced this folder while this run was writing it (two runs of one "
                        "output at once); the folder holds that writer's outputs, whole, and this run's were "
                        "discarded", path=path,
                        fix="run one writer of a folder at a time; rerun this one if its outputs are the ones "
                            "wanted.")


def check_own_folder(folder, names, stage, key="--out-dir"):
    """Refuse an output folder holding files ``stage`` does not write (``names``; hidden temporaries aside):
    :func:`atomic_folder` replaces the folder as a unit, which would delete them. ``key``: the flag that names
    the folder."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise MindvisError("not a folder", path=folder, key=key,
                           fix=f"give a folder of its own for the {stage} outputs.")
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in names and not p.name.startswith("."))
    if foreign:
        raise MindvisError(f"holds {len(foreign)} files {stage} did not write ({', '.join(foreign[:3])}); the "
                           "folder is replaced as a unit, which would delete them", path=folder, key=key,
                           fix=f"give a folder of its own for the {stage} outputs.")


def _relabelled(error, staging, path):
    """``error`` naming ``path``'s file where it named the same file inside ``staging``."""
    if error.path is None:
        return error
    try:
        relative = error.path.relative_to(staging)
    except ValueError:
        return error
    return MindvisError(error.message, path=path / relative, key=error.key, fix=error.fix)


def _recover_stale_folders(path):
    """Remove the staging folders of killed writes of ``path``; put back an older folder a killed swap left aside
    (the kill fell between moving it aside and renaming the new one in)."""
    for stale in sorted(path.parent.glob(f".{glob_escape(path.name)}-*-*-*")):
        kind, _, rest = stale.name[len(path.name) + 2:].partition("-")
        writer = rest.split("-", 1)[0]
        if kind not in ("new", "old") or not writer.isdigit() or _process_alive(int(writer)) or not stale.is_dir():
            continue
        if kind == "old" and (stale / "previous").is_dir() and not path.exists():
            os.replace(stale / "previous", path)
        shutil.rmtree(stale, ignore_errors=True)


#: An HDF5 file expected to be larger than this is written to disk as it is filled instead of built in memory.
HDF5_IN_MEMORY_BYTES = 2 << 30
#: Room for an HDF5 file's headers, attributes and chunk indexes beyond its arrays.
HDF5_OVERHEAD_BYTES = 1 << 20


def hdf5_bytes(*arrays, raw_bytes=0):
    """An upper bound of the size of an HDF5 file holding ``arrays`` (and ``raw_bytes`` more data not in hand)
    uncompressed: their bytes, a tenth more for the padding of partly filled edge chunks, and
    :data:`HDF5_OVERHEAD_BYTES` (``expected_bytes`` of :func:`hdf5_for_writing`)."""
    data = sum(np.asarray(array).nbytes for array in arrays if array is not None) + raw_bytes
    return int(1.1 * data) + HDF5_OVERHEAD_BYTES


@contextlib.contextmanager
def hdf5_for_writing(path, expected_bytes=None):
    """An HDF5 file to fill, built in memory and written to ``path`` in one go when it closes.

    HDF5 writing straight to a disk that fills up leaves the library unable to close the file: dozens of
    tracebacks and a segmentation fault (issue 37). Held in memory (the ``core`` driver), the data reach the
    disk in one write at close, whose failure is one ordinary error. Use inside :func:`atomic_path`.

    Parameters
    ----------
    path : path
        The file to write (a temporary of :func:`atomic_path`).
    expected_bytes : int, optional
        An upper bound of the file's size, where the writer knows one: checked against the free space first
        (:func:`check_free_space`), so a file that cannot fit is refused before anything is built. A file
        expected above :data:`HDF5_IN_MEMORY_BYTES` (an image corpus of tens of GB) cannot be held in memory: it
        is written to disk as it is filled, and only that check guards it (a disk that another program fills
        meanwhile can still crash HDF5).
    """
    import h5py

    if expected_bytes is not None:
        # Raised as the system's ENOSPC: the surrounding atomic_path turns it into the one line naming the output.
        shortfall = _free_space_shortfall(Path(path).parent, expected_bytes)
        if shortfall is not None:
            raise shortfall
        if expected_bytes > HDF5_IN_MEMORY_BYTES:
            with h5py.File(path, "w") as handle:
                yield handle
            return
    with h5py.File(path, "w", driver="core", backing_store=True) as handle:
        yield handle


def check_free_space(folder, n_bytes, path):
    """Raise :func:`storage_error`'s one line (nothing written) when ``folder`` has not ``n_bytes`` free for
    ``path``: checked before a write that cannot stop cleanly half-way (HDF5's; :func:`hdf5_for_writing`), or
    before the first of files that must all fit (``convert``'s pair)."""
    shortfall = _free_space_shortfall(folder, n_bytes)
    if shortfall is not None:
        raise storage_error(shortfall, path)


def _free_space_shortfall(folder, n_bytes):
    """An ``OSError(ENOSPC)`` saying what is needed and what is free when ``folder`` (or the nearest folder above
    it that exists) has not ``n_bytes`` free; None when it has, or when the free space cannot be read."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if free >= n_bytes:
        return None
    return OSError(errno.ENOSPC, f"No space left on device: {n_bytes / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free")


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


#: Digests of large files already computed in this process, by (path, inode, size, modification time in ns): the
#: binding checks hash the same stimulus file several times per command, and an NSD-sized one is tens of GB. Small
#: files are always read again (cheap, and safe from a same-size rewrite within the clock's resolution).
_DIGESTS = {}
_CACHE_DIGEST_BYTES = 64 << 20


def sha256_file(path, chunk_size=1 << 20):
    """SHA-256 hex digest of a file, read in chunks (a large one once per process while it is unchanged)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    if stat.st_size >= _CACHE_DIGEST_BYTES:
        _DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()


def tensor_digest(tensors):
    """SHA-256 hex digest of named tensors (a ``state_dict``): names, dtypes, shapes and bytes, in name order.

    Two decoders with the same digest compute the same function, whatever their files' metadata say (a
    fine-tuned decoder whose validation kept its start differs from the start's file only in its metadata).
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # The bytes through a uint8 view: NumPy has no bfloat16.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digests(folder, names):
    """``{name: SHA-256}`` of the files ``names`` (relative to ``folder``) that exist."""
    folder = Path(folder)
    return {str(name): sha256_file(folder / name) for name in names if (folder / name).is_file()}


def check_digests(folder, digests, what, fix):
    """Raise :class:`~mindvis.errors.MindvisError` unless every file of ``digests`` (``{name: SHA-256}``, relative
    to ``folder``, as :func:`file_digests` recorded them) is there with that content.

    ``what`` names the record (e.g. ``"dcldm.json"``); ``fix`` is the remedy the error gives.
    """
    folder = Path(folder)
    for name, expected in (digests or {}).items():
        path = folder / name
        if not path.is_file():
            raise MindvisError(f"missing, but {what} lists it", path=path, key=f"sha256.{name}", fix=fix)
        actual = sha256_file(path)
        if actual != expected:
            raise MindvisError(f"its SHA-256 {actual[:12]}... is not the {expected[:12]}... {what} recorded when it "
                               "was written: it was changed, or a write of it did not finish", path=path,
                               key=f"sha256.{name}", fix=fix)


#: Files above this size are identified by size and modification time instead of their hash (a base generator's
#: gigabytes would take a minute to read on every resume check).
HASH_LIMIT_BYTES = 256 << 20


def inputs_digest(paths):
    """One SHA-256 over input files and folders (every file under a folder, in name order).

    A file up to :data:`HASH_LIMIT_BYTES` counts by its content, a larger one by its size and modification
    time. Used to tell whether a checkpoint was trained on these inputs (resume).
    """
    digest = hashlib.sha256()
    for path in sorted(str(p) for p in paths):
        path = Path(path)
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            identity = (sha256_file(file) if stat.st_size <= HASH_LIMIT_BYTES
                        else f"{stat.st_size}:{stat.st_mtime_ns}")
            digest.update(f"{file}\0{identity}\0".encode())
    return digest.hexdigest()


def file_identity(path, chunk_size=1 << 20):
    """A path-independent identity of a file's content: its SHA-256 up to :data:`HASH_LIMIT_BYTES`; above, its
    size and the SHA-256 of its first and last ``chunk_size`` bytes (a base generator's gigabytes are not read
    whole on every load). Unlike :func:`inputs_digest`, neither the path nor the modification time counts, so a
    moved or copied folder keeps its identity."""
    path = Path(path)
    size = path.stat().st_size
    if size <= HASH_LIMIT_BYTES:
        return sha256_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(chunk_size))
        handle.seek(size - chunk_size)
        digest.update(handle.read(chunk_size))
    return f"size {size}, ends {digest.hexdigest()}"


def software_versions():
    """Versions of Python, the platform and the packages that shape results, and the CPU that computed them.

    The CPU model and, once torch is loaded, the instruction set its kernels
    dispatch to (``torch_cpu_capability``: AVX2, AVX512, ...) are recorded too:
    float results of one seed are repeatable on one machine, and a run on
    another CPU (a cloud VM moved to another host) may round differently.
    """
    versions = {"python": platform.python_version(), "platform": platform.platform(), "cpu": _cpu_model()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None:
        versions["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    versions["deterministic"] = "strict" if strict_determinism() else "warn"
    return versions


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seed_everything(seed):
    """Seed Python, NumPy and torch, and ask torch for deterministic kernels; return a NumPy Generator.

    ``torch.use_deterministic_algorithms`` swaps the few CPU kernels that
    accumulate in a thread-dependent order (index_add, scatter_add and the
    like) for ordered ones, and on CUDA also cuBLAS's and cuDNN's; at the sizes
    run here it costs nothing measurable. ``warn_only``: an op without a
    deterministic kernel warns instead of stopping a run.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    else:
        torch.manual_seed(seed)
        strict = strict_determinism()
        torch.use_deterministic_algorithms(True, warn_only=not strict)
        # cuBLAS needs a fixed workspace for deterministic matrix products (read when CUDA starts).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        if strict:
            from mindvis.utils.device import math_attention_only

            math_attention_only()
    return np.random.default_rng(seed)


#: Environment variable: ``1`` makes GPU runs bit-repeatable at some speed (docs/clusters.md, "Faults, bad input and repeatability").
DETERMINISTIC_ENV = "MINDVIS_DETERMINISTIC"


def strict_determinism():
    """Whether ``MINDVIS_DETERMINISTIC=1``: every op must have a deterministic kernel (an op without one raises
    instead of warning), and attention uses the math kernel on CUDA."""
    return os.environ.get(DETERMINISTIC_ENV, "0") == "1"


def derive_seed(seed, *names):
    """A stable child seed for a named part of a run (a subject, a stage).

    ``derive_seed(1, "simulate", "sub-01")`` is the same on every machine and
    differs between names, so stages and subjects draw independent streams.
    """
    digest = hashlib.sha256("/".join([str(seed), *map(str, names)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def set_threads(n_threads):
    """Cap BLAS and torch threads to the Snakemake rule's ``threads``."""
    if not n_threads:
        return
    n_threads = int(n_threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n_threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n_threads)
    except ImportError:
        pass
    # torch reads OMP_NUM_THREADS when it is first imported; only a torch that is
    # already loaded needs telling (importing it here would cost seconds per job).
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n_threads)
