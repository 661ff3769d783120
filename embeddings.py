"""Turning time, images and prompts into vectors (Lecture 04, Section 7).

Slide "Encoding Time": TimeEmb(t) = c * [cos(2 pi w_1 t) ... cos(2 pi w_{d/2} t),
sin(2 pi w_1 t) ... sin(2 pi w_{d/2} t)] with geometric frequencies
w_i = w_min (w_max / w_min)^((i-1)/(d/2-1)), and the requirement ||TimeEmb(t)|| = 1.
The slide's prefactor c = 1/sqrt(d) gives norm 1/sqrt(2), not 1: the d/2 cos-sin pairs each
contribute cos^2 + sin^2 = 1, so the squared norm is c^2 * d/2. We use c = sqrt(2/d), the value
that makes the norm exactly 1.
Default frequencies: flow time lives in [0, 1], so the frequencies must make the vector move on
that interval. DiT's sinusoid (cos(omega t), omega from 1 down to 1/10000, made for integer
timesteps 0..999) barely moves there (README, "Where the code departs from the slides"). We use
w_min = 0.1 and w_max = 100, periods 10 down to 0.01: the slowest channel still turns on [0, 1]
and the fastest resolves steps of 0.01.

Slide "Patchify": x in R^{C x H x W} -> (H/p)(W/p) patches of p*p*C numbers each, in row-major
order (patch j is the one at (row, col) = divmod(j, W/p)). `PatchEmbedding` is Patchify + a
Linear to the token width k + a fixed 2-D sin-cos position embedding: x~ in R^{N x k}.

Slide "Encoding Language Prompt": PromptEmbed(y) in R^{S x k}. The slide uses a pretrained
CLIP/T5 encoder; none can be downloaded here, so `PromptEmbedding` is learned from scratch with
the DiT, from the prompt's UTF-8 bytes (no vocabulary file). One token per word: its vector is
the mean of learned vectors of the word's byte n-grams and of the whole word, hashed into a
fixed table (after fastText's subword vectors), then a few transformer layers. A word is the
same token wherever it stands (but for its position), so what the model learns of "circle" after
"red" carries over to "blue circle" (prompts compose: RESULTS.md, "Composition"), and a word
never seen in training still gets a vector from the n-grams it shares with words that were. A
short word costs one token: the longest built-in caption is 15 tokens. `PromptEmbedding`
returns the token sequence, its key-padding mask, and a pooled vector (mean over real tokens)
that the DiT, through a Linear, adds to MLP(TimeEmb(t)) to make its condition c.
Every prompt starts with a BOS token, so the empty prompt "" (the null condition of
classifier-free guidance, `null_prompt`) still has one real token and no attention row is fully
masked.

Offers: time_frequencies, time_embedding, TimeEmbedding, patchify, unpatchify, sincos_2d,
PatchEmbedding, PAD_ID, BOS_ID, START_ID, MORE_ID, WORD_BYTES, N_GRAMS, HASH_BUCKETS, prompt_words,
prompt_pieces, tokenize, prompt_length, prompt_is_truncated, prompt_as_read, null_prompt, ngram_ids,
PromptBlock, PromptEmbedding
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


def time_embedding(t, dim, w_min=W_MIN, w_max=W_MAX, phase_dtype=None):
    """TimeEmb(t) for t of shape (B,) in [0, 1]: (B, dim) with norm exactly 1, [cos | sin].
    The phases, up to 2 pi w_max = 628 rad, are computed in float64 (in float32 they err by up
    to 1e-4 rad), except on Apple's MPS, which has no float64 (phase_dtype None: that choice)."""
    if phase_dtype is None:
        phase_dtype = torch.float32 if t.device.type == "mps" else torch.float64
    w = time_frequencies(dim, w_min, w_max).to(phase_dtype).to(t.device)  # (d/2,)
    angle = 2 * math.pi * t.to(phase_dtype)[:, None] * w[None, :]      # (B, d/2)
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
    half the column, each with the 1-D transformer sinusoid (cos(omega x), omega down to
    1/10000: wavelengths up to 2 pi 10000)."""
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

# Token ids: byte b is id b + 1; PAD fills a token after its bytes; BOS is the prompt's first
# token; START is the "<" before a word's first byte (inside ngram_ids); MORE opens the next
# token of a word longer than WORD_BYTES bytes ("construction-worker" -> "constructio", MORE
# "n-worker"), so that token is not read as a word of its own.
PAD_ID, BOS_ID, START_ID, MORE_ID = 0, 257, 258, 259
WORD_BYTES = 12         # W: ids per prompt token
N_GRAMS = (1, 2, 3)     # the byte n-grams of a token that build its embedding (and the whole token)
HASH_BUCKETS = 8192     # rows of the n-gram embedding table; n-grams share rows by their hash
_BASE, _PRIME = 263, 1_000_003  # a polynomial hash of ids (all < 263) modulo a prime


def prompt_words(prompt):
    """The words of a prompt: runs of letters and digits, and every other non-space character
    on its own ("flag: Japan" -> ["flag", ":", "Japan"])."""
    return re.findall(r"\w+|[^\w\s]", prompt)


def prompt_pieces(prompt, word_bytes=WORD_BYTES):
    """The prompt's tokens after BOS, untruncated, as lists of ids: one per word (prompt_words),
    its UTF-8 bytes; a word longer than word_bytes bytes goes on in tokens that start with
    MORE_ID."""
    pieces = []
    for word in prompt_words(prompt):
        ids = [b + 1 for b in word.encode("utf-8")]
        pieces.append(ids[:word_bytes])
        rest = ids[word_bytes:]
        while rest:
            pieces.append([MORE_ID] + rest[:word_bytes - 1])
            rest = rest[word_bytes - 1:]
    return pieces


def tokenize(prompts, max_len, word_bytes=WORD_BYTES):
    """Word tokens of UTF-8 bytes, no vocabulary file: list of str -> LongTensor
    (B, max_len, word_bytes).

    Token 0 of every prompt is BOS ([BOS_ID, PAD_ID, ...]); token i is the i-th piece of
    `prompt_pieces` (a word, or the rest of a long one), padded with PAD_ID; a token of PAD_ID
    only is padding. Prompts of more than max_len tokens are truncated: use
    `prompt_is_truncated` to warn the user.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tokens = torch.full((len(prompts), max_len, word_bytes), PAD_ID, dtype=torch.long)
    tokens[:, 0, 0] = BOS_ID
    for i, prompt in enumerate(prompts):
        for j, piece in enumerate(prompt_pieces(prompt, word_bytes)[:max_len - 1], start=1):
            tokens[i, j, :len(piece)] = torch.tensor(piece)
    return tokens


