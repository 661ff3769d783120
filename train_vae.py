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

This file also holds the training plumbing that train_flow.py reuses (one place, not two):
device and autocast selection, the EMA, atomic checkpoint writing, safe checkpoint loading,
the progress line, Ctrl-C handling and the one-line errors for user mistakes.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

import data as data_lib
from vae import (DEFAULT_BETA, DEFAULT_SIGMA, VAE, VAE_PRESETS, VAEConfig, latent_stats, vae_loss,
                 vae_preset)

FORMAT = "latent-flow"
FORMAT_VERSION = 1


# =============================================================================================
# Shared training plumbing (used by train_flow.py, sample.py and evaluate.py too)

class UserError(Exception):
    """A mistake the user can fix; main() prints it as one line and exits with status 2."""


def run_main(main_fn):
    """Run a script's main() as a command, never ending in a traceback for things the user can fix.

    User mistakes and problems outside the code (a full disk, an unwritable folder) become one
    line on stderr and exit status 2; Ctrl-C outside the training loop (which saves and exits
    with 130 itself) exits with 130."""
    try:
        return main_fn()
    except (UserError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the path, its permissions and the free "
              f"disk space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopped without saving (the last checkpoint, if any, is intact)",
              file=sys.stderr)
        return 130


class HelpFormatter(argparse.HelpFormatter):
    """argparse help that ends each flag's text with its default, unless the text gives it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "Default" in text or any(action.default is d for d in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text}. Default: %(default)s"


def positive(kind, allow_zero=False):
    """argparse type: a finite int or float > 0 (>= 0 with allow_zero)."""
    bound = ">= 0" if allow_zero else "> 0"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}")
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value
    parse.__name__ = f"{'non-negative' if allow_zero else 'positive'} {kind.__name__}"
    return parse


def fraction(text):
    """argparse type: a float in [0, 1) (an EMA decay, a dropout probability)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def seed_value(text):
    """argparse type: a random seed, an integer in [0, 2**63)."""
    value = positive(int, allow_zero=True)(text)
    if value >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be < 2**63, got {text}")
    return value


def add_common_flags(p, out_default, steps_default, batch_default, lr_default):
    """Flags both training scripts share, with the same meaning."""
    p.add_argument("--data", default=None,
                   help="folder of your images (searched recursively; captions from name.txt "
                        "or class sub-folders). Default: the built-in coloured-shapes dataset")
    p.add_argument("--image-size", type=positive(int), default=32,
                   help="train at this size in pixels (short side resized, centre-cropped). Default: 32")
    p.add_argument("--out", default=out_default,
                   help=f"run folder for checkpoint, pictures and log. Default: {out_default}")
    p.add_argument("--steps", type=positive(int), default=None,
                   help=f"optimizer steps in total (a resumed run continues up to this). "
                        f"Default: {steps_default}")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help=f"images per optimizer step. Default: {batch_default}")
    p.add_argument("--lr", type=positive(float), default=None,
                   help=f"AdamW learning rate. Default: {lr_default}")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N. Default: auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (--no-compile to turn off). Default: on for CUDA, "
                        "off for CPU (compiling costs more than it saves in short CPU runs)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision: bf16 or fp16 autocast, or off (float32). auto = bf16 on "
                        "CUDA (fp16 + GradScaler where bf16 is missing) and on CPUs with native "
                        "bf16, else off. Default: auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT/ckpt.pt (same model settings) up to --steps")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed (data order, noise, init). Default: 0")
    p.add_argument("--log-every", type=positive(int), default=50,
                   help="steps between progress lines (and NaN checks). Default: 50")
    p.add_argument("--ckpt-every", type=positive(int), default=500,
                   help="steps between checkpoints (always one at the end and on Ctrl-C). Default: 500")
    p.add_argument("--n-builtin", type=positive(int), default=20000,
                   help="number of built-in training images (ignored with --data). Default: 20000")


