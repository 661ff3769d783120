"""The beta-VAE that builds the latent space (Lecture 04, Section 6).

Slide "Latent Spaces are constructed via autoencoders": an encoder maps an image x (3, H, W)
to a much smaller latent z (C channels, H/f, W/f: k = C (H/f)(W/f) numbers, the lecture's latent
dimension) and a decoder maps z back. Slide "The Problem of Standard Autoencoders": a plain
reconstruction loss says nothing about the distribution of the latents, so Algorithm 7
("beta-VAE Training Procedure") makes the encoder output a Gaussian q(z | x) =
N(mu_phi(x), diag(sigma_phi^2(x))) and adds a KL pull towards the prior N(0, I):

    2: mu_i, log sigma_i^2  <- encoder(x_i)
    3: eps_i ~ N(0, I_k)
    4: z_i = mu_i + sigma_i * eps_i                          (reparameterize)
    5: x_hat_i = mu_theta(z_i)                               (decode)
    6: L_recon = 1/B sum_i ||x_i - x_hat_i||^2 / (2 sigma^2)
    7: L_KL    = 1/B sum_i 1/2 sum_j (mu_ij^2 + sigma_ij^2 - log sigma_ij^2 - 1)
    8: L = L_recon + beta * L_KL

One departure, train_vae.py's default: during training the decoder reads z plus a little noise
relative to the latents' spread (`noised_latents`), as the flow model's samples are a little
off the encoder's latents; a decoder trained so forgives them.

Slide "Latent Diffusion Models (LDMs) - Recipe", step 2: the dataset of latents is the encoder
*mean* mu_phi(x). The flow model then learns those latents; it trains best on unit-scale data,
so the VAE also carries per-channel latent statistics (buffers `latent_mean`, `latent_std`,
saved in its state_dict) that `normalize_latents` applies before the flow model and
`denormalize_latents` undoes before decoding -- the "scale / shift" of flux's autoencoder.py
(one number there; one per channel here). Keeping them inside the VAE checkpoint means the
training and the sampling of the flow model cannot disagree about the scale.

The network is the latent-diffusion (Rombach et al. 2022) / flux conv autoencoder, sized down
for 32-64 px images on a CPU: GroupNorm + SiLU ResBlocks, stride-2 convolutions down,
nearest-neighbour x2 + conv up, and one self-attention block at the lowest resolution. With
`patch_size` p > 1 the encoder starts on p x p pixel patches (pixel unshuffle: the p^2 pixels of
a patch become channels, as in patchify) and the decoder ends by putting them back (pixel
shuffle), so the small presets spend nearly all their FLOPs at the latent resolution and half of
it (a 32 px image costs half the FLOPs of the same autoencoder without patches). After the
shuffle nothing mixes the pixels of neighbouring patches. With `refine_channels` r > 0 (the 64 px
preset, r = 16) the decoder's last convolution is instead a 1x1 one to r p^2 channels, and after
the shuffle two thin 3x3 convolutions at full resolution turn each pixel's r channels into RGB,
across patch borders (9% more FLOPs at 64 px). Images live in [-1, 1]; the decoder output is
left unsquashed (no tanh), it is the Gaussian mean mu_theta(z) of Algorithm 7. Non-square images
work as long as H and W are divisible by f.

Offers: DEFAULT_BETA, DEFAULT_SIGMA, VAEConfig, VAE_PRESETS, vae_preset, ResBlock, AttnBlock,
Downsample, Upsample, Encoder, Decoder, VAE, noised_latents, encode_means, latent_stats, vae_loss
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import MultiHeadAttention
from kl import kl_to_standard_normal

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Algorithm 7's constants. sigma is the std of the Gaussian pixel noise model p(x | z) in the
# [-1, 1] units of the images; see `vae_loss` for why only lambda = 2 sigma^2 beta matters.
DEFAULT_SIGMA = 0.1
DEFAULT_BETA = 0.25           # lambda = 2 * 0.1^2 * 0.25 = 5e-3


# ---------------------------------------------------------------------------------------------
# Config

@dataclass
class VAEConfig:
    """Everything needed to rebuild a VAE; saved in its checkpoint as `dataclasses.asdict`."""
    image_size: int = 32            # nominal training size (the model runs at any size % f == 0)
    image_channels: int = 3
    latent_channels: int = 4        # C channels of z
    base_channels: int = 32
    channel_mults: tuple = (1, 2, 2)  # one entry per resolution level; f = 2 ** (levels - 1)
    num_res_blocks: int = 1         # ResBlocks per level, in encoder and decoder alike
    attn_heads: int = 1             # heads of the self-attention at the lowest resolution
    groups: int = 8                 # GroupNorm groups; must divide every channel count
    patch_size: int = 1             # p: the encoder starts on p x p pixel patches (pixel unshuffle)
                                    # and the decoder ends on them (pixel shuffle)
    refine_channels: int = 0        # r > 0: the decoder's last conv is 1x1 to r p^2 channels and,
                                    # after the pixel shuffle, SiLU-conv3x3-SiLU-conv3x3 at full
                                    # resolution makes RGB; 0: off (and checkpoints without it)

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if not self.channel_mults:
            raise ValueError("channel_mults must have at least one level")
        for m in self.channel_mults:
            if (self.base_channels * m) % self.groups != 0:
                raise ValueError(f"groups={self.groups} does not divide "
                                 f"{self.base_channels * m} channels")
        if (self.base_channels * self.channel_mults[-1]) % self.attn_heads != 0:
            raise ValueError(f"attn_heads={self.attn_heads} does not divide "
                             f"{self.base_channels * self.channel_mults[-1]}")
        if self.patch_size < 1 or self.refine_channels < 0:
            raise ValueError(f"patch_size={self.patch_size} must be >= 1 and refine_channels="
                             f"{self.refine_channels} >= 0")
        if self.image_size % self.factor != 0:
            raise ValueError(f"image_size={self.image_size} is not divisible by f={self.factor}")

    @property
    def factor(self):
        """Downsampling factor f: a (H, W) image becomes an (H / f, W / f) latent."""
        return self.patch_size * 2 ** (len(self.channel_mults) - 1)

    @property
    def latent_size(self):
        return self.image_size // self.factor

    @classmethod
    def from_dict(cls, d):
        """Inverse of `dataclasses.asdict` (lists, as from JSON, become tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VAEConfig keys: {unknown}")
        return cls(**d)                                     # (__post_init__ makes tuples)


VAE_PRESETS = {
    # (train_vae.py gives a folder of images 8 latent channels instead of 4: vae_config)
    # 32 px -> 8 x 8 x 4 (f = 4): 2 x 2 pixel patches, then 64 channels at 16 x 16 and 8 x 8;
    # small enough to train on a CPU in minutes (a full-resolution end gained little at 2 x 2).
    "32": VAEConfig(image_size=32, base_channels=64, channel_mults=(1, 1), num_res_blocks=1,
                    attn_heads=1, groups=8, patch_size=2),
    # 64 px -> 8 x 8 x 4 (f = 8): the same network on 4 x 4 pixel patches, so the latents and
    # the DiT cost what they cost at 32 px (RESULTS.md, "64 px through an 8x VAE"); it ends on 16
    # channels at full resolution, which keeps more detail for a step ~40% dearer on a CPU
    # (RESULTS.md, "The full-resolution stage as the 64 px default").
    "64": VAEConfig(image_size=64, base_channels=64, channel_mults=(1, 1), num_res_blocks=1,
                    attn_heads=1, groups=8, patch_size=4, refine_channels=16),
    # 256 px -> 32 x 32 x 4 (f = 8), for GPUs: close to the Stable Diffusion VAE's layout.
    "large": VAEConfig(image_size=256, base_channels=128, channel_mults=(1, 2, 4, 4),
                       num_res_blocks=2, attn_heads=1, groups=32),
}


def vae_preset(name, image_size=None):
    """A fresh copy of VAE_PRESETS[name], optionally for another image size."""
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(VAE_PRESETS)}")
    config = VAE_PRESETS[name]
    return dataclasses.replace(config, image_size=image_size or config.image_size)


