"""Real data: Haxby et al. (2001) subject 1, one slice (tests/data/haxby2001/, MIT licence).

The committed BOLD (12 runs of 121 volumes, TR 2.5 s) and per-volume labels are
turned into a BIDS data set (one events row per block of a category), then the
same preprocessing the simulated subjects get (ROI = the slice's mask) makes
``responses.h5``; leave-one-run-out cross-validation decodes the 8 categories.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mindvis.config import validate
from mindvis.data.responses import load_responses
from mindvis.preprocess.run import preprocess_subject

DATA = Path(__file__).parent / "data" / "haxby2001"
TR = 2.5
SUBJECT = "sub-1"


def haxby_to_bids(root):
    """Write the Haxby slice as BIDS: per run a BOLD file, sidecar and block events.

    Returns
    -------
    Path
        The BIDS root.
    """
    attributes = pd.read_csv(DATA / "attributes_literal.txt", sep=" ", header=None, names=["label", "run"])
    image = nib.load(DATA / "bold.nii.gz")
    data = np.asanyarray(image.dataobj)
    func = Path(root) / SUBJECT / "func"
    func.mkdir(parents=True)
    for run, rows in attributes.groupby("run"):
        index = rows.index.to_numpy()
        labels = rows["label"].to_numpy()
        stem = func / f"{SUBJECT}_task-objects_run-{run + 1:02d}"
        nib.save(nib.Nifti1Image(data[..., index], image.affine, image.header), f"{stem}_bold.nii.gz")
        Path(f"{stem}_bold.json").write_text(json.dumps({"RepetitionTime": TR}))
        # A block is a maximal stretch of volumes of one category; rest is not an event.
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        lengths = np.diff(np.r_[starts, len(labels)])
        events = [{"onset": start * TR, "duration": length * TR, "trial_type": "train",
                   "stimulus_id": f"{labels[start]}-run{run + 1:02d}", "class": labels[start]}
                  for start, length in zip(starts, lengths) if labels[start] != "rest"]
        pd.DataFrame(events).to_csv(f"{stem}_events.tsv", sep="\t", index=False)
    return Path(root)


@pytest.fixture(scope="module")
def haxby_bids(tmp_path_factory):
    return haxby_to_bids(tmp_path_factory.mktemp("haxby"))


def _leave_one_run_out_accuracy(responses):
    from sklearn.model_selection import LeaveOneGroupOut, cross_val_score
    from sklearn.svm import LinearSVC

    fmri = np.concatenate([responses["train"].fmri, responses["val"].fmri])
    label = np.concatenate([responses["train"].label, responses["val"].label])
    run = np.concatenate([responses["train"].run, responses["val"].run])
    classifier = LinearSVC(C=0.01, max_iter=20000)
    return cross_val_score(classifier, fmri, label, groups=run, cv=LeaveOneGroupOut()).mean()


@pytest.mark.parametrize("method, lag_window", [("lag_average", [5.0, 25.0]), ("glm_lsa", [4.0, 8.0])])
def test_haxby_categories_decoded_well_above_chance(haxby_bids, tmp_path, method, lag_window):
    config = validate({"seed": 0, "preprocess": {
        "method": method, "lag_window": lag_window, "confounds": [], "roi": str(DATA / "mask.nii.gz")}})
    out = tmp_path / "responses.h5"
    report = preprocess_subject(config, haxby_bids, SUBJECT, out)
    responses = load_responses(out)
    assert len(responses.class_names) == 8 and "rest" not in responses.class_names
    assert report["n_trials"]["train"] + report["n_trials"]["val"] == 12 * 8
    assert responses.n_voxels == int((nib.load(DATA / "mask.nii.gz").get_fdata() != 0).sum())
    accuracy = _leave_one_run_out_accuracy(responses)
    print(f"Haxby 2001 sub-1 slice, {method}: leave-one-run-out accuracy {accuracy:.3f} (chance 0.125)")
    # Published work on this slice reaches about 0.6-0.8; chance is 1/8.
    assert accuracy > 0.45
