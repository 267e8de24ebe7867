"""The field's metrics for decoded images, each with the definition it follows.

All functions work per stimulus (one value per test image, or per sample) so
that :func:`bootstrap_ci` can resample stimuli for a confidence interval of
any figure, as the issue asks for every number in the report.

========================  =====================================================
metric                    definition followed
========================  =====================================================
:func:`n_way_top1`        MinD-Vis (Chen et al., CVPR 2023, Sec. 4 "Evaluation
                          metric"; ``n_way_top_k_acc`` in their
                          ``code/eval_metrics.py``)
:func:`two_way_identification`  Brain-Diffuser (Ozcelik & VanRullen, Sci. Rep.
                          2023, Sec. "Evaluation") and MindEye (Scotti et al.,
                          NeurIPS 2023, Sec. 3.1 / their ``two_way_identification``)
:func:`pixcorr`           same papers: Pearson r of pixel values
:func:`pixcorr_mindvis`, :func:`ssim_mindvis`  MinD-Vis's own (code/eval_metrics.py): two-way
                          identification by RGB Pearson r / scikit-image's default SSIM
:func:`ssim`              same papers: grey, Gaussian-weighted SSIM (Wang et al.
                          2004) as ``skimage.metrics.structural_similarity``
:func:`fid`               Heusel et al., NeurIPS 2017, Eq. 6 (Fréchet distance of
                          Gaussians fit to features), as pytorch-fid computes it
:func:`embedding_retrieval`  MindEye (Scotti et al., NeurIPS 2023, Sec. 3.1 and
                          Table 1 "Retrieval": image and brain top-1 by cosine
                          similarity of embeddings), here among all N test
                          stimuli and in the image prior's embedding space
:func:`wilson_interval`   Wilson, JASA 1927 (score interval of a binomial
                          proportion), as ``statsmodels``' ``proportion_confint
                          (method="wilson")``
========================  =====================================================

Image sizes: MindEye and Brain-Diffuser compute PixCorr and SSIM at 425 x 425
(NSD images resized); MinD-Vis at 256 x 256. Here the side is an argument
(``evaluate.image_size`` in the config, by default the generated image size).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import comb

from mindvis.errors import MindvisError

#: RGB -> grey weights of ``skimage.color.rgb2gray`` (ITU-R BT.709 luma), used by MindEye before SSIM.
GREY_WEIGHTS = (0.2125, 0.7154, 0.0721)
#: SSIM's Gaussian window as MindEye sets it (sigma 1.5, truncated at 3.5 sigma: 11 x 11 px).
SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5


# -- n-way top-1 classification --------------------------------------------------

def _check_probs(probs, gt_class):
    probs = np.asarray(probs, dtype=np.float64)
    gt_class = np.asarray(gt_class)
    if probs.ndim != 3:
        raise MindvisError(f"probs must be [N stimuli, k samples, C classes], got shape {probs.shape}",
                           key="probs", fix="add the sample axis, e.g. probs[:, None, :] for one sample.")
    if gt_class.shape != (probs.shape[0],) or not np.issubdtype(gt_class.dtype, np.integer):
        raise MindvisError(f"gt_class must be int [{probs.shape[0]}], got {gt_class.dtype} {gt_class.shape}",
                           key="gt_class")
    if len(gt_class) and (gt_class.min() < 0 or gt_class.max() >= probs.shape[2]):
        raise MindvisError(f"gt_class values must lie in [0, {probs.shape[2]})", key="gt_class")
    return probs, gt_class.astype(np.int64)


def _beaters(probs, gt_class):
    """Number of classes whose probability is strictly above the ground-truth class's: int [N, k]."""
    gt_prob = np.take_along_axis(probs, gt_class[:, None, None], axis=2)
    return (probs > gt_prob).sum(axis=2)


