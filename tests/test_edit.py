"""Prompt-to-Prompt attention control (replace, refine, reweight) and brain-token edits."""

import numpy as np
import pytest
import torch
from ldm_fixtures import save_tiny_mbm, save_tiny_sd, tiny_config, tiny_generator

from mindvis.generate.control import AttentionController, AttentionEdit, sample_edit
from mindvis.generate.edit import TokenEdit, changed_tokens, edit_trials, edited_condition, group_tokens, roi_voxels
from mindvis.generate.sampling import sample_images
from mindvis.models.dcldm import build_decoder

SETTINGS = {"sampler": "ddim", "steps": 4, "guidance_scale": 3.0, "eta": 0.0}


@pytest.fixture(scope="module", params=["embedded", "sd"])
def generator(request, tmp_path_factory):
    """The embedded prior's UNet and a Stable-Diffusion-layout UNet: the same control code runs on both."""
    if request.param == "embedded":
        return tiny_generator(seed=1, num_train_timesteps=20)
    from mindvis.models.ldm import load_generator

    return load_generator(save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd"))


def _conditions(generator, n=2, seed=0):
    """Two random conditions of the generator's shape, and a null condition function."""
    from mindvis.models.conditioning import Condition

    shape = (generator.context_tokens, generator.cross_attention_dim)

    def make(offset, rows):
        g = torch.Generator().manual_seed(seed + offset)
        return Condition(torch.randn(rows, *shape, generator=g), torch.randn(rows, generator.pooled_dim, generator=g))

    null = make(0, 1)
    return make(1, n), make(2, n), lambda batch: null.select(torch.zeros(batch, dtype=torch.long))


def _plain(generator, condition, null, seeds):
    return sample_images(generator, condition, null_condition=null(len(seeds)), sampler="ddim", num_steps=4,
                         guidance_scale=SETTINGS["guidance_scale"], seeds=seeds)


def test_injection_over_all_steps_reproduces_the_source_maps_exactly(generator):
    source, edited, null = _conditions(generator)
    images, controller = sample_edit(generator, source, edited, null, [3, 4], SETTINGS,
                                     AttentionEdit("replace", tau=4), record=True)
    assert sorted(controller.maps) == [0, 1, 2, 3] and set(controller.maps[0]) == set(controller.layers)
    for layers in controller.maps.values():
        for maps in layers.values():
            assert torch.equal(maps[1], maps[0])
    # The source rows are a plain run of the source; the edit keeps its own values, so it is not the source.
    torch.testing.assert_close(images[0], _plain(generator, source, null, [3, 4]), rtol=0, atol=1e-4)
    assert (images[1] - images[0]).abs().max() > 1e-4
    # The processors were put back.
    assert all(type(p).__name__ != "ControlledAttention" for p in generator.unet.attn_processors.values())


def test_no_injection_equals_a_plain_run_of_the_edited_condition(generator):
    source, edited, null = _conditions(generator)
    images, controller = sample_edit(generator, source, edited, null, [3, 4], SETTINGS,
                                     AttentionEdit("replace", tau=0), record=True)
    torch.testing.assert_close(images[1], _plain(generator, edited, null, [3, 4]), rtol=0, atol=1e-4)
    assert any((maps[1] - maps[0]).abs().max() > 1e-5 for maps in controller.maps[0].values())


def test_reweighting_by_one_changes_nothing_and_other_weights_do(generator):
    source, edited, null = _conditions(generator)
    tokens = generator.context_tokens
    plain, _ = sample_edit(generator, source, edited, null, [5, 6], SETTINGS, AttentionEdit(None))
    ones, _ = sample_edit(generator, source, edited, null, [5, 6], SETTINGS,
                          AttentionEdit(None, weights=torch.ones(tokens)))
    torch.testing.assert_close(ones, plain, rtol=0, atol=0)
    weights = torch.ones(tokens)
    weights[0] = 4.0
    heavier, controller = sample_edit(generator, source, edited, null, [5, 6], SETTINGS,
                                      AttentionEdit(None, weights=weights), record=True)
    torch.testing.assert_close(heavier[0], plain[0], rtol=0, atol=0)  # the source rows are never touched
    assert (heavier[1] - plain[1]).abs().max() > 1e-4
    maps = next(iter(controller.maps[0].values()))
    # Token 0 (share p) scaled by 4: the recorded map holds 4p there and sums to 1 + 3p.
    torch.testing.assert_close(maps[1].sum(-1), 1.0 + 0.75 * maps[1][..., 0])


def test_refine_keeps_its_own_maps_only_on_the_chosen_tokens(generator):
    source, edited, null = _conditions(generator)
    tokens = generator.context_tokens
    own = torch.zeros(tokens, dtype=torch.bool)
    none_own, _ = sample_edit(generator, source, edited, null, [1, 2], SETTINGS, AttentionEdit("refine", 4, own=own))
    replaced, _ = sample_edit(generator, source, edited, null, [1, 2], SETTINGS, AttentionEdit("replace", 4))
    torch.testing.assert_close(none_own, replaced, rtol=0, atol=0)
    all_own, _ = sample_edit(generator, source, edited, null, [1, 2], SETTINGS,
                             AttentionEdit("refine", 4, own=~own))
    free, _ = sample_edit(generator, source, edited, null, [1, 2], SETTINGS, AttentionEdit("replace", 0))
    torch.testing.assert_close(all_own, free, rtol=0, atol=0)
    if tokens > 1:
        own[0] = True
        _, controller = sample_edit(generator, source, edited, null, [1, 2], SETTINGS,
                                    AttentionEdit("refine", 4, own=own), record=True)
        maps = next(iter(controller.maps[1].values()))
        torch.testing.assert_close(maps[1][..., 1:], maps[0][..., 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the tokens"):
        sample_edit(generator, source, edited, null, [1, 2], SETTINGS, AttentionEdit("refine", 1))


def test_the_controller_refuses_a_batch_that_is_not_source_then_edit(generator):
    source, edited, null = _conditions(generator, n=2)
    controller = AttentionController(generator.unet, AttentionEdit("replace", 2), n_rows=3)
    controller.begin_step(0, slice(0, 4))
    with pytest.raises(ValueError, match="3 source and 3 edited rows"):
        controller.control("layer", torch.zeros(4, 1, 2, 2))
    with pytest.raises(ValueError, match="unknown attention edit mode"):
        AttentionEdit("swap")


# -- brain-token edits -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["readout", "mindvis-ext"])
def decoder(tmp_path_factory, request):
    """The default read-out (encoder tokens only), and mindvis-ext's voxel path beside its encoder path."""
    root = tmp_path_factory.mktemp("edit")
    save_tiny_mbm(root / "mbm", n_voxels=37)
    config = tiny_config(finetune={"mapper": request.param})
    generator = tiny_generator(seed=2, num_train_timesteps=20)
    model = build_decoder(config, generator, 37, mbm_dir=root / "mbm").eval()
    assert (model.conditioner.voxel_map is not None) == (request.param == "mindvis-ext")
    with torch.no_grad():  # every path (encoder tokens, and a voxel path where there is one) carries the input
        for parameter in model.conditioner.parameters():
            parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(parameter.numel()))
    return model, generator


def test_group_tokens_follow_the_encoder_patch_layout(decoder):
    model, _ = decoder
    patch = model.encoder.config.patch_size  # 4: 37 voxels in 10 tokens, the last holding one real voxel
    voxels = np.zeros(37, dtype=bool)
    voxels[:6] = True  # token 0 whole, token 1 half (not a majority)
    voxels[36] = True  # token 9: its only real voxel
    tokens = group_tokens(model, voxels)
    assert patch == 4 and tokens.shape == (10,)
    assert tokens.tolist() == [True] + [False] * 8 + [True]
    assert group_tokens(model, voxels, token_share=0.4)[1]


def test_token_edits_that_change_nothing_leave_the_condition_exact(decoder):
    model, _ = decoder
    rng = np.random.default_rng(0)
    fmri = rng.normal(size=(3, 37)).astype(np.float32)
    plain = model.condition(torch.as_tensor(fmri))
    group = np.arange(37) < 20
    for edit, donor in ((TokenEdit(group, "scale", factor=1.0), None), (TokenEdit(group, "swap"), fmri),
                        (TokenEdit(np.zeros(37, bool), "zero"), None)):
        same = edited_condition(model, fmri, edit, donor)
        torch.testing.assert_close(same.context, plain.context, rtol=0, atol=0)
        assert not changed_tokens(plain, same).any()
    donor = rng.normal(size=(3, 37)).astype(np.float32)
    swapped = edited_condition(model, fmri, TokenEdit(group, "swap"), donor)
    zeroed = edited_condition(model, fmri, TokenEdit(group, "zero"), None)
    assert changed_tokens(plain, swapped).any() and changed_tokens(plain, zeroed).any()
    # Swapping the group's voxels only: the voxels outside it still come from the decoded trial.
    mixed = np.where(group, donor, fmri)
    assert (swapped.context - model.condition(torch.as_tensor(donor)).context).abs().max() > 1e-4
    assert torch.isfinite(swapped.context).all() and mixed.shape == fmri.shape
    with pytest.raises(ValueError, match="needs the donor"):
        edited_condition(model, fmri, TokenEdit(group, "swap"))


def test_edit_trials_with_tau_zero_decodes_the_edited_condition(decoder):
    model, generator = decoder
    rng = np.random.default_rng(1)
    fmri, donor = rng.normal(size=(2, 37)).astype(np.float32), rng.normal(size=(2, 37)).astype(np.float32)
    group = np.arange(37) >= 20
    settings = {**SETTINGS, "steps": 3}
    out = edit_trials(model, generator, fmri, TokenEdit(group, "swap"), settings, [7, 8], donor=donor)
    condition = edited_condition(model, fmri, TokenEdit(group, "swap"), donor)
    from mindvis.data.images import tensor_to_images

    plain = tensor_to_images(sample_images(generator, condition, null_condition=model.null(2), sampler="ddim",
                                           num_steps=3, guidance_scale=3.0, seeds=[7, 8]))
    assert np.abs(out["edited"].astype(int) - plain.astype(int)).max() <= 1
    assert out["controllers"] == []  # nothing to control: both images sampled as generate samples them
    kept = edit_trials(model, generator, fmri, TokenEdit(group, "swap"), settings, [7, 8], donor=donor,
                       attention=AttentionEdit("replace", tau=3))
    # The source sampled beside its edit (under the controller's explicit attention) and alone agree.
    assert np.abs(kept["source"].astype(int) - out["source"].astype(int)).max() <= 1
    assert out["edited"].shape == kept["edited"].shape == (2, 16, 16, 1)
    # A source given is reused where nothing is injected (the check samples each stimulus's source once).
    marker = np.full_like(out["source"], 9)
    reused = edit_trials(model, generator, fmri, TokenEdit(group, "swap"), settings, [7, 8], donor=donor,
                         source=marker)
    assert reused["source"] is marker or np.array_equal(reused["source"], marker)
    assert np.array_equal(reused["edited"], out["edited"])
    # One trial per sampler call (generate.batch_size 2): the same images, from the same per-trial noise.
    one_by_one = edit_trials(model, generator, fmri, TokenEdit(group, "swap"), {**settings, "batch_size": 2}, [7, 8],
                             donor=donor, attention=AttentionEdit("replace", tau=3))
    assert len(one_by_one["controllers"]) == 2
    assert np.abs(one_by_one["edited"].astype(int) - kept["edited"].astype(int)).max() <= 1


def test_roi_names_must_exist():
    from mindvis.errors import MindvisError

    names = np.array(["V1", "V1", "LOC", "V2"], dtype=object)
    assert roi_voxels(names, ["V1", "V2"]).tolist() == [True, True, False, True]
    with pytest.raises(MindvisError, match="ROI V4 not in voxel_roi"):
        roi_voxels(names, ["V4"])


def test_donors_are_of_another_class_and_shown_stimuli_cover_the_classes():
    from mindvis.evaluate.edits import donor_rows, shown_rows

    labels = np.array([0, 0, 1, 2, 1, 2, 0])
    donors = donor_rows(labels, seed=3)
    assert np.all(labels[donors] != labels) and np.array_equal(donors, donor_rows(labels, seed=3))
    assert donor_rows(np.zeros(3, int), seed=0).tolist() == [-1, -1, -1]
    assert shown_rows(labels, 3) == [0, 2, 3] and shown_rows(labels, 4) == [0, 1, 2, 3] and shown_rows(labels, 0) == []


def test_a_nifti_mask_selects_the_voxels_on_its_grid(tmp_path):
    import nibabel as nib

    from mindvis.errors import MindvisError
    from mindvis.generate.edit import mask_voxels

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    data = np.zeros((4, 3, 2), np.uint8)
    data[1, 2, 0] = data[3, 0, 1] = 1
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "roi.nii.gz")
    ijk = np.array([[1, 2, 0], [0, 0, 0], [3, 0, 1], [2, 1, 1]])
    assert mask_voxels(tmp_path / "roi.nii.gz", ijk, affine, (4, 3, 2)).tolist() == [True, False, True, False]
    with pytest.raises(MindvisError, match="does not match"):
        mask_voxels(tmp_path / "roi.nii.gz", ijk, np.eye(4), (4, 3, 2))
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not a nifti")
    with pytest.raises(MindvisError, match="cannot read the mask"):
        mask_voxels(tmp_path / "broken.nii.gz", ijk, affine, (4, 3, 2))
