"""The image corpus of a real data set: every subject's stimulus HDF5 merged into one.

The embedded base generator (``pretrain_ldm``) and the domain classifier learn
from one stimulus file. For the simulation that is the shared stimulus set; a
real data set has one stimulus file per subject (``results/{subject}/stimuli.h5``
from the ``convert`` stage), and its subjects may have seen different images
(NSD: about 9,000 images of each subject's own plus the shared 1,000). The
merged file holds

* ``train``: every subject's training images, each stimulus id once, minus any
  image that some subject is tested on (so no test image of any subject ever
  trains the generator);
* ``test``: every subject's test images, each stimulus id once (read only by
  the domain classifier's test-image accuracy, never for training);
* ``pool``: empty (real data sets have no unlabelled extra images).

Images are copied one file at a time, chunk by chunk, so merging never holds
more than one chunk of the inputs' images in memory. The merged file is built
in memory and written in one go (HDF5 writing straight to a disk that fills up
crashes), after a check that it fits; a corpus too large to hold in memory is
written as it is filled, guarded by that check alone
(:func:`mindvis.utils.io.hdf5_for_writing`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from mindvis.errors import MindvisError
from mindvis.utils.io import (
    atomic_path,
    hdf5_bytes,
    hdf5_for_writing,
    sha256_file,
    software_versions,
)

log = logging.getLogger(__name__)

#: Images copied at a time (256 x 256 RGB: 12 MB per 64).
COPY_CHUNK = 64
SPLITS = ("train", "test", "pool")


def _read_index(path):
    """Stimulus ids, labels and image shape of every split of one stimulus file, and its class names."""
    path = Path(path)
    if not path.exists():
        raise MindvisError("stimulus file not found", path=path, fix="run the 'convert' stage for this subject first.")
    with h5py.File(path, "r") as handle:
        if "class_names" not in handle.attrs:
            raise MindvisError("attribute missing", path=path, key="class_names")
        index = {"class_names": json.loads(handle.attrs["class_names"])}
        for name in SPLITS:
            for key in ("images", "label", "stimulus_id"):
                if f"{name}/{key}" not in handle:
                    raise MindvisError("dataset missing", path=path, key=f"{name}/{key}",
                                       fix="write the file with mindvis convert (layout in mindvis/data/stimuli.py).")
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in handle[f"{name}/stimulus_id"][()]]
            index[name] = {"ids": ids, "label": handle[f"{name}/label"][()].astype(np.int64),
                           "shape": tuple(handle[f"{name}/images"].shape[1:])}
    return index


def plan_merge(indexes):
    """Which rows of which file make each merged split.

    Parameters
    ----------
    indexes : list of dict
        :func:`_read_index` of each file, in order.

    Returns
    -------
    dict
        split -> list of (file number, row, stimulus id, label): each id once (first file wins),
        ``train`` without any id that is a test id in any file.
    """
    test_ids = {sid for index in indexes for sid in index["test"]["ids"]}
    plan = {}
    for split in ("train", "test"):
        seen, rows = set(), []
        for number, index in enumerate(indexes):
            for row, (sid, label) in enumerate(zip(index[split]["ids"], index[split]["label"])):
                if sid in seen or (split == "train" and sid in test_ids):
                    continue
                seen.add(sid)
                rows.append((number, row, sid, int(label)))
        plan[split] = rows
    return plan


def merge_stimulus_files(paths, out_path):
    """Merge subjects' stimulus HDF5 files into one image corpus (see the module docstring).

    Parameters
    ----------
    paths : list of str or Path
        The subjects' stimulus files (``results/{subject}/stimuli.h5``).
    out_path : str or Path
        The merged file to write (atomically).

    Returns
    -------
    dict
        Images per split, and training images dropped because some subject is tested on them.

    Raises
    ------
    MindvisError
        When no file is given, or files differ in class names or image shape (naming both files).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise MindvisError("no stimulus files to merge", key="subjects", fix="list at least one subject.")
    indexes = [_read_index(p) for p in paths]
    first = indexes[0]
    for path, index in zip(paths[1:], indexes[1:]):
        if index["class_names"] != first["class_names"]:
            raise MindvisError(f"class names differ from those of {paths[0]}", path=path, key="class_names",
                               fix="convert every subject with the same config (same class index files).")
        for split in ("train", "test"):
            if index[split]["ids"] and first[split]["ids"] and index[split]["shape"] != first[split]["shape"]:
                raise MindvisError(f"{split} images are {index[split]['shape']} but {first[split]['shape']} in "
                                   f"{paths[0]}", path=path, key=f"{split}/images",
                                   fix="convert every subject with the same stimuli.image_size and channels.")
    plan = plan_merge(indexes)
    n_train_ids = len({sid for index in indexes for sid in index["train"]["ids"]})
    summary = {"files": len(paths), "train": len(plan["train"]), "test": len(plan["test"]),
               "train_dropped_as_test": n_train_ids - len(plan["train"])}
    string_dtype = h5py.string_dtype("utf-8")
    # At most the images uncompressed (gzip level 1 saves little on photographs), their ids, labels and rows.
    expected = sum(len(plan.get(split, [])) * (int(np.prod(first[split]["shape"])) + 64) for split in SPLITS)
    sources = [h5py.File(p, "r") for p in paths]
    try:
        with atomic_path(out_path) as tmp, hdf5_for_writing(tmp, expected_bytes=hdf5_bytes(raw_bytes=expected)) as out:
            for key, value in sources[0].attrs.items():
                out.attrs[key] = value
            out.attrs["source"] = "merged:" + ",".join(str(sources[0].attrs.get("source", p)) for p in paths)
            out.attrs["merged_from"] = json.dumps({str(p): sha256_file(p) for p in paths})
            out.attrs["merge_summary"] = json.dumps(summary)
            out.attrs["versions"] = json.dumps(software_versions())
            for split in SPLITS:
                rows = plan.get(split, [])
                shape = first[split]["shape"]
                group = out.create_group(split)
                images = group.create_dataset(
                    "images", shape=(len(rows),) + shape, dtype=np.uint8,
                    chunks=(max(1, min(len(rows), 16)),) + shape if rows else None,
                    compression="gzip" if rows else None, compression_opts=1 if rows else None)
                for start in range(0, len(rows), COPY_CHUNK):
                    block = rows[start:start + COPY_CHUNK]
                    images[start:start + len(block)] = np.stack(
                        [sources[number][f"{split}/images"][row] for number, row, _, _ in block])
                group.create_dataset("label", data=np.asarray([r[3] for r in rows], dtype=np.int64))
                group.create_dataset("stimulus_id", data=np.asarray([r[2] for r in rows], dtype=object),
                                     dtype=string_dtype)
                group.create_dataset("source_index", data=np.asarray([r[1] for r in rows], dtype=np.int64))
    finally:
        for handle in sources:
            handle.close()
    log.info("merged %d stimulus files into %s: %s", len(paths), out_path, summary)
    return summary