def n_way_top1(probs, gt_class, n_way, trials=1000, seed=0):
    """n-way top-1 classification accuracy of each sample, exactly as MinD-Vis computes it.

    Definition (MinD-Vis, Chen et al., CVPR 2023, Sec. 4 and ``n_way_top_k_acc``
    in their ``code/eval_metrics.py``): the ground-truth class is the
    classifier's top-1 on the true image; in each of ``trials`` trials, n-1
    other classes are drawn without replacement from the C-1 others, and the
    trial succeeds if the ground-truth class has the highest probability among
    the n (ties go to the ground truth, as there: it sits first and ``argmax``
    takes the first maximum). The score is the success rate over the trials.

    A trial fails exactly when one of the drawn classes beats the ground
    truth, so only the number of beaters among the n-1 draws matters; it is
    hypergeometric (m beaters among C-1 classes, n-1 draws without
    replacement), which is how it is sampled here: the same distribution of
    outcomes as MinD-Vis's loop, vectorised.

    Parameters
    ----------
    probs : array [N, k, C] float
        Class probabilities of k samples for each of N stimuli.
    gt_class : array [N] int
        Ground-truth class of each stimulus (the classifier's top-1 on the true image).
    n_way : int
        n (>= 2). When ``n_way >= C`` every class takes part: plain top-1
        (the ground truth is the argmax), with no sampling.
    trials : int
        Trials per sample (MinD-Vis: 1000 in the paper's evaluation).
    seed : int
        Seed of the trial draws (the result is deterministic for a seed).

    Returns
    -------
    array [N, k] float
        Each sample's success rate over the trials. Average over axis 1 for the
        mean over samples; :func:`best_of_k` for best-of-k.
    """
    probs, gt_class = _check_probs(probs, gt_class)
    if n_way < 2:
        raise MindvisError(f"n_way must be at least 2, got {n_way}", key="evaluate.n_way")
    if trials < 1:
        raise MindvisError(f"trials must be at least 1, got {trials}", key="evaluate.trials")
    n_classes = probs.shape[2]
    beaters = _beaters(probs, gt_class)
    if n_way >= n_classes:
        return (beaters == 0).astype(np.float64)
    rng = np.random.default_rng(seed)
    size = beaters.shape + (int(trials),)
    drawn_beaters = rng.hypergeometric(np.broadcast_to(beaters[..., None], size),
                                       np.broadcast_to(n_classes - 1 - beaters[..., None], size),
                                       n_way - 1, size=size)
    return (drawn_beaters == 0).mean(axis=2)


def n_way_top1_expected(probs, gt_class, n_way):
    """The value :func:`n_way_top1` estimates, without sampling noise (its limit as trials grow).

    With m classes beating the ground truth, a trial succeeds with probability
    C(C-1-m, n-1) / C(C-1, n-1) (no beater among the n-1 draws). Same
    definition and arguments as :func:`n_way_top1` (MinD-Vis, CVPR 2023, Sec. 4).

    Returns
    -------
    array [N, k] float
    """
    probs, gt_class = _check_probs(probs, gt_class)
    n_classes = probs.shape[2]
    beaters = _beaters(probs, gt_class)
    if n_way >= n_classes:
        return (beaters == 0).astype(np.float64)
    return comb(n_classes - 1 - beaters, n_way - 1) / comb(n_classes - 1, n_way - 1)


def resolve_n_way(n_way, n_classes):
    """``evaluate.n_way`` made concrete: null means 50 (the paper's) when the classifier has >= 50 classes, else all."""
    if n_way is None:
        return 50 if n_classes >= 50 else int(n_classes)
    return int(n_way)


def best_of_k(per_sample):
    """Best-of-k score of each stimulus: the maximum over its k samples (axis 1), as MinD-Vis reports.

    Parameters
    ----------
    per_sample : array [N, k]

    Returns
    -------
    array [N]
    """
    return np.asarray(per_sample, dtype=np.float64).max(axis=1)


# -- feature and pixel metrics -----------------------------------------------------

def _standardize_rows(values):
    values = np.asarray(values, dtype=np.float64)
    centred = values - values.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return centred / norms


