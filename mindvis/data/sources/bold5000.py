"""BOLD5000 (Chang et al. 2019), release 2: GLMsingle single-trial ROI betas.

On disk
-------
``data.bold5000.betas_dir``::

    CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_LHEarlyVis.npy   float [n_trials, n_voxels_roi]
    CSI1_GLMbetas-TYPED-FITHRF-GLMDENOISE-RR_allses_RHEarlyVis.npy   ... one file per hemisphere and ROI
    ...                                                               (EarlyVis, LOC, OPA, PPA, RSC)

``data.bold5000.stimuli_dir`` (``BOLD5000_Stimuli``)::

    Stimuli_Presentation_Lists/CSI1/CSI1_sess01/CSI1_sess01_run01.txt   one image file name per line
    Scene_Stimuli/Presented_Stimuli/{COCO,ImageNet,Scene}/<image file>
    Scene_Stimuli/repeated_stimuli_113_list.txt                         the repeated (test) images

The betas' rows follow the presentation lists read in order (sessions, then
runs, then lines); a ``rep_`` prefix on a name marks a repeat and is dropped.
Trials of the 113 repeated images form the test set (averaged per image in
``test_avg``); all others are training trials. The run of a trial is
``100 * session + run``. Classes are the image's source collection (COCO,
ImageNet, Scene). Voxels have no coordinates in these files: they are laid on
a 1-D grid in file order (LH before RH, ROIs in ``data.bold5000.rois`` order),
and each voxel's ROI is recorded as e.g. ``LHEarlyVis``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from mindvis.data.sources.common import (SourceData, line_geometry, load_rgb_image, require_file, source_subject,
                                         subject_number)
from mindvis.errors import MindvisError

BOLD5000_TR = 2.0
BOLD5000_ATTRIBUTION = "BOLD5000, Chang et al. (2019) Scientific Data 6:49; release 2.0 GLMsingle betas"
COLLECTIONS = ("COCO", "ImageNet", "Scene")


def presentation_list(stimuli_dir, subject_name):
    """Image names and runs of every trial, in the order of the betas' rows.

    Returns
    -------
    names : list of str
    runs : int64 [N]
        ``100 * session + run``.
    files : list of Path
    """
    folder = require_file(Path(stimuli_dir) / "Stimuli_Presentation_Lists" / subject_name,
                          "data.bold5000.stimuli_dir")
    names, runs, files = [], [], []
    sessions = sorted(p for p in folder.iterdir() if p.is_dir())
    for session_index, session in enumerate(sessions, start=1):
        match = re.search(r"sess(\d+)", session.name)
        session_number = int(match.group(1)) if match else session_index
        for run_index, path in enumerate(sorted(session.glob("*.txt")), start=1):
            match = re.search(r"run(\d+)", path.name)
            run_number = int(match.group(1)) if match else run_index
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            names += [line[4:] if line.startswith("rep_") else line for line in lines]
            runs += [100 * session_number + run_number] * len(lines)
            files.append(path)
    if not names:
        raise MindvisError("no presentation lists found", path=folder, key="data.bold5000.stimuli_dir",
                           fix="point stimuli_dir at BOLD5000_Stimuli (with Stimuli_Presentation_Lists/CSI*/).")
    return names, np.asarray(runs, dtype=np.int64), files


def _image_index(stimuli_dir):
    root = require_file(Path(stimuli_dir) / "Scene_Stimuli" / "Presented_Stimuli", "data.bold5000.stimuli_dir")
    index = {}
    for collection in COLLECTIONS:
        folder = root / collection
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    index.setdefault(path.name, (collection, path))
    return index


def read_bold5000(config, subject):
    """Read one BOLD5000 subject (``CSI1`` ..) into a :class:`SourceData`."""
    section = config["data"]["bold5000"]
    name = source_subject(config, subject, f"CSI{subject_number(subject)}")
    betas_dir = require_file(section["betas_dir"], "data.bold5000.betas_dir")
    names, runs, list_files = presentation_list(section["stimuli_dir"], name)

    blocks, rois, beta_files = [], [], []
    for hemisphere in section["hemispheres"]:
        for roi in section["rois"]:
            path = betas_dir / f"{name}_{section['beta_type']}_{hemisphere}{roi}.npy"
            require_file(path, "data.bold5000.betas_dir",
                         fix=f"put {path.name} in data.bold5000.betas_dir, or adjust data.bold5000.rois / beta_type.")
            betas = np.load(path, mmap_mode="r", allow_pickle=False)
            if betas.ndim != 2 or betas.shape[0] != len(names):
                raise MindvisError(
                    f"betas have shape {betas.shape} but the presentation lists of {name} name {len(names)} trials",
                    path=path, key=f"{hemisphere}{roi}",
                    fix="use the presentation lists of the same subject and all its sessions.")
            blocks.append(betas)
            rois += [f"{hemisphere}{roi}"] * betas.shape[1]
            beta_files.append(path)

    repeated_path = require_file(Path(section["stimuli_dir"]) / "Scene_Stimuli" / section["repeated_list"],
                                 "data.bold5000.repeated_list")
    repeated = {line.strip() for line in repeated_path.read_text().splitlines() if line.strip()}
    index = _image_index(section["stimuli_dir"])
    missing = sorted(set(names) - set(index))
    if missing:
        raise MindvisError(f"{len(missing)} presented images not found, e.g. {missing[:3]}",
                           path=Path(section["stimuli_dir"]) / "Scene_Stimuli" / "Presented_Stimuli",
                           key="data.bold5000.stimuli_dir", fix="unpack the full BOLD5000_Stimuli release there.")
    part = np.asarray(["test" if n in repeated else "train" for n in names], dtype=object)
    labels = {n: COLLECTIONS.index(index[n][0]) for n in set(names)}
    n_voxels = len(rois)

    def read_trials(rows):
        return np.concatenate([np.asarray(block[rows], dtype=np.float32) for block in blocks], axis=1)

    voxel_ijk, affine, volume_shape = line_geometry(n_voxels)
    return SourceData(
        part=part, stimulus_id=np.asarray(names, dtype=object), run=runs, read_trials=read_trials,
        n_voxels=n_voxels, voxel_ijk=voxel_ijk, affine=affine, volume_shape=volume_shape,
        voxel_roi=np.asarray(rois, dtype=object),
        images={n: (lambda p=index[n][1]: load_rgb_image(p)) for n in set(names)}, stimulus_label=labels,
        class_names=list(COLLECTIONS), tr=BOLD5000_TR,
        input_files=beta_files + list_files + [repeated_path] + sorted(index[n][1] for n in set(names)),
        notes={"attribution": BOLD5000_ATTRIBUTION, "source_subject": name, "rois": list(section["rois"]),
               "hemispheres": list(section["hemispheres"]), "n_repeated_images_listed": len(repeated),
               "voxel_grid": "1-D in file order"})
