"""Train the beta-VAE that makes the latent space (Lecture 04, Section 6, Algorithm 7).

    python train_vae.py                      # built-in shapes, 32 px, CPU or GPU
    python train_vae.py --data ~/photos --image-size 64 --vae-preset 64
    torchrun --nproc_per_node=2 train_vae.py             # one VAE, DDP over 2 processes or GPUs

Algorithm 7, "beta-VAE Training Procedure": for each mini-batch, encode (mu, log sigma^2),
reparameterize z = mu + sigma * eps, decode, and minimise L_recon + beta * L_KL (vae.vae_loss).
Then Recipe step 2 needs the encoder *mean* of every image; the flow model works on latents
normalised per channel with the statistics computed here and stored in the checkpoint.

The file reads like train_flow.py: DEFAULTS, `train` (the command), `build` and `train_step`
(Algorithm 7's loop body, which bench.py times too), the loop `train_vae`, then the command line.

Outputs under --out (default runs/vae): ckpt.pt (weights, EMA weights, optimizer, step, RNG
states, config, latent statistics), latents.pt (the encoder means of the training images, which
train_flow.py reads instead of encoding them again), recon.png (held-out originals above their
reconstructions) and log.jsonl (one JSON line per progress report).
"""
import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import data as data_lib
from checkpoint import (config_mismatch, flatten, load_checkpoint, restore_training, rng_state,
                        safe_load, save_checkpoint, training_state, vae_finished)
from common import (HelpFormatter, Phase, UserError, autocast, is_oom, maybe_compile, pick_amp,
                    positive, run_main, set_threads, setup_backends)
from kl import kl_to_standard_normal
from metrics import psnr
from runs import (RunFolder, append_json, parse_with_given, plot_loss, restore_settings,
                  settings_of, trim_log, write_json)
from training import (EMA, LossGuard, Progress, StopFlag, adamw, add_training_flags, all_ranks_sum,
                      any_rank, barrier, check_ranks_agree, gather_objects, init_distributed,
                      oom_error)
from vae import DEFAULT_BETA, DEFAULT_SIGMA, VAE, VAE_PRESETS, latent_stats, vae_loss, vae_preset

# The recipe's numbers, all in one place; every flag's default is read from here. The same on
# every device (a GPU runs this recipe with torch.compile and bf16). RESULTS.md has how they
# were measured.
DEFAULTS = {
    # data
    "image_size": 32, "n_builtin": 20000,
    # the model: the VAE preset is chosen by image size (vae_config_from_args), beta and sigma
    # are Algorithm 7's constants (only lambda = 2 sigma^2 beta = 5e-3 matters)
    "beta": DEFAULT_BETA, "sigma": DEFAULT_SIGMA,
    # optimisation: AdamW at a constant rate, gradients clipped, weights averaged
    "steps": 3000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0,
    "ema_decay": 0.999,
    # reports
    "eval_images": 512, "log_every": 50, "ckpt_every": 500,
}


# ---------------------------------------------------------------------------------------------
# The command: start or resume a run

def train(args, given, rank, world, device, resume_command=None, quiet_data=False):
    """The command: resume or start the run in --out, train the VAE (Algorithm 7), then store its
    latent statistics and the latents of its training set (Recipe step 2). Every process of a
    torchrun takes part; rank 0 writes all files. `resume_command`: what Ctrl-C tells the user to
    run (train_flow.py names its own command); `quiet_data`: the caller has described the data
    already. Returns the checkpoint path (None when the run was already finished)."""
    setup_backends(device)
    folder = RunFolder(args.out, args.resume, args.overwrite, settings_of(args),
                       [("--data", args.data)]) if rank == 0 else None
    ckpt_path = Path(args.out) / "ckpt.pt"
    resume = None
    if args.resume:
        resume = load_checkpoint(ckpt_path, "vae", flag="--resume")
        saved = resume.get("args") or {"beta": resume["beta"], "sigma": resume["sigma"]}
        restore_settings(args, given, saved, EXPERIMENT, args.allow_changes, verbose=rank == 0)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if resume is not None and vae_finished(resume) and resume["step"] >= args.steps:
        if rank == 0:
            print(f"{ckpt_path} is already finished at step {resume['step']}; nothing to do (a "
                  f"larger --steps trains on)")
        return None
    try:
        return train_vae(args, folder, resume, rank, world, device, resume_command,
                         quiet_data)
    finally:
        if folder is not None:
            folder.release()


