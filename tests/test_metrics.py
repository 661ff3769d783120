"""Tests for metrics.py: each metric against a closed form or a brute-force version."""

import math

import numpy as np
import pytest
import torch

import metrics


def test_psnr_constant_offset_of_0_1_is_20_db():
    x = torch.rand(3, 3, 8, 8) * 0.8
    p = metrics.psnr(x, x + 0.1)
    assert p.shape == (3,)
    assert torch.allclose(p, torch.full((3,), 20.0, dtype=torch.float64), atol=1e-4)


def test_psnr_identical_images_is_inf():
    x = torch.rand(2, 3, 8, 8)
    assert torch.isinf(metrics.psnr(x, x)).all()


def test_psnr_respects_data_range():
    x = torch.rand(2, 3, 8, 8) * 200
    p = metrics.psnr(x, x + 2.55, data_range=255.0)  # 2.55 / 255 = 0.01 -> 40 dB
    assert torch.allclose(p, torch.full((2,), 40.0, dtype=torch.float64), atol=1e-4)


def test_ssim_identical_images_is_one():
    x = torch.rand(4, 3, 32, 32)
    s = metrics.ssim(x, x)
    assert s.shape == (4,)
    assert torch.allclose(s, torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_ssim_constant_images_is_the_luminance_term():
    # Constant images: all variances vanish, so the contrast-structure term is C2 / C2 = 1.
    a, b = 0.3, 0.5
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    C1 = (0.01 * 1.0) ** 2
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert abs(float(metrics.ssim(x, y)) - expected) < 1e-6  # x, y stored in float32


def test_ssim_of_shifted_image_matches_hand_computed_formula():
    # One 5x5 window covering the whole 5x5 image: one window position. Shifting by c keeps
    # the variance and makes cov = var, so SSIM = (2 mu (mu + c) + C1) / (mu^2 + (mu + c)^2 + C1).
    rng = np.random.default_rng(0)
    img = rng.uniform(0.1, 0.6, size=(5, 5))
    c = 0.2
    coords = np.arange(5) - 2.0
    g = np.exp(-coords**2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu = (w * img).sum()
    C1 = 0.01**2
    expected = (2 * mu * (mu + c) + C1) / (mu**2 + (mu + c) ** 2 + C1)
    x = torch.tensor(img, dtype=torch.float64)[None, None]
    got = float(metrics.ssim(x, x + c, window=5))
    assert abs(got - expected) < 1e-12
    # and a window larger than the image shrinks to it (11 -> 5): the same number
    assert abs(float(metrics.ssim(x, x + c)) - expected) < 1e-12


def test_ssim_general_case_matches_numpy_single_window():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(size=(7, 7)), rng.uniform(size=(7, 7))
    coords = np.arange(7) - 3.0
    g = np.exp(-coords**2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mu_a, mu_b = (w * a).sum(), (w * b).sum()
    var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
    cov = (w * (a - mu_a) * (b - mu_b)).sum()
    C1, C2 = 0.01**2, 0.03**2
    numerator = (2 * mu_a * mu_b + C1) * (2 * cov + C2)
    expected = numerator / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2))
    got = float(metrics.ssim(torch.tensor(a)[None, None], torch.tensor(b)[None, None], window=7))
    assert abs(got - expected) < 1e-12


def test_ssim_decreases_as_noise_increases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    values = [float(metrics.ssim(x, x + s * noise).mean()) for s in (0.01, 0.05, 0.2, 0.5)]
    assert values[0] < 1.0
    assert all(a > b for a, b in zip(values, values[1:]))


def test_ssim_is_symmetric():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    assert torch.allclose(metrics.ssim(x, y), metrics.ssim(y, x), atol=1e-12)


def test_ssim_averages_channels():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    per_channel = torch.stack([metrics.ssim(x[:, c:c + 1], y[:, c:c + 1]) for c in range(3)], 1)
    assert torch.allclose(metrics.ssim(x, y), per_channel.mean(1), atol=1e-12)


def test_gaussian_stats_uses_unbiased_covariance():
    f = torch.randn(50, 4, dtype=torch.float64)
    mu, sigma = metrics.gaussian_stats(f)
    centered = f - f.mean(0)
    assert torch.allclose(mu, f.mean(0))
    assert torch.allclose(sigma, centered.T @ centered / 49)


def test_fd_of_identical_sets_is_zero():
    f = torch.randn(500, 16, dtype=torch.float64)
    assert abs(metrics.frechet_distance(f, f)) < 1e-8


def test_fd_of_sampled_diagonal_gaussians_is_close_to_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 50_000, 4
    mu1, mu2 = torch.zeros(d), torch.tensor([1.0, 0.0, -0.5, 0.0])
    var1, var2 = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([4.0, 1.0, 0.5, 0.25])
    a = mu1 + var1.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    b = mu2 + var2.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum())  # 2.4645
    assert abs(metrics.frechet_distance(a, b) - expected) < 0.05


