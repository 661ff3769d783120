"""Train the beta-VAE that makes the latent space (Lecture 04, Section 6, Algorithm 7).

    python train_vae.py                      # built-in shapes, 32 px, CPU or GPU
    python train_vae.py --data ~/photos --image-size 64 --preset 64

Algorithm 7, "beta-VAE Training Procedure": for each mini-batch, encode (mu, log sigma^2),
reparameterize z = mu + sigma * eps, decode, and minimise L_recon + beta * L_KL (vae.vae_loss).
Then Recipe step 2 needs the encoder *mean* of every image; the flow model works on latents
normalised per channel with the statistics computed here and stored in the checkpoint.

Outputs under --out (default runs/vae): ckpt.pt (weights, EMA weights, optimizer, step, RNG
states, config, latent statistics), recon.png (held-out originals above their reconstructions)
and log.jsonl (one JSON line per progress report).
"""
import argparse
import dataclasses
import os
import sys

import torch

import data as data_lib
from checkpoint import (config_mismatch, flatten, load_checkpoint, restore_training, rng_state,
                        save_checkpoint, training_state, vae_finished)
from common import (HelpFormatter, Phase, UserError, autocast, is_oom, maybe_compile, pick_amp,
                    pick_device, positive, run_main, setup_backends)
from kl import kl_to_standard_normal
from metrics import psnr
from runs import (RunFolder, append_json, parse_with_given, plot_loss, restore_settings,
                  settings_of, trim_log, write_json)
from training import EMA, LossGuard, Progress, StopFlag, add_training_flags, oom_error
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


