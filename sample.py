"""Sampling: the Euler ODE solver with classifier-free guidance (Lecture 04, bonus slides).

A trained vector field u_t(x | y) turns noise into data by integrating dX_t/dt = u_t(X_t | y)
from t = 0 (X_0 ~ N(0, I)) to t = 1 (flow time convention). The Euler method with N equal steps,
h = 1/N, is X_{t+h} = X_t + h u_t(X_t | y): exactly N evaluations of u.

Classifier-free guidance (Stable Diffusion 3 uses weight 2.0-5.0 and 50 steps) mixes the
conditional and the unconditional field with the guidance weight w (`cfg_scale`):

    u~_t(x | y) = (1 - w) u_t(x | empty) + w u_t(x | y).

w = 1 is the plain conditional model, w = 0 the unconditional one. Both fields come from one
batched forward pass of 2B samples. Every latent channel is guided (DiT and SiT guide only the
first 3 of 4 channels, a leftover of pixel-space code; here that would be a bug).

The three sampler functions come first and need only torch: any model(x, t, cond) and any
condition tensors will do, so they can be copied into another project alone. Then `generate`
(prompts -> images with our DiT and VAE) and the command line.

Offers: euler_sample, cfg_velocity, guided_field, generate, to_pil, EXAMPLES,
parse_args, main
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

import data as data_lib
from checkpoint import export_flow, load_flow
from common import (MAX_BATCH, MAX_STEPS, HelpFormatter, Phase, UserError, autocast,
                    available_memory, finite, maybe_compile, pick_amp, pick_device, positive,
                    run_main, seed_value)
from embeddings import null_prompt, prompt_as_read, prompt_is_truncated, prompt_words, tokenize
from runs import check_output, write_prompts


def euler_sample(u, x, steps):
    """Euler integration of dx/dt = u(x, t) from t = 0 to 1 in `steps` equal steps.

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


