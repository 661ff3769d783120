"""Data: the images (and captions) that the autoencoder and the flow model learn from.

Latent Diffusion Models recipe, step 1: Data. Before any autoencoder or flow model there
is a set of images x (N, 3, H, W) with one caption each. Two sources:

1. The built-in captioned dataset of coloured shapes (shapes.py), deterministic from
   (seed, index) and never downloaded, with a disjoint held-out test split.
2. A folder of the user's own images (png/jpg/jpeg/webp/bmp/gif, searched recursively),
   captioned from a sidecar `name.txt`, else from a metadata.jsonl, else from the class
   sub-folder, else "" (unconditional).

Both arrive as an `ImageSet` (uint8 images + captions); `load_dataset` is the one entry point
of the scripts, `dataset_key` names the data for cache keys, and the grid helpers write the
sample and reconstruction pictures.

Offers: DataError, ImageSet, to_model_range, from_model_range, images_to_grid, grid_scale,
image_format, save_grid, build_shapes, IMAGE_EXTENSIONS, load_folder, announce, N_TEST_BUILTIN,
TEST_SEED_OFFSET, load_dataset, dataset_key
"""

import hashlib
import io
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

import shapes
from common import UserError, atomic_write

N_TEST_BUILTIN = 2000          # images in the built-in held-out test split
TEST_SEED_OFFSET = 1_000_003   # the test split is rendered from seed + this: a disjoint stream


class DataError(UserError, ValueError):
    """A user mistake about data (bad folder, no readable images, bad image size...)."""


# ---------------------------------------------------------------------------------------------
# image sets and pictures of them

@dataclass
class ImageSet:
    """A set of images with one caption each.

    images: uint8 tensor (N, 3, H, W); captions: N strings ("" = unconditional);
    attributes: N attribute dicts for the shapes data, None for folder data;
    name: where the images came from, e.g. "shapes-32-seed0" or the folder path;
    held_out: False for a test split that is a copy of the training images (a small folder);
    summary: how the data was read, in words (counts, unreadable files, captions, held-out
    split, resizing), for the scripts to print once (`announce`)."""
    images: torch.Tensor
    captions: list
    attributes: list | None = None
    name: str = ""
    held_out: bool = True
    summary: str = ""

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4 and \
            self.images.shape[1] == 3, f"images must be uint8 (N, 3, H, W), got " \
            f"{self.images.dtype} {tuple(self.images.shape)}"
        assert len(self.captions) == len(self.images), "one caption per image"
        assert self.attributes is None or len(self.attributes) == len(self.images)

    def __len__(self):
        return len(self.images)

    def subset(self, idx):
        """The images at the given indices (a sequence of ints or an integer tensor)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        keep = idx.tolist()
        return ImageSet(self.images[idx], [self.captions[i] for i in keep],
                        None if self.attributes is None else [self.attributes[i] for i in keep],
                        name=self.name, held_out=self.held_out)


def to_model_range(images):
    """uint8 in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def from_model_range(x):
    """float in [-1, 1] (clamped) -> uint8 in [0, 255]."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def images_to_grid(images, nrow=8, pad=2, pad_value=255):
    """Tile images, uint8 or float in [-1, 1], (N, 3, H, W) or (3, H, W), into one PIL image
    with `nrow` images per row and `pad` pixels of `pad_value` between cells."""
    images = images.reshape(-1, *images.shape[-3:])
    images = (images if images.dtype == torch.uint8 else from_model_range(images)).cpu()
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


def image_format(path):
    """The Pillow format that writes an RGB picture to `path`, by its extension; else None."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    try:                                # .psd: read only; .xbm, .blp: no RGB picture
        Image.new("RGB", (8, 8)).save(io.BytesIO(), format=fmt)
    except Exception:
        return None
    return fmt


