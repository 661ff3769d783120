"""Flow matching with the CondOT ("straight line") path (Lecture 04 recap, bonus slides).

Flow time convention (slide "Time conventions"): noise at t = 0, data at t = 1.
The CondOT probability path used by Stable Diffusion 3 ("Flow Matching model with straight line
schedulers"; CondOT: the conditional optimal-transport path) interpolates a data point z and a
noise sample eps ~ p_init (by default N(0, I)):

    x_t = t * z + (1 - t) * eps,        u_t(x_t | z) = d/dt x_t = z - eps,

the slide "Noising Procedure"'s p_t(x | z) = N(alpha_t z, beta_t^2 I) with alpha_t = t and
beta_t = 1 - t. (Its interpolant line, I_t = alpha_t eps + beta_t z, swaps alpha and beta: with
those it would put the data at t = 0.)

The conditional flow matching loss regresses the network onto that target,

    L(theta) = E_{t, z, eps} || u_theta(x_t, t, y) - (z - eps) ||^2,

computed as the mean over the d numbers of the latent (L / d, d as in the slide's I_d: the
same minimiser, a loss that does not grow with the latent's size). Its minimiser is the marginal
vector field u_t(x | y). To make classifier-free guidance possible, each sample's prompt y is
replaced by the empty prompt (the null condition) with probability p_uncond, so the same network
also learns u_t(x | empty).

`eps` may be any sample of p_init, not only a Gaussian (slide "Bridging arbitrary
distributions"); it defaults to N(0, I).

The condition y and the null condition are whatever tensors the model takes (here the prompt's
tokens and the empty prompt's, from embeddings.py), so this file imports nothing but torch and
can be copied into another project alone.

Offers: condot_path, sample_t, drop_prompts, flow_matching_loss
"""
import torch


def condot_path(z, eps, t):
    """x_t = t z + (1 - t) eps and the target z - eps. z, eps: (B, ...); t: (B,).
    eps=None draws eps ~ N(0, I)."""
    if eps is None:
        eps = torch.randn_like(z)
    t_ = t.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))   # (B, 1, 1, 1): broadcast over pixels
    x_t = t_ * z + (1 - t_) * eps
    return x_t, z - eps


def sample_t(batch, kind="uniform", device=None):
    """Training times t in [0, 1), shape (batch,).

    "uniform": t ~ U[0, 1]. "logit_normal": t = sigmoid(n), n ~ N(0, 1) — SD3's choice, which
    spends more samples at intermediate t where the velocity is hardest to predict.
    """
    if kind == "uniform":
        return torch.rand(batch, device=device)
    if kind == "logit_normal":
        return torch.sigmoid(torch.randn(batch, device=device))
    raise ValueError(f"unknown t distribution {kind!r}; use 'uniform' or 'logit_normal'")


def drop_prompts(cond, null_cond, p_uncond):
    """Replace each sample's condition cond (B, ...) by the null condition with probability
    p_uncond (per sample). null_cond: (1, ...) or (B, ...), broadcast over the batch."""
    if p_uncond <= 0:
        return cond
    drop = torch.rand(cond.shape[0], device=cond.device) < p_uncond       # (B,)
    drop = drop.view(-1, *([1] * (cond.dim() - 1)))                        # (B, 1, ...)
    return torch.where(drop, null_cond.to(cond.device), cond)


def flow_matching_loss(model, z, cond, null_cond, p_uncond=0.1, t_kind="uniform"):
    """Conditional flow matching loss L / d: the mean over batch and latent entries of
    (model(x_t, t, y) - (z - eps))^2.

    model(x_t (B, C, h, w), t (B,), cond (B, ...)) -> u (B, C, h, w); each sample's cond is
    replaced by null_cond with probability p_uncond. The MSE is taken in float32.
    """
    t = sample_t(z.shape[0], t_kind, device=z.device)
    x_t, target = condot_path(z, None, t)
    u = model(x_t, t, drop_prompts(cond, null_cond, p_uncond))
    return (u.float() - target.float()).pow(2).mean()
