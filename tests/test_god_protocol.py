"""MinD-Vis's GOD protocol behind its config keys (docs/god_protocol.md), each checked against MinD-Vis's code.

The reference formulas below restate MinD-Vis's ``code/dataset.py`` (``pad_to_patch_size``, ``normalize`` and
``create_Kamitani_dataset``) line for line in NumPy, so a change to mindvis's conversion shows here.
"""

import numpy as np
import pytest
import torch

from mindvis.generate.sampling import make_scheduler
from test_sources import convert, god_names, make_config, write_god_npz

PATCH = 16


def upstream_pad(x, patch_size):
    return np.pad(x, ((0, 0), (0, patch_size - x.shape[1] % patch_size)), "wrap")


def upstream_normalize(x, mean=None, std=None):
    mean = np.mean(x) if mean is None else mean
    std = np.std(x) if std is None else std
    return (x - mean) / (std * 1.0)


def upstream_kamitani(truth, arr_2):
    """``create_Kamitani_dataset``'s train and test matrices for one subject (VC), cut back to the real voxels."""
    tr = truth["arr_0"][:, truth["vc"]]
    tt = arr_2[:, truth["vc"]]
    n_voxels = tr.shape[1]
    tr = upstream_normalize(upstream_pad(tr, PATCH))
    tt = upstream_normalize(upstream_pad(tt, PATCH), np.mean(tr), np.std(tr))
    return tr[:, :n_voxels], tt[:, :n_voxels]


@pytest.fixture
def god_files(tmp_path):
    truth = write_god_npz(tmp_path / "npz", np.random.default_rng(7))
    data = np.load(tmp_path / "npz" / "sbj_1.npz")
    truth["arr_2"] = data["arr_2"]
    return tmp_path, truth


def god_config(tmp_path, **god_npz):
    return make_config(tmp_path, source="god_npz", trials_per_block=3, normalisation="mindvis_scalar",
                       god_npz={"dir": str(tmp_path / "npz"), **god_npz})


def test_mindvis_scalar_normalisation_is_mindvis_code(god_files):
    tmp_path, truth = god_files
    summary, responses, _ = convert(god_config(tmp_path, test_average="file"), tmp_path)
    train_names, test_names = god_names()
    expected_train, expected_test = upstream_kamitani(truth, truth["arr_2"])
    # training and validation trials: the training matrix normalised by its own padded scalars
    file_train_names = list(np.asarray(train_names)[truth["train_index"]])
    for split in ("train", "val"):
        rows = [file_train_names.index(s) for s in responses[split].stimulus_id]
        np.testing.assert_allclose(responses[split].fmri, expected_train[rows], rtol=1e-5, atol=1e-5)
    # test averages: the file's arr_2, scaled by the normalised training matrix's scalars as MinD-Vis's code does
    avg = responses["test_avg"]
    rows = [test_names.index(s) for s in avg.stimulus_id]
    np.testing.assert_allclose(avg.fmri, expected_test[rows], rtol=1e-5, atol=1e-5)
    assert "mindvis_scalar" in summary["normalisation"]
    # the test data keep their file scale: MinD-Vis's second scalars are about 0 and 1
    np.testing.assert_allclose(avg.fmri, truth["arr_2"][rows][:, truth["vc"]], atol=1e-4)
    assert summary["test_average"] == "file" and summary["test_average_max_abs_difference"] < 1e-5


def test_scalar_normalisation_scales_test_by_training_scalars(god_files):
    tmp_path, truth = god_files
    config = god_config(tmp_path)
    config["data"]["normalisation"] = "scalar"
    _, responses, _ = convert(config, tmp_path)
    padded = upstream_pad(truth["arr_0"][:, truth["vc"]], PATCH)
    _, test_names = god_names()
    avg = responses["test_avg"]
    rows = [test_names.index(s) for s in avg.stimulus_id]
    expected = (truth["arr_2"][rows][:, truth["vc"]] - padded.mean()) / padded.std()
    np.testing.assert_allclose(avg.fmri, expected, rtol=1e-5, atol=1e-5)


