"""Natural Scenes Dataset (Allen et al. 2022): single-trial betas of one subject.

On disk (under ``data.nsd.root``, the layout of the NSD release)
-----------------------------------------------------------------
::

    nsddata/experiments/nsd/nsd_expdesign.mat
        masterordering [1, 30000]  1-based index into subjectim of every trial
        subjectim      [8, 10000]  1-based 73k image id of each subject's images
        sharedix       [1, 1000]   1-based 73k ids of the shared images (the test set)
    nsddata/ppdata/subjNN/{space}/roi/nsdgeneral.nii.gz        ROI (> 0 inside), [X, Y, Z]
    nsddata_betas/ppdata/subjNN/{space}/{betas}/betas_session01.hdf5
        betas int16 [750, Z, Y, X]   (MATLAB wrote it: axes reversed relative to the NIfTI)
    nsddata_betas/ppdata/subjNN/{space}/{betas}/betas_session01.nii.gz   int16 [X, Y, Z, 750]
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5
        imgBrick uint8 [73000, 425, 425, 3]

Trial ``t`` (0-based over the sessions read) showed 73k image
``subjectim[subject, masterordering[t] - 1]``; trials of the shared 1,000
images are the test set, averaged over their (up to 3) repeats in
``test_avg``; all other trials are training trials. Betas are divided by
``data.nsd.beta_scale`` (300: percent signal change). The run of a trial is
its session (the validation split holds out whole sessions). Voxels keep
their real grid (ijk and affine of the ROI file). Sessions are read one
chunk of trials at a time, so memory holds the output plus one chunk.
Stimulus ids are ``nsd-NNNNN`` (the 1-based 73k id); NSD images carry
several COCO categories, so labels are left unknown (-1).
"""

from __future__ import annotations

import numpy as np

from mindvis.data.sources.common import SourceData, require_file, source_subject, subject_number
from mindvis.errors import MindvisError

TRIALS_PER_SESSION = 750
NSD_TR = 1.6
NSD_ATTRIBUTION = "Natural Scenes Dataset, Allen et al. (2022) Nature Neuroscience 25:116-126"
#: Trials read from one session file at a time (an int16 1.8 mm volume is about 1.4 MB).
SESSION_CHUNK = 64


