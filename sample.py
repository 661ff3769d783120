"""Sampling: the Euler ODE solver with classifier-free guidance (Lectures 1-3; SD3's numbers).

A trained vector field u_t(x | y) turns noise into data by integrating dX_t/dt = u_t(X_t | y)
from t = 0 (X_0 ~ N(0, I)) to t = 1 (flow time convention). The Euler method with N equal steps,
h = 1/N, is X_{t+h} = X_t + h u_t(X_t | y): exactly N evaluations of u.

Classifier-free guidance (Stable Diffusion 3 uses weight 2.0-5.0 and 50 steps) mixes the
conditional and the unconditional field with the guidance weight w (`cfg_scale`):

    u~_t(x | y) = (1 - w) u_t(x | empty) + w u_t(x | y).

w = 1 is the plain conditional model, w = 0 the unconditional one. Both fields come from one
batched forward pass of 2B samples. Every latent channel is guided (DiT and SiT guide only the
first 3 of 4 channels, a leftover of pixel-space code; here that would be a bug).

The three sampler functions need only torch (any model(x, t, cond) and condition tensors): copy
them alone. Then `generate` (prompts -> images with our DiT and VAE) and the command line.
Offers: euler_sample, cfg_velocity, guided_field, generate, to_pil, write_prompts, main,
check_prompts, parser
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from checkpoint import load_flow
from data import from_model_range, grid_scale, image_format, save_grid
from common import (MAX_BATCH, MAX_STEPS, Parser, Progress, UserError, add_machine_flags,
                    atomic_write, autocast, check_output, finite, maybe_compile, pick_amp,
                    pick_device, positive, run_main, seed_value)
from embeddings import null_prompt, prompt_as_read, prompt_is_truncated, prompt_words, tokenize


def euler_sample(u, x, steps):
    """Euler integration of dx/dt = u(x, t) from t = 0 to 1 in `steps` equal steps:
    u(x (B, ...), t (B,)) -> (B, ...). Returns x at t = 1. Calls u exactly `steps` times and
    never synchronises with the host (the time grid is built on x's device up front).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    h = 1.0 / steps
    ts = torch.arange(steps, device=x.device, dtype=torch.float32) * h   # (steps,) left ends
    for i in range(steps):
        t = ts[i].expand(x.shape[0])                                     # (B,)
        x = x + h * u(x, t)
    return x


def cfg_velocity(u_cond, u_uncond, cfg_scale):
    """(1 - w) u(x|empty) + w u(x|y) with w = cfg_scale, on every channel."""
    return u_uncond + cfg_scale * (u_cond - u_uncond)


def guided_field(model, cond, null_cond, cfg_scale, interval=None):
    """The guided vector field u(x, t) for the conditions `cond` (B, ...).

    model(x, t, cond) -> u; null_cond: the null condition, (1, ...) or (B, ...). cfg_scale 1: the
    conditional model alone (no wasted unconditional pass); otherwise one forward on 2B samples,
    [x; x] with [cond; null_cond], mixed in float32 at least (bf16 would round the mix).
    interval (t0, t1): guide only at times t0 <= t < t1 (weight 1 elsewhere), as Kynkaanniemi
    et al. (2024) found guidance near pure noise costs variety and buys little.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond)
    both_cond = torch.cat([cond, null_cond.expand_as(cond)])            # (2B, ...)

    def u(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), both_cond)   # (2B, C, h, w)
        u_cond, u_uncond = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2)
        w = cfg_scale
        if interval is not None:                      # a weight per sample, on the device
            w = torch.where((t >= interval[0]) & (t < interval[1]), cfg_scale, 1.0)
            w = w.view(-1, *[1] * (x.dim() - 1))                           # (B, 1, 1, 1)
        return cfg_velocity(u_cond, u_uncond, w)
    return u


# ---------------------------------------------------------------------------------------------
# From a trained model to pictures

@torch.inference_mode()
def generate(model, vae, prompts, sample_steps=50, cfg_scale=2.0, seed=0, batch_size=64, amp=None,
             cfg_interval=None):
    """uint8 images (N, 3, H, W) for N prompts: noise -> Euler + CFG -> denormalise -> decode.

    model: the DiT (EMA weights; may be compiled), vae: the VAE whose latent statistics it was
    trained with. The noise of image i depends only on (seed, i) on a CPU (on a GPU, on the
    number of prompts too): same seed, same image. Latents or pixels that are not finite stop
    it with a UserError: a picture of NaNs is never returned.
    """
    config = getattr(model, "_orig_mod", model).config
    device = next(vae.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((len(prompts), config.in_channels, config.height, config.width),
                        generator=gen, device=device)      # (N, C, h, w), X_0 ~ N(0, I)
    S, W = config.max_prompt_len, config.prompt_word_bytes
    tokens, null = tokenize(prompts, S, W).to(device), null_prompt(S, W).to(device)  # (N|1, S, W)
    images, progress = [], Progress("sampling", len(prompts))
    for i in range(0, len(prompts), batch_size):
        with autocast(device, amp):
            u = guided_field(model, tokens[i:i + batch_size], null, cfg_scale, cfg_interval)
            z = euler_sample(lambda x, t: u(x, t).float(), noise[i:i + batch_size], sample_steps)
        x = vae.decode(vae.denormalize_latents(z)).float()             # (b, 3, H, W) in [-1, 1]
        if not bool(torch.isfinite(x).all()):
            cause = (f"the guidance weight {cfg_scale:g} is far too large; use one like 1-10"
                     if abs(cfg_scale) > 100 else "the model's weights give inf/NaN (a damaged "
                     "checkpoint or a diverged training); use another checkpoint")
            raise UserError(f"inf/NaN samples (cfg {cfg_scale:g}, {sample_steps} steps): {cause}")
        images.append(from_model_range(x).cpu())                        # uint8 (b, 3, H, W)
        progress.update(i + len(x))
    return torch.cat(images)


def to_pil(images):
    """uint8 images (N, 3, H, W), as `generate` returns them -> a list of N PIL RGB images."""
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images.cpu()]


def write_prompts(path, prompts, replace=True):
    """The prompts one per line (a line break inside a prompt written as its escape, so that
    line i is row i's prompt), atomically."""
    breaks = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"       # what str.splitlines splits on
    text = "".join("".join(c.encode("unicode_escape").decode() if c in breaks else c for c in p)
                   + "\n" for p in prompts)
    atomic_write(path, lambda f: f.write(text.encode()), "prompts", replace)


# ---------------------------------------------------------------------------------------------
# The command line: python sample.py --ckpt runs/flow/ckpt.pt --prompt "..."

def main(argv=None):
    args = parser().parse_args(argv)
    device = pick_device(args.device)
    amp = pick_amp(args.amp, device)
    out, text = Path(args.out), Path(args.out).with_suffix(".prompts.txt")
    if image_format(out) is None:              # .psd: Pillow reads it only; .xbm: no RGB
        raise UserError(f"--out {out}: not an image file name Pillow writes; use e.g. samples.png")
    for path in (out, text):
        check_output(path, "--out", args.overwrite, [("--ckpt", args.ckpt), ("--vae", args.vae)])
    model, vae, ckpt = load_flow(args.ckpt, device, args.vae)
    prompts = args.prompt if args.prompt is not None else ckpt["sample_prompts"]
    check_prompts(prompts, model.config, ckpt["caption_words"])
    model = maybe_compile(model, device, args.compile)
    settings = [(w, s) for s in args.sample_steps for w in args.cfg_scales]
    rows = [p for p in prompts for _ in range(args.n)]
    blocks = [generate(model, vae, rows, steps, w, args.seed, args.batch_size, amp,
                       args.cfg_interval)
              .view(len(prompts), args.n, 3, ckpt["image_size"], ckpt["image_size"])
              for w, steps in settings]                          # (P, n, 3, H, W) each
    sweeps = len(args.cfg_scales) > 1, len(args.sample_steps) > 1    # label what a sweep varies
    labels = [", ".join(x for x, varies in zip((f"cfg {w:g}", f"{s} steps"), sweeps) if varies)
              for w, s in settings]
    info = {"prompts": prompts, "seed": args.seed, "cfg": args.cfg_scales, "n": args.n,
            "cfg_interval": args.cfg_interval, "steps": args.sample_steps, "checkpoint": args.ckpt}
    save_grid(out, torch.cat(blocks, dim=1).flatten(0, 1), nrow=args.n * len(settings),
              row_labels=[p or "(empty prompt: unconditional)" for p in prompts]
              if args.labels else None,
              col_labels=labels if args.labels and len(settings) > 1 else None,
              scale=args.scale or grid_scale(ckpt["image_size"]), info=info,
              replace=args.overwrite)
    write_prompts(text, prompts, replace=args.overwrite)
    print(f"wrote {out} and {text}: {len(prompts)} prompts x {args.n} images for cfg "
          f"{' '.join(f'{w:g}' for w in args.cfg_scales)} and "
          f"{' '.join(map(str, args.sample_steps))} steps")
    return 0


def check_prompts(prompts, config, caption_words):
    """Refuse a prompt that is not text; a line for each prompt longer than the model reads (what
    it reads), and for each with words the training captions never had (guessed at from bytes)."""
    S, W = config.max_prompt_len, config.prompt_word_bytes
    for prompt in prompts:
        if any("\ud800" <= c <= "\udfff" for c in prompt):   # a lone surrogate: no UTF-8
            raise UserError(f"--prompt {ascii(prompt)[:60]}: not valid UTF-8 text; check the "
                            f"terminal's or the file's encoding")
        if prompt_is_truncated(prompt, S, W):
            print(f"warning: prompt {prompt[:60]!r} is longer than the {S - 1} word tokens this "
                  f"model reads; it reads only {prompt_as_read(prompt, S, W)!r}", file=sys.stderr)
        unseen = [w for w in dict.fromkeys(prompt_words(prompt)) if w not in caption_words]
        if unseen:
            print(f"note: prompt {prompt[:60]!r}: {', '.join(map(repr, unseen[:8]))} never "
                  f"occurred in the training captions; the model guesses at such words from "
                  f"their letters (expect them ignored or half drawn)", file=sys.stderr)


def parser():
    p = Parser("Sample a grid from a trained flow model (Euler + classifier-free guidance): one "
               "row per prompt, a block of columns per setting.", """examples:
  python sample.py --ckpt runs/flow/ckpt.pt --prompt "a large red circle on a white background"
  python sample.py --prompt "a small blue square on a black background" --n 4 --cfg 1 2 4 7
""")
    add = p.add_argument
    add("--ckpt", default="runs/flow/ckpt.pt", help="flow checkpoint (train_flow.py's ckpt.pt)")
    add("--prompt", action="append", default=None, help="a prompt (repeat for several rows; \"\" "
        "= unconditional). Default: the prompts of the training run's sample grids")
    add("--n", type=positive(int, at_most=4096), default=8, help="images per prompt and setting")
    add("--sample-steps", metavar="N", nargs="+", type=positive(int, at_most=MAX_STEPS),
        default=[50], help="Euler steps (model evaluations); several make a sweep")
    add("--cfg", dest="cfg_scales", metavar="W", nargs="+", type=finite, default=[2.0],
        help="guidance weight w (1 = no guidance); several make a sweep")
    add("--cfg-interval", type=positive(float, allow_zero=True, at_most=1.0), nargs=2,
        metavar=("T0", "T1"), default=None,
        help="guide only for t in [T0, T1) (e.g. 0.2 1: not near pure noise). Default: always")
    add("--seed", type=seed_value, default=0, help="noise seed: same seed, same images")
    add("--out", default="samples.png",
        help="the picture (and OUT.prompts.txt); both must be new, unless --overwrite")
    add("--scale", type=positive(int, at_most=16), help="enlarge each image. Default: to ~64 px")
    add("--labels", action=argparse.BooleanOptionalAction, default=True, help="label the rows")
    add("--vae", default=None, help="VAE checkpoint. Default: the one the flow checkpoint names")
    add_machine_flags(p, compile_default=False)
    add("--batch-size", type=positive(int, at_most=MAX_BATCH), default=64, help="images a batch")
    add("--overwrite", action="store_true", help="replace --out (and OUT.prompts.txt), never a "
        "file this command reads")
    return p


if __name__ == "__main__":
    sys.exit(run_main(main))
