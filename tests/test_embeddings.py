"""Tests for embeddings.py: the time embedding of slide "Encoding Time", patchify/unpatchify
(slide "Patchify") and the byte-level prompt embedding."""

import math

import pytest
import torch
import torch.nn as nn

from embeddings import (BOS_ID, PAD_ID, VOCAB_SIZE, PatchEmbedding, PromptEmbedding, W_MAX,
                        W_MIN, null_prompt, patchify, prompt_as_read, prompt_ids,
                        prompt_is_truncated, prompt_words, time_embedding, time_frequencies,
                        tokenize, unpatchify)


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

@pytest.mark.parametrize("prompt", ["a red circle", "🎨🐈‍⬛ emoji", "汉字とかな", "e\u0301 combining", ""])
def test_tokenize_round_trips_any_unicode_through_bytes(prompt):
    tokens = tokenize([prompt], max_len=64)[0]
    assert tokens[0] == BOS_ID
    body = tokens[1:]
    ids = body[body != PAD_ID]
    assert (ids >= 1).all() and (ids <= 256).all() and (tokens < VOCAB_SIZE).all()
    assert bytes((ids - 1).tolist()).decode("utf-8") == prompt
    n = len(prompt.encode("utf-8"))
    assert (body[n:] == PAD_ID).all()                                     # padding after the bytes


def test_tokenize_truncates_at_max_len_and_reports_it():
    prompt = "abcdefghij"
    tokens = tokenize([prompt, "ab"], max_len=5)
    assert tokens.shape == (2, 5)
    assert tokens[0].tolist() == [BOS_ID] + [b + 1 for b in b"abcd"]
    assert tokens[1].tolist() == [BOS_ID, ord("a") + 1, ord("b") + 1, PAD_ID, PAD_ID]
    assert prompt_is_truncated(prompt, 5)
    assert not prompt_is_truncated(prompt, 11)                            # 10 bytes + BOS fit
    assert prompt_is_truncated(prompt, 10)
    assert prompt_is_truncated("é", 2) and not prompt_is_truncated("é", 3)   # 2 bytes


def test_prompt_embedding_padding_does_not_change_valid_outputs_or_pooled():
    torch.manual_seed(1)
    enc = PromptEmbedding(dim=16, depth=2, heads=2, max_len=24).double().eval()
    short = "cat"
    alone = tokenize([short], max_len=len(short) + 1)                       # no padding at all
    both = tokenize([short, "a much longer prompt"], max_len=24)
    y1, mask1, pooled1 = enc(alone)
    y2, mask2, pooled2 = enc(both)
    assert mask1.all() and mask2[0].sum() == len(short) + 1
    torch.testing.assert_close(y2[0, :len(short) + 1], y1[0], rtol=0, atol=1e-12)
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


