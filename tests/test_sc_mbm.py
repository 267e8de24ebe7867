"""SC-MBM at MinD-Vis's scale ratio: the shared template voxel space, the shipped encoder, per-subject adaptation."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from ldm_fixtures import one_thread  # noqa: F401 (autouse: one thread)

from mindvis.config import validate
from mindvis.data import bids_layout
from mindvis.data.responses import ResponseSplit, load_rest, write_responses
from mindvis.data.voxel_space import ijk_digest
from mindvis.errors import MindvisError
from mindvis.models.bundled import BUNDLED_MBM, PROVENANCE_FILE, verify_bundle
from mindvis.models.mbm import MBMAutoencoder
from mindvis.preprocess.run import preprocess_rest_subject
from mindvis.simulate import geometry
from mindvis.simulate.bids import write_dataset_metadata
from mindvis.simulate.run import simulate_rest_subject

ROOT = Path(__file__).resolve().parents[1]

#: A small template (200 voxels) and short rest runs: every subject's simulation takes about a second.
TINY = {
    "experiment": "sc-mbm-test",
    "seed": 11,
    "simulate": {"n_subjects": 1, "n_rest_subjects": 3, "n_rest_runs": 1, "rest_run_volumes": 60,
                 "n_early_voxels": 120, "n_higher_voxels": 80},
    "preprocess": {"space": "template"},
    "mbm": {"preset": "tiny", "patch_size": 8, "epochs": 2, "batch_size": 16, "warmup_epochs": 1},
}


def tiny_config(**sections):
    raw = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return validate(raw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three simulated rest subjects preprocessed twice: in the template space and in their native ROIs."""
    root = tmp_path_factory.mktemp("corpus")
    config = tiny_config()
    native = tiny_config(preprocess={"space": "native"})
    write_dataset_metadata(config, root / "bids")
    template, own = [], []
    for subject in ("sub-rest01", "sub-rest02", "sub-rest03"):
        simulate_rest_subject(config, root / "bids", subject)
        template.append(root / "rest" / f"{subject}.h5")
        own.append(root / "native" / f"{subject}.h5")
        preprocess_rest_subject(config, root / "bids", subject, template[-1])
        preprocess_rest_subject(native, root / "bids", subject, own[-1])
    return {"root": root, "config": config, "template": template, "native": own}


@pytest.fixture(scope="module")
def pretrained(corpus):
    """SC-MBM pretrained on the template-space corpus, and bundled like the shipped encoder."""
    from mindvis.train.bundle import bundle
    from mindvis.train.pretrain_mbm import pretrain_mbm

    root = corpus["root"]
    summary = pretrain_mbm(corpus["config"], [], corpus["template"], root / "mbm")
    folder = bundle(corpus["config"], "sc-mbm", root / "mbm", commands=["pytest"], out_dir=root / "bundle")
    return {"summary": summary, "folder": folder, "mbm": root / "mbm"}


# -- the template space ---------------------------------------------------------------

def test_template_is_the_unjittered_rois_with_the_nominal_counts():
    fov = validate({})["simulate"]["field_of_view"]
    template = geometry.template_layout(3.0, fov, 120, 80)
    again = geometry.template_layout(3.0, fov, 120, 80)
    np.testing.assert_array_equal(template.ijk, again.ijk)  # no randomness at all
    assert template.n_voxels == 200 and int(template.is_early.sum()) == 120
    # A subject's ROIs jitter around the same anchors: they overlap the template without equalling it.
    subject = geometry.place_rois(3.0, fov, 120, 80, np.random.default_rng(0))
    shared = {tuple(v) for v in subject.ijk} & {tuple(v) for v in template.ijk}
    assert 0.2 * template.n_voxels < len(shared) < template.n_voxels
    # Both hemispheres get half of each count.
    assert int((template.hemisphere < 0).sum()) == int((template.hemisphere > 0).sum()) == 100


