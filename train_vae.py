"""Train the beta-VAE that makes the latent space (Lecture 04, Section 6, Algorithm 7).

    python train_vae.py                      # built-in shapes, 32 px, CPU or GPU
    python train_vae.py --data ~/photos --image-size 64

Algorithm 7, "beta-VAE Training Procedure": for each mini-batch, encode (mu, log sigma^2),
reparameterize z = mu + sigma * eps, decode, and minimise L_recon + beta * L_KL (vae.vae_loss),
in `train_step`, the body of the loop in `main`. At the end, recipe step 2 (every image encoded
by the encoder's mean) gives the per-channel statistics that normalise the flow model's latents;
the checkpoint keeps them and those latents (train_flow.py need not encode them again).

With no --vae, train_flow.py trains the automatic VAE of its data by this command (plan.py): its
defaults with the flow run's data, size, seed, machine flags and steps (--vae-steps, or as
--minutes sized them).

Outputs under --out (default runs/vae): ckpt.pt (weights, EMA, optimizer, RNG states, settings;
once finished the latent statistics and latents), recon.png, args.json, log.jsonl and loss.png.
"""
import dataclasses
import sys

import torch

import data as data_lib
from common import Parser, UserError, autocast, maybe_compile, positive, quoted, run_main
from kl import kl_to_standard_normal
from metrics import psnr
from runs import EMA, Run, adamw, add_training_flags
from vae import (DEFAULT_BETA, DEFAULT_SIGMA, VAE, VAE_PRESETS, encode_means, latent_stats,
                 vae_loss, vae_preset)

# The recipe's numbers in one place (the flags' defaults; --seed's is 0), the same on every device.
DEFAULTS = {
    "image_size": 32, "n_builtin": 20000,
    # Algorithm 7's constants (only lambda = 2 sigma^2 beta matters; vae.py says why): beta None
    # is by the data (`vae_beta`), and the decoder's input noise, a fraction of the latents'
    # spread (vae.noised_latents; 0: none)
    "beta": None, "sigma": DEFAULT_SIGMA, "decoder_noise": 0.2,
    # latent channels C, None: by the data (8 for a folder, whose detail they keep; 4 for the
    # shapes, which the DiT draws worse from 8: RESULTS.md, "Latent channels by the data")
    "latent_channels": None,
    # AdamW at a constant rate, clipped gradients, weights averaged (runs.EMA warms the decay up:
    # 0.9985 at step 6,000, about the last ninth of the steps). 6,000 steps: a VAE's detail is
    # worth more than the DiT steps its time would buy (RESULTS.md, "the default's time split")
    "steps": 6000, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0,
    "ema_decay": 0.999, "eval_images": 512, "log_every": 50, "ckpt_every": 500,
}
# Settings whose change makes another experiment: --resume refuses them without --allow-changes.
EXPERIMENT = {"data", "n_builtin", "seed", "image_size", "vae_preset", "latent_channels", "beta",
              "sigma", "decoder_noise"}


