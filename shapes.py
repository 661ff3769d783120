"""The built-in dataset: captioned coloured shapes, drawn with Pillow, and the checker that reads
their attributes back from pixels.

Latent Diffusion Models recipe, step 1 ("Data") needs captioned images; no pretrained data can
be downloaded here, so this file draws them. Every image has a background and one or two objects
(side by side, never overlapping), each with a shape, a colour and a size, and a caption such as
"a small red circle left of a large blue square on a white background". Images are deterministic
from (seed, index). Because the attributes are known exactly, `read_attributes` can read them
back from the pixels of a *generated* image, which gives evaluation an exact, model-free
prompt-following score (`score_attributes`).

Attributes are plain dicts, objects ordered left to right:
    {"background": "white",
     "objects": [{"shape": "circle", "color": "red", "size": "small", "position": "left"}, ...]}
A single object has position "center" (it is drawn near the middle, with some jitter);
two objects are "left" and "right".

The same exactness measures composition: HELD_OUT_PAIRS names colour x shape pairs that a
training run may leave out (train_flow.py --hold-out-pairs), so that evaluation can ask whether
the model draws a "red circle" having seen red things and circles, never the two together.

Imports no project module (data.py wraps the rendered images into its ImageSet).

Offers: SHAPES, COLORS, BACKGROUNDS, SIZES, SIZE_FRACTIONS, SHAPES_VERSION, HELD_OUT_PAIRS,
check_image_size, render_shape_image, render_shapes, attributes_to_caption, parse_caption,
held_out_objects, read_attributes, score_attributes
"""

import re
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------
# the vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = MappingProxyType({  # name -> RGB; far from each other and from every background
    "red": (225, 25, 25),
    "green": (20, 175, 35),
    "blue": (25, 50, 230),
    "yellow": (245, 235, 15),
    "magenta": (230, 30, 220),
    "cyan": (20, 215, 225),
    "orange": (250, 120, 0),
    "purple": (115, 20, 165),
})
BACKGROUNDS = MappingProxyType({
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
})
SIZES = ("small", "large")
SIZE_FRACTIONS = MappingProxyType({"small": 0.26, "large": 0.42})  # bounding-box side
SHAPES_VERSION = 1     # bump when the rendering changes, so cache keys change too

_SUPERSAMPLE = 4       # draw at 4x and box-filter down: anti-aliasing by exact area coverage
_MARGIN = 0.04         # min distance of an object from the image border (fraction of side)
_GAP = 0.08            # min horizontal gap between two objects (fraction of side)
_CENTER_JITTER = 0.08  # a single object's centre x is 0.5 +- this
_CROSS_ARM = 0.36      # arm thickness of the cross, as a fraction of its size


# ---------------------------------------------------------------------------------------------
# rendering the shapes dataset

def render_shape_image(seed, index, image_size=32):
    """Render image `index` of the shapes stream `seed`: returns (PIL RGB image, caption, attrs).

    Deterministic from (seed, index) alone: the random generator is seeded from both."""
    check_image_size(image_size)
    rng = np.random.default_rng([seed, index])
    attrs = _sample_attributes(rng)
    boxes = _sample_boxes(rng, attrs["objects"])
    big = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(canvas)
    for obj, (cx, cy, s) in zip(attrs["objects"], boxes):
        _draw_shape(draw, obj["shape"], cx * big, cy * big, s * big, COLORS[obj["color"]])
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    return image, attributes_to_caption(attrs), attrs


def check_image_size(image_size):
    """ValueError unless the renderer can draw at this size: a multiple of 8 in [16, 128]."""
    if not (isinstance(image_size, int) and 16 <= image_size <= 128 and image_size % 8 == 0):
        raise ValueError(f"image_size {image_size!r}: the shapes dataset needs a multiple of 8 "
                         "between 16 and 128 (e.g. 32 or 64)")


def render_shapes(n, seed=0, image_size=32):
    """Images 0..n-1 of the shapes stream `seed`: (uint8 images (n, 3, H, W), captions,
    attribute dicts). Rendering is fast enough that no disk cache is needed."""
    check_image_size(image_size)
    pixels = np.empty((n, image_size, image_size, 3), dtype=np.uint8)  # (N, H, W, 3)
    captions, attributes = [], []
    for i in range(n):
        image, caption, attrs = render_shape_image(seed, i, image_size)
        pixels[i] = np.asarray(image)
        captions.append(caption)
        attributes.append(attrs)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return images, captions, attributes