def test_the_template_is_written_where_a_reader_looks(corpus):
    paths = bids_layout.template_paths(corpus["root"] / "bids")
    assert all(path.exists() for path in paths.values())
    spec = json.loads(paths["spec"].read_text())
    assert spec["n_voxels"] == 200 and spec["resolution_mm"] == 3.0 and spec["n_early_voxels"] == 120
    assert spec["roi_counts"]["V1"] + spec["roi_counts"]["V2"] + spec["roi_counts"]["V3"] == 120
    assert "C order" in spec["voxel_order"]


def test_template_space_gives_every_subject_the_same_voxels_in_the_same_order(corpus):
    template = [load_rest(path) for path in corpus["template"]]
    native = [load_rest(path) for path in corpus["native"]]
    first = template[0]
    assert first.n_voxels == 200
    for rest in template[1:]:
        np.testing.assert_array_equal(rest.voxel_ijk, first.voxel_ijk)
        np.testing.assert_array_equal(rest.voxel_roi, first.voxel_roi)
        assert rest.attrs["voxel_space"]["space"] == "template"
        assert rest.attrs["voxel_space"]["voxel_ijk_sha256"] == first.attrs["voxel_space"]["voxel_ijk_sha256"]
    # Native space keeps each subject's own voxels (counts vary around the nominal ones, places differ).
    assert len({ijk_digest(rest.voxel_ijk) for rest in native}) == 3
    # The same scan read both ways: a voxel in both sets has the same time course.
    own, shared = native[0], template[0]
    row_of = {tuple(v): i for i, v in enumerate(own.voxel_ijk)}
    both = [(i, row_of[tuple(v)]) for i, v in enumerate(shared.voxel_ijk) if tuple(v) in row_of]
    assert len(both) > 20
    ours, theirs = map(list, zip(*both))
    np.testing.assert_allclose(shared.fmri[:, ours], own.fmri[:, theirs], atol=1e-5)


def test_template_space_keeps_a_bad_voxel_as_zero_instead_of_dropping_it(corpus, tmp_path):
    bids_dir = tmp_path / "bids"
    shutil.copytree(corpus["root"] / "bids", bids_dir)
    bold = next((bids_dir / "sub-rest01" / "func").glob("*_bold.nii.gz"))
    image = nib.load(bold)
    data = np.asarray(image.dataobj).copy()
    first = load_rest(corpus["template"][0]).voxel_ijk[5]
    data[tuple(first)] = 700  # constant over the run
    nib.save(nib.Nifti1Image(data, image.affine, image.header), bold)
    preprocess_rest_subject(corpus["config"], bids_dir, "sub-rest01", tmp_path / "rest.h5")
    rest = load_rest(tmp_path / "rest.h5")
    assert rest.n_voxels == 200 and np.all(rest.fmri[:, 5] == 0) and rest.attrs["zeroed_voxels"] == 1
    native = tiny_config(preprocess={"space": "native"})
    preprocess_rest_subject(native, bids_dir, "sub-rest01", tmp_path / "native.h5")
    assert load_rest(tmp_path / "native.h5").attrs["dropped_voxels"] <= 1  # native drops it (if it is its ROI's)


def test_a_task_subject_in_the_template_space(corpus, tmp_path):
    from mindvis.data.responses import load_responses
    from mindvis.data.stimuli import build_stimulus_set
    from mindvis.preprocess.run import preprocess_subject
    from mindvis.simulate.run import simulate_subject

    config = tiny_config(stimuli={"n_train_per_class": 8, "n_test_per_class": 1, "n_pool": 0},
                         simulate={"test_repeats": 3, "trials_per_run": 20})
    bids_dir = tmp_path / "bids"
    shutil.copytree(corpus["root"] / "bids" / "derivatives" / "simulation" / "template",
                    bids_dir / "derivatives" / "simulation" / "template")
    stimuli = tmp_path / "stimuli.h5"
    build_stimulus_set(config, stimuli)
    simulate_subject(config, stimuli, bids_dir, "sub-01")
    report = preprocess_subject(config, bids_dir, "sub-01", tmp_path / "responses.h5", stimuli_path=stimuli)
    responses = load_responses(tmp_path / "responses.h5")
    np.testing.assert_array_equal(responses.voxel_ijk, load_rest(corpus["template"][0]).voxel_ijk)
    assert report["space"] == "template" and report["n_voxels"]["kept"] == 200
    assert responses.quality["valid_voxel"].all() and responses.attrs["voxel_space"]["space"] == "template"
    # The simulator's truth covers the template voxels inside this subject's own (jittered) ROIs only.
    assert 0 < report["ground_truth"]["n_voxels"] < 200