def main(argv=None, resume_command=None):
    """The command: Algorithm 7 on the data, then the latent statistics. `resume_command`: what
    Ctrl-C tells the user to run (plan.train_automatic passes train_flow.py's)."""
    with Run(parser(), argv, "vae", EXPERIMENT) as run:
        args, device, amp = run.args, run.device, run.amp
        if run.resume is not None and run.resume["finished"] and run.resume["step"] >= args.steps:
            print(f"{args.out} is finished at step {run.resume['step']}; nothing to do (a "
                  f"larger --steps trains on)")
            return 0
        torch.manual_seed(args.seed)
        config, args.beta = vae_config(args), vae_beta(args)     # stored as trained
        run.lock([("--data", args.data)])
        train_set, test_set = (data_lib.load_dataset(args.data, args.image_size, split,
                                                     args.n_builtin, args.seed)
                               for split in ("train", "test"))
        model, ema, opt, scaler = build(config, args, device, amp)
        step = run.begin(model, ema, opt, scaler)
        data_lib.announce(train_set)
        print(f"VAE {config.image_size}px -> {config.latent_channels}x{config.latent_size}x"
              f"{config.latent_size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params) on {device}, amp {amp}, {len(train_set)} images, beta {args.beta}")
        images = train_set.images.to(device)           # uint8, all in memory
        net = maybe_compile(model, device, args.compile)
        extra = {"config": dataclasses.asdict(config), "data": train_set.name}

        # Algorithm 7: for each mini-batch ...
        while step < args.steps and not run.stopped:
            idx = torch.randint(0, len(images), (args.batch_size,), device=device)
            terms = train_step(net, model, ema, opt, scaler, images[idx], step, args, amp)
            step += 1
            run.log(step, terms, ("loss", "recon", "kl"))
            if step % args.ckpt_every == 0 and step < args.steps:
                run.save(step, extra)
        command = resume_command or f"python train_vae.py --resume --out {quoted(args.out)}"
        run.stop_if_asked(step, extra, command)

        # Recipe step 2's statistics, from the EMA encoder's means of every training image
        latents = encode_means(ema.model, train_set.images)
        if not bool(torch.isfinite(latents).all()):
            raise UserError(f"the VAE's encoder gives inf/NaN latents at step {step}; lower --lr "
                            f"or use --amp off")
        mean, std = latent_stats(latents.split(1024))
        for vae in (ema.model, model):
            vae.set_latent_stats(mean, std)
        key = data_lib.dataset_key(args.data, args.image_size, args.n_builtin, args.seed)
        run.save(step, {**extra, "latents": latents, "data_key": key}, finished=True)
        report_heldout(ema.model, test_set, run)
        run.stop_if_asked(step, None, resume_command or "nothing, it is finished")  # all saved
    return 0