def _row_pearson(first, second):
    """Pearson r between matching rows of two [N, D] arrays -> [N] (nan for a constant row)."""
    return np.sum(_standardize_rows(first) * _standardize_rows(second), axis=1)


def two_way_identification(gen_features, true_features):
    """Two-way identification accuracy of each reconstruction.

    Definition (Brain-Diffuser, Ozcelik & VanRullen 2023; MindEye, Scotti et
    al. 2023, Sec. 3.1 and their ``two_way_identification``): with Pearson r
    between feature vectors, reconstruction i scores the fraction of the other
    stimuli j != i whose true-image features correlate less with it than its
    own true image's do: mean over j != i of [r(gen_i, true_j) < r(gen_i, true_i)].
    Chance is 0.5.

    Parameters
    ----------
    gen_features, true_features : array [N, F]
        Features of the reconstructions and of their true images, row i paired (N >= 2).

    Returns
    -------
    array [N] float
    """
    gen = _standardize_rows(gen_features)
    true = _standardize_rows(true_features)
    if gen.shape != true.shape or gen.ndim != 2 or len(gen) < 2:
        raise MindvisError(f"features must be two [N >= 2, F] arrays of one shape, got {gen.shape} and "
                           f"{true.shape}", key="features")
    correlation = gen @ true.T  # [i, j] = r(gen_i, true_j)
    own = np.diag(correlation)
    wins = correlation < own[:, None]  # the diagonal is never < itself
    return wins.sum(axis=1) / (len(gen) - 1)


