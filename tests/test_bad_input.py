"""Bad input: a corpus of broken files, each with the one-line error it must give, and property tests.

Every case of :data:`CASES` writes one bad input under ``tmp_path`` (beside a good earlier output wherever the
operation writes one: ``responses.h5``, ``stimuli.h5``, an SC-MBM folder), runs mindvis's public loader on it and
checks the error a user meets: a :class:`~mindvis.errors.MindvisError` (never a library's traceback) on one line,
naming the file, the key where one applies, and a fix; and nothing already on disk changed, no temporary left
behind, no pickled code run. The property tests at the end throw random configs and random arrays at the same
loaders: they load, or fail with that one kind of error.
"""

import copy
import gzip
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ldm_fixtures import save_tiny_mbm, write_synthetic_responses, write_synthetic_stimuli
from mindvis import config as config_module
from mindvis.config import load_config, validate
from mindvis.data.responses import load_responses
from mindvis.data.sources import convert_subject
from mindvis.data.stimuli import load_stimulus_set
from mindvis.errors import MindvisError
from mindvis.models.mbm import load_pretrained_mbm
from mindvis.models.mindvis_checkpoint import import_mindvis_checkpoint
from mindvis.models.weights import load_weights, save_weights
from mindvis.preprocess.run import REPORT_NAME, preprocess_subject
from mindvis.preprocess.synthetic import make_synthetic_bids

SUBJECT = "sub-01"
#: Created by the pickled payload if any loader ever ran it.
MARKER = "PAYLOAD_RAN"
BIDS_SHAPE = (5, 6, 4)
#: Trials x voxels of the good matrix file; 3 test images shown twice.
N_TRAIN, N_TEST, N_VOXELS = 12, 6, 9


# -- the good inputs each case breaks ----------------------------------------------------------------

class Good:
    """Good inputs and outputs, built once per module under ``root``; cases copy them into their tmp_path."""

    def __init__(self, root):
        self.root = Path(root)
        rng = np.random.default_rng(0)
        self.stimuli = self.root / "good" / "stimuli.h5"
        self.responses = self.root / "good" / "responses.h5"
        write_synthetic_responses(self.responses, write_synthetic_stimuli(self.stimuli))
        self.bids = make_synthetic_bids(self.root / "bids", shape=BIDS_SHAPE, n_classes=2, n_train_per_class=4,
                                        n_test=2, n_repeats=2, trials_per_run=4, seed=2).bids_dir
        self.preprocessed = self.root / "preprocessed" / SUBJECT / "responses.h5"
        preprocess_subject(bids_config(), self.bids, SUBJECT, self.preprocessed)
        self.matrix = matrix_arrays(rng)
        self.god_npz = write_god_npz(self.root / "god_npz", rng)
        self.god_bdata, self.god_images = write_god_bdata(self.root / "god_bdata", self.root / "god_images", rng)
        self.mbm = save_tiny_mbm(self.root / "mbm")
        self.mindvis_state = mindvis_state()
        torch.save({"model": self.mindvis_state}, self.root / "fmri_encoder.pth")
        self.imported = self.root / "imported"
        import_mindvis_checkpoint(self.root / "fmri_encoder.pth", self.imported, num_heads=2, decoder_num_heads=2)
        # The untouched bases convert cleanly: each case's error comes from its own damage.
        np.savez(self.root / "matrix.npz", **self.matrix)
        for source, config in (("matrix", matrix_config(self.root / "matrix.npz")),
                               ("god_npz", god_npz_config(self.god_npz)),
                               ("god_bdata", god_bdata_config(self.god_bdata, self.god_images))):
            out = self.root / "converted" / source
            convert_subject(config, SUBJECT, out / "responses.h5", out / "stimuli.h5")
        load_pretrained_mbm(self.mbm)

    def results(self, tmp_path):
        """A results folder holding good outputs, where a conversion of the bad input would write."""
        out = tmp_path / "results" / SUBJECT
        out.mkdir(parents=True)
        shutil.copy(self.responses, out / "responses.h5")
        shutil.copy(self.stimuli, out / "stimuli.h5")
        return out


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return Good(tmp_path_factory.mktemp("good"))


def bids_config():
    return validate({"seed": 3})


def matrix_config(path, **matrix):
    keys = {"train_labels": "train_labels", "test_labels": "test_labels", **matrix.pop("keys", {})}
    return validate({"seed": 3, "stimuli": {"image_size": 8, "channels": 1}, "preprocess": {"val_fraction": 0.25},
                     "data": {"source": "matrix", "trials_per_block": 3,
                              "matrix": {"path": str(path), "keys": keys, **matrix}}})


def god_npz_config(folder):
    return validate({"seed": 3, "stimuli": {"image_size": 8, "channels": 3}, "preprocess": {"val_fraction": 0.25},
                     "data": {"source": "god_npz", "trials_per_block": 3, "god_npz": {"dir": str(folder)}}})


def god_bdata_config(folder, image_dir):
    return validate({"seed": 3, "stimuli": {"image_size": 8, "channels": 3}, "preprocess": {"val_fraction": 0.25},
                     "data": {"source": "god_bdata",
                              "god_bdata": {"dir": str(folder), "image_dir": str(image_dir)}}})