def save_grid(path, images, nrow=8, row_labels=None, col_labels=None, scale=1, info=None,
              replace=True):
    """Write a grid of images (nrow per row) to `path`, its format from the extension, atomically
    (a full disk or a crash never leaves a torn or empty picture over an old one).

    scale: nearest-neighbour upscaling of every image. row_labels: one text per row, drawn in a
    strip above it (e.g. its prompt). col_labels: texts for equal blocks of columns, drawn in a
    strip at the top (e.g. "cfg 4"). info: written as PNG text chunks (prompts, seed, ...)."""
    images = images if images.dtype == torch.uint8 else from_model_range(images)  # 4x smaller
    if scale > 1:
        images = images.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    grid = images_to_grid(images, nrow)
    if row_labels is not None or col_labels is not None:
        grid = _label_grid(grid, images.shape[-2], row_labels, col_labels)
    fmt = image_format(path) or "PNG"
    text = PngInfo()
    for key, value in (info or {}).items():
        text.add_text(key, value if isinstance(value, str) else json.dumps(value))
    options = {"pnginfo": text} if fmt == "PNG" else {}
    atomic_write(Path(path), lambda f: grid.save(f, format=fmt, **options), "picture", replace)


def _label_grid(grid, cell, row_labels, col_labels, pad=2):
    """The grid with a text strip above each row (row_labels) and one above all (col_labels, one
    per equal block of columns), in Pillow's default font, wrapped to the grid's width. Words
    are drawn one by one, an "n" apart: the default font's space is 2 px, too thin to see."""
    font, measure = ImageFont.load_default(), ImageDraw.Draw(grid)
    gap = measure.textlength("n", font=font)
    line_h = measure.textbbox((0, 0), "Hg", font=font)[3] + 3

    def width(words):
        return sum(measure.textlength(word, font=font) + gap for word in words) - gap

    def wrap(text):  # -> lines, each a list of words (an empty text: one empty line)
        lines = [[]]
        for word in text.split():
            if lines[-1] and width(lines[-1] + [word]) > grid.width - 4:
                lines.append([])
            lines[-1].append(word)
        return lines

    def write(x, y, words):
        for word in words:
            draw.text((x, y), word, fill=(0, 0, 0), font=font)
            x += measure.textlength(word, font=font) + gap
    n_rows = (grid.height + pad) // (cell + pad)
    rows = [wrap(row_labels[r]) if row_labels is not None else [] for r in range(n_rows)]
    top = line_h + 2 if col_labels else 0
    out = Image.new("RGB", (grid.width, top + grid.height + sum(map(len, rows)) * line_h), "white")
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(col_labels or []):
        block = grid.width / len(col_labels)
        write(i * block + (block - width(text.split())) / 2, 1, text.split())
    y = top
    for r, lines in enumerate(rows):
        for words in lines:
            write(2, y, words)
            y += line_h
        out.paste(grid.crop((0, r * (cell + pad), grid.width, r * (cell + pad) + cell)), (0, y))
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
    """Every image under `path` (recursive, sorted, hidden files skipped), turned the way a
    viewer shows it (EXIF orientation), converted to RGB (alpha composited over white, 16-bit
    scaled to 8-bit), short side resized to image_size and centre-cropped. Captions: sidecar
    name.txt, else the `text` of the image's line in a metadata.jsonl (Hugging Face
    imagefolder: {"file_name": ..., "text": ...}), else the first-level class folder name
    ('_' and '-' -> spaces), else "". Unreadable files are skipped; the set's `summary` names
    them, counts the images and says where the captions came from."""
    root, files = _image_files(path)
    return _load_files(root, files, image_size, name=str(path))


