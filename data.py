"""Data: the images (and captions) that the autoencoder and the flow model learn from.

Latent Diffusion Models recipe, step 1: Data. Before any autoencoder or flow model there
is a set of images x (N, 3, H, W) with one caption each. Two sources:

1. The built-in captioned dataset of coloured shapes (shapes.py), deterministic from
   (seed, index) and never downloaded, with a disjoint held-out test split.
2. A folder of the user's own images (png/jpg/jpeg/webp/bmp/gif, searched recursively),
   captioned from a sidecar `name.txt`, else from the class sub-folder, else "" (unconditional).

Both arrive as an `ImageSet` (uint8 images + captions); `load_dataset` is the one entry point
of the scripts, `dataset_key` names the data for cache keys, and the grid helpers write the
sample and reconstruction pictures.

Offers: DataError, ImageSet, to_model_range, from_model_range, images_to_grid, grid_scale,
save_grid, build_shapes, IMAGE_EXTENSIONS, load_folder, announce, N_TEST_BUILTIN, TEST_SEED_OFFSET,
load_dataset, dataset_key
"""

import hashlib
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import shapes
from common import UserError
from runs import atomic_write

N_TEST_BUILTIN = 2000          # images in the built-in held-out test split
TEST_SEED_OFFSET = 1_000_003   # the test split is rendered from seed + this: a disjoint stream


class DataError(UserError, ValueError):
    """A user mistake about data (bad folder, no readable images, bad image size...)."""


# ---------------------------------------------------------------------------------------------
# image sets

@dataclass
class ImageSet:
    """A set of images with one caption each.

    images: uint8 tensor (N, 3, H, W); captions: N strings ("" = unconditional);
    attributes: N attribute dicts for the shapes data, None for folder data;
    name: where the images came from, e.g. "shapes-32-seed0" or the folder path;
    held_out: False for a test split that is a copy of the training images (a small folder);
    summary: how the data was read, in words (counts, captions, held-out split, resizing), and
    warnings (e.g. unreadable files), for the scripts to print once (`announce`)."""
    images: torch.Tensor
    captions: list
    attributes: list | None = None
    name: str = ""
    held_out: bool = True
    summary: str = ""
    warnings: list = field(default_factory=list)

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4 and \
            self.images.shape[1] == 3, f"images must be uint8 (N, 3, H, W), got " \
            f"{self.images.dtype} {tuple(self.images.shape)}"
        assert len(self.captions) == len(self.images), "one caption per image"
        assert self.attributes is None or len(self.attributes) == len(self.images)

    def __len__(self):
        return len(self.images)

    @property
    def image_size(self):
        return self.images.shape[-1]

    def subset(self, idx):
        """The images at the given indices (a sequence of ints or an integer tensor)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        keep = idx.tolist()
        return ImageSet(images=self.images[idx],
                        captions=[self.captions[i] for i in keep],
                        attributes=None if self.attributes is None
                        else [self.attributes[i] for i in keep],
                        name=self.name, held_out=self.held_out)

    def to_float(self):
        """The images as float32 in [-1, 1], (N, 3, H, W): the model's range."""
        return to_model_range(self.images)