def test_file_averages_must_cover_the_test_stimuli(god_files):
    tmp_path, _ = god_files
    # the recomputed averages (the default) equal the file's when arr_2 is arr_1's mean, as in the release
    _, recomputed, _ = convert(god_config(tmp_path), tmp_path)
    _, from_file, _ = convert(god_config(tmp_path, test_average="file"), tmp_path / "file")
    np.testing.assert_allclose(recomputed["test_avg"].fmri, from_file["test_avg"].fmri, atol=1e-5)
    assert list(recomputed["test_avg"].stimulus_id) == list(from_file["test_avg"].stimulus_id)


def test_constant_voxel_kept_under_scalar_normalisation(tmp_path):
    truth = write_god_npz(tmp_path / "npz", np.random.default_rng(8))
    path = tmp_path / "npz" / "sbj_1.npz"
    arrays = dict(np.load(path))
    arrays["arr_0"][:, 5] = 1.0  # a constant VC voxel: z-scoring drops it, MinD-Vis's scalars keep it
    np.savez(path, **arrays)
    _, scalar, _ = convert(god_config(tmp_path), tmp_path)
    assert scalar.n_voxels == int(truth["vc"].sum())
    _, zscored, _ = convert(make_config(tmp_path, source="god_npz", trials_per_block=3,
                                        god_npz={"dir": str(tmp_path / "npz")}), tmp_path / "z")
    assert zscored.n_voxels == int(truth["vc"].sum()) - 1


# -- PLMS as CompVis's PLMSSampler (latent-diffusion ldm/models/diffusion/plms.py, MinD-Vis's dc_ldm copy) ---------

CIN256_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
                   "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def toy_eps(x, t):
    """A deterministic noise prediction that depends on the sample and the timestep."""
    return torch.tanh(0.7 * x + 0.001 * float(t)) * (1.0 + 0.0005 * float(t))


