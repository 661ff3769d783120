"""Train the flow model in the VAE's latent space: the whole latent-diffusion recipe.

    python train_flow.py                 # built-in shapes: VAE (if needed), latents, DiT, samples
    python train_flow.py --data ~/photos --image-size 64 --vae runs/vae64/ckpt.pt

Slide "Latent Diffusion Models (LDMs) - Recipe", one function per step, called in order by `main`
(after plan.settle_steps: --steps by the data):
  1. Data: the VAE that makes the latent space (plan.find_vae, its checks before the images
     load), the images x_1..x_N (`load_data`), --minutes sizing the run (plan.size_to_minutes,
     from the seconds per step `step_seconds` measures), then plan.ensure_vae: with no --vae,
     the automatic VAE of this data, trained first by train_vae.py.
  2. Encoding: every image becomes a latent, the VAE encoder's *mean* (`encode`; train_vae.py
     stored those of its own training images in the VAE's checkpoint, with their statistics).
  3. Latent data: z_1..z_N, normalised per channel by those statistics, with their prompts
     (`latent_data`).
  4. Latent diffusion model: a DiT trained with the CondOT flow matching loss (flow.py), prompts
     dropped to the empty prompt with probability 10% so that classifier-free guidance works,
     training times t drawn logit-normal (Stable Diffusion 3; --t-dist uniform is the lecture's)
     (`train_dit`, whose optimizer step is `train_step`).
  5. Decoding: sample latents with the guided Euler sampler and decode them (sample.py): a grid
     of EMA samples for fixed prompts every --sample-every steps and at the end (`sample_grid`).

Outputs under --out (default runs/flow): ckpt.pt (everything needed to resume exactly or to
sample), samples_<step>.png and prompts.txt, args.json, log.jsonl and loss.png.
"""
import hashlib
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data as data_lib
import plan
from common import (MAX_STEPS, Parser, UserError, autocast, finite, fraction, maybe_compile,
                    median_time, positive, quoted, run_main, synchronizer)
from dit import PRESETS, DiT, count_parameters, dit_preset
from embeddings import null_prompt, prompt_length, prompt_words, tokenize
from flow import flow_matching_loss
from runs import EMA, Run, adamw, add_training_flags
from sample import generate, guided_field, write_prompts
from shapes import HELD_OUT_PAIRS, held_out_objects
from vae import encode_means

# The recipe's numbers in one place (the flags' defaults; --seed's is 0), the same on every device.
DEFAULTS = {
    "image_size": 32, "n_builtin": 20000, "hold_out_pairs": False,
    # the DiT (dit.PRESETS) on p x p latent patches
    "preset": "tiny", "patch_size": 2,
    # flow matching: training times t, and prompts dropped (CFG's null condition) at p_uncond
    "t_dist": "logit_normal", "p_uncond": 0.1,
    # AdamW: linear warm-up, constant rate, linear cool-down to 0 over the last fifth, clipped
    # gradients, EMA (2,930 + 6,000 VAE steps: RESULTS.md); on a --data folder 3,580 DiT steps,
    # as 2,930 leave the DiT of real images short (RESULTS.md, "22% more DiT steps")
    "steps": 2930, "folder_steps": 3580, "batch_size": 64, "lr": 1e-3, "adam_betas": [0.9, 0.95],
    "weight_decay": 0.0, "warmup": 200, "cooldown": 0.2, "grad_clip": 1.0, "ema_decay": 0.995,
    # sample grids: grid_images EMA samples of each of grid_prompts prompts, sample_steps Euler
    # steps at guidance weight cfg_scale (2: RESULTS.md), every sample_every steps and at the end
    "sample_every": 1000, "grid_prompts": 8, "grid_images": 8, "sample_steps": 50,
    "cfg_scale": 2.0,
    "log_every": 50, "ckpt_every": 500,
}
# Settings whose change makes another experiment: --resume refuses them without --allow-changes
# (another VAE file is compared by its bytes, in plan.find_vae).
EXPERIMENT = {"data", "n_builtin", "seed", "image_size", "preset", "patch_size", "vae_steps",
              "hold_out_pairs"}