def train_vae(args, device, folder, resume=None):
    """Train (or resume) a VAE as configured by parsed args into the RunFolder `folder`;
    `resume`: the checkpoint to continue. Returns the checkpoint path."""
    torch.manual_seed(args.seed)
    config = vae_config_from_args(args)
    ckpt_path = folder.path / "ckpt.pt"
    amp = pick_amp(args.amp, device)
    if resume is not None:
        _check_config(resume, config, ckpt_path)               # fail before the work

    train = data_lib.load_dataset(args.data, args.image_size, "train", n_builtin=args.n_builtin,
                                  seed=args.seed)
    test = data_lib.load_dataset(args.data, args.image_size, "test", n_builtin=args.n_builtin,
                                 seed=args.seed)
    images = train.images.to(device)                           # (N, 3, H, W) uint8, in memory

    model = VAE(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ema = EMA(model, args.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    out = folder.claim()                                       # from here on, this run's folder
    step = 0
    if resume is not None:
        step = restore_training(resume, model, ema, opt, scaler, resume["rng"])
        for group in opt.param_groups:                         # --lr applies to a resumed run too
            group["lr"] = args.lr
        trim_log(out / "log.jsonl", step)
        print(f"resumed {ckpt_path} at step {step}")
    write_json(out / "args.json", settings_of(args), "settings")

    print(f"VAE {config.image_size}px -> {config.latent_channels}x{config.latent_size}x"
          f"{config.latent_size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) "
          f"on {device}, amp {amp}, {len(train)} images ({train.name}), beta {args.beta}, "
          f"sigma {args.sigma}")
    train_model, _ = maybe_compile(model, device, args.compile)
    progress = Progress(out / "log.jsonl", args.steps, step, args.batch_size,
                        resume.get("elapsed", 0.0) if resume is not None else 0.0)

    def checkpoint(finished=False):
        return training_state("vae", step, dataclasses.asdict(config), model, ema, opt, scaler,
                              rng_state(), {"beta": args.beta, "sigma": args.sigma}, data=train.name,
                              latent_mean=ema.model.latent_mean.cpu(),
                              latent_std=ema.model.latent_std.cpu(), finished=finished,
                              target_steps=args.steps, elapsed=progress.elapsed(),
                              args=settings_of(args))

    stopper = StopFlag()
    guard = LossGuard(ckpt_path, amp)
    stream = batches(images, args.batch_size)
    sums = torch.zeros(3, device=device)                       # loss terms since the last report
    pending, start = 0, step                                   # steps summed in `sums`
    try:
        while step < args.steps and not stopper.stop:
            x = data_lib.to_model_range(next(stream))          # 1: a mini-batch in [-1, 1]
            try:
                with autocast(device, amp):
                    x_hat, mu, logvar = train_model(x)         # 2-5: encode, reparameterize, decode
                total, recon, kl = vae_loss(x, x_hat, mu, logvar, args.beta, args.sigma)   # 6-8
                scaler.scale(total).backward()
            except (RuntimeError, MemoryError) as e:
                if is_oom(e):
                    raise oom_error(args.batch_size)
                raise
            scaler.unscale_(opt)                               # 9: the gradient update
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            ema.update(model, step)
            step += 1
            sums += torch.stack([total.detach(), recon.detach(), kl.detach()])
            pending += 1
            if step == start + 1:
                guard.reference(total.item())                  # the loss before any update
            if step % args.log_every == 0 or step == args.steps:
                guard.check(sums[0].item() / pending, step)
                progress.report(step, dict(zip(("loss", "recon", "kl"), (sums / pending).tolist())))
                plot_loss(out / "log.jsonl", out / "loss.png")
                sums.zero_()
                pending = 0
            if step % args.ckpt_every == 0 and step < args.steps:
                guard.check(sums[0].item() / pending if pending else None, step, model)
                save_checkpoint(ckpt_path, checkpoint())
        guard.check(sums[0].item() / pending if pending else None, step, model)
        if stopper.stop:
            save_checkpoint(ckpt_path, checkpoint())
            print(f"saved {ckpt_path} at step {step}; resume with: python train_vae.py --resume "
                  f"--out {args.out}", file=sys.stderr)
            sys.exit(stopper.exit_code)
    finally:
        stopper.restore()

    # Recipe step 2: statistics of the encoder means, with the EMA weights used for encoding.
    mus = encode_means(ema.model, train.images, device)
    if not torch.isfinite(mus).all():
        raise UserError(f"the VAE's encoder gives inf/NaN latents at step {step}; nothing saved "
                        f"over {ckpt_path}; lower --lr or use --amp off")
    mean, std = latent_stats(mus.split(1024))
    ema.model.set_latent_stats(mean, std)
    model.set_latent_stats(mean, std)
    save_checkpoint(ckpt_path, checkpoint(finished=True))

    heldout = test.images[:args.eval_images]
    psnr_db, kl_per_dim = heldout_report(ema.model, heldout, device)
    x = data_lib.to_model_range(test.images[:8].to(device))
    with torch.no_grad():
        x_hat = ema.model.decode(ema.model.encode(x)[0]).clamp(-1, 1)
    data_lib.save_grid(out / "recon.png", torch.cat([x, x_hat]), nrow=8,
                       scale=data_lib.grid_scale(args.image_size))
    where = "held-out" if test.held_out else \
        "training-image (the folder has under 20 images: none held out)"
    print(f"{where} PSNR {psnr_db:.2f} dB | KL {kl_per_dim:.3f} nats/dim | latent mean "
          f"{[round(v, 3) for v in mean.tolist()]} std {[round(v, 3) for v in std.tolist()]}")
    print(f"wrote {ckpt_path}, {out / 'recon.png'}, {out / 'log.jsonl'}")
    append_json(out / "log.jsonl", {"step": step, "heldout_psnr": psnr_db,
                                    "kl_nats_per_dim": kl_per_dim, "held_out": test.held_out,
                                    "latent_mean": mean.tolist(), "latent_std": std.tolist()})
    return ckpt_path


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
    p.add_argument("--preset", default=None,
                   help="VAE size: '32', '64' or 'large'. Default: the preset named by --image-size "
                        "('32' up to 32 px, '64' up to 64 px), 'large' above 64 px")
    p.add_argument("--beta", type=positive(float, allow_zero=True), default=DEFAULTS["beta"],
                   help="KL weight beta of Algorithm 7 (>= 0)")
    p.add_argument("--sigma", type=positive(float), default=DEFAULTS["sigma"],
                   help="decoder std sigma of Algorithm 7 (recon = ||x - x_hat||^2 / (2 sigma^2))")
    p.add_argument("--eval-images", type=positive(int), default=DEFAULTS["eval_images"],
                   help="held-out images for the final PSNR / KL report")
    return parse_with_given(p, argv)


# Settings whose change makes another experiment: --resume refuses them without --allow-changes.
EXPERIMENT = {"data", "n_builtin", "seed", "image_size", "preset", "beta", "sigma"}


def main(argv=None):
    args, given = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("train_vae.py trains in one process (under torchrun every process would "
                        "train the same VAE into the same files); run python train_vae.py")
    device = pick_device(args.device)
    setup_backends(device)
    folder = RunFolder(args.out, args.resume, args.overwrite, settings_of(args),
                       [("--data", args.data)])                    # nothing is made yet
    resume = None
    if args.resume:
        resume = load_checkpoint(folder.path / "ckpt.pt", "vae", flag="--resume")
        saved = resume.get("args") or {"beta": resume["beta"], "sigma": resume["sigma"]}
        restore_settings(args, given, saved, EXPERIMENT, args.allow_changes)
    if resume is not None and vae_finished(resume) and resume["step"] >= args.steps:
        print(f"{folder.path / 'ckpt.pt'} is already finished at step {resume['step']}; nothing to "
              f"do (a larger --steps trains on)")
        return 0
    try:
        train_vae(args, device, folder, resume)
    finally:
        folder.release()
    return 0


def vae_config_from_args(args):
    """The VAE preset named by --preset (or by --image-size), at --image-size."""
    size = args.image_size
    name = args.preset or ("32" if size <= 32 else "64" if size <= 64 else "large")
    if name not in VAE_PRESETS:
        raise UserError(f"--preset {name}: unknown VAE preset; choose from {sorted(VAE_PRESETS)}")
    factor = VAE_PRESETS[name].factor
    if size % factor:
        raise UserError(f"--image-size {size} is not divisible by the downsampling factor {factor} "
                        f"of VAE preset {name}; use a multiple of {factor}")
    return vae_preset(name, image_size=size)


# Which flag sets each config field, for the --resume mismatch message ("" = the rest).
RESUME_FLAGS = {"image_size": "--image-size", "": "--preset"}


def _check_config(ckpt, config, ckpt_path):
    """Refuse to resume a run whose VAE architecture differs from the current flags'."""
    saved = flatten(ckpt["config"])
    diff = config_mismatch(saved, flatten(dataclasses.asdict(config)), RESUME_FLAGS)
    if diff:
        raise UserError(f"--resume {ckpt_path}: settings differ ({diff}); use the same flags "
                        f"or another --out")


if __name__ == "__main__":
    sys.exit(run_main(main))
