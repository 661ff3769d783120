"""Tests for data.py: image sets, grids, the built-in splits, folder loading and cache keys."""

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import (DataError, build_shapes, dataset_key, from_model_range, grid_scale,
                  images_to_grid, load_dataset, load_folder, save_grid, to_model_range)
import data as data_lib
from shapes import render_shape_image


def test_build_shapes_equals_render_and_makes_uint8_nchw():
    s = build_shapes(5, seed=2, image_size=32)
    assert s.images.dtype == torch.uint8 and s.images.shape == (5, 3, 32, 32)
    assert len(s) == 5 and s.name == "shapes-32-seed2"
    img, cap, attrs = render_shape_image(2, 4, 32)
    assert torch.equal(s.images[4], torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert s.captions[4] == cap and s.attributes[4] == attrs
    with pytest.raises(DataError, match="multiple of 8"):     # a user mistake, not a crash
        build_shapes(2, image_size=20)


def test_imageset_subset_and_model_range_round_trip():
    s = build_shapes(6, seed=0)
    sub = s.subset([4, 1])
    assert len(sub) == 2 and torch.equal(sub.images[0], s.images[4])
    assert sub.captions == [s.captions[4], s.captions[1]]
    assert sub.attributes == [s.attributes[4], s.attributes[1]]
    x = s.to_float()
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(from_model_range(to_model_range(s.images)), s.images)
    assert torch.equal(from_model_range(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255],
                                                                                 dtype=torch.uint8))


def test_grid_has_two_pixel_padding_and_accepts_float(tmp_path):
    s = build_shapes(5, seed=0)
    grid = images_to_grid(s.images, nrow=3)
    assert grid.size == (3 * 32 + 2 * 2, 2 * 32 + 2)
    assert np.array_equal(np.asarray(grid)[:32, :32], s.images[0].permute(1, 2, 0).numpy())
    assert images_to_grid(s.to_float(), nrow=3).size == grid.size
    save_grid(tmp_path / "out" / "grid.png", s.images, nrow=5)
    assert Image.open(tmp_path / "out" / "grid.png").size == (5 * 32 + 4 * 2, 32)


def test_grid_scale_draws_small_images_at_about_64_pixels_each_pixel_a_block(tmp_path):
    assert [grid_scale(n) for n in (16, 32, 48, 64, 256)] == [4, 2, 1, 1, 1]
    s = build_shapes(2, seed=1)
    save_grid(tmp_path / "g.png", s.images, nrow=2, scale=grid_scale(32))
    big = np.asarray(Image.open(tmp_path / "g.png"))                    # (64, 130, 3)
    assert big.shape == (64, 2 * 64 + 2, 3)
    first = s.images[0].permute(1, 2, 0).numpy()
    assert np.array_equal(big[:64:2, :64:2], first) and np.array_equal(big[1:64:2, 1:64:2], first)