def _fd_reference(mu1, s1, mu2, s2):
    """FD via numpy: Tr((S1 S2)^(1/2)) from the eigenvalues of the (non-symmetric) product,
    which is diagonalisable with non-negative real eigenvalues."""
    eig = np.linalg.eigvals(s1 @ s2).real
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_fd_from_stats_matches_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))  # shared eigenvectors -> S1 S2 = S2 S1
    a, b = np.array([1.0, 2.0, 3.0, 0.5, 0.1]), np.array([4.0, 1.0, 0.2, 0.5, 2.0])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # commuting: Tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum (sqrt(a_i) - sqrt(b_i))^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = metrics.frechet_distance_from_stats(*map(torch.tensor, (mu1, s1, mu2, s2)))
    assert abs(got - expected) < 1e-8
    assert abs(got - _fd_reference(mu1, s1, mu2, s2)) < 1e-8


def test_fd_from_stats_matches_closed_form_for_non_commuting_covariances():
    rng = np.random.default_rng(1)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    got = metrics.frechet_distance_from_stats(*map(torch.tensor, (mu1, s1, mu2, s2)))
    assert abs(got - _fd_reference(mu1, s1, mu2, s2)) < 1e-8


def test_fd_from_stats_2x2_non_commuting_closed_form():
    # For 2x2 SPD M with eigenvalues l1, l2: Tr(M^(1/2)) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.0], [0.0, 1.0]])
    s2 = np.array([[1.0, 0.6], [0.6, 1.0]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    zero = torch.zeros(2)
    got = metrics.frechet_distance_from_stats(zero, torch.tensor(s1), zero, torch.tensor(s2))
    assert abs(got - expected) < 1e-8


def test_kid_is_near_zero_for_same_distribution():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 8, generator=g, dtype=torch.float64)
    b = torch.randn(600, 8, generator=g, dtype=torch.float64)
    mean, std = metrics.kid(a, b, subsets=20, subset_size=300)
    assert std > 0
    assert abs(mean) < 3 * std


def test_kid_is_clearly_positive_for_shifted_distribution():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(600, 8, generator=g, dtype=torch.float64)
    b = torch.randn(600, 8, generator=g, dtype=torch.float64) + 0.5
    mean, std = metrics.kid(a, b, subsets=20, subset_size=300)
    assert mean > 5 * std and mean > 0


def test_kid_is_deterministic_given_seed():
    a, b = torch.randn(200, 4), torch.randn(150, 4)
    first = metrics.kid(a, b, subsets=5, subset_size=100, seed=3)
    assert first == metrics.kid(a, b, subsets=5, subset_size=100, seed=3)
    assert first != metrics.kid(a, b, subsets=5, subset_size=100, seed=4)


def test_mmd2_unbiased_matches_brute_force_double_loop():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.3
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    m = len(x)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    expected = kxx + kyy - 2 * kxy
    assert abs(metrics.mmd2_unbiased(torch.tensor(x), torch.tensor(y)) - expected) < 1e-12
    # kid with one subset covering both whole sets is that same number
    mean, std = metrics.kid(torch.tensor(x), torch.tensor(y), subsets=1, subset_size=100)
    assert abs(mean - expected) < 1e-12 and std == 0


def test_precision_recall_identical_sets_is_one_one():
    f = torch.randn(300, 5)
    assert metrics.precision_recall(f, f, k=3) == (1.0, 1.0)


def test_precision_recall_far_apart_clusters_is_zero_zero():
    a = torch.randn(200, 5)
    b = torch.randn(200, 5) + 100.0
    assert metrics.precision_recall(a, b, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes_gives_full_precision_half_recall():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0], [50.0, 50.0]])
    real = (centers[:, None] + torch.randn(4, 500, 2, generator=g)).reshape(-1, 2)
    fake = (centers[:2, None] + torch.randn(2, 1000, 2, generator=g)).reshape(-1, 2)  # 2 of 4 modes
    precision, recall = metrics.precision_recall(real, fake, k=5, batch_size=256)  # batched path too
    assert precision > 0.95
    assert abs(recall - 0.5) < 0.05