def main(argv=None):
    """The recipe, step by step."""
    with Run(parser(), argv, "flow", EXPERIMENT) as run:
        args = run.args
        plan.settle_steps(run, DEFAULTS["folder_steps"])      # --steps by the data; --minutes
        if run.resume is not None and run.resume["step"] >= args.steps:
            print(f"{args.out} is already at step {run.resume['step']} of {args.steps}; nothing "
                  f"to do (a larger --steps trains on)")
            return 0
        # step 1: which VAE (`given`: --vae's (VAE, checkpoint), else None), then the data
        vae_path, given = plan.find_vae(args, run.resume, run.device)
        run.lock([("--data", args.data), ("--vae", vae_path)])
        train_set = load_data(args)
        if args.minutes and run.resume is None:   # sized by this file's step_seconds (below)
            plan.size_to_minutes(run, train_set, vae_path, given, step_seconds)
        vae, vae_ckpt = plan.ensure_vae(args, vae_path, given, run, train_set)  # or trains it
        mu = encode(vae, vae_ckpt, train_set, args)                             # step 2
        latents = latent_data(mu, vae, train_set, args, run)                    # step 3
        train_dit(run, latents, vae, vae_path, vae_ckpt)                        # steps 4 and 5
    return 0


# ---------------------------------------------------------------------------------------------
# Steps 1 to 3: the data, and its latents

def load_data(args):
    """The training images x_1..x_N with their captions (data.py)."""
    if args.hold_out_pairs and args.data is not None:
        raise UserError("--hold-out-pairs needs the built-in shapes, whose captions name colour "
                        "and shape; drop --data or --hold-out-pairs")
    return data_lib.load_dataset(args.data, args.image_size, "train", args.n_builtin, args.seed)