def _save(img: Image.Image, path: Path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


@pytest.fixture
def image_folder(tmp_path):
    """A folder with every awkward mode, sidecar captions, class folders and 2 bad files."""
    root = tmp_path / "imgs"
    n = 16
    _save(Image.new("RGB", (n, n), (10, 200, 30)), root / "0a_rgb.png")
    (root / "0a_rgb.txt").write_text("  un chat très mignon 🐱\n", encoding="utf-8")
    rgba = Image.new("RGBA", (n, n), (0, 0, 0, 0))  # right half fully transparent black
    rgba.paste((200, 0, 0, 255), (0, 0, n // 2, n))
    _save(rgba, root / "0b_rgba.png")
    _save(Image.new("RGB", (n, n), (0, 0, 250)).quantize(4), root / "0c_p.png")
    _save(Image.new("L", (n, n), 100), root / "0d_l.png")
    one = Image.new("1", (n, n), 0)
    one.paste(1, (0, 0, n, n // 2))
    _save(one, root / "0e_one.png")
    _save(Image.new("CMYK", (n, n), (0, 255, 255, 0)), root / "0f_cmyk.jpg", quality=95)
    i16 = np.full((n, n), 65535, dtype=np.uint16)
    i16[:, n // 2:] = 128 * 257
    _save(Image.fromarray(i16), root / "0g_i16.png")
    wide = Image.new("RGB", (3 * n, n), (255, 0, 0))  # red | green | blue thirds
    wide.paste((0, 255, 0), (n, 0, 2 * n, n))
    wide.paste((0, 0, 255), (2 * n, 0, 3 * n, n))
    _save(wide, root / "0h_wide.png")
    gif = Image.new("P", (n, n), 0)  # palette 0 = yellow, 1 = black but transparent
    gif.putpalette([250, 250, 0, 0, 0, 0])
    gif.paste(1, (0, 0, n // 2, n))
    _save(gif, root / "0i_anim.GIF", transparency=1)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    _save(Image.fromarray(noise), root / "0j_full.png")
    (root / "0k_truncated.png").write_bytes((root / "0j_full.png").read_bytes()[:3000])
    (root / "0l_garbage.png").write_bytes(b"this is not an image at all")
    _save(Image.new("RGB", (n, n), (9, 9, 9)), root / "cats_and-dogs" / "x.png")
    _save(Image.new("RGB", (n, n), (9, 9, 9)), root / "birds" / "deep" / "y.webp")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_converts_every_mode_to_rgb_and_skips_bad_files_with_one_warning(image_folder, capsys):
    s = load_folder(image_folder, 16)
    assert capsys.readouterr().err == ""                     # the scripts print it, once
    assert len(s.warnings) == 1 and "skipped 2 unreadable" in s.warnings[0], s.warnings
    assert "0k_truncated.png" in s.warnings[0] and "2 unreadable files skipped" in s.summary
    assert s.attributes is None and s.images.shape == (12, 3, 16, 16)
    # sorted by relative path: 0a..0j, then birds/deep/y.webp, cats_and-dogs/x.png
    px = {name: s.images[i].permute(1, 2, 0).numpy().astype(int) for i, name in enumerate(
        ["rgb", "rgba", "p", "l", "one", "cmyk", "i16", "wide", "gif", "noise", "bird", "cat"])}
    assert (px["rgb"] == (10, 200, 30)).all()
    assert (px["rgba"][:, :8] == (200, 0, 0)).all() and (px["rgba"][:, 8:] == 255).all()
    assert (px["p"] == (0, 0, 250)).all()
    assert (px["l"] == 100).all()
    assert (px["one"][:8] == 255).all() and (px["one"][8:] == 0).all()
    assert (px["cmyk"][..., 0] > 220).all() and (px["cmyk"][..., 1:] < 40).all()
    assert (px["i16"][:, :8] == 255).all() and (px["i16"][:, 8:] == 128).all()
    assert (px["gif"][:, :8] == 255).all() and (px["gif"][:, 8:] == (250, 250, 0)).all()
    centre = px["wide"][:, 2:-2]  # centre crop of red|green|blue keeps the green third
    assert (centre[..., 1] > 240).all() and (centre[..., [0, 2]] < 15).all()


def test_folder_captions_from_sidecar_class_folder_or_empty(image_folder):
    s = load_folder(image_folder, 16)
    assert s.captions[0] == "un chat très mignon 🐱"
    assert s.captions[1:10] == [""] * 9
    assert s.captions[10:] == ["birds", "cats and dogs"]
    assert s.name == str(image_folder)


def test_folder_resizes_short_side_then_centre_crops(tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 48, 32))  # white middle half
    _save(img, tmp_path / "d" / "w.png")
    s = load_folder(tmp_path / "d", 16)
    assert s.images.shape == (1, 3, 16, 16) and (s.images[0, :, :, 1:-1] > 230).all()


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "folder not found"),
    (lambda p: (p / "f.png").write_bytes(b"x") and p / "f.png", "is a file, not a folder"),
    (lambda p: (p / "e").mkdir() or (p / "e" / "readme.txt").write_text("hi") and p / "e",
     "no image files"),
    (lambda p: (p / "c").mkdir() or (p / "c" / "a.png").write_bytes(b"junk") and p / "c",
     "none of the 1 image files could be read"),
])
def test_folder_mistakes_raise_data_error_naming_problem_and_fix(tmp_path, setup, message):
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message) as e:
        load_folder(path, 32)
    assert "--data" in str(e.value) and "built-in shapes" in str(e.value)
    assert "\n" not in str(e.value)


def test_builtin_train_and_test_are_disjoint_and_deterministic():
    train = load_dataset(None, 32, "train", n_builtin=300, seed=4)
    test = load_dataset(None, 32, "test", n_builtin=300, seed=4)
    assert len(train) == 300 and len(test) == 2000
    assert torch.equal(train.images, build_shapes(300, seed=4).images)
    assert torch.equal(test.images, load_dataset(None, 32, "test", n_builtin=300, seed=4).images)
    train_bytes = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in train_bytes for x in test.images)
    assert len(load_dataset(None, 32, "all", n_builtin=300, seed=4)) == 2300
    with pytest.raises(DataError):
        load_dataset(None, 32, "val")


def test_folder_split_is_disjoint_deterministic_and_covers_everything(tmp_path):
    root = tmp_path / "many"
    for i in range(60):  # each image a distinct grey level, so images identify files
        _save(Image.new("L", (8, 8), i), root / f"img_{i:03d}.png")
    train = load_dataset(str(root), 8, "train")
    test = load_dataset(str(root), 8, "test")
    everything = load_dataset(str(root), 8, "all")
    levels = lambda s: {int(v) for v in s.images[:, 0, 0, 0]}  # noqa: E731
    assert len(test) >= 1 and len(train) >= 1 and len(everything) == 60
    assert levels(train).isdisjoint(levels(test))
    assert levels(train) | levels(test) == set(range(60))
    assert torch.equal(test.images, load_dataset(str(root), 8, "test").images)


def test_small_folder_test_split_is_a_copy_of_train(tmp_path):
    for i in range(3):
        _save(Image.new("RGB", (8, 8), (i, i, i)), tmp_path / f"{i}.png")
    train = load_dataset(str(tmp_path), 8, "train")
    test = load_dataset(str(tmp_path), 8, "test")
    assert len(train) == 3 and torch.equal(train.images, test.images)


def test_dataset_key_is_stable_and_changes_with_the_data(tmp_path):
    assert dataset_key(None, 32, 100, 0) == dataset_key(None, 32, 100, 0)
    assert len({dataset_key(None, 32, 100, 0), dataset_key(None, 64, 100, 0),
                dataset_key(None, 32, 200, 0), dataset_key(None, 32, 100, 1)}) == 4
    _save(Image.new("RGB", (8, 8)), tmp_path / "a.png")
    k1 = dataset_key(str(tmp_path), 32, 100, 0)
    assert k1 == dataset_key(str(tmp_path), 32, 7, 7) and k1.endswith(k1[-16:])
    os.utime(tmp_path / "a.png", ns=(10**18, 10**18))
    k2 = dataset_key(str(tmp_path), 32, 100, 0)
    _save(Image.new("RGB", (8, 8)), tmp_path / "b.png")
    k3 = dataset_key(str(tmp_path), 32, 100, 0)
    assert len({k1, k2, k3}) == 3 and dataset_key(str(tmp_path), 64, 100, 0) != k3


def test_a_file_name_that_is_not_utf8_loads_splits_and_keys_like_any_other(tmp_path):
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    for i in range(24):
        Image.new("RGB", (16, 16), (10 * i, 80, 160)).save(root / f"{i}.png")
    odd = os.path.join(os.fsencode(root), b"caf\xe9.png")                 # Latin-1 bytes
    Image.new("RGB", (16, 16), (1, 2, 3)).save(odd, format="PNG")
    odd_class = os.path.join(os.fsencode(root), b"caf\xe9s")
    os.mkdir(odd_class)
    Image.new("RGB", (16, 16), (4, 5, 6)).save(os.path.join(odd_class, b"x.png"), format="PNG")
    train = load_dataset(root, 8, "train")                               # the split hashes names
    assert len(train) in (25, 26) and len(load_dataset(root, 8, "test")) >= 1
    every = load_dataset(root, 8, "all")
    assert len(every) == 26 and "caf\ufffds" in every.captions            # the class, readable
    key = dataset_key(root, 8)
    os.rename(odd, os.path.join(os.fsencode(root), b"caf\xe8.png"))
    assert dataset_key(root, 8) != key                                   # its name is in the key


# ---------------------------------------------------------------------------------------------
# how a folder was read, said once (issue 23)


def test_a_folder_summary_counts_captions_by_source_nesting_upscaling_and_the_split(tmp_path):
    root = tmp_path / "pics"
    for i in range(12):
        _save(Image.new("RGB", (40, 40), (i, 0, 0)), root / "cats" / f"c{i}.png")
    for i in range(3):
        _save(Image.new("RGB", (8, 8), (0, i, 0)), root / "cats" / "deep" / f"d{i}.png")
    for i in range(4):
        _save(Image.new("RGB", (40, 40), (0, 0, i)), root / f"m{i}.png")
    (root / "m0.txt").write_text("a sidecar caption")
    (root / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"m{i}.png", "text": f"meta {i}"}) + "\n"
                for i in range(3)) + "not json\n")
    s = load_dataset(str(root), 16, "all")
    captions = dict(zip([f"m{i}" for i in range(4)], s.captions[-4:]))
    assert captions == {"m0": "a sidecar caption", "m1": "meta 1", "m2": "meta 2", "m3": ""}
    assert "captions: 15 from class folder, 1 from name.txt sidecars, 2 from metadata.jsonl, " \
           "1 from nothing (trained unconditionally)" in s.summary
    assert "nested folders take their first-level name as caption (cats/deep/ -> 'cats')" in s.summary
    assert "3 images smaller than 16 px were upscaled" in s.summary
    assert s.warnings == [] and "unreadable" not in s.summary
    small = load_dataset(str(root / "cats" / "deep"), 16, "train")
    assert "the folder has under 20 images: none held out" in small.summary


def test_a_split_that_holds_out_nothing_says_so_and_not_that_the_folder_is_small(tmp_path):
    root = tmp_path / "many"
    names, i = [], 0
    while len(names) < 25:                                   # 25 names the hash keeps in train
        name = f"x{i}.png"
        i += 1
        if zlib.crc32(name.encode()) % 20:
            names.append(name)
    for name in names:
        _save(Image.new("RGB", (16, 16)), root / name)
    s = load_dataset(str(root), 16, "train")
    assert "the file-name hash put none of its 25 images in the held-out split" in s.summary
    assert "under 20" not in s.summary


def test_announce_prints_the_summary_and_each_warning_once(image_folder, capsys):
    data_lib.announce(load_folder(image_folder, 16))
    out, err = capsys.readouterr()
    assert "12 images read" in out and err.count("warning: skipped 2 unreadable images") == 1
