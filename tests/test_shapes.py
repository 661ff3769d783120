"""Tests for shapes.py: the rendered dataset, its captions, and the attribute checker that reads
them back from pixels."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shapes import (BACKGROUNDS, COLORS, HELD_OUT_PAIRS, SHAPES, SIZES, attributes_to_caption,
                    held_out_objects, parse_caption, read_attributes, render_shape_image,
                    render_shapes, score_attributes)


@pytest.fixture(scope="module")
def shapes32():
    """Images (2000, 3, 32, 32) uint8, captions and attributes of stream 3."""
    return _rendered(2000, seed=3, image_size=32)


def _rendered(n, seed, image_size):
    images, captions, attributes = render_shapes(n, seed, image_size)
    return SimpleNamespace(images=images, captions=captions, attributes=attributes)


def test_render_is_deterministic_from_seed_and_index():
    a, cap_a, attrs_a = render_shape_image(5, 17)
    b, cap_b, attrs_b = render_shape_image(5, 17)
    assert a.mode == "RGB" and a.size == (32, 32)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert cap_a == cap_b and attrs_a == attrs_b


def test_render_differs_across_index_and_seed():
    base = np.asarray(render_shape_image(5, 17)[0])
    assert not np.array_equal(base, np.asarray(render_shape_image(5, 18)[0]))
    assert not np.array_equal(base, np.asarray(render_shape_image(6, 17)[0]))


def test_render_sizes_64_and_rejects_bad_sizes():
    img, _, _ = render_shape_image(0, 0, image_size=64)
    assert img.size == (64, 64)
    for bad in (20, 8, 136):
        with pytest.raises(ValueError, match="multiple of 8"):
            render_shape_image(0, 0, image_size=bad)


def test_caption_parses_back_to_the_attributes(shapes32):
    for caption, attrs in zip(shapes32.captions, shapes32.attributes):
        assert parse_caption(caption) == attrs
        assert attributes_to_caption(attrs) == caption
    assert shapes32.captions[0].startswith("a ") and shapes32.captions[0].endswith("background")
    assert parse_caption("a photo of a cat") is None
    assert parse_caption("a small red blob on a white background") is None


def test_caption_examples_have_the_documented_form():
    one = {"background": "white", "objects": [
        {"shape": "circle", "color": "red", "size": "small", "position": "center"}]}
    two = {"background": "white", "objects": [
        {"shape": "circle", "color": "red", "size": "small", "position": "left"},
        {"shape": "square", "color": "blue", "size": "large", "position": "right"}]}
    assert attributes_to_caption(one) == "a small red circle on a white background"
    assert attributes_to_caption(two) == \
        "a small red circle left of a large blue square on a white background"


def test_every_shape_colour_size_background_and_count_occurs(shapes32):
    objs = [o for a in shapes32.attributes for o in a["objects"]]
    assert len(SHAPES) >= 5 and len(COLORS) == 8 and len(SIZES) == 2 and len(BACKGROUNDS) >= 3
    assert {o["shape"] for o in objs} == set(SHAPES)
    assert {o["color"] for o in objs} == set(COLORS)
    assert {o["size"] for o in objs} == set(SIZES)
    assert {a["background"] for a in shapes32.attributes} == set(BACKGROUNDS)
    counts = [len(a["objects"]) for a in shapes32.attributes]
    assert set(counts) == {1, 2} and 0.4 < counts.count(1) / len(counts) < 0.6


def test_two_objects_are_ordered_left_right_and_do_not_touch(shapes32):
    for i in range(300):
        attrs = shapes32.attributes[i]
        if len(attrs["objects"]) != 2:
            continue
        assert [o["position"] for o in attrs["objects"]] == ["left", "right"]
        bg = torch.tensor(BACKGROUNDS[attrs["background"]], dtype=torch.int32)
        differs = (shapes32.images[i].permute(1, 2, 0).int() - bg).abs().sum(-1) > 0  # (H, W)
        cols = differs.any(0)
        assert not cols[15:17].all(), "expected empty columns between the two objects"


def test_palette_colours_are_far_apart_and_far_from_backgrounds():
    cols = np.array(list(COLORS.values()), dtype=float)
    bgs = np.array(list(BACKGROUNDS.values()), dtype=float)
    pair = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + 1e9 * np.eye(len(cols))
    assert pair.min() > 80
    assert np.linalg.norm(cols[:, None] - bgs[None], axis=-1).min() > 100


def _accuracy(images, attributes):
    totals = {}
    for img, target in zip(images, attributes):
        for k, v in score_attributes(read_attributes(img), target).items():
            totals[k] = totals.get(k, 0.0) + v
    return {k: v / len(attributes) for k, v in totals.items()}


def test_checker_is_99_percent_right_on_600_images_at_32px(shapes32):
    acc = _accuracy(shapes32.images[:600], shapes32.attributes[:600])
    assert set(acc) == {"shape", "color", "size", "count", "background", "position"}
    assert min(acc.values()) >= 0.99, acc


def test_checker_is_99_percent_right_on_120_images_at_64px():
    s = _rendered(120, seed=9, image_size=64)
    acc = _accuracy(s.images, s.attributes)
    assert min(acc.values()) >= 0.99, acc


def test_checker_tolerates_mild_noise(shapes32):
    g = torch.Generator().manual_seed(0)
    noisy = (shapes32.images[:200].float() + 8 * torch.randn(200, 3, 32, 32, generator=g))
    noisy = noisy.clamp(0, 255).round().to(torch.uint8)
    acc = _accuracy(noisy, shapes32.attributes[:200])
    assert min(acc.values()) >= 0.95, acc


def test_checker_gives_same_answer_for_pil_numpy_and_torch_inputs():
    img, _, attrs = render_shape_image(1, 3)
    hwc = np.array(img)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    assert read_attributes(img) == read_attributes(hwc) == read_attributes(chw) == attrs


def test_checker_does_not_raise_on_noise_and_finds_nothing_on_uniform_images():
    rng = np.random.default_rng(0)
    for size in (32, 64):
        out = read_attributes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        assert isinstance(out, dict) and "objects" in out
    for rgb in [(255, 255, 255), (0, 0, 0), (77, 200, 13)]:
        out = read_attributes(np.full((32, 32, 3), rgb, dtype=np.uint8))
        assert out["objects"] == []
    assert read_attributes(np.full((32, 32, 3), 255, np.uint8))["background"] == "white"


def test_score_attributes_counts_matches_in_order():
    target = parse_caption("a small red circle left of a large blue square on a white background")
    perfect = score_attributes(target, target)
    assert perfect == {k: 1.0 for k in perfect} and len(perfect) == 6
    wrong = {"background": "black", "objects": [dict(target["objects"][0])]}
    s = score_attributes(wrong, target)
    assert s["count"] == 0.0 and s["background"] == 0.0
    assert s["shape"] == s["color"] == s["size"] == 0.5
    empty = {"background": "white", "objects": []}
    assert score_attributes(empty, empty)["shape"] == 1.0
    assert score_attributes(target, empty)["count"] == 0.0


def test_held_out_pairs_leave_every_colour_and_shape_partners_and_are_read_from_captions(shapes32):
    pairs = set(HELD_OUT_PAIRS)
    assert len(pairs) == len(HELD_OUT_PAIRS) == 8 and pairs <= {(c, s) for c in COLORS for s in SHAPES}
    assert all(sum((c, s) not in pairs for s in SHAPES) == 4 for c in COLORS)
    assert all(sum((c, s) not in pairs for c in COLORS) >= 6 for s in SHAPES)
    for caption, attrs in zip(shapes32.captions, shapes32.attributes):   # from the words alone
        objects = re.findall(r"a \w+ (\w+) (\w+)", caption.split(" on a ")[0])
        assert held_out_objects(attrs) == [j for j, pair in enumerate(objects) if pair in pairs]
    shown = sum(bool(held_out_objects(a)) for a in shapes32.attributes) / len(shapes32.attributes)
    assert 0.24 < shown < 0.32      # 1/2 x 8/40 + 1/2 x (1 - (32/40)^2) = 0.28 of the images
