"""Train the flow model in the VAE's latent space: the whole latent-diffusion recipe.

    python train_flow.py                 # built-in shapes: VAE (if needed) -> latents -> DiT -> samples
    python train_flow.py --data ~/photos --image-size 64 --vae runs/vae64/ckpt.pt
    torchrun --nproc_per_node=4 train_flow.py --preset B     # several GPUs (DDP), VAE included

The file reads top to bottom: DEFAULTS (every number of the recipe), `train` (the command), the
recipe's steps, the training step `train_step` (which bench.py times too), the estimate of the
whole command printed before the slow work (`estimate_phases`), then the command line.

Slide "Latent Diffusion Models (LDMs) - Recipe", one function per step:
  1. Data: the images x_1..x_N (data.py), and the VAE that makes their latent space
     (`ensure_vae`: with no --vae, the automatic VAE of this data, trained first by train_vae.py).
  2. Encoding: convert every image into a latent with the VAE encoder's *mean* (`cached_latents`:
     done once, by the VAE run, and cached on disk, keyed by the VAE checkpoint and the data).
  3. Latent data: z_1..z_N, normalised per channel with the VAE's latent statistics
     (`prepare_latents` returns them with the prompts).
  4. Latent diffusion model: a DiT trained with the CondOT flow matching loss (flow.py), with each
     prompt replaced by the empty prompt with probability 10% so that classifier-free guidance
     works, and training times t drawn logit-normal (Stable Diffusion 3's recipe; the lecture's
     uniform t with --t-dist uniform) (`train_dit`).
  5. Decoding: sample latents with the guided Euler sampler and decode them (sample.py); the run
     writes a grid of EMA samples for fixed prompts every few hundred steps (`sample_grid`).

Outputs under --out (default runs/flow): ckpt.pt (everything needed to resume exactly),
samples_<step>.png, log.jsonl, latents.pt (cache).
"""
import argparse
import hashlib
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import data as data_lib
import train_vae
from checkpoint import (config_mismatch, load_checkpoint, load_vae, restore_training, rng_state,
                        save_checkpoint, set_rng_state, training_state, vae_finished)
from common import (MAX_STEPS, HelpFormatter, UserError, autocast, finite, fraction, is_oom,
                    maybe_compile, pick_amp, positive, run_main, set_threads, setup_backends)
from dit import PRESETS, DiT, DiTConfig, count_parameters, dit_config
from embeddings import null_prompt, prompt_ids, prompt_words, tokenize
from flow import flow_matching_loss
from runs import (RunFolder, append_json, parse_with_given, plot_loss, restore_settings,
                  run_files, settings_of, trim_log, write_json, write_prompts)
from sample import generate
from shapes import HELD_OUT_PAIRS, held_out_objects
from training import (EMA, LossGuard, Progress, StopFlag, Stopwatch, adamw, add_training_flags,
                      all_ranks_sum, any_rank, barrier, check_ranks_agree, gather_objects,
                      init_distributed, oom_error)
from vae import VAE

# The recipe's numbers, all in one place; every flag's default is read from here. The same on
# every device: the measured 15-minute CPU recipe, which a GPU runs with torch.compile and bf16
# (README: a larger --preset is the next step there). RESULTS.md has how they were found.
DEFAULTS = {
    # data
    "image_size": 32, "n_builtin": 20000, "hold_out_pairs": False,
    # the DiT (dit.PRESETS) on the VAE's latents, p x p latent patches per token; prompt tokens
    # of 4 bytes each, following the bytes (prompt_words False) or starting at each word
    "preset": "tiny", "patch_size": 2, "prompt_words": False,
    # flow matching: training times t, and the prompt dropped (-> CFG's null condition) at p_uncond
    "t_dist": "logit_normal", "p_uncond": 0.1,
    # optimisation: AdamW, linear warm-up then a constant rate, gradients clipped, weights averaged
    "steps": 3600, "batch_size": 64, "lr": 1e-3, "adam_betas": [0.9, 0.95], "weight_decay": 0.0,
    "warmup": 200, "grad_clip": 1.0, "ema_decay": 0.995,
    # sample grids: grid_images EMA samples for each of grid_prompts prompts, every sample_every
    # steps and at the end, with sample_steps Euler steps at guidance weight cfg_scale
    "sample_every": 1000, "grid_prompts": 8, "grid_images": 8, "sample_steps": 50,
    "cfg_scale": 4.0,
    # reports
    "log_every": 50, "ckpt_every": 500,
}