def encode(vae, vae_ckpt, train_set, args):
    """Step 2: mu_phi(x) of every training image, (N, C, h, w). The VAE's own run stored those of
    its training set; any other images are encoded here."""
    key = data_lib.dataset_key(args.data, args.image_size, args.n_builtin, args.seed)
    C, f = vae.config.latent_channels, vae.config.factor
    shape = (len(train_set), C, args.image_size // f, args.image_size // f)
    mu = vae_ckpt.get("latents")
    if not (vae_ckpt.get("data_key") == key and isinstance(mu, torch.Tensor)
            and mu.shape == shape):
        t0 = time.perf_counter()
        mu = encode_means(vae, train_set.images)
        print(f"encoded {shape[0]} images to latents {shape[1:]} in "
              f"{time.perf_counter() - t0:.1f}s")
    if not bool(torch.isfinite(mu).all()):
        raise UserError("the VAE gives inf/NaN latents for these images; retrain it or pass "
                        "another --vae")
    return mu


@dataclass
class LatentData:
    """The training set in latent space: what the DiT learns from (recipe step 3)."""
    z: torch.Tensor          # (N, C, h, w) encoder means, normalised by the VAE's statistics
    tokens: torch.Tensor     # (N, S, W) their captions: S tokens (BOS, a word each), W bytes each
    config: object           # the DiTConfig that fits these latents and prompts
    prompts: list            # the fixed prompts of the sample grids
    words: dict              # word -> count in the captions (sample.py names unseen words)
    name: str                # the data's name


def latent_data(mu, vae, train_set, args, run):
    """Step 3: the normalised latents z = (mu - mean) / std with their prompt tokens, and the DiT
    that fits them (latent grid, channels, longest caption)."""
    captions = train_set.captions
    if args.hold_out_pairs:      # the composition benchmark: the DiT never sees these pairs
        keep = [i for i, a in enumerate(train_set.attributes) if not held_out_objects(a)]
        print(f"composition benchmark: {len(captions) - len(keep)} of {len(captions)} "
              f"training images show a held-out colour x shape pair "
              f"({', '.join(' '.join(p) for p in HELD_OUT_PAIRS)}); the DiT never sees them")
        mu, captions = mu[keep], [captions[i] for i in keep]
    config = dit_config(args, vae.config, train_set.captions)   # all captions: held-out ones fit
    longest = prompt_length(train_set.captions, config.prompt_word_bytes)[1]
    print(f"prompts: the model reads up to {config.max_prompt_len - 1} tokens of a prompt, a word "
          f"each (the longest caption has {longest - 1}); longer prompts are cut")
    distinct = list(dict.fromkeys(captions))      # a folder is sorted by name: show its range
    stride = max(1, len(distinct) // args.grid_prompts) if args.data else 1
    prompts = distinct[::stride][:args.grid_prompts] or [""]
    return LatentData(z=vae.normalize_latents(mu.to(run.device)),
                      tokens=tokenize(captions, config.max_prompt_len,
                                      config.prompt_word_bytes).to(run.device),
                      config=config, prompts=prompts, name=train_set.name,
                      words=dict(Counter(w for c in captions for w in prompt_words(c))))


def dit_config(args, vae_config, captions):
    """The DiT (--preset, --patch-size) that fits the VAE's latents and reads whole captions."""
    max_len = prompt_length(captions, PRESETS[args.preset].prompt_word_bytes)[0]
    return dit_preset(args.preset, input_size=args.image_size // vae_config.factor,
                      in_channels=vae_config.latent_channels, patch_size=args.patch_size,
                      max_prompt_len=max_len)


# ---------------------------------------------------------------------------------------------
# Steps 4 and 5: the DiT, trained with the CondOT flow matching loss, and its sample grids

def build(config, args, device, amp):
    """Step 4's state: the DiT (initialised from --seed), its EMA, AdamW, the GradScaler."""
    torch.manual_seed(args.seed)
    model = DiT(config).to(device)
    ema = EMA(model, args.ema_decay)
    opt = adamw(model.parameters(), args.lr, tuple(args.adam_betas), args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)  # fp16 only
    return model, ema, opt, scaler


def train_step(net, model, ema, opt, scaler, z, tokens, null, step, args, amp):
    """One optimizer step on latents z (B, C, h, w) and prompt tokens (B, S, W): this step's
    learning rate (linear warm-up, constant, linear cool-down to 0), the CondOT loss with prompts
    dropped to `null` at --p-uncond, backward, clipped gradients, AdamW, the EMA. `net` is the
    model as called (compiled or not), `model` the plain one. Returns the loss, detached, with no
    host sync. bench.py times this very function."""
    for group in opt.param_groups:
        group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1),
                                    (args.steps - step) / max(args.cooldown * args.steps, 1))
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