def guided_field(model, cond, null_cond, cfg_scale):
    """The guided vector field u(x, t) for the conditions `cond` (B, ...).

    model(x, t, cond) -> u. null_cond: the null condition, (1, ...) or (B, ...). With
    cfg_scale == 1 this is the conditional model alone (no wasted unconditional pass);
    otherwise each call runs one forward on 2B samples: [x; x] with [cond; null_cond].
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, cond)
    both_cond = torch.cat([cond, null_cond.expand_as(cond)])            # (2B, ...)

    def u(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), both_cond)   # (2B, C, h, w)
        u_cond, u_uncond = out.chunk(2)
        return cfg_velocity(u_cond, u_uncond, cfg_scale)
    return u


# ---------------------------------------------------------------------------------------------
# From a trained checkpoint to pictures: python sample.py --ckpt runs/flow/ckpt.pt --prompt ...

@torch.inference_mode()
def generate(model, vae, prompts, sample_steps=50, cfg_scale=4.0, seed=0, batch_size=64, amp=None,
             steps=None):
    """Images (N, 3, H, W) uint8 for a list of prompts: noise -> Euler + CFG -> denormalise -> decode.

    sample_steps and cfg_scale are the CLI's --sample-steps and --cfg-scale (`steps=` is the old
    spelling and still works, with a note).
    model: the DiT (EMA weights; may be torch.compile'd), vae: the VAE whose latent statistics the
    model was trained with. The noise of image i depends only on (seed, i): same seed, same image.
    Latents or pixels that are not finite stop it (a UserError naming the guidance weight when it
    is huge, else the weights): a picture of NaNs is never returned.
    """
    if steps is not None:
        print("note: generate(steps=...) is now generate(sample_steps=...), as --sample-steps",
              file=sys.stderr)
        sample_steps = steps
    config = getattr(model, "_orig_mod", model).config
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn((len(prompts), config.in_channels, config.height, config.width),
                        generator=gen, device=device)      # (N, C, h, w), X_0 ~ N(0, I)
    tokens = tokenize(prompts, config.max_prompt_len, config.prompt_word_group).to(device)  # (N, S)
    null = null_prompt(config.max_prompt_len).to(device)             # (1, S)
    images, phase = [], Phase(f"sampling {len(prompts)} images", len(prompts))
    for i in range(0, len(prompts), batch_size):
        with autocast(device, amp):
            u = guided_field(model, tokens[i:i + batch_size], null, cfg_scale)
            z = euler_sample(lambda x, t: u(x, t).float(), noise[i:i + batch_size], sample_steps)
        _check_finite(z, "latents", cfg_scale, sample_steps)
        x = vae.decode(vae.denormalize_latents(z))           # (b, 3, H, W) in [-1, 1]
        _check_finite(x, "pixels", cfg_scale, sample_steps)
        images.append(data_lib.from_model_range(x.float()).cpu())
        phase.update(i + len(images[-1]))
    return torch.cat(images)


def _check_finite(x, what, cfg_scale, steps):
    if bool(torch.isfinite(x).all()):
        return
    cause = (f"the guidance weight {cfg_scale:g} is far too large; use one like 1-10"
             if abs(cfg_scale) > 100 else "the model's weights give inf/NaN (a damaged checkpoint "
             "or a diverged training); use another checkpoint")
    raise UserError(f"sampling gave inf/NaN {what} (cfg {cfg_scale:g}, {steps} steps): {cause}")


def to_pil(images):
    """uint8 images (N, 3, H, W), as `generate` returns them -> a list of N PIL RGB images."""
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images.cpu()]


EXAMPLES = """examples:
  python sample.py --ckpt runs/flow/ckpt.pt --prompt "a large red circle on a white background"
  python sample.py --prompt "a small blue square on a black background" --n 4 --cfg 1 2 4 7
  python sample.py --ckpt runs/flow/ckpt.pt --export model.pt --export-dtype bf16
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Sample a grid of images from a trained flow model (Euler + classifier-free "
                    "guidance): one row per prompt, a block of columns per guidance weight and "
                    "step count. Writes the PNG (prompts, seed and settings in its text chunks) "
                    "and the prompts beside it, one per row, in OUT.prompts.txt.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="runs/flow/ckpt.pt",
                   help="flow checkpoint from train_flow.py, or a file written by --export")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several rows; \"\" = unconditional). "
                        "Default: the prompts the training run used for its sample grids")
    p.add_argument("--n", type=positive(int), default=8, help="images per prompt and setting")
    p.add_argument("--sample-steps", "--steps", dest="sample_steps", metavar="N", nargs="+",
                   type=positive(int, at_most=MAX_STEPS), default=[50],
                   help="Euler steps (model evaluations); several give a sweep (--steps is the "
                        "old spelling)")
    p.add_argument("--cfg", "--cfg-scale", dest="cfg_scales", metavar="W", nargs="+", type=finite,
                   default=[4.0],
                   help="guidance weight w: (1 - w) u(x|empty) + w u(x|y); 1 = no guidance; "
                        "several give a sweep")
    p.add_argument("--seed", type=seed_value, default=0, help="noise seed: same seed, same images")
    p.add_argument("--out", default="samples.png",
                   help="output picture (png), and OUT.prompts.txt beside it; neither may exist "
                        "(see --overwrite)")
    p.add_argument("--scale", type=positive(int), default=None,
                   help="enlarge every image this many times (nearest neighbour). Default: "
                        "enough for 64-pixel images (2 for 32 px)")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="write each row's prompt above it and each block's setting on top")
    p.add_argument("--vae", default=None, help="VAE checkpoint. Default: the one the flow checkpoint names")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast for the DiT forward passes (auto = bf16 on CUDA/bf16 CPUs)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model call")
    p.add_argument("--batch-size", type=positive(int, at_most=MAX_BATCH), default=64,
                   help="images per sampler batch")
    p.add_argument("--export", default=None, metavar="PATH",
                   help="instead of sampling, write the EMA DiT and its VAE to PATH as one small "
                        "file that sample.py and sample.load_flow read")
    p.add_argument("--export-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights' dtype in the --export file (bf16: half the size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out and OUT.prompts.txt (or the --export file) if they exist, "
                        "even a file this command reads; without it they are refused before any "
                        "work")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)                # flag mistakes first, before any loading
    if args.export is not None:
        path = export_flow(args.ckpt, args.export, args.export_dtype, args.vae, args.overwrite)
        print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB, {args.export_dtype}); "
              f"sample from it with: python sample.py --ckpt {path}")
        return 0
    amp = pick_amp(args.amp, device)
    out, text = _check_out(Path(args.out), args)
    if args.prompt is not None:
        _check_prompts(args.prompt)
    model, vae, ckpt = load_flow(args.ckpt, device, args.vae)
    prompts = args.prompt if args.prompt is not None else ckpt["sample_prompts"]
    _warn_truncated(prompts, model.config)
    _note_unseen_words(prompts, ckpt.get("caption_words"))
    settings = [(w, s) for s in args.sample_steps for w in args.cfg_scales]
    _check_memory(len(prompts) * args.n * len(settings), model.config, ckpt["image_size"],
                  args.n, args.scale or data_lib.grid_scale(ckpt["image_size"]),
                  args.scale is not None)
    model, _ = maybe_compile(model, device, args.compile)
    all_prompts = [p for p in prompts for _ in range(args.n)]
    blocks = []
    for cfg_scale, steps in settings:
        images = generate(model, vae, all_prompts, steps, cfg_scale, args.seed, args.batch_size, amp)
        blocks.append(images.view(len(prompts), args.n, *images.shape[1:]))   # (P, n, 3, H, W)
    grid = torch.cat(blocks, dim=1).flatten(0, 1)     # row p: n images of each setting in turn
    info = {"prompts": prompts, "seed": args.seed, "cfg": args.cfg_scales,
            "steps": args.sample_steps, "n": args.n, "checkpoint": str(args.ckpt)}
    data_lib.save_grid(out, grid, nrow=args.n * len(settings),
                       row_labels=[p or "(empty prompt: unconditional)" for p in prompts]
                       if args.labels else None,
                       col_labels=_setting_labels(args) if args.labels else None,
                       scale=args.scale or data_lib.grid_scale(ckpt["image_size"]), info=info)
    write_prompts(text, prompts)
    print(f"wrote {out} and {text}: {len(prompts)} prompts x {args.n} images for cfg "
          f"{' '.join(f'{w:g}' for w in args.cfg_scales)} and "
          f"{' '.join(map(str, args.sample_steps))} steps")
    return 0