def prepare_images(images, size, grey=True):
    """Images as float in [0, 1] at ``size`` x ``size``, as the pixel metrics compare them.

    Parameters
    ----------
    images : array [N, H, W, C] or [N, H, W]
        uint8 (0..255), or float already in [0, 1]; C is 1 or 3.
    size : int
        Output side; sizes change by antialiased bilinear resampling (non-square
        images are stretched).
    grey : bool
        Convert RGB to grey with ``skimage.color.rgb2gray``'s weights
        (:data:`GREY_WEIGHTS`), as MindEye does before SSIM.

    Returns
    -------
    array [N, size, size] (grey) or [N, size, size, 3] float64
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise MindvisError(f"images must be [N, H, W, C] with C = 1 or 3, got shape {images.shape}", key="images")
    values = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    if grey and values.shape[-1] == 3:
        values = values @ np.asarray(GREY_WEIGHTS)[:, None]
    if values.shape[1:3] != (size, size):
        tensor = torch.from_numpy(np.ascontiguousarray(values)).permute(0, 3, 1, 2)
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        values = tensor.permute(0, 2, 3, 1).numpy()
    if grey:
        return values[..., 0]
    # RGB comparison: a grey image is paired with an RGB one by repeating its channel.
    return np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values


def _paired(gen_images, true_images, size, grey):
    gen = prepare_images(gen_images, size, grey)
    true = prepare_images(true_images, size, grey)
    if gen.shape != true.shape:
        raise MindvisError(f"generated and true images must pair up, got {len(gen)} and {len(true)} images "
                           f"(or a grey/RGB mismatch)", key="images")
    return gen, true


def pixcorr(gen_images, true_images, size, grey=True):
    """Pixel correlation (PixCorr) of each reconstruction with its true image.

    Definition (Brain-Diffuser, Ozcelik & VanRullen 2023; MindEye, Scotti et
    al. 2023, Sec. 3.1): Pearson r between the flattened pixel values of a
    reconstruction and its true image, both resized to one side (425 px for
    NSD there; ``size`` here). Both are converted to grey by default (as the
    issue's contract asks; those papers correlate RGB values, ``grey=False``).

    Parameters
    ----------
    gen_images, true_images : array [N, H, W, C] uint8
        Any sizes and 1 or 3 channels; row i paired.
    size : int
    grey : bool

    Returns
    -------
    array [N] float
    """
    gen, true = _paired(gen_images, true_images, size, grey)
    return _row_pearson(gen.reshape(len(gen), -1), true.reshape(len(true), -1))


def _ssim_grey(first, second, data_range=1.0):
    """Mean Gaussian-weighted SSIM of image pairs ``[N, S, S]`` by scikit-image, MindEye's settings."""
    from skimage.metrics import structural_similarity

    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    win_size = 2 * radius + 1
    if min(first.shape[1:]) < win_size:
        raise MindvisError(f"SSIM's Gaussian window is {win_size} px; images of side {first.shape[1]} are "
                           f"smaller", key="evaluate.image_size", fix=f"set evaluate.image_size >= {win_size}.")
    return np.array([structural_similarity(x, y, gaussian_weights=True, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE,
                                           use_sample_covariance=False, data_range=data_range)
                     for x, y in zip(first, second)], dtype=np.float64).reshape(len(first))


def ssim(gen_images, true_images, size):
    """Structural similarity (SSIM) of each reconstruction with its true image.

    Definition: SSIM (Wang et al., IEEE TIP 2004) as Brain-Diffuser (Ozcelik &
    VanRullen 2023) and MindEye (Scotti et al. 2023, Sec. 3.1) compute it: grey
    images (``rgb2gray``) in [0, 1], Gaussian-weighted windows (sigma 1.5,
    truncated at 3.5 sigma: 11 x 11), ``use_sample_covariance=False``,
    ``data_range=1``, i.e. ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1.0)``; they work at 425 x 425, here at ``size`` x ``size``
    (at least 11). scikit-image computes it.

    Parameters
    ----------
    gen_images, true_images : array [N, H, W, C] uint8
    size : int

    Returns
    -------
    array [N] float
    """
    gen, true = _paired(gen_images, true_images, size, grey=True)
    return _ssim_grey(gen, true)


# -- MinD-Vis's own pixel metrics ----------------------------------------------------

def _mindvis_pairwise(score):
    """MinD-Vis's ``pair_wise_score``: for each row i, the share of other true images j != i that score
    strictly below its own, ``score[i, i] > score[i, j]``.

    Parameters
    ----------
    score : float [N, N]
        ``score[i, j]``: reconstruction i against true image j.

    Returns
    -------
    float [N]
    """
    n_images = len(score)
    if n_images < 2:
        return np.full(n_images, np.nan)
    wins = (np.diag(score)[:, None] > score).sum(axis=1)  # the diagonal never beats itself
    return wins / (n_images - 1)


def _mindvis_pixels(images):
    """[N, H, W, 3] float64 in 0 .. 255, as MinD-Vis's ``get_similarity_metric`` takes them (grey repeated)."""
    values = np.asarray(images, dtype=np.float64)
    return np.repeat(values, 3, axis=-1) if values.shape[-1] == 1 else values


def pixcorr_mindvis(gen_images, true_images):
    """MinD-Vis's PCC: two-way identification by Pearson r of RGB pixels.

    Definition (MinD-Vis, ``code/eval_metrics.py`` ``pcc_metric`` with ``pair_wise_score``, called by
    ``code/gen_eval.py`` ``get_eval_metric``): ``np.corrcoef`` of the flattened RGB pixel values (0 .. 255,
    the generated size, no resizing) of reconstruction i with every true image; the share of other true
    images whose r is below the true one's. Not MindEye's PixCorr (:func:`pixcorr`, a raw correlation).

    Parameters
    ----------
    gen_images, true_images : array [N, H, W, C] uint8
        Row i paired; the same size (MinD-Vis compares at the generated size).

    Returns
    -------
    array [N] float in [0, 1]
    """
    gen, true = _mindvis_pair(gen_images, true_images)
    gen = gen.reshape(len(gen), -1)
    true = true.reshape(len(true), -1)
    gen = (gen - gen.mean(axis=1, keepdims=True)) / np.linalg.norm(gen - gen.mean(axis=1, keepdims=True), axis=1,
                                                                    keepdims=True)
    true = (true - true.mean(axis=1, keepdims=True)) / np.linalg.norm(true - true.mean(axis=1, keepdims=True),
                                                                       axis=1, keepdims=True)
    return _mindvis_pairwise(gen @ true.T)


def _mindvis_pair(gen_images, true_images):
    """Both image sets as MinD-Vis's metrics read them (:func:`_mindvis_pixels`), refused unless of one size."""
    gen, true = _mindvis_pixels(gen_images), _mindvis_pixels(true_images)
    if gen.shape != true.shape:
        raise MindvisError(f"MinD-Vis's metrics compare images of one size, got {gen.shape} and {true.shape}",
                           key="images")
    return gen, true


def ssim_mindvis(gen_images, true_images):
    """MinD-Vis's SSIM: two-way identification by scikit-image's default RGB SSIM.

    Definition (MinD-Vis, ``code/eval_metrics.py`` ``ssim_metric`` with ``pair_wise_score``):
    ``skimage.metrics.structural_similarity(pred, gt, data_range=255, channel_axis=-1)`` (7 x 7 uniform
    window, sample covariance, mean over the three channels) of reconstruction i with every true image; the
    share of other true images scoring below the true one. Not MindEye's SSIM (:func:`ssim`).

    Parameters
    ----------
    gen_images, true_images : array [N, H, W, C] uint8
        Row i paired; the same size.

    Returns
    -------
    array [N] float in [0, 1]
    """
    from skimage.metrics import structural_similarity

    gen, true = _mindvis_pair(gen_images, true_images)
    score = np.array([[structural_similarity(pred, truth, data_range=255, channel_axis=-1) for truth in true]
                      for pred in gen])
    return _mindvis_pairwise(score)


# -- retrieval in embedding space ------------------------------------------------

def _unit_rows(values, centre):
    """Rows flattened to float64 [N, D], centred on their mean (``centre``) and scaled to unit norm (a zero row
    stays zero)."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    if centre:
        values = values - values.mean(axis=0, keepdims=True)
    return values / np.maximum(np.linalg.norm(values, axis=1, keepdims=True), 1e-12)


def _top1_split_ties(similarity, tolerance=1e-12):
    """Per row of ``similarity`` [N, N]: 1 when its diagonal entry alone is the row's largest, 1/m when it ties
    with m - 1 others for the largest (random tie-breaking, in expectation), else 0."""
    best = similarity.max(axis=1, keepdims=True)
    at_best = similarity >= best - tolerance
    return np.diag(at_best) / at_best.sum(axis=1)


def embedding_retrieval(decoded, truth, centre=True):
    """Top-1 retrieval between decoded embeddings and the true images' embeddings, both ways, per stimulus.

    Definition (MindEye, Scotti et al., NeurIPS 2023, Sec. 3.1 and Table 1,
    "Retrieval"): with the cosine similarity of every decoded embedding
    (trial i) with every true image's embedding (image j), **brain -> image**
    (MindEye's "image retrieval") scores trial i 1 when its own image is the
    most similar of all images; **image -> brain** ("brain retrieval") scores
    image j 1 when its own trial is the most similar of all trials. Chance is
    1/N. MindEye compares CLIP embeddings among 300 test samples drawn at
    random; here all N test stimuli are the candidates (``test_avg``: one trial
    per stimulus, row i of both arrays is stimulus i), and the embeddings are
    the image prior's, flattened. A tie for the largest similarity counts 1/m
    for the m tied (random tie-breaking, in expectation).

    Centring: each set is centred on its own mean before the cosine (``centre``
    True, the default), as :func:`mindvis.models.linear.identification`, the
    project's validation criterion, does. MindEye needs no centring: its CLIP
    embeddings are trained contrastively to spread apart. Here they are not:
    every token of the prior's embedding is LayerNorm-standardised, so all
    images share a large common component, and a regression decoder's output
    shrinks towards the mean of its training targets. Uncentred, that shared
    direction dominates the cosine: a decoded embedding near the mean becomes
    the nearest trial of many images (a hub) and the ranking rewards closeness
    to the average image, not to the stimulus's own. Centred, a decoder that
    outputs one embedding for every trial scores chance exactly (all
    similarities tie), and an offset or scale common to the decoded set
    changes nothing. Centring reads only the two sets of candidates (no labels,
    no pairs). ``centre=False`` gives MindEye's raw cosine.

    Parameters
    ----------
    decoded : array [N, ...]
        The decoded embedding of each test trial.
    truth : array [N, ...]
        The embedding of each trial's own image (row i pairs with row i); the same size per row.
    centre : bool

    Returns
    -------
    brain_to_image : array [N] float
        Per trial (= stimulus): 1 if its own image is retrieved first (1/m in an m-way tie), else 0.
    image_to_brain : array [N] float
        Per image (= stimulus): 1 if its own trial is retrieved first, else 0.
    """
    decoded, truth = np.asarray(decoded), np.asarray(truth)
    if (len(decoded) != len(truth) or len(decoded) < 2
            or decoded.reshape(len(decoded), -1).shape[1] != truth.reshape(len(truth), -1).shape[1]):
        raise MindvisError(f"retrieval needs two [N >= 2, ...] embedding arrays of one size per row, got "
                           f"{decoded.shape} and {truth.shape}", key="embedding")
    similarity = _unit_rows(decoded, centre) @ _unit_rows(truth, centre).T  # [i, j] = cos(decoded_i, truth_j)
    return _top1_split_ties(similarity), _top1_split_ties(similarity.T)


# -- FID --------------------------------------------------------------------------

def _trace_sqrt_product_samples(centred_a, centred_b):
    """tr sqrt(S_a S_b) from centred samples: the nuclear norm of A B^T / sqrt((n_a - 1)(n_b - 1)).

    The non-zero eigenvalues of S_a S_b = A^T A B^T B / c are those of
    (A B^T)(A B^T)^T / c, the squared singular values of A B^T over c.
    """
    scale = np.sqrt((len(centred_a) - 1) * (len(centred_b) - 1))
    return np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / scale


def _trace_sqrt_product_cov(centred_a, centred_b):
    """tr sqrt(S_a S_b) from the covariances: sum of sqrt(eig(S_a^1/2 S_b S_a^1/2)) (symmetric, PSD)."""
    cov_a = centred_a.T @ centred_a / (len(centred_a) - 1)
    cov_b = centred_b.T @ centred_b / (len(centred_b) - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    root_a = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    middle = root_a @ cov_b @ root_a
    return np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()


def fid(gen_features, true_features):
    """Fréchet distance between Gaussians fit to two feature sets (FID on classifier features).

    Definition (Heusel et al., NeurIPS 2017, Eq. 6):
    ||mu_g - mu_t||^2 + tr(S_g) + tr(S_t) - 2 tr((S_g S_t)^1/2), with sample
    means and unbiased covariances (``np.cov``), as pytorch-fid. Instead of
    ``scipy.linalg.sqrtm`` and pytorch-fid's eps offset for near-singular
    covariances, the trace of the matrix square root is computed exactly from
    symmetric eigen- or singular-value problems (real, no offset), which
    matters here: with fewer stimuli than feature dimensions the covariances
    are singular. Equal to the sqrtm formula where that is well defined (tested).

    Parameters
    ----------
    gen_features, true_features : array [N_g, F], [N_t, F]
        At least 2 rows each.

    Returns
    -------
    float
    """
    gen = np.asarray(gen_features, dtype=np.float64)
    true = np.asarray(true_features, dtype=np.float64)
    if gen.ndim != 2 or true.ndim != 2 or gen.shape[1] != true.shape[1] or min(len(gen), len(true)) < 2:
        raise MindvisError(f"FID needs two [N >= 2, F] feature arrays of one width, got {gen.shape} and "
                           f"{true.shape}", key="features")
    mean_gen, mean_true = gen.mean(axis=0), true.mean(axis=0)
    centred_gen, centred_true = gen - mean_gen, true - mean_true
    trace_gen = np.sum(centred_gen ** 2) / (len(gen) - 1)
    trace_true = np.sum(centred_true ** 2) / (len(true) - 1)
    if min(len(gen), len(true)) <= gen.shape[1]:
        trace_root = _trace_sqrt_product_samples(centred_gen, centred_true)
    else:
        trace_root = _trace_sqrt_product_cov(centred_gen, centred_true)
    difference = mean_gen - mean_true
    return float(difference @ difference + trace_gen + trace_true - 2 * trace_root)


# -- confidence intervals ---------------------------------------------------------

def wilson_interval(successes, n, level=0.95):
    """Wilson score interval of a binomial proportion (Wilson, JASA 1927).

    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps its
    coverage near 0 and 1 and for small ``n`` (Brown, Cai & DasGupta, Stat.
    Sci. 2001), which is where a held-out accuracy on a few images sits.

    Parameters
    ----------
    successes : int
        Correct predictions.
    n : int
        Trials (>= 1).
    level : float
        Coverage, in (0, 1).

    Returns
    -------
    (float, float)
        Lower and upper bounds.
    """
    from scipy.stats import norm

    if n < 1 or not 0 <= successes <= n or not 0 < level < 1:
        raise MindvisError(f"need 0 <= successes <= n, n >= 1 and 0 < level < 1, got {successes}, {n}, {level}",
                           key="n_val")
    z = float(norm.ppf(1 - (1 - level) / 2))
    proportion = successes / n
    centre = (proportion + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n))
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def bootstrap_ci(fn, arrays, n_boot=1000, level=0.95, seed=0):
    """Percentile bootstrap confidence interval over test stimuli.

    Resamples the rows (axis 0, the stimuli) of every array with replacement,
    with the same row indices for all arrays so that pairs stay paired
    (Efron & Tibshirani, An Introduction to the Bootstrap, 1993, Ch. 13:
    percentile interval).

    Parameters
    ----------
    fn : callable
        ``fn(*resampled_arrays) -> float``, e.g. ``np.mean`` of per-stimulus
        values, or :func:`fid` of (generated, true) features.
    arrays : array or tuple of arrays
        Each with the stimuli on axis 0 (one length for all).
    n_boot : int
        Bootstrap resamples.
    level : float
        Coverage of the interval, in (0, 1).
    seed : int

    Returns
    -------
    (float, float)
        Lower and upper bounds (nan when every resample's statistic is nan).
    """
    if isinstance(arrays, np.ndarray):
        arrays = (arrays,)
    arrays = tuple(np.asarray(array) for array in arrays)
    lengths = {len(array) for array in arrays}
    if len(lengths) != 1 or 0 in lengths:
        raise MindvisError(f"bootstrap arrays need one non-zero length on axis 0, got {sorted(lengths)}",
                           key="arrays")
    if not 0 < level < 1 or n_boot < 1:
        raise MindvisError(f"need 0 < level < 1 and n_boot >= 1, got level={level}, n_boot={n_boot}",
                           key="evaluate.ci_level")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, lengths.pop(), size=(int(n_boot), len(arrays[0])))
    statistics = np.array([float(fn(*(array[index] for array in arrays))) for index in rows])
    if not np.isfinite(statistics).any():
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(statistics, [tail, 100 - tail])
    return float(low), float(high)


def summarize(values_per_stimulus, n_boot=1000, level=0.95, seed=0):
    """Mean of per-stimulus values with its bootstrap CI, as ``metrics.json`` stores a figure.

    Parameters
    ----------
    values_per_stimulus : array [N]
    n_boot, level, seed
        As :func:`bootstrap_ci`.

    Returns
    -------
    dict
        ``{"value": mean, "ci": [low, high]}``.
    """
    values = np.asarray(values_per_stimulus, dtype=np.float64)
    low, high = bootstrap_ci(np.mean, values, n_boot=n_boot, level=level, seed=seed)
    return {"value": float(values.mean()), "ci": [low, high]}