@pytest.mark.parametrize("r", [2, 4])
def test_merged_byte_tokens_keep_padding_invariance_and_shorten_the_sequence(r):
    """With bytes_per_token = r the encoder sees ceil(S / r) tokens; extra padding still
    changes nothing for the real tokens, and a group is real when any of its bytes is."""
    torch.manual_seed(3)
    enc = PromptEmbedding(dim=16, depth=2, heads=2, max_len=32, bytes_per_token=r).double().eval()
    short = "a red cat"                                        # 9 bytes + BOS = 10
    alone = tokenize([short], max_len=10)                      # 10 is not a multiple of 4: padded
    both = tokenize([short, "a much longer prompt than that"], max_len=32)
    y1, mask1, pooled1 = enc(alone)
    y2, mask2, pooled2 = enc(both)
    n = math.ceil(10 / r)
    assert y1.shape[1] == n and y2.shape[1] == 32 // r
    assert mask1.all() and mask2[0].sum() == n
    torch.testing.assert_close(y2[0, :n], y1[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(pooled2[0], pooled1[0], rtol=0, atol=1e-12)
    y, mask, _ = enc(tokenize([""], max_len=32))
    assert mask[0].tolist() == [True] + [False] * (32 // r - 1)   # BOS keeps the null prompt real


# ---------------------------------------------------------------------------------------------
# prompt tokens that follow the words (word_group > 0)

def _check_word_groups(ids, words, r):
    """The properties of word-aligned ids, checked without re-deriving them: BOS alone in the
    first group; the bytes in order are the words' bytes; each group holds bytes of one word
    only, PAD only at its end; each word starts a group."""
    assert ids[0] == BOS_ID and all(i == PAD_ID for i in ids[1:r])
    data = [i - 1 for i in ids if i not in (PAD_ID, BOS_ID)]
    assert bytes(data) == "".join(words).encode("utf-8")
    owner = [w for w, word in enumerate(words) for _ in word.encode("utf-8")]   # byte -> word
    k, starts = 0, []
    for g in range(r, len(ids), r):
        group = ids[g:g + r]
        real = [i for i in group if i != PAD_ID]
        assert group[:len(real)] == real                      # PAD only after the bytes
        assert len({owner[k + j] for j in range(len(real))}) == 1
        if k == 0 or owner[k] != owner[k - 1]:
            starts.append(owner[k])
        k += len(real)
    assert starts == list(range(len(words)))                  # every word opens a group


def test_prompt_words_split_at_spaces_and_punctuation_in_any_script():
    assert prompt_words("flag: Japan!") == ["flag", ":", "Japan", "!"]
    assert prompt_words("  a red\tcircle  ") == ["a", "red", "circle"]
    assert prompt_words("汉字 とかな 🎨cat") == ["汉字", "とかな", "🎨", "cat"]
    assert prompt_words("") == []


@pytest.mark.parametrize("r", [2, 4, 8])
@pytest.mark.parametrize("prompt", ["a red circle", "a blue circle left of a green circle",
                                    "flag: Japan", "汉字 とかな 🎨 cat", "abcd efgh", ""])
def test_word_groups_start_every_word_at_a_group_and_keep_its_bytes(prompt, r):
    ids = prompt_ids(prompt, r)
    _check_word_groups(ids, prompt_words(prompt), r)
    tokens = tokenize([prompt], max_len=len(ids) + 3, word_group=r)[0]
    assert tokens[:len(ids)].tolist() == ids and (tokens[len(ids):] == PAD_ID).all()
    assert not prompt_is_truncated(prompt, len(ids), r)
    assert prompt_as_read(prompt, len(ids), r) == " ".join(prompt_words(prompt))


def test_a_word_is_the_same_tokens_wherever_it_stands_with_word_groups_and_not_without():
    r = 4
    prompts = ["a red circle", "a blue circle", "a large yellow circle right of a circle"]
    seen = set()
    for prompt in prompts:
        ids = tokenize([prompt], 64, r)[0].tolist()            # padded: whole groups
        groups = [tuple(ids[k:k + r]) for k in range(0, len(ids), r)]
        starts = [k for k in range(r, len(ids), r) if ids[k] == ord("c") + 1
                  and bytes(i - 1 for i in ids[k:k + 6]) == b"circle"]
        assert starts
        seen |= {tuple(groups[k // r:k // r + 2]) for k in starts}
    assert len(seen) == 1                                  # "circ" + "le": one pair of tokens
    plain = set()
    for prompt in prompts:                                 # 4-byte groups of the plain bytes
        ids = prompt_ids(prompt)
        k = bytes(i - 1 for i in ids[1:]).index(b"circle") + 1
        plain.add(tuple(ids[k // r * r:(k + 6) // r * r + r]))
    assert len(plain) > 1                                  # cut differently in each prompt


def test_word_groups_truncate_whole_groups_and_keep_the_null_prompt():
    prompt = "a small red circle"          # BOS|a|smal l|red|circ le -> 18 ids with r = 4
    ids = prompt_ids(prompt, 4)
    assert len(ids) == 4 + 4 + 8 + 4 + 6
    assert prompt_is_truncated(prompt, len(ids) - 1, 4) and not prompt_is_truncated(prompt, len(ids), 4)
    assert prompt_as_read(prompt, 12, 4) == "a smal"
    assert prompt_as_read(prompt, 20, 4) == "a small red"
    assert tokenize([prompt], 12, 4)[0].tolist() == ids[:12]
    for r in (0, 2, 4):
        assert torch.equal(tokenize([""], 16, r), null_prompt(16))    # CFG's null condition


def test_the_encoder_embeds_a_word_apart_from_its_neighbours_with_word_groups():
    """Before the attention layers (depth 0) a token sees only its own bytes and position:
    with word groups, "circle" after "red" and after "blue" (same word position) gives the same
    vectors; with plain 4-byte groups it does not."""
    torch.manual_seed(4)
    enc = PromptEmbedding(dim=16, depth=0, heads=2, max_len=24, bytes_per_token=4).double().eval()
    y, mask, _ = enc(tokenize(["a red circle", "a blue circle"], 24, word_group=4))
    assert mask.sum(1).tolist() == [5, 5]                  # BOS | a | red | circ | le
    torch.testing.assert_close(y[0, 3:5], y[1, 3:5], rtol=0, atol=1e-12)
    assert not torch.allclose(y[0, 2], y[1, 2])            # "red" and "blue" differ
    b, _, _ = enc(tokenize(["a red circle", "a blue circle"], 24))
    assert not torch.allclose(b[0, 3], b[1, 3])            # plain bytes: "irc" vs " cir"


def test_word_groups_of_one_byte_are_refused():
    with pytest.raises(ValueError, match="2 or more bytes"):
        prompt_ids("a red circle", 1)
