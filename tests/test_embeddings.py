"""Tests for embeddings.py: the time embedding of slide "Encoding Time", patchify/unpatchify
(slide "Patchify") and the word-level prompt embedding from bytes."""

import math

import pytest
import torch
import torch.nn as nn

import shapes
from embeddings import (BOS_ID, HASH_BUCKETS, MORE_ID, PAD_ID, START_ID, W_MAX, W_MIN, WORD_BYTES,
                        PatchEmbedding, PromptEmbedding, ngram_ids, null_prompt, patchify,
                        prompt_as_read, prompt_is_truncated, prompt_length, prompt_pieces,
                        prompt_words, time_embedding, time_frequencies, tokenize, unpatchify)


# ---------------------------------------------------------------------------------------------
# time

@pytest.mark.parametrize("dim", [4, 16, 64, 256])
def test_time_embedding_has_unit_norm(dim):
    t = torch.cat([torch.rand(50, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)])
    e = time_embedding(t, dim)
    assert e.shape == (52, dim)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(52, dtype=torch.float64), rtol=0, atol=1e-6)
    e32 = time_embedding(t.float(), dim)
    torch.testing.assert_close(e32.norm(dim=1), torch.ones(52), rtol=0, atol=1e-6)
    # Apple's MPS has no float64: its phases are float32, off by up to 1e-4 rad (of 628)
    mps = time_embedding(t.float(), dim, phase_dtype=torch.float32)
    exact = time_embedding(t.float().double(), dim)                  # the same t, float64 phases
    assert mps.dtype == torch.float32 and not torch.equal(mps, e32)     # the float32 path ran
    torch.testing.assert_close(mps.double(), exact, rtol=0, atol=1e-4 * (2 / dim) ** 0.5)


@pytest.mark.parametrize("dim", [64, 256])
def test_time_embedding_endpoints_are_far_apart_with_default_frequencies(dim):
    e = time_embedding(torch.tensor([0.0, 1.0], dtype=torch.float64), dim)
    assert (e[0] @ e[1]).item() < 0.5                        # both have norm 1: this is the cosine


def test_time_embedding_distinguishes_steps_of_001_across_unit_interval():
    t = torch.linspace(0, 0.99, 100, dtype=torch.float64)
    delta = time_embedding(t + 0.01, 256) - time_embedding(t, 256)
    assert delta.norm(dim=1).min() > 0.1