def compvis_plms(x, steps, alphas_cumprod):
    """CompVis's ``make_ddim_timesteps('uniform')``, ``make_ddim_sampling_parameters`` (eta 0) and
    ``p_sample_plms``, restated: the reference the ``plms_compvis`` sampler must reproduce."""
    ddim_timesteps = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    alphas = alphas_cumprod[ddim_timesteps]
    alphas_prev = torch.tensor([float(alphas_cumprod[0])] + alphas_cumprod[ddim_timesteps[:-1]].tolist())
    time_range = np.flip(ddim_timesteps)
    old_eps = []

    def x_prev_of(x, e_t, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i, step in enumerate(time_range):
        index = len(time_range) - i - 1
        t_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = toy_eps(x, step)
        if len(old_eps) == 0:
            e_t_next = toy_eps(x_prev_of(x, e_t, index), t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(x, e_t_prime, index)
        old_eps.append(e_t)
        old_eps = old_eps[-3:]
    return x, ddim_timesteps


def mindvis_plms(sampler, x, steps):
    scheduler = make_scheduler(sampler, CIN256_SCHEDULE)
    scheduler.set_timesteps(steps)
    for timestep in scheduler.timesteps:
        x = scheduler.step(toy_eps(scheduler.scale_model_input(x, timestep), timestep), timestep, x).prev_sample
    return x, scheduler


@pytest.mark.parametrize("steps", [250, 10])
def test_plms_compvis_is_compvis_plms(steps):
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    ours, scheduler = mindvis_plms("plms_compvis", x.clone(), steps)
    reference, ddim_timesteps = compvis_plms(x.clone(), steps, scheduler.alphas_cumprod)
    assert sorted(set(scheduler.timesteps.tolist())) == ddim_timesteps.tolist()
    if steps == 250:
        assert ddim_timesteps[0] == 1 and ddim_timesteps[-1] == 997
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_diffusers_plms_differs_from_compvis():
    """The ``plms`` sampler (kept for configs that use it) runs timesteps 0 ... 996: not MinD-Vis's."""
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    ours, scheduler = mindvis_plms("plms", x.clone(), 10)
    reference, ddim_timesteps = compvis_plms(x.clone(), 10, scheduler.alphas_cumprod)
    assert sorted(set(scheduler.timesteps.tolist())) != ddim_timesteps.tolist()
    assert not torch.allclose(ours, reference, rtol=1e-4, atol=1e-4)


# -- what fine-tuning trains: MinD-Vis's configure_optimizers (dc_ldm/models/diffusion/ddpm.py) -------------------

def test_cross_attn_norms_are_mindvis_norm2_parameters():
    """MinD-Vis trains the condition stage and every parameter whose name holds 'attn2', 'time_embed_condtion' or
    'norm2'; in CompVis's UNet 'norm2' names only the LayerNorm before each cross-attention. Converted to diffusers,
    those tensors are exactly what ``attn2`` + ``cross_attn_norms`` train (diffusers' resnets also have a
    ``norm2``, which MinD-Vis does not train)."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from compvis_fixtures import TINY_LDM_PARAMS, ldm_unet_state
    from mindvis.models.compvis import convert_unet_state, split_ldm_state, unet_config_from_ldm
    from mindvis.train.finetune import trainable_parameter_names

    unet_params = TINY_LDM_PARAMS["unet_config"]["params"]
    compvis_unet = split_ldm_state(ldm_unet_state(TINY_LDM_PARAMS))["unet"]
    unet_config = unet_config_from_ldm(unet_params)
    state, _ = convert_unet_state(compvis_unet, unet_config, unet_params)

    def diffusers_name(tensor):
        (name,) = [key for key, value in state.items() if value.shape == tensor.shape and torch.equal(value, tensor)]
        return name

    mindvis_trained = {diffusers_name(value) for key, value in compvis_unet.items() if "attn2" in key or "norm2" in key}
    unet = UNet2DConditionModel(**unet_config)
    ours = {name.removeprefix("unet.")
            for name in trainable_parameter_names(SimpleNamespace(unet=unet), ["attn2", "cross_attn_norms"])}
    assert ours == mindvis_trained
    assert any(".norm2." in name for name in ours) and not any("resnets" in name for name in ours)


# -- MinD-Vis's own PixCorr and SSIM (code/eval_metrics.py, pair_wise_score with pcc_metric / ssim_metric) --------

def upstream_pair_wise(pred_imgs, gt_imgs, metric):
    corrects = []
    for idx, pred in enumerate(pred_imgs):
        gt_score = metric(pred, gt_imgs[idx])
        rest = [img for i, img in enumerate(gt_imgs) if i != idx]
        corrects.append(sum(gt_score > metric(pred, comp) for comp in rest) / len(rest))
    return corrects


def test_mindvis_pixel_metrics_are_mindvis_code():
    from skimage.metrics import structural_similarity

    from mindvis.evaluate.metrics import pixcorr_mindvis, ssim_mindvis

    rng = np.random.default_rng(5)
    true = rng.integers(0, 256, (6, 20, 18, 3), dtype=np.uint8)
    gen = np.clip(true.astype(int) + rng.normal(0, 90, true.shape), 0, 255).astype(np.uint8)
    gen[2] = rng.integers(0, 256, gen[2].shape)  # one reconstruction unrelated to its image

    def pcc(a, b):
        return np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1]

    def ssim(a, b):
        return structural_similarity(a, b, data_range=255, channel_axis=-1)

    as_float = (gen.astype(np.float64), true.astype(np.float64))
    np.testing.assert_allclose(pixcorr_mindvis(gen, true), upstream_pair_wise(*as_float, pcc), atol=1e-12)
    np.testing.assert_allclose(ssim_mindvis(gen, true), upstream_pair_wise(*as_float, ssim), atol=1e-12)
    assert pixcorr_mindvis(true, true).tolist() == [1.0] * 6


def test_mindvis_metrics_only_where_asked():
    from mindvis.config import validate

    assert validate({})["evaluate"]["mindvis_metrics"] is False