def test_a_missing_template_names_the_key(tmp_path, corpus):
    config = tiny_config(preprocess={"template_mask": str(tmp_path / "absent.nii.gz")})
    with pytest.raises(MindvisError, match="not found"):
        preprocess_rest_subject(config, corpus["root"] / "bids", "sub-rest01", tmp_path / "out.h5")
    empty = tmp_path / "bids"
    (empty / "sub-rest01").mkdir(parents=True)
    shutil.copytree(corpus["root"] / "bids" / "sub-rest01", empty / "sub-rest01", dirs_exist_ok=True)
    with pytest.raises(MindvisError, match="simulator's mask is missing") as info:
        preprocess_rest_subject(corpus["config"], empty, "sub-rest01", tmp_path / "out.h5")
    assert info.value.key == "preprocess.template_mask"


# -- pretraining and bundling -------------------------------------------------------------

def test_pretraining_in_the_template_space_records_the_space_and_the_corpus(pretrained, corpus):
    summary, folder = pretrained["summary"], pretrained["mbm"]
    space = json.loads((folder / "space.json").read_text())
    assert space["n_voxels"] == 200 and len(space["voxel_ijk"]) == 200
    assert space["template"]["simulate"]["n_early_voxels"] == 120
    assert summary["corpus"]["n_vectors"] == 3 * 60 and summary["corpus"]["n_subjects"] == 3
    assert len(summary["corpus"]["sha256"]) == 64
    # The template as a label image a lab can pass as preprocess.template_mask.
    from mindvis.preprocess.bids import load_template

    mask = load_template(str(folder / "template_dseg.nii.gz"), corpus["root"])
    np.testing.assert_array_equal(mask.voxel_ijk, np.asarray(space["voxel_ijk"]))
    assert sorted(set(mask.voxel_roi)) == ["LOC", "V1", "V2", "V3", "VOT"]


def test_a_native_space_corpus_records_no_shared_space(corpus, tmp_path):
    from mindvis.train.pretrain_mbm import build_corpus

    _, _, sources, space = build_corpus([], corpus["native"])
    assert space is None and {source["space"] for source in sources} == {"native"}


def test_the_bundle_holds_weights_space_and_provenance_and_no_checkpoints(pretrained):
    folder = pretrained["folder"]
    provenance = verify_bundle(folder)
    files = set(provenance["files"])
    assert {"config.json", "diffusion_pytorch_model.safetensors", "space.json", "template_dseg.nii.gz"} <= files
    assert not any(name.startswith(("checkpoints", "best")) for name in files)
    assert provenance["corpus"]["n_vectors"] == 180 and provenance["corpus"]["n_subjects"] == 3
    assert len(provenance["corpus"]["files"]) == 3 and provenance["corpus"]["sha256"]
    assert provenance["training"]["val_recon_corr"] is not None and provenance["space"]["n_voxels"] == 200
    assert "voxel_ijk" not in provenance["space"]  # kept in space.json
    MBMAutoencoder.from_pretrained(folder)


def test_bundling_a_native_space_encoder_is_refused(pretrained, tmp_path):
    from mindvis.train.bundle import bundle

    shutil.copytree(pretrained["mbm"], tmp_path / "mbm")
    (tmp_path / "mbm" / "space.json").unlink()
    with pytest.raises(MindvisError, match="one shared template space") as info:
        bundle({}, "sc-mbm", tmp_path / "mbm", out_dir=tmp_path / "out")
    assert info.value.key == "preprocess.space"


