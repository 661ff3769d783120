"""Script plumbing shared by the command-line tools: nothing here is in the lecture.

The training scripts, sample.py, evaluate.py and bench.py stand on these pieces so that each
script reads as its recipe step. They fall in five groups:

- user mistakes: `UserError` (a mistake the user can fix), `run_main` (turns it, a full disk
  or Ctrl-C into one line on stderr and an exit status, never a traceback);
- command-line flags: `HelpFormatter` (every flag's help ends with its default), the argparse
  types `positive`, `fraction`, `seed_value`, the flags both training scripts share
  (`add_training_flags`) and `by_device` for their per-device defaults;
- device and precision: `pick_device`, `pick_amp` (the autocast dtype), `autocast`,
  `setup_backends`, `cpu_has_native_bf16`, and `maybe_compile` with its `EagerFallback`;
- training: the weight average `EMA`, Ctrl-C handling `StopFlag`, the progress line `Progress`,
  the NaN guard `check_finite`/`weights_finite`, out-of-memory detection `is_oom`/`oom_error`;
- run folders: `prepare_out`.

Imports no project module.

Offers: UserError, run_main, HelpFormatter, positive, fraction, seed_value, add_training_flags,
by_device, pick_device, cpu_has_native_bf16, pick_amp, autocast, setup_backends, maybe_compile,
EagerFallback, EMA, StopFlag, Progress, check_finite, weights_finite, is_oom, oom_error,
prepare_out
"""
import argparse
import copy
import json
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch


# ---------------------------------------------------------------------------------------------
# User mistakes

class UserError(Exception):
    """A mistake the user can fix; run_main prints it as one line and exits with status 2."""


def run_main(main_fn):
    """Run a script's main() as a command, never ending in a traceback for things the user can fix.

    User mistakes and problems outside the code (a full disk, an unwritable folder) become one
    line on stderr and exit status 2; Ctrl-C outside the training loop (which saves and exits
    with 130 itself) exits with 130."""
    try:
        return main_fn()
    except UserError as e:
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


# ---------------------------------------------------------------------------------------------
# Command-line flags

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


def by_device(defaults, key):
    """'X on CPU, Y on CUDA' for --help, read from a DEFAULTS dict so the text stays true."""
    return f"{defaults['cpu'][key]} on CPU, {defaults['cuda'][key]} on CUDA"


def add_training_flags(p, out_default, steps_default, batch_default, lr_default):
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


# ---------------------------------------------------------------------------------------------
# Device and precision

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


# ---------------------------------------------------------------------------------------------
# Training

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


# ---------------------------------------------------------------------------------------------
# Run folders

def prepare_out(out):
    """The run folder, created and checked writable (a one-line UserError otherwise)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose another folder")
    return out