def train(args, given, rank, world, device):
    """The recipe: latents (steps 1-3), then the DiT (step 4) with its sample grids (step 5)."""
    setup_backends(device)
    folder = RunFolder(args.out, args.resume, args.overwrite, settings_of(args),
                       [("--vae", args.vae), ("--data", args.data)]) if rank == 0 else None
    resume = None
    if args.resume:
        resume = load_checkpoint(Path(args.out) / "ckpt.pt", "flow", flag="--resume")
        restore_settings(args, given, resume.get("args", {}), EXPERIMENT, args.allow_changes,
                         verbose=rank == 0)
        if "vae" not in given:          # the VAE it was trained with, found from any folder
            args.vae = _resumed_vae(resume, args.vae)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if resume is not None and resume["step"] >= args.steps:
        if rank == 0:
            print(f"{Path(args.out) / 'ckpt.pt'} is already at step {resume['step']} of "
                  f"{args.steps}; nothing to do (a larger --steps trains on)")
        return 0
    amp = pick_amp(args.amp, device)
    watch = Stopwatch()
    try:
        latents = prepare_latents(args, folder, resume, rank, world, device, watch)
        train_dit(args, latents, Path(args.out), resume, amp, rank, world, device, watch)
    finally:
        if folder is not None:
            folder.release()
    if rank == 0:
        print(watch.report())                                      # where the time went
        append_json(Path(args.out) / "log.jsonl", {"step": args.steps, "seconds": watch.seconds})
    return 0


# Settings whose change makes another experiment: --resume refuses them without --allow-changes.
EXPERIMENT = {"data", "n_builtin", "seed", "image_size", "preset", "patch_size", "vae",
              "vae_steps", "hold_out_pairs", "prompt_words"}


def _resumed_vae(resume, stored):
    """The VAE file a resumed run was trained with, found from any working folder: its stored
    --vae when that names a file from here, else the absolute path its checkpoint holds (also
    for the automatic VAE, stored as None)."""
    for path in (stored, resume["vae"]["path"]):
        if path is not None and Path(path).is_file():
            return path
    raise UserError(f"--resume: the run was trained with the VAE {resume['vae']['path']}, which "
                    f"is not there any more; pass that VAE (or a copy) with --vae")


# ---------------------------------------------------------------------------------------------
# Steps 1-3: data, VAE, latents

@dataclass
class Latents:
    """The training set in latent space: what the DiT learns from (recipe step 3)."""
    z: torch.Tensor          # (N, C, h, w) encoder means, normalised per channel (~unit scale)
    tokens: torch.Tensor     # (N, S) the captions as prompt tokens
    name: str                # the data's name (data.ImageSet.name)
    prompts: list            # fixed prompts of the sample grids
    words: dict              # word -> count over the captions (caption_words): kept in ckpt.pt
    vae: VAE                 # the EMA VAE, to decode samples
    vae_info: dict           # its path, sha1, config and latent statistics: kept in ckpt.pt
    config: DiTConfig        # the DiT that fits these latents and prompts


