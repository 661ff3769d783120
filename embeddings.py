"""Turning time, images and prompts into vectors (Lecture 04, Section 7).

Slide "Encoding Time": TimeEmb(t) = c * [cos(2 pi w_1 t) ... cos(2 pi w_{d/2} t),
sin(2 pi w_1 t) ... sin(2 pi w_{d/2} t)] with geometric frequencies
w_i = w_min (w_max / w_min)^((i-1)/(d/2-1)), and the requirement ||TimeEmb(t)|| = 1.
The slide's prefactor c = 1/sqrt(d) gives norm 1/sqrt(2), not 1: the d/2 cos-sin pairs each
contribute cos^2 + sin^2 = 1, so the squared norm is c^2 * d/2. We use c = sqrt(2/d), the value
that makes the norm exactly 1.
Default frequencies: flow time lives in [0, 1], so the frequencies must make the vector move on
that interval. DiT's sinusoid (periods up to 10000, made for integer timesteps 0..999) barely
moves there (README, "Where the code departs from the slides"). We use w_min = 0.1 and
w_max = 100, periods 10 down to 0.01: the slowest channel still turns on [0, 1] and the fastest
resolves steps of 0.01.

Slide "Patchify": x in R^{C x H x W} -> x~ in R^{L x k}, L = (H/p)(W/p) patches of k = p*p*C
numbers each, in row-major order (token k is the patch at (row, col) = divmod(k, W/p)).
`PatchEmbedding` is Patchify + a Linear + a fixed 2-D sin-cos position embedding.

Slide "Encoding Language Prompt": PromptEmbed(y) in R^{S x k}. The slide uses a pretrained
CLIP/T5 encoder; none can be downloaded here, so the prompt is tokenized byte by byte (UTF-8,
no vocabulary file) and `PromptEmbedding` is learned from scratch with the DiT: byte and
position embeddings, groups of a few bytes merged into one token (bytes are ~4x more numerous
than word pieces, and every cross-attention pays for each token), then a few transformer
layers. It returns the token sequence, its key-padding mask, and a pooled vector (mean over
real tokens) that the DiT adds to the time embedding.
The groups follow the bytes (today's default) or the words (`word_group`, a DiTConfig's
`prompt_words`): each word then starts a new group, so the word "circle" becomes the same tokens
in every caption and what the model learns of it carries over from one prompt to the next
(RESULTS.md, "Composition").
Every prompt starts with a BOS token, so the empty prompt "" (the null condition of
classifier-free guidance, `null_prompt`) still has one real token and no attention row is fully
masked.

Offers: time_frequencies, time_embedding, TimeEmbedding, patchify, unpatchify, sincos_2d,
PatchEmbedding, PAD_ID, BOS_ID, VOCAB_SIZE, prompt_words, prompt_ids, tokenize,
prompt_is_truncated, prompt_as_read, null_prompt, PromptBlock, PromptEmbedding
"""
import math
import re

import torch
import torch.nn as nn

from attention import MultiHeadAttention

W_MIN, W_MAX = 0.1, 100.0


# ---------------------------------------------------------------------------------------------
# Time