def _setting_labels(args):
    """The top labels of a sweep's column blocks (None for a single setting)."""
    if len(args.cfg_scales) * len(args.sample_steps) == 1:
        return None
    labels = []
    for steps in args.sample_steps:
        for w in args.cfg_scales:
            parts = ([f"cfg {w:g}"] if len(args.cfg_scales) > 1 else []) + \
                    ([f"{steps} steps"] if len(args.sample_steps) > 1 else [])
            labels.append(", ".join(parts))
    return labels


def _check_out(out, args):
    """--out must name an image file (by its extension) in a folder we can write or make; it and
    OUT.prompts.txt must be new (or --overwrite) and none of the files this command reads.
    Returns (picture, prompts file)."""
    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {out}: not an image file name; use e.g. samples.png")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name an image file, e.g. {out / 'samples.png'}")
    inputs = [("--ckpt", args.ckpt), ("--vae", args.vae)]
    text = out.with_suffix(".prompts.txt")
    return (check_output(out, "--out", args.overwrite, inputs),
            check_output(text, "--out (its prompts file)", args.overwrite, inputs))


def _check_memory(count, config, image_size, n, scale=1, scale_given=False):
    """Refuse, before any work, a grid whose images (noise, pixels, grid) would not fit in memory,
    naming --scale when the enlargement it asks for is what does not fit, else --n."""
    latent = config.in_channels * config.height * config.width * 4      # float32 noise
    pixels = 3 * (image_size * scale) ** 2                               # uint8, twice: + grid
    need = count * (latent + 2 * pixels + 8 * config.max_prompt_len)
    have = available_memory()
    if need > 0.8 * have:
        unscaled = count * (latent + 6 * image_size ** 2 + 8 * config.max_prompt_len)
        if scale_given and unscaled <= 0.8 * have:
            raise UserError(f"--scale {scale}: {count} images drawn {scale} times larger need about "
                            f"{need / 2 ** 30:.3g} GiB, more than the {have / 2 ** 30:.1f} GiB "
                            f"available; lower --scale")
        raise UserError(f"--n {n}: {count} images need about {need / 2 ** 30:.1f} GiB, more than "
                        f"the {have / 2 ** 30:.1f} GiB available; lower --n or use fewer prompts")


def _check_prompts(prompts):
    """Every prompt must be text (a byte that is not UTF-8 arrives as a lone surrogate)."""
    for prompt in prompts:
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError(f"--prompt {ascii(prompt)[:60]}: not valid UTF-8 text; check the "
                            f"terminal's or the file's encoding")


def _warn_truncated(prompts, config):
    """One warning line per prompt longer than the model reads (tokenize truncates it), quoting
    the part the model reads."""
    max_len, group = config.max_prompt_len, config.prompt_word_group
    unit = "token positions" if group else "bytes"
    for prompt in prompts:
        if prompt_is_truncated(prompt, max_len, group):
            kept = prompt_as_read(prompt, max_len, group)
            print(f"warning: prompt {prompt[:60]!r}{'...' if len(prompt) > 60 else ''} is longer "
                  f"than the {max_len - 1} {unit} this model reads; it reads only {kept!r}",
                  file=sys.stderr)


def _note_unseen_words(prompts, caption_words):
    """One note per prompt with words the training captions never had (the checkpoint's
    caption_words; older checkpoints have none, and get no note): the model reads such a word
    from its bytes alone, so it is guessed at or ignored, not understood."""
    if not isinstance(caption_words, dict):
        return
    for prompt in prompts:
        unseen = [w for w in dict.fromkeys(prompt_words(prompt)) if w.lower() not in caption_words]
        if unseen:
            print(f"note: prompt {prompt[:60]!r}: {', '.join(map(repr, unseen[:8]))} never occurred "
                  f"in the training captions; the model guesses at such words from their letters "
                  f"(expect them ignored or half drawn)", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(run_main(main))
