"""Tests for flow.py: the CondOT path, the t samplers, prompt dropout, and the flow matching loss
(its minimiser is the marginal field; a small MLP trained with it learns a 2-D mixture)."""

import math

import pytest
import torch
import torch.nn as nn

from embeddings import BOS_ID, PAD_ID, null_prompt, tokenize
from flow import condot_path, drop_prompts, flow_matching_loss, sample_t
from sample import euler_sample


# ---------------------------------------------------------------------------------------------
# the path

def test_condot_path_endpoints_are_noise_at_0_and_data_at_1():
    z, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    x0, target0 = condot_path(z, eps, torch.zeros(3))
    x1, target1 = condot_path(z, eps, torch.ones(3))
    assert torch.equal(x0, eps) and torch.equal(x1, z)
    assert torch.equal(target0, z - eps) and torch.equal(target1, z - eps)


def test_condot_target_is_time_derivative_of_path_float64():
    z = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    eps = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64, requires_grad=True)
    x_t, target = condot_path(z, eps, t)
    # x_t[b] depends only on t[b]: the Jacobian-vector product with ones is d/dt x_t per sample.
    _, dx_dt = torch.autograd.functional.jvp(lambda s: condot_path(z, eps, s)[0], t,
                                             torch.ones_like(t))
    torch.testing.assert_close(dx_dt, target, rtol=0, atol=1e-12)
    assert x_t.shape == z.shape


def test_condot_path_with_eps_none_draws_standard_gaussian_noise():
    torch.manual_seed(0)
    z = torch.full((20000, 5), 3.0)
    x0, target = condot_path(z, None, torch.zeros(20000))
    assert abs(x0.mean().item()) < 0.02 and abs(x0.std().item() - 1) < 0.02
    torch.testing.assert_close(target, z - x0)


# ---------------------------------------------------------------------------------------------
# t samplers and prompt dropout

def test_sample_t_uniform_has_unit_interval_range_and_mean_half():
    torch.manual_seed(1)
    t = sample_t(100_000, "uniform")
    assert t.shape == (100_000,) and t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.002


def test_sample_t_logit_normal_has_standard_normal_logit():
    torch.manual_seed(2)
    t = sample_t(100_000, "logit_normal").double()
    assert t.shape == (100_000,) and t.min() > 0 and t.max() < 1
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1) < 0.02
    assert abs(t.mean().item() - 0.5) < 0.01


def test_sample_t_unknown_kind_raises():
    with pytest.raises(ValueError, match="cosine"):
        sample_t(4, "cosine")


def test_drop_prompts_drops_each_sample_independently_to_the_null_prompt():
    torch.manual_seed(3)
    tokens = tokenize(["a red circle"] * 4000, max_len=16)
    null = null_prompt(16)                                   # (1, 16, W)
    out = drop_prompts(tokens, null, 0.5)
    dropped = (out == null).all(dim=(1, 2))
    kept = (out == tokens).all(dim=(1, 2))
    assert (dropped ^ kept).all()                            # each row is one or the other
    assert abs(dropped.float().mean().item() - 0.5) < 0.04   # ~half, not all-or-nothing
    assert null[0, :, 0].tolist() == [BOS_ID] + [PAD_ID] * 15 and (null[0, :, 1:] == PAD_ID).all()
    assert torch.equal(drop_prompts(tokens, null, 0.0), tokens)
    assert (drop_prompts(tokens, null, 1.0) == null).all()


def test_drop_prompts_takes_any_condition_tensor_and_null_of_batch_size():
    torch.manual_seed(3)
    cond = torch.randn(3000, 5, 2)                           # e.g. a float embedding per sample
    null = torch.zeros(3000, 5, 2)
    out = drop_prompts(cond, null, 0.3)
    dropped = (out == 0).all(dim=(1, 2))
    assert ((out == cond).all(dim=(1, 2)) ^ dropped).all()
    assert abs(dropped.float().mean().item() - 0.3) < 0.04


# ---------------------------------------------------------------------------------------------
# the loss

