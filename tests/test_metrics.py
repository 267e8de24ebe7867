"""Evaluation metrics against brute-force and library references (mindvis.evaluate.metrics)."""

import itertools

import numpy as np
import pytest
from scipy import linalg

from mindvis.errors import MindvisError
from mindvis.evaluate import metrics


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def _brute_force_n_way(probs, gt_class, n_way):
    """Average success over every (n-1)-subset of the other classes (MinD-Vis's trial, enumerated)."""
    n_stimuli, n_samples, n_classes = probs.shape
    out = np.zeros((n_stimuli, n_samples))
    for i, j in itertools.product(range(n_stimuli), range(n_samples)):
        others = [c for c in range(n_classes) if c != gt_class[i]]
        wins = []
        for subset in itertools.combinations(others, n_way - 1):
            picked = np.concatenate([[probs[i, j, gt_class[i]]], probs[i, j, list(subset)]])
            wins.append(np.argmax(picked) == 0)  # ground truth first, as in MinD-Vis
        out[i, j] = np.mean(wins)
    return out


def test_n_way_top1_matches_the_exact_subset_average(rng):
    probs = rng.dirichlet(np.ones(6), size=(5, 3))
    gt_class = rng.integers(0, 6, size=5)
    exact = _brute_force_n_way(probs, gt_class, 3)
    assert 0 < exact.mean() < 1 and len(np.unique(exact)) > 2  # the test exercises several outcomes
    sampled = metrics.n_way_top1(probs, gt_class, n_way=3, trials=20000, seed=1)
    assert sampled.shape == (5, 3)
    np.testing.assert_allclose(sampled, exact, atol=0.02)
    np.testing.assert_allclose(metrics.n_way_top1_expected(probs, gt_class, 3), exact, atol=1e-12)


def test_n_way_top1_ties_go_to_the_ground_truth():
    probs = np.array([[[0.4, 0.4, 0.2, 0.0]]])
    assert metrics.n_way_top1(probs, np.array([1]), n_way=3, trials=50)[0, 0] == 1.0
    assert metrics.n_way_top1(probs, np.array([2]), n_way=2, trials=3000, seed=0)[0, 0] == pytest.approx(1 / 3,
                                                                                                       abs=0.04)


@pytest.mark.parametrize("n_way", [6, 9])
def test_n_way_at_least_the_class_count_is_plain_top1(rng, n_way):
    probs = rng.dirichlet(np.ones(6), size=(20, 4))
    gt_class = rng.integers(0, 6, size=20)
    result = metrics.n_way_top1(probs, gt_class, n_way=n_way, trials=10, seed=3)
    np.testing.assert_array_equal(result, (probs.argmax(axis=2) == gt_class[:, None]).astype(float))


def test_n_way_top1_is_deterministic_per_seed(rng):
    probs = rng.dirichlet(np.ones(30), size=(8, 2))
    gt_class = rng.integers(0, 30, size=8)
    first = metrics.n_way_top1(probs, gt_class, n_way=5, trials=200, seed=4)
    np.testing.assert_array_equal(first, metrics.n_way_top1(probs, gt_class, n_way=5, trials=200, seed=4))
    assert not np.array_equal(first, metrics.n_way_top1(probs, gt_class, n_way=5, trials=200, seed=5))


def test_n_way_top1_rejects_bad_shapes():
    with pytest.raises(MindvisError, match="probs"):
        metrics.n_way_top1(np.ones((3, 4)) / 4, np.zeros(3, dtype=int), n_way=2)
    with pytest.raises(MindvisError, match="gt_class"):
        metrics.n_way_top1(np.ones((3, 1, 4)) / 4, np.array([0, 1, 4]), n_way=2)


def test_best_of_k_and_resolve_n_way():
    per_sample = np.array([[0.1, 0.9, 0.3], [0.0, 0.0, 0.2]])
    np.testing.assert_array_equal(metrics.best_of_k(per_sample), [0.9, 0.2])
    assert metrics.resolve_n_way(None, 1000) == 50
    assert metrics.resolve_n_way(None, 10) == 10
    assert metrics.resolve_n_way(20, 1000) == 20


def test_two_way_identification_matches_a_double_loop(rng):
    true = rng.normal(size=(12, 9))
    gen = true + rng.normal(scale=1.5, size=true.shape)
    expected = np.zeros(12)
    for i in range(12):
        own = np.corrcoef(gen[i], true[i])[0, 1]
        expected[i] = np.mean([np.corrcoef(gen[i], true[j])[0, 1] < own for j in range(12) if j != i])
    np.testing.assert_allclose(metrics.two_way_identification(gen, true), expected)
    assert metrics.two_way_identification(true, true).tolist() == [1.0] * 12