def test_distribution_metrics_reports_fd_beside_real_vs_real_floor():
    g = torch.Generator().manual_seed(0)
    real, real_2 = torch.randn(300, 6, generator=g), torch.randn(200, 6, generator=g)
    fake = torch.randn(200, 6, generator=g) + 1.0
    m = metrics.distribution_metrics(real, fake, real_2, kid_subsets=10, kid_subset_size=100)
    for key in ("fd", "kid", "kid_std", "precision", "recall"):
        assert key in m and f"floor_{key}" in m
    assert m["fd"] > 5 * m["floor_fd"] and m["floor_fd"] > 0  # finite-sample bias is > 0
    assert m["kid"] > m["floor_kid"]
    with pytest.raises(ValueError):
        metrics.distribution_metrics(real, fake, real_2[:100])


def test_copy_share_is_one_for_copies_about_the_quantile_for_fresh_points_and_between():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(1000, 8, generator=g)
    fresh = torch.randn(1000, 8, generator=g)                  # the same distribution, new points
    copies = train[:200] + 1e-4 * torch.randn(200, 8, generator=g)
    assert metrics.copy_share(train, copies) == 1.0
    assert 0.02 <= metrics.copy_share(train, fresh) <= 0.09    # ~0.05 by exchangeability
    assert 0.15 <= metrics.copy_share(train, fresh, quantile=0.2) <= 0.25
    half = metrics.copy_share(train, torch.cat([copies, fresh[:200]]))
    assert 0.5 < half < 0.56
    far = torch.randn(100, 8, generator=g) + 10.0               # nowhere near the data
    assert metrics.copy_share(train, far) == 0.0


def test_copy_share_compares_with_every_training_point_and_a_subset_sets_its_threshold():
    g = torch.Generator().manual_seed(2)
    train, fresh = torch.randn(3000, 8, generator=g), torch.randn(1000, 8, generator=g)
    copies = train + 1e-4 * torch.randn(3000, 8, generator=g)  # 90% outside a 300-point subset
    assert metrics.copy_share(train, copies, radii_of=300) == 1.0
    full = metrics.copy_share(train, fresh, radii_of=3000)     # every training point's radius
    assert 0.02 <= full <= 0.09
    assert abs(metrics.copy_share(train, fresh, radii_of=300) - full) <= 0.03


def test_copy_share_matches_a_brute_force_count():
    g = torch.Generator().manual_seed(1)
    train, fake = torch.randn(40, 3, generator=g), torch.randn(30, 3, generator=g)
    nearest_other = [min(float((a - b).norm()) for j, b in enumerate(train) if j != i)
                     for i, a in enumerate(train)]
    threshold = float(np.quantile(nearest_other, 0.3))         # numpy's default: linear
    near = [min(float((f - t).norm()) for t in train) <= threshold for f in fake]
    assert 0 < np.mean(near) < 1                                # 3 of 30: a count, not a limit
    assert metrics.copy_share(train, fake, 0.3, batch_size=7) == pytest.approx(np.mean(near))
    assert metrics.copy_share(train, train[:5]) == 1.0          # a point at distance 0: near
    with pytest.raises(ValueError, match="at least 2 training points"):
        metrics.copy_share(train[:1], fake)
