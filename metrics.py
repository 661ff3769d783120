"""Metrics of reconstruction and of generated distributions, written out so each can be read
and tested. The lecture builds the generator and fixes no metric; these are the ones the
latent-diffusion papers report. Torch only: no project module is imported.

Reconstruction (per image; images float in [0, data_range], shape (B, C, H, W)):
    psnr(x, y)          10 log10(L^2 / MSE)                                           -> (B,)
    ssim(x, y)          Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), 'valid'   -> (B,)

Distribution distance (features of real vs generated images, shape (N, D)):
    gaussian_stats(f)                    (mu, Sigma), Sigma unbiased (N - 1)
    frechet_distance(fa, fb)             |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 (Sa Sb)^(1/2))  (FD; FID
                                         when the features are Inception's)
    kid(fa, fb)                          unbiased MMD^2, kernel k(x, y) = (x.y / d + 1)^3 -> (mean, std)
    precision_recall(real, fake, k)      Kynkaanniemi et al. 2019 k-NN manifolds -> (precision, recall)
    distribution_metrics(real, fake, real_2)  all of the above in one dict, plus the real-vs-real
                                         floor: FD at ~1,000 samples is biased upwards, so every
                                         FD is reported beside FD(real, real_2) at the same count.

Memorisation (features of training images vs generated ones):
    copy_share(train, fake)              share of fake points nearer a training point than 95% of
                                         training points are to their nearest other one

Offers: psnr, ssim, gaussian_stats, frechet_distance, frechet_distance_from_stats, kid,
mmd2_unbiased, precision_recall, distribution_metrics, copy_share
"""

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Reconstruction: PSNR and SSIM


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio per image, in dB: 10 log10(L^2 / mean (x - y)^2).
    x, y: (B, C, H, W) in [0, data_range]. Identical images give +inf. In float64 on the CPU
    (Apple's MPS has no float64); so is ssim."""
    x, y = x.cpu().double(), y.cpu().double()
    mse = (x - y).pow(2).flatten(1).mean(1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse = 0 -> inf


def ssim(x, y, data_range=1.0, window=11, sigma=1.5):
    """Structural similarity per image (Wang et al. 2004), in float64.

    For every window position, with Gaussian-weighted local statistics mu, sigma^2, sigma_xy:
        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
    with C1 = (0.01 L)^2, C2 = (0.03 L)^2; 'valid' convolution (no padding); the map is averaged
    over positions, per channel, then over channels. A window larger than the image shrinks to
    the largest odd size that fits. x, y: (B, C, H, W) -> (B,)."""
    B, C, H, W = x.shape
    size = min(window, H, W)
    size -= 1 - size % 2  # keep it odd
    w = _gaussian_window(size, sigma).expand(C, 1, size, size)  # (C, 1, k, k), one per channel
    x, y = x.cpu().double(), y.cpu().double()

    def filt(z):  # depthwise Gaussian average, (B, C, H, W) -> (B, C, H-k+1, W-k+1)
        return F.conv2d(z, w, groups=C)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov_xy = filt(x * y) - mu_x * mu_y
    C1, C2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    luminance = (2 * mu_x * mu_y + C1) / (mu_x**2 + mu_y**2 + C1)
    contrast_structure = (2 * cov_xy + C2) / (var_x + var_y + C2)
    ssim_map = luminance * contrast_structure  # (B, C, H', W')
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)  # per channel, then over channels -> (B,)


def _gaussian_window(size, sigma):
    """Normalised 2-D Gaussian, (size, size), float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


# ---------------------------------------------------------------------------------------------
# Distribution distance: Frechet distance, KID, precision / recall


def gaussian_stats(feats):
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = feats.double()
    mu = f.mean(0)
    sigma = torch.atleast_2d(torch.cov(f.T, correction=1))  # (D, D), divides by N - 1
    return mu, sigma


def frechet_distance(feats_a, feats_b):
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), float64.

    No scipy sqrtm: S1 S2 is similar to the symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2)
    (M = S1^(1/2) (S1 S2) S1^(-1/2)), so Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)),
    and eigh of symmetric matrices is stable. Tiny negative eigenvalues (round-off) clamp to 0."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    s1_half = _sqrtm_psd(s1)
    m = s1_half @ s2 @ s1_half
    m = (m + m.T) / 2  # symmetrise away round-off
    tr_covmean = torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


def _sqrtm_psd(s):
    """Symmetric square root of a symmetric PSD matrix via eigh, eigenvalues clamped at 0."""
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T  # V diag(sqrt(l)) V^T


def kid(feats_a, feats_b, subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 estimate with the
    cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets drawn
    without replacement (size clipped to the smaller set). Returns (mean, std over subsets);
    deterministic given seed."""
    a, b = feats_a.double(), feats_b.double()
    m = min(subset_size, len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]  # (m, D)
        y = b[torch.randperm(len(b), generator=g)[:m]]  # (m, D)
        values.append(mmd2_unbiased(x, y))
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std(correction=0))