def test_pixcorr_matches_corrcoef(rng):
    true = rng.integers(0, 256, size=(5, 20, 20, 1), dtype=np.uint8)
    gen = rng.integers(0, 256, size=(5, 20, 20, 1), dtype=np.uint8)
    gen[:2] = true[:2] // 2 + 30  # an affine copy correlates perfectly
    expected = [np.corrcoef(gen[i].ravel().astype(float), true[i].ravel().astype(float))[0, 1] for i in range(5)]
    result = metrics.pixcorr(gen, true, size=20)
    np.testing.assert_allclose(result, expected, atol=1e-12)
    np.testing.assert_allclose(result[:2], 1.0, atol=1e-2)


def test_pixcorr_converts_grey_and_resizes(rng):
    from skimage.color import rgb2gray

    rgb = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    grey = (rgb2gray(rgb) * 255).round().astype(np.uint8)[..., None]
    np.testing.assert_allclose(metrics.pixcorr(rgb, grey, size=16), 1.0, atol=1e-3)
    smooth = _structured_images(rng, 3, 16)
    big = np.repeat(np.repeat(smooth, 2, axis=1), 2, axis=2)  # 32 x 32, the same picture
    same = metrics.pixcorr(big, smooth, size=16)
    assert same.min() > 0.97 and np.all(same > metrics.pixcorr(big, np.roll(smooth, 1, axis=0), size=16))
    assert metrics.prepare_images(rgb, 8).shape == (3, 8, 8)
    assert metrics.prepare_images(grey, 8, grey=False).shape == (3, 8, 8, 3)