def prepare_latents(args, folder, resume, rank, world, device, watch):
    """Steps 1-3: the data, its VAE, and the normalised latents of every training image. Every
    check that can fail (the data, the sizes) comes before the slow work; rank 0 prints the
    estimate of the whole command, then claims the run folder (`folder`) before it writes the
    latent cache there."""
    with watch("data and checkpoints"):
        train_set = data_lib.load_dataset(args.data, args.image_size, "train",
                                          n_builtin=args.n_builtin, seed=args.seed)
        if args.hold_out_pairs and train_set.attributes is None:
            raise UserError(f"--hold-out-pairs needs the built-in shapes, whose captions name "
                            f"colour and shape; drop --data {args.data} or --hold-out-pairs")
        vae_path, vae_todo = vae_plan(args)
        factor = vae_factor(args, vae_path, vae_todo)
    if args.image_size % factor or (args.image_size // factor) % args.patch_size:
        raise UserError(f"--image-size {args.image_size} must be divisible by the VAE factor "
                        f"{factor} x patch size {args.patch_size} = {factor * args.patch_size}")
    group = PRESETS[args.preset].prompt_bytes_per_token if args.prompt_words else 0
    longest = max(len(prompt_ids(c, group)) for c in train_set.captions)   # BOS included
    max_len = min(256, -(-longest // 8) * 8)                     # fit the data, multiple of 8
    if rank == 0:
        data_lib.announce(train_set)
        unit = "token positions (a word starts a new token)" if group else "bytes"
        print(f"prompts: the model reads up to {max_len - 1} {unit} of a prompt (the longest "
              f"caption has {longest - 1}); longer prompts are cut", flush=True)
    if rank == 0 and args.steps + (vae_todo[1] if vae_todo else 0) >= ESTIMATE_MIN_STEPS:
        with watch("estimate"):
            print(estimate_report(args, device, resume, vae_path, vae_todo, len(train_set),
                                  max_len, world), flush=True)
    with watch("VAE (train_vae.py)"):
        ensure_vae(args, vae_path, vae_todo, rank, world, device)
    with watch("data and checkpoints"):
        vae, vae_ckpt = load_vae(vae_path, device)
    if rank == 0 and vae_ckpt.get("data") != train_set.name:
        print(f"warning: the VAE {vae_path} was trained on {vae_ckpt.get('data')}, this run uses "
              f"{train_set.name}; pass --vae with a VAE trained on these images if the samples "
              f"look wrong", file=sys.stderr)
    vae_sha1 = train_vae.file_sha1(vae_path)
    C, h = vae.config.latent_channels, args.image_size // factor  # latent grid (C, h, h)
    config = dit_config(args.preset, input_size=h, in_channels=C, patch_size=args.patch_size,
                        max_prompt_len=max_len, prompt_words=args.prompt_words)
    out = Path(args.out)
    if resume is not None:                                           # before the slow work
        _check_resumable(resume, config, vae_sha1, world, out / "ckpt.pt", args.allow_changes)

    data_key = data_lib.dataset_key(args.data, args.image_size, args.n_builtin, args.seed)
    key = train_vae.latent_cache_key(vae_sha1, data_key)
    with watch("encoding the latent cache"):
        if rank == 0:
            folder.claim()
            mu = cached_latents(out, vae_path, key, vae, train_set.images, device, write=True)
        barrier(world)
        if rank != 0:
            mu = cached_latents(out, vae_path, key, vae, train_set.images, device, write=False)
    vae_info = {"path": str(Path(vae_path).resolve()), "sha1": vae_sha1,
                "config": vae_ckpt["config"], "latent_mean": vae.latent_mean.cpu(),
                "latent_std": vae.latent_std.cpu()}
    captions = train_set.captions
    if args.hold_out_pairs:
        keep = composition_split(train_set, rank)
        mu, captions = mu[keep], [captions[i] for i in keep]
    return Latents(z=vae.normalize_latents(mu.to(device)),
                   tokens=tokenize(captions, max_len, config.prompt_word_group).to(device),
                   name=train_set.name, prompts=sample_prompts(captions, args.grid_prompts),
                   words=caption_words(captions), vae=vae, vae_info=vae_info, config=config)


def caption_words(captions):
    """How often each word (embeddings.prompt_words, lower case) occurs in the training captions:
    the checkpoint keeps it so that sample.py can name the words of a prompt the model never
    saw."""
    return dict(Counter(w.lower() for caption in captions for w in prompt_words(caption)))


def composition_split(train_set, rank):
    """The composition benchmark (--hold-out-pairs): indices of the training images that show
    none of shapes.HELD_OUT_PAIRS. Only the DiT loses the others: the VAE never reads a prompt,
    so it (and its latent cache) stays the one of the full data."""
    keep = [i for i, attrs in enumerate(train_set.attributes) if not held_out_objects(attrs)]
    pairs = ", ".join(f"{color} {shape}" for color, shape in HELD_OUT_PAIRS)
    say(rank, f"composition benchmark: {len(train_set) - len(keep)} of {len(train_set)} training "
              f"images show a held-out colour x shape pair ({pairs}); the DiT never sees them "
              f"(evaluate.py scores those pairs apart)")
    return keep


def auto_vae_path(args):
    """Where the automatic VAE of this data lives: one per dataset and image size (and per
    --vae-steps, when given), e.g. runs/vae-shapes-32px-seed0-n20000/ckpt.pt."""
    if args.data is None:
        tag = f"shapes-{args.image_size}px-seed{args.seed}-n{args.n_builtin}"
    else:
        folder = Path(args.data).expanduser().resolve()
        digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
        tag = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', folder.name)}-{digest}-{args.image_size}px"
    if args.vae_steps is not None:
        tag += f"-{args.vae_steps}steps"
    return Path("runs") / f"vae-{tag}" / "ckpt.pt"


def vae_plan(args):
    """(path, todo) of the VAE this run uses: --vae (todo None), or the automatic one of this data
    (`auto_vae_path`); todo is None when it is finished, else (flags for train_vae.py, its steps
    still to train, the line that says why). A finished automatic VAE trained for fewer steps
    than today's default is used as is (todo None); the line then is a note."""
    if args.vae is not None:
        path = Path(args.vae)
        if not path.is_file():
            what = "is a folder; pass its ckpt.pt" if path.is_dir() else "file not found"
            raise UserError(f"--vae {args.vae}: {what}; train one with train_vae.py or omit --vae "
                            f"to use/train the automatic VAE ({auto_vae_path(args)})")
        return str(path), None
    path = auto_vae_path(args)
    ckpt = load_checkpoint(path, "vae", flag="--vae") if path.is_file() else None
    target = args.vae_steps or train_vae.DEFAULTS["steps"]
    if ckpt is None:
        flags = ["--overwrite"] if run_files(path.parent) else []
        return str(path), (flags, target, f"no --vae given and no {path}: training the VAE first "
                                          f"with train_vae.py (recipe: latent space first, then "
                                          f"the flow model)")
    if not vae_finished(ckpt):
        left = max(0, ckpt.get("target_steps", target) - ckpt["step"])
        return str(path), (["--resume"], left, f"{path} is unfinished (a run stopped while "
                                               f"training it): resuming it to completion first")
    if args.vae_steps is None and ckpt["step"] < target:
        print(f"note: {path} was trained for {ckpt['step']} steps, fewer than train_vae.py's "
              f"default of {target} now; using it as is (--vae-steps {target} trains a new one "
              f"beside it)", flush=True)
    return str(path), None


def vae_factor(args, vae_path, todo):
    """The downsampling factor of the VAE this run uses, known before any training: from the
    checkpoint (checked as load_vae checks it) when it is finished, else from the preset the
    automatic VAE is trained with."""
    if todo is None:
        return load_vae(vae_path, "cpu")[0].config.factor
    return train_vae.vae_config_from_args(argparse.Namespace(image_size=args.image_size,
                                                             vae_preset=None)).factor


def ensure_vae(args, path, todo, rank, world, device):
    """Train (or finish) the automatic VAE when `todo` (from vae_plan) says so: train_vae.py with
    its defaults and this run's data, size, seed and device, every rank taking part."""
    barrier(world)                                 # every rank has read the file before it changes
    if todo is None:
        return
    flags, _, why = todo
    say(rank, why)
    flags = flags + ["--out", str(Path(path).parent), "--image-size", str(args.image_size),
                     "--device", args.device, "--seed", str(args.seed), "--amp", args.amp,
                     "--n-builtin", str(args.n_builtin)]
    flags += ["--data", args.data] if args.data else []
    flags += ["--steps", str(args.vae_steps)] if args.vae_steps is not None else []
    flags += [] if args.compile is None else ["--compile" if args.compile else "--no-compile"]
    vae_args, vae_given = train_vae.parse_args(flags)
    train_vae.train(vae_args, vae_given, rank, world, device, quiet_data=True,
                    resume_command=f"the same python train_flow.py command (it finishes the VAE "
                                   f"in {Path(path).parent}, then trains the flow model)")


def say(rank, text):
    """A line on stdout from rank 0 only."""
    if rank == 0:
        print(text, flush=True)


def cached_latents(out, vae_path, key, vae, images, device, write):
    """Encoder means of all images (recipe step 2): from the run's latent cache, or from the one
    train_vae.py left beside the VAE, when its key, shape and values are right; otherwise
    (missing, stale or damaged) encoded again and, when `write`, saved atomically in the run."""
    vae_config = vae.config
    shape = (images.shape[0], vae_config.latent_channels,
             images.shape[2] // vae_config.factor, images.shape[3] // vae_config.factor)
    cache_path = out / train_vae.LATENT_CACHE
    mu, why = train_vae.read_latent_cache(cache_path, key, shape)
    if mu is not None:
        return mu
    if why != "missing":
        print(f"latent cache {cache_path} is {why}; rebuilding it")
    mu, _ = train_vae.read_latent_cache(Path(vae_path).parent / train_vae.LATENT_CACHE, key, shape)
    if mu is None:                                 # else the VAE run encoded these very images
        t0 = time.perf_counter()
        mu = train_vae.encode_means(vae, images, device)
        print(f"encoded {shape[0]} images to latents {tuple(shape[1:])} in "
              f"{time.perf_counter() - t0:.1f}s")
        if not torch.isfinite(mu).all():
            raise UserError("the VAE gives inf/NaN latents for these images; retrain it (lower "
                            "--lr) or pass another --vae")
    if write:
        train_vae.write_latent_cache(cache_path, key, mu)
    return mu


def sample_prompts(captions, count):
    """Fixed prompts for the sample grids: the first `count` distinct captions ("" if none)."""
    seen = []
    for caption in captions:
        if caption not in seen:
            seen.append(caption)
        if len(seen) == count:
            break
    return seen or [""]


# ---------------------------------------------------------------------------------------------
# Step 4: the DiT, trained with the CondOT flow matching loss (step 5's grids on the way)

def build(config, args, device, amp):
    """Recipe step 4's state: the DiT (initialised from --seed), its EMA, AdamW and the
    GradScaler (fp16 only)."""
    torch.manual_seed(args.seed)
    model = DiT(config).to(device)
    ema = EMA(model, args.ema_decay)
    opt = adamw(model.parameters(), args.lr, tuple(args.adam_betas), args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    return model, ema, opt, scaler


def train_step(net, model, ema, opt, scaler, z, tokens, null, step, args, amp):
    """One optimizer step of recipe step 4 on latents z (B, C, h, w) and prompt tokens (B, S):
    the learning rate of this step (linear warm-up, then constant), the CondOT flow matching loss
    with prompts dropped to `null` at --p-uncond, backward, clipped gradients, AdamW, the EMA.
    `net` is the model as called (compiled or DDP-wrapped), `model` the plain one. Returns the
    loss, detached, without a host sync. bench.py times this very function."""
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
    with autocast(z.device, amp):
        loss = flow_matching_loss(net, z, tokens, null, args.p_uncond, args.t_dist)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    ema.update(model, step)
    return loss.detach()


def train_dit(args, latents, out, resume, amp, rank, world, device, watch):
    """Train (or resume) the DiT on the latents; writes ckpt.pt, log.jsonl and sample grids."""
    ckpt_path = out / "ckpt.pt"
    local_batch = args.batch_size // world
    shard = torch.arange(rank, len(latents.z), world, device=device)    # this rank's examples
    null = null_prompt(latents.tokens.shape[1]).to(device)               # (1, S): the empty prompt

    model, ema, opt, scaler = build(latents.config, args, device, amp)
    step = 0
    if resume is not None:
        step = restore_training(resume, model, ema, opt, scaler, resume["rng"][rank])
        for group in opt.param_groups:                 # a changed --adam-betas applies too
            group["betas"] = tuple(args.adam_betas)
        if rank == 0:
            trim_log(out / "log.jsonl", step)
            print(f"resumed {ckpt_path} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)                       # per-rank data order and noise
    if rank == 0:
        write_json(out / "args.json", settings_of(args), "settings")
        C, h, w = latents.z.shape[1:]
        print(f"DiT-{args.preset}/{args.patch_size} ({count_parameters(model) / 1e6:.2f}M params) on "
              f"{C}x{h}x{w} latents of {len(latents.z)} images ({latents.name}), device {device}"
              f"{f' x{world}' if world > 1 else ''}, amp {amp}, batch {args.batch_size}")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    net, _ = maybe_compile(net, device, args.compile)

    progress = Progress(out / "log.jsonl" if rank == 0 else None, args.steps, step, args.batch_size,
                        resume.get("elapsed", 0.0) if resume is not None else 0.0)

    def save():                                    # collective under DDP: every rank takes part
        with watch("data and checkpoints"), progress.paused():
            state = run_state(args, latents, step, model, ema, opt, scaler, world, progress.elapsed())
            if rank == 0:
                save_checkpoint(ckpt_path, state)

    def grid():
        if rank == 0:
            with watch("sample grids"), progress.paused():
                sample_grid(out / f"samples_{step:06d}.png", ema.model, latents, args, amp)

    def mean_loss():                               # over every rank: all stop at the same step
        return all_ranks_sum(loss_sum, world).item() / (pending * world) if pending else None

    stopper = StopFlag()
    guard = LossGuard(ckpt_path, amp)
    loss_sum = torch.zeros((), device=device)
    pending, start = 0, step                       # steps summed in loss_sum
    t_start = time.perf_counter()
    try:
        with watch("DiT training"):
            while step < args.steps and not any_rank(stopper.stop, world, device):
                idx = shard[torch.randint(len(shard), (local_batch,), device=device)]
                try:
                    loss = train_step(net, model, ema, opt, scaler, latents.z[idx],
                                      latents.tokens[idx], null, step, args, amp)
                except (RuntimeError, MemoryError) as e:
                    if is_oom(e):
                        raise oom_error(args.batch_size)
                    raise
                step += 1
                loss_sum += loss
                pending += 1
                if step == start + 1:                  # the loss before any update: the reference
                    guard.reference(all_ranks_sum(loss, world).item() / world)
                if step % args.log_every == 0 or step == args.steps or step == start + 1:
                    mean = mean_loss()
                    guard.check(mean, step)
                    if rank == 0:
                        progress.report(step, {"loss": mean, "lr": opt.param_groups[0]["lr"]})
                        with progress.paused():
                            plot_loss(out / "log.jsonl", out / "loss.png")
                    loss_sum.zero_()
                    pending = 0
                if step % args.ckpt_every == 0 and step < args.steps:
                    guard.check(mean_loss(), step, model)
                    save()
                if step % args.sample_every == 0 and step < args.steps:
                    grid()
        guard.check(mean_loss(), step, model)
        save()
        if stopper.stop:
            if rank == 0:
                print(f"saved {ckpt_path} at step {step}; resume with: python train_flow.py "
                      f"--resume --out {args.out}", file=sys.stderr)
            sys.exit(stopper.exit_code)
    finally:
        stopper.restore()
    grid()
    if world > 1:
        check_ranks_agree(model, world, rank)
    if rank == 0:
        minutes = (time.perf_counter() - t_start) / 60
        print(f"done: {step} steps in {minutes:.1f} min; wrote {ckpt_path} and "
              f"{out / f'samples_{step:06d}.png'}")
        print(f"sample more with: python sample.py --ckpt {ckpt_path} --prompt \"...\"; a file "
              f"for sampling only (no optimizer, bf16 weights: about an eighth of ckpt.pt's "
              f"{ckpt_path.stat().st_size / 2 ** 20:.0f} MiB): python sample.py --ckpt "
              f"{ckpt_path} --export model.pt --export-dtype bf16")


def run_state(args, latents, step, model, ema, opt, scaler, world, elapsed):
    """The flow checkpoint: training state (every rank's RNG), plus what sampling needs."""
    return training_state("flow", step, latents.config.to_dict(), model, ema, opt, scaler,
                          gather_objects(rng_state(), world), image_size=args.image_size,
                          data=latents.name, sample_prompts=latents.prompts,
                          caption_words=latents.words, vae=latents.vae_info,
                          args=settings_of(args), target_steps=args.steps, elapsed=elapsed)


def sample_grid(path, model, latents, args, amp):
    """Step 5: --grid-images EMA samples per fixed prompt, one row each under its prompt, decoded
    by the VAE (prompts.txt beside lists the rows; the PNG's text chunks hold prompts and
    settings)."""
    rows = [p for p in latents.prompts for _ in range(args.grid_images)]
    images = generate(model, latents.vae, rows, args.sample_steps, args.cfg_scale, seed=0, amp=amp)
    info = {"prompts": latents.prompts, "seed": 0, "cfg": args.cfg_scale,
            "steps": args.sample_steps, "checkpoint": str(path.parent / "ckpt.pt")}
    labels = [p or "(empty prompt: unconditional)" for p in latents.prompts]
    data_lib.save_grid(path, images, nrow=args.grid_images, scale=data_lib.grid_scale(args.image_size),
                       info=info, row_labels=labels)
    prompts = path.parent / "prompts.txt"
    if not prompts.exists():
        write_prompts(prompts, latents.prompts)


# ---------------------------------------------------------------------------------------------
# How long the whole command will take: a few timed steps of each phase, before the slow work

# Runs this short start at once: timing their phases would take a noticeable share of them.
ESTIMATE_MIN_STEPS = 200


def estimate_phases(args, device, world=1, vae_steps=0, encode_images=0, dit_steps=0, grids=0,
                    max_prompt_len=80, timed=1):
    """Seconds each phase will take on this machine: `timed` timed calls (after an untimed one) of
    train_vae.train_step, the VAE encoder, train_step and one Euler step of a sample grid, on
    random inputs of the run's shapes, times the calls each phase makes. Eager, this process's
    batch. The global RNG state is restored, so an estimate never changes a run's numbers."""
    rng = rng_state()
    amp = pick_amp(args.amp, device)
    local = args.batch_size // world
    seconds = {}
    try:
        vae_args = argparse.Namespace(**train_vae.DEFAULTS, seed=args.seed, vae_preset=None)
        vae_args.image_size = args.image_size
        vae_config = train_vae.vae_config_from_args(vae_args)
        vae, ema, opt, scaler = train_vae.build(vae_config, vae_args, device, amp)
        images = torch.randint(0, 256, (vae_args.batch_size // world, 3, args.image_size,
                                        args.image_size), dtype=torch.uint8, device=device)
        if vae_steps:
            step = _time_call(lambda: train_vae.train_step(vae, vae, ema, opt, scaler, images, 0,
                                                           vae_args, amp), timed, device)
            seconds["VAE"] = vae_steps * step
        if encode_images:
            batch = data_lib.to_model_range(images[:1].expand(256, -1, -1, -1))
            with torch.no_grad():
                call = _time_call(lambda: vae.encode(batch), timed, device)
            seconds["encoding"] = encode_images / 256 * call
        h = args.image_size // vae_config.factor
        config = dit_config(args.preset, input_size=h, in_channels=vae_config.latent_channels,
                            patch_size=args.patch_size, max_prompt_len=max_prompt_len)
        model, ema, opt, scaler = build(config, args, device, amp)
        z = torch.randn(local, config.in_channels, h, h, device=device)
        tokens = torch.randint(1, 257, (local, max_prompt_len), device=device)
        null = null_prompt(max_prompt_len).to(device)
        if dit_steps:
            step = _time_call(lambda: train_step(model, model, ema, opt, scaler, z, tokens, null,
                                                 0, args, amp), timed, device)
            seconds["DiT"] = dit_steps * step
        if grids:
            n = args.grid_prompts * args.grid_images
            x = torch.randn(2 * n, config.in_channels, h, h, device=device)
            both = torch.randint(1, 257, (2 * n, max_prompt_len), device=device)
            t = torch.rand(2 * n, device=device)
            with torch.inference_mode(), autocast(device, amp):
                euler = _time_call(lambda: ema.model(x, t, both), timed, device)
            seconds["sample grids"] = grids * args.sample_steps * euler
    finally:
        set_rng_state(rng)
    return seconds


def _time_call(fn, timed, device):
    """Median seconds of fn() over `timed` calls, after one untimed call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(timed):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def estimate_report(args, device, resume, vae_path, vae_todo, n_images, max_prompt_len, world):
    """The line that tells, before the slow work, how long this command will take here."""
    start = resume["step"] if resume is not None else 0
    vae_steps = vae_todo[1] if vae_todo is not None else 0
    grids = len(range(args.sample_every, args.steps, args.sample_every)) + 1
    grids -= len(range(args.sample_every, start + 1, args.sample_every)) if start else 0
    caches = [Path(args.out) / train_vae.LATENT_CACHE,
              Path(vae_path).parent / train_vae.LATENT_CACHE]
    encode = n_images if vae_todo is not None or not any(p.is_file() for p in caches) else 0
    seconds = estimate_phases(args, device, world, vae_steps, encode, args.steps - start, grids,
                              max_prompt_len)
    parts = " + ".join(f"{name} {s / 60:.1f}" for name, s in seconds.items())
    return (f"estimate for this command on this machine: {parts} = "
            f"{sum(seconds.values()) / 60:.1f} min (from timed steps of each phase)")


# ---------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    """(args, given): the flags, and which of them the command line set."""
    p = argparse.ArgumentParser(
        description="Train a DiT flow model (CondOT flow matching, CFG) in a VAE's latent space.",
        epilog="""examples:
  python train_flow.py                      # the whole recipe on the built-in shapes -> runs/flow
  python train_flow.py --data ~/photos --image-size 64 --out runs/photos
  python train_flow.py --steps 20 --vae-steps 20 --n-builtin 500 --out runs/smoke   # a quick test
""", formatter_class=HelpFormatter)
    add_training_flags(p, DEFAULTS, "runs/flow")
    p.add_argument("--hold-out-pairs", action="store_true", default=DEFAULTS["hold_out_pairs"],
                   help="built-in shapes only: leave the 8 colour x shape pairs of "
                        "shapes.HELD_OUT_PAIRS (red circle, green square, ...) out of the DiT's "
                        "training, so that evaluate.py measures whether prompts compose")
    p.add_argument("--prompt-words", action="store_true", default=DEFAULTS["prompt_words"],
                   help="every word of a caption starts a new prompt token, so a word is the same "
                        "tokens in every caption (default: tokens of 4 consecutive bytes, which cut "
                        "words differently from one caption to the next)")
    p.add_argument("--vae", default=None,
                   help="VAE checkpoint from train_vae.py. Default: the automatic VAE of this data, "
                        "runs/vae-<data>-<size>px.../ckpt.pt, trained first (train_vae.py's "
                        "defaults) when it does not exist")
    p.add_argument("--vae-steps", type=positive(int, at_most=MAX_STEPS), default=None,
                   help="training steps of the automatic VAE (e.g. 3 for a smoke test; its folder "
                        "name says so). Default: train_vae.py's")
    p.add_argument("--preset", default=DEFAULTS["preset"], choices=sorted(PRESETS), help="DiT size")
    p.add_argument("--patch-size", type=positive(int), default=DEFAULTS["patch_size"],
                   help="DiT patch size p on the latent grid")
    p.add_argument("--t-dist", choices=["uniform", "logit_normal"], default=DEFAULTS["t_dist"],
                   help="distribution of training times t: uniform on [0, 1] (the lecture's), or "
                        "logit-normal (SD3's: more samples at intermediate t)")
    p.add_argument("--p-uncond", type=fraction, default=DEFAULTS["p_uncond"],
                   help="probability of replacing a sample's prompt by the empty prompt (for CFG)")
    p.add_argument("--adam-betas", type=fraction, nargs=2, metavar=("B1", "B2"),
                   default=DEFAULTS["adam_betas"], help="AdamW's beta1 and beta2")
    p.add_argument("--warmup", type=positive(int, allow_zero=True), default=DEFAULTS["warmup"],
                   help="linear learning-rate warm-up steps")
    p.add_argument("--sample-every", type=positive(int), default=DEFAULTS["sample_every"],
                   help="steps between EMA sample grids samples_<step>.png (and one at the end)")
    p.add_argument("--grid-prompts", type=positive(int), default=DEFAULTS["grid_prompts"],
                   help="rows of the sample grids: the first distinct captions of the data")
    p.add_argument("--grid-images", type=positive(int), default=DEFAULTS["grid_images"],
                   help="images per row of the sample grids")
    p.add_argument("--sample-steps", type=positive(int, at_most=MAX_STEPS),
                   default=DEFAULTS["sample_steps"],
                   help="Euler steps for the sample grids")
    p.add_argument("--cfg", "--cfg-scale", dest="cfg_scale", metavar="W", type=finite,
                   default=DEFAULTS["cfg_scale"],
                   help="guidance weight for the sample grids")
    return parse_with_given(p, argv)


def main(argv=None):
    args, given = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    line = set_threads(args.threads)
    if rank == 0 and device.type == "cpu":
        print(line, flush=True)
    try:
        return train(args, given, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


# Which flag sets each DiT config field, for the --resume mismatch message ("" = the rest).
RESUME_FLAGS = {"patch_size": "--patch-size", "input_size": "--image-size or the VAE",
                "input_width": "--image-size or the VAE", "in_channels": "the VAE (--vae)",
                "max_prompt_len": "the captions of --data", "prompt_words": "--prompt-words",
                "": "--preset"}


def _check_resumable(ckpt, config, vae_sha1, world, ckpt_path, allow_changes):
    """Refuse to resume a run whose model, VAE or number of processes differs from now (another
    VAE only with --allow-changes)."""
    saved = {**DiTConfig().to_dict(), **ckpt["config"]}    # fields added since: their defaults
    diff = config_mismatch(saved, config.to_dict(), RESUME_FLAGS)
    if diff:
        raise UserError(f"--resume {ckpt_path}: model configuration differs ({diff}); use the "
                        f"same flags or another --out")
    if ckpt["vae"]["sha1"] != vae_sha1 and not allow_changes:
        raise UserError(f"--resume {ckpt_path}: the run was trained with another VAE "
                        f"({ckpt['vae']['path']}); pass that one with --vae (or --allow-changes "
                        f"to go on with this one)")
    if len(ckpt["rng"]) != world:
        raise UserError(f"--resume {ckpt_path}: saved by {len(ckpt['rng'])} processes, now {world}; "
                        f"resume with the same number of processes")


if __name__ == "__main__":
    sys.exit(run_main(main))