def _marginal_field(m, s):
    """u_t(x) = E[z - eps | x_t = x] for z ~ N(m, s^2), eps ~ N(0, 1), x_t = t z + (1 - t) eps:
    (x_t, z - eps) are jointly Gaussian, so u = m + Cov(z - eps, x_t) / Var(x_t) * (x - t m)."""
    def u(x, t, tokens):
        t = t.to(x.dtype).view(-1, 1)
        var_t = t ** 2 * s ** 2 + (1 - t) ** 2
        return m + (t * s ** 2 - (1 - t)) / var_t * (x - t * m)
    return u


def test_flow_matching_loss_is_minimised_by_the_closed_form_marginal_field():
    m, s, n = 1.5, 0.5, 200_000
    tokens = tokenize([""], max_len=4).expand(n, -1, -1)
    u = _marginal_field(m, s)
    losses = {}
    fields = {"exact": u,
              "shifted": lambda x, t, y: u(x, t, y) + 0.1,
              "scaled": lambda x, t, y: 1.1 * u(x, t, y)}
    for name, field in fields.items():
        torch.manual_seed(4)                                  # common random numbers: same t, eps
        z = m + s * torch.randn(n, 1, dtype=torch.float64)
        losses[name] = flow_matching_loss(field, z, tokens, tokens[:1], p_uncond=0.0).item()
    assert losses["exact"] < losses["shifted"] - 0.005         # expected gap 0.1^2 = 0.01
    assert losses["exact"] < losses["scaled"] - 0.005


def test_flow_matching_loss_is_mse_against_z_minus_eps():
    torch.manual_seed(5)
    z = torch.randn(8, 2, 4, 4)
    tokens = tokenize(["x"] * 8, max_len=4)
    seen = {}

    def zero_model(x_t, t, y):
        seen["x_t"], seen["t"], seen["y"] = x_t, t, y
        return torch.zeros_like(x_t)

    torch.manual_seed(6)
    loss = flow_matching_loss(zero_model, z, tokens, null_prompt(4), p_uncond=0.0)
    torch.manual_seed(6)
    t = torch.rand(8)
    eps = torch.randn_like(z)
    torch.testing.assert_close(seen["t"], t)
    torch.testing.assert_close(seen["x_t"], condot_path(z, eps, t)[0])
    assert torch.equal(seen["y"], tokens)
    torch.testing.assert_close(loss, (z - eps).pow(2).mean())


def _eight_gaussians(n, radius=4.0, std=0.3, generator=None):
    angle = 2 * math.pi * torch.randint(0, 8, (n,), generator=generator) / 8
    centres = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


class _MLP(nn.Module):
    """u_theta(x, t) for 2-D x: an MLP on [x, features of t]; ignores the prompt."""

    def __init__(self, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 8, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, x, t, tokens=None):
        k = torch.arange(1, 5, dtype=x.dtype)
        tf = torch.cat([torch.cos(math.pi * k * t[:, None]), torch.sin(math.pi * k * t[:, None])], 1)
        return self.net(torch.cat([x, tf], dim=1))


def test_mlp_trained_with_flow_matching_loss_samples_eight_gaussians_moments(one_thread):
    torch.manual_seed(7)
    model = _MLP()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = 256
    tokens = tokenize([""], max_len=2).expand(batch, -1, -1)
    losses = []
    for step in range(600):
        z = _eight_gaussians(batch)
        loss = flow_matching_loss(model, z, tokens, tokens[:1], p_uncond=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-50:]) < 0.8 * sum(losses[:50])   # the loss has a floor ~3.9 > 0

    with torch.no_grad():
        x = euler_sample(lambda x, t: model(x, t), torch.randn(8000, 2), steps=100)
    target = _eight_gaussians(100_000)
    mean_err = (x.mean(0) - target.mean(0)).norm()
    cov, cov_ref = torch.cov(x.T), torch.cov(target.T)
    assert mean_err < 0.3
    assert (cov - cov_ref).norm() / cov_ref.norm() < 0.2