def mmd2_unbiased(x, y):
    """Unbiased MMD^2 between samples x (m, D) and y (n, D) with the KID kernel:
    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(term_xx + term_yy - 2 * k_xy.mean())


def _poly_kernel(x, y):
    """k(x, y) = (x.y / d + 1)^3, (m, D), (n, D) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def precision_recall(real, fake, k=3, batch_size=1024):
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    The real manifold is the union of balls around each real point, with radius the distance
    to its k-th nearest other real point. Precision = fraction of fake points inside that
    manifold (are samples realistic?); recall = fraction of real points inside the fake
    manifold built the same way (is the data covered?). Distances in float64, batched."""
    real, fake = real.double(), fake.double()
    precision = _fraction_inside(real, _knn_radii(real, k, batch_size), fake, batch_size)
    recall = _fraction_inside(fake, _knn_radii(fake, k, batch_size), real, batch_size)
    return precision, recall


def _knn_radii(feats, k, batch_size, points=None):
    """Distance from each of `points` (rows of feats; default all of them) to its k-th nearest
    neighbour in feats, itself excluded. (len(points),)"""
    points, radii = feats if points is None else points, []
    for i in range(0, len(points), batch_size):
        d = torch.cdist(points[i:i + batch_size], feats)  # (b, N), includes the 0 to itself
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: skip the point itself
    return torch.cat(radii)


def _fraction_inside(centers, radii, queries, batch_size):
    """Fraction of queries within radii[j] of at least one centers[j]."""
    inside = 0
    for i in range(0, len(queries), batch_size):
        d = torch.cdist(queries[i:i + batch_size], centers)  # (b, N)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def distribution_metrics(real_feats, fake_feats, real_feats_2=None, k=3, kid_subsets=100,
                         kid_subset_size=1000, seed=0):
    """All distribution metrics of fake vs real features, as a dict of floats:
    fd, kid, kid_std, precision, recall, n_real, n_fake. Given real_feats_2, a second real set
    disjoint from real_feats and of the same size as fake_feats, the same metrics for
    real vs real_2 are added as floor_fd, floor_kid, ...: the value a perfect generator would
    get at this sample count (FD is biased upwards at small N)."""

    def metrics(a, b):
        # Subsets of at most half the set, so they differ and the std over subsets means something.
        size = max(2, min(kid_subset_size, len(a) // 2, len(b) // 2))
        kid_mean, kid_std = kid(a, b, kid_subsets, size, seed)
        precision, recall = precision_recall(a, b, k)
        return {"fd": frechet_distance(a, b), "kid": kid_mean, "kid_std": kid_std,
                "precision": precision, "recall": recall}

    out = metrics(real_feats, fake_feats)
    out["n_real"], out["n_fake"] = len(real_feats), len(fake_feats)
    if real_feats_2 is not None:
        if len(real_feats_2) != len(fake_feats):
            raise ValueError(f"the real-vs-real floor needs as many second real samples as fake "
                             f"ones: got {len(real_feats_2)} vs {len(fake_feats)}")
        out.update({f"floor_{key}": v for key, v in metrics(real_feats, real_feats_2).items()})
    return out


# ---------------------------------------------------------------------------------------------
# Memorisation: are the samples copies of training points?


def copy_share(train_feats, fake_feats, quantile=0.05, batch_size=1024, radii_of=2000):
    """Share of fake points (N, D) whose nearest training point (of train_feats (M, D), M >= 2)
    is nearer than the `quantile` of the training points' distances to their nearest other
    training point (the threshold counts as near).

    By exchangeability a fresh point of the training distribution is as far from the M training
    points as one training point is from the M - 1 others, so samples that generalise score about
    `quantile` (0.05), and copies of training points 1. Every sample is compared with all M
    training points; the threshold comes from up to `radii_of` of them (a fixed-seed subset),
    which keeps a large training set cheap. Float64, batched."""
    train, fake = train_feats.double(), fake_feats.double()
    if len(train) < 2:
        raise ValueError(f"copy_share needs at least 2 training points, got {len(train)}")
    subset = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:radii_of]
    threshold = torch.quantile(_knn_radii(train, 1, batch_size, train[subset]), quantile)
    nearest = torch.cat([torch.cdist(fake[i:i + batch_size], train).min(dim=1).values
                         for i in range(0, len(fake), batch_size)])     # (N,)
    return float((nearest <= threshold).double().mean())