def to_model_range(images):
    """uint8 in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def from_model_range(x):
    """float in [-1, 1] (clamped) -> uint8 in [0, 255]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def images_to_grid(images, nrow=8, pad=2, pad_value=255):
    """Tile images, uint8 or float in [-1, 1], (N, 3, H, W) or (3, H, W), into one PIL image
    with `nrow` images per row and `pad` pixels of `pad_value` between cells."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.dtype != torch.uint8:
        images = from_model_range(images)
    images = images.cpu()
    N, C, H, W = images.shape
    ncol = max(1, min(nrow, N))
    nrows = (N + ncol - 1) // ncol
    grid = torch.full((C, nrows * (H + pad) - pad, ncol * (W + pad) - pad), pad_value,
                      dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, ncol)
        grid[:, r * (H + pad): r * (H + pad) + H, c * (W + pad): c * (W + pad) + W] = images[i]
    return Image.fromarray(grid.permute(1, 2, 0).numpy())  # (H', W', 3)


def grid_scale(image_size):
    """The default enlargement of pictures: small images drawn at about 64 pixels."""
    return max(1, 64 // image_size)


def save_grid(path, images, nrow=8, row_labels=None, col_labels=None, scale=1, info=None):
    """Write a grid of images (nrow per row) to `path`, its format from the extension, atomically
    (a full disk or a crash never leaves a torn or empty picture over an old one).

    scale: nearest-neighbour upscaling of every image. row_labels: one text per row, drawn in a
    strip above it (e.g. its prompt). col_labels: texts for equal blocks of columns, drawn in a
    strip at the top (e.g. "cfg 4"). info: written as PNG text chunks (prompts, seed, ...)."""
    path = Path(path)
    images = images if images.dtype == torch.uint8 else from_model_range(images)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = images_to_grid(images, nrow)
    if row_labels is not None or col_labels is not None:
        grid = _label_grid(grid, images.shape[-2], row_labels, col_labels)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    options = {}
    if fmt == "PNG" and info:
        options["pnginfo"] = PngInfo()
        for key, value in info.items():
            options["pnginfo"].add_text(key, value if isinstance(value, str) else json.dumps(value))
    atomic_write(path, lambda f: grid.save(f, format=fmt, **options), "picture")


def _label_grid(grid, cell, row_labels, col_labels, pad=2):
    """The grid with a text strip above each row (row_labels) and one above all (col_labels, one
    per equal block of columns), in Pillow's default font, wrapped to the grid's width."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(grid)
    line_h = measure.textbbox((0, 0), "Hg", font=font)[3] + 3
    n_rows = (grid.height + pad) // (cell + pad)

    def wrap(text):
        lines, line = [], ""
        for word in text.split() or [""]:
            trial = f"{line} {word}".strip()
            if line and measure.textlength(trial, font=font) > grid.width - 4:
                lines.append(line)
                trial = word
            line = trial
        return lines + [line]
    rows = [wrap(row_labels[r]) if row_labels is not None else [] for r in range(n_rows)]
    top = line_h + 2 if col_labels else 0
    height = top + grid.height + sum(len(lines) * line_h for lines in rows)
    out = Image.new("RGB", (grid.width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    if col_labels:
        block = grid.width / len(col_labels)
        for i, text in enumerate(col_labels):
            width = draw.textlength(text, font=font)
            draw.text((i * block + (block - width) / 2, 1), text, fill=(0, 0, 0), font=font)
    y = top
    for r, lines in enumerate(rows):
        for line in lines:
            draw.text((2, y), line, fill=(0, 0, 0), font=font)
            y += line_h
        row = grid.crop((0, r * (cell + pad), grid.width, min(grid.height, r * (cell + pad) + cell)))
        out.paste(row, (0, y))
        y += cell + pad
    return out


def build_shapes(n, seed=0, image_size=32):
    """Render images 0..n-1 of the shapes stream `seed` into an ImageSet."""
    try:
        shapes.check_image_size(image_size)
    except ValueError as e:
        raise DataError(str(e)) from None
    images, captions, attributes = shapes.render_shapes(n, seed, image_size)
    return ImageSet(images, captions, attributes, name=f"shapes-{image_size}-seed{seed}")



# ---------------------------------------------------------------------------------------------
# a folder of the user's own images

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_FIX = ("pass a folder of images (png/jpg/jpeg/webp/bmp/gif) "
        "or omit --data for the built-in shapes dataset")


def load_folder(path, image_size):
    """Every image under `path` (recursive, sorted, hidden files skipped), converted to RGB
    (alpha composited over white, 16-bit scaled to 8-bit), short side resized to image_size
    and centre-cropped. Captions: sidecar name.txt, else the `text` of the image's line in a
    metadata.jsonl (Hugging Face imagefolder: {"file_name": ..., "text": ...}), else the
    first-level class folder name ('_' and '-' -> spaces), else "". Unreadable files are
    skipped; the set's `summary` counts them and says where the captions came from."""
    root = _check_folder(path)
    return _load_files(root, _list_images(root), image_size, name=str(path))


def _check_folder(path):
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"--data {path}: folder not found; {_FIX}")
    if not root.is_dir():
        raise DataError(f"--data {path}: is a file, not a folder; {_FIX}")
    return root


def _list_images(root):
    """Image files under root (recursive, case-insensitive extensions), sorted by their
    relative path; hidden files and folders (a name starting with '.') are left out."""
    files = [p for p in root.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise DataError(f"--data {root}: no image files found in this folder; {_FIX}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _load_files(root, files, image_size, name):
    """Load the given files into an ImageSet whose summary counts what was read: unreadable
    files (skipped), where the captions came from, nested folders, upscaled images."""
    if not (isinstance(image_size, int) and image_size >= 8):
        raise DataError(f"image_size {image_size!r}: must be an integer >= 8")
    metadata = _read_metadata(root)
    pixels, captions, skipped, sources, upscaled, nested = [], [], [], {}, 0, set()
    for f in files:
        try:
            array, small = _load_image(f, image_size)
        except Exception as e:  # any decoder error: truncated, not an image, bomb, ...
            skipped.append(f"{f.relative_to(root).as_posix()}: {e}")
            continue
        pixels.append(array)
        upscaled += small
        caption, source = _caption_for(root, f, metadata)
        captions.append(caption)
        sources[source] = sources.get(source, 0) + 1
        parts = f.relative_to(root).parts
        if source == "class folder" and len(parts) > 2:
            nested.add(f"{parts[0]}/{parts[1]}/")
    if not pixels:
        raise DataError(f"--data {root}: none of the {len(files)} image files could be read "
                        f"(first: {skipped[0]}); {_FIX}")
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N,3,H,W)
    lines = [f"{len(pixels)} images read"]
    warnings = []
    if skipped:
        lines.append(f"{len(skipped)} unreadable files skipped (first: {skipped[0][:120]})")
        warnings.append(f"skipped {len(skipped)} unreadable images in {root} (first: "
                        f"{skipped[0][:160]})")
    lines.append("captions: " + ", ".join(f"{n} from {s}" for s, n in sources.items()))
    if sources.get("nothing (trained unconditionally)"):
        lines.append("an image without a caption is learned unconditionally (the empty prompt)")
    if nested:
        example = sorted(nested)[0]
        lines.append(f"nested folders take their first-level name as caption ({example} -> "
                     f"{example.split('/')[0]!r})")
    if upscaled:
        lines.append(f"{upscaled} images smaller than {image_size} px were upscaled")
    return ImageSet(images, captions, attributes=None, name=name, summary="\n".join(lines),
                    warnings=warnings)


def announce(images):
    """Print how a set was read (its summary) and, once, each of its warnings on stderr."""
    print(images.summary, flush=True)
    for warning in images.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def _read_metadata(root):
    """{image path: caption} from every metadata.jsonl under root (Hugging Face imagefolder's
    format: one JSON object per line with "file_name", relative to that file's folder, and
    "text"). Lines that are not such objects are left out."""
    captions = {}
    for meta in sorted(root.rglob("metadata.jsonl")):
        if any(part.startswith(".") for part in meta.relative_to(root).parts):
            continue
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("file_name"), str) \
                    and isinstance(entry.get("text"), str):
                captions[(meta.parent / entry["file_name"]).resolve()] = entry["text"].strip()
    return captions


def _load_image(path, image_size):
    """One file -> (uint8 (image_size, image_size, 3), whether it had to be enlarged)."""
    with Image.open(path) as img:
        if img.format == "JPEG":  # decode big JPEGs at a reduced scale, still >= 2x the target
            img.draft(img.mode, (2 * image_size, 2 * image_size))
        img.load()  # inside the caller's try: this is where truncated files fail
        rgb = _to_rgb(img)
    return np.asarray(_resize_center_crop(rgb, image_size)), min(rgb.size) < image_size


def _to_rgb(img):
    """Any Pillow mode -> RGB: alpha over white, 16/32-bit grey scaled to 8 bits."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:  # 16-bit data: 65535 -> 255
            a = a / 257.0
        img = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _resize_center_crop(img, size):
    """Resize the short side to `size` (Lanczos), then crop the central size x size square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _caption_for(root, f, metadata):
    """(caption, where it came from): sidecar name.txt, metadata.jsonl, class folder, or none."""
    sidecar = f.with_suffix(".txt")
    if sidecar.is_file():
        return sidecar.read_text(encoding="utf-8", errors="replace").strip(), "name.txt sidecars"
    if f.resolve() in metadata:
        return metadata[f.resolve()], "metadata.jsonl"
    parts = f.relative_to(root).parts
    if len(parts) > 1:  # in a class sub-folder (a name that is not UTF-8: U+FFFD for its bytes)
        name = _name_bytes(parts[0]).decode("utf-8", "replace")
        return name.replace("_", " ").replace("-", " ").strip(), "class folder"
    return "", "nothing (trained unconditionally)"


# ---------------------------------------------------------------------------------------------
# one entry point for train/sample/eval

def load_dataset(data, image_size, split="train", n_builtin=20000, seed=0):
    """data=None -> the built-in shapes; else the folder `data`. split: "train", "test" or "all".

    Built-in: train = images 0..n_builtin-1 of stream `seed`; test = N_TEST_BUILTIN images
    of stream seed + TEST_SEED_OFFSET (never the same images); all = train then test.
    Folder: a file is in test when crc32(its relative path) % 20 == 0 (~5%), else in train.
    A folder with fewer than 20 images, or whose hash split leaves one side empty, uses
    every image for both train and test (then test is a copy of train, not held out)."""
    if split not in ("train", "test", "all"):
        raise DataError(f"split {split!r}: must be 'train', 'test' or 'all'")
    if data is None:
        return _load_builtin(image_size, split, n_builtin, seed)
    root = _check_folder(data)
    files = _list_images(root)
    held_out, split_note = True, ""
    if split != "all":
        test = [f for f in files if _is_test_file(root, f)]
        train = [f for f in files if not _is_test_file(root, f)]
        if len(files) >= 20 and test and train:
            files = test if split == "test" else train
            split_note = (f"{len(test)} of {len(test) + len(train)} image files held out for "
                          f"evaluation (a fixed ~5% by file-name hash), {len(train)} for training")
        else:
            held_out = split != "test"
            why = ("the folder has under 20 images" if len(test) + len(train) < 20 else
                   f"the file-name hash put {'none' if not test else 'all'} of its "
                   f"{len(test) + len(train)} images in the held-out split")
            split_note = f"{why}: none held out, evaluation reuses training images"
    images = _load_files(root, files, image_size, name=str(data))
    images.held_out = held_out
    what = {"train": "training split", "test": "held-out split", "all": "every image"}[split]
    items = ([split_note] if split_note else []) + images.summary.splitlines()
    images.summary = f"data {data} ({what}):\n" + "\n".join(f"  {item}" for item in items)
    return images


def _load_builtin(image_size, split, n_builtin, seed):
    name = f"shapes-{image_size}-seed{seed}"
    if split == "train":
        train = build_shapes(n_builtin, seed, image_size)
        train.summary = (f"data: the built-in shapes, {n_builtin} training images drawn from "
                         f"stream {seed} ({image_size} px), {N_TEST_BUILTIN} held-out images "
                         f"from another stream; captions name every shape")
        return train
    test = build_shapes(N_TEST_BUILTIN, seed + TEST_SEED_OFFSET, image_size)
    if split == "test":
        return ImageSet(test.images, test.captions, test.attributes, name=f"{name}-test")
    train = build_shapes(n_builtin, seed, image_size)
    return ImageSet(torch.cat([train.images, test.images]), train.captions + test.captions,
                    train.attributes + test.attributes, name=f"{name}-all")


def _is_test_file(root, f):
    return zlib.crc32(_name_bytes(f.relative_to(root).as_posix())) % 20 == 0


def _name_bytes(name):
    """A file name's bytes as stored, even when they are not UTF-8 (Python holds such bytes as
    lone surrogates): the UTF-8 of every valid name."""
    return name.encode("utf-8", "surrogateescape")


def dataset_key(data, image_size, n_builtin=20000, seed=0):
    """A stable string naming the data, for cache keys. Built-in: the rendering version, size,
    count and seed. Folder: a sha1 of the sorted relative paths, sizes and mtimes of its
    images, caption sidecars and metadata.jsonl files, plus the image size."""
    if data is None:
        return f"shapes-v{shapes.SHAPES_VERSION}-{image_size}px-n{n_builtin}-seed{seed}"
    root = _check_folder(data)
    sha = hashlib.sha1(f"{image_size}\n".encode())
    metadata = sorted(root.rglob("metadata.jsonl"))
    for f in _list_images(root) + metadata:
        for g in (f, f.with_suffix(".txt")) if f.suffix != ".jsonl" else (f,):
            if g.is_file():
                st = g.stat()
                sha.update(_name_bytes(f"{g.relative_to(root).as_posix()}\t{st.st_size}\t"
                                       f"{st.st_mtime_ns}\n"))
    return f"folder-{image_size}px-{sha.hexdigest()[:16]}"
