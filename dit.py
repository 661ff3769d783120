"""The Diffusion Transformer u_theta(x | y) in latent space (Lecture 04, Section 7).

Slide "Diffusion Transformer Overview":
    t~  = TimeEmb(t),  x~_0 = PatchEmb(x) in R^{N x k},  y~ = PromptEmb(y) in R^{S x k_y}
    x~_{i+1} = DiTBlock(x~_i, t~, y~)        (i = 0, ..., D - 1: D = depth blocks)
    u = Unpatchify(x~_D W~) in R^{C x H x W}
(The slide counts blocks with N too; here N is the number of tokens, as in PatchEmb. The widths
differ: time_dim for TimeEmb, mapped to the token width k by an MLP, and prompt_dim k_y.)
Slide "DiTBlock Overview": image via self-attention, text via cross-attention, time via
adaptive LayerNorm; all inputs are combined by summing them up (residual connections).

The block follows DiT's adaLN-Zero (Peebles & Xie 2023): a conditioning vector
c = MLP(TimeEmb(t)) + Linear(pooled prompt) drives, through SiLU -> Linear, a shift, scale and
gate for the self-attention branch and for the MLP branch:

    x = x + gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))
    x = x + CrossAttn(LN'(x), y~, mask)                    (pre-LayerNorm, key-padding mask)
    x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
    modulate(x, shift, scale) = x * (1 + scale) + shift,   LN without affine, eps 1e-6.

Zero initialisation: every modulation Linear, the final Linear and the cross-attention output
projection start at zero, so a new model outputs exactly 0 and every block is the identity.
The cross-attention branch is not gated (as in PixArt-alpha): a zero gate times a zero output
projection would leave both with zero gradient forever.

Time-signal scale: our TimeEmb has norm 1 (entries ~ sqrt(2/time_dim)), where DiT's raw sinusoid has
norm ~11 and feeds an MLP initialised with std 0.02, which would shrink the time signal to
noise. The first Linear of the time MLP is initialised with std 1, so its outputs have unit
variance for every t, and c differs materially between t = 0 and t = 1 at initialisation.

Offers: DiTConfig, PRESETS, dit_preset, modulate, DiTBlock, FinalLayer, DiT, count_parameters,
preset_table, main
"""
import argparse
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn

from attention import MultiHeadAttention
from embeddings import PatchEmbedding, PromptEmbedding, TimeEmbedding, unpatchify


@dataclass
class DiTConfig:
    input_size: int = 8          # latent height h (and width, unless input_width is set)
    in_channels: int = 4         # latent channels C
    patch_size: int = 2          # p: N = (h/p)(w/p) tokens
    dim: int = 256               # k, the token width
    depth: int = 6               # number of DiTBlocks
    heads: int = 4
    mlp_ratio: float = 4.0
    input_width: int = 0         # latent width w; 0 means square (w = input_size)
    time_dim: int = 256          # width of the sinusoidal TimeEmb
    prompt_dim: int = 256        # prompt token width (the cross-attention context_dim)
    prompt_depth: int = 2        # transformer layers in the prompt encoder
    prompt_heads: int = 4
    max_prompt_len: int = 32     # S: prompt tokens, BOS + one per word; longer prompts are cut
    prompt_word_bytes: int = 12  # W: ids per prompt token (a longer word takes more)
    prompt_buckets: int = 8192   # rows of the hashed byte n-gram table (embeddings.ngram_ids)
    qk_norm: bool = False        # LayerNorm on q and k in every attention

    @property
    def height(self):
        return self.input_size

    @property
    def width(self):
        return self.input_width or self.input_size

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DiTConfig fields: {sorted(unknown)}")
        return cls(**d)


# The DiT family's widths / depths / heads, plus "tiny" for CPUs and "micro", a smoke-test size
# that runs every step of the recipe in seconds (not one to train for pictures). Both normalise
# each head's queries and keys (QK-norm), which keeps their attention logits bounded at the
# default learning rate 1e-3.
PRESETS = {
    "micro": DiTConfig(dim=64, depth=2, heads=2, prompt_dim=64, prompt_depth=1, prompt_heads=2,
                       qk_norm=True),
    "tiny": DiTConfig(dim=256, depth=6, heads=4, prompt_dim=128, prompt_depth=2, prompt_heads=4,
                      qk_norm=True),
    "S": DiTConfig(dim=384, depth=12, heads=6, prompt_dim=384, prompt_depth=2, prompt_heads=6),
    "B": DiTConfig(dim=768, depth=12, heads=12, prompt_dim=512, prompt_depth=4, prompt_heads=8),
    "L": DiTConfig(dim=1024, depth=24, heads=16, prompt_dim=768, prompt_depth=4, prompt_heads=12),
    "XL": DiTConfig(dim=1152, depth=28, heads=16, prompt_dim=768, prompt_depth=6, prompt_heads=12),
}


