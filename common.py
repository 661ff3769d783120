"""Script plumbing shared by the command-line tools: nothing here is in the lecture.

The training scripts, sample.py, evaluate.py and bench.py stand on these pieces so that each
script reads as its recipe step. They fall in five groups:

- user mistakes: `UserError` (a mistake the user can fix), `run_main` (turns it, a full disk
  or Ctrl-C into one line on stderr and an exit status, never a traceback);
- command-line flags: `HelpFormatter` (every flag's help ends with its default), the argparse
  types `positive`, `finite`, `fraction`, `seed_value` (none accepts nan or inf), the flags both
  training scripts share (`add_training_flags`), `by_device` for their per-device defaults,
  `parse_with_given` (which flags the command line set) and `restore_settings` (--resume takes
  the run's stored settings as defaults);
- device and precision: `pick_device` (cpu, cuda, mps), `device_defaults`, `pick_amp` (the
  autocast dtype), `autocast`, `setup_backends`, `cpu_has_native_bf16`, and `maybe_compile` with
  its `EagerFallback`;
- training: the weight average `EMA`, `StopFlag` (Ctrl-C and SIGTERM save, then exit),
  `signals_deferred` (no signal lands inside a save), the progress line `Progress`, the guard
  against NaN and divergence `LossGuard`/`weights_finite`, out-of-memory detection
  `is_oom`/`oom_error`, `available_memory`, `Phase` (progress and ETA of long non-training
  work) and `Stopwatch` (where a command's time went);
- files and run folders: `atomic_write` (never a torn file), `write_json` (args.json),
  `plot_loss` (loss.png from log.jsonl), `RunFolder` (one run per folder: a pid lock, no silent
  overwrite or reuse), `run_files`, `trim_log` and `check_writable`.

Imports no project module.

Offers: UserError, run_main, HelpFormatter, positive, finite, fraction, seed_value,
add_training_flags, by_device, device_defaults, parse_with_given, NOT_SETTINGS, settings_of, restore_settings, pick_device,
cpu_has_native_bf16, pick_amp, autocast, setup_backends, maybe_compile, EagerFallback, EMA,
StopFlag, signals_deferred, Progress, Phase, Stopwatch, LossGuard, weights_finite, is_oom, oom_error,
available_memory, atomic_write, write_json, plot_loss, RUN_FILES, RunFolder, run_files, trim_log, check_writable
"""
import argparse
import copy
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageDraw


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
        print("\ninterrupted: stopped (the last checkpoint, if any, is intact)", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
# Command-line flags

class HelpFormatter(argparse.HelpFormatter):
    """argparse help that ends each flag's text with its default, unless the text gives it, and
    keeps the lines of the examples (an epilog starting with "example") as written."""

    def _fill_text(self, text, width, indent):
        if text.startswith("example"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

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


def finite(text):
    """argparse type: any finite float (a guidance weight may be 0 or negative, never nan/inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


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
                   help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps (Apple "
                        "GPUs). Default: auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (--no-compile to turn off). Default: on for CUDA, "
                        "off for CPU (compiling costs more than it saves in short CPU runs)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision: bf16 or fp16 autocast, or off (float32). auto = bf16 on "
                        "CUDA (fp16 + GradScaler where bf16 is missing) and on CPUs with native "
                        "bf16, else off. Default: auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in OUT/ckpt.pt up to --steps; its stored settings "
                        "are the defaults, and flags you give that differ are listed")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds a run: its checkpoint, log and "
                        "pictures are deleted first")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept flags that make another experiment (data, "
                        "--n-builtin, --seed, the VAE), which are refused otherwise")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed (data order, noise, init). Default: 0")
    p.add_argument("--log-every", type=positive(int), default=50,
                   help="steps between progress lines (and NaN checks). Default: 50")
    p.add_argument("--ckpt-every", type=positive(int), default=500,
                   help="steps between checkpoints (always one at the end and on Ctrl-C). Default: 500")
    p.add_argument("--n-builtin", type=positive(int), default=20000,
                   help="number of built-in training images (ignored with --data). Default: 20000")


def parse_with_given(parser, argv=None):
    """(args, given): the parsed flags, and the set of dests the command line set explicitly
    (not by default), so that --resume can tell a stored setting from a changed one."""
    args = parser.parse_args(argv)
    for action in parser._actions:                   # parse again with no defaults at all
        action.default = argparse.SUPPRESS
    return args, set(vars(parser.parse_args(argv)))


# Settings that are not the run's: how this command was asked to run, not what it trains.
NOT_SETTINGS = {"resume", "overwrite", "allow_changes", "out"}


def settings_of(args):
    """The run's settings from parsed flags (plain values), as stored in its checkpoint."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def restore_settings(args, given, saved, experiment, allow_changes, flag="--resume"):
    """--resume: every stored setting the command line does not set becomes the value; the ones it
    sets differently are listed in one line. A difference in an `experiment` setting (data,
    seed, ...) makes another experiment: refused unless `allow_changes`. Returns the changes."""
    changes = {}
    for key, old in saved.items():
        if key in NOT_SETTINGS or not hasattr(args, key):
            continue
        if key not in given:
            setattr(args, key, old)
        elif getattr(args, key) != old:
            changes[key] = old
    text = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (was {v})" for k, v in changes.items())
    refused = [k for k in changes if k in experiment]
    if refused and not allow_changes:
        raise UserError(f"{flag}: {text}; {', '.join('--' + k.replace('_', '-') for k in refused)} "
                        f"would make another experiment: use the run's values, another --out, or "
                        f"--allow-changes to resume anyway")
    if changes:
        print(f"resuming with changed settings: {text}", flush=True)
    return changes


# ---------------------------------------------------------------------------------------------
# Device and precision

def pick_device(name):
    """torch.device from --device: auto (CUDA, else CPU), cpu, cuda[:N] or mps (Apple GPUs; the
    CPU, with one line, where MPS is missing). Asking for CUDA without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        print("warning: --device mps: MPS is not available on this machine; using the CPU",
              file=sys.stderr)
        return torch.device("cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def device_defaults(defaults, device):
    """A script's DEFAULTS for this device: the CUDA ones on CUDA, the CPU ones elsewhere."""
    return defaults["cuda" if device.type == "cuda" else "cpu"]


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
    if device.type == "mps":                            # Apple GPUs: autocast only when asked
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
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
    """Ctrl-C (SIGINT) or SIGTERM (kill, docker stop, SLURM) sets a flag; the loop saves a
    checkpoint at the end of the step and exits with `exit_code` (130 or 143). A second signal
    gives up at once (KeyboardInterrupt: the last checkpoint stays), except inside a save, which
    it never interrupts (save_checkpoint defers signals until its file is complete)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    @property
    def stop(self):
        return self.signum is not None

    @property
    def exit_code(self):
        return 128 + self.signum

    def _handle(self, signum, frame):
        if self.stop:  # a second signal: give up at once
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        what = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
        print(f"\n{what}: saving a checkpoint at the end of this step...", file=sys.stderr,
              flush=True)

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait until the block is done, then reach their handlers as usual: a file
    being written is always finished (or cleaned up) before a signal can stop the process."""
    if threading.current_thread() is not threading.main_thread():
        yield                                         # signals only reach the main thread
        return
    pending = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum))
           for s in StopFlag.SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum in pending:
            signal.raise_signal(signum)


