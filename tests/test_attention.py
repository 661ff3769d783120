"""Tests for attention.py: the written-out attention against F.scaled_dot_product_attention,
masking (exact zero weights, fully masked rows), and MultiHeadAttention's symmetries."""

import pytest
import torch
import torch.nn.functional as F

from attention import MultiHeadAttention, attention


def _random_mask(shape, g):
    """Boolean mask with at least one True per row (so the reference has no NaN)."""
    mask = torch.rand(shape, generator=g) < 0.5
    first = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask.scatter_(-1, first[..., None], True)
    return mask


@pytest.mark.parametrize("B,H,Lq,Lk,Dh", [(2, 3, 5, 7, 4), (1, 1, 1, 9, 8), (3, 2, 6, 2, 16)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_sdpa_float64(B, H, Lq, Lk, Dh, masked):
    g = torch.Generator().manual_seed(B * 100 + Lq * 10 + Lk)
    q = torch.randn(B, H, Lq, Dh, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, Lk, Dh, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, Lk, Dh, generator=g, dtype=torch.float64)
    mask = _random_mask((B, H, Lq, Lk), g) if masked else None
    ours = attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ours.shape == (B, H, Lq, Dh)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


def test_attention_with_broadcast_key_padding_mask_matches_sdpa_float64():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[True, True, False, False], [True, False, True, True]])[:, None, None, :]
    torch.testing.assert_close(attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=0, atol=1e-10)


def test_masked_keys_get_exactly_zero_weight():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64)
    mask = _random_mask((2, 2, 5, 6), g)
    mask[..., 2] = False                                    # key 2 is masked for every query
    out = attention(q, k, v, mask)
    k2, v2 = k.clone(), v.clone()
    k2[..., 2, :] = 1e3 * torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    v2[..., 2, :] = 1e6
    assert torch.equal(attention(q, k2, v2, mask), out)


def test_fully_masked_row_returns_exact_zeros_not_nan():
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 3, 4, generator=g)
    k, v = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    mask = torch.ones(1, 2, 3, 5, dtype=torch.bool)
    mask[0, 1, 2] = False                                   # head 1, query 2 sees nothing
    out = attention(q, k, v, mask)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0, 1, 2], torch.zeros(4))
    assert (out[0, 1, :2].abs() > 0).any()                  # the other rows are untouched
    torch.testing.assert_close(out[0, 0], attention(q, k, v)[0, 0])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_self_attention_is_permutation_equivariant(qk_norm):
    torch.manual_seed(10)
    mha = MultiHeadAttention(16, 4, qk_norm=qk_norm).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    perm = torch.randperm(7)
    out = mha(x)
    torch.testing.assert_close(mha(x[:, perm]), out[:, perm], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, perm], out)            # the permutation is not trivial


def test_cross_attention_ignores_padded_context_tokens():
    torch.manual_seed(11)
    mha = MultiHeadAttention(16, 2, context_dim=12).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    context = torch.randn(2, 6, 12, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False, False],
                         [True, True, True, True, True, False]])
    out = mha(x, context, mask)
    changed = context.clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 12, dtype=torch.float64)
    assert torch.equal(mha(x, changed, mask), out)
    changed_real = context.clone()
    changed_real[0, 0] += 1.0                               # a real token does matter
    assert not torch.allclose(mha(x, changed_real, mask)[0], out[0])


def _manual_mha(mha, x, context=None, mask=None):
    """Reference: the module's own weights, F.scaled_dot_product_attention for the core."""
    B, Lq, D = x.shape
    H = mha.heads
    if mha.is_cross:
        q = F.linear(x, mha.to_q.weight, mha.to_q.bias)
        kv = F.linear(context, mha.to_kv.weight, mha.to_kv.bias)
        k, v = kv[..., :D], kv[..., D:]
    else:
        qkv = F.linear(x, mha.to_qkv.weight, mha.to_qkv.bias)
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    q, k, v = (a.reshape(B, a.shape[1], H, D // H).permute(0, 2, 1, 3) for a in (q, k, v))
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = out.permute(0, 2, 1, 3).reshape(B, Lq, D)
    return F.linear(out, mha.proj.weight, mha.proj.bias)


def test_multihead_attention_matches_manual_sdpa_reference_float64():
    torch.manual_seed(12)
    self_attn = MultiHeadAttention(24, 3).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    torch.testing.assert_close(self_attn(x), _manual_mha(self_attn, x), rtol=0, atol=1e-10)

    cross = MultiHeadAttention(24, 4, context_dim=10).double()
    context = torch.randn(2, 7, 10, dtype=torch.float64)
    mask = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    torch.testing.assert_close(cross(x, context, mask), _manual_mha(cross, x, context, mask),
                               rtol=0, atol=1e-10)


def test_bf16_attention_within_one_percent_relative_of_fp32():
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 4, 16, 32, generator=g) for _ in range(3))
    mask = _random_mask((2, 4, 16, 16), g)
    for m in (None, mask):
        ref = attention(q, k, v, m)
        low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)
        assert low.dtype == torch.bfloat16
        assert (low.float() - ref).norm() / ref.norm() < 1e-2


def test_compile_fuses_hand_written_attention_under_autocast_self_and_masked_cross():
    """torch.compile rewrites our softmax(QK^T/sqrt(d))V into its fused SDPA kernel, also under
    bf16 autocast (attention() runs in one explicit dtype there) and with a key-padding mask."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    torch.manual_seed(0)
    self_attn = MultiHeadAttention(32, 2)
    cross_attn = MultiHeadAttention(32, 2, context_dim=16)
    x, y = torch.randn(2, 8, 32), torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])

    for name, fn in [("self", lambda x, y, m: self_attn(x)),
                     ("masked cross", lambda x, y, m: cross_attn(x, context=y, mask=m))]:
        counters.clear()
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.compile(fn)(x, y, mask)
            ref = fn(x, y, mask)
        assert counters["inductor"]["fuse_attention"] > 0, f"{name}-attention was not fused"
        assert out.dtype == torch.bfloat16
        assert (out.float() - ref.float()).norm() <= 2e-2 * ref.float().norm()
