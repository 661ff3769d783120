"""Plumbing every command-line tool needs: nothing here is in the lecture.

The training scripts, sample.py, evaluate.py and bench.py stand on these pieces so that each
script reads as its recipe step:

- user mistakes: `UserError` (a mistake the user can fix) and `run_main` (turns it, a full disk
  or Ctrl-C into one line on stderr and an exit status, never a traceback);
- command-line flags: `HelpFormatter` (every flag's help ends with its default) and the argparse
  types `positive`, `finite`, `fraction`, `seed_value` (none accepts nan or inf), with the bounds
  `MAX_STEPS` and `MAX_BATCH` of step counts and batch sizes;
- device and precision: `pick_device` (cpu, cuda, mps), `pick_amp` (the autocast dtype),
  `autocast`, `setup_backends`, `cpu_has_native_bf16`, and `maybe_compile` with its
  `EagerFallback`; `is_oom` recognises an out-of-memory error, `available_memory` measures room;
  `set_threads` picks torch's CPU threads (`physical_cores`) and says when the machine is busy;
- `Phase`: progress and ETA of long work that is not a training loop.

What only the two trainers use is in training.py; run folders and their files in runs.py.
Imports no project module.

Offers: UserError, run_main, HelpFormatter, MAX_STEPS, MAX_BATCH, positive, finite, fraction,
seed_value, pick_device, cpu_has_native_bf16, pick_amp, autocast, setup_backends, maybe_compile,
EagerFallback, is_oom, available_memory, physical_cores, set_threads, Phase
"""
import argparse
import math
import os
import sys
import time
from contextlib import nullcontext

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


MAX_STEPS = 10 ** 7      # optimizer or sampler steps: more is a typo, and overflows a time grid
MAX_BATCH = 2 ** 16      # images per batch: more does not fit in any machine's memory


def positive(kind, allow_zero=False, at_most=None):
    """argparse type: a finite int or float > 0 (>= 0 with allow_zero), and <= at_most if given."""
    bound = ">= 0" if allow_zero else "> 0"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}")
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most}, got {text}")
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


# ---------------------------------------------------------------------------------------------
# Device and precision

def pick_device(name):
    """torch.device from --device: auto (CUDA, else Apple's MPS, else CPU), cpu, cuda[:N] or mps
    (Apple GPUs; the CPU, with one line, where MPS is missing). Asking for CUDA without CUDA is a
    user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
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


def is_oom(e):
    """CUDA's OutOfMemoryError, or any allocator's "out of memory" / "can't allocate memory"."""
    text = str(e).lower()
    return (isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text
            or "can't allocate memory" in text)


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


def physical_cores():
    """CPU cores this process may run on, counting each physical core once (hyper-threads share a
    core's arithmetic units, so a second thread per core rarely pays for matmuls)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            block = {}
            for line in f.read().splitlines() + [""]:
                if ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    block[key] = value
                elif block:
                    cores.add((block.get("physical id"), block.get("core id", block.get("processor"))))
                    block = {}
    except OSError:
        pass
    return max(1, min(allowed or 1, len(cores) or allowed or 1))


def set_threads(threads=None):
    """Set torch's CPU threads: `threads`, else the physical cores shared by the processes of a
    torchrun on this machine. Returns one line that says so, with a warning when the machine is
    busy (load average above the cores): every op then waits on a descheduled thread, and a
    second torch job on the same cores slows both by several times."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = physical_cores()
    chosen = threads or max(1, cores // local)
    torch.set_num_threads(chosen)
    shared = f" / {local} processes" if local > 1 else ""
    why = "--threads" if threads else f"{cores} physical cores{shared}"
    line = f"CPU threads: {chosen} ({why})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores + 0.5:
        line += (f"; note: this machine is busy (load average {load:.1f} on {cores} cores): "
                 f"expect slower steps than on an idle machine, and do not run a second torch "
                 f"job beside this one")
    return line


# ---------------------------------------------------------------------------------------------
# Long work

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