# ---------------------------------------------------------------------------------------------
# Blocks

class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on the skip when channels change.

    The last conv starts with small weights so that a fresh block is close to the identity
    (deep stacks then start as shallow ones) while every weight still gets a gradient.
    """

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        with torch.no_grad():
            self.conv2.weight.mul_(0.1)
            self.conv2.bias.zero_()

    def forward(self, x):                                   # (B, in_ch, H, W)
        h = self.conv1(F.silu(self.norm1(x)))               # (B, out_ch, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h                             # (B, out_ch, H, W)


class AttnBlock(nn.Module):
    """x + MHA(GN(x)) with the H*W positions as tokens (global context at low resolution)."""

    def __init__(self, ch, heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.attn = MultiHeadAttention(ch, heads)
        with torch.no_grad():
            self.attn.proj.weight.mul_(0.1)
            self.attn.proj.bias.zero_()

    def forward(self, x):                                   # (B, C, h, w)
        B, C, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)         # (B, h*w, C)
        t = self.attn(t)                                    # (B, h*w, C)
        return x + t.transpose(1, 2).reshape(B, C, h, w)    # (B, C, h, w)


class Downsample(nn.Module):
    """3x3 conv with stride 2 and padding 1: (H, W) -> (H/2, W/2) exactly for even H, W."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(ch, config):
    return nn.Sequential(ResBlock(ch, ch, config.groups),
                         AttnBlock(ch, config.attn_heads, config.groups),
                         ResBlock(ch, ch, config.groups))