def _sample_attributes(rng):
    """Background, then 1 or 2 objects (50/50), each with a uniform shape, colour and size."""
    n_objects = 1 if rng.random() < 0.5 else 2
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    positions = ["center"] if n_objects == 1 else ["left", "right"]
    colors = list(COLORS)
    objects = [{"shape": SHAPES[rng.integers(len(SHAPES))],
                "color": colors[rng.integers(len(colors))],
                "size": SIZES[rng.integers(len(SIZES))],
                "position": p} for p in positions]
    return {"background": background, "objects": objects}


def _sample_boxes(rng, objects):
    """One (cx, cy, s) per object, as fractions of the image side. Two objects stay in their
    own half with at least _GAP between them, so they never touch."""
    boxes = []
    for obj in objects:
        s = SIZE_FRACTIONS[obj["size"]]
        if obj["position"] == "center":
            lo, hi = 0.5 - _CENTER_JITTER, 0.5 + _CENTER_JITTER
        elif obj["position"] == "left":
            lo, hi = s / 2 + _MARGIN, 0.5 - s / 2 - _GAP / 2
        else:
            lo, hi = 0.5 + s / 2 + _GAP / 2, 1 - s / 2 - _MARGIN
        cx = rng.uniform(lo, max(lo, hi))
        cy = rng.uniform(s / 2 + _MARGIN, 1 - s / 2 - _MARGIN)
        boxes.append((cx, cy, s))
    return boxes


def _draw_shape(draw, shape, cx, cy, s, rgb):
    """Draw one filled shape whose bounding box is the s x s square centred at (cx, cy)."""
    x0, y0, x1, y1 = cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":  # pointing up, base at the bottom
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)
    elif shape == "cross":  # an upright plus sign
        t = _CROSS_ARM * s / 2
        draw.rectangle((x0, cy - t, x1, cy + t), fill=rgb)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def attributes_to_caption(attrs):
    """{"background": "white", "objects": [...]} -> "a small red circle left of a large blue
    square on a white background". Objects are listed left to right."""
    things = [f"a {o['size']} {o['color']} {o['shape']}" for o in attrs["objects"]]
    return f"{' left of '.join(things)} on a {attrs['background']} background"


_OBJECT_RE = r"a (\w+) (\w+) (\w+)"
_CAPTION_RE = re.compile(rf"^{_OBJECT_RE}(?: left of {_OBJECT_RE})? on a (\w+) background$")


def parse_caption(caption):
    """The inverse of attributes_to_caption; None when the caption is not of that form or
    uses words outside the vocabulary."""
    m = _CAPTION_RE.match(caption.strip())
    if m is None:
        return None
    groups = m.groups()
    words = [groups[0:3]] if groups[3] is None else [groups[0:3], groups[3:6]]
    positions = ["center"] if len(words) == 1 else ["left", "right"]
    objects = [{"shape": shape, "color": color, "size": size, "position": p}
               for (size, color, shape), p in zip(words, positions)]
    ok = groups[6] in BACKGROUNDS and all(
        o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in SIZES for o in objects)
    return {"background": groups[6], "objects": objects} if ok else None



# ---------------------------------------------------------------------------------------------
# composition: colour x shape pairs that a training run can leave out

# 8 of the 40 pairs, one per colour, the shapes taken in turn: every colour and every shape still
# appears in training with other partners (each colour with 4 shapes, each shape with 6 or 7
# colours), so a model that composes can draw these pairs from words it learned apart.
HELD_OUT_PAIRS = (("red", "circle"), ("green", "square"), ("blue", "triangle"),
                  ("yellow", "diamond"), ("magenta", "cross"), ("cyan", "circle"),
                  ("orange", "square"), ("purple", "triangle"))


def held_out_objects(attrs, pairs=HELD_OUT_PAIRS):
    """Indices (left to right) of the objects of `attrs` whose (colour, shape) is in `pairs`."""
    pairs = set(pairs)
    return [j for j, o in enumerate(attrs["objects"]) if (o["color"], o["shape"]) in pairs]


# ---------------------------------------------------------------------------------------------
# the attribute checker: read the attributes back from pixels

_MASK_THRESHOLD = 60.0     # L2 RGB distance from the background that marks an object pixel
_NOISE_THRESHOLD = 4.5     # ... or this many noise sigmas (measured on the border), if higher
_TEMPLATE_BLURS = (0.0, 0.12, 0.24)  # 3-tap blur weights tried on each template
_SHAPE_AREA = MappingProxyType({  # shape area / box area
    "circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5,
    "cross": 2 * _CROSS_ARM - _CROSS_ARM ** 2})