@pytest.mark.parametrize("dim", [4, 10, 64])
def test_time_frequencies_are_the_slides_geometric_sequence(dim):
    w = time_frequencies(dim)
    assert w.shape == (dim // 2,)
    assert math.isclose(w[0].item(), W_MIN, rel_tol=1e-12)
    assert math.isclose(w[-1].item(), W_MAX, rel_tol=1e-12)
    ratio = (W_MAX / W_MIN) ** (1 / (dim // 2 - 1))
    torch.testing.assert_close(w[1:] / w[:-1], torch.full((dim // 2 - 1,), ratio, dtype=torch.float64),
                               rtol=1e-12, atol=0)
    w2 = time_frequencies(dim, 1.0, 8.0)
    assert math.isclose(w2[0].item(), 1.0) and math.isclose(w2[-1].item(), 8.0)


def test_time_embedding_layout_is_cos_half_then_sin_half():
    dim = 12
    t = torch.tensor([0.0, 0.37, 0.9], dtype=torch.float64)
    w = time_frequencies(dim)
    angle = 2 * math.pi * t[:, None] * w[None, :]
    c = math.sqrt(2 / dim)
    e = time_embedding(t, dim)
    torch.testing.assert_close(e[:, :dim // 2], c * torch.cos(angle), rtol=0, atol=1e-12)
    torch.testing.assert_close(e[:, dim // 2:], c * torch.sin(angle), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# patchify

@pytest.mark.parametrize("C,H,W,p", [(3, 8, 12, 2), (1, 6, 4, 2), (4, 9, 3, 3), (2, 4, 4, 4)])
def test_patchify_and_unpatchify_round_trip_exactly(C, H, W, p):
    x = torch.randn(2, C, H, W)
    tokens = patchify(x, p)
    assert tokens.shape == (2, (H // p) * (W // p), p * p * C)
    assert torch.equal(unpatchify(tokens, p, H, W), x)
    tok = torch.randn(2, (H // p) * (W // p), p * p * C)
    assert torch.equal(patchify(unpatchify(tok, p, H, W), p), tok)


def test_patchify_token_k_holds_patch_at_divmod_k_in_p_p_c_order():
    B, C, H, W, p = 2, 3, 6, 10, 2
    x = torch.randn(B, C, H, W)
    tokens = patchify(x, p)
    for k in range(tokens.shape[1]):
        row, col = divmod(k, W // p)
        patch = x[:, :, row * p:(row + 1) * p, col * p:(col + 1) * p]   # (B, C, p, p)
        assert torch.equal(tokens[:, k], patch.permute(0, 2, 3, 1).reshape(B, -1))


@pytest.mark.parametrize("H,W", [(7, 8), (8, 5)])
def test_size_not_divisible_by_patch_raises_value_error_naming_patch_size(H, W):
    with pytest.raises(ValueError, match="patch size 2"):
        patchify(torch.zeros(1, 3, H, W), 2)
    with pytest.raises(ValueError, match="patch size 2"):
        unpatchify(torch.zeros(1, 12, 12), 2, H, W)
    with pytest.raises(ValueError, match="patch size 2"):
        PatchEmbedding(3, 2, 16, H, W)


def test_linear_on_patches_equals_strided_conv_float64():
    torch.manual_seed(0)
    C, p, dim = 3, 2, 5
    conv = nn.Conv2d(C, dim, kernel_size=p, stride=p).double()
    lin = nn.Linear(p * p * C, dim).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(dim, -1))   # (dim, p, p, C) flat
        lin.bias.copy_(conv.bias)
    x = torch.randn(2, C, 6, 8, dtype=torch.float64)
    via_conv = conv(x).flatten(2).transpose(1, 2)                          # (B, L, dim)
    torch.testing.assert_close(lin(patchify(x, p)), via_conv, rtol=0, atol=1e-12)


def test_patch_embedding_positions_are_non_persistent_distinct_and_non_square():
    emb = PatchEmbedding(in_channels=4, patch_size=2, dim=16, height=8, width=12)
    assert "pos" not in emb.state_dict() and "pos" in dict(emb.named_buffers())
    pos = emb.pos[0]                                                       # (L, dim)
    assert pos.shape == (4 * 6, 16)
    assert torch.cdist(pos, pos).add(torch.eye(24) * 1e9).min() > 1e-3    # all rows distinct
    x = torch.randn(2, 4, 8, 12)
    out = emb(x)
    assert out.shape == (2, 24, 16)
    torch.testing.assert_close(out, emb.proj(patchify(x, 2)) + pos)
    with pytest.raises(ValueError, match="8x12"):
        emb(torch.randn(2, 4, 12, 8))            # same number of patches, transposed layout


# ---------------------------------------------------------------------------------------------
# prompts

def _real_tokens(tokens):
    """The tokens of one prompt (S, W) that are not padding, as lists of their ids."""
    return [[i for i in token if i != PAD_ID] for token in tokens.tolist() if token[0] != PAD_ID]


def _text(pieces):
    """The UTF-8 bytes that pieces of ids hold (MORE_ID dropped)."""
    return bytes(i - 1 for piece in pieces for i in piece if i != MORE_ID)


@pytest.mark.parametrize("prompt", ["a red circle", "🎨🐈‍⬛ emoji", "汉字とかな", "e\u0301 combining",
                                    "flag: Japan!", ""])
def test_tokenize_gives_bos_then_one_token_per_word_and_keeps_every_byte(prompt):
    tokens = tokenize([prompt], max_len=16)[0]                           # (S, W)
    assert tokens.shape == (16, WORD_BYTES)
    assert tokens[0].tolist() == [BOS_ID] + [PAD_ID] * (WORD_BYTES - 1)
    pieces = prompt_pieces(prompt)                     # words; one over 12 bytes goes on
    assert _real_tokens(tokens) == [[BOS_ID]] + pieces                   # in order, nothing lost
    assert _text(pieces).decode("utf-8") == "".join(prompt.split())
    lengths = [len(w.encode("utf-8")) for w in prompt_words(prompt)]     # 12, then 11 per token
    assert len(pieces) == sum(1 + max(0, -(-(n - WORD_BYTES) // (WORD_BYTES - 1))) for n in lengths)
    for token in tokens.tolist():                                        # PAD only at the end
        n = sum(i != PAD_ID for i in token)
        assert all(i != PAD_ID for i in token[:n]) and max(token) <= MORE_ID


def test_prompt_words_split_at_spaces_and_punctuation_in_any_script():
    assert prompt_words("flag: Japan!") == ["flag", ":", "Japan", "!"]
    assert prompt_words("  a red\tcircle  ") == ["a", "red", "circle"]
    assert prompt_words("汉字 とかな 🎨cat") == ["汉字", "とかな", "🎨", "cat"]
    assert prompt_words("") == []


def _ids(text):
    return [b + 1 for b in text.encode("utf-8")]


def test_a_long_word_goes_on_in_tokens_marked_more_and_truncation_is_reported():
    word = "abcdefghijklmnopqrstuvwxyz"                                  # 26 bytes: 12 + 11 + 3
    more = [MORE_ID] + _ids(word[12:23])
    assert prompt_pieces(f"a {word}", 12) == [_ids("a"), _ids(word[:12]), more,
                                              [MORE_ID] + _ids(word[23:])]
    tokens = tokenize([f"a {word}"], max_len=4, word_bytes=12)[0]
    assert _real_tokens(tokens) == [[BOS_ID], _ids("a"), _ids(word[:12]), more]
    assert prompt_is_truncated(f"a {word}", 4) and not prompt_is_truncated(f"a {word}", 5)
    assert prompt_as_read("a small red circle", 3) == "a small"
    assert prompt_as_read(f"a {word} b", 4) == f"a {word[:23]}"            # one word, two tokens
    assert prompt_is_truncated("a small red circle", 4)
    assert not prompt_is_truncated("a small red circle", 5)
    # a word of 16 bytes is not the two words of 12 and 4 bytes it is cut into
    assert not torch.equal(tokenize(["abcdefghijklmnop"], 4), tokenize(["abcdefghijkl mnop"], 4))
    null = null_prompt(8)                                                 # CFG's null condition
    assert null.shape == (1, 8, WORD_BYTES) and null[0, 0, 0] == BOS_ID and null.sum() == BOS_ID


def test_prompt_length_reads_the_longest_caption_whole_in_a_multiple_of_8_tokens():
    captions = ["a red circle", "one two three four five six seven eight nine"]     # 3 and 9 words
    assert prompt_length(captions) == (16, 10)               # BOS + 9 words, rounded up to 16
    assert not any(prompt_is_truncated(c, 16) for c in captions)
    assert prompt_length(["a " + "abcdefghijklmnopqrstuvwxyz"], 12) == (8, 5)  # 1 + 1 + 3 pieces
    assert prompt_length(["w " * 1000]) == (256, 1001)                         # capped at 256


def test_every_built_in_caption_is_at_most_15_tokens():
    """The issue's bar is 20; the longest caption (two objects) has 14 words."""
    _, captions, _ = shapes.render_shapes(300)
    lengths = [1 + len(prompt_pieces(c)) for c in captions]
    assert max(lengths) == 15 and min(lengths) == 9


def _reference_features(ids):
    """The features of one token's ids, by the definition, one by one in Python: the n-grams
    (n = 1, 2, 3) of "<" + ids + ">" (a unigram is an id) and the whole token, each a polynomial
    hash seeded with n (0 for the whole token), scrambled, then taken modulo the buckets."""
    def bucket(seed, gram):
        h = seed
        for x in gram:
            h = (h * 263 + x) % 1_000_003
        h ^= h >> 15
        h = (h * 0x2C1B3C6D) % 2 ** 32
        return (h ^ (h >> 12)) % HASH_BUCKETS
    marked = [START_ID] + ids + [PAD_ID]                                  # PAD plays ">"
    grams = [(n, marked[j:j + n]) for n in (1, 2, 3) for j in range(len(marked) - n + 1)]
    return sorted([bucket(n, g) for n, g in grams if n > 1 or g[0] not in (START_ID, PAD_ID)]
                  + [bucket(0, ids)])


def test_ngram_ids_are_the_tokens_hashed_ngrams_and_whole_token():
    prompt = "a red circle left of \u6c49\u5b57 abcdefghijkl abcdefghijklm"
    tokens = tokenize([prompt, ""], max_len=12)                           # (2, 12, W)
    ids, real = ngram_ids(tokens, HASH_BUCKETS)                          # (2, 12, G) each
    pieces = prompt_pieces(prompt)                    # 8 words; the 13-byte one in 2 tokens
    assert len(pieces) == 9 and pieces[-1] == [MORE_ID, ord("m") + 1]
    for k, piece in enumerate(pieces, start=1):
        got = sorted(ids[0, k][real[0, k]].tolist())
        assert got == _reference_features(piece)
        assert len(got) == 3 * len(piece) + 2                            # L + (L+1) + L + 1
    assert real[1, 1:].sum() == 0 and real[0, 1 + len(pieces):].sum() == 0   # padding has none
    assert real[1, 0].sum() == 5                                          # BOS: like a 1-byte word
    assert ids.shape[-1] == 3 * WORD_BYTES + 4


def test_prompt_embedding_padding_does_not_change_valid_outputs_or_pooled():
    torch.manual_seed(1)
    enc = PromptEmbedding(dim=16, depth=2, heads=2, max_len=24).double().eval()
    short = "a black cat"
    alone = tokenize([short], max_len=4)                                  # no padding at all
    both = tokenize([short, "a much longer prompt than the short one"], max_len=24)
    y1, mask1, pooled1 = enc(alone)
    y2, mask2, pooled2 = enc(both)
    assert mask1.all() and mask2[0].sum() == 4 and mask2[1].sum() == 9
    torch.testing.assert_close(y2[0, :4], y1[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled2[0], pooled1[0], rtol=0, atol=1e-12)
    assert not torch.allclose(pooled2[1], pooled2[0])


def test_empty_prompt_has_one_valid_token_and_a_distinct_output():
    torch.manual_seed(2)
    enc = PromptEmbedding(dim=16, depth=1, heads=2, max_len=12).eval()
    tokens = tokenize(["", "a", "blue square"], max_len=12)
    y, mask, pooled = enc(tokens)
    assert mask[0].tolist() == [True] + [False] * 11
    assert torch.isfinite(y).all() and torch.isfinite(pooled).all()
    for i in (1, 2):
        assert (pooled[0] - pooled[i]).norm() > 1e-3


def test_a_word_embeds_the_same_wherever_it_stands_and_unseen_words_share_ngrams():
    """Before the attention layers (depth 0) a token is its own n-grams plus its position:
    "circle" after "red" and after "blue" gives the same vector, and at another position it
    differs only by the position's; an unseen "circles" shares most n-grams with "circle"."""
    torch.manual_seed(4)
    enc = PromptEmbedding(dim=16, depth=0, heads=2, max_len=8).double().eval()
    y, mask, _ = enc(tokenize(["a red circle", "a blue circle", "a circle"], 8))
    assert mask.sum(1).tolist() == [4, 4, 3]                             # BOS | a | red | circle
    torch.testing.assert_close(y[0, 3], y[1, 3], rtol=0, atol=1e-12)
    assert not torch.allclose(y[0, 2], y[1, 2])                          # "red" and "blue" differ
    assert not torch.allclose(y[2, 2], y[0, 3])                          # other positions ...
    with torch.no_grad():
        enc.pos.zero_()
    y, _, _ = enc(tokenize(["a red circle", "a circle"], 8))
    torch.testing.assert_close(y[1, 2], y[0, 3], rtol=0, atol=1e-12)     # ... only by position
    ids, real = ngram_ids(tokenize(["circle circles square"], 4), HASH_BUCKETS)
    circle, circles, square = (set(ids[0, k][real[0, k]].tolist()) for k in (1, 2, 3))
    assert len(circle & circles) >= 14 and len(circle & square) == 3   # r, e, "e>"
