"""Tests for kl.py: KL(q || p) of diagonal Gaussians against torch.distributions, Monte Carlo,
its zero set, and finiteness over logvar in [-30, 20]."""

import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from kl import kl_divergence, kl_to_standard_normal


def _reference(mu_q, logvar_q, mu_p, logvar_p):
    """torch.distributions' KL of Normals, summed over every non-batch dimension."""
    mu_p = torch.as_tensor(mu_p, dtype=torch.float64)
    logvar_p = torch.as_tensor(logvar_p, dtype=torch.float64)
    q = Normal(mu_q, (0.5 * logvar_q).exp())
    p = Normal(mu_p, (0.5 * logvar_p).exp())
    per_dim = torch_kl(q, p).expand(mu_q.shape)
    return per_dim.reshape(mu_q.shape[0], -1).sum(1)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4, 4), (1, 7), (4, 2, 3)])
def test_kl_divergence_matches_torch_distributions_float64(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mu_q, logvar_q, mu_p, logvar_p = (torch.randn(shape, generator=g, dtype=torch.float64) * 2
                                      for _ in range(4))
    ours = kl_divergence(mu_q, logvar_q, mu_p, logvar_p)
    assert ours.shape == (shape[0],)
    torch.testing.assert_close(ours, _reference(mu_q, logvar_q, mu_p, logvar_p),
                               rtol=1e-12, atol=1e-12)


def test_kl_divergence_broadcasts_p_params_over_batch_float64():
    g = torch.Generator().manual_seed(1)
    mu_q, logvar_q = (torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    mu_p, logvar_p = (torch.randn(2, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    ours = kl_divergence(mu_q, logvar_q, mu_p, logvar_p)          # (C, H, W) p vs (B, C, H, W) q
    torch.testing.assert_close(ours, _reference(mu_q, logvar_q, mu_p, logvar_p),
                               rtol=1e-12, atol=1e-12)
    for b in range(3):                                              # each sample against the same p
        torch.testing.assert_close(ours[b:b + 1], kl_divergence(mu_q[b:b + 1], logvar_q[b:b + 1],
                                                                mu_p[None], logvar_p[None]))


def test_kl_divergence_accepts_scalar_p_params_float64():
    g = torch.Generator().manual_seed(2)
    mu_q, logvar_q = (torch.randn(4, 3, 2, generator=g, dtype=torch.float64) for _ in range(2))
    for mu_p, logvar_p in [(0.0, 0.0), (0.5, -1.0), (-2.0, 3.0)]:
        ours = kl_divergence(mu_q, logvar_q, mu_p, logvar_p)
        torch.testing.assert_close(ours, _reference(mu_q, logvar_q, mu_p, logvar_p),
                                   rtol=1e-12, atol=1e-12)


def test_kl_is_nonnegative_and_zero_exactly_when_q_equals_p():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        mu_q, logvar_q, mu_p, logvar_p = (torch.randn(8, 6, generator=g, dtype=torch.float64) * 3
                                          for _ in range(4))
        assert (kl_divergence(mu_q, logvar_q, mu_p, logvar_p) >= 0).all()
    same = kl_divergence(mu_q, logvar_q, mu_q.clone(), logvar_q.clone())
    assert torch.equal(same, torch.zeros(8, dtype=torch.float64))
    for d_mu, d_logvar in [(1e-3, 0.0), (0.0, 1e-3)]:
        close = kl_divergence(mu_q, logvar_q, mu_q + d_mu, logvar_q + d_logvar)
        assert (close > 0).all() and (close < 1e-3).all()


def test_kl_to_standard_normal_equals_kl_divergence_with_zero_p():
    g = torch.Generator().manual_seed(4)
    mu, logvar = (torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    expected = kl_divergence(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar))
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl_divergence(mu, logvar, 0.0, 0.0), expected, rtol=1e-12, atol=1e-12)


def test_kl_agrees_with_monte_carlo_estimate_within_4_standard_errors():
    g = torch.Generator().manual_seed(5)
    mu_q = torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64)
    logvar_q = torch.tensor([[0.2, -0.5, 1.0]], dtype=torch.float64)
    mu_p = torch.tensor([[0.0, 0.5, 1.0]], dtype=torch.float64)
    logvar_p = torch.tensor([[0.5, 0.0, -0.3]], dtype=torch.float64)
    n = 200_000
    x = mu_q + (0.5 * logvar_q).exp() * torch.randn(n, 3, generator=g, dtype=torch.float64)
    q = Normal(mu_q, (0.5 * logvar_q).exp())
    p = Normal(mu_p, (0.5 * logvar_p).exp())
    log_ratio = (q.log_prob(x) - p.log_prob(x)).sum(1)           # (n,) samples of log q - log p
    estimate, stderr = log_ratio.mean(), log_ratio.std() / n ** 0.5
    exact = kl_divergence(mu_q, logvar_q, mu_p, logvar_p)[0]
    assert abs(estimate - exact) < 4 * stderr
    assert stderr < 0.05 * exact                                   # the check has power


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_values_and_gradients_finite_for_logvar_in_minus30_to_20(dtype):
    grid = torch.tensor([-30.0, -20.0, -5.0, 0.0, 5.0, 15.0, 20.0], dtype=dtype)
    logvar_q_vals, logvar_p_vals = torch.meshgrid(grid, grid, indexing="ij")
    mu_q = torch.randn(grid.numel() ** 2, 1, dtype=dtype, requires_grad=True)
    mu_p = torch.randn(grid.numel() ** 2, 1, dtype=dtype, requires_grad=True)
    logvar_q = logvar_q_vals.reshape(-1, 1).clone().requires_grad_(True)
    logvar_p = logvar_p_vals.reshape(-1, 1).clone().requires_grad_(True)
    kl = kl_divergence(mu_q, logvar_q, mu_p, logvar_p)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    kl.sum().backward()
    for t in (mu_q, logvar_q, mu_p, logvar_p):
        assert torch.isfinite(t.grad).all()

    mu = torch.randn(grid.numel(), 1, dtype=dtype, requires_grad=True)
    logvar = grid.reshape(-1, 1).clone().requires_grad_(True)
    kl0 = kl_to_standard_normal(mu, logvar)
    assert torch.isfinite(kl0).all() and (kl0 >= 0).all()
    kl0.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