def _structured_images(rng, count, size):
    """Smooth gradients with a bright square and a dark disc at random places."""
    y, x = np.mgrid[:size, :size] / size
    images = []
    for _ in range(count):
        image = 80 + 100 * (rng.uniform() * x + rng.uniform() * y)
        top, left = rng.integers(0, size // 2, size=2)
        image[top:top + size // 3, left:left + size // 3] = 240
        cy, cx = rng.uniform(0.3, 0.7, size=2)
        image[(y - cy) ** 2 + (x - cx) ** 2 < 0.02] = 10
        images.append(image)
    return np.clip(np.stack(images), 0, 255).astype(np.uint8)[..., None]


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_matches_scikit_image(rng, kind):
    from scipy.ndimage import gaussian_filter
    from skimage.metrics import structural_similarity

    if kind == "random":
        true = rng.integers(0, 256, size=(4, 24, 24, 1), dtype=np.uint8)
    else:
        true = _structured_images(rng, 4, 24)
    noisy = true.astype(float) + rng.normal(scale=25, size=true.shape)
    gen = np.clip(gaussian_filter(noisy, sigma=(0, 1, 1, 0)), 0, 255).astype(np.uint8)
    expected = [structural_similarity(gen[i, ..., 0] / 255, true[i, ..., 0] / 255, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1.0) for i in range(4)]
    result = metrics.ssim(gen, true, size=24)
    np.testing.assert_allclose(result, expected, atol=1e-10)
    assert 0 < result.min() and result.max() < 1
    np.testing.assert_allclose(metrics.ssim(true, true, size=24), 1.0)


def test_ssim_of_rgb_uses_rgb2gray_and_rejects_tiny_images(rng):
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    gen = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    true = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    expected = [structural_similarity(rgb2gray(gen[i]), rgb2gray(true[i]), gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False, data_range=1.0) for i in range(2)]
    np.testing.assert_allclose(metrics.ssim(gen, true, size=16), expected, atol=1e-10)
    with pytest.raises(MindvisError, match="evaluate.image_size"):
        metrics.ssim(gen, true, size=8)


def _fid_sqrtm(first, second):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm) as the reference."""
    mu1, mu2 = first.mean(0), second.mean(0)
    sigma1, sigma2 = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_fid_identical_sets_and_shifted_gaussians(rng):
    features = rng.normal(size=(40, 16)) @ rng.normal(size=(16, 16))
    assert abs(metrics.fid(features, features)) < 1e-8 * np.trace(np.cov(features, rowvar=False))
    shift = rng.normal(size=16)
    # Equal covariances (the same centred samples): FID is exactly the squared mean difference.
    assert metrics.fid(features + shift, features) == pytest.approx(shift @ shift, rel=1e-8)
    few = features[:10]  # fewer samples than dimensions: singular covariances
    assert metrics.fid(few + shift, few) == pytest.approx(shift @ shift, rel=1e-8)


def test_fid_matches_the_sqrtm_formula_and_both_paths_agree(rng):
    first = rng.normal(size=(300, 6)) * [1, 2, 3, 1, 1, 0.5]
    second = rng.normal(loc=0.3, size=(250, 6))
    assert metrics.fid(first, second) == pytest.approx(_fid_sqrtm(first, second), rel=1e-8)
    wide_first, wide_second = rng.normal(size=(20, 50)), rng.normal(size=(25, 50)) * 2
    centred_first, centred_second = wide_first - wide_first.mean(0), wide_second - wide_second.mean(0)
    assert metrics._trace_sqrt_product_samples(centred_first, centred_second) == pytest.approx(
        metrics._trace_sqrt_product_cov(centred_first, centred_second), rel=1e-6)
    assert metrics._trace_sqrt_product_samples(first - first.mean(0), second - second.mean(0)) == pytest.approx(
        metrics._trace_sqrt_product_cov(first - first.mean(0), second - second.mean(0)), rel=1e-8)


def test_bootstrap_ci_covers_the_mean_and_is_deterministic(rng):
    values = rng.normal(loc=0.6, scale=0.2, size=80)
    low, high = metrics.bootstrap_ci(np.mean, (values,), n_boot=500, level=0.95, seed=0)
    assert low < values.mean() < high
    standard_error = values.std(ddof=1) / np.sqrt(len(values))
    assert high - low == pytest.approx(2 * 1.96 * standard_error, rel=0.25)
    assert (low, high) == metrics.bootstrap_ci(np.mean, (values,), n_boot=500, level=0.95, seed=0)
    assert (low, high) != metrics.bootstrap_ci(np.mean, (values,), n_boot=500, level=0.95, seed=1)
    narrow = metrics.bootstrap_ci(np.mean, values, n_boot=500, level=0.5, seed=0)
    assert low < narrow[0] < narrow[1] < high
    summary = metrics.summarize(values, n_boot=200, seed=2)
    assert summary["value"] == pytest.approx(values.mean()) and summary["ci"][0] < summary["value"] < summary["ci"][1]


def test_bootstrap_ci_resamples_paired_rows_for_fid(rng):
    true = rng.normal(size=(30, 4))
    gen = true + 0.5
    low, high = metrics.bootstrap_ci(metrics.fid, (gen, true), n_boot=100, seed=0)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)  # paired rows: the shift survives resampling
    with pytest.raises(MindvisError, match="length"):
        metrics.bootstrap_ci(metrics.fid, (gen, true[:20]), n_boot=10)


# -- retrieval in embedding space ------------------------------------------------------

def test_embedding_retrieval_by_hand_differs_between_its_two_directions():
    # Unit directions at 0, 90 and 45 degrees (the true images) and at 5.7, 84.3 and 16.7 degrees (the trials).
    truth = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    decoded = np.array([[1.0, 0.1], [0.1, 1.0], [1.0, 0.3]])
    brain_to_image, image_to_brain = metrics.embedding_retrieval(decoded, truth, centre=False)
    # Trial 2 (16.7 degrees) lies nearer image 0 (0) than its own (45): brain -> image misses it; but among the
    # trials, image 2's nearest is trial 2 (28.3 degrees away; trials 0 and 1 are 39.3 away).
    np.testing.assert_array_equal(brain_to_image, [1, 1, 0])
    np.testing.assert_array_equal(image_to_brain, [1, 1, 1])
    # Both take any shape per row (flattened): [N, tokens, dim] as the prior's embeddings are.
    again = metrics.embedding_retrieval(decoded[:, None, :], truth[:, None, :], centre=False)
    np.testing.assert_array_equal(np.stack(again), np.stack([brain_to_image, image_to_brain]))


def test_embedding_retrieval_centres_each_set_and_splits_ties(rng):
    truth = rng.normal(size=(6, 2, 3))
    decoded = truth + 2.0 * rng.normal(size=truth.shape)
    brain_to_image, image_to_brain = metrics.embedding_retrieval(decoded, truth)
    assert 0 < brain_to_image.sum() < 6 and 0 < image_to_brain.sum() < 6  # hits and misses both ways
    # A double loop over centred, flattened rows.
    flat_d = decoded.reshape(6, -1) - decoded.reshape(6, -1).mean(0)
    flat_t = truth.reshape(6, -1) - truth.reshape(6, -1).mean(0)
    cosine = np.array([[d @ t / np.linalg.norm(d) / np.linalg.norm(t) for t in flat_t] for d in flat_d])
    np.testing.assert_array_equal(brain_to_image, [float(np.argmax(cosine[i]) == i) for i in range(6)])
    np.testing.assert_array_equal(image_to_brain, [float(np.argmax(cosine[:, j]) == j) for j in range(6)])
    # An offset and a scale common to the decoded set change nothing once centred.
    shifted = metrics.embedding_retrieval(3 * decoded + 5.0, truth)
    np.testing.assert_array_equal(np.stack(shifted), np.stack([brain_to_image, image_to_brain]))
    # One embedding for every trial: every similarity ties, each stimulus scores 1/N both ways (chance).
    constant = metrics.embedding_retrieval(np.ones_like(decoded), truth)
    np.testing.assert_allclose(np.stack(constant), np.full((2, 6), 1 / 6))
    # Two true images alike: trial 0 ties between them (1/2), and so does image 0 between its two trials.
    pair = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    brain_to_image, image_to_brain = metrics.embedding_retrieval(pair, pair, centre=False)
    np.testing.assert_allclose(brain_to_image, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(image_to_brain, [0.5, 0.5, 1.0])
    with pytest.raises(MindvisError, match="retrieval needs"):
        metrics.embedding_retrieval(decoded[:5], truth)