def prompt_length(captions, word_bytes=WORD_BYTES):
    """(S, longest) for a set of captions: `longest`, BOS and the longest caption's tokens, and
    S, that rounded up to a multiple of 8 (at most 256): the prompt tokens a model of them reads."""
    longest = 1 + max(len(prompt_pieces(c, word_bytes)) for c in captions)
    return min(256, -(-longest // 8) * 8), longest


def prompt_is_truncated(prompt, max_len, word_bytes=WORD_BYTES):
    """True when `tokenize` drops words of this prompt."""
    return 1 + len(prompt_pieces(prompt, word_bytes)) > max_len


def prompt_as_read(prompt, max_len, word_bytes=WORD_BYTES):
    """The words of a prompt that `tokenize` keeps (the last perhaps cut), joined by spaces (for
    warnings)."""
    words = []
    for piece in prompt_pieces(prompt, word_bytes)[:max_len - 1]:
        data = bytes(i - 1 for i in piece if i != MORE_ID)
        if piece[0] == MORE_ID:
            words[-1] += data
        else:
            words.append(data)
    return " ".join(w.decode("utf-8", "ignore") for w in words)


def null_prompt(max_len, word_bytes=WORD_BYTES):
    """The empty prompt "" as tokens (1, max_len, word_bytes): BOS then padding. It is the null
    condition of classifier-free guidance: training replaces prompts by it, the sampler guides
    away from it."""
    return tokenize([""], max_len, word_bytes)


def _mix(h):
    """Scramble a polynomial hash (< 2^31) before it picks a bucket, so that n-grams that differ
    by a constant do not land in buckets a constant apart (xor-shift-multiply, in int64)."""
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    return h ^ (h >> 12)


def ngram_ids(tokens, buckets, ngrams=N_GRAMS):
    """fastText-style features of each token, hashed into `buckets` rows: the byte n-grams (n in
    `ngrams`) of "<" + its ids + ">", and the whole token. tokens (B, S, W) -> (ids, real), each
    (B, S, G) with G = 3W + 4 for n = 1, 2, 3: every window, and whether it is a feature
    ("red" has 11: r e d, <r re ed d>, <re red ed>, and "red" itself).

    The first PAD after a token's ids plays ">"; an n-gram is real when every element before its
    last is an id or "<" (a unigram must be an id). n seeds the hash (0: the whole token), so the
    unigram "a" and the word "a" differ."""
    B, S, W = tokens.shape
    marked = nn.functional.pad(tokens, (1, 1), value=PAD_ID)           # (B, S, W + 2)
    marked[..., 0] = START_ID
    ids, real = [], []
    for n in ngrams:
        L = W + 3 - n                                                  # windows of n
        h = torch.full((B, S, L), n, dtype=torch.long, device=tokens.device)
        ok = torch.ones((B, S, L), dtype=torch.bool, device=tokens.device)
        for k in range(n):
            part = marked[..., k:k + L]
            h = (h * _BASE + part) % _PRIME
            if n == 1:
                ok = (part != PAD_ID) & (part != START_ID)
            elif k < n - 1:
                ok = ok & (part != PAD_ID)
        ids.append(h)
        real.append(ok)
    h = torch.zeros((B, S), dtype=torch.long, device=tokens.device)    # the whole token, its
    for k in range(W):                                                 # ids only (not its PADs)
        x = tokens[..., k]
        h = torch.where(x != PAD_ID, (h * _BASE + x) % _PRIME, h)
    ids.append(h[..., None])
    real.append(torch.ones_like(ok[..., :1]))
    is_token = tokens[..., :1] != PAD_ID                                # (B, S, 1): not padding
    return _mix(torch.cat(ids, -1)) % buckets, torch.cat(real, -1) & is_token


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
    """PromptEmbed(y) in R^{S x k}, learned from scratch: one token per word.

    A token's vector is the mean of the embeddings of its hashed byte n-grams and of the whole
    word (`ngram_ids`; after fastText, Bojanowski et al. 2017), plus a learned position. Before
    its position is added a word is the same vector wherever it stands in a prompt, so what the
    model learns of "circle" after "red" carries over to "circle" after "blue"; a word it never
    saw still gets a vector from the n-grams it shares with words it did see. Then a few
    transformer layers mix the words.

    forward(tokens (B, S, W)) -> (y (B, S, dim), mask (B, S) bool, pooled (B, dim)).
    """

    def __init__(self, dim, depth, heads, max_len, word_bytes=WORD_BYTES, buckets=HASH_BUCKETS):
        super().__init__()
        self.max_len, self.word_bytes, self.buckets = max_len, word_bytes, buckets
        self.ngram = nn.Embedding(buckets, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.ngram.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(PromptBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens):
        B, S, W = tokens.shape
        if S > self.max_len or W != self.word_bytes:
            raise ValueError(f"prompt tokens of shape {tuple(tokens.shape)}, but this model takes "
                             f"at most {self.max_len} tokens of {self.word_bytes} ids")
        ids, real = ngram_ids(tokens, self.buckets)                     # (B, S, G) each
        weights = real.to(self.ngram.weight.dtype)[..., None]            # (B, S, G, 1)
        y = (self.ngram(ids) * weights).sum(2) / weights.sum(2).clamp(min=1.0)  # (B, S, k)
        y = y + self.pos[:, :S]
        mask = tokens[..., 0] != PAD_ID                                  # (B, S) True = real
        for block in self.blocks:
            y = block(y, mask)
        y = self.norm(y)
        weights = mask.to(y.dtype)[..., None]                            # (B, S, 1)
        pooled = (y * weights).sum(1) / weights.sum(1).clamp(min=1.0)    # (B, k)
        return y, mask, pooled