def train_dit(run, latents, vae, vae_path, vae_ckpt):
    """Train (or resume) the DiT on the latents, with sample grids on the way."""
    args, device, amp, out = run.args, run.device, run.amp, run.out
    sha1 = hashlib.sha1(Path(vae_path).read_bytes()).hexdigest()
    if args.steps < args.warmup:
        print(f"note: --steps {args.steps} is shorter than the learning-rate warm-up (--warmup "
              f"{args.warmup}): the rate never reaches --lr {args.lr}")
    model, ema, opt, scaler = build(latents.config, args, device, amp)
    step = run.begin(model, ema, opt, scaler)
    if run.resume is None:             # the data order and noise (a resumed run's: restored)
        torch.manual_seed(args.seed)
    C, h, w = latents.z.shape[1:]
    print(f"DiT-{args.preset}/{args.patch_size} ({count_parameters(model) / 1e6:.2f}M params) "
          f"on {C}x{h}x{w} latents of {len(latents.z)} images ({latents.name}), {device}, "
          f"amp {amp}, batch {args.batch_size}")
    extra = {"config": asdict(latents.config), "image_size": args.image_size,
             "data": latents.name, "sample_prompts": latents.prompts,
             "caption_words": latents.words,
             "vae": {"path": str(Path(vae_path).resolve()), "sha1": sha1,
                     "config": vae_ckpt["config"], "latent_mean": vae.latent_mean.cpu(),
                     "latent_std": vae.latent_std.cpu()}}
    net = maybe_compile(model, device, args.compile)
    null = null_prompt(*latents.tokens.shape[1:]).to(device)                # (1, S, W): ""

    def grid():
        with run.progress.paused():
            sample_grid(out / f"samples_{step:06d}.png", ema.model, vae, latents.prompts, args,
                        amp)

    while step < args.steps and not run.stopped:
        idx = torch.randint(len(latents.z), (args.batch_size,), device=device)
        loss = train_step(net, model, ema, opt, scaler, latents.z[idx], latents.tokens[idx],
                          null, step, args, amp)
        step += 1
        run.log(step, loss)
        if step % args.ckpt_every == 0 and step < args.steps:
            run.save(step, extra)
        if step % args.sample_every == 0 and step < args.steps:
            grid()
    if step == args.steps:
        grid()                        # before the last save, so a finished run has its grid
    run.stop_if_asked(step, extra, f"python train_flow.py --resume --out {quoted(args.out)}")
    run.save(step, extra)
    ckpt = out / "ckpt.pt"
    print(f"done: {step} steps; wrote {ckpt} and {out / f'samples_{step:06d}.png'}\nsample more "
          f"with: python sample.py --ckpt {quoted(ckpt)} --prompt \"...\"")


def sample_grid(path, model, vae, prompts, args, amp):
    """Step 5: --grid-images EMA samples of each fixed prompt, one row each under its prompt,
    decoded by the VAE; prompts.txt beside lists the rows, the PNG's text chunks the settings."""
    rows = [p for p in prompts for _ in range(args.grid_images)]   # seed 0: grids compare
    images = generate(model, vae, rows, args.sample_steps, args.cfg_scale, seed=0, amp=amp)
    info = {"prompts": prompts, "seed": 0, "cfg": args.cfg_scale, "steps": args.sample_steps,
            "checkpoint": str(path.parent / "ckpt.pt")}
    data_lib.save_grid(path, images, nrow=args.grid_images, info=info,
                       scale=data_lib.grid_scale(args.image_size),
                       row_labels=[p or "(empty prompt: unconditional)" for p in prompts])
    if not (path.parent / "prompts.txt").exists():
        write_prompts(path.parent / "prompts.txt", prompts)


# ---------------------------------------------------------------------------------------------
# --minutes: seconds per step of this run, timed at the start (passed to plan.size_to_minutes,
# as plan.py cannot import this file)

def step_seconds(args, device, amp, train_set, vae_config, vae_todo, repeats=3):
    """Seconds of (a VAE step, a DiT step, an Euler step of a sample grid), timed eagerly on fresh
    models at this run's sizes: the DiT's training step, the grid's guided forward, and when
    `vae_todo` a default VAE training step (else 0). What --minutes sizes a run by, and what
    bench.py --what recipe predicts the default run with."""
    sync = synchronizer(device)
    t_vae = plan.vae_step_seconds(vae_config, train_set.images, device, amp,
                                  repeats) if vae_todo else 0.0
    config = dit_config(args, vae_config, train_set.captions)
    model, ema, opt, scaler = build(config, args, device, amp)
    B, G = args.batch_size, args.grid_prompts * args.grid_images
    z = torch.randn(max(B, G), config.in_channels, config.height, config.width, device=device)
    null = null_prompt(config.max_prompt_len, config.prompt_word_bytes).to(device)  # (1, S, W)
    tokens = null.expand(max(B, G), -1, -1)           # any prompt costs what "" costs: S tokens
    t_dit = median_time(lambda: train_step(model, model, ema, opt, scaler, z[:B], tokens[:B],
                                           null, 0, args, amp), repeats=repeats, sync=sync)
    with torch.inference_mode(), autocast(device, amp):
        u = guided_field(ema.model, tokens[:G], null, args.cfg_scale)
        t_grid = median_time(lambda: u(z[:G], torch.zeros(G, device=device)), repeats=repeats,
                             sync=sync)
    return t_vae, t_dit, t_grid