def dit_preset(preset, **overrides):
    """A preset's DiTConfig with some fields replaced (e.g. input_size, in_channels)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, with shift/scale (B, 1, k) broadcast over tokens."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated self-attention, cross-attention to the prompt, gated MLP."""

    def __init__(self, dim, heads, context_dim, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(dim, heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross = MultiHeadAttention(dim, heads, context_dim=context_dim, qk_norm=qk_norm)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, y, mask):
        # x (B, N, k) image tokens; c (B, k) condition; y (B, S, k_y) prompt; mask (B, S)
        mod = self.adaLN(c)[:, None, :]                                      # (B, 1, 6k)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross(self.norm2(x), context=y, mask=mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x                                                             # (B, N, k)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + Linear to p*p*C numbers per token."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c)[:, None, :].chunk(2, dim=-1)            # (B, 1, k) each
        return self.linear(modulate(self.norm(x), shift, scale))            # (B, N, p*p*C)


class DiT(nn.Module):
    """u_theta(x_t, t, y): forward(x_t (B, C, h, w), t (B,), tokens (B, S, W)) -> u, the
    shape of x_t."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.patch = PatchEmbedding(config.in_channels, config.patch_size, config.dim,
                                    config.height, config.width)
        self.time_emb = TimeEmbedding(config.time_dim)
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, config.dim), nn.SiLU(),
                                      nn.Linear(config.dim, config.dim))
        self.prompt = PromptEmbedding(config.prompt_dim, config.prompt_depth, config.prompt_heads,
                                      config.max_prompt_len, config.prompt_word_bytes,
                                      config.prompt_buckets)
        self.prompt_pool = nn.Linear(config.prompt_dim, config.dim)
        self.blocks = nn.ModuleList(
            DiTBlock(config.dim, config.heads, config.prompt_dim, config.mlp_ratio, config.qk_norm)
            for _ in range(config.depth))
        self.final = FinalLayer(config.dim, config.patch_size, config.in_channels)
        self._init_weights()

    def _init_weights(self):
        for block in self.blocks:                 # DiT: xavier-uniform Linears, zero biases
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        w = self.patch.proj.weight                # like a conv kernel: xavier on the flat view
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch.proj.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=1.0)   # unit-norm TimeEmb -> unit-variance h
        nn.init.zeros_(self.time_mlp[0].bias)
        zero = [self.final.adaLN[-1], self.final.linear]
        for block in self.blocks:
            zero += [block.adaLN[-1], block.cross.proj]
        for m in zero:                            # adaLN-Zero
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def condition(self, t, pooled):
        """c = MLP(TimeEmb(t)) + Linear(pooled prompt): (B, k)."""
        return self.time_mlp(self.time_emb(t)) + self.prompt_pool(pooled)

    def forward(self, x_t, t, tokens):
        config = self.config
        x = self.patch(x_t)                                   # (B, N, k)
        y, mask, pooled = self.prompt(tokens)                 # (B, S, k_y), (B, S), (B, k_y)
        c = self.condition(t, pooled)                         # (B, k)
        for block in self.blocks:
            x = block(x, c, y, mask)                          # (B, N, k)
        x = self.final(x, c)                                  # (B, N, p*p*C)
        return unpatchify(x, config.patch_size, config.height, config.width)  # (B, C, h, w)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def preset_table(input_size=32, in_channels=4, patch_size=2):
    """Rows (name, dim, depth, heads, parameters) for the presets at a given latent size.
    Parameters are counted on the meta device, so even XL costs no memory."""
    rows = []
    for name in PRESETS:
        config = dit_preset(name, input_size=input_size, in_channels=in_channels,
                            patch_size=patch_size)
        with torch.device("meta"):
            n = count_parameters(DiT(config))
        rows.append((name, config.dim, config.depth, config.heads, n))
    return rows


def main(argv=None):
    """python dit.py: the presets' widths, depths, heads and parameter counts."""
    p = argparse.ArgumentParser(description="Print the DiT presets and their parameter counts.",
                                epilog="examples:\n  python dit.py                   # 32x32x4 latents (256 px "
                                       "images)\n  python dit.py --latent-size 8   # the CPU "
                                       "default's 8x8x4 latents",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent-size", type=int, default=32, help="latent height = width (default 32)")
    p.add_argument("--channels", type=int, default=4, help="latent channels (default 4)")
    p.add_argument("--patch-size", type=int, default=2, help="patch size (default 2)")
    args = p.parse_args(argv)
    print(f"{'preset':>6} {'dim':>5} {'depth':>5} {'heads':>5} {'params':>12}  "
          f"({args.latent_size}x{args.latent_size}x{args.channels} latents, patch {args.patch_size})")
    for name, dim, depth, heads, n in preset_table(args.latent_size, args.channels, args.patch_size):
        print(f"{name:>6} {dim:>5} {depth:>5} {heads:>5} {n / 1e6:>11.1f}M")


if __name__ == "__main__":
    main()