class Progress:
    """One progress line per report: step, loss terms, images/s and ETA; also appended to log.jsonl.
    `elapsed0`: training seconds of the run before this process (a resumed run's clock goes on)."""

    def __init__(self, log_path, total_steps, start_step, batch_size, elapsed0=0.0):
        self.log_path, self.total, self.batch = log_path, total_steps, batch_size
        self.t0, self.step0, self.elapsed0 = time.perf_counter(), start_step, elapsed0

    def elapsed(self):
        """Training seconds of the whole run so far."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def report(self, step, terms):
        seconds = time.perf_counter() - self.t0
        done = step - self.step0
        ips = done * self.batch / max(seconds, 1e-9)
        eta = (self.total - step) * seconds / max(done, 1)
        text = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
        print(f"step {step}/{self.total} {text} | {ips:.0f} img/s | ETA {eta / 60:.1f} min", flush=True)
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": step, **terms, "img_per_s": round(ips, 2),
                                    "time": round(self.elapsed(), 2)}) + "\n")


class Phase:
    """Progress of a long phase that is not a training loop (encoding the dataset, sampling many
    images, an evaluation): a line with the count, the time so far and an ETA, at most every
    `every` seconds and once at the end; silent for phases that end within `every` seconds."""

    def __init__(self, what, total, every=5.0):
        self.what, self.total, self.every = what, total, every
        self.t0 = self.last = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if now - self.last < self.every and (done < self.total or now - self.t0 < self.every):
            return
        self.last = now
        seconds = now - self.t0
        eta = (self.total - done) * seconds / max(done, 1)
        end = "done" if done >= self.total else f"ETA {eta:.0f} s"
        print(f"{self.what}: {done}/{self.total} in {seconds:.0f} s, {end}", flush=True)


class Stopwatch:
    """Wall-clock seconds of a command's phases: `with watch("DiT training"):` charges the time to
    that phase; a phase inside another pauses the outer one, so the shares add up to 100%."""

    def __init__(self):
        self.seconds, self.stack = {}, []
        self.t0 = self.mark = time.perf_counter()

    @contextmanager
    def __call__(self, name):
        self._charge()
        self.stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self.stack.pop()

    def _charge(self):
        now = time.perf_counter()
        name = self.stack[-1] if self.stack else "other"
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.mark
        self.mark = now

    def report(self):
        """Lines 'phase  minutes  share' for every phase, then the total."""
        self._charge()
        total = max(time.perf_counter() - self.t0, 1e-9)
        width = max(len(name) for name in self.seconds)
        lines = [f"  {name:<{width}}  {s / 60:5.1f} min  {100 * s / total:3.0f}%"
                 for name, s in self.seconds.items() if s >= 0.05]
        return "\n".join([f"time: {total / 60:.1f} min in all"] + lines)


class LossGuard:
    """Stops a run whose loss is not finite, or has grown by orders of magnitude (more than
    DIVERGED times) over the lowest value seen, before anything is saved over the last good
    checkpoint. The first step's loss is the first reference (`reference`), so an explosion
    within the first log interval is caught too. `check` takes the mean loss since the last one."""

    DIVERGED = 100.0

    def __init__(self, ckpt_path):
        self.ckpt_path, self.lowest = ckpt_path, math.inf

    def reference(self, loss):
        """A loss known to be sane (the first step's), as a float."""
        if math.isfinite(loss):
            self.lowest = min(self.lowest, loss)

    def check(self, loss, step, model=None):
        """loss: mean loss (float) since the last check, or None if none. Given `model`, its
        weights are checked too (an update can break the weights before the loss shows it)."""
        what = None
        if loss is not None and not math.isfinite(loss):
            what = f"loss became {loss}"
        elif loss is not None and loss > self.DIVERGED * self.lowest:
            what = f"loss grew from {self.lowest:.4g} to {loss:.4g} (diverging)"
        elif model is not None and not weights_finite(model):
            what = "the weights became inf/NaN"
        if what:
            raise UserError(f"{what} by step {step}; stopped without saving, the last good "
                            f"checkpoint ({self.ckpt_path}) is untouched; lower --lr or use --amp off")
        if loss is not None:
            self.reference(loss)


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


def available_memory():
    """Bytes of memory available to a new allocation (Linux MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
# Run folders

def atomic_write(path, write, what="file"):
    """Write a file atomically: write(f) into a temporary file in the same folder, flush, fsync,
    rename, with SIGINT/SIGTERM deferred until done. A crash, a signal or a full disk at any moment
    leaves either the old file or the new one, never a torn or empty one. Write errors (torch.save
    reports a full disk as a RuntimeError) become a UserError: one line, exit status 2."""
    path = Path(path)
    tmp = None
    try:
        with signals_deferred():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
                with os.fdopen(fd, "wb") as f:
                    os.fchmod(f.fileno(), 0o666 & ~_umask())     # mkstemp's 0600 -> like open()
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                tmp = None
                for stale in path.parent.glob(f"{path.name}.*.tmp"):   # of a killed earlier run
                    stale.unlink(missing_ok=True)
                dir_fd = os.open(path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):
            raise                                     # not a write failure: a bug, not the disk
        raise UserError(f"could not write {path} ({_write_failure(e, path.parent)}); the previous "
                        f"{what}, if any, is intact: free disk space or choose another --out")


def _write_failure(e, folder):
    """Why a write failed, in words: the OS's reason, or a full disk torch reported vaguely."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2 ** 20:
        return f"No space left on device: {free / 2 ** 20:.1f} MiB free"
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


RUN_FILES = ("ckpt.pt", "log.jsonl", "args.json", "loss.png", "recon.png", "samples_*.png",
             "prompts.txt")


def write_json(path, obj, what="file"):
    """obj as indented JSON, atomically (args.json, evaluation results)."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()), what)


def plot_loss(log_path, png_path, key="loss", size=(640, 400)):
    """Draw log.jsonl's `key` against the step (log-scale step axis, log-scale loss) with Pillow:
    the logged values (light) and their running mean (dark), with the step and loss ranges
    written on the axes. Written atomically; nothing is drawn before two logged points."""
    points = []
    for line in Path(log_path).read_text().splitlines():
        entry = json.loads(line)
        if key in entry and entry.get("step", 0) > 0 and entry[key] > 0 and math.isfinite(entry[key]):
            points.append((entry["step"], entry[key]))
    if len(points) < 2:
        return
    smooth, mean = [], None
    for _, y in points:
        mean = y if mean is None else 0.8 * mean + 0.2 * y
        smooth.append(mean)
    W, H, left, bottom, pad = size[0], size[1], 60, 30, 12
    lx = [math.log10(x) for x, _ in points]
    ly = [math.log10(y) for _, y in points]
    x0, x1 = min(lx), max(lx) + 1e-9
    y0, y1 = min(ly), max(ly) + 1e-9

    def xy(x, y):
        return (left + (math.log10(x) - x0) / (x1 - x0) * (W - left - pad),
                pad + (y1 - math.log10(y)) / (y1 - y0) * (H - bottom - pad))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, pad, W - pad, H - bottom], outline=(160, 160, 160))
    draw.line([xy(x, y) for x, y in points], fill=(170, 200, 240), width=1)
    draw.line([xy(x, y) for (x, _), y in zip(points, smooth)], fill=(20, 60, 160), width=2)
    draw.text((left, H - bottom + 6), f"step {points[0][0]}", fill="black")
    draw.text((W - pad - 90, H - bottom + 6), f"step {points[-1][0]} (log)", fill="black")
    draw.text((4, pad), f"{10 ** y1:.3g}", fill="black")
    draw.text((4, H - bottom - 12), f"{10 ** y0:.3g}", fill="black")
    draw.text((left + 8, pad + 4), f"{key} (log scale): logged, running mean", fill="black")
    atomic_write(png_path, lambda f: image.save(f, format="PNG"), "picture")


class RunFolder:
    """A run folder belongs to one run.

    Made when the run is ready to write (`claim`), never by a command that fails before; then
    locked (`.lock` holds the owner's pid and start time) so a second writer is refused, and a
    lock left by a killed process is recovered. A folder that holds a run (a checkpoint, a log, a
    picture) is refused unless --resume (continue it) or --overwrite (delete its files first).
    `release` unlocks, and removes the folder again if this command made it and left it empty."""

    def __init__(self, out, resume=False, overwrite=False):
        self.path, self.resume, self.overwrite = Path(out), resume, overwrite
        self.lock = self.path / ".lock"
        self.made = self.locked = False
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other: continue the run, or "
                            "start it over")
        check_writable(self.path)
        self._check_contents()                       # fail before the slow work, nothing made

    def _check_contents(self):
        found = self.run_files()
        ckpt = self.path / "ckpt.pt"
        if self.resume and not ckpt.is_file():
            raise UserError(f"--resume {ckpt}: file not found; nothing to resume (drop --resume "
                            f"to start a new run)")
        if found and not (self.resume or self.overwrite):
            raise UserError(f"--out {self.path} already holds a run ({', '.join(found[:3])}); "
                            f"continue it with --resume, start over with --overwrite, or choose "
                            f"another --out")

    def run_files(self):
        return run_files(self.path)

    def claim(self):
        """Make and lock the folder (again checking its contents: another run may have finished
        there meanwhile); with --overwrite, delete the previous run's files. Returns the path."""
        try:
            self.made = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e}); choose "
                            f"another folder")
        self._lock()
        self._check_contents()
        if self.overwrite:
            for name in self.run_files():
                (self.path / name).unlink()
        return self.path

    def _lock(self):
        me = _process_id(os.getpid())
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.lock.read_text().strip() if self.lock.exists() else ""
                pid = int(owner.split()[0]) if owner[:1].isdigit() else None
                if pid is not None and owner != me and _process_id(pid) == owner:
                    raise UserError(f"--out {self.path} is in use by another run (pid {pid}); "
                                    f"wait for it to finish or choose another --out")
                print(f"note: removed a stale lock of a process that is gone ({self.lock})",
                      file=sys.stderr)
                self.lock.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise UserError(f"--out {self.path}: cannot write there ({e.strerror or e}); "
                                f"choose another folder")
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.locked = True
            return
        raise UserError(f"--out {self.path}: could not take its lock {self.lock}; remove it if no "
                        f"run is using the folder")

    def release(self):
        if self.locked:
            self.lock.unlink(missing_ok=True)
            self.locked = False
        if self.made and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()                          # a failed command leaves no empty folder
            self.made = False


def run_files(folder):
    """Names of the files in a folder that belong to a run (RUN_FILES)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted({p.name for pattern in RUN_FILES for p in folder.glob(pattern)})


def _process_id(pid):
    """'pid start-time' of a live process ('pid' where /proc has no start time), '' if gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass                                           # alive, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"   # field 22: start time
    except (OSError, IndexError):
        return str(pid)


def trim_log(path, step):
    """Drop the lines of log.jsonl after `step` (a resumed run repeats them; they were logged by
    the interrupted process after its last checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.write("".join(keep).encode()), "log")


def check_writable(path):
    """--out must be a folder we can write, or one we can make (no folder is made here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: cannot write there (it is a file, not a folder); choose "
                        f"another folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "not a folder" if not existing.is_dir() else "permission denied"
        raise UserError(f"--out {path}: cannot write there ({why}: {existing}); choose another "
                        f"folder")
    return path