# ---------------------------------------------------------------------------------------------
# Algorithm 7: the model, one step of its loop, the loop

def build(config, args, device, amp):
    """Algorithm 7's state: the VAE, its EMA, AdamW and the GradScaler (fp16 only)."""
    model = VAE(config).to(device)
    opt = adamw(model.parameters(), args.lr, weight_decay=args.weight_decay)
    ema = EMA(model, args.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    return model, ema, opt, scaler


def train_step(net, model, ema, opt, scaler, images, step, args, amp):
    """One pass of Algorithm 7's loop on a batch of uint8 images: encode, reparameterize, decode,
    loss, and the update (clipped gradients, AdamW, then the EMA). `net` is the model as called
    (compiled or DDP-wrapped), `model` the plain one. Returns the loss terms (total, recon, kl),
    detached, without a host sync."""
    x = data_lib.to_model_range(images)                       # 1: a mini-batch in [-1, 1]
    with autocast(images.device, amp):
        x_hat, mu, logvar = net(x)                             # 2-5: encode, reparameterize, decode
    total, recon, kl = vae_loss(x, x_hat, mu, logvar, args.beta, args.sigma)   # 6-8
    scaler.scale(total).backward()
    scaler.unscale_(opt)                                       # 9: the gradient update
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    ema.update(model, step)
    return torch.stack([total.detach(), recon.detach(), kl.detach()])


def train_vae(args, folder, resume, rank, world, device, resume_command=None,
              quiet_data=False):
    """Train (or resume) the VAE configured by parsed args into the RunFolder `folder` (rank 0's;
    None elsewhere); `resume`: the checkpoint to continue. Returns the checkpoint path."""
    torch.manual_seed(args.seed)
    config = vae_config_from_args(args)
    ckpt_path = Path(args.out) / "ckpt.pt"
    amp = pick_amp(args.amp, device)
    if resume is not None:
        _check_config(resume, config, ckpt_path)               # fail before the work
        if len(_rng_list(resume)) != world:
            raise UserError(f"--resume {ckpt_path}: saved by {len(_rng_list(resume))} processes, "
                            f"now {world}; resume with the same number of processes")

    train = data_lib.load_dataset(args.data, args.image_size, "train", n_builtin=args.n_builtin,
                                  seed=args.seed)
    test = data_lib.load_dataset(args.data, args.image_size, "test", n_builtin=args.n_builtin,
                                 seed=args.seed)
    images = train.images[rank::world].to(device)              # this rank's shard, uint8, in memory

    model, ema, opt, scaler = build(config, args, device, amp)
    step = 0
    if rank == 0:
        folder.claim()                                         # from here on, this run's folder
    out = Path(args.out)
    if resume is not None:
        step = restore_training(resume, model, ema, opt, scaler, _rng_list(resume)[rank])
        for group in opt.param_groups:                         # --lr applies to a resumed run too
            group["lr"] = args.lr
        if rank == 0:
            trim_log(out / "log.jsonl", step)
            print(f"resumed {ckpt_path} at step {step}")
    elif world > 1:
        torch.manual_seed(args.seed + rank)                    # per-rank data order and noise
    if rank == 0:
        write_json(out / "args.json", settings_of(args), "settings")
        if not quiet_data:
            data_lib.announce(train)
        print(f"VAE {config.image_size}px -> {config.latent_channels}x{config.latent_size}x"
              f"{config.latent_size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params) on {device}{f' x{world}' if world > 1 else ''}, amp {amp}, {len(train)} "
              f"images ({train.name}), beta {args.beta}, sigma {args.sigma}")
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    net, _ = maybe_compile(net, device, args.compile)
    progress = Progress(out / "log.jsonl" if rank == 0 else None, args.steps, step,
                        args.batch_size, resume.get("elapsed", 0.0) if resume is not None else 0.0)

    def save(finished=False):                                  # collective under DDP
        with progress.paused():
            rngs = gather_objects(rng_state(), world)
            if rank == 0:
                save_checkpoint(ckpt_path, training_state(
                    "vae", step, dataclasses.asdict(config), model, ema, opt, scaler, rngs,
                    {"beta": args.beta, "sigma": args.sigma}, data=train.name,
                    latent_mean=ema.model.latent_mean.cpu(), latent_std=ema.model.latent_std.cpu(),
                    finished=finished, target_steps=args.steps, elapsed=progress.elapsed(),
                    args=settings_of(args)))

    def mean_terms():                                          # over every rank: all stop together
        return all_ranks_sum(sums, world) / (pending * world) if pending else None

    stopper = StopFlag()
    guard = LossGuard(ckpt_path, amp)
    stream = batches(images, args.batch_size // world)
    sums = torch.zeros(3, device=device)                       # loss terms since the last report
    pending, start = 0, step                                   # steps summed in `sums`
    try:
        while step < args.steps and not any_rank(stopper.stop, world, device):
            try:
                terms = train_step(net, model, ema, opt, scaler, next(stream), step, args, amp)
            except (RuntimeError, MemoryError) as e:
                if is_oom(e):
                    raise oom_error(args.batch_size)
                raise
            step += 1
            sums += terms
            pending += 1
            if step == start + 1:                              # the loss before any update
                guard.reference(all_ranks_sum(terms[0], world).item() / world)
            if step % args.log_every == 0 or step == args.steps or step == start + 1:
                mean = mean_terms().tolist()
                guard.check(mean[0], step)
                if rank == 0:
                    progress.report(step, dict(zip(("loss", "recon", "kl"), mean)))
                    with progress.paused():
                        plot_loss(out / "log.jsonl", out / "loss.png")
                sums.zero_()
                pending = 0
            if step % args.ckpt_every == 0 and step < args.steps:
                terms = mean_terms()
                guard.check(None if terms is None else terms[0].item(), step, model)
                save()
        terms = mean_terms()
        guard.check(None if terms is None else terms[0].item(), step, model)
        if stopper.stop:
            save()
            if rank == 0:
                print(f"saved {ckpt_path} at step {step}; resume with: "
                      f"{resume_command or f'python train_vae.py --resume --out {args.out}'}",
                      file=sys.stderr)
            sys.exit(stopper.exit_code)
    finally:
        stopper.restore()
    if world > 1:
        check_ranks_agree(model, world, rank)

    # Recipe step 2: statistics of the encoder means, with the EMA weights used for encoding. Rank 0
    # encodes the whole training set once; the latents are kept beside the checkpoint, so that
    # train_flow.py does not encode the same images again.
    if rank == 0:
        mus = encode_means(ema.model, train.images, device)
        if not torch.isfinite(mus).all():
            raise UserError(f"the VAE's encoder gives inf/NaN latents at step {step}; nothing saved "
                            f"over {ckpt_path}; lower --lr or use --amp off")
        mean, std = latent_stats(mus.split(1024))
        ema.model.set_latent_stats(mean, std)
        model.set_latent_stats(mean, std)
    save(finished=True)
    if rank == 0:
        key = latent_cache_key(file_sha1(ckpt_path), data_lib.dataset_key(
            args.data, args.image_size, args.n_builtin, args.seed))
        write_latent_cache(out / LATENT_CACHE, key, mus)
        report_heldout(ema.model, test, mean, std, args, device, out)
    barrier(world)
    return ckpt_path


def report_heldout(vae, test, mean, std, args, device, out):
    """The finished VAE on held-out images: PSNR and KL printed and logged, recon.png drawn."""
    psnr_db, kl_per_dim = heldout_report(vae, test.images[:args.eval_images], device)
    x = data_lib.to_model_range(test.images[:8].to(device))
    with torch.no_grad():
        x_hat = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
    data_lib.save_grid(out / "recon.png", torch.cat([x, x_hat]), nrow=8,
                       scale=data_lib.grid_scale(args.image_size))
    where = "held-out" if test.held_out else \
        "training-image (the folder has under 20 images: none held out)"
    print(f"{where} PSNR {psnr_db:.2f} dB | KL {kl_per_dim:.3f} nats/dim | latent mean "
          f"{[round(v, 3) for v in mean.tolist()]} std {[round(v, 3) for v in std.tolist()]}")
    print(f"wrote {out / 'ckpt.pt'}, {out / 'recon.png'}, {out / 'log.jsonl'}")
    append_json(out / "log.jsonl", {"step": args.steps, "heldout_psnr": psnr_db,
                                    "kl_nats_per_dim": kl_per_dim, "held_out": test.held_out,
                                    "latent_mean": mean.tolist(), "latent_std": std.tolist()})


def _rng_list(ckpt):
    """The per-rank RNG states of a checkpoint (one process's dict in checkpoints before torchrun)."""
    rng = ckpt["rng"]
    return rng if isinstance(rng, list) else [rng]


# ---------------------------------------------------------------------------------------------
# The data, and its latents (Recipe step 2)

def batches(images, batch_size, generator=None):
    """Endless random mini-batches of uint8 images (sampling with replacement across steps)."""
    n = images.shape[0]
    while True:
        idx = torch.randint(0, n, (batch_size,), device=images.device, generator=generator)
        yield images[idx]


@torch.no_grad()
def encode_means(vae, images, device, batch_size=256, dtype=None):
    """Encoder means mu(x) of all images (Recipe step 2), float32 on the CPU: (N, C, h, w)."""
    out, phase = [], Phase(f"encoding {images.shape[0]} images", images.shape[0])
    for i in range(0, images.shape[0], batch_size):
        x = data_lib.to_model_range(images[i:i + batch_size].to(device))
        with autocast(device, dtype):
            mu, _ = vae.encode(x)
        out.append(mu.float().cpu())
        phase.update(i + len(x))
    return torch.cat(out)


# The latent cache: the encoder means of a training set, keyed by the VAE file and the data, so that
# the same images are encoded once (train_vae.py writes it beside the VAE; train_flow.py reads it).
LATENT_CACHE = "latents.pt"


def file_sha1(path):
    """sha1 of a file's bytes: the identity of a checkpoint."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def latent_cache_key(vae_sha1, data_key):
    """The key of the latents of the data `data_key` (data.dataset_key) under the VAE file whose
    file_sha1 is `vae_sha1`."""
    return hashlib.sha1(f"{vae_sha1}|{data_key}".encode()).hexdigest()


def write_latent_cache(path, key, mu):
    save_checkpoint(path, {"key": key, "mu": mu, "count": mu.shape[0]}, "latent cache")


def read_latent_cache(path, key, shape):
    """(mu, None) from a cache file whose key, shape and values are right, else (None, why)."""
    if not Path(path).exists():
        return None, "missing"
    try:
        cache = safe_load(path, "latent cache")                # CRCs checked, no code run
        fits = (isinstance(cache, dict) and cache.get("key") == key
                and tuple(cache["mu"].shape) == tuple(shape) and cache.get("count") == shape[0])
        if not fits:
            return None, "stale (other VAE, data or size)"
        if not bool(torch.isfinite(cache["mu"]).all()):
            return None, "damaged (it holds inf/NaN)"
        return cache["mu"], None
    except (UserError, KeyError, TypeError, AttributeError) as e:
        return None, f"unreadable ({e if isinstance(e, UserError) else type(e).__name__})"


@torch.no_grad()
def heldout_report(vae, images, device, batch_size=64):
    """Mean PSNR (dB, images on [0, 1]) of the reconstructions decoded from the encoder means of
    held-out uint8 images (N, 3, H, W), and the mean KL(q(z|x) || N(0, I)) in nats per latent dim.
    (evaluate.py's VAE section reports these too, with SSIM, rFID and prompt accuracy.)"""
    psnrs, kls = [], []
    for batch in images.split(batch_size):
        x = data_lib.to_model_range(batch.to(device))              # (b, 3, H, W) in [-1, 1]
        mu, logvar = vae.encode(x)                                 # (b, k, h, w) each
        x_hat = vae.decode(mu).float().clamp(-1, 1)
        psnrs.append(psnr((x + 1) / 2, (x_hat + 1) / 2).cpu())
        kls.append((kl_to_standard_normal(mu, logvar) / mu[0].numel()).cpu())
    return float(torch.cat(psnrs).mean()), float(torch.cat(kls).mean())


# ---------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    """(args, given): the flags, and which of them the command line set."""
    p = argparse.ArgumentParser(
        description="Train the beta-VAE of Algorithm 7 (Lecture 04) and compute latent statistics.",
        epilog="""examples:
  python train_vae.py                                   # built-in shapes, 32 px -> runs/vae
  python train_vae.py --data ~/photos --image-size 64 --out runs/vae64
  python train_vae.py --resume --out runs/vae --steps 4000    # continue a run further
""", formatter_class=HelpFormatter)
    add_training_flags(p, DEFAULTS, "runs/vae")
    p.add_argument("--vae-preset", "--preset", dest="vae_preset", default=None,
                   help="VAE size: '32', '64' or 'large' (--preset is the old spelling; in "
                        "train_flow.py --preset is the DiT's). Default: the preset named by --image-size "
                        "('32' up to 32 px, '64' up to 64 px), 'large' above 64 px")
    p.add_argument("--beta", type=positive(float, allow_zero=True), default=DEFAULTS["beta"],
                   help="KL weight beta of Algorithm 7 (>= 0)")
    p.add_argument("--sigma", type=positive(float), default=DEFAULTS["sigma"],
                   help="decoder std sigma of Algorithm 7 (recon = ||x - x_hat||^2 / (2 sigma^2))")
    p.add_argument("--eval-images", type=positive(int), default=DEFAULTS["eval_images"],
                   help="held-out images for the final PSNR / KL report")
    return parse_with_given(p, argv)


# Settings whose change makes another experiment: --resume refuses them without --allow-changes.
EXPERIMENT = {"data", "n_builtin", "seed", "image_size", "vae_preset", "beta", "sigma"}


def main(argv=None):
    args, given = parse_args(argv)
    if "--preset" in (sys.argv[1:] if argv is None else argv):
        print("note: train_vae.py's --preset is now --vae-preset (train_flow.py's --preset is "
              "the DiT's)", file=sys.stderr)
    rank, world, device = init_distributed(args.device)
    line = set_threads(args.threads)
    if rank == 0 and device.type == "cpu":
        print(line, flush=True)
    try:
        train(args, given, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def vae_config_from_args(args):
    """The VAE preset named by --vae-preset (or by --image-size), at --image-size."""
    size = args.image_size
    name = args.vae_preset or ("32" if size <= 32 else "64" if size <= 64 else "large")
    if name not in VAE_PRESETS:
        raise UserError(f"--vae-preset {name}: unknown VAE preset; choose from "
                        f"{sorted(VAE_PRESETS)}")
    factor = VAE_PRESETS[name].factor
    if size % factor:
        raise UserError(f"--image-size {size} is not divisible by the downsampling factor {factor} "
                        f"of VAE preset {name}; use a multiple of {factor}")
    return vae_preset(name, image_size=size)


# Which flag sets each config field, for the --resume mismatch message ("" = the rest).
RESUME_FLAGS = {"image_size": "--image-size", "": "--vae-preset"}


def _check_config(ckpt, config, ckpt_path):
    """Refuse to resume a run whose VAE architecture differs from the current flags'."""
    saved = flatten(ckpt["config"])
    diff = config_mismatch(saved, flatten(dataclasses.asdict(config)), RESUME_FLAGS)
    if diff:
        raise UserError(f"--resume {ckpt_path}: settings differ ({diff}); use the same flags "
                        f"or another --out")


if __name__ == "__main__":
    sys.exit(run_main(main))