def build(config, args, device, amp):
    """Algorithm 7's state: the VAE, its EMA, AdamW and the GradScaler (fp16 only)."""
    model = VAE(config).to(device)
    opt = adamw(model.parameters(), args.lr, weight_decay=args.weight_decay)
    ema = EMA(model, args.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    return model, ema, opt, scaler


def train_step(net, model, ema, opt, scaler, images, step, args, amp):
    """One pass of Algorithm 7's loop on uint8 images: encode, reparameterize, decode, loss, and
    the update (clipped gradients, AdamW, the EMA). `net` is the model as called (compiled or
    not), `model` the plain one. Returns (total, recon, kl), detached, with no host sync."""
    x = data_lib.to_model_range(images)                       # 1: a mini-batch in [-1, 1]
    with autocast(images.device, amp):
        x_hat, mu, logvar = net(x, args.decoder_noise)         # 2-5 (and vae.noised_latents)
    total, recon, kl = vae_loss(x, x_hat, mu, logvar, vae_beta(args), args.sigma)   # 6-8
    scaler.scale(total).backward()
    scaler.unscale_(opt)                                       # 9: the gradient update
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    ema.update(model, step)
    return torch.stack([total.detach(), recon.detach(), kl.detach()])


@torch.no_grad()
def report_heldout(vae, test_set, run, batch_size=64):
    """The finished VAE on held-out images decoded from the encoder means: PSNR (dB) and KL (nats
    per latent dimension) printed and logged, recon.png (originals above reconstructions)."""
    images = test_set.images[:run.args.eval_images]
    device = next(vae.parameters()).device
    psnrs, kls, pairs = [], [], None
    for batch in images.split(batch_size):
        x = data_lib.to_model_range(batch.to(device))                 # (b, 3, H, W) in [-1, 1]
        mu, logvar = vae.encode(x)                                    # (b, C, h, w) each
        x_hat = vae.decode(mu).float().clamp(-1, 1)
        psnrs.append(psnr((x + 1) / 2, (x_hat + 1) / 2).cpu())
        kls.append((kl_to_standard_normal(mu, logvar) / mu[0].numel()).cpu())
        pairs = torch.cat([x[:8], x_hat[:8]]) if pairs is None else pairs
    data_lib.save_grid(run.out / "recon.png", pairs, nrow=min(8, len(images)),
                       scale=data_lib.grid_scale(run.args.image_size))
    psnr_db, kl = float(torch.cat(psnrs).mean()), float(torch.cat(kls).mean())
    mean, std = ([round(v, 3) for v in s.tolist()] for s in (vae.latent_mean, vae.latent_std))
    where = "held-out" if test_set.held_out else "training-image (none held out)"
    print(f"{where} PSNR {psnr_db:.2f} dB | KL {kl:.3f} nats/dim | latent mean {mean} std {std}")
    print(f"wrote {run.out / 'ckpt.pt'}, {run.out / 'recon.png'}, {run.out / 'log.jsonl'}")
    run.record({"step": run.args.steps, "heldout_psnr": psnr_db, "kl_nats_per_dim": kl,
                "held_out": test_set.held_out, "latent_mean": mean, "latent_std": std})


def vae_config(args):
    """The --vae-preset (default: by --image-size) at --image-size, with --latent-channels."""
    size = args.image_size
    name = getattr(args, "vae_preset", None) or ("32" if size <= 32 else "64" if size <= 64 else
                                                 "large")
    if size % VAE_PRESETS[name].factor:
        raise UserError(f"--image-size {size} is not divisible by the downsampling factor "
                        f"{VAE_PRESETS[name].factor} of VAE preset {name}")
    k = (getattr(args, "latent_channels", DEFAULTS["latent_channels"])
         or (8 if getattr(args, "data", None) else 4))
    return dataclasses.replace(vae_preset(name, image_size=size), latent_channels=k)


def vae_beta(args):
    """--beta, else by the data: 1.0 for a folder (half the KL, and samples a little better at
    32 and 64 px: RESULTS.md, "A stronger KL weight for a folder"), 0.25 (vae.DEFAULT_BETA) for
    the built-in shapes."""
    beta = getattr(args, "beta", None)
    return beta if beta is not None else 1.0 if getattr(args, "data", None) else DEFAULT_BETA


def parser():
    p = Parser("Train the beta-VAE of Algorithm 7 (Lecture 04) and its latent statistics.",
               """examples:
  python train_vae.py                                   # built-in shapes, 32 px -> runs/vae
  python train_vae.py --data ~/photos --image-size 64 --out runs/vae64
  python train_vae.py --resume --out runs/vae --steps 4000    # continue a run further
""")
    add_training_flags(p, DEFAULTS, "runs/vae")
    add = p.add_argument
    add("--vae-preset", choices=sorted(VAE_PRESETS), default=None,
        help="VAE size. Default: '32' up to 32 px, '64' up to 64 px, else 'large'")
    add("--latent-channels", type=positive(int, at_most=256), default=None,
        help="latent channels C of z. Default: 8 for a --data folder, 4 for the built-in shapes")
    add("--beta", type=positive(float, allow_zero=True), default=DEFAULTS["beta"],
        help="KL weight beta of Algorithm 7. Default: 1.0 for a --data folder, 0.25 for the "
             "built-in shapes")
    add("--sigma", type=positive(float), default=DEFAULTS["sigma"],
        help="decoder std sigma of Algorithm 7 (recon = ||x - x_hat||^2 / (2 sigma^2))")
    add("--decoder-noise", type=positive(float, allow_zero=True, at_most=10),
        default=DEFAULTS["decoder_noise"], help="the decoder trains on latents noised by up "
        "to this fraction of their spread (vae.noised_latents; 0: Algorithm 7's)")
    add("--eval-images", type=positive(int), default=DEFAULTS["eval_images"],
        help="held-out images of the final PSNR / KL report")
    return p


if __name__ == "__main__":
    sys.exit(run_main(main))