# -- per-subject adaptation -----------------------------------------------------------------

def write_subject(path, space, rng, test_value=None, shift=0):
    """A responses.h5 in the encoder's template space (or, with ``shift``, one voxel moved off it)."""
    ijk = np.asarray(space["voxel_ijk"], dtype=np.int32).copy()
    ijk[0, 0] += shift
    n_voxels = len(ijk)

    def split(n, value=None):
        fmri = rng.standard_normal((n, n_voxels)).astype(np.float32) if value is None \
            else np.full((n, n_voxels), value, np.float32)
        return ResponseSplit(fmri, np.array([f"img{i}" for i in range(n)], dtype=object), np.zeros(n, np.int64),
                             np.ones(n, np.int64), np.zeros(n))

    test = split(6, test_value)
    average = ResponseSplit(test.fmri[:3], test.stimulus_id[:3], test.label[:3], np.full(3, -1), np.full(3, np.nan),
                            np.full(3, 2))
    write_responses(path, splits={"train": split(40), "val": split(8), "test": test, "test_avg": average},
                    voxel_ijk=ijk, affine=np.asarray(space["affine"]), volume_shape=space["volume_shape"],
                    voxel_roi=np.asarray(space["voxel_roi"], dtype=object), class_names=["a"], tr=2.0,
                    subject="sub-01", method="synthetic", preprocess_config={}, config={}, input_hashes={})
    return path


def adapt_config(pretrained, **mbm):
    return tiny_config(mbm={"base": str(pretrained["folder"]), "adapt_epochs": 1, **mbm})


def test_adaptation_reads_train_and_val_only_unless_transductive(pretrained, tmp_path, monkeypatch):
    import mindvis.data.responses as responses_module
    from mindvis.train.pretrain_mbm import adapt_mbm

    space = json.loads((pretrained["folder"] / "space.json").read_text())
    rng = np.random.default_rng(0)
    # Test fMRI that would blow the reconstruction loss up if it were read.
    path = write_subject(tmp_path / "responses.h5", space, rng, test_value=1e4)
    read = []
    original = responses_module.load_responses

    def spy(path, splits=responses_module.SPLITS):
        read.append(tuple(splits))
        return original(path, splits=splits)

    monkeypatch.setattr(responses_module, "load_responses", spy)
    summary = adapt_mbm(adapt_config(pretrained), "sub-01", path, tmp_path / "adapted")
    assert read == [("train", "val")]
    assert summary["transductive"] is False and summary["adapted_on"]["splits"] == ["train", "val"]
    assert summary["adapted_on"]["n_vectors"] == {"train": 40, "val": 8}
    assert summary["final_metrics"]["adapt/loss"] < 10 and summary["before"]["adapt/loss"] < 10
    model = MBMAutoencoder.from_pretrained(tmp_path / "adapted")
    assert (tmp_path / "adapted" / "space.json").exists()
    base = MBMAutoencoder.from_pretrained(pretrained["folder"])
    assert not torch.equal(model.patch_embed.weight, base.patch_embed.weight)  # it did adapt
    recorded = json.loads((tmp_path / "adapted" / "summary.json").read_text())
    assert recorded["transductive"] is False and recorded["base"]["bundle_sha256"]

    # Transductive: the test fMRI (finite now) is read too, and that is recorded.
    path = write_subject(tmp_path / "finite.h5", space, rng)
    read.clear()
    summary = adapt_mbm(adapt_config(pretrained, transductive=True), "sub-01", path, tmp_path / "transductive")
    assert read == [("train", "val", "test")] and summary["transductive"] is True
    assert summary["adapted_on"]["n_vectors"] == {"train": 40, "val": 8, "test": 6}


