"""Scaled dot-product attention, written out (Lecture 04, Section 7).

Slide "Background - Scaled dot-product attention": for queries Q (N x d_h), keys K (M x d_h)
and values V (M x d_h),

    Attn(Q, K, V) = softmax( Q K^T / sqrt(d_h) ) V,    softmax applied row-wise.

Slide "DiTBlock Overview" uses it twice: self-attention (queries, keys and values are all image
tokens) and cross-attention (queries are image tokens, keys and values are prompt tokens).
`MultiHeadAttention` covers both: with `context_dim` set it is cross-attention.

Masks are boolean with True = "may attend", broadcastable to (B, heads, Lq, Lk); a key-padding
mask of the prompt is (B, Lk) and is reshaped here. A query row whose keys are all masked has
no distribution to average over; it returns zeros rather than the NaN a plain softmax gives.

The function is the definition; `torch.nn.functional.scaled_dot_product_attention` appears only
in the tests, as the independent reference, and in bench.py, which times the two side by side.

Offers: attention, MultiHeadAttention
"""
import math

import torch
import torch.nn as nn


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d_h)) v for q (..., Lq, Dh), k and v (..., Lk, Dh).

    mask: bool, True = attend, broadcastable to (..., Lq, Lk). Rows with no key allowed give 0.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        # Autocast would run the matmuls in bf16/fp16 and the softmax in fp32; the casts between
        # them hide the pattern torch.compile rewrites into its fused (flash) attention kernel.
        # One explicit dtype keeps the pattern visible: the same math, in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return attention(q.to(dtype), k.to(dtype), v.to(dtype), mask)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])   # (B, H, Lq, Lk)
    if mask is None:
        return torch.matmul(scores.softmax(dim=-1), v)         # (B, H, Lq, Dh)
    # Masked keys get a huge negative logit, so exp() makes their weight exactly 0. (An additive
    # bias, rather than masked_fill, is also the form torch.compile recognises as attention.)
    big = torch.finfo(scores.dtype).min / 2                    # finite: no inf - inf = NaN
    bias = torch.zeros((), dtype=scores.dtype, device=q.device).masked_fill(~mask, big)
    out = torch.matmul((scores + bias).softmax(dim=-1), v)     # (B, H, Lq, Dh)
    # A row with every key masked has nothing to average: it returns zeros.
    return out.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention, or cross-attention when `context_dim` is given.

    forward(x, context=None, mask=None):
        x       (B, Lq, dim)          queries (image tokens)
        context (B, Lk, context_dim)  keys/values for cross-attention (prompt tokens); None = self
        mask    (B, Lk) bool          key-padding mask, True = real token (or any shape
                                      broadcastable to (B, heads, Lq, Lk))
    returns (B, Lq, dim).
    qk_norm: LayerNorm on each head's queries and keys (bounds the logits: DiT-tiny's lr 1e-3).
    """

    def __init__(self, dim, heads, context_dim=None, qk_norm=False):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)   # one matmul for q, k and v
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        B, Lq, D = x.shape
        H = self.heads
        if self.is_cross:
            q = self.to_q(x)                                    # (B, Lq, D)
            k, v = self.to_kv(context).chunk(2, dim=-1)         # (B, Lk, D) each
        else:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)           # (B, Lq, D) each
        q = q.view(B, -1, H, D // H).transpose(1, 2)            # (B, H, Lq, Dh)
        k = k.view(B, -1, H, D // H).transpose(1, 2)            # (B, H, Lk, Dh)
        v = v.view(B, -1, H, D // H).transpose(1, 2)            # (B, H, Lk, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if mask is not None and mask.dim() == 2:
            mask = mask[:, None, None, :]                       # (B, 1, 1, Lk)
        out = attention(q, k, v, mask)                          # (B, H, Lq, Dh)
        out = out.transpose(1, 2).reshape(B, Lq, D)             # (B, Lq, D)
        return self.proj(out)