_SHAPE_CENTROID_Y = MappingProxyType({  # centroid's offset below the box centre / box height
    "circle": 0.0, "square": 0.0, "triangle": 1 / 6, "diamond": 0.0, "cross": 0.0})
_MIN_AREA_FRACTION = 0.06  # blobs smaller than (this * side)^2 pixels are noise, not objects
_SIZE_THRESHOLD = (SIZE_FRACTIONS["small"] + SIZE_FRACTIONS["large"]) / 2


def read_attributes(image):
    """Read the background and each object's shape, colour, size and position (left to
    right) from the pixels of an image: uint8 numpy (H, W, 3), torch uint8 (3, H, W) or PIL.

    Background: nearest palette colour to the median border pixel. Objects: 8-connected
    blobs of pixels far from the background (and above the noise level), smaller specks
    dropped. Colour: nearest palette colour to the median of the blob's interior. Shape:
    the template (exact coverage of each shape, its box fixed by the blob's area and
    centroid) with the smallest L1 error to the blob's anti-aliased coverage. Size: that
    template's box side against the midpoint of the two sizes. Position: "left"/"right" for
    two objects, else by thirds of the width. Never raises on garbage: noise gives some
    dict, a uniform image gives no objects."""
    x = _as_hwc(image).astype(np.float32)  # (H, W, 3)
    H, W, _ = x.shape
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])  # (2W + 2H, 3)
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(x - bg, axis=-1)  # (H, W)
    sigma = 1.4826 * float(np.median(np.abs(border - bg)))  # robust noise level per channel
    labels, n = _connected_components(dist > max(_MASK_THRESHOLD, _NOISE_THRESHOLD * sigma))
    min_area = max(4.0, (_MIN_AREA_FRACTION * min(H, W)) ** 2)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    objects = [_read_object(x, bg, labels, k) for k in range(1, n + 1) if areas[k] >= min_area]
    objects.sort(key=lambda o: o["_cx"])  # left to right
    for rank, o in enumerate(objects):
        o["position"] = _position(o.pop("_cx") / W, len(objects), rank)
    return {"background": _nearest_name(bg, BACKGROUNDS), "objects": objects}