def pick_device(name):
    """torch.device from --device; asking for CUDA without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def cpu_has_native_bf16():
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def pick_amp(amp, device):
    """Autocast dtype (or None for float32) from --amp and the device."""
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp in ("auto", "bf16"):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
            if amp == "bf16":
                raise UserError("--amp bf16: this GPU has no bf16; use --amp fp16 or off")
        return torch.float16
    if amp == "fp16":
        raise UserError("--amp fp16 needs CUDA (float16 autocast is slow and lossy on CPUs); "
                        "use --amp bf16 or --amp off")
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device, dtype):
    """The autocast context for a dtype chosen by pick_amp (a no-op for float32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_backends(device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # TF32 matmuls/convs: free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True


def maybe_compile(model, device, flag):
    """torch.compile when asked (or by default on CUDA); a missing compiler means eager + a warning.

    torch.compile is lazy: a missing C++ compiler or an unsupported Python shows up on the first
    call, not here, so the compiled model is wrapped in EagerFallback. Returns (model, compiled)."""
    if flag is None:
        flag = device.type == "cuda"
    if not flag:
        return model, False
    try:
        compiled = torch.compile(model)
    except Exception as e:  # e.g. an unsupported Python version
        _warn_eager(e)
        return model, False
    return EagerFallback(model, compiled), True


def _warn_eager(e):
    first_line = (str(e).strip().splitlines() or [""])[0][:160]
    print(f"warning: torch.compile failed ({type(e).__name__}: {first_line}); running eagerly",
          file=sys.stderr, flush=True)


class EagerFallback(torch.nn.Module):
    """Calls the compiled model; when compiling fails (on the first call or a later recompile) it
    warns once and calls the eager model from then on. The eager model is `_orig_mod`, as in
    torch.compile's wrapper, so its parameters and config stay reachable."""

    def __init__(self, model, compiled):
        super().__init__()
        self._orig_mod = model
        object.__setattr__(self, "_compiled", compiled)   # not a submodule: same parameters

    def forward(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as e:
                if is_oom(e):
                    raise
                _warn_eager(e)          # an error of the model itself recurs below, eagerly
                object.__setattr__(self, "_compiled", None)
        return self._orig_mod(*args, **kwargs)


class EMA:
    """Exponential moving average of a model's weights, with warm-up:
    decay_k = min(decay, (1 + k) / (10 + k)) so early averages are not dominated by the init."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - d)


def restore_training(ckpt, model, ema, opt, scaler, rng):
    """Load model, EMA, optimizer and GradScaler state and this process's RNG state from a
    checkpoint written by either training script; returns the step to continue from."""
    model.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(rng)
    return ckpt["step"]


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, obj):
    """Write atomically: temporary file in the same folder, flush, fsync, rename.

    A crash or a full disk at any moment leaves either the old file or the new one, never a torn
    one. Errors become a UserError that says the previous checkpoint is intact."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())         # mkstemp's 0600 -> like open()
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        for stale in path.parent.glob(f"{path.name}.*.tmp"):   # left by a killed earlier run
            stale.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous checkpoint, "
                        f"if any, is intact: free disk space or choose another --out")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, kind, flag="--ckpt"):
    """Load a checkpoint safely (weights_only: no code runs) and check its format and kind."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: {'is a folder, not a file' if path.is_dir() else 'file not found'}")
    ckpt = safe_load(path, flag)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{flag} {path}: not a latent-flow checkpoint")
    if ckpt.get("version") != FORMAT_VERSION:
        raise UserError(f"{flag} {path}: checkpoint format version {ckpt.get('version')} is not "
                        f"supported by this code (version {FORMAT_VERSION}); use the matching code")
    if ckpt.get("kind") != kind:
        other = {"vae": "train_vae.py (pass it as --vae)", "flow": "train_flow.py (pass it as --ckpt)"}
        raise UserError(f"{flag} {path}: this is a {ckpt.get('kind')} checkpoint from "
                        f"{other.get(ckpt.get('kind'), 'elsewhere')}; a {kind} checkpoint is needed here")
    return ckpt


def safe_load(path, flag):
    """torch.load(weights_only=True): tensors and plain data only, never code. Refusals and
    unreadable files become a UserError; torch's warnings are silenced (one line, not ten)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        if code:
            raise UserError(f"{flag} {path}: refused to load: it would run Python code "
                            f"({code.group(1)}), which no latent-flow checkpoint holds; only load "
                            f"checkpoints written by train_vae.py or train_flow.py")
        raise UserError(f"{flag} {path}: not a checkpoint (not a PyTorch file, or corrupt); "
                        f"use another file or retrain")
    except Exception as e:
        raise UserError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt: "
                        f"{type(e).__name__}); use another file or retrain")