# ---------------------------------------------------------------------------------------------
# Encoder, decoder

class Encoder(nn.Module):
    """x (B, 3, H, W) -> (mu, logvar) parameters, stacked: (B, 2k, H/f, W/f)."""

    def __init__(self, config):
        super().__init__()
        chs = [config.base_channels * m for m in config.channel_mults]
        self.p = config.patch_size
        self.conv_in = nn.Conv2d(config.image_channels * self.p ** 2, chs[0], 3, padding=1)
        blocks, ch = [], chs[0]
        for level, out_ch in enumerate(chs):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, config.groups))
                ch = out_ch
            if level != len(chs) - 1:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid_block(ch, config)
        self.norm_out = nn.GroupNorm(config.groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * config.latent_channels, 3, padding=1)

    def forward(self, x):                                   # (B, 3, H, W)
        h = F.pixel_unshuffle(x, self.p)                    # (B, 3 p^2, H/p, W/p)
        h = self.conv_in(h)                                 # (B, c0, H/p, W/p)
        h = self.down(h)                                    # (B, cL, H/f, W/f)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))      # (B, 2k, H/f, W/f)


class Decoder(nn.Module):
    """z (B, C, h, w) -> x_hat (B, 3, h*f, w*f): the mean mu_theta(z), no output squashing."""

    def __init__(self, config):
        super().__init__()
        chs = [config.base_channels * m for m in config.channel_mults]
        ch = chs[-1]
        self.conv_in = nn.Conv2d(config.latent_channels, ch, 3, padding=1)
        self.mid = _mid_block(ch, config)
        blocks = []
        for level in reversed(range(len(chs))):
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(ch, chs[level], config.groups))
                ch = chs[level]
            if level != 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(config.groups, ch, eps=1e-6)
        self.p, r = config.patch_size, config.refine_channels
        if r == 0:                      # each p x p patch's RGB from the features around it
            self.conv_out = nn.Conv2d(ch, config.image_channels * self.p ** 2, 3, padding=1)
            self.refine = nn.Identity()
        else:                           # r features per pixel, mixed across patch borders
            self.conv_out = nn.Conv2d(ch, r * self.p ** 2, 1)
            self.refine = nn.Sequential(nn.SiLU(), nn.Conv2d(r, r, 3, padding=1), nn.SiLU(),
                                        nn.Conv2d(r, config.image_channels, 3, padding=1))

    def forward(self, z):                                   # (B, C, h, w)
        h = self.conv_in(z)                                 # (B, cL, h, w)
        h = self.mid(h)
        h = self.up(h)                                      # (B, c0, h*f/p, w*f/p)
        h = self.conv_out(F.silu(self.norm_out(h)))         # (B, 3 p^2 or r p^2, h*f/p, w*f/p)
        h = F.pixel_shuffle(h, self.p)                      # (B, 3 or r, h*f, w*f)
        return self.refine(h)                               # (B, 3, h*f, w*f)


# ---------------------------------------------------------------------------------------------
# The VAE