def matrix_arrays(rng):
    """A lab's matrix file: trials x voxels, one grey image per trial (test images repeated), labels."""
    return {"train_fmri": rng.normal(size=(N_TRAIN, N_VOXELS)), "test_fmri": rng.normal(size=(N_TEST, N_VOXELS)),
            "train_images": rng.integers(0, 256, (N_TRAIN, 8, 8), dtype=np.uint8),
            "test_images": np.repeat(rng.integers(0, 256, (N_TEST // 2, 8, 8), dtype=np.uint8), 2, axis=0),
            "train_labels": np.arange(N_TRAIN) % 3, "test_labels": np.repeat(np.arange(N_TEST // 2), 2)}


GOD_TRAIN = [f"n01518878_{100 + i}" for i in range(6)]
GOD_TEST = [f"n01639765_{900 + i}" for i in range(2)]


def write_god_npz(folder, rng, n_voxels=10):
    """sbj_1.npz and images_256.npz as MinD-Vis ships them: 6 training images, 2 test images shown twice."""
    folder.mkdir(parents=True)
    single = rng.normal(size=(4, n_voxels))
    vc = np.zeros(n_voxels, bool)
    vc[1:9] = True
    np.savez(folder / "sbj_1.npz", arr_0=rng.normal(size=(6, n_voxels)), arr_1=single,
             arr_2=single.reshape(2, 2, n_voxels).mean(axis=1), arr_3=rng.permutation(6), VC=vc)
    np.savez(folder / "images_256.npz", train_images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
             test_images=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    (folder / "imagenet_training_label.csv").write_text("".join(f"{n}.JPEG,x\n" for n in GOD_TRAIN))
    (folder / "imagenet_testing_label.csv").write_text("".join(f"{n}.JPEG,x\n" for n in GOD_TEST))
    return folder


def write_god_bdata(folder, image_dir, rng, n_voxels=6):
    """Subject1.h5 in bdpy's BData layout (dataset + metadata key/value), with the images it names."""
    from PIL import Image

    def label(name):
        category, image = name[1:].split("_")
        return int(category) + int(image) / 1e6

    samples = [(1, 1 + i // 3, label(n)) for i, n in enumerate(GOD_TRAIN)]
    samples += [(2, 3 + i, label(n)) for i in range(2) for n in GOD_TEST]
    data = np.column_stack([rng.normal(size=(len(samples), n_voxels)), np.array(samples)])
    columns = n_voxels + 3
    keys = ["VoxelData", "ROI_VC", "DataType", "Run", "Label"]
    value = np.full((len(keys), columns), np.nan)
    value[0, :n_voxels] = value[1, :n_voxels] = 1
    for row in range(3):
        value[2 + row, n_voxels + row] = 1
    folder.mkdir(parents=True)
    with h5py.File(folder / "Subject1.h5", "w") as handle:
        handle.create_dataset("dataset", data=data)
        handle.create_dataset("metadata/key", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        handle.create_dataset("metadata/value", data=value)
    image_dir.mkdir(parents=True)
    for name in GOD_TRAIN + GOD_TEST:
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(image_dir / f"{name}.JPEG")
    return folder, image_dir


def mindvis_state(embed=8, patch=4, tokens=3, decoder=4):
    """A tiny MinD-Vis SC-MBM state dict (timm ViT names, one encoder and one decoder block)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    def block(prefix, width):
        return {f"{prefix}.norm1.weight": 1 + rand(width), f"{prefix}.norm1.bias": rand(width),
                f"{prefix}.attn.qkv.weight": rand(3 * width, width), f"{prefix}.attn.qkv.bias": rand(3 * width),
                f"{prefix}.attn.proj.weight": rand(width, width), f"{prefix}.attn.proj.bias": rand(width),
                f"{prefix}.norm2.weight": 1 + rand(width), f"{prefix}.norm2.bias": rand(width),
                f"{prefix}.mlp.fc1.weight": rand(width, width), f"{prefix}.mlp.fc1.bias": rand(width),
                f"{prefix}.mlp.fc2.weight": rand(width, width), f"{prefix}.mlp.fc2.bias": rand(width)}

    return {"cls_token": rand(1, 1, embed), "pos_embed": rand(1, 1 + tokens, embed),
            "patch_embed.proj.weight": rand(embed, 1, patch), "patch_embed.proj.bias": rand(embed),
            "norm.weight": 1 + rand(embed), "norm.bias": rand(embed), **block("blocks.0", embed),
            "decoder_embed.weight": rand(decoder, embed), "decoder_embed.bias": rand(decoder),
            "mask_token": rand(1, 1, decoder), "decoder_pos_embed": rand(1, 1 + tokens, decoder),
            "decoder_norm.weight": 1 + rand(decoder), "decoder_norm.bias": rand(decoder),
            "decoder_pred.weight": rand(patch, decoder), "decoder_pred.bias": rand(patch),
            **block("decoder_blocks.0", decoder)}


class RunsCodeWhenUnpickled:
    """A pickled custom class whose unpickling would create ``marker``: no loader may ever run it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save_payload(obj, path):
    """``torch.save(obj, path)``, checking that the pickle really carries the payload (``io.open``)."""
    import pickletools
    import zipfile

    torch.save(obj, path)
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    assert any(op.name == "GLOBAL" and arg == "io open" for op, arg, _ in pickletools.genops(data))
    return path


# -- building blocks of the cases ---------------------------------------------------------------------

def config_text(text):
    def build(tmp_path, good):
        path = tmp_path / "experiment.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return lambda: load_config(path)
    return build


def config_folder(tmp_path, good):
    (tmp_path / "experiment.yaml").mkdir()
    return lambda: load_config(tmp_path / "experiment.yaml")


def func_file(root, run, suffix):
    return root / SUBJECT / "func" / f"{SUBJECT}_task-objects_run-{run:02d}_{suffix}"


def derivative(root, suffix):
    folder = root / "derivatives" / "simulation" / SUBJECT
    return next(folder.glob(f"{SUBJECT}_*{suffix}"))


def rewrite_nifti(path, transform):
    image = nib.load(path)
    data, affine = transform(np.asanyarray(image.dataobj).copy(), image.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def shift_affine(data, affine):
    affine[0, 3] += 3.0
    return data, affine


def edit_tsv(path, edit):
    edit(pd.read_csv(path, sep="\t")).to_csv(path, sep="\t", index=False)


def bids_case(damage):
    """Preprocess a copy of the good BIDS data set with ``damage(root)`` done, over a good earlier output."""
    def build(tmp_path, good):
        root = tmp_path / "bids"
        shutil.copytree(good.bids, root)
        out = tmp_path / "results" / SUBJECT / "responses.h5"
        out.parent.mkdir(parents=True)
        shutil.copy(good.preprocessed, out)
        shutil.copy(good.preprocessed.with_name(REPORT_NAME), out.with_name(REPORT_NAME))
        damage(root)
        return lambda: preprocess_subject(bids_config(), root, SUBJECT, out)
    return build


def truncate_gzip(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def truncate_inside_gzip(path):
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) * 2 // 3]))


def replace_dataset(handle, key, data, **kwargs):
    del handle[key]
    handle.create_dataset(key, data=data, **kwargs)


def h5_case(loader, source, name, edit):
    def build(tmp_path, good):
        path = tmp_path / name
        shutil.copy(getattr(good, source), path)
        with h5py.File(path, "a") as handle:
            edit(handle)
        return lambda: loader(path)
    return build


def responses_case(edit):
    return h5_case(load_responses, "responses", "responses.h5", edit)


def stimuli_case(edit):
    return h5_case(load_stimulus_set, "stimuli", "stimuli.h5", edit)


def responses_folder(tmp_path, good):
    (tmp_path / "responses.h5").mkdir()
    return lambda: load_responses(tmp_path / "responses.h5")


def save_npz(path, arrays):
    np.savez(path, **arrays)


def save_mat(path, arrays):
    from scipy.io import savemat

    savemat(path, arrays)


def save_h5(path, arrays):
    with h5py.File(path, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key, data=value)


def matrix_case(edit, name="lab.npz", write=save_npz, **matrix):
    """Convert the good matrix arrays after ``edit(arrays)``, over good earlier outputs."""
    def build(tmp_path, good):
        arrays = {key: value.copy() for key, value in good.matrix.items()}
        edit(arrays)
        write(tmp_path / name, arrays)
        out = good.results(tmp_path)
        config = matrix_config(tmp_path / name, **matrix)
        return lambda: convert_subject(config, SUBJECT, out / "responses.h5", out / "stimuli.h5")
    return build


def set_array(key, change):
    return lambda arrays: arrays.__setitem__(key, change(arrays[key]))


def truncated_npz(path, arrays):
    save_npz(path, arrays)
    path.write_bytes(path.read_bytes()[:300])


def no_training_trials(arrays):
    for key in ("train_fmri", "train_images", "train_labels"):
        arrays[key] = arrays[key][:0]


def god_npz_case(damage):
    def build(tmp_path, good):
        folder = tmp_path / "god_npz"
        shutil.copytree(good.god_npz, folder)
        damage(folder)
        out = good.results(tmp_path)
        return lambda: convert_subject(god_npz_config(folder), SUBJECT, out / "responses.h5", out / "stimuli.h5")
    return build


def edit_npz(change, name="sbj_1.npz"):
    def damage(folder):
        with np.load(folder / name) as npz:
            arrays = dict(npz)
        change(arrays)
        np.savez(folder / name, **arrays)
    return damage


def god_bdata_case(edit):
    def build(tmp_path, good):
        folder = tmp_path / "god_bdata"
        shutil.copytree(good.god_bdata, folder)
        with h5py.File(folder / "Subject1.h5", "a") as handle:
            edit(handle)
        out = good.results(tmp_path)
        config = god_bdata_config(folder, good.god_images)
        return lambda: convert_subject(config, SUBJECT, out / "responses.h5", out / "stimuli.h5")
    return build


def weights_case(write):
    """``load_weights`` of a Linear(3, 2) from the file ``write(tmp_path)`` returns."""
    def build(tmp_path, good):
        path = write(tmp_path)
        return lambda: load_weights(torch.nn.Linear(3, 2), path)
    return build


def good_weights(tmp_path, in_features=3):
    torch.manual_seed(0)
    path = tmp_path / "decoder.safetensors"
    save_weights(torch.nn.Linear(in_features, 2), path)
    return path


def truncated_weights(tmp_path):
    path = good_weights(tmp_path)
    path.write_bytes(path.read_bytes()[:-16])
    return path


def pickle_as_safetensors(tmp_path):
    return save_payload({"weight": RunsCodeWhenUnpickled(tmp_path / MARKER)}, tmp_path / "decoder.safetensors")


def mbm_case(damage):
    def build(tmp_path, good):
        folder = tmp_path / "mbm"
        shutil.copytree(good.mbm, folder)
        damage(folder)
        return lambda: load_pretrained_mbm(folder)
    return build


def mbm_weights(folder):
    return folder / "diffusion_pytorch_model.safetensors"


def wider_mbm_config(folder):
    config = json.loads((folder / "config.json").read_text())
    config["embed_dim"] *= 2
    (folder / "config.json").write_text(json.dumps(config))


def pickled_bin_only(folder):
    mbm_weights(folder).unlink()
    save_payload({"patch_embed.weight": RunsCodeWhenUnpickled(folder.parent / MARKER)},
                 folder / "diffusion_pytorch_model.bin")


def import_case(make):
    """Import the .pth ``make(tmp_path, state)`` writes over a good earlier import in ``imported/``."""
    def build(tmp_path, good):
        path = make(tmp_path, dict(good.mindvis_state))
        out = tmp_path / "imported"
        shutil.copytree(good.imported, out)
        return lambda: import_mindvis_checkpoint(path, out, num_heads=2, decoder_num_heads=2)
    return build


def pickled_object_pth(tmp_path, state):
    return save_payload(RunsCodeWhenUnpickled(tmp_path / MARKER), tmp_path / "fmri_encoder.pth")


def pickled_model_pth(tmp_path, state):
    state["cls_token"] = RunsCodeWhenUnpickled(tmp_path / MARKER)
    return save_payload({"model": state}, tmp_path / "fmri_encoder.pth")


def wrong_shape_pth(tmp_path, state):
    state["blocks.0.attn.qkv.weight"] = torch.zeros(24, 9)
    torch.save({"model": state}, tmp_path / "fmri_encoder.pth")
    return tmp_path / "fmri_encoder.pth"


def truncated_pth(tmp_path, state):
    path = tmp_path / "fmri_encoder.pth"
    torch.save({"model": state}, path)
    path.write_bytes(path.read_bytes()[:400])
    return path


def set_trial_type(run, value, rows=slice(None)):
    """Damage: the events of ``run`` get ``trial_type`` ``value`` in ``rows``."""
    def damage(root):
        def edit(events):
            events.loc[events.index[rows], "trial_type"] = value
            return events
        edit_tsv(func_file(root, run, "events.tsv"), edit)
    return damage


def header_tr(run, tr, sidecar_tr):
    """Damage: a header recording TR ``tr`` s (units set, as a scanner writes it) and a sidecar saying ``sidecar_tr``."""
    def damage(root):
        path = func_file(root, run, "bold.nii.gz")
        image = nib.load(path)
        rewritten = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
        rewritten.header.set_xyzt_units("mm", "sec")
        rewritten.header.set_zooms(image.header.get_zooms()[:3] + (tr,))
        nib.save(rewritten, path)
        func_file(root, run, "bold.json").write_text(json.dumps({"RepetitionTime": sidecar_tr}))
    return damage


def one_training_trial(arrays):
    for key in ("train_fmri", "train_images", "train_labels"):
        arrays[key] = arrays[key][:1]


def no_test_trials(arrays):
    for key in ("test_fmri", "test_images", "test_labels"):
        arrays[key] = arrays[key][:0]


def decoder_meta_case(write):
    """``load_dcldm`` of a decoder folder whose dcldm.json ``write(path)`` damaged (beside its weights)."""
    def build(tmp_path, good):
        from mindvis.models.dcldm import load_dcldm

        folder = tmp_path / "results" / SUBJECT / "dcldm"
        folder.mkdir(parents=True)
        (folder / "dcldm.safetensors").write_bytes(b"weights of an earlier run")
        write(folder / "dcldm.json")
        return lambda: load_dcldm(folder)
    return build


GOOD_META = {"subject": SUBJECT, "base": "results/pretrain/ldm", "n_voxels": 37,
             "sha256": {"dcldm.safetensors": "0" * 64}}


def write_meta(text):
    return lambda path: path.write_bytes(text if isinstance(text, bytes) else text.encode())


def edit_case(**arguments):
    """``edit_subject`` with ``arguments`` over an earlier edit's outputs (the decoder is never reached)."""
    def build(tmp_path, good):
        from mindvis.generate.edit import edit_subject

        out = tmp_path / "results" / SUBJECT / "edits-manual"
        out.mkdir(parents=True)
        (out / "edits.json").write_text('{"stage": "edit"}')
        (out / "edits.h5").write_bytes(b"an earlier edit")
        if arguments.pop("foreign", False):
            (out / "notes.txt").write_text("a user's notes, which replacing the folder would delete")
        ids = [str(s) for s in load_responses(good.responses, splits=("test_avg",))["test_avg"].stimulus_id]
        kwargs = {"stimulus_ids": ids[:2], "operation": "zero", "rois": ["V1"], **arguments}
        for name in ("mask",):
            if callable(kwargs.get(name)):
                kwargs[name] = kwargs[name](tmp_path)
        if kwargs.get("donor_ids") == "ids":
            kwargs["donor_ids"] = ids[1:2]
        config = validate({"seed": 3, "generate": {"steps": 5}})
        return lambda: edit_subject(config, SUBJECT, tmp_path / "no-decoder-needed", good.responses, good.stimuli,
                                    out, **kwargs)
    return build


def nifti_mask(value=0, shape=(5, 4, 2), affine=None):
    def write(tmp_path):
        path = tmp_path / "group_mask.nii.gz"
        nib.save(nib.Nifti1Image(np.full(shape, value, np.uint8), np.eye(4) if affine is None else affine), path)
        return path
    return write


def summary_csv_case(content):
    """``read_summary`` (``mindvis summary --csv`` without --metrics) of a file holding ``content``."""
    def build(tmp_path, good):
        from mindvis.report.summary import read_summary

        path = tmp_path / "results" / "summary.csv"
        path.parent.mkdir(parents=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return lambda: read_summary(path)
    return build


def summary_metrics_case(content):
    """``write_summary`` from a metrics.json holding ``content``, over an earlier summary.csv and summary.html."""
    def build(tmp_path, good):
        from mindvis.report.summary import write_summary

        results = tmp_path / "results"
        metrics = results / SUBJECT / "evaluation" / "metrics.json"
        metrics.parent.mkdir(parents=True)
        metrics.write_bytes(content if isinstance(content, bytes) else content.encode())
        (results / "summary.csv").write_text("subject,dcldm/n_way_top1_mean\nmean,0.5\n")
        (results / "summary.html").write_text("<p>earlier</p>")
        return lambda: write_summary([metrics], results / "summary.csv", results / "summary.html")
    return build


def evaluation_folder_case(build_earlier):
    """``evaluate_subject`` into an earlier evaluation folder that ``build_earlier(folder)`` wrote (refused before
    any input is read: the samples and base named are never opened)."""
    def build(tmp_path, good):
        from mindvis.evaluate.run import evaluate_subject

        out = tmp_path / "results" / SUBJECT / "evaluation"
        (out / "ridge").mkdir(parents=True)
        (out / "metrics.json").write_text('{"subject": "sub-01"}')
        (out / "ridge" / "samples.h5").write_bytes(b"an earlier ridge row")
        build_earlier(out)
        return lambda: evaluate_subject(validate({"seed": 3}), SUBJECT, good.responses, good.stimuli,
                                        tmp_path / "no-samples-needed.h5", tmp_path / "no-base-needed", out)
    return build


def report_figures_case(damage):
    """``build_report`` over an earlier report.html and figures folder, ``damage(figures)`` applied to the folder
    (refused before metrics.json, which does not exist, is read)."""
    def build(tmp_path, good):
        from mindvis.report.html import build_report

        results = tmp_path / "results" / SUBJECT
        figures = results / "report"
        figures.mkdir(parents=True)
        (results / "report.html").write_text("<p>an earlier report</p>")
        (figures / "grid.png").write_bytes(b"an earlier grid")
        damage(figures)
        return lambda: build_report(results / "evaluation" / "metrics.json", results / "report.html",
                                    config=validate({"seed": 3}), figures_dir=figures)
    return build


def user_notes(folder):
    (folder / "notes.txt").write_text("a user's notes, which replacing the folder would delete")


def folder_made_a_file(folder):
    shutil.rmtree(folder)
    folder.write_text("a file where the figures folder goes")


# -- the corpus ---------------------------------------------------------------------------------------

BOLD, EVENTS = "sub-01_task-objects_run-02_bold.nii.gz", "sub-01_task-objects_run-01_events.tsv"
MASK = "sub-01_space-MNI152NLin2009aAsym_desc-visual_mask.nii.gz"
DSEG = "sub-01_space-MNI152NLin2009aAsym_desc-visual_dseg.nii.gz"
MBM_WEIGHTS = "diffusion_pytorch_model.safetensors"

CASES = [
    # configs
    pytest.param(config_text("seed: [1, 2\nexperiment: x\n"), "experiment.yaml", None,
                 r"^not valid YAML at line 2, column \d+: expected ',' or '\]'", id="config-yaml-syntax-error"),
    pytest.param(config_text("seed: 1\nmbm:\n  epochs: 2\n  epochs: 3\n"), "experiment.yaml", None,
                 r"^not valid YAML at line 4, column 3: key 'epochs' is given twice \(first at line 3\)",
                 id="config-duplicate-key"),
    pytest.param(config_text("- seed\n- 1\n"), "experiment.yaml", None,
                 r"must be a YAML mapping of keys to values, found a list", id="config-not-a-mapping"),
    pytest.param(config_text(b"experiment: caf\xe9\n"), "experiment.yaml", None, r"not UTF-8 text",
                 id="config-not-utf8"),
    pytest.param(config_folder, "experiment.yaml", None, r"cannot be read", id="config-is-a-folder"),
    pytest.param(config_text("sede: 1\n"), "experiment.yaml", "sede", r"unknown key; allowed keys here: .*\bseed\b",
                 id="config-unknown-top-level-key"),
    pytest.param(config_text("mbm:\n  epoch: 3\n"), "experiment.yaml", "mbm.epoch",
                 r"unknown key; allowed keys here: .*\bepochs\b", id="config-unknown-nested-key"),
    pytest.param(config_text("stimuli:\n  image_size: large\n"), "experiment.yaml", "stimuli.image_size",
                 r"'large' is not of type integer", id="config-string-for-integer"),
    pytest.param(config_text("finetune: [1, 2]\n"), "experiment.yaml", "finetune", r"is not of type object",
                 id="config-section-not-a-mapping"),
    pytest.param(config_text("preprocess:\n  val_fraction: 1.5\n"), "experiment.yaml", "preprocess.val_fraction",
                 r"1.5 is greater than or equal to the maximum of 1", id="config-out-of-range"),
    pytest.param(config_text("finetune:\n  train_runs: 2\n  train_fraction: 0.5\n"), "experiment.yaml",
                 "finetune.train_runs", r"both pick the training share", id="config-train-runs-with-train-fraction"),
    pytest.param(config_text("data:\n  source: bids\n"), "experiment.yaml", "data.bids_dir",
                 r"data.source is bids but no BIDS folder", id="config-bids-without-folder"),
    pytest.param(config_text("finetune:\n  new_subject: sub-09\n"), "experiment.yaml", "finetune.new_subject",
                 r"sub-09 is not a decoded subject", id="config-new-subject-not-decoded"),
    # NIfTI
    pytest.param(bids_case(lambda root: rewrite_nifti(func_file(root, 2, "bold.nii.gz"), shift_affine)), BOLD,
                 "preprocess.roi", r"BOLD affine differs from the ROI mask's affine", id="bold-affine-differs"),
    pytest.param(bids_case(lambda root: rewrite_nifti(derivative(root, "dseg.nii.gz"), shift_affine)), DSEG,
                 "preprocess.roi", r"label image's affine differs from the mask's", id="label-image-affine-differs"),
    pytest.param(bids_case(lambda root: truncate_gzip(func_file(root, 2, "bold.nii.gz"))), BOLD, None,
                 r"truncated or corrupt BOLD data \(EOFError", id="bold-truncated-gzip"),
    pytest.param(bids_case(lambda root: truncate_inside_gzip(func_file(root, 2, "bold.nii.gz"))), BOLD, None,
                 r"truncated or corrupt BOLD data \(OSError: Expected \d+ bytes", id="bold-truncated-data"),
    pytest.param(bids_case(lambda root: rewrite_nifti(func_file(root, 2, "bold.nii.gz"),
                                                      lambda data, affine: (data[..., 0], affine))), BOLD, None,
                 r"BOLD must be 4-D \(x, y, z, time\), found shape \(5, 6, 4\)", id="bold-3d"),
    pytest.param(bids_case(lambda root: rewrite_nifti(
        func_file(root, 2, "bold.nii.gz"), lambda data, affine: (np.full(data.shape, np.nan, np.float32), affine))),
        BOLD, None, r"every ROI voxel of this run is non-finite \(\d+\)", id="bold-nan-voxels"),
    pytest.param(bids_case(lambda root: rewrite_nifti(func_file(root, 2, "bold.nii.gz"),
                                                      lambda data, affine: (data.astype(np.complex64), affine))),
                 BOLD, None, r"must hold real numbers, found dtype complex64", id="bold-complex"),
    pytest.param(bids_case(lambda root: rewrite_nifti(derivative(root, "mask.nii.gz"), lambda data, affine: (
        np.where(data > 0, np.nan, 0).astype(np.float32), affine))), MASK, "preprocess.roi",
        r"the ROI mask holds NaN values", id="mask-nan-voxels"),
    pytest.param(bids_case(lambda root: (derivative(root, "dseg.tsv")).write_text("")),
                 "sub-01_desc-visual_dseg.tsv", None, r"not a readable label table", id="label-table-empty"),
    # events and sidecars
    pytest.param(bids_case(lambda root: edit_tsv(func_file(root, 1, "events.tsv"),
                                                 lambda events: events.drop(columns="duration"))), EVENTS,
                 "duration", r"events file lacks column\(s\) duration", id="events-missing-column"),
    pytest.param(bids_case(lambda root: edit_tsv(func_file(root, 1, "events.tsv"),
                                                 lambda events: events.assign(onset=events.onset + 1000))), EVENTS,
                 "onset", r"onset \d+ s lies outside the run \(0 to \d+ s", id="events-onset-past-end"),
    pytest.param(bids_case(lambda root: edit_tsv(func_file(root, 1, "events.tsv"), lambda events: events.iloc[:0])),
                 EVENTS, "onset", r"has a header and no trials", id="events-header-only"),
    pytest.param(bids_case(lambda root: (func_file(root, 1, "events.tsv").unlink(),
                                         func_file(root, 1, "events.tsv").mkdir())), EVENTS, None,
                 r"not a readable tab-separated events file", id="events-is-a-folder"),
    pytest.param(bids_case(lambda root: func_file(root, 1, "bold.json").write_text('{"RepetitionTime": 2000}')),
                 "sub-01_task-objects_run-01_bold.json", "RepetitionTime", r"looks like milliseconds",
                 id="sidecar-tr-in-milliseconds"),
    pytest.param(bids_case(set_trial_type(1, "Train", rows=[0])), EVENTS, "trial_type",
                 r"1 rows have trial_type 'Train', which is not exactly 'train' or 'test'",
                 id="events-trial-type-capitalised"),
    pytest.param(bids_case(set_trial_type(3, "test ")), "sub-01_task-objects_run-03_events.tsv", "trial_type",
                 r"2 rows have trial_type 'test ', which is not exactly", id="events-trial-type-trailing-space"),
    pytest.param(bids_case(set_trial_type(1, "TRAIN")), EVENTS, "trial_type", r"'TRAIN', which is not exactly",
                 id="events-trial-type-upper-case"),
    pytest.param(bids_case(set_trial_type(4, "Test", rows=[1])), "sub-01_task-objects_run-04_events.tsv",
                 "trial_type", r"1 rows have trial_type 'Test', which is not exactly", id="events-test-capitalised"),
    pytest.param(bids_case(set_trial_type(2, "rest")), EVENTS, "trial_type",
                 r"a single run \(run 1\) holds trials of trial_type 'train': the validation split.*would be empty",
                 id="events-single-training-run-empty-validation"),
    pytest.param(bids_case(lambda root: [set_trial_type(run, "catch", rows=[1, 2, 3])(root) for run in (1, 2)]),
                 EVENTS, "trial_type", r"only 1 training trial\(s\) outside the validation runs",
                 id="events-one-training-trial-left"),
    pytest.param(bids_case(header_tr(2, 2.0, 1.5)), "sub-01_task-objects_run-02_bold.json", "RepetitionTime",
                 r"RepetitionTime 1.5 s disagrees with the BOLD header's time step 2 s", id="sidecar-tr-disagrees-header"),
    pytest.param(bids_case(header_tr(2, 2000.0, 2.0)), "sub-01_task-objects_run-02_bold.json", "RepetitionTime",
                 r"disagrees with the BOLD header's time step 2000 s", id="sidecar-tr-header-in-milliseconds-as-s"),
    # responses.h5 and stimuli.h5
    pytest.param(responses_case(lambda h: h.__delitem__("train/fmri")), "responses.h5", "train/fmri",
                 r"dataset missing", id="responses-dataset-missing"),
    pytest.param(responses_case(lambda h: replace_dataset(h, "train/fmri", h["train/fmri"][()].astype(np.float64))),
                 "responses.h5", "train/fmri", r"must be float32 \[N, V\], found float64", id="responses-wrong-dtype"),
    pytest.param(responses_case(lambda h: replace_dataset(h, "train/label", h["train/label"][()][:-1])),
                 "responses.h5", "train/label", r"must hold one value per trial \(\d+\)",
                 id="responses-label-length"),
    pytest.param(responses_case(lambda h: h.attrs.__setitem__("volume_shape", "5x4x2")), "responses.h5",
                 "volume_shape", r"must be 3 integer sizes", id="responses-volume-shape-not-integers"),
    pytest.param(responses_case(lambda h: h["quality"].create_group("extra")), "responses.h5", "quality/extra",
                 r"expected a dataset, found a group", id="responses-quality-item-is-a-group"),
    pytest.param(responses_folder, "responses.h5", None, r"responses file is not a file", id="responses-is-a-folder"),
    pytest.param(stimuli_case(lambda h: h.attrs.__setitem__("class_names", "[bar, ring")), "stimuli.h5",
                 "class_names", r"attribute is not valid JSON", id="stimuli-class-names-not-json"),
    pytest.param(stimuli_case(lambda h: replace_dataset(h, "train/label", np.array(["bar"] * len(h["train/label"]),
                                                                                   dtype=object),
                                                        dtype=h5py.string_dtype())),
                 "stimuli.h5", "train/label", r"must be an int vector \[N\]", id="stimuli-labels-are-strings"),
    pytest.param(stimuli_case(lambda h: replace_dataset(h, "test/label", h["test/label"][()] + 3)), "stimuli.h5",
                 "test/label", r"labels run from \d+ to \d+ but class_names has 3", id="stimuli-label-out-of-range"),
    # matrix files: .npz, .mat, .h5
    pytest.param(matrix_case(lambda arrays: arrays.pop("test_fmri")), "lab.npz", "test_fmri",
                 r"test fMRI .* not found \(the file holds: test_images", id="matrix-npz-key-missing"),
    pytest.param(matrix_case(set_array("test_fmri", lambda v: v[:, :-1]), name="lab.mat", write=save_mat),
                 "lab.mat", "train_fmri / test_fmri", r"their voxel counts differ",
                 id="matrix-mat-voxel-counts-differ"),
    pytest.param(matrix_case(set_array("train_fmri", lambda v: v[:, :, None]), name="lab.h5", write=save_h5),
                 "lab.h5", "train_fmri", r"must be \[trials, voxels\], found shape \(12, 9, 1\)",
                 id="matrix-h5-fmri-3d"),
    pytest.param(matrix_case(set_array("train_fmri", lambda v: v.astype(str))), "lab.npz", "train_fmri",
                 r"must hold real numbers, found dtype <U", id="matrix-fmri-strings"),
    pytest.param(matrix_case(set_array("train_fmri", lambda v: np.full_like(v, np.nan))), "lab.npz", "data.roi",
                 r"every voxel is constant or not finite", id="matrix-fmri-all-nan"),
    pytest.param(matrix_case(no_training_trials), "lab.npz", "data.source", r"the source holds no training trials",
                 id="matrix-empty-training-split"),
    pytest.param(matrix_case(set_array("train_labels", lambda v: v[:-1])), "lab.npz", "train_labels",
                 r"has 11 values, expected 12", id="matrix-label-vector-length"),
    pytest.param(matrix_case(set_array("train_fmri", lambda v: np.array([np.zeros(3), np.zeros(2)], dtype=object))),
                 "lab.npz", "train_fmri", r"cannot be read \(Object arrays cannot be loaded",
                 id="matrix-npz-object-array"),
    pytest.param(matrix_case(lambda arrays: None, write=truncated_npz), "lab.npz", "data.matrix.path",
                 r"cannot read this file as \.npz.*File is not a zip file", id="matrix-npz-truncated"),
    pytest.param(matrix_case(lambda arrays: None, name="lab.mat",
                             write=lambda path, arrays: path.write_bytes(b"MATLAB 5.0" + b"\x00\xff" * 40)),
                 "lab.mat", "data.matrix.path", r"cannot read this file as \.npz, \.npy, \.mat or HDF5",
                 id="matrix-mat-garbage"),
    pytest.param(matrix_case(one_training_trial), "lab.npz", "data.source",
                 r"holds only 1 training trial; a decoder needs at least 2", id="matrix-one-training-trial"),
    pytest.param(matrix_case(no_test_trials), "lab.npz", "data.source", r"no test trials: the test split would be empty",
                 id="matrix-no-test-trials"),
    # GOD: MinD-Vis npz and Kamitani's BData HDF5
    pytest.param(god_npz_case(edit_npz(lambda a: a.__setitem__("arr_0", a["arr_0"].ravel()))), "sbj_1.npz", "arr_0",
                 r"must be a real \[trials, voxels\] matrix, found float64 \(60,\)", id="god-npz-trials-1d"),
    pytest.param(god_npz_case(edit_npz(lambda a: a.update(arr_0=a["arr_0"][:0], arr_3=a["arr_3"][:0]))),
                 "sbj_1.npz", "arr_0", r"holds no trials \(shape \(0, 10\)\)", id="god-npz-empty-training-split"),
    pytest.param(god_npz_case(edit_npz(lambda a: a.__setitem__("arr_3", a["arr_3"] + 0.5))), "sbj_1.npz", "arr_3",
                 r"training image index must hold whole numbers", id="god-npz-index-fractional"),
    pytest.param(god_npz_case(edit_npz(lambda a: a.__setitem__("VC", np.zeros_like(a["VC"])))), "sbj_1.npz", "VC",
                 r"ROI 'VC' selects no voxels", id="god-npz-roi-empty"),
    pytest.param(god_npz_case(lambda folder: (folder / "imagenet_training_label.csv").write_text(
        "".join(f"{n}.JPEG,x\n" for n in GOD_TRAIN[:-1]))), "imagenet_training_label.csv", None,
        r"lists 5 images but the image file holds 6", id="god-npz-label-list-length"),
    pytest.param(god_npz_case(lambda folder: (folder / "imagenet_class_index.json").write_text('{"0": ["n015')),
                 "imagenet_class_index.json", None, r"not readable JSON", id="god-npz-class-index-not-json"),
    pytest.param(god_bdata_case(lambda h: h["dataset"].__setitem__((slice(None), -1), np.nan)), "Subject1.h5",
                 "Label", r"\d+ training or test samples have no image id \(NaN\)", id="god-bdata-label-nan"),
    pytest.param(god_bdata_case(lambda h: replace_dataset(h, "dataset", h["dataset"][()].astype("S8"))),
                 "Subject1.h5", "dataset", r"must be a real \[samples, columns\] matrix, found \|S8",
                 id="god-bdata-dataset-strings"),
    # checkpoints
    pytest.param(weights_case(truncated_weights), "decoder.safetensors", None,
                 r"not a readable safetensors file \(.*incomplete metadata", id="weights-truncated-safetensors"),
    pytest.param(weights_case(pickle_as_safetensors), "decoder.safetensors", None,
                 r"not a readable safetensors file", id="weights-pickle-not-safetensors"),
    pytest.param(weights_case(lambda tmp_path: good_weights(tmp_path, in_features=4)), "decoder.safetensors",
                 "weight", r"tensor has shape \(2, 4\) but the model's has \(2, 3\)", id="weights-wrong-shape"),
    pytest.param(mbm_case(lambda folder: mbm_weights(folder).write_bytes(mbm_weights(folder).read_bytes()[:-64])),
                 MBM_WEIGHTS, None, r"cannot be loaded as an SC-MBM autoencoder \(OSError",
                 id="mbm-truncated-safetensors"),
    pytest.param(mbm_case(wider_mbm_config), MBM_WEIGHTS, None,
                 r"cannot be loaded as an SC-MBM autoencoder \(ValueError: .*expected shape", id="mbm-wrong-shapes"),
    pytest.param(mbm_case(pickled_bin_only), MBM_WEIGHTS, None, r"SC-MBM file missing",
                 id="mbm-pickled-bin-instead-of-safetensors"),
    pytest.param(import_case(pickled_object_pth), "fmri_encoder.pth", "model", r"no state dict under 'model'",
                 id="mindvis-pth-pickled-object"),
    pytest.param(import_case(pickled_model_pth), "fmri_encoder.pth", "model",
                 r"'model' is not a state dict of tensors", id="mindvis-pth-pickled-object-in-state-dict"),
    pytest.param(import_case(wrong_shape_pth), "fmri_encoder.pth", "blocks.0.attn.qkv.weight",
                 r"tensor shapes do not fit the inferred model: blocks.0.attn.qkv.weight: \(24, 9\) -> ",
                 id="mindvis-pth-wrong-shape"),
    pytest.param(import_case(truncated_pth), "fmri_encoder.pth", None, r"not a readable PyTorch checkpoint",
                 id="mindvis-pth-truncated"),
    # decoder folders
    pytest.param(decoder_meta_case(write_meta(json.dumps(GOOD_META)[:40])), "dcldm.json", None,
                 r"not readable JSON \(JSONDecodeError.*truncated or damaged", id="dcldm-json-truncated"),
    pytest.param(decoder_meta_case(write_meta(b"\x89HDF\r\n\x1a\n\xff\xfe")), "dcldm.json", None,
                 r"not readable JSON \(UnicodeDecodeError", id="dcldm-json-binary"),
    pytest.param(decoder_meta_case(write_meta(json.dumps([GOOD_META]))), "dcldm.json", None,
                 r"must be a JSON object, found list", id="dcldm-json-a-list"),
    pytest.param(decoder_meta_case(write_meta(json.dumps({k: v for k, v in GOOD_META.items() if k != "sha256"}))),
                 "dcldm.json", "sha256", r"record of its files' SHA-256 is missing", id="dcldm-json-no-hash-record"),
    pytest.param(decoder_meta_case(write_meta(json.dumps({**GOOD_META, "sha256": "0" * 64}))), "dcldm.json",
                 "sha256", r"record of its files' SHA-256 is missing", id="dcldm-json-hash-record-not-a-mapping"),
    pytest.param(decoder_meta_case(write_meta(json.dumps(GOOD_META))), "dcldm.safetensors",
                 "sha256.dcldm.safetensors", r"its SHA-256 [0-9a-f]{12}\.\.\. is not the 000000000000",
                 id="dcldm-weights-not-the-recorded-ones"),
    # brain-token edits: flags that conflict or lack their value, groups that hold nothing
    pytest.param(edit_case(operation="scale"), None, "--factor", r"--operation scale needs the multiplier",
                 id="edit-scale-without-factor"),
    pytest.param(edit_case(operation="swap", donor_ids="ids", factor=0.5), None, "--factor",
                 r"--factor is read by --operation scale only, not by swap", id="edit-factor-with-swap"),
    pytest.param(edit_case(operation="zero", donor_ids=["x"]), None, "--donors",
                 r"--donors are read by --operation swap only, not by zero", id="edit-donors-with-zero"),
    pytest.param(edit_case(taus=[-3]), None, "--tau", r"--tau -3 is not a number of denoising steps between 0 and "
                 r"generate.steps \(5\)", id="edit-tau-negative"),
    pytest.param(edit_case(taus=[0, 9]), None, "--tau", r"--tau 9 is not a number of denoising steps",
                 id="edit-tau-past-the-steps"),
    pytest.param(edit_case(operation="scale", factor=float("nan")), None, "--factor",
                 r"--factor must be a finite number, found nan", id="edit-factor-nan"),
    pytest.param(edit_case(operation="swap", donor_ids=["a", "b", "c"]), None, "--donors",
                 r"a swap needs one donor stimulus per stimulus \(2\), got 3", id="edit-donor-count-differs"),
    pytest.param(edit_case(rois=None, mask=nifti_mask(0)), "group_mask.nii.gz", "--mask",
                 r"the voxel group \(--mask .*\) covers none of the 37 voxels", id="edit-empty-mask-group"),
    pytest.param(edit_case(rois=None, mask=nifti_mask(1, shape=(6, 4, 2))), "group_mask.nii.gz", None,
                 r"the mask's grid \(6, 4, 2\) does not match the responses' \(5, 4, 2\)",
                 id="edit-mask-on-another-grid"),
    pytest.param(edit_case(rois=["V4"]), "responses.h5", "voxel_roi", r"ROI V4 not in voxel_roi \(LOC, V1\)",
                 id="edit-unknown-roi"),
    pytest.param(edit_case(stimulus_ids=["no-such-image"]), "responses.h5", "test_avg/stimulus_id",
                 r"stimulus no-such-image not in the test_avg split", id="edit-stimulus-not-in-split"),
    pytest.param(edit_case(foreign=True), "edits-manual", "--out-dir",
                 r"holds 1 files edits did not write \(notes.txt\); the folder is replaced as a unit",
                 id="edit-out-dir-holds-other-files"),
    # folders replaced as a unit (evaluate's, the report's figures): another file there is refused, not deleted
    pytest.param(evaluation_folder_case(user_notes), "evaluation", "--out-dir",
                 r"holds 1 files evaluate did not write \(notes.txt\); the folder is replaced as a unit",
                 id="evaluate-out-dir-holds-other-files"),
    pytest.param(report_figures_case(user_notes), "report", "--figures-dir",
                 r"holds 1 files report did not write \(notes.txt\); the folder is replaced as a unit",
                 id="report-figures-dir-holds-other-files"),
    pytest.param(report_figures_case(folder_made_a_file), "report", "--figures-dir", r"^not a folder$",
                 id="report-figures-dir-is-a-file"),
    # the summary table and the metrics it is built from
    pytest.param(summary_csv_case(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary"), "summary.csv", None,
                 r"not a readable summary CSV \(UnicodeDecodeError", id="summary-csv-binary"),
    pytest.param(summary_csv_case("name,score\nx,1\n"), "summary.csv", "subject",
                 r"not a mindvis summary table: no 'subject' column \(found: name, score\)",
                 id="summary-csv-another-table"),
    pytest.param(summary_csv_case(""), "summary.csv", None, r"not a readable summary CSV \(EmptyDataError",
                 id="summary-csv-empty"),
    pytest.param(summary_csv_case(None), "summary.csv", None, r"not a readable summary CSV \(IsADirectoryError",
                 id="summary-csv-is-a-folder"),
    pytest.param(summary_csv_case("subject,dcldm/ssim\nsub-01,high\n"), "summary.csv", "dcldm/ssim",
                 r"column 'dcldm/ssim' is not a summary column", id="summary-csv-text-values"),
    pytest.param(summary_metrics_case('{"subject": "sub-01", "rows": ['), "metrics.json", None,
                 r"not valid JSON", id="summary-metrics-truncated"),
    pytest.param(summary_metrics_case('[1, 2]'), "metrics.json", "rows", r"not a metrics record",
                 id="summary-metrics-a-list"),
]


def snapshot(root):
    """Every path under ``root``: SHA-256 and modification time of files, a marker for folders."""
    state = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            state[str(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                  path.stat().st_mtime_ns)
        else:
            state[str(path.relative_to(root))] = "folder"
    return state


def test_the_corpus_covers_at_least_thirty_bad_inputs():
    assert len(CASES) >= 30 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("build, file_name, key, message", CASES)
def test_bad_input_gives_one_line_naming_file_key_and_fix_and_changes_nothing(tmp_path, good, build, file_name,
                                                                               key, message):
    run = build(tmp_path, good)
    before = snapshot(tmp_path)
    with pytest.raises(MindvisError) as info:
        run()
    error, text = info.value, str(info.value)
    assert "\n" not in text and "\r" not in text, text
    if file_name is None:  # a command-line flag at fault, not a file: the key names the flag
        assert error.path is None and key.startswith("--"), text
    else:
        assert error.path is not None and error.path.name == file_name and str(error.path) in text, text
    if key is not None:
        assert error.key is not None and key in error.key and f"key '{error.key}'" in text, text
    assert re.search(message, error.message), text
    assert error.fix and text.endswith(f"Fix: {error.fix}"), text
    assert snapshot(tmp_path) == before, "a failed load changed or left files"
    assert not (tmp_path / MARKER).exists(), "pickled code ran"


def test_command_line_prints_the_one_line_and_returns_2(tmp_path, capsys):
    from mindvis.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text("seed: [1, 2\n")
    assert main(["check-config", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mindvis: error: {path}: not valid YAML at line 2")


def test_events_that_are_not_stimulus_trials_are_counted_on_the_console(good, tmp_path, caplog):
    """Nuisance events (any trial_type but train and test) and an empty test split: a warning with the counts."""
    root = tmp_path / "bids"
    shutil.copytree(good.bids, root)
    for run in (3, 4):
        set_trial_type(run, "fixation")(root)
    set_trial_type(1, "catch", rows=[0])(root)
    with caplog.at_level("WARNING", logger="mindvis.preprocess.run"):
        report = preprocess_subject(bids_config(), root, SUBJECT, tmp_path / "responses.h5")
    said = " ".join(record.getMessage() for record in caplog.records)
    assert "1 'catch', 4 'fixation'" in said and "the test split is empty (0 trials)" in said
    assert report["n_trials"]["test"] == 0 and any("4 'fixation'" in warning for warning in report["warnings"])


@pytest.mark.parametrize("command, message", [
    (["edit", "--operation", "zero", "--rois", "V1", "--tau", "-3"],
     r"key '--tau': --tau -3 is not a number of denoising steps"),
    (["edit", "--operation", "scale", "--rois", "V1"], r"key '--factor': --operation scale needs the multiplier"),
    (["summary", "--csv", "{bad_csv}"], r"summary.csv: not a readable summary CSV"),
], ids=["edit-negative-tau", "edit-scale-without-factor", "summary-csv-not-a-csv"])
def test_command_line_flags_and_files_give_one_line_not_a_traceback(tmp_path, good, capsys, command, message):
    """The issue's own cases, through the command line: exit 2 and one line (argparse's checks aside)."""
    from mindvis.cli import main
    from mindvis.config import dump_config

    config = tmp_path / "config.yaml"
    dump_config(bids_config(), config)
    (tmp_path / "summary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    decoder = ["--subject", SUBJECT, "--model-dir", str(tmp_path / "dcldm"), "--responses", str(good.responses),
               "--stimuli", str(good.stimuli), "--out-dir", str(tmp_path / "edits"), "--ids", "x"]
    argv = [command[0], "--config", str(config)] + (decoder if command[0] == "edit" else [])
    argv += [part.format(bad_csv=tmp_path / "summary.csv") for part in command[1:]]
    before = snapshot(tmp_path)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mindvis: error: ") and re.search(message, lines[0]), lines
    assert snapshot(tmp_path) == before


# -- properties: random configs and random arrays ------------------------------------------------------

#: Repeatable in CI: the same examples every run, none stored between runs.
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])
_SCHEMA = config_module.load_schema()
#: A valid resolved config; the property mutates it.
BASE_CONFIG = validate({"experiment": "x", "seed": 1})
DELETE = object()


def _paths(value, prefix=()):
    """Every key path of a nested dict (sections and leaves), plus an unknown key in every section."""
    paths = []
    for key, child in value.items():
        paths.append(prefix + (key,))
        if isinstance(child, dict):
            paths += _paths(child, prefix + (key,))
    return paths + [prefix + ("not_a_key",)]


def _leaves(value):
    if isinstance(value, dict):
        return [leaf for child in value.values() for leaf in _leaves(child)]
    return [value]


CONFIG_PATHS = _paths(BASE_CONFIG)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from([json.loads(json.dumps(leaf)) for leaf in _leaves(BASE_CONFIG)]),
                    st.sampled_from(["sub-01", "sub-99", "bids", "matrix", "template", "glm_lsa", "lag_average"]))
VALUES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=6)
MUTATIONS = st.lists(st.tuples(st.sampled_from(CONFIG_PATHS), st.one_of(VALUES, st.just(DELETE))),
                     min_size=1, max_size=3)


def _mutate(config, mutations):
    config = copy.deepcopy(config)
    for path, value in mutations:
        parent = config
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue  # an earlier mutation replaced the section
        if value is DELETE:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = value
    return config


@PROPERTY_SETTINGS
@given(mutations=MUTATIONS)
def test_any_config_mutation_validates_or_names_its_key_in_one_line(mutations):
    mutated = _mutate(BASE_CONFIG, mutations)
    # The schema file is constant: parse it once (the real load_schema reads 1600 lines of YAML per call).
    with mock.patch.object(config_module, "load_schema", lambda: copy.deepcopy(_SCHEMA)):
        try:
            resolved = validate(mutated, path="mutated.yaml")
        except MindvisError as error:
            text = str(error)
            assert "\n" not in text and text.startswith("mutated.yaml, key '"), text
            assert error.key and error.fix, text
            return
    assert isinstance(resolved, dict) and set(resolved) == set(BASE_CONFIG)


ARRAY_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                np.uint8, np.uint16, np.bool_, np.complex64, np.complex128])


@st.composite
def random_arrays(draw, rows=None, columns=None):
    """Arrays of any real/complex/bool dtype, with NaN and inf, of a shape near [rows, columns] or any shape."""
    dtype = np.dtype(draw(ARRAY_DTYPES))
    near = st.tuples(st.just(rows), st.integers(0, columns + 1)) if rows is not None else st.nothing()
    shape = draw(near | hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7))
    return draw(hnp.arrays(dtype, shape, elements=hnp.from_dtype(dtype, allow_nan=True, allow_infinity=True)
                           if dtype.kind in "fc" else None))


@PROPERTY_SETTINGS
@given(fmri=random_arrays(), split=st.sampled_from(["train", "val", "test", "test_avg"]))
def test_any_fmri_dataset_in_responses_h5_loads_or_fails_clearly(good, fmri, split):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "responses.h5"
        shutil.copy(good.responses, path)
        with h5py.File(path, "a") as handle:
            replace_dataset(handle, f"{split}/fmri", fmri)
        try:
            responses = load_responses(path)
        except MindvisError as error:
            assert "\n" not in str(error) and error.path == path and error.key and error.fix, str(error)
            return
    loaded = responses[split].fmri
    assert loaded.dtype == np.float32 and loaded.shape == (len(responses[split]), responses.n_voxels)
    assert np.all(np.isfinite(loaded))


@settings(PROPERTY_SETTINGS, max_examples=50)  # each example converts a file: fewer of them
@given(train_fmri=random_arrays(rows=N_TRAIN, columns=N_VOXELS))
def test_any_fmri_matrix_in_a_matrix_file_converts_or_fails_clearly(good, train_fmri):
    arrays = dict(good.matrix, train_fmri=train_fmri)
    if train_fmri.ndim == 2:  # same voxels in the test trials, so the train matrix itself decides
        arrays["test_fmri"] = np.ones((N_TEST, train_fmri.shape[1])) * np.arange(N_TEST)[:, None]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        np.savez(folder / "lab.npz", **arrays)
        out = folder / "results"
        out.mkdir()
        shutil.copy(good.responses, out / "responses.h5")
        shutil.copy(good.stimuli, out / "stimuli.h5")
        before = snapshot(out)
        try:
            convert_subject(matrix_config(folder / "lab.npz"), SUBJECT, out / "responses.h5", out / "stimuli.h5")
        except MindvisError as error:
            assert "\n" not in str(error) and error.path == folder / "lab.npz" and error.key and error.fix, str(error)
            assert snapshot(out) == before
            return
        responses, stimuli = load_responses(out / "responses.h5"), load_stimulus_set(out / "stimuli.h5")
        assert responses.n_voxels >= 1 and len(responses["train"]) + len(responses["val"]) == N_TRAIN
        assert set(responses["train"].stimulus_id) <= set(stimuli["train"].stimulus_id)