def _image_files(path):
    """(root, its image files): recursive, case-insensitive extensions, sorted by relative path,
    hidden files and folders (a name starting with '.') left out."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"--data {path}: " + ("is a file, not a folder" if root.exists() else
                                              "folder not found") + f"; {_FIX}")
    files = _visible_files(root, lambda p: p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"--data {root}: no image files found in this folder; {_FIX}")
    return root, files


def _visible_files(root, wanted):
    files = [p for p in root.rglob("*") if wanted(p) and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _load_files(root, files, image_size, name):
    """Load the given files into an ImageSet whose summary counts what was read: unreadable
    files (skipped, each named once), where the captions came from, nested folders, upscaled
    images."""
    if not (isinstance(image_size, int) and image_size >= 8):
        raise DataError(f"image_size {image_size!r}: must be an integer >= 8")
    metadata = _read_metadata(root)
    pixels, captions, skipped, sources, upscaled, nested = [], [], [], {}, 0, set()
    for f in files:
        relative = f.relative_to(root)
        try:
            array, small = _load_image(f, image_size)
        except Exception as e:  # any decoder error: truncated, not an image, too many pixels...
            why = str(e).replace(f" {str(f)!r}", "").split(", could be")[0]  # no path, no advice
            shown = _name_bytes(relative.as_posix()).decode("utf-8", "replace")  # printable
            skipped.append(f"{shown} ({why[:80]})")
            continue
        pixels.append(array)
        upscaled += small
        caption, source = _caption_for(f, relative.parts, metadata)
        captions.append(caption)
        sources[source] = sources.get(source, 0) + 1
        if source == "class folder" and len(relative.parts) > 2:
            nested.add(f"{relative.parts[0]}/{relative.parts[1]}/")
    unreadable = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if skipped[5:] else "")
    if not pixels:
        raise DataError(f"--data {root}: none of the {len(files)} image files could be read: "
                        f"{unreadable}; {_FIX}")
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N,3,H,W)
    example = min(nested, default="")  # e.g. "cats/deep/", captioned "cats"
    lines = [f"{len(pixels)} images read",
             skipped and f"{len(skipped)} unreadable files skipped: {unreadable}",
             "captions: " + ", ".join(f"{n} from {s}" for s, n in sources.items()),
             sources.get("nothing (trained unconditionally)") and
             "an image without a caption is learned unconditionally (the empty prompt)",
             nested and f"nested folders take their first-level name as caption ({example} -> "
                        f"{example.split('/')[0]!r})",
             upscaled and f"{upscaled} images smaller than {image_size} px were upscaled"]
    return ImageSet(images, captions, name=name, summary="\n".join(filter(None, lines)))


def announce(images):
    """Print how a set was read: its summary."""
    print(images.summary, flush=True)


def _read_metadata(root):
    """{image path: caption} from every metadata.jsonl under root (Hugging Face imagefolder's
    format: one JSON object per line with "file_name", relative to that file's folder, and
    "text"). Lines that are not such objects are left out."""
    captions = {}
    for meta in _visible_files(root, lambda p: p.name == "metadata.jsonl"):
        # utf-8-sig: a byte-order mark (some editors write one) is not part of the first line
        for line in meta.read_text(encoding="utf-8-sig", errors="replace").splitlines():
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
    with warnings.catch_warnings():  # a big image is the user's choice, not news; a bigger
        # one (over twice the limit) still raises DecompressionBombError: an unreadable file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.format == "JPEG":  # decode big JPEGs at a reduced scale, still >= 2x target
                img.draft(img.mode, (2 * image_size, 2 * image_size))
            img.load()  # inside the caller's try: this is where truncated files fail
            ImageOps.exif_transpose(img, in_place=True)  # as a viewer shows it (phone photos)
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


def _caption_for(f, parts, metadata):
    """(caption, where it came from) of file f (`parts`: its path relative to the root):
    sidecar name.txt, metadata.jsonl, class folder, or none."""
    sidecar = f.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8-sig", errors="replace")  # BOM: not text
        return text.strip(), "name.txt sidecars"
    if f.resolve() in metadata:
        return metadata[f.resolve()], "metadata.jsonl"
    if len(parts) > 1:  # in a class sub-folder (a name that is not UTF-8: U+FFFD for its bytes)
        name = _name_bytes(parts[0]).decode("utf-8", "replace")
        return name.replace("_", " ").replace("-", " ").strip(), "class folder"
    return "", "nothing (trained unconditionally)"


def _name_bytes(name):
    """A file name's bytes as stored, even when they are not UTF-8 (Python holds such bytes as
    lone surrogates): the UTF-8 of every valid name."""
    return name.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# one entry point for train/sample/eval

def load_dataset(data, image_size, split="train", n_builtin=20000, seed=0):
    """data=None -> the built-in shapes; else the folder `data`. split: "train", "test" or "all".

    Built-in: train = images 0..n_builtin-1 of stream `seed`; test = N_TEST_BUILTIN images
    of stream seed + TEST_SEED_OFFSET (never the same images); all = train then test.
    Folder: a file is in test when crc32(its relative path) % 20 == 0 (~5%), else in train.
    A folder with fewer than 20 images, or whose hash split leaves one side empty (or no held-out
    file readable), uses its training images as test too (then test is not held out)."""
    if split not in ("train", "test", "all"):
        raise DataError(f"split {split!r}: must be 'train', 'test' or 'all'")
    if data is None:
        return _load_builtin(image_size, split, n_builtin, seed)
    root, files = _image_files(data)
    every = files
    test = {f for f in files if zlib.crc32(_name_bytes(f.relative_to(root).as_posix())) % 20 == 0}
    held_out, notes = True, []
    if split != "all" and len(files) >= 20 and 0 < len(test) < len(files):
        notes = [f"{len(test)} of {len(files)} image files held out for evaluation (a fixed ~5% "
                 f"by file-name hash), {len(files) - len(test)} for training"]
        files = [f for f in files if (f in test) == (split == "test")]
    elif split != "all":
        held_out = split != "test"
        why = ("the folder has under 20 images" if len(files) < 20 else
               f"the file-name hash put {'all' if test else 'none'} of its {len(files)} images "
               f"in the held-out split")
        notes = [f"{why}: none held out, evaluation reuses training images"]
    try:
        images = _load_files(root, files, image_size, name=str(data))
    except DataError:                   # no held-out file readable: as if none were held out
        if not (split == "test" and held_out):
            raise
        names = [_name_bytes(f.relative_to(root).as_posix()).decode("utf-8", "replace")
                 for f in files[:5]]
        more = f" and {len(files) - 5} more" if files[5:] else ""
        notes = [f"none of the {len(files)} held-out image files could be read "
                 f"({', '.join(names)}{more}): evaluation reuses training images"]
        held_out, files = False, [f for f in every if f not in test]
        images = _load_files(root, files, image_size, name=str(data))
    images.held_out = held_out
    what = {"train": "training split", "test": "held-out split", "all": "every image"}[split]
    items = notes + images.summary.splitlines()
    images.summary = f"data {data} ({what}):\n" + "\n".join(f"  {item}" for item in items)
    return images


def _load_builtin(image_size, split, n_builtin, seed):
    train = build_shapes(n_builtin, seed, image_size) if split != "test" else None
    if split == "train":
        train.summary = (f"data: the built-in shapes, {n_builtin} training images drawn from "
                         f"stream {seed} ({image_size} px), {N_TEST_BUILTIN} held-out images "
                         f"from another stream; captions name every shape")
        return train
    test = build_shapes(N_TEST_BUILTIN, seed + TEST_SEED_OFFSET, image_size)
    name = f"shapes-{image_size}-seed{seed}-{split}"
    if split == "test":
        return ImageSet(test.images, test.captions, test.attributes, name=name)
    return ImageSet(torch.cat([train.images, test.images]), train.captions + test.captions,
                    train.attributes + test.attributes, name=name)


def dataset_key(data, image_size, n_builtin=20000, seed=0):
    """A stable string naming the data, for cache keys. Built-in: the rendering version, size,
    count and seed. Folder: a sha1 of the sorted relative paths, sizes and mtimes of its
    images, caption sidecars and metadata.jsonl files, plus the image size."""
    if data is None:
        return f"shapes-v{shapes.SHAPES_VERSION}-{image_size}px-n{n_builtin}-seed{seed}"
    root, files = _image_files(data)
    sha = hashlib.sha1(f"{image_size}\n".encode())
    paths = [g for f in files for g in (f, f.with_suffix(".txt"))]
    for g in paths + sorted(root.rglob("metadata.jsonl")):
        if g.is_file():
            st = g.stat()
            sha.update(_name_bytes(f"{g.relative_to(root).as_posix()}\t{st.st_size}\t"
                                   f"{st.st_mtime_ns}\n"))
    return f"folder-{image_size}px-{sha.hexdigest()[:16]}"