class VAE(nn.Module):
    """Encoder + Gaussian posterior + decoder, plus the per-channel latent normalisation."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        with torch.no_grad():   # start with a small posterior std, sigma = exp(-4 / 2) ~ 0.14
            self.encoder.conv_out.bias[config.latent_channels:].fill_(-4.0)
        k = config.latent_channels
        self.register_buffer("latent_mean", torch.zeros(k))
        self.register_buffer("latent_std", torch.ones(k))

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> mu, logvar, each (B, C, H/f, W/f); logvar in [-30, 20]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def reparameterize(mu, logvar):
        """Algorithm 7, lines 3-4: z = mu + sigma * eps, sigma = exp(logvar / 2), eps ~ N(0, I)."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def decode(self, z):
        """z (B, C, h, w) -> x_hat (B, 3, h*f, w*f)."""
        return self.decoder(z)

    def forward(self, x, decoder_noise=0.0):
        """Algorithm 7, lines 2-5: returns x_hat (B, 3, H, W), mu and logvar (B, C, H/f, W/f).
        With decoder_noise s > 0 (training) the decoder reads `noised_latents(z, mu, s)`."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar)
        if decoder_noise:
            z = noised_latents(z, mu, decoder_noise)
        return self.decode(z), mu, logvar

    # Latent normalisation for the flow model --------------------------------

    @torch.no_grad()
    def set_latent_stats(self, mean, std):
        """Store per-channel stats (C,) of the encoder means; they travel in the state_dict."""
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        k = self.config.latent_channels
        if mean.numel() != k or std.numel() != k:
            raise ValueError(f"expected {k} channel stats, got {mean.numel()} and {std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError(f"latent std must be positive, got {std.tolist()}")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def normalize_latents(self, z):
        """(z - mean) / std per channel, z (B, C, h, w): what the flow model sees."""
        mean = self.latent_mean.to(z.dtype).view(1, -1, 1, 1)
        std = self.latent_std.to(z.dtype).view(1, -1, 1, 1)
        return (z - mean) / std

    def denormalize_latents(self, z):
        """Inverse of `normalize_latents`: z * std + mean, before `decode`."""
        mean = self.latent_mean.to(z.dtype).view(1, -1, 1, 1)
        std = self.latent_std.to(z.dtype).view(1, -1, 1, 1)
        return z * std + mean


def noised_latents(z, mu, scale):
    """z (B, C, h, w) + u * std_c(mu) * n, u ~ U(0, scale) per image, n ~ N(0, I), std_c the
    batch's spread of the means per channel: a departure from Algorithm 7 that trains the
    decoder on latents a little off the encoder's, as the flow model's samples are, so that it
    forgives their errors. Relative to the latents' own spread, so the encoder cannot outgrow it
    (a fixed noise std changed nothing; RESULTS.md, "A decoder that forgives")."""
    u = scale * torch.rand(z.shape[0], 1, 1, 1, device=z.device, dtype=z.dtype)   # (B, 1, 1, 1)
    return z + u * mu.detach().std(dim=(0, 2, 3)).view(1, -1, 1, 1) * torch.randn_like(z)


@torch.no_grad()
def encode_means(vae, images, batch_size=256):
    """Recipe step 2, "for VAE simply take the mean prediction": mu_phi(x) of uint8 images
    (N, 3, H, W), encoded in batches on the VAE's device; float32 (N, C, H/f, W/f) on the CPU."""
    device = next(vae.parameters()).device
    out = []
    for batch in images.split(batch_size):
        mu, _ = vae.encode(batch.to(device).float() / 127.5 - 1.0)   # pixels in [-1, 1]
        out.append(mu.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def latent_stats(mu_batches):
    """Per-channel mean and (population) std over a whole set of latents, streamed in float64.

    mu_batches: an iterable of (B, C, h, w) tensors, e.g. the encoder means of the training set.
    Returns float32 tensors mean (C,), std (C,), equal to those of the concatenated batches.
    """
    count, total, total_sq = 0, 0.0, 0.0
    for mu in mu_batches:
        mu = mu.detach().cpu().double()                    # (Apple's MPS has no float64)
        total = total + mu.sum(dim=(0, 2, 3))               # (C,)
        total_sq = total_sq + (mu * mu).sum(dim=(0, 2, 3))  # (C,)
        count += mu.numel() // mu.shape[1]
    if count == 0:
        raise ValueError("latent_stats needs at least one non-empty batch")
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return mean.float(), var.sqrt().float()


# ---------------------------------------------------------------------------------------------
# Loss

def vae_loss(x, x_hat, mu, logvar, beta=DEFAULT_BETA, sigma=DEFAULT_SIGMA):
    """Algorithm 7, lines 6-8. Returns scalars (total, recon, kl), always in float32.

        recon = 1/B sum_i ||x_i - x_hat_i||^2 / (2 sigma^2)     (sum over all pixels, channels)
        kl    = 1/B sum_i KL(N(mu_i, sigma_i^2) || N(0, I))     (= kl_to_standard_normal mean)
        total = recon + beta * kl

    Only lambda = 2 sigma^2 beta matters: multiplying the loss by the constant 2 sigma^2 does
    not move its minimiser, and gives

        2 sigma^2 * total = 1/B sum_i ||x_i - x_hat_i||^2 + lambda * kl,

    a sum-of-squared-errors reconstruction traded against lambda nats of KL. (At a fixed lambda,
    sigma only scales the loss: AdamW's steps hardly change with it, but the gradient's norm does,
    so the smaller sigma, the harder --grad-clip binds.) The defaults here (sigma = 0.1 in the
    [-1, 1] units of the images, beta = 0.25, so lambda = 5e-3; the built-in shapes' in
    train_vae.py, which gives a folder of images beta = 1.0) weigh the KL about as much as the
    remaining reconstruction error: the images stay sharp, while the latents become smoother
    and easier for the flow model to learn than with a weaker KL (README, "The beta-VAE's
    constants").

    Computed in float32 with autocast off: exp(logvar) for logvar = 20 is 4.9e8, which
    overflows float16 and loses precision in bfloat16.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, x_hat, mu, logvar = x.float(), x_hat.float(), mu.float(), logvar.float()
        B = x.shape[0]
        sq_err = (x - x_hat).pow(2).reshape(B, -1).sum(dim=1)     # (B,) ||x_i - x_hat_i||^2
        recon = sq_err.mean() / (2.0 * sigma ** 2)
        kl = kl_to_standard_normal(mu, logvar).mean()
        total = recon + beta * kl
    return total, recon, kl