def nsd_paths(config, subject):
    """Paths of the design file, the ROI, the beta files (sorted by session) and the stimulus brick."""
    section = config["data"]["nsd"]
    root = require_file(section["root"], "data.nsd.root")
    number = subject_number(subject)
    name = source_subject(config, subject, f"subj{number:02d}")
    design = require_file(root / "nsddata/experiments/nsd/nsd_expdesign.mat", "data.nsd.root")
    roi = config["data"]["roi"] or "nsdgeneral"
    if roi.endswith((".nii", ".nii.gz")):
        roi_path = require_file(roi, "data.roi")
    else:
        roi_path = require_file(root / "nsddata/ppdata" / name / section["space"] / "roi" / f"{roi}.nii.gz",
                                "data.roi",
                                fix=f"set data.roi to an ROI file name under nsddata/ppdata/{name}/{section['space']}"
                                    "/roi/ (e.g. nsdgeneral) or to a NIfTI path.")
    beta_dir = require_file(root / "nsddata_betas/ppdata" / name / section["space"] / section["betas"],
                            "data.nsd.betas")
    suffix = ".hdf5" if section["format"] == "hdf5" else ".nii.gz"
    sessions = []
    for session in range(1, 100):
        path = beta_dir / f"betas_session{session:02d}{suffix}"
        if not path.exists():
            break
        sessions.append(path)
    if section["n_sessions"]:
        if len(sessions) < section["n_sessions"]:
            raise MindvisError(f"{section['n_sessions']} sessions asked for but betas_session01..{len(sessions):02d}"
                               f"{suffix} are all that exist", path=beta_dir, key="data.nsd.n_sessions",
                               fix="lower data.nsd.n_sessions or download the missing sessions.")
        sessions = sessions[:section["n_sessions"]]
    if not sessions:
        raise MindvisError(f"no betas_session01{suffix} found", path=beta_dir, key="data.nsd.format",
                           fix="check data.nsd.space / betas / format against the downloaded files.")
    stimuli = require_file(root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", "data.nsd.root")
    return name, design, roi_path, sessions, stimuli


def read_design(path, subject_index, n_trials):
    """73k image ids (1-based) of the first ``n_trials`` trials, and the shared (test) ids."""
    from mindvis.data.sources.arrays import ArrayFile

    with ArrayFile(path, config_key="data.nsd.root") as design:
        order = design.vector("masterordering", "trial order", np.int64)
        subject_images = design.read("subjectim", "subject images")
        shared = design.vector("sharedix", "shared images", np.int64)
    if len(order) < n_trials:
        raise MindvisError(f"masterordering lists {len(order)} trials but the beta files hold {n_trials}", path=path,
                           key="masterordering", fix="use the nsd_expdesign.mat of the NSD release.")
    if subject_images.ndim != 2 or subject_index >= subject_images.shape[0]:
        raise MindvisError(f"subjectim has shape {subject_images.shape}; subject row {subject_index + 1} is missing",
                           path=path, key="subjectim")
    return subject_images[subject_index, order[:n_trials] - 1].astype(np.int64), set(shared.tolist())


def read_nsd(config, subject):
    """Read one NSD subject into a :class:`SourceData` (betas are streamed, not loaded whole)."""
    import h5py
    import nibabel as nib

    section = config["data"]["nsd"]
    name, design_path, roi_path, sessions, stimuli_path = nsd_paths(config, subject)
    roi_image = nib.load(roi_path)
    roi_data = np.asarray(roi_image.dataobj)
    mask = roi_data > 0
    voxel_ijk = np.argwhere(mask).astype(np.int32)
    if len(voxel_ijk) == 0:
        raise MindvisError("the ROI holds no voxel (> 0)", path=roi_path, key="data.roi")
    labels = roi_data[mask]
    roi_name = roi_path.name.split(".")[0]
    voxel_roi = (np.full(len(voxel_ijk), roi_name, dtype=object) if len(np.unique(labels)) == 1
                 else np.asarray([f"{roi_name}:{int(v)}" for v in labels], dtype=object))

    n_trials = TRIALS_PER_SESSION * len(sessions)
    image_ids, shared = read_design(design_path, int(name[-2:]) - 1 if name[-2:].isdigit() else 0, n_trials)
    handles = []
    if section["format"] == "hdf5":
        for path in sessions:
            handle = h5py.File(path, "r")
            handles.append(handle)
            betas = handle["betas"] if "betas" in handle else None
            if betas is None:
                raise MindvisError("dataset missing", path=path, key="betas")
            if betas.shape != (TRIALS_PER_SESSION,) + mask.shape[::-1]:
                raise MindvisError(f"betas have shape {betas.shape} but the ROI has shape {mask.shape} (the HDF5 holds "
                                   f"[750, Z, Y, X]: expected {(TRIALS_PER_SESSION,) + mask.shape[::-1]})", path=path,
                                   key="betas", fix="use an ROI file of the same space (data.nsd.space).")
        # the HDF5 volume is [Z, Y, X]: flat indices of the ROI voxels in that order
        flat = np.ravel_multi_index((voxel_ijk[:, 2], voxel_ijk[:, 1], voxel_ijk[:, 0]), mask.shape[::-1])

        def read_session(session, lo, hi):
            block = handles[session]["betas"][lo:hi]
            return block.reshape(hi - lo, -1)[:, flat]
    else:
        # Chunks are read in increasing order: an open gzip stream then only ever seeks forward.
        images_ = [nib.load(path, keep_file_open=True) for path in sessions]
        for path, image in zip(sessions, images_):
            if image.shape != mask.shape + (TRIALS_PER_SESSION,):
                raise MindvisError(f"betas have shape {image.shape} but the ROI has shape {mask.shape}", path=path,
                                   key="data.roi", fix="use an ROI file of the same space (data.nsd.space).")

        def read_session(session, lo, hi):
            block = np.asarray(images_[session].dataobj[..., lo:hi])
            return block[mask].T

    scale = np.float32(section["beta_scale"])

    def read_trials(rows):
        rows = np.asarray(rows)
        out = np.empty((len(rows), len(voxel_ijk)), dtype=np.float32)
        session_of = rows // TRIALS_PER_SESSION
        for session in np.unique(session_of):
            positions = np.flatnonzero(session_of == session)
            within = rows[positions] - session * TRIALS_PER_SESSION
            for start in range(0, len(within), SESSION_CHUNK):
                part = within[start:start + SESSION_CHUNK]
                lo, hi = int(part[0]), int(part[-1]) + 1
                block = read_session(int(session), lo, hi)
                out[positions[start:start + SESSION_CHUNK]] = block[part - lo] / scale
        return out

    stimulus_file = h5py.File(stimuli_path, "r")
    handles.append(stimulus_file)
    if "imgBrick" not in stimulus_file:
        raise MindvisError("dataset missing", path=stimuli_path, key="imgBrick")
    brick = stimulus_file["imgBrick"]
    stimulus_ids = np.asarray([f"nsd-{i:05d}" for i in image_ids], dtype=object)
    part = np.asarray(["test" if i in shared else "train" for i in image_ids], dtype=object)

    def close():
        for handle in handles:
            handle.close()

    return SourceData(
        part=part, stimulus_id=stimulus_ids, run=np.repeat(np.arange(1, len(sessions) + 1), TRIALS_PER_SESSION),
        read_trials=read_trials, n_voxels=len(voxel_ijk), voxel_ijk=voxel_ijk, affine=roi_image.affine,
        volume_shape=mask.shape, voxel_roi=voxel_roi,
        images={f"nsd-{i:05d}": (lambda i=int(i): brick[i - 1]) for i in np.unique(image_ids)},
        stimulus_label={}, class_names=[], tr=NSD_TR,
        input_files=[design_path, roi_path, *sessions, stimuli_path], close=close,
        notes={"attribution": NSD_ATTRIBUTION, "source_subject": name, "roi": str(roi_path),
               "sessions": len(sessions), "beta_scale": float(section["beta_scale"]),
               "format": section["format"], "run": "session number"})
