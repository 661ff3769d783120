"""What `python train_flow.py` settles before it trains: which VAE, and how many steps.

Slide "Latent Diffusion Models (LDMs) - Recipe", step 1: the latent space comes first. With --vae
a run uses that VAE. Without, it uses the *automatic VAE* of its data: train_vae.py with its
defaults on the run's data and size (and seed, for the shapes: a folder's is shared by every
--seed), one per dataset, size and step budget beside --out (`automatic_path`), trained first
by the same command (`train_automatic`). `find_vae` settles the file and checks it
before the images load; `ensure_vae` loads it, training or finishing the automatic one first.

How many steps: `settle_steps` gives a new run its default --steps by the data; `size_to_minutes`
turns --minutes N into --steps and --vae-steps from seconds per step timed at the start
(train_flow.step_seconds, whose VAE step is `vae_step_seconds`).

It is train_flow.py's planning in a file of its own, so that the script reads as the recipe; of
the project's files only train_flow.py imports it (tests/test_layout.py checks).

Offers: find_vae, ensure_vae, automatic_path, train_automatic, settle_steps, size_to_minutes,
vae_step_seconds
"""
import hashlib
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import data as data_lib
import train_vae
from checkpoint import load_checkpoint, load_vae
from common import MAX_STEPS, UserError, median_time, synchronizer


# ---------------------------------------------------------------------------------------------
# Step 1's VAE: --vae, or the automatic VAE of this data

def find_vae(args, resume, device):
    """(path, (VAE, checkpoint) or None): --vae, loaded here, or the automatic VAE of this data
    beside --out (say runs/vae-shapes-32px-seed0-n20000/ckpt.pt), loaded or trained later by
    `ensure_vae` (not when resuming: a run goes on with its own VAE, the same bytes). Before any
    slow work, the image size must divide into its latents and those into patches."""
    path = Path(args.vae) if args.vae is not None else automatic_path(args)
    if not path.is_file() and (args.vae is not None or resume is not None):
        what = "is a folder; pass its ckpt.pt" if path.is_dir() else "file not found"
        raise UserError(f"--vae {path}: {what}; pass the VAE the run was trained with (or a copy)"
                        f", train one with train_vae.py, or omit --vae for the automatic one")
    if (resume is not None and not args.allow_changes
            and hashlib.sha1(path.read_bytes()).hexdigest() != resume["vae"]["sha1"]):
        raise UserError(f"--resume: the run was trained with another VAE "
                        f"({resume['vae']['path']}); pass that one with --vae (or "
                        f"--allow-changes to go on with this one)")
    given = load_vae(path, device) if args.vae is not None else None
    if given is None and path.is_file():          # a damaged automatic VAE: refused here too
        load_checkpoint(path, "vae", "--vae")
    factor = given[0].config.factor if given else train_vae.vae_config(args).factor
    if args.image_size % (factor * args.patch_size):
        raise UserError(f"--image-size {args.image_size} must be divisible by the VAE factor "
                        f"{factor} x patch size {args.patch_size} = {factor * args.patch_size}; "
                        f"another size, or a --vae of another factor (train_vae.py --vae-preset)")
    return path, given


def ensure_vae(args, path, given, run, train_set):
    """The EMA VAE and its checkpoint: `given` (--vae, loaded by find_vae), or the automatic one,
    trained first by train_vae.py (or finished, if a run stopped while training it)."""
    ckpt = load_checkpoint(path, "vae", "--vae") if given is None and path.is_file() else None
    if given is None and (ckpt is None or not ckpt["finished"]):
        print(f"{'finishing the unfinished' if ckpt else 'no --vae given: training the'} "
              f"automatic VAE of this data first ({path.parent}; the recipe: latent space "
              f"first, then the flow model)")
        train_automatic(args, path, resume=ckpt is not None)
    else:
        data_lib.announce(train_set)
    vae, ckpt = given or load_vae(path, run.device)
    if given is None:                   # the automatic VAE: made by today's defaults?
        today = {**train_vae.DEFAULTS, "beta": train_vae.vae_beta(args)}
        config = asdict(train_vae.vae_config(args))
        older = [f"--{n.replace('_', '-')} {ckpt['args'].get(n, 0)}, the default now {today[n]}"
                 for n in ("steps", "decoder_noise", "beta") if ckpt["args"].get(n, 0) != today[n]
                 and not (n == "steps" and (args.minutes or args.vae_steps))]
        older += [f"{n} {v}, {config[n]} now" for n, v in asdict(vae.config).items()
                  if v != config[n]]
        if older:
            print(f"note: the automatic VAE {path} was made by an earlier default ("
                  f"{'; '.join(older)}); it is used as it is (delete {path.parent} for today's)",
                  file=sys.stderr)
    if ckpt["data"] != train_set.name:
        print(f"warning: the VAE {path} was trained on {ckpt['data']}, this run uses "
              f"{train_set.name}; pass --vae with a VAE of these images if samples look wrong",
              file=sys.stderr)
    return vae, ckpt