def test_zero_adaptation_epochs_copy_the_base(pretrained, tmp_path):
    from mindvis.train.pretrain_mbm import adapt_mbm

    space = json.loads((pretrained["folder"] / "space.json").read_text())
    path = write_subject(tmp_path / "responses.h5", space, np.random.default_rng(1))
    adapt_mbm(adapt_config(pretrained, adapt_epochs=0), "sub-01", path, tmp_path / "same")
    model, base = MBMAutoencoder.from_pretrained(tmp_path / "same"), MBMAutoencoder.from_pretrained(pretrained["folder"])
    for (name, value), (_, expected) in zip(model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(value, expected), name
    assert len((tmp_path / "same" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("change, key", [
    ({"preprocess": {"space": "native"}}, "preprocess.space"),
    ({"simulate": {"resolution_mm": 2.0}}, "simulate.resolution_mm"),
    ({"simulate": {"n_early_voxels": 900}}, "simulate.n_early_voxels"),
], ids=["native-space", "resolution", "voxel-count"])
def test_a_config_in_another_space_than_the_encoders_is_named(pretrained, tmp_path, change, key):
    from mindvis.train.pretrain_mbm import resolve_base

    config = tiny_config(mbm={"base": str(pretrained["folder"])}, **change)
    with pytest.raises(MindvisError) as info:
        resolve_base(config, "my.yaml")
    assert info.value.key == key and info.value.fix and "my.yaml" in str(info.value)


def test_a_subject_off_the_template_voxels_is_refused(pretrained, tmp_path):
    from mindvis.train.pretrain_mbm import adapt_mbm

    space = json.loads((pretrained["folder"] / "space.json").read_text())
    path = write_subject(tmp_path / "responses.h5", space, np.random.default_rng(2), shift=1)
    with pytest.raises(MindvisError, match="not the 200 template voxels") as info:
        adapt_mbm(adapt_config(pretrained), "sub-01", path, tmp_path / "adapted")
    assert info.value.key == "preprocess.space" and not (tmp_path / "adapted" / "config.json").exists()


# -- the shipped encoder ------------------------------------------------------------------

def test_the_shipped_encoder_matches_its_hashes_and_the_default_template_space():
    provenance = verify_bundle(BUNDLED_MBM)
    assert provenance["git"]["commit"] and provenance["commands"]
    assert provenance["corpus"]["n_vectors"] >= 50_000 and provenance["corpus"]["n_subjects"] >= 40
    assert provenance["training"]["val_recon_corr"] > 0.2
    assert sum((BUNDLED_MBM / name).stat().st_size for name in provenance["files"]) < 10e6
    # Its space is the schema default's template: the default experiment's subjects can be read in it.
    defaults = validate({})["simulate"]
    space = json.loads((BUNDLED_MBM / "space.json").read_text())
    template = geometry.template_layout(defaults["resolution_mm"], defaults["field_of_view"],
                                        defaults["n_early_voxels"], defaults["n_higher_voxels"])
    assert space["voxel_ijk_sha256"] == ijk_digest(template.ijk) and space["n_voxels"] == template.n_voxels
    np.testing.assert_allclose(space["affine"], template.grid.affine)
    model = MBMAutoencoder.from_pretrained(BUNDLED_MBM)
    assert model.n_tokens == -(-space["n_voxels"] // model.config.patch_size)
    assert (BUNDLED_MBM / PROVENANCE_FILE).exists()


def test_the_workflow_adapts_the_shipped_encoder_per_subject(tmp_path):
    """mbm.base bundled: each subject's decoder reads results/{subject}/mbm/, made by adapt_mbm; nothing pretrains."""
    config = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    config["preprocess"] = {**config.get("preprocess", {}), "space": "template"}
    config["mbm"] = {**config.get("mbm", {}), "base": "bundled"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "snakemake", "results/sub-01/dcldm/dcldm.json", "--snakefile",
               str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "1", "-n", "--quiet", "rules",
               "--configfile", str(tmp_path / "config.yaml")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = result.stdout + result.stderr
    assert "adapt_mbm" in jobs and "bids_metadata" in jobs and "finetune" in jobs
    assert "pretrain_mbm" not in jobs