def config_mismatch(saved, current, flags=None):
    """Name the first config field that differs between a checkpoint and the current flags, and
    (with `flags`, field -> flag, "" for the default) the flag that sets it."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            text = f"{key}: checkpoint has {saved.get(key)!r}, now {current.get(key)!r}"
            if flags is not None:
                text += f"; set by {flags.get(key, flags.get(''))}"
            return text
    return None


class StopFlag:
    """Ctrl-C sets a flag; the loop saves a checkpoint at the end of the step and exits cleanly."""

    def __init__(self):
        self.stop = False
        self._old = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.stop:  # a second Ctrl-C: give up at once
            signal.signal(signal.SIGINT, self._old)
            raise KeyboardInterrupt
        self.stop = True
        print("\ninterrupted: saving a checkpoint at the end of this step...", file=sys.stderr, flush=True)

    def restore(self):
        signal.signal(signal.SIGINT, self._old)


class Progress:
    """One progress line per report: step, loss terms, images/s and ETA; also appended to log.jsonl."""

    def __init__(self, log_path, total_steps, start_step, batch_size):
        self.log_path, self.total, self.batch = log_path, total_steps, batch_size
        self.t0, self.step0 = time.perf_counter(), start_step

    def report(self, step, terms):
        elapsed = time.perf_counter() - self.t0
        done = step - self.step0
        ips = done * self.batch / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / max(done, 1)
        text = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
        print(f"step {step}/{self.total} {text} | {ips:.0f} img/s | ETA {eta / 60:.1f} min", flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": step, **terms, "img_per_s": round(ips, 2),
                                    "time": round(elapsed, 2)}) + "\n")


def check_finite(loss_sum, step, ckpt_path, model=None):
    """NaN guard: stop before anything is saved when the accumulated loss (or, given `model`, a
    weight: an update can break the weights before the loss shows it) is not finite."""
    what = None
    if not torch.isfinite(loss_sum):
        what = f"loss became {loss_sum.item()}"
    elif model is not None and not weights_finite(model):
        what = "the weights became inf/NaN"
    if what:
        raise UserError(f"{what} by step {step}; stopped without saving, the last good checkpoint "
                        f"({ckpt_path}) is untouched; lower --lr or use --amp off")


def weights_finite(model):
    """True when no parameter holds inf or NaN (one sum per tensor, one sync in all)."""
    sums = [p.detach().float().sum() for p in model.parameters()]
    return bool(torch.isfinite(torch.stack(sums)).all())


def is_oom(e):
    """CUDA's OutOfMemoryError, or any allocator's "out of memory" / "can't allocate memory"."""
    text = str(e).lower()
    return (isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


def oom_error(batch_size):
    return UserError(f"out of memory at --batch-size {batch_size}; lower it, e.g. "
                     f"--batch-size {max(1, batch_size // 2)}")


def prepare_out(out):
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose another folder")
    return out


# =============================================================================================
# VAE training

DEFAULTS = {"cpu": {"steps": 2000, "batch_size": 32, "lr": 1e-3},
            "cuda": {"steps": 20000, "batch_size": 128, "lr": 4e-4}}


def by_device(defaults, key):
    """'X on CPU, Y on CUDA' for --help, read from a DEFAULTS dict so the text stays true."""
    return f"{defaults['cpu'][key]} on CPU, {defaults['cuda'][key]} on CUDA"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train the beta-VAE of Algorithm 7 (Lecture 04) and compute latent statistics.",
        formatter_class=HelpFormatter)
    add_common_flags(p, "runs/vae", by_device(DEFAULTS, "steps"), by_device(DEFAULTS, "batch_size"),
                     by_device(DEFAULTS, "lr"))
    p.add_argument("--preset", default=None,
                   help="VAE size: '32', '64' or 'large'. Default: the preset named by --image-size "
                        "('32' up to 32 px, '64' up to 64 px), 'large' above 64 px")
    p.add_argument("--beta", type=float, default=DEFAULT_BETA,
                   help="KL weight beta of Algorithm 7 (>= 0)")
    p.add_argument("--sigma", type=positive(float), default=DEFAULT_SIGMA,
                   help="decoder std sigma of Algorithm 7 (recon = ||x - x_hat||^2 / (2 sigma^2))")
    p.add_argument("--ema-decay", type=fraction, default=0.999, help="EMA decay of the weights, in [0, 1)")
    p.add_argument("--eval-images", type=positive(int), default=512,
                   help="held-out images for the final PSNR / KL report")
    return p.parse_args(argv)


# Which flag sets each saved setting, for the --resume mismatch message ("" = the rest).
RESUME_FLAGS = {"config.image_size": "--image-size", "beta": "--beta", "sigma": "--sigma",
                "": "--preset"}


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


def batches(images, batch_size, generator=None):
    """Endless random mini-batches of uint8 images (sampling with replacement across steps)."""
    n = images.shape[0]
    while True:
        idx = torch.randint(0, n, (batch_size,), device=images.device, generator=generator)
        yield images[idx]


@torch.no_grad()
def encode_means(vae, images, device, batch_size=256, dtype=None):
    """Encoder means mu(x) of all images (Recipe step 2), float32 on the CPU: (N, C, h, w)."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = data_lib.to_model_range(images[i:i + batch_size].to(device))
        with autocast(device, dtype):
            mu, _ = vae.encode(x)
        out.append(mu.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_vae(vae, test, device, n=512, batch_size=64):
    """Held-out PSNR (dB, images on [0, 1]) and KL nats per latent dim over the first n test
    images (evaluate.py's VAE section, without rFID); also 8 originals x and their
    reconstructions x_hat, for recon.png."""
    from evaluate import evaluate_vae_section          # (local: evaluate.py imports this file)
    section = evaluate_vae_section(vae, test.images[:n], None, device, batch_size)
    x = data_lib.to_model_range(test.images[:8].to(device))
    x_hat = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
    return section["psnr"], section["kl_nats_per_dim"], x, x_hat


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    setup_backends(device)
    d = DEFAULTS[device.type]
    args.steps = args.steps or d["steps"]
    args.batch_size = args.batch_size or d["batch_size"]
    args.lr = args.lr or d["lr"]
    if args.beta < 0:
        raise UserError(f"--beta {args.beta}: must be >= 0")
    train_vae(args, device)
    return 0


def train_vae(args, device):
    """Train (or resume) a VAE as configured by parsed args; returns the checkpoint path."""
    torch.manual_seed(args.seed)
    cfg = vae_config_from_args(args)
    out = prepare_out(args.out)
    ckpt_path = out / "ckpt.pt"
    amp = pick_amp(args.amp, device)
    settings = {"config": dataclasses.asdict(cfg), "beta": args.beta, "sigma": args.sigma}
    resume = _resumable(ckpt_path, settings) if args.resume else None   # fail before the work

    train = data_lib.load_dataset(args.data, args.image_size, "train", n_builtin=args.n_builtin,
                                  seed=args.seed)
    test = data_lib.load_dataset(args.data, args.image_size, "test", n_builtin=args.n_builtin,
                                 seed=args.seed)
    images = train.images.to(device)                           # (N, 3, H, W) uint8, in memory

    model = VAE(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = EMA(model, args.ema_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    step = 0
    if resume is not None:
        step = restore_training(resume, model, ema, opt, scaler, resume["rng"])
        for group in opt.param_groups:                         # --lr applies to a resumed run too
            group["lr"] = args.lr
        print(f"resumed {ckpt_path} at step {step}")

    print(f"VAE {cfg.image_size}px -> {cfg.latent_channels}x{cfg.latent_size}x{cfg.latent_size} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {device}, "
          f"amp {amp}, {len(train)} images ({train.name}), beta {args.beta}, sigma {args.sigma}")
    train_model, _ = maybe_compile(model, device, args.compile)

    def checkpoint():
        return {"format": FORMAT, "version": FORMAT_VERSION, "kind": "vae", "step": step,
                "config": dataclasses.asdict(cfg), "beta": args.beta, "sigma": args.sigma,
                "model": model.state_dict(), "ema": ema.model.state_dict(),
                "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                "data": train.name, "latent_mean": ema.model.latent_mean.cpu(),
                "latent_std": ema.model.latent_std.cpu()}

    stopper = StopFlag()
    progress = Progress(out / "log.jsonl", args.steps, step, args.batch_size)
    stream = batches(images, args.batch_size)
    sums = torch.zeros(3, device=device)                       # loss terms since the last report
    try:
        while step < args.steps and not stopper.stop:
            x = data_lib.to_model_range(next(stream))
            try:
                with autocast(device, amp):
                    x_hat, mu, logvar = train_model(x)
                total, recon, kl = vae_loss(x, x_hat, mu, logvar, args.beta, args.sigma)
                scaler.scale(total).backward()
            except (RuntimeError, MemoryError) as e:
                if is_oom(e):
                    raise oom_error(args.batch_size)
                raise
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            ema.update(model, step)
            step += 1
            sums += torch.stack([total.detach(), recon.detach(), kl.detach()])
            if step % args.log_every == 0 or step == args.steps:
                check_finite(sums.sum(), step, ckpt_path)
                n = (step - 1) % args.log_every + 1
                terms = dict(zip(("loss", "recon", "kl"), (sums / n).tolist()))
                progress.report(step, terms)
                sums.zero_()
            if step % args.ckpt_every == 0 and step < args.steps:
                check_finite(sums.sum(), step, ckpt_path, model)
                save_checkpoint(ckpt_path, checkpoint())
    finally:
        stopper.restore()
    check_finite(sums.sum(), step, ckpt_path, model)

    if stopper.stop:
        save_checkpoint(ckpt_path, checkpoint())
        print(f"saved {ckpt_path} at step {step}; resume with: python train_vae.py --resume "
              f"--out {args.out} (plus your other flags)", file=sys.stderr)
        sys.exit(130)

    # Recipe step 2: statistics of the encoder means, with the EMA weights used for encoding.
    mus = encode_means(ema.model, train.images, device)
    mean, std = latent_stats(mus.split(1024))
    ema.model.set_latent_stats(mean, std)
    model.set_latent_stats(mean, std)
    save_checkpoint(ckpt_path, checkpoint())

    psnr, kl_per_dim, x, x_hat = evaluate_vae(ema.model, test, device, n=args.eval_images)
    data_lib.save_grid(out / "recon.png", torch.cat([x, x_hat]), nrow=8)
    print(f"held-out PSNR {psnr:.2f} dB | KL {kl_per_dim:.3f} nats/dim | latent mean "
          f"{[round(v, 3) for v in mean.tolist()]} std {[round(v, 3) for v in std.tolist()]}")
    print(f"wrote {ckpt_path}, {out / 'recon.png'}, {out / 'log.jsonl'}")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "heldout_psnr": psnr, "kl_nats_per_dim": kl_per_dim,
                            "latent_mean": mean.tolist(), "latent_std": std.tolist()}) + "\n")
    return ckpt_path


def _resumable(ckpt_path, settings):
    """The checkpoint to resume, after checking it was trained with the same settings."""
    ckpt = load_checkpoint(ckpt_path, "vae", flag="--resume")
    saved = {key: ckpt.get(key) for key in settings}
    diff = config_mismatch(_flatten(saved), _flatten(settings), RESUME_FLAGS)
    if diff:
        raise UserError(f"--resume {ckpt_path}: settings differ ({diff}); use the same flags "
                        f"or another --out")
    return ckpt


def _flatten(d, prefix=""):
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = list(v) if isinstance(v, tuple) else v
    return flat


def load_vae(path, device, flag="--vae"):
    """The EMA VAE of a checkpoint (with its latent statistics), in eval mode on `device`."""
    ckpt = load_checkpoint(path, "vae", flag=flag)
    try:
        vae = VAE(VAEConfig.from_dict(ckpt["config"]))
        vae.load_state_dict(ckpt["ema"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{flag} {path}: damaged checkpoint: its weights do not fit its "
                        f"configuration ({type(e).__name__}); use another file or retrain")
    return vae.to(device).eval().requires_grad_(False), ckpt


if __name__ == "__main__":
    sys.exit(run_main(main))