def automatic_path(args):
    """Where the automatic VAE of train_flow.py's flags `args` lives: one per dataset, image size
    (and --vae-steps or --minutes), beside --out (say runs/vae-shapes-32px-seed0-n20000/ckpt.pt)."""
    if args.data is None:
        tag = f"shapes-{args.image_size}px-seed{args.seed}-n{args.n_builtin}"
    else:
        digest = hashlib.sha1(args.data.encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(args.data).name)
        tag = f"{name}-{digest}-{args.image_size}px"
    if args.minutes:                              # (its steps are sized after this is named)
        tag += f"-{args.minutes:g}min"
    elif args.vae_steps is not None:
        tag += f"-{args.vae_steps}steps"
    return Path(args.out).absolute().parent / f"vae-{tag}" / "ckpt.pt"


def train_automatic(args, path, resume):
    """Train (`resume`: finish, on its stored data settings) the automatic VAE at `path` by
    train_vae.py with train_flow.py's data, size, seed, --vae-steps and machine flags `args`; a
    run stopped there before its first checkpoint is started over (--overwrite)."""
    data = {} if resume else {"--image-size": args.image_size, "--seed": args.seed,
                              "--n-builtin": args.n_builtin, "--data": args.data}
    flags = {"--out": path.parent, **data, "--device": args.device, "--amp": args.amp,
             "--steps": args.vae_steps, "--threads": args.threads}
    argv = [str(a) for k, v in flags.items() if v is not None for a in (k, v)]
    argv += ["--resume"] if resume else ["--overwrite"]
    argv += [] if args.compile is None else ["--compile" if args.compile else "--no-compile"]
    train_vae.main(argv, resume_command="the same python train_flow.py command (it finishes the "
                   "VAE first)")


# ---------------------------------------------------------------------------------------------
# --steps by the data, and --minutes: a run sized to the time at hand

def settle_steps(run, folder_steps):
    """A new run's default --steps by the data (`folder_steps` on a folder), which --minutes sizes
    from; a resumed run keeps its own. --minutes refuses --steps, --vae-steps and --resume."""
    args, flags = run.args, run.flags_given
    if args.minutes and run.resume is None and flags & {"steps", "vae_steps"}:
        raise UserError("--minutes sizes --steps and --vae-steps itself; pass one or the other")
    if run.resume is not None and "minutes" in flags:
        raise UserError("--minutes sizes a new run; --resume goes on to the run's --steps (pass "
                        "a larger --steps to train on)")
    if run.resume is None and args.data and "steps" not in flags:
        args.steps = folder_steps
    run.derived = {"steps", "vae_steps"} if args.minutes else set()


def size_to_minutes(run, train_set, vae_path, given, step_seconds):
    """--minutes N: --steps, and --vae-steps when the automatic VAE is still to train, scaled
    together from their defaults (this data's, from settle_steps, and train_vae.py's) so that
    training and sample grids take about N minutes here (loading and encoding on top), from the
    seconds `step_seconds` (train_flow.step_seconds) measures."""
    args = run.args
    vae_config = given[0].config if given else train_vae.vae_config(args)
    todo = given is None and not (vae_path.is_file() and
                                  load_checkpoint(vae_path, "vae", "--vae")["finished"])
    t_vae, t_dit, t_grid = step_seconds(args, run.device, run.amp, train_set, vae_config, todo)
    # seconds = steps x (a DiT step + its share of the grids and the VAE's steps) + the last grid
    ratio = train_vae.DEFAULTS["steps"] / args.steps            # VAE steps per DiT step
    per_step = t_dit + t_grid * args.sample_steps / args.sample_every + t_vae * ratio
    steps = int((args.minutes * 60 - t_grid * args.sample_steps) / per_step)
    if steps < 1:
        raise UserError(f"--minutes {args.minutes:g} is too short here: one step and a sample "
                        f"grid take {(per_step + t_grid * args.sample_steps) / 60:.2g} minutes")
    args.steps = min(steps, MAX_STEPS)
    if t_vae:
        args.vae_steps = min(max(1, round(args.steps * ratio)), MAX_STEPS)
    print(f"--minutes {args.minutes:g}: {args.steps} DiT steps ({t_dit:.3f} s each)"
          + (f" and {args.vae_steps} VAE steps ({t_vae:.3f} s each)" if t_vae else "")
          + ", from steps timed here")


def vae_step_seconds(config, images, device, amp, repeats=3):
    """Seconds of an eager default training step of a fresh VAE of `config` (train_vae.py's)."""
    args = train_vae.parser().parse_args([])
    model, ema, opt, scaler = train_vae.build(config, args, device, amp)
    x = images[torch.randint(len(images), (args.batch_size,))].to(device)
    return median_time(lambda: train_vae.train_step(model, model, ema, opt, scaler, x, 0, args,
                                                    amp),
                       repeats=repeats, sync=synchronizer(device))