# ---------------------------------------------------------------------------------------------
# The command line

def parser():
    p = Parser("Train a DiT flow model (CondOT flow matching, CFG) in a VAE's latent space.",
               """examples:
  python train_flow.py                      # the whole recipe on the built-in shapes -> runs/flow
  python train_flow.py --data ~/photos --image-size 64 --out runs/photos
  python train_flow.py --data ~/photos --minutes 60 --out runs/hour  # sized to an hour here
  python train_flow.py --steps 10 --vae-steps 10 --n-builtin 500 --out runs/smoke   # a quick test
""")
    add_training_flags(p, DEFAULTS, "runs/flow")
    add = p.add_argument
    add("--vae", default=None, help="VAE checkpoint. Default: the automatic VAE of this data "
        "beside --out, trained first when missing")
    add("--vae-steps", type=positive(int, at_most=MAX_STEPS), default=None,
        help="training steps of the automatic VAE. Default: train_vae.py's")
    add("--minutes", type=positive(float, at_most=10 ** 5), default=None,
        help="size the whole command to about this many minutes on this machine: --steps and "
             "--vae-steps scaled together from their defaults, from steps timed at the start")
    add("--hold-out-pairs", action="store_true", default=DEFAULTS["hold_out_pairs"],
        help="leave shapes.HELD_OUT_PAIRS out of the DiT's training (does it compose?)")
    add("--preset", default=DEFAULTS["preset"], choices=sorted(PRESETS), help="DiT size")
    add("--patch-size", type=positive(int, at_most=64), default=DEFAULTS["patch_size"],
        help="DiT patch size p on the latent grid")
    add("--t-dist", choices=["uniform", "logit_normal"], default=DEFAULTS["t_dist"],
        help="training times t: uniform on [0, 1] (the lecture's) or logit-normal (SD3's)")
    add("--p-uncond", type=fraction, default=DEFAULTS["p_uncond"],
        help="probability of replacing a prompt by the empty prompt (for CFG)")
    add("--cooldown", type=fraction, default=DEFAULTS["cooldown"],
        help="the learning rate falls linearly to 0 over this last fraction of --steps (a run "
             "resumed with a larger --steps climbs back towards --lr, then cools down again)")
    add("--adam-betas", type=fraction, nargs=2, default=DEFAULTS["adam_betas"],
        help="AdamW's betas")
    add("--warmup", type=positive(int, allow_zero=True, at_most=MAX_STEPS),
        default=DEFAULTS["warmup"], help="linear learning-rate warm-up steps")
    add("--sample-every", type=positive(int, at_most=MAX_STEPS), default=DEFAULTS["sample_every"],
        help="steps between EMA sample grids samples_<step>.png (and one at the end)")
    add("--grid-prompts", type=positive(int, at_most=256), default=DEFAULTS["grid_prompts"],
        help="rows of the sample grids: distinct captions (of a folder: spread over it)")
    add("--grid-images", type=positive(int, at_most=256), default=DEFAULTS["grid_images"],
        help="images per row of the sample grids")
    add("--sample-steps", type=positive(int, at_most=MAX_STEPS), default=DEFAULTS["sample_steps"],
        help="Euler steps of the sample grids")
    add("--cfg", dest="cfg_scale", metavar="W", type=finite, default=DEFAULTS["cfg_scale"],
        help="guidance weight of the sample grids")
    return p


if __name__ == "__main__":
    sys.exit(run_main(main))