def time_frequencies(dim, w_min=W_MIN, w_max=W_MAX):
    """w_i = w_min (w_max/w_min)^((i-1)/(d/2-1)), i = 1..d/2 (the slide's geometric sequence)."""
    if dim % 2 != 0 or dim < 4:
        raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
    i = torch.arange(dim // 2, dtype=torch.float64)
    return w_min * (w_max / w_min) ** (i / (dim // 2 - 1))


def time_embedding(t, dim, w_min=W_MIN, w_max=W_MAX):
    """TimeEmb(t) for t of shape (B,) in [0, 1]: (B, dim) with norm exactly 1, [cos | sin]."""
    w = time_frequencies(dim, w_min, w_max).to(t.device)               # (d/2,)
    angle = 2 * math.pi * t.to(torch.float64)[:, None] * w[None, :]  # (B, d/2), float64 phases
    emb = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)    # (B, d)
    return (emb * math.sqrt(2.0 / dim)).to(torch.promote_types(t.dtype, torch.float32))


class TimeEmbedding(nn.Module):
    """Module wrapper of `time_embedding` with fixed dim and frequencies."""

    def __init__(self, dim, w_min=W_MIN, w_max=W_MAX):
        super().__init__()
        self.dim, self.w_min, self.w_max = dim, w_min, w_max

    def forward(self, t):
        return time_embedding(t, self.dim, self.w_min, self.w_max)


# ---------------------------------------------------------------------------------------------
# Images

def _check_divisible(height, width, p):
    if height % p or width % p:
        raise ValueError(f"image of size {height}x{width} is not divisible by patch size {p}; "
                         f"use a size that is a multiple of {p}")


def patchify(x, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), p*p*C), patches in row-major order."""
    B, C, H, W = x.shape
    _check_divisible(H, W, p)
    x = x.reshape(B, C, H // p, p, W // p, p)            # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                      # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, L, p*p*C)


def unpatchify(tokens, p, height, width):
    """(B, (H/p)(W/p), p*p*C) -> (B, C, H, W): the exact inverse of `patchify`."""
    _check_divisible(height, width, p)
    B, L, K = tokens.shape
    h, w = height // p, width // p
    if L != h * w or K % (p * p):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not tile a "
                         f"{height}x{width} image with patch size {p}")
    C = K // (p * p)
    x = tokens.reshape(B, h, w, p, p, C)                 # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                      # (B, C, h, p, w, p)
    return x.reshape(B, C, height, width)


def sincos_2d(dim, h, w):
    """Fixed 2-D sin-cos position embedding (h*w, dim): half the channels encode the row,
    half the column, each with the 1-D transformer sinusoid (periods up to 10000)."""
    if dim % 4 != 0:
        raise ValueError(f"position embedding dim must be a multiple of 4, got {dim}")
    # A fixed table, always computed on the CPU (also inside a `torch.device("meta")` block, where
    # a model is only measured); the module moves it with .to(device).
    cpu = torch.device("cpu")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=cpu) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=cpu),
                                torch.arange(w, dtype=torch.float64, device=cpu), indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):            # (L,) each, row-major order
        angle = pos[:, None] * omega[None, :]               # (L, dim/4)
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()                  # (L, dim)


class PatchEmbedding(nn.Module):
    """Patchify + Linear(p*p*C -> dim) + fixed 2-D sin-cos positions: (B, C, H, W) -> (B, L, dim)."""

    def __init__(self, in_channels, patch_size, dim, height, width):
        super().__init__()
        _check_divisible(height, width, patch_size)
        self.p = patch_size
        self.height, self.width = height, width
        self.proj = nn.Linear(patch_size * patch_size * in_channels, dim)
        pos = sincos_2d(dim, height // patch_size, width // patch_size)
        self.register_buffer("pos", pos[None], persistent=False)  # (1, L, dim)

    def forward(self, x):
        # A transposed or resized image can have the same number of patches and would broadcast
        # against the position table silently, with every patch at the wrong position.
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise ValueError(f"image of size {x.shape[-2]}x{x.shape[-1]}, but this patch "
                             f"embedding was built for {self.height}x{self.width}")
        return self.proj(patchify(x, self.p)) + self.pos


# ---------------------------------------------------------------------------------------------
# Prompts

PAD_ID, BOS_ID = 0, 257  # byte b is token b + 1
VOCAB_SIZE = 258


def prompt_words(prompt):
    """The words of a prompt: runs of letters and digits, and every other non-space character
    on its own ("flag: Japan" -> ["flag", ":", "Japan"])."""
    return re.findall(r"\w+|[^\w\s]", prompt)


def prompt_ids(prompt, word_group=0):
    """The token ids of one prompt, untruncated: BOS, then its UTF-8 bytes (byte b -> b + 1).

    word_group = 0: the bytes as they stand, spaces included. word_group = r > 0: every word
    (prompt_words) starts a new group of r positions, the rest of the previous group padded,
    spaces dropped: the group boundary is the word boundary. PromptEmbedding merges each group of
    r bytes into one token, so a word becomes the same tokens wherever it stands in a prompt
    ("circle" after "red " and after "blue " alike), which plain byte groups do not give.
    """
    if not word_group:
        return [BOS_ID] + [b + 1 for b in prompt.encode("utf-8")]
    if word_group < 2:
        raise ValueError("word groups need 2 or more bytes per token (with 1 the words would "
                         "run together)")
    ids = [BOS_ID]
    for word in prompt_words(prompt):
        ids += [PAD_ID] * (-len(ids) % word_group)                  # start a new group
        ids += [b + 1 for b in word.encode("utf-8")]
    return ids


def tokenize(prompts, max_len, word_group=0):
    """Byte-level UTF-8 tokenizer: list of str -> LongTensor (B, max_len).

    Token 0 is padding, BOS (257) opens every prompt, byte b becomes b + 1; word_group > 0
    aligns words to groups (prompt_ids). Prompts longer than max_len ids are truncated (a
    multi-byte character may be cut; the model sees bytes, so that is harmless). Use
    `prompt_is_truncated` to warn the user.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tokens = torch.full((len(prompts), max_len), PAD_ID, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(prompt, word_group)[:max_len]
        tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def prompt_is_truncated(prompt, max_len, word_group=0):
    """True when `tokenize` drops bytes of this prompt."""
    return len(prompt_ids(prompt, word_group)) > max_len


def prompt_as_read(prompt, max_len, word_group=0):
    """The part of a prompt that `tokenize` keeps, as text (for warnings); with word_group > 0,
    the words it keeps (the last one perhaps cut), joined by spaces."""
    if not word_group:
        return prompt.encode("utf-8")[:max_len - 1].decode("utf-8", "ignore")
    kept, length = [], 1                                            # BOS
    for word in prompt_words(prompt):
        length += -length % word_group
        data = word.encode("utf-8")[:max(0, max_len - length)]
        if data:
            kept.append(data.decode("utf-8", "ignore"))
        length += len(word.encode("utf-8"))
    return " ".join(kept)


def null_prompt(max_len):
    """The empty prompt "" as tokens (1, max_len): BOS then padding (with or without word
    groups). It is the null condition of classifier-free guidance: training replaces prompts by
    it, the sampler guides away from it."""
    return tokenize([""], max_len)


class PromptBlock(nn.Module):
    """Pre-LayerNorm transformer layer over prompt tokens: self-attention + MLP."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))

    def forward(self, y, mask):
        y = y + self.attn(self.norm1(y), mask=mask)  # (B, S, k)
        return y + self.mlp(self.norm2(y))


class PromptEmbedding(nn.Module):
    """PromptEmbed(y) in R^{S' x k}, learned from scratch.

    Bytes are 3-4 times more numerous than the word pieces of a CLIP/T5 tokenizer, and every
    DiT block's cross-attention projects every prompt token, so runs of `bytes_per_token`
    consecutive bytes are merged into one token (their embeddings concatenated, then a Linear:
    patchify for text), giving S' = S / bytes_per_token tokens. A merged token is real when any
    of its bytes is. With word-aligned ids (tokenize's word_group = bytes_per_token) a token is
    a word or a word's next bytes: its embedding is a Linear of the word's bytes plus one of
    its position.

    forward(tokens (B, S)) -> (y (B, S', dim), mask (B, S') bool, pooled (B, dim)).
    """

    def __init__(self, dim, depth, heads, max_len, bytes_per_token=1, vocab_size=VOCAB_SIZE):
        super().__init__()
        self.max_len, self.r = max_len, bytes_per_token
        self.token = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.merge = nn.Linear(bytes_per_token * dim, dim) if bytes_per_token > 1 else nn.Identity()
        self.blocks = nn.ModuleList(PromptBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        B, S = tokens.shape
        if S > self.max_len:
            raise ValueError(f"{S} prompt tokens, but this model takes at most {self.max_len}")
        if S % self.r:                                            # pad to whole groups of r bytes
            tokens = nn.functional.pad(tokens, (0, self.r - S % self.r), value=PAD_ID)
            S = tokens.shape[1]
        y = self.token(tokens) + self.pos[:, :S]                  # (B, S, k)
        y = self.merge(y.reshape(B, S // self.r, -1))             # (B, S', k), S' = S / r
        mask = (tokens != PAD_ID).reshape(B, S // self.r, self.r).any(-1)   # (B, S') True = real
        for block in self.blocks:
            y = block(y, mask)
        y = self.norm(y)
        weights = mask.to(y.dtype)[..., None]                     # (B, S', 1)
        pooled = (y * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, k)
        return y, mask, pooled
