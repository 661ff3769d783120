"""The KL divergence between diagonal Gaussians (Lecture 04, Section 6).

Slides "KL-divergence" and "KL-divergence of two normal distributions": for
q = N(mu_q, sigma_q^2 I) and p = N(mu_p, sigma_p^2 I),

    D_KL(q || p) = 1/2 * ( K(sigma_q^2 / sigma_p^2) + ||mu_q - mu_p||^2 / sigma_p^2 ),
    K(alpha)     = sum_i  alpha_i - log(alpha_i) - 1.

The slide writes one variance per distribution; here every dimension has its own
variance (a diagonal covariance), so the mean term becomes sum_i (mu_q,i - mu_p,i)^2 / sigma_p,i^2.
K(alpha) >= 0 with equality only at alpha = 1 ("Minimum at 1"), which is why the KL is >= 0
and vanishes only for q = p.

Algorithm 7, line 7, is the special case p = N(0, I) used by the beta-VAE:

    L_KL = 1/2 * sum_j ( mu_j^2 + sigma_j^2 - log sigma_j^2 - 1 ).

Everything is computed from log-variances (`logvar` = log sigma^2), never from sigma, so that
values of logvar anywhere in [-30, 20] give finite results and gradients.

Offers: kl_divergence, kl_to_standard_normal
"""
import torch


def kl_divergence(mu_q, logvar_q, mu_p, logvar_p):
    """KL(q || p) of diagonal Gaussians, summed over every non-batch dimension.

    mu_q, logvar_q: (B, ...) parameters of q. mu_p, logvar_p: broadcastable to them
    (a tensor or a Python number), e.g. 0.0 for the standard normal. Returns (B,).
    """
    mu_q, logvar_q = torch.as_tensor(mu_q), torch.as_tensor(logvar_q)
    mu_p = torch.as_tensor(mu_p, dtype=mu_q.dtype, device=mu_q.device)
    logvar_p = torch.as_tensor(logvar_p, dtype=mu_q.dtype, device=mu_q.device)
    log_alpha = logvar_q - logvar_p                    # log(sigma_q^2 / sigma_p^2)
    k = torch.exp(log_alpha) - log_alpha - 1.0         # K(alpha), one term per dimension
    mean_term = (mu_q - mu_p) ** 2 * torch.exp(-logvar_p)  # ||mu_q - mu_p||^2 / sigma_p^2
    per_dim = 0.5 * (k + mean_term)                    # (B, ...) after broadcasting
    per_dim = per_dim.expand(torch.broadcast_shapes(per_dim.shape, mu_q.shape))
    return per_dim.reshape(per_dim.shape[0], -1).sum(dim=1)


def kl_to_standard_normal(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample: Algorithm 7, line 7. Returns (B,)."""
    per_dim = 0.5 * (mu ** 2 + torch.exp(logvar) - logvar - 1.0)
    return per_dim.reshape(per_dim.shape[0], -1).sum(dim=1)