def _as_hwc(image):
    """PIL image, torch uint8 (3, H, W) or numpy uint8 (H, W, 3) -> uint8 numpy (H, W, 3)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().permute(1, 2, 0).numpy()
    return np.asarray(image)


def _connected_components(mask):
    """8-connected labelling of a boolean (H, W) mask -> (int labels (H, W), count)."""
    H, W = mask.shape
    m = mask.tolist()
    labels = [[0] * W for _ in range(H)]
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        y0, x0 = int(y0), int(x0)
        if labels[y0][x0]:
            continue
        n += 1
        labels[y0][x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy in (y - 1, y, y + 1):
                if 0 <= yy < H:
                    row_m, row_l = m[yy], labels[yy]
                    for xx in (x - 1, x, x + 1):
                        if 0 <= xx < W and row_m[xx] and not row_l[xx]:
                            row_l[xx] = n
                            stack.append((yy, xx))
    return np.array(labels, dtype=np.int64).reshape(H, W), n


def _read_object(x, bg, labels, k):
    """Colour, size and shape of blob k (the caller sets the position from "_cx")."""
    H, W, _ = x.shape
    blob = labels == k  # (H, W)
    # colour: the median of the blob's interior (pixels whose 4 neighbours are in the blob)
    inner = blob.copy()
    inner[1:] &= blob[:-1]
    inner[:-1] &= blob[1:]
    inner[:, 1:] &= blob[:, :-1]
    inner[:, :-1] &= blob[:, 1:]
    rgb = np.median(x[inner] if inner.any() else x[blob], axis=0)
    # coverage alpha (0 = background, 1 = object colour) in a crop around the blob
    ys, xs = np.nonzero(blob)
    y0, y1 = max(0, ys.min() - 2), min(H, ys.max() + 3)
    x0, x1 = max(0, xs.min() - 2), min(W, xs.max() + 3)
    d = rgb - bg
    alpha = (x[y0:y1, x0:x1] - bg) @ d / max(float(d @ d), 1e-6)  # (h, w)
    crop_labels = labels[y0:y1, x0:x1]
    alpha[(crop_labels != 0) & (crop_labels != k)] = 0.0  # blank out other blobs
    shape, side, cx = _fit_shape(alpha)
    size = "large" if side / min(H, W) > _SIZE_THRESHOLD else "small"
    return {"shape": shape, "color": _nearest_name(rgb, COLORS), "size": size, "_cx": x0 + cx}


def _fit_shape(alpha):
    """Fit each shape's template to a coverage crop (h, w); return (best shape, its box side
    in pixels, its centre x). Area and centroid fix each template's box: both are unchanged
    by blur and unbiased under noise (alpha is not clipped for them), which makes the fit
    robust to blurry or noisy samples. The aspect ratio comes from the soft extents."""
    soft = np.clip(alpha, 0.0, 1.0)
    raw = np.clip(alpha, -0.5, 1.5)
    area = max(float(raw.sum()), 1e-6)
    cx = float(raw.sum(0) @ (np.arange(raw.shape[1]) + 0.5)) / area
    cy = float(raw.sum(1) @ (np.arange(raw.shape[0]) + 0.5)) / area
    # soft extents: each column's (row's) max coverage sums to the width (height)
    aspect = soft.max(axis=1).sum() / max(float(soft.max(axis=0).sum()), 1e-6)  # h / w
    best = (np.inf, SHAPES[0], 0.0)
    for shape in SHAPES:
        w = (area / (_SHAPE_AREA[shape] * aspect)) ** 0.5
        h = w * aspect
        template = _coverage(shape, cx, cy - _SHAPE_CENTROID_Y[shape] * h, w, h, alpha.shape)
        error = min(np.abs(soft - _blur(template, b)).mean() for b in _TEMPLATE_BLURS)
        best = min(best, (error, shape, max(w, h)))
    return best[1], best[2], cx


def _coverage(shape, cx, cy, w, h, hw, sub=4):
    """Fraction of each pixel of an (h, w) grid covered by `shape` filling the w x h box
    centred at (cx, cy), from sub x sub samples per pixel: the template read_attributes fits."""
    offsets = (np.arange(sub) + 0.5) / sub
    py = (np.arange(hw[0])[:, None] + offsets[None, :]).ravel()  # (h * sub,)
    px = (np.arange(hw[1])[:, None] + offsets[None, :]).ravel()  # (w * sub,)
    u = (px[None, :] - cx) / max(w, 1e-6)  # (1, w * sub), in [-0.5, 0.5] inside the box
    v = (py[:, None] - cy) / max(h, 1e-6)  # (h * sub, 1)
    inside = _inside(shape, u, v)  # (h * sub, w * sub)
    return inside.reshape(hw[0], sub, hw[1], sub).mean(axis=(1, 3))


def _blur(a, b):
    """Separable 3-tap blur [b, 1 - 2b, b] of a 2-D array (zero outside)."""
    if b == 0:
        return a
    out = (1 - 2 * b) * a
    out[1:] += b * a[:-1]
    out[:-1] += b * a[1:]
    a = out
    out = (1 - 2 * b) * a
    out[:, 1:] += b * a[:, :-1]
    out[:, :-1] += b * a[:, 1:]
    return out


def _inside(shape, u, v):
    """Whether box coordinates (u, v) in [-0.5, 0.5]^2 (v down) lie inside `shape`."""
    box = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if shape == "circle":
        return u ** 2 + v ** 2 <= 0.25
    if shape == "square":
        return box
    if shape == "triangle":
        return box & (np.abs(u) <= (v + 0.5) / 2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 0.5
    if shape == "cross":
        t = _CROSS_ARM / 2
        return box & ((np.abs(u) <= t) | (np.abs(v) <= t))
    raise ValueError(f"unknown shape {shape!r}")


def _nearest_name(rgb, palette):
    names = list(palette)
    d = np.linalg.norm(np.array([palette[c] for c in names], dtype=np.float32) - rgb, axis=1)
    return names[int(np.argmin(d))]


def _position(cx_frac, n_objects, rank):
    """Two objects are left and right; otherwise by thirds of the image width."""
    if n_objects == 2:
        return ("left", "right")[rank]
    return "left" if cx_frac < 1 / 3 else "right" if cx_frac > 2 / 3 else "center"


def score_attributes(pred, target):
    """Per-attribute correctness of one image, objects matched in order (left to right):
    shape/color/size/position = fraction of the target's objects matched (when the target has
    none: 1.0 if the prediction has none too), count and background = 1.0 or 0.0."""
    p_objs, t_objs = pred.get("objects") or [], target.get("objects") or []
    scores = {}
    for key in ("shape", "color", "size", "position"):
        if t_objs:
            hits = sum(1 for p, t in zip(p_objs, t_objs) if p.get(key) == t.get(key))
            scores[key] = hits / len(t_objs)
        else:
            scores[key] = float(not p_objs)
    scores["count"] = float(len(p_objs) == len(t_objs))
    scores["background"] = float(pred.get("background") == target.get("background"))
    return scores
