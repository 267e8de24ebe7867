"""Benchmark the real-data adapters on synthetic files of real sizes: wall time and peak memory.

Cases
-----
``god_npz``    a GOD-sized subject in MinD-Vis's npz form: 4,700 voxels (4,500 in VC),
               3,000 training trials, 1,750 test trials (50 images x 35), 1,250 images
               of 256 x 256 x 3, converted at stimuli.image_size 256.
``god_bdata``  the same subject as a BData HDF5 (read lazily with h5py) plus 1,250 JPEGs.
``nsd``        an NSD-sized subject: 40 sessions x 750 trials = 30,000 trials, 15,000 ROI
               voxels on a 30 x 30 x 25 grid (int16 HDF5 betas, [750, Z, Y, X] as NSD stores
               them), 10,000 distinct images; images converted at 32 x 32 to keep the image
               part small (at 256 x 256 x 3 the 10,000 images add about 2 GB, held before
               and freed ahead of the responses, so they never add to the responses' peak).

Each conversion runs in a fresh child process (one BLAS thread) that reports
its wall time and peak resident memory (``ru_maxrss``); generation time is
not counted. Results go to ``benchmarks/results/adapters.md``.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adapters.py --workdir /tmp/mindvis-bench [--cases god_npz nsd]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("god_npz", "god_bdata", "nsd")
GOD = dict(n_all=4700, n_vc=4500, n_train=3000, n_train_images=1200, n_test_images=50, repeats=35, side=256)
NSD = dict(sessions=40, grid=(30, 30, 25), n_roi=15000, n_images=10000, image_side=64)


def _smooth_images(rng, n, side):
    """Images with large smooth structure (compress like photographs, unlike white noise)."""
    coarse = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, side // 8, axis=1), side // 8, axis=2)


def make_god_npz(folder, rng):
    folder.mkdir(parents=True, exist_ok=True)
    g = GOD
    vc = np.zeros(g["n_all"], bool)
    vc[: g["n_vc"]] = True
    n_test = g["n_test_images"] * g["repeats"]
    arr_1 = rng.normal(size=(n_test, g["n_all"])).astype(np.float32)
    np.savez(folder / "sbj_1.npz", arr_0=rng.normal(size=(g["n_train"], g["n_all"])).astype(np.float32), arr_1=arr_1,
             arr_2=arr_1.reshape(g["n_test_images"], g["repeats"], -1).mean(axis=1),
             arr_3=rng.integers(0, g["n_train_images"], g["n_train"]), VC=vc)
    np.savez(folder / "images_256.npz", train_images=_smooth_images(rng, g["n_train_images"], g["side"]),
             test_images=_smooth_images(rng, g["n_test_images"], g["side"]))
    return {"source": "god_npz", "god_npz": {"dir": str(folder)}}, {"image_size": 256, "channels": 3}


def make_god_bdata(folder, rng):
    from PIL import Image

    g = GOD
    folder.mkdir(parents=True, exist_ok=True)
    image_dir = folder / "images"
    image_dir.mkdir(exist_ok=True)
    train_labels = [1000000 + i // 8 + (i % 8 + 1) / 1e6 for i in range(g["n_train_images"])]
    test_labels = [2000000 + i + 1 / 1e6 for i in range(g["n_test_images"])]
    from mindvis.data.sources.god import god_image_name

    for label, image in zip(train_labels + test_labels,
                            _smooth_images(rng, len(train_labels) + len(test_labels), g["side"])):
        Image.fromarray(image).save(image_dir / f"{god_image_name(label)}.JPEG", quality=90)
    shown = list(rng.choice(train_labels, g["n_train"])) + list(np.repeat(test_labels, g["repeats"]))
    n_samples = len(shown)
    kinds = [1] * g["n_train"] + [2] * (n_samples - g["n_train"])
    runs = list(np.arange(g["n_train"]) // 50 + 1) + list(np.arange(n_samples - g["n_train"]) // 50 + 101)
    n_columns = g["n_all"] + 3
    dataset = np.empty((n_samples, n_columns))
    dataset[:, : g["n_all"]] = rng.normal(size=(n_samples, g["n_all"]))
    dataset[:, g["n_all"]:] = np.stack([kinds, runs, shown], axis=1)
    keys, values = [], []

    def meta(key, columns, value=1.0):
        row = np.full(n_columns, np.nan)
        row[columns] = value
        keys.append(key)
        values.append(row)

    meta("VoxelData", slice(0, g["n_all"]))
    meta("ROI_VC", slice(0, g["n_vc"]))
    meta("DataType", g["n_all"])
    meta("Run", g["n_all"] + 1)
    meta("Label", g["n_all"] + 2)
    xyz = np.stack(np.unravel_index(np.arange(g["n_all"]), (20, 20, 12)), axis=1) * 3.0
    for axis, key in enumerate(("voxel_x", "voxel_y", "voxel_z")):
        meta(key, slice(0, g["n_all"]), xyz[:, axis])
    with h5py.File(folder / "Subject1.h5", "w") as handle:
        handle.create_dataset("dataset", data=dataset)
        handle.create_dataset("metadata/key", data=[k.encode() for k in keys])
        handle.create_dataset("metadata/description", data=[b""] * len(keys))
        handle.create_dataset("metadata/value", data=np.stack(values))
    return ({"source": "god_bdata", "god_bdata": {"dir": str(folder), "image_dir": str(image_dir)}},
            {"image_size": 256, "channels": 3})


def make_nsd(root, rng):
    from scipy.io import savemat

    n = NSD
    grid = n["grid"]
    design = root / "nsddata/experiments/nsd"
    design.mkdir(parents=True, exist_ok=True)
    n_trials = 750 * n["sessions"]
    subjectim = np.stack([rng.permutation(n["n_images"]) + 1 for _ in range(8)])
    savemat(design / "nsd_expdesign.mat", {
        "masterordering": rng.integers(1, n["n_images"] + 1, n_trials)[None], "subjectim": subjectim,
        "sharedix": np.sort(subjectim[0, :1000])[None]})
    import nibabel as nib

    roi = np.zeros(grid, np.int16) - 1
    roi.reshape(-1)[rng.choice(roi.size, n["n_roi"], replace=False)] = 1
    roi_dir = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    roi_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(roi, np.diag([1.8, 1.8, 1.8, 1])), roi_dir / "nsdgeneral.nii.gz")
    beta_dir = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    beta_dir.mkdir(parents=True, exist_ok=True)
    for session in range(1, n["sessions"] + 1):
        with h5py.File(beta_dir / f"betas_session{session:02d}.hdf5", "w") as handle:
            handle.create_dataset("betas", data=(rng.normal(size=(750,) + grid[::-1]) * 300).astype(np.int16))
    stim = root / "nsddata_stimuli/stimuli/nsd"
    stim.mkdir(parents=True, exist_ok=True)
    with h5py.File(stim / "nsd_stimuli.hdf5", "w") as handle:
        handle.create_dataset("imgBrick", data=_smooth_images(rng, n["n_images"], n["image_side"]))
    return {"source": "nsd", "nsd": {"root": str(root)}}, {"image_size": 32, "channels": 3}


MAKERS = {"god_npz": make_god_npz, "god_bdata": make_god_bdata, "nsd": make_nsd}


def _peak_rss_mb():
    """This process's peak resident memory in MB.

    Linux's ``VmHWM`` belongs to the process image, unlike ``ru_maxrss``, which a
    child started by fork + exec inherits from its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def child(case, workdir):
    """Convert one prepared case in this process; print a JSON line with time and peak memory."""
    from mindvis.config import validate
    from mindvis.data.sources import convert_subject

    spec = json.loads((Path(workdir) / case / "spec.json").read_text())
    config = validate({"stimuli": spec["stimuli"], "data": spec["data"]})
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    summary = convert_subject(config, "sub-01", Path(workdir) / case / "out/responses.h5",
                              Path(workdir) / case / "out/stimuli.h5")
    wall = time.perf_counter() - start
    peak = _peak_rss_mb()
    out = Path(workdir) / case / "out/responses.h5"
    print(json.dumps({"case": case, "wall_s": round(wall, 2), "peak_rss_mb": peak,
                      "rss_before_mb": baseline, "responses_mb": round(out.stat().st_size / 2**20),
                      "summary": summary}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/mindvis-bench-adapters")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=CASES)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/adapters.md"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.workdir)

    workdir = Path(args.workdir)
    rows = []
    for case in args.cases:
        folder = workdir / case
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        data, stimuli = MAKERS[case](folder / "data", rng)
        generated = time.perf_counter() - start
        (folder / "spec.json").write_text(json.dumps({"data": data, "stimuli": stimuli}))
        load_before = os.getloadavg()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--child", case],
                                capture_output=True, text=True, env=env, check=True)
        record = json.loads(result.stdout.strip().splitlines()[-1])
        record.update(generate_s=round(generated, 1), load_before=[round(v, 2) for v in load_before],
                      load_after=[round(v, 2) for v in os.getloadavg()])
        print(json.dumps(record))
        rows.append(record)
    write_report(rows, Path(args.out))


def write_report(rows, path):
    lines = ["# Real-data adapters: conversion time and peak memory", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; Python "
             f"{platform.python_version()}; one BLAS thread. Command: "
             "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adapters.py`.", "",
             "| case | trials (train / val / test) | voxels | wall (s) | peak RSS (MB) | RSS before (MB) | "
             "responses.h5 (MB) | "
             "load avg before -> after (1 min) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        s = row["summary"]
        lines.append(f"| {row['case']} | {s['n_train']} / {s['n_val']} / {s['n_test']} | {s['n_voxels']} | "
                     f"{row['wall_s']} | {row['peak_rss_mb']} | {row['rss_before_mb']} | {row['responses_mb']} | "
                     f"{row['load_before'][0]} -> {row['load_after'][0]} |")
    lines += ["", "Wall time includes reading, z-scoring, averaging, the noise ceiling, hashing every input "
              "file (SHA-256) and writing both outputs; peak RSS is the whole child process (Python, NumPy, "
              "h5py, PIL), read from Linux's VmHWM; 'before' is the peak after imports and config, before "
              "any data is read.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
